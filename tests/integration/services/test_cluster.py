"""The disaggregated cluster for real: `tandem serve` with real NATS and Redis, separate
tokenizer, scheduler, prefill and decode processes, driven with the openai client. Its greedy
output equals the in-process engine's (and so Hugging Face's)."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tandem.engine.llm import LLM
from tandem.engine.request import SamplingParams
from tandem.services.servers import free_port
from tandem.services.transport import kv_shm
from tests.helpers.cluster import (
    assert_all_blocks_free,
    group_is_gone,
    kv_transfers,
    start_cluster,
    stop_cluster,
)
from tests.helpers.faults import stats, wait_for


@pytest.fixture(scope="module")
def cluster_log(tmp_path_factory):
    """What `tandem serve` printed (stdout and stderr)."""
    return tmp_path_factory.mktemp("cluster") / "serve.log"


@pytest.fixture(scope="module")
def cluster(default_model, cluster_log):
    proc, base = start_cluster(
        default_model,
        "--prefill-workers", "2", "--decode-workers", "2",
        "--cpu-kv-cache-space", "0.25", "--max-model-len", "1024",
        "--max-local-prefill-length", "0",  # every request handed off (test_local_prefill.py)
        log_path=cluster_log,
    )  # fmt: skip
    yield base
    stop_cluster(proc)
    assert proc.returncode == 0, "tandem serve did not stop cleanly"
    assert group_is_gone(proc.pid), "a stage or server outlived tandem serve"


@pytest.fixture(scope="module")
def reference(default_model):
    return LLM(default_model, dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster + "/v1", api_key="none", max_retries=0)


def _greedy(reference: LLM, prompts: list[list[int]], max_tokens: list[int]) -> list[str]:
    outs = []
    for ids, n in zip(prompts, max_tokens):
        params = SamplingParams(max_tokens=n, temperature=0.0)
        outs.append(reference.generate([ids], params)[0].outputs[0].text)
    return outs


def test_the_launcher_says_what_came_up_and_what_it_waits_for(cluster, cluster_log):
    expected = ["nats-server: started on nats://127.0.0.1:", "redis: started on redis://",
                "prefill-1: started (pid", "; loading the model",
                "tokenizer: gRPC ready on 127.0.0.1:", "gateway: listening on http://",
                "scheduler: up", "decode-1: model loaded, heartbeating",
                f"ready: {cluster} in ", "Tandem is serving"]  # fmt: skip
    # "ready" comes once the launcher saw /health itself, and one worker of each role may
    # still be loading then: it is announced when it comes up
    deadline = time.monotonic() + 120
    while not all(line in cluster_log.read_text() for line in expected):
        assert time.monotonic() < deadline, cluster_log.read_text()
        time.sleep(0.1)
    assert ":***@" in cluster_log.read_text()  # Redis's password never in the log


def test_greedy_completion_and_chat_equal_the_engine(client, reference):
    prompt = "The three primary colors are"
    r = client.completions.create(model=None, prompt=prompt, max_tokens=32, temperature=0)
    ids = reference.tokenizer.encode(prompt)
    assert r.choices[0].text == _greedy(reference, [ids], [32])[0]
    assert r.usage.prompt_tokens == len(ids)

    messages = [{"role": "user", "content": "Name a planet."}]
    chat = client.chat.completions.create(
        model=None, messages=messages, max_tokens=24, temperature=0
    )
    text = reference.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    chat_ids = reference.tokenizer.encode(text, add_special_tokens=False)
    assert chat.choices[0].message.content == _greedy(reference, [chat_ids], [24])[0]


def test_streamed_deltas_concatenate_to_the_full_text(client):
    kwargs = dict(model=None, prompt="Once upon a time", max_tokens=40, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stream = client.completions.create(stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in stream if c.choices) == full


def test_sixteen_concurrent_mixed_requests_on_two_and_two_workers(cluster, client, reference):
    files_before = set(kv_shm.SHM_DIR.glob("tandem-kv-*"))
    g = torch.Generator().manual_seed(5)
    lengths = [3, 17, 40, 90, 150, 260, 8, 33, 64, 5, 120, 16, 48, 200, 11, 75]
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in lengths]
    max_tokens = [8 + (i * 7) % 40 for i in range(len(prompts))]
    steps_before = httpx.get(cluster + "/stats").json()["workers"]

    def run(i: int) -> str:
        r = client.completions.create(
            model=None, prompt=prompts[i], max_tokens=max_tokens[i], temperature=0
        )
        return r.choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, range(16)))
    assert got == _greedy(reference, prompts, max_tokens)
    workers = httpx.get(cluster + "/stats").json()["workers"]
    assert sorted(w["role"] for w in workers.values()) == ["decode"] * 2 + ["prefill"] * 2
    # Every worker took part.
    assert all(w["num_steps"] > steps_before[k]["num_steps"] for k, w in workers.items())
    assert_all_blocks_free(cluster)
    # Its workers share this machine: every hand-off's KV went through shared memory.
    kv = kv_transfers(cluster, at_least=16)
    assert kv["num_shared_memory"] == kv["num_transfers"], kv
    left = set(kv_shm.SHM_DIR.glob("tandem-kv-*")) - files_before
    assert not left, f"KV files left in /dev/shm: {left}"


def test_stop_string_ends_the_request_with_the_text_cut(client, reference):
    prompt = "1, 2, 3, 4, 5,"
    full = _greedy(reference, [reference.tokenizer.encode(prompt)], [24])[0]
    stop = full.strip().split(",")[2].strip() or "8"  # a string the model will produce
    assert stop in full
    r = client.completions.create(
        model=None, prompt=prompt, max_tokens=24, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_disconnected_stream_frees_its_blocks_on_every_worker(cluster, client):
    body = {"prompt": "Tell me a long story", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", cluster + "/v1/completions", json=body | {"ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # gone after the first token
    assert_all_blocks_free(cluster)
    r = client.completions.create(model=None, prompt="Still there?", max_tokens=4)
    assert r.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("max_local", ["0", "256"], ids=["handed-off", "local"])
def test_decode_preemption_goes_back_through_the_scheduler(tiny_llama, max_local):
    """A decode worker with too few blocks preempts; the request is prefilled again with its
    tokens so far (by a prefill worker, or by a decode worker itself: conditional
    disaggregation) and finishes with exactly the tokens a roomy engine gives."""
    proc, base = start_cluster(
        tiny_llama,
        "--num-gpu-blocks-override", "20", "--max-model-len", "256",
        "--max-local-prefill-length", max_local,
        env={"TANDEM_KV_SHM": "0"},  # the KV goes over NATS, in chunks
    )  # fmt: skip
    try:
        g = torch.Generator().manual_seed(9)
        prompts = [torch.randint(3, 256, (20,), generator=g).tolist() for _ in range(6)]
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)

        def run(ids: list[int]) -> str:
            r = client.completions.create(
                model=None, prompt=ids, max_tokens=100, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            return r.choices[0].text

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(run, prompts))
        roomy = LLM(tiny_llama, dtype="float32", max_model_len=256, num_gpu_blocks_override=256)
        params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        expected = [o.outputs[0].text for o in roomy.generate(prompts, params)]
        assert got == expected
        # the workers' counts come with their heartbeats (every 0.5 s): the last may predate
        # the preemptions of a run this short
        preempted = lambda: any(w["num_preemptions"] > 0 for w in stats(base).values())  # noqa: E731
        wait_for(preempted, 10, "no worker reported a preemption")
        assert_all_blocks_free(base)
        if max_local == "0":
            kv = kv_transfers(base, at_least=6)
            assert kv["num_transfers"] >= 6 and kv["num_shared_memory"] == 0, kv
    finally:
        stop_cluster(proc)


def test_a_stage_that_cannot_start_stops_the_whole_cluster(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # not a model
    cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", str(tmp_path),
           "--port", str(free_port())]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "exited during start-up" in out
    assert group_is_gone(proc.pid), "NATS, Redis or a stage was left running"


def test_seeded_and_n_sampling_equal_the_engine_on_two_and_two_workers(cluster, reference):
    """Seeded requests give the engine's tokens whichever of the workers runs them, and
    n > 1 forks give the engine's n samples."""
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (7, 30, 55, 90)]
    sampling = dict(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, ignore_eos=True,
                    presence_penalty=0.3, repetition_penalty=1.1)  # fmt: skip

    def run(i: int) -> list[list[int]]:
        body = {"prompt": prompts[i], "seed": 100 + i, "n": 2, "return_token_ids": True,
                **sampling}  # fmt: skip
        r = httpx.post(cluster + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return [c["token_ids"] for c in r.json()["choices"]]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, range(4)))
    for i, prompt in enumerate(prompts):
        params = SamplingParams(seed=100 + i, n=2, **sampling)
        want = reference.generate([prompt], params)[0].outputs
        assert got[i] == [c.token_ids for c in want]
