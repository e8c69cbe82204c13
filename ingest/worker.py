"""arq worker settings: jobs are plain async functions; shared clients live in ctx."""
from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from arq import cron, func
from arq.connections import RedisSettings
from arq.connections import create_pool as create_arq_pool
from arq.worker import Worker
from redis.exceptions import RedisError

from agents.config import embedder_for
from ingest.grading import grade_batch, grade_submission, recover_grading
from ingest.jobs import ARQ_CODEC, JOB_TIMEOUT_S, ingest_job, recover_lost_jobs, sweep_uploads
from ingest.replies import CHECK_FUNCTION, CHECK_TIMEOUT_S, check_reply_job, recover_reply_checks
from ingest.submit import reembed_superseded
from store.aio import CancelSafeConnection, cancel_and_wait
from store.db import create_pool
from store.keys import INGEST_QUEUE, QUICK_QUEUE
from store.settings import Settings

logger = logging.getLogger(__name__)

POLL_BACKOFF_MAX_S = 5.0
REDIS_READ_TIMEOUT_S = 10.0  # no worker command (polls, heartbeats, enqueues, scripts) blocks on the server
WORKER_QUEUES = ("ingest", "quick")
RECANCEL_S = 2.0  # a worker still polling this long after its stop is cancelled again


class ResilientWorker(Worker):
    """arq's worker, whose poll survives Redis dropping or restarting. arq's loop lets any Redis error end it; the
    worker then waited, taking no job, no cron and beating no health key, until its running jobs ended (hours,
    for a long transcription) before the process exited. Here a failed poll is logged and tried again, backing
    off up to POLL_BACKOFF_MAX_S, and the worker goes on once Redis is back."""

    poll_backoff_s = 0.0

    async def main(self) -> None:
        if self._pool is None:
            # arq's settings have no read timeout: over a half-open connection (a Redis failover, a NAT dropping the
            # flow) the poll, a heartbeat or an enqueue waited forever and the worker took no job again. Every
            # command of its client now gives up after REDIS_READ_TIMEOUT_S (a failed poll is tried again).
            self._pool = await create_arq_pool(self.redis_settings, job_deserializer=self.job_deserializer,
                                               job_serializer=self.job_serializer, default_queue_name=self.queue_name,
                                               expires_extra_ms=self.expires_extra_ms)
            conns = self._pool.connection_pool
            conns.connection_kwargs["socket_timeout"] = REDIS_READ_TIMEOUT_S
            conns.connection_class = CancelSafeConnection  # (a job's cancel at a stop is not lost in a send)
            await conns.disconnect()
            conns.reset()  # the connection arq checked Redis with, made without it (nothing else has one yet)
        await super().main()

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.poll_backoff_s = min(POLL_BACKOFF_MAX_S, max(0.25, self.poll_backoff_s * 2))
            logger.warning("worker: Redis unavailable (%s: %s); polling again in %.2f s", type(exc).__name__, exc,
                           self.poll_backoff_s)
            await asyncio.sleep(self.poll_backoff_s)
        else:
            if self.poll_backoff_s:
                logger.info("worker: Redis is back; polling again")
            self.poll_backoff_s = 0.0


async def match_pods_weekly(ctx: dict[str, Any]) -> int:
    """The weekly study-buddy round: from its moment (STUDYHALL_MATCH_WEEKDAY/_HOUR) to the end of the ISO week,
    every run matches the pods still without this week's round. It runs every quarter hour and at worker start,
    so a round cut short by a deploy, or missed while no worker ran, is finished by the next run. Every run
    (also before the week's moment, and with STUDYHALL_MATCH_WEEKLY off, when it does nothing else) posts the
    rounds whose post failed and re-matches the rounds that still pair someone who left."""
    from agents.matcher import announce_unposted, match_all_pods, rematch_departed, week_due

    settings = ctx["settings"]
    now = datetime.now(timezone.utc)
    await rematch_departed(ctx["pool"], ctx["redis"], settings)  # rounds still pairing someone who left
    if not settings.match_weekly or now < week_due(now, settings.match_weekday, settings.match_hour):
        await announce_unposted(ctx["pool"], ctx["redis"], settings.ws_max_text)
        return 0
    return await match_all_pods(ctx["pool"], ctx["redis"], settings, now)


async def check_leaderboards(ctx: dict[str, Any]) -> bool:
    """Hourly: rebuild the leaderboards from the XP ledger when they are missing or disagree with it."""
    from store.leaderboard_rebuild import check_and_repair

    return await check_and_repair(ctx["pool"], ctx["redis"]) is not None


