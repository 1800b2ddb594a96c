"""Protobuf over a real NATS server; KV moves in acked chunks under max_payload."""

import asyncio

import pytest
import torch

from tandem.services.common.bus import Bus, KVAssembler, send_kv, subject
from tandem.services.common.servers import start_nats
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
        out = assembler.take("r1")
        payload = sender.max_payload
        await sender.close()
        await receiver.close()
        return n, out, peak, payload

    n, out, peak, payload = asyncio.run(scenario())
    block_bytes = kv[0].numel() * 4
    assert n == -(-40 // ((payload - 4096) // block_bytes)) and n > 1
    assert torch.equal(out, kv) and 1 <= peak <= 2  # never more than the window unacked
