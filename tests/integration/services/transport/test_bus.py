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


class _Streams:
    """The tokenizer's stream table, as the Submitter uses it (the relay's own tests are
    the cluster's)."""

    def __init__(self) -> None:
        self.hub = self
        self.streams: dict[str, object] = {}
        self.closed: list[str] = []

    def open(self, spec, carrier) -> None:
        self.streams[spec.request_id] = spec

    def close(self, request_id: str, error=None) -> None:
        self.streams.pop(request_id, None)
        self.closed.append(request_id)


def _spec(request_id: str, prompt=(1, 2, 3)):
    from tandem.engine.request import Request, SamplingParams
    from tandem.services.transport import codec

    request = Request(request_id, list(prompt), SamplingParams(max_tokens=4))
    return codec.request_to_spec(request, subject("gateway", "test", "deltas"))


def test_a_submit_goes_again_until_the_scheduler_acks_it(nats_url, monkeypatch):
    """The tokenizer's submit reaches a scheduler that was not subscribed yet (NATS
    restarted, it is still reconnecting) by being sent again; the scheduler takes it once,
    however often it comes (with no worker there, taking it means refusing it: one 503,
    through the tokenizer); with no scheduler at all, the request fails with 503 and its
    streams close."""
    from tandem.engine.client import EngineOverloaded
    from tandem.services.scheduler.core import ClusterScheduler
    from tandem.services.scheduler.service import SchedulerService
    from tandem.services.tokenizer import submit

    async def scenario():
        bus = await Bus.connect(nats_url, "tokenizer")
        refused = []

        async def on_tokens(batch, raw):
            refused.extend((t.request_id, t.error_code) for t in batch.requests)

        await bus.subscribe(subject("tokens"), engine_pb2.TokenBatch, on_tokens)
        streams = _Streams()
        submitter = submit.Submitter(bus, None, streams)
        submitting = asyncio.create_task(submitter.submit([_spec("r1")], {}))
        await asyncio.sleep(0.3)  # sent while no scheduler listens
        assert not submitting.done()
        scheduler = SchedulerService(await Bus.connect(nats_url, "scheduler"),
                                     ClusterScheduler(), None)  # fmt: skip
        await scheduler.start()
        await asyncio.wait_for(submitting, 10)
        await submitter.submit([_spec("r1")], {})  # again, as a call sent twice would
        await asyncio.sleep(0.5)
        assert "r1" in streams.streams

        monkeypatch.setattr(submit, "SUBMIT_TIMEOUT", 1.0)
        await scheduler.bus.close()
        with pytest.raises(EngineOverloaded, match="scheduler did not take"):
            await submitter.submit([_spec("r2")], {})
        await bus.close()
        return refused, streams

    refused, streams = asyncio.run(scenario())
    assert refused == [("r1", 503)]  # taken once, however often sent
    assert "r2" in streams.closed and "r2" not in streams.streams


def test_a_submit_the_scheduler_refuses_fails_at_once_with_the_reason(nats_url):
    """The refusal is an error reply naming the request: the tokenizer fails it now (a
    400), instead of sending it again until it gives up."""
    from tandem.engine.client import InvalidRequest
    from tandem.services.scheduler.core import ClusterScheduler
    from tandem.services.scheduler.service import SchedulerService
    from tandem.services.tokenizer.submit import Submitter

    async def scenario():
        bus = await Bus.connect(nats_url, "tokenizer")
        scheduler = SchedulerService(await Bus.connect(nats_url, "scheduler"),
                                     ClusterScheduler(), None)  # fmt: skip
        await scheduler.start()
        streams = _Streams()
        start = time.monotonic()
        with pytest.raises(InvalidRequest, match="prompt_token_ids"):
            await Submitter(bus, None, streams).submit([_spec("bad", [1, -7])], {})
        elapsed = time.monotonic() - start
        await scheduler.bus.close()
        await bus.close()
        return elapsed, streams

    elapsed, streams = asyncio.run(scenario())
    assert elapsed < 2.0 and streams.closed == ["bad"]