async def end_forgotten_sessions(ctx: dict[str, Any]) -> int:
    """Every minute: end the live sessions left running (STUDYHALL_LIVE_IDLE_END_MIN, STUDYHALL_LIVE_MAX_HOURS)."""
    from store.live import end_forgotten

    settings = ctx["settings"]
    ended = await end_forgotten(ctx["pool"], ctx["redis"], settings.live_idle_end_min, settings.live_max_hours)
    if ended:
        logger.info("ended %d live sessions left running", len(ended), extra={"fields": {"sessions": ended}})
    return len(ended)


async def ping(ctx: dict[str, Any]) -> str:
    """A no-op job, used to check that a worker is consuming."""
    return "pong"


# One Postgres pool per worker process, shared by its queues' workers: [pool, holders].
_pools: dict[str, list[Any]] = {}


async def _shared_pool(settings: Settings) -> Any:
    got = _pools.get(settings.database_url)  # type: ignore[arg-type]
    if got is None:
        pool = await create_pool(settings.database_url, min_size=1, max_size=min(8, settings.db_pool_max))
        got = _pools.setdefault(settings.database_url, [pool, 0])  # type: ignore[arg-type]
        if got[0] is not pool:  # the other queue's worker made one meanwhile
            await pool.close()
    got[1] += 1
    return got[0]


async def _release_pool(pool: Any) -> None:
    for url, got in list(_pools.items()):
        if got[0] is pool:
            got[1] -= 1
            if got[1] > 0:
                return
            del _pools[url]
    await pool.close()


async def heal_superseded(ctx: dict[str, Any]) -> int:
    """Queue re-embeds for the videos of an earlier default embedder (an upgrade; ingest.submit.reembed_superseded):
    when an ingest worker starts, then every 5 minutes (a re-embed an old worker of a rolling upgrade failed goes
    again once the old workers are gone). The number queued; a failure is logged (`studyhall reembed` does the same
    by hand)."""
    try:
        return len(await reembed_superseded(ctx["pool"], ctx["redis"], ctx["settings"]))
    except Exception:  # noqa: BLE001
        logger.warning("could not queue re-embeds for an earlier default embedder's videos", exc_info=True)
        return 0


BOARDS_REPAIR_EVERY_S = 5.0


async def _repair_missed_boards(ctx: dict[str, Any]) -> None:
    """Every few seconds (in this process: arq's crons run in any one worker): the boards that missed this process's
    awards while Redis failed (`store.xp.MISSED_TENANTS`), checked and repaired once it answers."""
    from store import xp

    while True:
        await asyncio.sleep(BOARDS_REPAIR_EVERY_S)
        xp.repair_missed_soon(ctx["pool"], ctx["redis"])


