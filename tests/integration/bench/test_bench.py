"""`tandem bench offline` end to end on a tiny model: it runs both sides and writes its JSON."""

import json
import subprocess
import sys


def test_bench_offline_writes_figures(tiny_llama, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "tandem.cli",
        "bench",
        "offline",
        "--model",
        tiny_llama,
        "--num-prompts",
        "3",
        "--input-len",
        "8",
        "--output-len",
        "5",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ratio engine / best hf" in proc.stdout
    figures = json.loads(out.read_text())
    for key in ("engine_tok_s", "hf_tok_s", "ratio", "decode_step_ms_batch1", "bandwidth_bound_ms"):
        assert figures[key] > 0, key
    assert abs(figures["ratio"] - figures["engine_tok_s"] / figures["hf_tok_s"]) < 1e-6
