"""No request and no bus message brings a stage down. One cluster (1 prefill + 1 decode
worker) on a NATS server of the test's own, so the test can speak on every subject: bad token
ids over HTTP, each message that used to kill a stage, and a fuzz of every subject of the
subject table while streams run. Throughout, every stage stays the same process, and fresh
requests return the same greedy tokens as before."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time

import httpx
import nats
import pytest
from google.protobuf.descriptor import FieldDescriptor
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from tandem.bench.deploy import children, proc_argv
from tandem.services.servers import start_nats
from tandem.services.transport.subjects import SUBJECTS, subject
from tandem.v1 import common_pb2, engine_pb2
from tests.helpers.cluster import assert_all_blocks_free, start_cluster, stop_cluster

VOCAB = 256  # the tiny model's
OUT_OF_VOCAB = 60000
WORKERS = ("prefill-0", "decode-0")
DELTAS = subject("gateway", "robustness", "deltas")
PROMPTS = ["the quick brown fox", "héllo wörld", "over the lazy dog", "jumps over"]
FUZZ_SECONDS = 45.0


@pytest.fixture(scope="module")
def nats_server():
    server = start_nats()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tiny_llama, nats_server, tmp_path_factory):
    """(base URL, NATS URL, {stage: pid} at start, the greedy reference)."""
    log = tmp_path_factory.mktemp("robustness") / "cluster.log"
    proc, base = start_cluster(
        tiny_llama, "--max-model-len", "256", "--num-gpu-blocks-override", "128",
        "--worker-placement", "shared", log_path=log, env={"NATS_URL": nats_server.url},
    )  # fmt: skip
    try:
        stages = stage_pids(proc.pid)
        assert set(stages) >= {"gateway", "tokenizer", "scheduler", *WORKERS}, stages
        yield base, nats_server.url, stages, [greedy(base, p) for p in PROMPTS]
        assert stage_pids(proc.pid) == stages, f"a stage was restarted; see {log}"
    finally:
        stop_cluster(proc)


def stage_pids(launcher: int) -> dict[str, int]:
    out = {}
    for pid in children(launcher):
        argv = proc_argv(pid)
        if "tandem.cli" in argv:
            stage = argv[argv.index("tandem.cli") + 1]
            if "--worker-id" in argv:
                stage = argv[argv.index("--worker-id") + 1]
            out[stage] = pid
    return out


def greedy(base: str, prompt: str, max_tokens: int = 24) -> list[int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def assert_serving_as_before(cluster) -> None:
    base, _, _, reference = cluster
    assert [greedy(base, p) for p in PROMPTS] == reference


def spec(request_id: str, prompt=(5, 6, 7), **fields) -> common_pb2.RequestSpec:
    params = common_pb2.SamplingParams(max_tokens=4, temperature=0, top_p=1.0)
    return common_pb2.RequestSpec(
        request_id=request_id, prompt_token_ids=list(prompt), params=params, **fields
    )


async def connect(url: str) -> nats.NATS:
    errors: list[Exception] = []

    async def on_error(e: Exception) -> None:
        errors.append(e)

    return await nats.connect(url, error_cb=on_error)


# -- the API ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [OUT_OF_VOCAB, -1])
@pytest.mark.parametrize(
    "route, field",
    [
        ("/v1/completions", "prompt"),
        ("/v1/completions", "stop_token_ids"),
        ("/v1/completions", "allowed_token_ids"),
        ("/v1/completions", "logit_bias"),
        ("/v1/chat/completions", "stop_token_ids"),
        ("/v1/chat/completions", "allowed_token_ids"),
        ("/v1/chat/completions", "logit_bias"),
    ],
)
def test_every_token_id_field_with_an_id_outside_the_vocabulary_is_a_400(
    cluster, route, field, bad
):
    base = cluster[0]
    body: dict = {"max_tokens": 4, "min_tokens": 2}
    if route == "/v1/completions":
        body["prompt"] = "Hello"
    else:
        body["messages"] = [{"role": "user", "content": "Hello"}]
    body[field] = {str(bad): 1.0} if field == "logit_bias" else [bad]
    if field == "prompt":
        body["prompt"] = [1, bad]
    r = httpx.post(base + route, json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == field, error


def test_min_tokens_over_max_tokens_is_a_400(cluster):
    body = {"prompt": "Hello", "max_tokens": 2, "min_tokens": 5}
    r = httpx.post(cluster[0] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text


def test_the_request_that_stopped_the_cluster_is_a_400_and_the_cluster_serves_on(cluster):
    body = {"prompt": "Hello", "max_tokens": 8, "stop_token_ids": [OUT_OF_VOCAB], "min_tokens": 2}
    r = httpx.post(cluster[0] + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert_serving_as_before(cluster)


def test_a_client_request_id_is_its_response_id_however_often_it_comes_or_a_400(cluster):
    base = cluster[0]
    body = {"prompt": "Hello", "max_tokens": 2}
    for bad in ("a b", "x" * 300, ""):
        r = httpx.post(base + "/v1/completions", json=body | {"request_id": bad}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "request_id", r.text

    async def again_and_again():  # at once, and one after the other
        mine = body | {"request_id": "mine", "max_tokens": 100, "ignore_eos": True}
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            at_once = await asyncio.gather(*(http.post("/v1/completions", json=mine)
                                             for _ in range(2)))  # fmt: skip
            return [*at_once, await http.post("/v1/completions", json=mine)]

    for r in asyncio.run(again_and_again()):
        assert r.status_code == 200 and r.json()["id"] == "mine", r.text
        assert r.json()["usage"]["completion_tokens"] == 100


# -- messages that used to kill a stage ------------------------------------------------------


def test_inconsistent_hand_offs_are_refused_with_an_error_reply(cluster):
    async def scenario():
        nc = await connect(cluster[1])
        handoffs = [
            # no chunks, yet tokens claimed computed: "0 KV blocks do not hold 2 tokens"
            engine_pb2.KVHandoff(request=spec("h1", output_token_ids=[9]),
                                 num_computed_tokens=3, prefill_worker_id="prefill-0"),
            engine_pb2.KVHandoff(request=spec("h2", output_token_ids=[9]),
                                 num_computed_tokens=0, prefill_worker_id="prefill-0"),
            # out-of-vocabulary tokens
            engine_pb2.KVHandoff(request=spec("h3", prompt=[OUT_OF_VOCAB], output_token_ids=[9]),
                                 num_computed_tokens=1, prefill_worker_id="prefill-0"),
        ]  # fmt: skip
        replies = []
        for handoff in handoffs:  # each after its probe, as a prefill worker sends them
            probe = engine_pb2.KVProbe(request=handoff.request)
            await nc.request(subject("decode", "decode-0", "probe"), probe.SerializeToString(),
                             timeout=10)  # fmt: skip
            reply = await nc.request(subject("decode", "decode-0", "handoff"),
                                     handoff.SerializeToString(), timeout=10)  # fmt: skip
            replies.append(reply)
        await nc.close()
        return replies

    for reply in asyncio.run(scenario()):
        error = (reply.headers or {}).get("Tandem-Error")
        if error is None:
            ack = engine_pb2.KVHandoffAck.FromString(reply.data)
            assert not ack.accepted and ack.error, ack
    assert_serving_as_before(cluster)


def test_bad_submits_and_preemptions_get_an_answer_and_never_loop(cluster):
    """Out-of-vocabulary prompt or output ids: a 400 through the tokenizer (which holds a
    request's streams), once; one the prefill worker refuses: placed once more, then a 400,
    never a loop; a request forked from itself: dropped at the door."""

    async def scenario():
        nc = await connect(cluster[1])
        deltas: list[engine_pb2.RequestTokens] = []

        async def on_tokens(raw):
            batch = engine_pb2.TokenBatch.FromString(raw.data)
            deltas.extend(t for t in batch.requests if t.error_code)

        await nc.subscribe(subject("tokens"), cb=on_tokens)
        await nc.flush()
        oov_prompt = spec("s1", prompt=[1, OUT_OF_VOCAB], reply_subject=DELTAS)
        submit = engine_pb2.SubmitRequest(request=oov_prompt)
        await nc.publish(subject("submit"), submit.SerializeToString())
        oov_output = spec("s2", output_token_ids=[OUT_OF_VOCAB], reply_subject=DELTAS)
        await nc.publish(
            subject("scheduler", "preempted"),
            engine_pb2.Preempted(request=oov_output, worker_id="decode-0").SerializeToString(),
        )
        # passes the scheduler's door, refused by the prefill worker: once more, then a 400
        refused = spec("s4", reply_subject=DELTAS)
        refused.params.stop_token_ids.append(OUT_OF_VOCAB)
        submit = engine_pb2.SubmitRequest(request=refused)
        await nc.publish(subject("submit"), submit.SerializeToString())
        forked = spec("s3", reply_subject=DELTAS, fork_ids=["s3"])
        forked.params.n = 2
        submit = engine_pb2.SubmitRequest(request=forked)
        await nc.publish(subject("submit"), submit.SerializeToString())
        await asyncio.sleep(3.0)
        await nc.close()
        return deltas

    deltas = asyncio.run(scenario())
    answered = sorted((d.request_id, d.error_code) for d in deltas)
    assert answered == [("s1", 400), ("s2", 400), ("s4", 400)], deltas
    assert_serving_as_before(cluster)


def test_bad_heartbeats_and_metrics_spoil_neither_routing_nor_stats_nor_metrics(cluster):
    base = cluster[0]
    bad = [
        engine_pb2.Heartbeat(),  # empty: was "maximum context length is 0 tokens" for 5 s
        engine_pb2.Heartbeat(worker_id="decode-9", role=engine_pb2.WORKER_ROLE_DECODE,
                             num_blocks=8, num_free_blocks=8, block_size=16, max_num_seqs=4,
                             max_model_len=256, max_num_batched_tokens=64, vocab_size=VOCAB,
                             timestamp=math.nan),  # NaN: was a 500 on /stats
        engine_pb2.Heartbeat(worker_id="decode 9", role=engine_pb2.WORKER_ROLE_DECODE,
                             num_blocks=8, block_size=16, max_num_seqs=4, max_model_len=256,
                             max_num_batched_tokens=64, vocab_size=VOCAB),  # a space
    ]  # fmt: skip
    garbage = engine_pb2.MetricsSnapshot(
        instance="x", stage="decode", timestamp=time.time(), exposition='a{b="c} nan nan\n'
    )

    async def scenario():
        nc = await connect(cluster[1])
        for hb in bad:
            await nc.publish(subject("heartbeat"), hb.SerializeToString())
        await nc.publish(subject("metrics"), garbage.SerializeToString())
        await nc.flush()
        await nc.close()

    asyncio.run(scenario())
    time.sleep(0.5)
    assert httpx.get(base + "/stats", timeout=10).status_code == 200
    r = httpx.get(base + "/metrics", timeout=10)
    assert r.status_code == 200 and "vllm:" in r.text
    assert set(httpx.get(base + "/stats", timeout=10).json()["workers"]) == set(WORKERS)
    assert_serving_as_before(cluster)


def test_a_live_decode_worker_declared_lost_drops_its_streams_which_finish_elsewhere(cluster):
    """What the scheduler sends when a slow worker misses heartbeats: the tokenizer re-queues
    the worker's streams; the worker, alive, drops them rather than run them twice (which
    was a duplicate request_id there, and a stream that hung)."""
    base, url, _, _ = cluster
    prompts, max_tokens = PROMPTS[:2], 200
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    reference = []
    for prompt in prompts:
        r = httpx.post(base + "/v1/completions", json=body | {"prompt": prompt}, timeout=60)
        reference.append(r.json()["choices"][0]["text"])
    started = [asyncio.Event() for _ in prompts]

    async def stream(http: httpx.AsyncClient, prompt: str, started: asyncio.Event) -> str:
        text = []
        request = body | {"prompt": prompt, "stream": True}
        async with http.stream("POST", "/v1/completions", json=request) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["text"])
                    if len(text) >= 3:
                        started.set()
        return "".join(text)

    async def scenario():
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            tasks = [asyncio.create_task(stream(http, p, e)) for p, e in zip(prompts, started)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            nc = await connect(url)
            lost = engine_pb2.WorkerLost(worker_id="decode-0")
            await nc.publish(subject("worker", "lost"), lost.SerializeToString())
            await nc.flush()
            await nc.close()
            return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    assert asyncio.run(scenario()) == reference
    assert_all_blocks_free(base)


# -- the fuzz --------------------------------------------------------------------------------

STRINGS = ["", "a b", "x" * 300, *WORKERS, "decode-9", "r-1", "*", ">", "\x00\n", DELTAS,
           "float32", "tandem-kv-1-" + "0" * 32]  # fmt: skip
INTS = {
    FieldDescriptor.TYPE_INT32: [0, 1, -1, 7, 2**31 - 1, -(2**31), OUT_OF_VOCAB, VOCAB],
    FieldDescriptor.TYPE_INT64: [0, 1, -1, 2**63 - 1, -(2**63)],
    FieldDescriptor.TYPE_UINT32: [0, 1, 7, 2**32 - 1],
    FieldDescriptor.TYPE_UINT64: [0, 1, 2**64 - 1],
}
FLOATS = [0.0, -1.0, 0.5, math.nan, math.inf, -math.inf, 1e300]


def _scalar(field: FieldDescriptor, rng: random.Random):
    if field.type in INTS:
        return rng.choice(INTS[field.type])
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return rng.choice(FLOATS)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if field.type == FieldDescriptor.TYPE_STRING:
        return rng.choice(STRINGS)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 7, 64, 4096]))
    if field.type == FieldDescriptor.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values])
    raise AssertionError(field.type)


def fill(msg, rng: random.Random, depth: int = 0):
    """Every field of `msg` set (or not) to values chosen to be wrong: negative and huge
    counts, unknown and duplicate ids, out-of-vocabulary tokens, NaN."""
    for field in msg.DESCRIPTOR.fields:
        if rng.random() < 0.3:
            continue
        value = getattr(msg, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                k, v = (field.message_type.fields_by_name[n] for n in ("key", "value"))
                for _ in range(rng.randint(1, 3)):
                    value[_scalar(k, rng)] = _scalar(v, rng)
            elif depth < 3 and field.is_repeated:
                for _ in range(rng.randint(1, 3)):
                    fill(value.add(), rng, depth + 1)
            elif depth < 3:
                fill(value, rng, depth + 1)
                value.SetInParent()
        elif field.is_repeated:
            items = [_scalar(field, rng) for _ in range(rng.randint(1, 4))]
            value.extend(items + items[:1])  # a duplicate too
        else:
            setattr(msg, field.name, _scalar(field, rng))
    return msg


def fuzz_payload(row, rng: random.Random) -> bytes:
    """Random bytes, a truncated message, a message of another type, or one of the right
    type with wrong values."""
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 256))
    right = fill(row.message(), rng).SerializeToString()
    if kind == 1:
        return right[: rng.randint(0, max(0, len(right) - 1))]
    if kind == 2:
        other = rng.choice([r for r in SUBJECTS if r.message is not row.message])
        return fill(other.message(), rng).SerializeToString()
    return right


def concrete(row, rng: random.Random) -> str:
    return row.full.replace("*", rng.choice([*WORKERS, "decode-9", "robustness"]))


def test_fuzz_of_every_subject_while_streams_run(cluster):
    base, url, _, _ = cluster
    rng = random.Random(29)
    stream_body = {"prompt": "the quick", "max_tokens": 40, "temperature": 0, "stream": True}

    async def stream(http: httpx.AsyncClient) -> int:
        async with http.stream("POST", "/v1/completions", json=stream_body) as r:
            async for _ in r.aiter_lines():
                pass
            return r.status_code

    async def streams(stop: asyncio.Event) -> list[int]:
        statuses = []
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            while not stop.is_set():
                statuses += await asyncio.wait_for(
                    asyncio.gather(*(stream(http) for _ in range(3))), 120
                )
        return statuses

    async def fuzz(stop: asyncio.Event) -> dict[str, int]:
        nc = await connect(url)
        sent: dict[str, int] = {}
        unanswered = []
        deadline = time.monotonic() + FUZZ_SECONDS
        while time.monotonic() < deadline:
            row = rng.choice(SUBJECTS)
            subj = concrete(row, rng)
            payload = fuzz_payload(row, rng)
            if row.reply is None:
                await nc.publish(subj, payload)
            else:
                try:
                    await nc.request(subj, payload, timeout=10)
                except NoRespondersError:
                    pass  # no such worker
                except NatsTimeout:
                    unanswered.append(subj)
            sent[row.pattern] = sent.get(row.pattern, 0) + 1
            await asyncio.sleep(0.005)
        stop.set()
        await nc.close()
        assert not unanswered, f"requests never answered: {unanswered[:5]}"
        return sent

    async def scenario():
        stop = asyncio.Event()
        return await asyncio.gather(fuzz(stop), streams(stop))

    sent, statuses = asyncio.run(scenario())
    assert {row.pattern for row in SUBJECTS} <= set(sent), sent
    # 503 is what a forged drain or heartbeat may cost a request for a moment; never a 500
    assert statuses.count(200) > len(statuses) // 2, statuses
    assert set(statuses) <= {200, 503}, statuses
    assert_all_blocks_free(base, timeout=60)
    assert_serving_as_before(cluster)
