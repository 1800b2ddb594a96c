"""The real NATS and Redis servers start on free ports and answer their clients."""

import asyncio

import pytest

from tandem.services.servers import start_nats, start_redis
from tests.helpers.nats import can_connect


def test_nats_server_with_jetstream():
    import nats

    server = start_nats()
    try:

        async def roundtrip():
            nc = await nats.connect(server.url)
            sub = await nc.subscribe("t.echo")
            await nc.publish("t.echo", b"hi")
            msg = await sub.next_msg(timeout=2)
            js_info = await nc.jetstream().account_info()
            payload = nc.max_payload
            await nc.close()
            return msg.data, js_info, payload

        data, info, payload = asyncio.run(roundtrip())
        assert data == b"hi" and info is not None and payload >= 1 << 20
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

    from tandem.services.servers import redact

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
