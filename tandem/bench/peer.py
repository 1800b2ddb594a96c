"""`tandem bench peer`: Tandem against llama.cpp's `llama-server` on this machine, with the
same weights and the same client, one server after the other.

- llama.cpp: the tree vendored in `llama-cpp-python`'s source package (LLAMA_CPP_PYTHON),
  built once into the cache directory (CMake Release, `GGML_NATIVE=ON`, target
  `llama-server`; nothing fetched at build time), run with `-t 2 -tb 2 -c 16384 --parallel
  32 --cont-batching --kv-unified` (without `--kv-unified` each of the 32 slots gets 1/32 of
  the context). The model: converted to a bf16 GGUF by that tree's `convert_hf_to_gguf.py`.
- The client: vLLM's `benchmarks/backend_request_func.py`, from vLLM's source package
  (VLLM), run by `bench/peer_client.py` in a virtualenv of its own in the cache (TOOLS: the
  converter's and the client's packages, kept out of Tandem's).
- Tandem: `tandem serve` with its defaults (and `--serve-args`).

The load: random prompts of `--input-len` tokens (the same text to both servers), EOS
ignored, `--output-len` tokens; one client (ITL p50), then 32 (output tok/s, TTFT p50).
Source packages come from PyPI (the simple API), checked against the hashes below.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# (project, file, sha256) on PyPI
LLAMA_CPP_PYTHON = ("llama-cpp-python", "llama_cpp_python-0.3.36.tar.gz",
                    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")  # fmt: skip
VLLM = ("vllm", "vllm-0.33.0.tar.gz",
        "f4c33c2503d52bb411146afa9618a4f48bed68912f617e6803ac8d76e4c74112")  # fmt: skip
# The converter's (the tree's own pins but transformers, which must read the tokenizer
# files Tandem writes) and the client's (vLLM's request functions import transformers 5).
TOOLS = ["torch==2.13.0", "numpy~=2.2.6", "sentencepiece>=0.1.98,<0.3.0",
         "transformers==5.23.0", "protobuf>=4.21.0,<5.0.0", "aiohttp==3.14.5", "tqdm",
         "regex", "pyyaml", "requests"]  # fmt: skip
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF"]  # fmt: skip
LLAMA_SERVER_FLAGS = ["-t", "2", "-tb", "2", "-c", "16384", "--parallel", "32",
                      "--cont-batching", "--kv-unified"]  # fmt: skip
SIMPLE_API = "https://pypi.org/simple/{project}/"


def peer_dir() -> Path:
    from tandem.model_prep import cache_dir

    return cache_dir() / "peer"


def _say(message: str) -> None:
    print(f"[peer] {message}", flush=True)


def _run(cmd: list, log: Path, **kwargs) -> None:
    """`cmd`, its output appended to `log`; on failure the log's tail in the error."""
    with open(log, "ab") as out:
        done = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                              **kwargs)  # fmt: skip
    if done.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... failed ({log}):\n{tail}")


def fetch_sdist(project: str, filename: str, sha256: str, dest: Path) -> Path:
    """PyPI's file `filename` of `project` into `dest` (once), checked against `sha256`."""
    path = dest / filename
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return path
    accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
    request = urllib.request.Request(SIMPLE_API.format(project=project), headers=accept)
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    url = next(f["url"] for f in files if f["filename"] == filename)
    _say(f"downloading {url}")
    dest.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=600) as response, open(tmp, "wb") as out:
        shutil.copyfileobj(response, out)
    if hashlib.sha256(tmp.read_bytes()).hexdigest() != sha256:
        tmp.unlink()
        raise RuntimeError(f"{filename}: sha256 differs from {sha256}")
    tmp.rename(path)
    return path


def _extract(archive: Path, inner: str, dest: Path) -> Path:
    """The members of `archive` under `<top>/<inner>` into `dest`; the extracted folder."""
    with tarfile.open(archive) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/{inner}"
        members = [m for m in tar.getmembers() if f"{m.name}/".startswith(f"{prefix}/")]
        tar.extractall(dest, members=members, filter="data")
    return dest / prefix


