"""Protobuf over a real NATS server; KV moves in acked chunks under max_payload."""

import asyncio
import subprocess
import time

import pytest
import torch

from tandem.services.servers import free_port, launch, nats_server_binary, start_nats
from tandem.services.transport.bus import Bus, tls_context_from_env
from tandem.services.transport.kv_transfer import KVAssembler, send_kv
from tandem.services.transport.subjects import subject
from tandem.v1 import engine_pb2


@pytest.fixture(scope="module")
def nats_url():
    server = start_nats()
    yield server.url
    server.stop()


def test_protobuf_messages_and_bad_payloads(nats_url):
    async def scenario():
        a, b = await Bus.connect(nats_url, "a"), await Bus.connect(nats_url, "b")
        got = asyncio.Queue()

        async def on_abort(msg, raw):
            await got.put(msg)

        await b.subscribe(subject("abort"), engine_pb2.AbortRequest, on_abort)
        await b.flush()
        await a.nc.publish(subject("abort"), b"\xff\xff not protobuf")
        await a.publish(subject("abort"), engine_pb2.AbortRequest(request_id="r1", reason="client"))
        msg = await asyncio.wait_for(got.get(), 5)
        await a.close()
        await b.close()
        return msg

    msg = asyncio.run(scenario())
    assert msg.request_id == "r1" and msg.reason == "client"


def test_kv_transfer_in_acked_chunks_with_a_window(nats_url):
    tile = (4, 2, 3, 16, 64)  # layers, k/v, kv heads, block size, head dim: 96 KiB a block
    kv = torch.randn(40, *tile)  # 3.75 MiB: many chunks at a 1 MiB max_payload

    async def scenario():
        sender, receiver = await Bus.connect(nats_url, "p"), await Bus.connect(nats_url, "d")
        assembler = KVAssembler(tile)
        peak = 0
        subj = subject("decode", "w0", "kv")
        sub = None

        async def on_chunk(chunk, raw):
            nonlocal peak
            peak = max(peak, sub.pending_msgs + 1)  # this one and those queued behind it
            await asyncio.sleep(0.01)  # a slow consumer
            assembler.add(chunk)
            await raw.respond(b"")

        sub = await receiver.subscribe(subj, engine_pb2.KVBlockChunk, on_chunk)
        await receiver.flush()
        n = await send_kv(sender, subj, "r1", kv, window=2)
        assert assembler.complete("r1", n)
        out = torch.cat(assembler.take("r1"))
        payload = sender.max_payload
        await sender.close()
        await receiver.close()
        return n, out, peak, payload

    n, out, peak, payload = asyncio.run(scenario())
    block_bytes = kv[0].numel() * 4
    assert n == -(-40 // ((payload - 4096) // block_bytes)) and n > 1
    assert torch.equal(out, kv) and 1 <= peak <= 2  # never more than the window unacked


def _certificates(folder) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made by openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=tandem-test-ca")  # fmt: skip
    for name, ext in [("server", "subjectAltName=IP:127.0.0.1"),
                      ("client", "extendedKeyUsage=clientAuth")]:  # fmt: skip
        (folder / f"{name}.ext").write_text(ext + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN={name}")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
            "-extfile", f"{name}.ext")  # fmt: skip
    return {n: str(folder / n) for n in ("ca.pem", "server.pem", "server.key",
                                         "client.pem", "client.key")}  # fmt: skip


def test_tls_with_client_certificates_from_the_environment(tmp_path, monkeypatch):
    certs = _certificates(tmp_path)
    port = free_port()
    cmd = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "--tlsverify",
           "--tlscert", certs["server.pem"], "--tlskey", certs["server.key"],
           "--tlscacert", certs["ca.pem"]]  # fmt: skip
    url = f"tls://127.0.0.1:{port}"
    scratch = tmp_path / "nats"
    scratch.mkdir()
    # listening once this returns: a refused connection below is TLS's doing
    server = launch("nats-server", cmd, port, url, scratch, timeout=15)

    async def round_trip() -> str:
        bus = await Bus.connect(url, "tls-test", timeout=5)
        got = asyncio.Queue()

        async def on_abort(msg, raw):
            await got.put(msg.request_id)

        await bus.subscribe(subject("abort"), engine_pb2.AbortRequest, on_abort)
        await bus.flush()
        await bus.publish(subject("abort"), engine_pb2.AbortRequest(request_id="over-tls"))
        try:
            return await asyncio.wait_for(got.get(), 5)
        finally:
            await bus.close()

    try:
        with pytest.raises(RuntimeError, match="unreachable"):  # the server's CA not trusted
            asyncio.run(Bus.connect(url, "untrusting", timeout=2))
        monkeypatch.setenv("NATS_TLS_CA", certs["ca.pem"])
        with pytest.raises(RuntimeError, match="unreachable"):  # no client certificate
            asyncio.run(Bus.connect(url, "anonymous", timeout=2))
        monkeypatch.setenv("NATS_TLS_CERT", certs["client.pem"])
        monkeypatch.setenv("NATS_TLS_KEY", certs["client.key"])
        assert asyncio.run(round_trip()) == "over-tls"
    finally:
        server.stop()


