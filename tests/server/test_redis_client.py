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


async def test_a_cancel_during_a_command_is_not_lost(settings):
    """(Review) redis-py sends under a socket timeout through `asyncio.wait_for`, which on Python 3.11 drops a cancel
    arriving as the send completes: a task doing commands back to back, cancelled once, went on 2 times in 3 (a
    worker's stop waited for jobs, a hub's loops outlived its stop). The server's and the worker's clients send
    with `asyncio.timeout` (store.aio.CancelSafeConnection)."""
    import random

    from store.aio import CancelSafeConnection

    redis = server_app.command_redis(settings.redis_url)
    assert redis.connection_pool.connection_class is CancelSafeConnection
    rnd = random.Random(5)

    async def busy() -> None:
        while True:
            await redis.get("sh:test:cancel")

    lost = 0
    try:
        for _ in range(60):
            task = asyncio.create_task(busy())
            await asyncio.sleep(rnd.uniform(0.001, 0.01))
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=1)
            if not done:
                lost += 1
                while not task.done():
                    task.cancel()
                    await asyncio.sleep(0.01)
    finally:
        await redis.aclose()
    assert lost == 0, f"{lost} of 60 cancels lost"
