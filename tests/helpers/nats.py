"""NATS helpers for tests."""

from __future__ import annotations

import nats


async def can_connect(url: str) -> bool:
    """Whether a client gets in with this URL (its credentials) at the first try."""
    try:
        nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0)
    except Exception:
        return False
    await nc.close()
    return True
