"""`tandem`'s command line as a vLLM user meets it: the model positional, vLLM's flags (those
Tandem lacks answered in one line), `--config` files, environment defaults read only by the
subcommand that uses them, and commands that import only what they run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tandem.cli import build_parser
from tandem.cli.vllm_flags import ABSENT, SAME_AS_VLLM, flag_map_markdown
from tests.helpers.paths import REPO_ROOT


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def one_line_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err, err
    return err


def test_the_model_is_positional_as_in_vllm(capsys):
    assert parse("serve", "/models/m").model == "/models/m"
    assert parse("serve", "--model", "/models/m").model == "/models/m"
    assert parse("serve", "--port", "9000", "/models/m").model == "/models/m"
    assert parse("serve").model is None
    err = one_line_error(capsys, "serve", "/models/a", "--model", "/models/b")
    assert "given twice" in err
    with pytest.raises(SystemExit):
        parse("serve", "--help")
    help_text = capsys.readouterr().out
    positional = help_text.split("positional arguments:")[1].split("options:")[0]
    assert positional.split()[0] == "model"


def test_vllm_flags_keep_vllm_meanings():
    args = parse("serve", "m", "--dtype", "half", "--gpu-memory-utilization", "0.5",
                 "--no-enable-prefix-caching", "--served-model-name", "a", "b",
                 "--allowed-origins", '["https://x.example"]', "--root-path", "/api",
                 "--disable-log-requests", "--uvicorn-log-level", "info")  # fmt: skip
    assert args.dtype == "float16" and args.gpu_memory_utilization == 0.5
    assert args.enable_prefix_caching is False
    assert args.served_model_name == ["a", "b"]
    assert args.allowed_origins == ["https://x.example"] and args.root_path == "/api"
    assert args.enable_log_requests is False
    assert parse("serve", "--enable-prefix-caching", "--enable-log-requests").enable_log_requests
    assert parse("serve", "--dtype", "float").dtype == "float32"
    serve_flags = set(build_parser()._subparsers._group_actions[0].choices["serve"]
                      ._option_string_actions)  # fmt: skip
    assert set(SAME_AS_VLLM) <= serve_flags


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2: not supported"),
        (["-tp", "4"], "--tensor-parallel-size 4: not supported"),
        (["--kv-cache-dtype", "int8"], "invalid choice"),
        (["--enable-sleep-mode"], "sleep mode"),
        (["--quantization", "awq"], "quantized"),
        (["--allowed-origins", "*"], "JSON list"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_flag_tandem_lacks_gets_one_line(capsys, argv, words):
    assert words in one_line_error(capsys, "serve", *argv)


def test_flags_asking_for_what_tandem_does_are_accepted(capsys):
    args = parse("serve", "--tensor-parallel-size", "1", "--kv-cache-dtype", "auto",
                 "--enforce-eager", "--enable-chunked-prefill", "--trust-remote-code")  # fmt: skip
    assert args.command == "serve"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ignoring --trust-remote-code" in err


def test_config_file_flags_are_overridden_by_the_command_line(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: /models/m\nmax_num_seqs: 8\nmax-model-len: 512\nport: 9001\n"
        "enable-prefix-caching: false\nserved-model-name: [a, b]\ncolocated: true\n"
    )
    args = parse("serve", "--config", str(config), "--max-num-seqs", "16")
    assert args.model == "/models/m" and args.max_num_seqs == 16 and args.max_model_len == 512
    assert args.port == 9001 and args.enable_prefix_caching is False and args.colocated
    assert args.served_model_name == ["a", "b"]
    config.write_text("max_num_sequences: 8\n")
    assert "unknown key 'max_num_sequences'" in one_line_error(capsys, "serve", "--config",
                                                               str(config))  # fmt: skip


def test_environment_defaults_are_read_by_their_subcommand_only(monkeypatch, capsys):
    # What Kubernetes injects for a Service named `tandem`: no port number.
    monkeypatch.setenv("TANDEM_PORT", "tcp://10.0.0.7:8000")
    assert parse("tokenizer").port == 50051  # other subcommands never read it
    assert parse("gateway").port == 8000
    assert parse("serve", "--port", "8001").port == 8001
    err = one_line_error(capsys, "serve")
    assert "$TANDEM_PORT is 'tcp://10.0.0.7:8000'" in err and "enableServiceLinks" in err
    monkeypatch.setenv("TANDEM_HEALTH_PORT", "tcp://10.0.0.7:8080")
    assert "$TANDEM_HEALTH_PORT" in one_line_error(capsys, "scheduler")
    assert parse("scheduler", "--health-port", "9100").health_port == 9100
    monkeypatch.setenv("TANDEM_PORT", "8123")
    monkeypatch.setenv("NATS_URL", "nats://nats:4222")
    monkeypatch.delenv("TANDEM_HEALTH_PORT")
    assert parse("serve").port == 8123
    assert parse("decode").nats_url == "nats://nats:4222"
    assert parse("decode").health_port is None


@pytest.mark.parametrize(
    "argv,absent",
    [
        (["--help"], ("torch", "httpx", "tandem.bench.serve", "tandem.services")),
        (["gateway", "--help"], ("torch", "tandem.bench.serve")),
        (["tokenizer", "--help"], ("torch", "tandem.bench.serve")),
        (["bench", "--help"], ("torch", "tandem.bench.serve", "tandem.planner")),
    ],
)
def test_commands_import_only_what_they_run(argv, absent):
    code = (
        "import sys\nfrom tandem.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print('loaded:', [m for m in {list(absent)!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=True).stdout  # fmt: skip
    assert out.strip().splitlines()[-1] == "loaded: []", out


def test_lazy_subcommands_have_their_flags_when_run():
    args = parse("plan", "--profile", "p.json", "--request-rate", "2", "--ttft-slo-ms", "500",
                 "--itl-slo-ms", "50")  # fmt: skip
    assert args.command == "plan" and args.request_rate == 2.0 and callable(args.func)
    assert parse("bench", "serve", "--workload", "interference").workload == "interference"


def test_the_vllm_flag_map_in_the_docs_is_current():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    table = flag_map_markdown(serve)
    doc = (REPO_ROOT / "docs" / "configuration.md").read_text()
    assert table in doc, "regenerate docs/configuration.md's flag map (flag_map_markdown)"
    for absent in ABSENT:
        assert absent.flags[0] in table