def tools_python() -> Path:
    """The peer tools' virtualenv (TOOLS), made once."""
    venv = peer_dir() / "venv"
    python, stamp = venv / "bin" / "python", venv / "tools.json"
    if python.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == TOOLS:
        return python
    start = time.monotonic()
    _say(f"making the tools' virtualenv {venv} (once) ...")
    shutil.rmtree(venv, ignore_errors=True)
    peer_dir().mkdir(parents=True, exist_ok=True)
    log = peer_dir() / "venv.log"
    _run([sys.executable, "-m", "venv", venv], log)
    _run([python, "-m", "pip", "install", "-q", *TOOLS], log)
    stamp.write_text(json.dumps(TOOLS))
    _say(f"tools' virtualenv ready in {time.monotonic() - start:.0f} s")
    return python


def llama_tree() -> Path:
    """The llama.cpp tree vendored in LLAMA_CPP_PYTHON's source package, extracted once."""
    tree = peer_dir() / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    archive = fetch_sdist(*LLAMA_CPP_PYTHON, peer_dir() / "downloads")
    with tempfile.TemporaryDirectory(dir=peer_dir()) as tmp:
        _extract(archive, "vendor/llama.cpp", Path(tmp)).rename(tree)
    return tree


def llama_server() -> Path:
    """llama.cpp's server, built once (the build's time is printed)."""
    build = peer_dir() / "llama-build"
    binary = build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    tree = llama_tree()
    log = peer_dir() / "llama-build.log"
    jobs = str(os.cpu_count() or 1)
    _say(f"building llama-server from {tree} (once; log {log}) ...")
    start = time.monotonic()
    _run(["cmake", "-S", tree, "-B", build, *CMAKE_FLAGS], log)
    _run(["cmake", "--build", build, "--config", "Release", "--target", "llama-server",
          "-j", jobs], log)  # fmt: skip
    minutes = (time.monotonic() - start) / 60
    _say(f"llama-server built in {minutes:.1f} min ({jobs} jobs): {binary}")
    return binary


def vllm_client() -> Path:
    """The folder holding vLLM's backend_request_func.py, extracted once."""
    folder = peer_dir() / "vllm-client"
    if (folder / "backend_request_func.py").is_file():
        return folder
    archive = fetch_sdist(*VLLM, peer_dir() / "downloads")
    with tempfile.TemporaryDirectory(dir=peer_dir()) as tmp:
        source = _extract(archive, "benchmarks/backend_request_func.py", Path(tmp))
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / "backend_request_func.py")
    return folder


def gguf_of(model: Path) -> Path:
    """`model` (a Hugging Face folder) as a bf16 GGUF, converted once."""
    stem = hashlib.sha256(str(model.resolve()).encode()).hexdigest()[:8]
    out = peer_dir() / "models" / f"{model.name}-{stem}-bf16.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    script = llama_tree() / "convert_hf_to_gguf.py"
    _say(f"converting {model} to {out} ...")
    tmp = out.with_suffix(".part")
    _run([tools_python(), script, model, "--outtype", "bf16", "--outfile", tmp],
         peer_dir() / "convert.log", env=os.environ | {"HF_HUB_OFFLINE": "1"})  # fmt: skip
    tmp.rename(out)
    return out


def make_prompts(model: Path, n: int, input_len: int, seed: int) -> list[dict]:
    """`n` prompts of random tokens, as text (what both servers are sent), with their
    length as this tokenizer counts the text again."""
    from tokenizers import Tokenizer

    from tandem.bench.load import random_prompts

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = random_prompts(n, input_len, tokenizer.get_vocab_size(with_added_tokens=False), seed)
    texts = [tokenizer.decode(p) for p in ids]
    return [{"prompt": t, "prompt_len": len(tokenizer.encode(t, add_special_tokens=False).ids)}
            for t in texts]  # fmt: skip