def worker_settings(settings: Settings, queue: str = "ingest", *, heal_embeddings: bool = True) -> dict[str, Any]:
    """Keyword arguments for arq.Worker bound to these settings, for one of the two queues (store.keys):
    `ingest` (transcription, embedding: hours at worst; STUDYHALL_WORKER_CONCURRENCY at once) or `quick` (grading,
    the weekly matcher and the hourly checks; STUDYHALL_WORKER_QUICK_CONCURRENCY at once), so a grade never waits
    for two long transcriptions to end. `studyhall worker` runs both in one process (see `run_workers`).
    `heal_embeddings`: an ingest worker queues re-embeds for an earlier default embedder's videos as it starts and
    every 5 minutes (`heal_superseded`; off for a benchmark, whose database may hold old runs' courses)."""
    if queue not in WORKER_QUEUES:
        raise ValueError(f"unknown queue {queue!r}; known: {', '.join(WORKER_QUEUES)}")

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["settings"] = settings
        ctx["pool"] = await _shared_pool(settings)
        ctx["embedder"] = functools.partial(embedder_for, settings)
        if queue == "ingest":
            await recover_lost_jobs(ctx)
            if heal_embeddings:
                await heal_superseded(ctx)
        from store import leaderboards, xp

        leaderboards.EVENT_WINDOW_S = settings.leaderboard_event_s
        xp.ASYNC_COMMIT = settings.xp_async_commit
        ctx["boards_repair"] = asyncio.create_task(_repair_missed_boards(ctx))

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        from store import leaderboards

        if ctx.get("boards_repair") is not None:
            await cancel_and_wait(ctx["boards_repair"])  # (one cancel can be lost during its Redis calls)
            from store import xp

            await xp.stop_repair()  # one the loop started: before the pool closes
        await leaderboards.drain()  # leaderboard.changed from awards of finished jobs
        if ctx.get("pool") is not None:
            await _release_pool(ctx["pool"])

    if queue == "ingest":
        # grading functions too: grades queued here by an earlier version still run
        functions = [ping, ingest_job, grade_submission, grade_batch]
        crons = [cron(recover_lost_jobs, minute=set(range(0, 60, 5)), run_at_startup=False),
                 cron(sweep_uploads, minute=41, run_at_startup=True, unique=True)]
        if heal_embeddings:  # (and at start, above)
            crons.append(cron(heal_superseded, minute=set(range(2, 60, 5)), run_at_startup=False, unique=True))
    else:
        functions = [ping, grade_submission, grade_batch, match_pods_weekly, check_leaderboards, end_forgotten_sessions,
                     func(check_reply_job, name=CHECK_FUNCTION, timeout=CHECK_TIMEOUT_S)]
        crons = [cron(recover_grading, run_at_startup=True),  # every minute: grading jobs whose entry was lost
                 cron(recover_reply_checks, run_at_startup=True, unique=True),  # every minute: replies to check
                 cron(end_forgotten_sessions, run_at_startup=True, unique=True),  # every minute
                 # progress, XP, leaderboards, matcher
                 # (with weekly rounds off it still posts unposted rounds and re-pairs those who left)
                 cron(match_pods_weekly, minute={0, 15, 30, 45}, run_at_startup=True, unique=True),
                 # hourly, and as a worker starts: one killed between an award's commit and its board update
                 # left the boards short, and a later award's high mark hid it from the servers' startup check
                 cron(check_leaderboards, minute=17, run_at_startup=True, unique=True)]
    return dict(
        functions=functions,
        cron_jobs=crons,
        queue_name=INGEST_QUEUE if queue == "ingest" else QUICK_QUEUE,
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        **ARQ_CODEC,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        max_jobs=settings.worker_max_jobs if queue == "ingest" else settings.worker_quick_jobs,
        job_timeout=JOB_TIMEOUT_S,
        keep_result=3600,
        max_tries=1000,  # attempts are counted and capped on the job row, not by arq
        poll_delay=0.2,
        health_check_interval=5,  # `studyhall ingest` checks the ingest queue's key to know a worker is alive
        handle_signals=True,  # arq's close() then skips a second stop; run_workers replaces the handlers
    )


def run_workers(workers: list[Worker], on_stop: Callable[[signal.Signals], None] | None = None) -> None:
    """Run arq workers (one per queue) on their shared event loop until SIGTERM or SIGINT stops them all (arq's own
    handler stops one worker: the last one to register it), or until one of them ends on its own (Redis gone at
    start, say): the others are then stopped too and its error raised, so the process exits and is restarted.
    `on_stop` runs once on a stop."""
    loop = workers[0].loop
    stopped: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        if stopped:
            return
        stopped.append(sig)
        if on_stop is not None:
            on_stop(sig)
        for w in workers:  # cancels its running jobs (they give their attempt back) and its poll
            w.handle_sig(sig)
        loop.call_later(RECANCEL_S, cancel_again)

    def cancel_again() -> None:
        # A worker's poll went on after its cancel once (both queues' workers, in CI: the process ignored SIGTERM
        # until `up` killed it 30 s later); wherever a library let that cancel go, it is sent again until the
        # poll ends.
        left = [w for w in workers if w.main_task is not None and not w.main_task.done()]
        for w in left:
            logger.warning("worker for %s still polling after its stop; cancelling it again", w.queue_name)
            w.main_task.cancel()
        if left:
            loop.call_later(RECANCEL_S, cancel_again)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, functools.partial(stop, sig))
    for w in workers:
        w.main_task = loop.create_task(w.main())
    tasks = [w.main_task for w in workers]
    try:
        loop.run_until_complete(asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED))
        stop(signal.SIGTERM)
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    finally:
        for w in workers:  # each on its own: one failing to close (Redis gone) must not leave the other open
            try:
                loop.run_until_complete(w.close())
            except Exception:  # noqa: BLE001
                logger.warning("worker for %s did not close cleanly", w.queue_name, exc_info=True)
        # A second SIGTERM or Ctrl-C (`up` passing one on) while the workers close, or while the process exits, is
        # the stop already under way: the loop's handlers stay through the closes, then the signals are ignored.
        # (Removing the handlers, or the loop closing at exit, puts back the default action: a late signal killed
        # the process mid-close.)
        loop.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