def test_a_client_certificate_needs_its_key():
    with pytest.raises(ValueError, match="go together"):
        tls_context_from_env({"NATS_TLS_CERT": "client.pem"})
    assert tls_context_from_env({}) is None


def test_a_submit_goes_again_until_the_scheduler_and_the_tokenizer_ack_it(nats_url, monkeypatch):
    """A stage that was not subscribed when a request was sent (NATS restarted, it is still
    reconnecting) gets it again; the scheduler takes it once, however often it comes (with
    no worker there, taking it means refusing it: one 503 delta); with a stage that never
    answers, the request fails with 503 naming it."""
    from tandem.engine.client import EngineOverloaded
    from tandem.engine.request import Request, SamplingParams
    from tandem.services.gateway import cluster_client
    from tandem.services.scheduler.core import ClusterScheduler
    from tandem.services.scheduler.service import SchedulerService
    from tandem.services.transport import codec

    def submit_msg(request_id: str) -> engine_pb2.SubmitRequest:
        request = Request(request_id, [1, 2, 3], SamplingParams(max_tokens=4))
        deltas = subject("gateway", "test", "deltas")
        return engine_pb2.SubmitRequest(request=codec.request_to_spec(request, deltas))

    async def scenario():
        gateway = cluster_client.ClusterEngineClient(nats_url, "unused:0")
        gateway.bus = await Bus.connect(nats_url, "gateway")
        await gateway.bus.subscribe(gateway.ack_subject, engine_pb2.SubmitAck, gateway._on_ack)
        refused = []

        async def on_delta(delta, raw):
            refused.append((delta.request_id, delta.error_code))

        await gateway.bus.subscribe(subject("gateway", "test", "deltas"), engine_pb2.TextDelta,
                                    on_delta)  # fmt: skip
        tokenizer = await Bus.connect(nats_url, "tokenizer")
        received = []

        async def tokenizer_acks(msg, raw):
            received.append(msg.request.request_id)
            ack = engine_pb2.SubmitAck(request_id=msg.request.request_id, stage="tokenizer")
            await tokenizer.publish(raw.reply, ack)

        await tokenizer.subscribe(subject("submit"), engine_pb2.SubmitRequest, tokenizer_acks)
        await tokenizer.flush()
        submitting = asyncio.create_task(gateway._submit(submit_msg("r1"), None))
        await asyncio.sleep(0.2)  # the first send reached the tokenizer only
        scheduler = SchedulerService(await Bus.connect(nats_url, "scheduler"),
                                     ClusterScheduler(), None)  # fmt: skip
        await scheduler.start()
        await asyncio.wait_for(submitting, 10)
        # a third time, as a resend crossing a late ack would
        await gateway.bus.publish(subject("submit"), submit_msg("r1"), reply=gateway.ack_subject)
        await gateway.bus.flush()
        await asyncio.sleep(0.5)

        monkeypatch.setattr(cluster_client, "SUBMIT_TIMEOUT", 1.0)
        await tokenizer.close()
        with pytest.raises(EngineOverloaded, match="tokenizer unreachable"):
            await gateway._submit(submit_msg("r2"), None)
        await scheduler.bus.close()
        await gateway.bus.close()
        return received, refused

    received, refused = asyncio.run(scenario())
    assert received == ["r1", "r1", "r1"]  # sent twice: the scheduler had missed the first
    assert refused == [("r1", 503), ("r2", 503)]  # each taken once, however often sent


def test_a_submit_a_stage_refuses_fails_at_once_with_the_reason(nats_url):
    """The refusal is an error reply naming the request: the gateway fails it now (a 400),
    instead of sending it again until it gives up."""
    from tandem.engine.request import Request, SamplingParams
    from tandem.services.gateway import cluster_client
    from tandem.services.scheduler.core import ClusterScheduler
    from tandem.services.scheduler.service import SchedulerService
    from tandem.services.transport import codec

    async def scenario():
        gateway = cluster_client.ClusterEngineClient(nats_url, "unused:0")
        gateway.bus = await Bus.connect(nats_url, "gateway")
        await gateway.bus.subscribe(gateway.ack_subject, engine_pb2.SubmitAck, gateway._on_ack,
                                    on_error=gateway._on_refused)  # fmt: skip
        scheduler = SchedulerService(await Bus.connect(nats_url, "scheduler"),
                                     ClusterScheduler(), None)  # fmt: skip
        await scheduler.start()
        request = Request("bad", [1, -7], SamplingParams(max_tokens=4))
        spec = codec.request_to_spec(request, subject("gateway", "test", "deltas"))
        start = time.monotonic()
        with pytest.raises(ValueError, match="prompt_token_ids"):
            await gateway._submit(engine_pb2.SubmitRequest(request=spec), None)
        elapsed = time.monotonic() - start
        await scheduler.bus.close()
        await gateway.bus.close()
        return elapsed

    assert asyncio.run(scenario()) < 2.0