@contextlib.contextmanager
def llama_cpp(binary: Path, gguf: Path, timeout: float) -> Iterator[str]:
    """llama-server on a free port: its URL."""
    from tandem.bench.deploy import _stop, _wait_healthy
    from tandem.services.servers import free_port

    port = free_port()
    cmd = [str(binary), "-m", str(gguf), *LLAMA_SERVER_FLAGS, "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tandem-peer-") as scratch:
        log = Path(scratch) / "llama-server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=binary.parent)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc, log, timeout)
            yield url
        finally:
            _stop(proc)


@contextlib.contextmanager
def tandem(model: Path, serve_args: list[str], timeout: float) -> Iterator[str]:
    from tandem.bench.deploy import deployment

    with deployment(["--model", str(model), *serve_args], timeout) as (url, _):
        yield url


def served_name(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def run_client(url: str, prompts: list[dict], output_len: int, concurrency: int,
               warmup: int) -> dict:  # fmt: skip
    """One load through vLLM's client; its figures (see `figures`)."""
    with tempfile.TemporaryDirectory(prefix="tandem-peer-") as scratch:
        prompts_file, out = Path(scratch) / "prompts.json", Path(scratch) / "results.json"
        prompts_file.write_text(json.dumps(prompts))
        cmd = [tools_python(), Path(__file__).with_name("peer_client.py"),
               "--client-dir", vllm_client(), "--url", url, "--model", served_name(url),
               "--prompts", prompts_file, "--output-len", output_len,
               "--concurrency", concurrency, "--warmup", warmup, "--out", out]  # fmt: skip
        _run(cmd, Path(scratch) / "client.log")
        return figures(json.loads(out.read_text()))


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def figures(report: dict) -> dict:
    ok = [r for r in report["results"] if r["success"]]
    gaps = [g for r in ok for g in r["itl"]]
    tokens = sum(r["output_tokens"] for r in ok)
    return {
        "requests": len(report["results"]), "failed": len(report["results"]) - len(ok),
        "duration_s": report["duration_s"], "output_tokens": tokens,
        "output_tok_s": tokens / report["duration_s"],
        "ttft_p50_ms": 1000 * statistics.median(r["ttft"] for r in ok) if ok else float("nan"),
        "ttft_p99_ms": 1000 * _p([r["ttft"] for r in ok], 99),
        "itl_p50_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
        "itl_p99_ms": 1000 * _p(gaps, 99),
    }  # fmt: skip


def measure(url: str, name: str, args: argparse.Namespace, prompts: dict) -> dict:
    result = {}
    for clients in (1, args.max_concurrency):
        _say(f"{name}: {clients} client(s), {len(prompts[clients])} prompts ...")
        result[f"c{clients}"] = run_client(url, prompts[clients], args.output_len, clients,
                                           warmup=max(2, clients))  # fmt: skip
        _say(f"{name}: {json.dumps(result[f'c{clients}'])}")
    return result


SERVERS = ("tandem", "tandem-colocated", "llama.cpp")


def cmd_bench_peer(args: argparse.Namespace) -> int:
    from tandem.model_prep import default_model_dir, prepare_default_model

    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs every request at INFO
    model = Path(args.model) if args.model else prepare_default_model()
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(servers) - set(SERVERS)
    if unknown:
        raise ValueError(f"--servers: unknown {sorted(unknown)}; choose among {SERVERS}")
    start = time.monotonic()
    if "llama.cpp" in servers:  # the one-time parts first, so that the loads run back to back
        binary, gguf = llama_server(), gguf_of(model)
    tools_python(), vllm_client()
    _say(f"set-up: {time.monotonic() - start:.0f} s (nothing is built again on later runs)")
    c = args.max_concurrency
    prompts = {  # each load's warm-up prompts first (see `measure`)
        1: make_prompts(model, args.num_prompts_single + 2, args.input_len, args.seed),
        c: make_prompts(model, args.num_prompts + c, args.input_len, args.seed + 1),
    }
    extra = args.serve_args.split()
    runs: dict[str, dict] = {}
    for name in servers:
        if name == "llama.cpp":
            server = llama_cpp(binary, gguf, args.startup_timeout)
        else:
            colocated = ["--colocated"] if name == "tandem-colocated" else []
            server = tandem(model, colocated + extra, args.startup_timeout)
        with server as url:
            runs[name] = measure(url, name, args, prompts)
    report = compare(runs, args, model if model != default_model_dir() else None)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"json: {args.json}")
    from tandem.bench.plots import plot_path, try_plot

    path = plot_path(args)
    if path is not None:
        try_plot(path, lambda p: plot_peer(report, p))
    return 0


