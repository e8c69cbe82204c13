"""The worker's poll survives Redis dropping: arq let any Redis error end its loop, and the worker then took no job
(nor ran a cron or beat its health key) until its running jobs ended, hours for a long transcription."""
from __future__ import annotations

import asyncio
import uuid

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import func
from redis.exceptions import ConnectionError as RedisConnectionError

from ingest.worker import ResilientWorker


async def test_the_worker_polls_again_once_redis_is_back(settings):
    ran = asyncio.Event()

    async def job(ctx: dict) -> str:  # type: ignore[type-arg]
        ran.set()
        return "done"

    queue = f"arq:test:{uuid.uuid4().hex[:8]}"
    pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    real, failures = pool.zrangebyscore, [0]

    async def dropping(*args, **kwargs):  # type: ignore[no-untyped-def]  # Redis gone for the first polls
        if failures[0] < 3:
            failures[0] += 1
            raise RedisConnectionError("Connection closed by server.")
        return await real(*args, **kwargs)

    pool.zrangebyscore = dropping  # type: ignore[method-assign]
    worker = ResilientWorker(functions=[func(job, name="job")], redis_pool=pool, queue_name=queue, poll_delay=0.05,
                             handle_signals=False)
    running = asyncio.create_task(worker.main())
    try:
        await pool.enqueue_job("job", _queue_name=queue)
        await asyncio.wait_for(ran.wait(), 15)
        assert failures[0] == 3 and not running.done()
        while worker.jobs_complete < 1:  # its result written before the worker stops
            await asyncio.sleep(0.05)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await asyncio.gather(worker.close(), return_exceptions=True)
