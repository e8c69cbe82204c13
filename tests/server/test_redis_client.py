"""The server's Redis client during an outage: every command gives up within its timeout, whatever the others do
(redis-py's default pool connected while holding a lock over the whole pool: the n-th call waited n connect
timeouts, minutes of hung requests instead of a 503)."""
from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from server import app as server_app


async def test_calls_during_an_outage_fail_together_not_one_after_another(settings, monkeypatch):
    async def unreachable(self):  # type: ignore[no-untyped-def]  # a partitioned Redis: each connect takes 1 s
        await asyncio.sleep(1.0)
        raise RedisConnectionError("Timeout connecting to server")

    monkeypatch.setattr(Connection, "_connect", unreachable)
    redis = server_app.command_redis(settings.redis_url)
    t0 = time.monotonic()

    async def ping() -> float:
        with pytest.raises(RedisConnectionError):
            await redis.ping()
        return time.monotonic() - t0

    took = await asyncio.gather(*(ping() for _ in range(6)))
    await redis.aclose()
    assert max(took) < 2.5, took  # one after another: 1, 2, ... 6 s
