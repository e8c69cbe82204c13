"""Job progress: one place writes the job row and publishes `job.progress` (after the write commits)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import asyncpg
from redis.asyncio import Redis

from ingest.errors import PermanentIngestError
from store import jobs as jobs_repo
from store import videos as videos_repo
from store.events import JobProgress, publish, user_topic

logger = logging.getLogger(__name__)

# Where each stage sits in the overall 0..1 progress of an ingest job.
STAGE_SPAN = {
    "queued": (0.0, 0.0),
    "fetching": (0.0, 0.10),
    "transcribing": (0.0, 0.60),
    "chunking": (0.60, 0.65),
    "embedding": (0.65, 0.92),
    "chaptering": (0.92, 0.98),
    "done": (1.0, 1.0),
}


class JobReporter:
    """Moves a job through its states. Updates inside a stage are throttled; stage changes never are."""

    def __init__(self, pool: asyncpg.Pool, redis: Redis | None, job: asyncpg.Record, min_interval: float = 0.5):
        self.pool, self.redis, self.job = pool, redis, job
        self.state = job["state"]
        self.min_interval = min_interval
        self._last = 0.0
        self._lock = asyncio.Lock()
        # set once a write finds the job row gone (its video or course deleted): long work (a transcription
        # thread) watches it and stops, and the next stage change raises
        self.deleted = threading.Event()

    async def stage(self, state: str, fraction: float = 0.0) -> None:
        """Enter a stage; PermanentIngestError when the job was deleted meanwhile (nothing left to do it for)."""
        await self._write(state, fraction, force=state != self.state)
        if self.deleted.is_set():
            raise PermanentIngestError("the video was deleted")

    async def advance(self, fraction: float) -> None:
        await self._write(self.state, fraction, force=False)

    async def fail(self, reason: str) -> bool:
        """Record the failure on the job and on its video, in one transaction (a kill between two commits left the
        video `processing` for good: nothing revisits a failed job); False when the job had already finished
        (another run's outcome stands)."""
        return await self._write("failed", 0.0, force=True, error=reason,
                                 also=lambda conn: videos_repo.mark_failed(conn, self.job["video_id"], reason,
                                                                            self.job["id"]))

    async def _write(self, state: str, fraction: float, *, force: bool, error: str | None = None,
                     also: Callable[[asyncpg.Connection], Awaitable[None]] | None = None) -> bool:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return False
        async with self._lock:
            self._last = now
            lo, hi = STAGE_SPAN.get(state, (0.0, 0.0))
            progress = lo + (hi - lo) * min(1.0, max(0.0, fraction))
            if state == "failed":
                progress = float(self.job["progress"])
            async with self.pool.acquire() as conn, conn.transaction():
                if also is not None and self.job["video_id"] is not None:
                    # the video's row before the job's, as deleting a video (its jobs cascade) and the pipeline's
                    # final commit take them: the other order could deadlock with them
                    await conn.execute("SELECT 1 FROM videos WHERE id = $1 FOR NO KEY UPDATE", self.job["video_id"])
                row = await jobs_repo.set_state(conn, self.job["id"], state, progress, error)
                if row is not None and also is not None:
                    await also(conn)
                if row is None and not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM jobs WHERE id = $1)",
                                                           self.job["id"]):
                    self.deleted.set()
            if row is None:
                return False
            self.job, self.state = row, state
            await self.announce(row)
            return True

    async def announce(self, row: asyncpg.Record) -> None:
        if self.redis is not None:
            await announce_job(self.redis, row)


async def announce_job(redis: Redis, row: asyncpg.Record) -> None:
    """`job.progress` to whoever started the job (every socket of theirs); a Redis failure is logged."""
    if row["created_by"] is not None:
        await publish(redis, user_topic(row["created_by"]), job_event(row))


def job_event(row: asyncpg.Record) -> JobProgress:
    return JobProgress(job_id=row["id"], video_id=row["video_id"], course_id=row["course_id"], state=row["state"],
                       progress=round(float(row["progress"]), 4), error=row["error"])