ROWS = [("1 client: ITL p50 (ms)", "c1", "itl_p50_ms", "lower"),
        ("{c} clients: output tok/s", "cN", "output_tok_s", "higher"),
        ("{c} clients: TTFT p50 (ms)", "cN", "ttft_p50_ms", "lower")]  # fmt: skip


def compare(runs: dict[str, dict], args: argparse.Namespace, model: Path | None) -> dict:
    """The table (printed) and the JSON report: each figure, and Tandem's / llama.cpp's."""
    c = args.max_concurrency
    names = list(runs)
    print(f"{'=' * 20} Tandem vs llama.cpp ({args.input_len} + {args.output_len} tokens) "
          f"{'=' * 20}")  # fmt: skip
    print(" | ".join([f"{'':<28}"] + [f"{n:>16}" for n in names]
                     + (["  ratio to llama.cpp"] if "llama.cpp" in runs else [])))  # fmt: skip
    ratios: dict[str, dict] = {}
    for label, load, key, _ in ROWS:
        load_key = "c1" if load == "c1" else f"c{c}"
        values = {n: runs[n][load_key][key] for n in names}
        cells = [f"{label.format(c=c):<28}"] + [f"{values[n]:>16.1f}" for n in names]
        if "llama.cpp" in runs:
            per = {n: values[n] / values["llama.cpp"] for n in names if n != "llama.cpp"}
            ratios[f"{load_key}_{key}"] = per
            cells.append("  " + ", ".join(f"{n} {r:.2f}x" for n, r in per.items()))
        print(" | ".join(cells))
    return {"model": str(model) if model else "default", "input_len": args.input_len,
            "output_len": args.output_len, "max_concurrency": c,
            "llama_server_flags": LLAMA_SERVER_FLAGS, "client": VLLM[1],
            "llama_cpp_source": LLAMA_CPP_PYTHON[1], "runs": runs,
            "ratio_to_llama_cpp": ratios}  # fmt: skip


def plot_peer(report: dict, path: Path) -> None:
    from tandem.bench.plots import _pyplot, _save

    plt = _pyplot()
    c = report["max_concurrency"]
    runs = report["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (label, load, key, better) in zip(axes, ROWS):
        load_key = "c1" if load == "c1" else f"c{c}"
        names = list(runs)
        ax.bar(names, [runs[n][load_key][key] for n in names], color="tab:blue")
        ax.set_title(f"{label.format(c=c)} ({better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    _save(plt, fig, path, f"Tandem vs llama.cpp, {report['input_len']} + "
                          f"{report['output_len']} tokens, this machine")  # fmt: skip


def add_bench_peer_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("peer", help="Tandem against llama.cpp's server, vLLM's client")
    p.add_argument("--model", default=None, help="Hugging Face folder (default: the default)")
    p.add_argument("--servers", default="tandem,llama.cpp",
                   help=f"comma-separated, in order, among {', '.join(SERVERS)}")  # fmt: skip
    p.add_argument("--serve-args", default="", help="more flags for `tandem serve`")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts-single", type=int, default=16, help="the 1-client load")
    p.add_argument("--num-prompts", type=int, default=128, help="the many-client load")
    p.add_argument("--max-concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--plot", default=None, help="PNG (default: next to --json)")
    p.set_defaults(func=cmd_bench_peer)
