"""`tandem bench peer`'s pure parts: the figures of a load from vLLM's client's results, the
comparison table's ratios, and the source package's folder taken out of its archive."""

import argparse
import io
import math
import tarfile

from tandem.bench import peer


def _report(duration_s: float, results: list[tuple[float, list[float], int]]) -> dict:
    return {"duration_s": duration_s,
            "results": [{"success": tokens > 0, "ttft": ttft, "itl": itl, "latency": 1.0,
                         "output_tokens": tokens, "error": ""}
                        for ttft, itl, tokens in results]}  # fmt: skip


def test_figures_count_only_successful_requests():
    report = _report(2.0, [(0.1, [0.01, 0.03], 3), (0.3, [0.02, 0.02], 3), (9.0, [], 0)])
    f = peer.figures(report)
    assert f["requests"] == 3 and f["failed"] == 1
    assert f["output_tokens"] == 6 and f["output_tok_s"] == 3.0
    assert math.isclose(f["ttft_p50_ms"], 200.0) and math.isclose(f["itl_p50_ms"], 20.0)
    assert math.isclose(f["itl_p99_ms"], 30.0)


def test_compare_gives_each_figure_as_a_ratio_to_llama_cpp(capsys):
    def run(itl, tok_s, ttft):
        return {"c1": {"itl_p50_ms": itl}, "c32": {"output_tok_s": tok_s, "ttft_p50_ms": ttft}}

    runs = {"tandem": run(20.0, 400.0, 1000.0), "llama.cpp": run(10.0, 320.0, 2000.0)}
    args = argparse.Namespace(max_concurrency=32, input_len=128, output_len=128)
    report = peer.compare(runs, args, None)
    ratios = report["ratio_to_llama_cpp"]
    assert ratios == {"c1_itl_p50_ms": {"tandem": 2.0}, "c32_output_tok_s": {"tandem": 1.25},
                      "c32_ttft_p50_ms": {"tandem": 0.5}}  # fmt: skip
    out = capsys.readouterr().out
    assert "1 client: ITL p50" in out and "tandem 1.25x" in out


def test_extract_takes_one_folder_of_the_archive(tmp_path):
    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("pkg-1.0/vendor/tree/a.txt", "pkg-1.0/vendor/tree2/b.txt",
                     "pkg-1.0/other.txt"):  # fmt: skip
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = peer._extract(archive, "vendor/tree", tmp_path / "out")
    assert folder == tmp_path / "out" / "pkg-1.0" / "vendor" / "tree"
    assert (folder / "a.txt").read_text() == "pkg-1.0/vendor/tree/a.txt"
    assert not (tmp_path / "out" / "pkg-1.0" / "vendor" / "tree2").exists()
    assert not (tmp_path / "out" / "pkg-1.0" / "other.txt").exists()
