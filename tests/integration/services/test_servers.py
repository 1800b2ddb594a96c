"""The real NATS and Redis servers start on free ports and answer their clients."""

import asyncio

import pytest

from tandem.services.servers import start_nats, start_redis
from tests.helpers.nats import can_connect


def test_nats_server_runs_core_nats_without_jetstream():
    """Tandem needs only publish/subscribe and request/reply, so the server keeps nothing:
    no JetStream, no store on disk."""
    import nats
    from nats.js.errors import ServiceUnavailableError

    server = start_nats()
    try:
        assert "-js" not in server.proc.args and "-sd" not in server.proc.args

        async def roundtrip():
            nc = await nats.connect(server.url)
            sub = await nc.subscribe("t.echo")
            await nc.publish("t.echo", b"hi")
            msg = await sub.next_msg(timeout=2)

            async def answer(m):
                await m.respond(m.data.upper())

            await nc.subscribe("t.ask", cb=answer)
            reply = await nc.request("t.ask", b"ping", timeout=2)
            with pytest.raises(ServiceUnavailableError):  # no JetStream answers
                await nc.jetstream().account_info()
            payload = nc.max_payload
            await nc.close()
            return msg.data, reply.data, payload

        data, reply, payload = asyncio.run(roundtrip())
        assert data == b"hi" and reply == b"PING" and payload >= 1 << 20
    finally:
        server.stop()
    assert server.proc.poll() is not None and not server.scratch.exists()


def test_redis_server():
    import redis

    server = start_redis()
    try:
        r = redis.Redis.from_url(server.url)
        r.set("k", "v")
        assert r.get("k") == b"v"
        r.close()
    finally:
        server.stop()
    assert server.proc.poll() is not None


def test_a_taken_port_is_a_clear_error():
    server = start_nats()
    try:
        port = int(server.url.rsplit(":", 1)[1])
        with pytest.raises(RuntimeError, match="nats-server"):
            start_nats(port, timeout=5)
    finally:
        server.stop()


def test_servers_started_with_credentials_refuse_clients_without_them():
    import redis

    from tandem.services.transport.bus import redact

    n = start_nats(user="tandem", password="pw-1")
    r = start_redis(password="pw-2")
    try:
        bare_nats = n.url.replace("tandem:pw-1@", "")
        bare_redis = r.url.replace(":pw-2@", "")
        assert "pw-1" not in " ".join(n.proc.args) and "pw-2" not in " ".join(r.proc.args)
        assert redact(n.url) == bare_nats.replace("://", "://tandem:***@")

        assert asyncio.run(can_connect(n.url)) and not asyncio.run(can_connect(bare_nats))
        assert redis.from_url(r.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.from_url(bare_redis).ping()
    finally:
        n.stop()
        r.stop()
