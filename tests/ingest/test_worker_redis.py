"""The worker's poll survives Redis dropping: arq let any Redis error end its loop, and the worker then took no job
(nor ran a cron or beat its health key) until its running jobs ended, hours for a long transcription."""
from __future__ import annotations

import asyncio
import uuid

from arq.connections import RedisSettings
from arq.worker import func
from redis.exceptions import ConnectionError as RedisConnectionError

from ingest.jobs import ARQ_CODEC, connect_arq
from ingest.worker import ResilientWorker


async def test_the_worker_polls_again_once_redis_is_back(settings):
    ran = asyncio.Event()

    async def job(ctx: dict) -> str:  # type: ignore[type-arg]
        ran.set()
        return "done"

    queue = f"arq:test:{uuid.uuid4().hex[:8]}"
    pool = await connect_arq(settings.redis_url)
    real, failures = pool.zrangebyscore, [0]

    async def dropping(*args, **kwargs):  # type: ignore[no-untyped-def]  # Redis gone for the first polls
        if failures[0] < 3:
            failures[0] += 1
            raise RedisConnectionError("Connection closed by server.")
        return await real(*args, **kwargs)

    pool.zrangebyscore = dropping  # type: ignore[method-assign]
    worker = ResilientWorker(functions=[func(job, name="job")], redis_pool=pool, queue_name=queue, poll_delay=0.05, **ARQ_CODEC,
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


def test_one_worker_process_serves_both_queues_and_stops_on_sigterm(settings, data_dir):
    """`studyhall worker` runs an arq worker per queue (ingest; quick: grading, matching, checks) in one process;
    SIGTERM stops both (each had taken arq's signal handler from the other: only the last one stopped).
    `--queues quick` serves only that one. Its own Redis database keeps the session's worker out."""
    import signal
    import subprocess
    import sys
    import time

    import redis as redis_sync

    from store.keys import INGEST_QUEUE, QUICK_QUEUE
    from tests.conftest import ROOT, clean_env, stop_process

    url = settings.redis_url.rsplit("/", 1)[0] + "/7"
    r = redis_sync.Redis.from_url(url)
    r.flushdb()
    env = clean_env(data_dir, DATABASE_URL=settings.database_url, REDIS_URL=url)
    alive = lambda q: bool(r.exists(q + ":health-check"))  # noqa: E731

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "server.cli", "worker", *args], cwd=ROOT, env=env,
                                stdout=open(data_dir / "worker-queues.log", "ab"), stderr=subprocess.STDOUT)

    def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline and proc.poll() is None, what
            time.sleep(0.1)

    async def pings() -> list:  # type: ignore[type-arg]
        pool = await connect_arq(url)
        try:
            jobs = [await pool.enqueue_job("ping", _queue_name=q) for q in (INGEST_QUEUE, QUICK_QUEUE)]
            return [await j.result(timeout=30) for j in jobs]  # type: ignore[union-attr]
        finally:
            await pool.aclose()

    both = start()
    try:
        wait_for(lambda: alive(INGEST_QUEUE) and alive(QUICK_QUEUE), both, "the worker did not serve both queues")
        assert asyncio.run(pings()) == ["pong", "pong"]
        t0 = time.monotonic()
        both.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        both.send_signal(signal.SIGTERM)  # a second one (`up` passing Ctrl-C on) while it closes: no kill
        assert both.wait(timeout=20) == 0 and time.monotonic() - t0 < 15
        assert not alive(INGEST_QUEUE) and not alive(QUICK_QUEUE)  # each worker closed (and dropped its key)
    finally:
        stop_process(both, signal.SIGKILL)
    quick = start("--queues", "quick")
    try:
        wait_for(lambda: alive(QUICK_QUEUE), quick, "the quick-only worker did not start")
        time.sleep(1)
        assert not alive(INGEST_QUEUE)
        quick.send_signal(signal.SIGINT)
        assert quick.wait(timeout=20) == 0
    finally:
        stop_process(quick, signal.SIGKILL)
        r.flushdb()


