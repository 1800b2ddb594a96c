"""The per-role NATS accounts on a real nats-server: a role's publish outside its subjects
never reaches a subscriber (the server tells the sender: a permissions violation), its own
subjects go through, and a responder answers a request on the requester's inbox."""

from __future__ import annotations

import asyncio
import secrets

import nats
import pytest

from tandem.services.servers import start_nats
from tandem.services.transport.subjects import Role
from tests.helpers.nats import can_connect


@pytest.fixture(scope="module")
def server():
    accounts = {role: f"{role}-{secrets.token_hex(8)}" for role in Role}
    server = start_nats(accounts=accounts)
    try:
        yield server
    finally:
        server.stop()


class Client:
    """A nats-py connection as one role, keeping the errors the server sent it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    @classmethod
    async def connect(cls, url: str) -> Client:
        client = cls()

        async def on_error(e: Exception) -> None:
            client.errors.append(str(e))

        client.nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False)
        return client

    async def flush(self) -> None:
        # nats-py sends its pending buffer lazily; push it, then wait for the server's PONG
        await self.nc._flush_pending(force_flush=True)
        await self.nc.flush()

    async def wait_for_error(self, text: str, timeout: float = 5.0) -> str:
        async def poll() -> str:
            while not any(text in e for e in self.errors):
                await asyncio.sleep(0.02)
            return next(e for e in self.errors if text in e)

        return await asyncio.wait_for(poll(), timeout)


async def _listen(client: Client, subj: str) -> asyncio.Queue:
    got: asyncio.Queue = asyncio.Queue()

    async def on_msg(msg) -> None:
        await got.put(msg.data)

    await client.nc.subscribe(subj, cb=on_msg)
    await client.flush()
    return got


async def _refused_then_allowed(server, intruder: Role, owner: Role, reader: Role, subj: str):
    """`intruder` then `owner` publish on `subj`; what `reader` receives first, and the error
    the intruder got. The intruder's publish is processed before the owner's (flushed first):
    had it been delivered, it would be the first message."""
    listener = await Client.connect(server.url_for(reader))
    sender = await Client.connect(server.url_for(intruder))
    allowed = await Client.connect(server.url_for(owner))
    try:
        got = await _listen(listener, subj)
        await sender.nc.publish(subj, b"forged")
        await sender.flush()
        error = await sender.wait_for_error("permissions violation")
        await allowed.nc.publish(subj, b"genuine")
        await allowed.flush()
        first = await asyncio.wait_for(got.get(), 5)
        assert sender.nc.is_connected  # refused, not cut off
        return first, error, listener.errors
    finally:
        for client in (listener, sender, allowed):
            await client.nc.close()


def test_a_gateway_cannot_send_a_prefill_worker_a_plan(server):
    subj = "tandem.prefill.x.plan"
    first, error, listener_errors = asyncio.run(
        _refused_then_allowed(server, Role.GATEWAY, Role.SCHEDULER, Role.PREFILL, subj)
    )
    assert first == b"genuine"  # the scheduler's plan, never the gateway's
    assert error == f'nats: permissions violation for publish to "{subj}"'
    assert listener_errors == []


def test_a_decode_worker_cannot_submit_requests(server):
    first, error, _ = asyncio.run(
        _refused_then_allowed(server, Role.DECODE, Role.TOKENIZER, Role.SCHEDULER, "tandem.submit")
    )
    assert first == b"genuine"
    assert "permissions violation for publish" in error


def test_a_plan_for_a_restarted_worker_reaches_it(server):
    """A restarted worker's id holds a dot (`prefill-0.1`): its subjects are granted too."""

    async def scenario() -> bytes:
        prefill = await Client.connect(server.url_for(Role.PREFILL))
        scheduler = await Client.connect(server.url_for(Role.SCHEDULER))
        try:
            got = await _listen(prefill, "tandem.prefill.prefill-0.1.plan")
            await scheduler.nc.publish("tandem.prefill.prefill-0.1.plan", b"plan")
            data = await asyncio.wait_for(got.get(), 5)
            assert prefill.errors == scheduler.errors == []
            return data
        finally:
            await prefill.nc.close()
            await scheduler.nc.close()

    assert asyncio.run(scenario()) == b"plan"


def test_a_role_cannot_listen_to_another_role_s_subjects(server):
    async def scenario() -> str:
        gateway = await Client.connect(server.url_for(Role.GATEWAY))
        try:
            await gateway.nc.subscribe("tandem.prefill.*.plan")
            await gateway.flush()
            return await gateway.wait_for_error("permissions violation")
        finally:
            await gateway.nc.close()

    error = asyncio.run(scenario())
    assert error == 'nats: permissions violation for subscription to "tandem.prefill.*.plan"'


def test_a_decode_worker_answers_a_prefill_worker_s_probe(server):
    """The prefill worker hears the reply on its inbox; the decode worker may answer it
    (allow_responses) though it may publish on no inbox of its own accord."""

    async def scenario() -> tuple[bytes, list[str]]:
        decode = await Client.connect(server.url_for(Role.DECODE))
        prefill = await Client.connect(server.url_for(Role.PREFILL))
        try:

            async def on_probe(msg) -> None:
                await msg.respond(b"cached: 3")

            for worker_id in ("d", "decode-0.1"):
                await decode.nc.subscribe(f"tandem.decode.{worker_id}.probe", cb=on_probe)
            await decode.flush()
            replies = [
                (await prefill.nc.request(f"tandem.decode.{w}.probe", b"probe", timeout=5)).data
                for w in ("d", "decode-0.1")
            ]
            assert replies[0] == replies[1]
            await decode.nc.publish("_INBOX.not-a-reply", b"x")  # no request to answer
            await decode.flush()
            await decode.wait_for_error("permissions violation")
            return replies[0], prefill.errors
        finally:
            await decode.nc.close()
            await prefill.nc.close()

    reply, prefill_errors = asyncio.run(scenario())
    assert reply == b"cached: 3" and prefill_errors == []


def test_clients_without_an_account_are_refused(server):
    assert not asyncio.run(can_connect(server.url))  # no credentials
    wrong = server.url_for(Role.GATEWAY).replace("gateway:", "scheduler:")
    assert not asyncio.run(can_connect(wrong))  # another role's user with the gateway's password
    assert asyncio.run(can_connect(server.url_for(Role.GATEWAY)))
