"""arq worker settings: jobs are plain async functions; shared clients live in ctx."""
from __future__ import annotations

import asyncio
import functools
import logging
from datetime import datetime, timezone
from typing import Any

from arq import cron
from arq.connections import RedisSettings
from arq.worker import Worker
from redis.exceptions import RedisError

from agents.config import embedder_for
from ingest.grading import grade_batch, grade_submission, recover_grading
from ingest.jobs import ingest_job, recover_lost_jobs, sweep_uploads
from store.db import create_pool
from store.settings import Settings

logger = logging.getLogger(__name__)

POLL_BACKOFF_MAX_S = 5.0


class ResilientWorker(Worker):
    """arq's worker, whose poll survives Redis dropping or restarting. arq's loop lets any Redis error end it; the
    worker then waited, taking no job, no cron and beating no health key, until its running jobs ended (hours,
    for a long transcription) before the process exited. Here a failed poll is logged and tried again, backing
    off up to POLL_BACKOFF_MAX_S, and the worker goes on once Redis is back."""

    poll_backoff_s = 0.0

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
        await announce_unposted(ctx["pool"], ctx["redis"])
        return 0
    return await match_all_pods(ctx["pool"], ctx["redis"], settings, now)


async def check_leaderboards(ctx: dict[str, Any]) -> bool:
    """Hourly: rebuild the leaderboards from the XP ledger when they are missing or disagree with it."""
    from store.leaderboard_rebuild import check_and_repair

    return await check_and_repair(ctx["pool"], ctx["redis"]) is not None


async def ping(ctx: dict[str, Any]) -> str:
    """A no-op job, used to check that a worker is consuming."""
    return "pong"


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for arq.Worker bound to these settings."""

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["settings"] = settings
        ctx["pool"] = await create_pool(settings.database_url, min_size=1, max_size=min(8, settings.db_pool_max))
        ctx["embedder"] = functools.partial(embedder_for, settings)
        await recover_lost_jobs(ctx)
        from store import leaderboards, xp

        leaderboards.EVENT_WINDOW_S = settings.leaderboard_event_s
        xp.ASYNC_COMMIT = settings.xp_async_commit

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        from store import leaderboards

        await leaderboards.drain()  # leaderboard.changed from awards of finished jobs
        pool = ctx.get("pool")
        if pool is not None:
            await pool.close()

    return dict(
        functions=[ping, ingest_job, grade_submission, grade_batch, match_pods_weekly, check_leaderboards],
        cron_jobs=[cron(recover_lost_jobs, minute=set(range(0, 60, 5)), run_at_startup=False),
                   cron(recover_grading, run_at_startup=True),  # every minute: grading jobs whose entry was lost
                   # progress, XP, leaderboards, matcher
                   # (with weekly rounds off it still posts unposted rounds and re-pairs those who left)
                   cron(match_pods_weekly, minute={0, 15, 30, 45}, run_at_startup=True, unique=True),
                   cron(check_leaderboards, minute=17, run_at_startup=False, unique=True),
                   cron(sweep_uploads, minute=41, run_at_startup=True, unique=True)],
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        max_jobs=settings.worker_max_jobs,
        job_timeout=4 * 3600,
        keep_result=3600,
        max_tries=1000,  # attempts are counted and capped on the job row, not by arq
        poll_delay=0.2,
        health_check_interval=5,  # `studyhall ingest` checks this key to know a worker is alive
        handle_signals=True,
    )