async def test_a_worker_on_a_half_open_connection_takes_jobs_again(settings, monkeypatch):
    """arq's client had no read timeout: when its connection went quiet (half-open: bytes swallowed, nothing
    closed) the worker's poll waited forever and no job ran again. Now the poll times out, reconnects, polls."""
    from urllib.parse import urlsplit

    from ingest import worker as worker_module
    from tests.server.test_hub_subscription import Proxy

    monkeypatch.setattr(worker_module, "REDIS_READ_TIMEOUT_S", 0.5)
    ran = asyncio.Event()

    async def job(ctx: dict) -> str:  # type: ignore[type-arg]
        ran.set()
        return "done"

    url = urlsplit(settings.redis_url)
    proxy = Proxy(url.hostname or "127.0.0.1", url.port or 6379)
    port = await proxy.start()
    queue = f"arq:test:{uuid.uuid4().hex[:8]}"
    through = RedisSettings.from_dsn(settings.redis_url.replace(f":{url.port}", f":{port}", 1))
    worker = ResilientWorker(functions=[func(job, name="job")], redis_settings=through, queue_name=queue, **ARQ_CODEC,
                             poll_delay=0.05, handle_signals=False)
    direct = await connect_arq(settings.redis_url)
    running = asyncio.create_task(worker.main())
    try:
        while worker._pool is None or not await direct.exists(queue + ":health-check"):
            await asyncio.sleep(0.05)
        proxy.silence()  # every connection the worker has goes quiet; new ones work
        await asyncio.sleep(0.3)
        await direct.enqueue_job("job", _queue_name=queue)
        await asyncio.wait_for(ran.wait(), 15)
        assert not running.done()
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await asyncio.gather(worker.close(), return_exceptions=True)
        await direct.aclose()
        await proxy.close()


def test_a_worker_that_lets_its_cancel_go_is_stopped_all_the_same(monkeypatch):
    """In CI both queues' workers went on polling after SIGTERM had cancelled them (the process stopped only when
    `up` killed it, 30 s later): somewhere under arq a cancel was let go. run_workers sends it again until each
    worker's poll ends. (A stand-in worker lets its first cancel go; arq's own cannot be made to on purpose.)"""
    import os
    import signal
    import time

    from ingest import worker as worker_module

    monkeypatch.setattr(worker_module, "RECANCEL_S", 0.1, raising=False)
    loop = asyncio.new_event_loop()

    class Stubborn:
        queue_name = "stubborn"

        def __init__(self) -> None:
            self.loop, self.main_task, self.closed, self.cancels = loop, None, False, 0

        async def main(self) -> None:
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    self.cancels += 1
                    if self.cancels == 1:
                        continue  # let go, as something under the real poll once did
                    raise

        def handle_sig(self, sig: signal.Signals) -> None:
            self.main_task.cancel()

        async def close(self) -> None:
            self.closed = True

    def too_long(_signum: int, _frame: object) -> None:
        raise TimeoutError("run_workers did not return")

    w = Stubborn()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM)}
    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(10)
    try:
        loop.call_later(0.2, os.kill, os.getpid(), signal.SIGTERM)
        t0 = time.monotonic()
        worker_module.run_workers([w])  # type: ignore[list-item]
        assert w.closed and w.cancels == 2 and time.monotonic() - t0 < 5
    finally:
        signal.alarm(0)
        for s, h in saved.items():
            signal.signal(s, h)
        if not loop.is_closed():
            loop.close()


class _Planted:
    """What a pickled job could carry: unpickling it runs code (here, touching a file)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


async def test_jobs_travel_as_json_and_a_pickled_job_is_refused_unopened(settings, tmp_path):
    """arq pickles jobs by default, and unpickling runs code: anyone able to write to Redis could make a worker run
    anything. Jobs are JSON; a pickled one (planted, or queued by an older version) is failed without being read."""
    import pickle
    import time

    from arq.jobs import serialize_job

    from ingest.jobs import loads_job

    calls: list[int] = []

    async def job(ctx: dict, n: int) -> str:  # type: ignore[type-arg]
        calls.append(n)
        return f"got {n}"

    queue = f"arq:test:{uuid.uuid4().hex[:8]}"
    pool = await connect_arq(settings.redis_url)
    worker = ResilientWorker(functions=[func(job, name="job")], redis_pool=pool, queue_name=queue, poll_delay=0.05,
                             handle_signals=False, **ARQ_CODEC)
    marker = tmp_path / "unpickled"
    planted = f"planted-{uuid.uuid4().hex[:8]}"
    await pool.set("arq:job:" + planted, serialize_job("job", (_Planted(str(marker)),), {}, 1,
                                                       int(time.time() * 1000), serializer=pickle.dumps))
    await pool.zadd(queue, {planted: int(time.time() * 1000)})
    fine = await pool.enqueue_job("job", 7, _queue_name=queue)
    assert fine is not None
    raw = await pool.get("arq:job:" + fine.job_id)
    assert raw.startswith(b"{") and loads_job(raw)["a"] == [7]  # what Redis holds is JSON
    running = asyncio.create_task(worker.main())
    try:
        assert await fine.result(timeout=15) == "got 7"
        for _ in range(300):
            failed = await pool.get("arq:result:" + planted)
            if failed is not None:
                break
            await asyncio.sleep(0.05)
        assert failed is not None, "the pickled job was never taken"
        result = loads_job(failed)
        assert result["s"] is False and "deserialize" in result["r"]
        assert calls == [7] and not marker.exists()  # refused, never unpickled
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await asyncio.gather(worker.close(), return_exceptions=True)
        await pool.delete(queue, "arq:result:" + planted)
        await pool.aclose()
