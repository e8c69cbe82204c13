"""arq jobs for ingest. Postgres holds the job's truth; arq only carries "run job N now".

A running job refreshes arq's in-progress key as a heartbeat, so when its worker dies the key lapses
within the heartbeat TTL and another worker picks the job up again.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
from arq import Retry
from arq import create_pool as create_arq_pool
from arq.connections import ArqRedis, RedisSettings

from ingest.errors import IngestError
from ingest.progress import JobReporter, announce_job
from store import jobs as jobs_repo
from store import videos as videos_repo
from store.aio import cancel_and_wait
from store.keys import ARQ_IN_PROGRESS, ARQ_RESULT, INGEST_QUEUE

logger = logging.getLogger(__name__)

INGEST_FUNCTION = "ingest_job"


# Jobs (and arq's results) travel as JSON, not arq's default pickle: unpickling runs code, so whoever could write to
# Redis could make a worker run anything. A job carries ids only ("run job N now"); its truth is in Postgres.
def dumps_job(data: Any) -> bytes:
    """arq's job_serializer. A value JSON cannot carry fails the enqueue (arq: SerializationError), except an
    exception in a failed job's result, kept as its text."""
    return msgspec.json.encode(data, enc_hook=_exception_text)


def _exception_text(value: Any) -> str:
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    raise TypeError(f"{type(value).__name__} cannot travel in an arq job (JSON only)")


def loads_job(data: bytes) -> Any:
    """arq's job_deserializer. A pickled job (queued by a studyhall from before jobs were JSON) is refused without
    being unpickled; arq fails it, and recovery (recover_lost_jobs, recover_grading) queues its work again."""
    if data[:1] == b"\x80":
        raise ValueError("a pickled arq job is not run (jobs are JSON); recovery queues its work again")
    return msgspec.json.decode(data)


ARQ_CODEC: dict[str, Any] = {"job_serializer": dumps_job, "job_deserializer": loads_job}


async def connect_arq(redis_url: str) -> ArqRedis:
    """An arq client whose jobs are JSON (see dumps_job): every process that queues or reads jobs uses one."""
    return await create_arq_pool(RedisSettings.from_dsn(redis_url), **ARQ_CODEC)


async def enqueue_ingest(arq: ArqRedis, pool: Any, job_id: int, arq_id: str | None = None) -> str | None:
    """Queue job `job_id` (a row in `jobs`) and remember the arq id on the row; the arq id, or None when arq
    already had that id (arq queues an id once: two callers passing the same `arq_id` start one run)."""
    arq_id = arq_id or f"ingest-{job_id}-{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        await conn.execute("UPDATE jobs SET payload = payload || jsonb_build_object('arq_job_id', $2::text) "
                           "WHERE id = $1", job_id, arq_id)
    queued = await enqueue(arq, INGEST_FUNCTION, job_id, _job_id=arq_id, _queue_name=INGEST_QUEUE)
    return arq_id if queued is not None else None


# arq's client has no read timeout: on a stalled Redis an enqueue would wait for good (a request held open, a
# recovery pass stuck). Every job row is in Postgres first, so a given-up enqueue is queued again by recovery.
ENQUEUE_TIMEOUT_S = 10.0


async def enqueue(arq: ArqRedis, function: str, *args: Any, **kw: Any) -> Any:
    """`arq.enqueue_job`, giving up with TimeoutError after ENQUEUE_TIMEOUT_S."""
    return await asyncio.wait_for(arq.enqueue_job(function, *args, **kw), ENQUEUE_TIMEOUT_S)


async def _heartbeat(redis: ArqRedis, arq_job_id: str, ttl_ms: int) -> None:
    key = ARQ_IN_PROGRESS.format(job_id=arq_job_id)
    while True:
        try:
            await redis.pexpire(key, ttl_ms)
        except Exception:  # noqa: BLE001 - a missed beat only risks a duplicate run, which is idempotent
            logger.warning("heartbeat for %s failed", arq_job_id, exc_info=True)
        await asyncio.sleep(ttl_ms / 3000)


# arq's time limit on a job (transcribing hours of audio). Taking a job, arq leases it for this + 10 s (its
# in-progress key); the heartbeat shortens the lease to STUDYHALL_JOB_HEARTBEAT_S as soon as the job body starts.
JOB_TIMEOUT_S = 4 * 3600
_ARQ_LEASE_MS = (JOB_TIMEOUT_S + 10) * 1000
UNBEATEN_BEATS = 3  # a job taken this many beats ago whose lease no beat ever shortened: its worker died

# KEYS: a job's in-progress key. ARGV: heartbeat ms, arq's lease ms, unbeaten ms. Drops the key when it still holds
# arq's own long lease (above a beat's) set longer ago than the unbeaten time: 1, else 0.
_RELEASE_UNBEATEN = """
local left = redis.call('PTTL', KEYS[1])
if left > tonumber(ARGV[1]) and tonumber(ARGV[2]) - left > tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


async def release_unbeaten(redis: ArqRedis, arq_job_id: str, heartbeat_ms: int) -> bool:
    """Free a queued job whose worker died between taking it and its first heartbeat: arq's lease on it (hours)
    held it back from every other worker, a grade stuck in `grading` for 4 hours. Its in-progress key goes once
    no beat has shortened it for UNBEATEN_BEATS beats since it was taken; the queue's next poll runs the job
    again (runs are idempotent). Whether it was freed."""
    freed = await redis.eval(_RELEASE_UNBEATEN, 1, ARQ_IN_PROGRESS.format(job_id=arq_job_id), heartbeat_ms,
                             _ARQ_LEASE_MS, UNBEATEN_BEATS * heartbeat_ms)
    if freed:
        logger.warning("job %s was taken by a worker that died before its first heartbeat; freed for another",
                       arq_job_id)
    return bool(freed)


@contextlib.asynccontextmanager
async def heartbeat(ctx: dict[str, Any]) -> AsyncIterator[None]:
    """Keep the running arq job's in-progress key short-lived while the body runs: if this worker dies, the
    key lapses within the heartbeat TTL (not arq's job timeout of hours) and another worker takes the job."""
    if ctx.get("job_id") is None:  # called directly, not as an arq job: no lease to keep
        yield
        return
    beat = asyncio.create_task(_heartbeat(ctx["redis"], ctx["job_id"], ctx["settings"].job_heartbeat_ms))
    try:
        yield
    finally:
        await cancel_and_wait(beat)


def backoff_s(attempt: int, base: float) -> float:
    return min(300.0, base * (2 ** max(0, attempt - 1)))


# Set by the worker's signal handler (arq cancels running jobs when it stops): a cancelled attempt was cut by
# the stop, not by arq's time limit, and is given back.
STOPPING = False


def mark_stopping(_signal: object = None) -> None:
    global STOPPING
    STOPPING = True


async def ingest_job(ctx: dict[str, Any], job_id: int) -> str:
    """Run one attempt of ingest job `job_id`; transient failures retry with backoff."""
    from ingest.pipeline import ingest_video

    pool, settings = ctx["pool"], ctx["settings"]
    # the heartbeat first: arq's own lease on a job is its 4-hour timeout, so a worker killed before the beat began
    # left the job parked for hours
    beat = asyncio.create_task(_heartbeat(ctx["redis"], ctx["job_id"], settings.job_heartbeat_ms))
    try:
        async with pool.acquire() as conn:
            job = await jobs_repo.start_attempt(conn, job_id)
    except BaseException:
        await cancel_and_wait(beat)
        raise
    if job is None:
        await cancel_and_wait(beat)
        return "already finished"
    if job["attempts"] > job["max_attempts"]:
        await cancel_and_wait(beat)
        # the earlier attempts ended without a word (the worker killed, out of memory, or past arq's timeout)
        reason = (f"ingest did not finish in {job['attempts'] - 1} attempts (the worker stopped or timed out "
                  "each time)")
        async with pool.acquire() as conn:  # this look was no attempt: the job shows the attempts it had (6 of 5)
            await conn.execute("UPDATE jobs SET attempts = attempts - 1 WHERE id = $1", job_id)
        await JobReporter(pool, ctx["redis"], job).fail(reason)
        logger.warning("ingest job %s failed: %s", job_id, reason)
        return f"failed: {reason}"
    reporter = JobReporter(pool, ctx["redis"], job)
    try:
        # (the model loads in a thread: on the event loop it held up the heartbeats of the jobs beside it)
        n = await ingest_video(pool, settings, await asyncio.to_thread(ctx["embedder"]), job, reporter)
        return f"{n} chunks"
    except asyncio.CancelledError:
        await give_back_if_stopping(pool, lambda conn: jobs_repo.give_back_attempt(conn, job_id), f"ingest job {job_id}")
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
        if isinstance(exc, IngestError):
            reason, permanent = exc.reason, exc.permanent
        else:
            logger.exception("ingest job %s crashed", job_id)
            reason, permanent = internal_reason(exc, job_id)
        if permanent or job["attempts"] >= job["max_attempts"]:
            if not permanent:
                reason = f"{reason} (gave up after {job['attempts']} attempts)"
            if not await reporter.fail(reason):  # a duplicate run finished it: its outcome stands
                return "already finished"
            logger.warning("ingest job %s failed: %s", job_id, reason)
            return f"failed: {reason}"
        delay = backoff_s(job["attempts"], settings.job_retry_base_s)
        async with pool.acquire() as conn, conn.transaction():
            # the video's row before the job's, as a video's deletion (its jobs cascade) and the run's commit take
            # them: the other way round the two could deadlock
            await conn.execute("SELECT 1 FROM videos WHERE id = (SELECT video_id FROM jobs WHERE id = $1) "
                               "FOR NO KEY UPDATE", job_id)
            waiting = await jobs_repo.note_error(conn, job_id, f"{reason}; retrying in {delay:.0f}s")
            if waiting is not None and waiting["video_id"] is not None:  # the video says so too (it said
                # `processing`, no error, for as long as the retries took)
                await videos_repo.note_retry(conn, waiting["video_id"], job_id, waiting["error"])
        if waiting is not None:  # back to `queued`, saying why and when it goes again
            await announce_job(ctx["redis"], waiting)
        logger.info("ingest job %s: %s; retry %d in %.1fs", job_id, reason, job["attempts"] + 1, delay)
        raise Retry(defer=delay) from exc
    finally:
        await cancel_and_wait(beat)


def internal_reason(exc: BaseException, job_id: int) -> tuple[str, bool]:
    """What a job (and its video) say about a failure that is not an ingest error, and whether it is permanent.
    Never the exception's own words: a provider's message can quote the API key, and the video's reason is shown
    in the course. The worker's log has the details. A provider refusing the key does not retry."""
    from agents.embedder import EmbedderError, EmbedderMisconfigured

    status = getattr(exc.__cause__, "status_code", None)
    if isinstance(exc, EmbedderMisconfigured):  # our own words (no provider text): the setting to change
        return f"the embedding model is misconfigured: {exc}", True
    if isinstance(exc, EmbedderError):
        if status in (401, 403):
            return "the embedding service refused the configured API key (see the worker's log)", True
        return f"the embedding model failed (the worker's log has the details, job {job_id})", False
    return f"internal error ({type(exc).__name__}; the worker's log has the details, job {job_id})", False


async def give_back_if_stopping(pool: Any, give_back: Callable[[asyncpg.Connection], Awaitable[None]],
                                what: str) -> None:
    """For a run cancelled by arq: when its worker is stopping (not arq's time limit), `give_back` the attempt
    it counted, shielded from the cancel, as the run goes again elsewhere."""
    if not STOPPING:
        return

    async def run() -> None:
        try:
            async with pool.acquire() as conn:
                await give_back(conn)
            logger.info("%s: cut short by the worker stopping; it runs again (the attempt is not counted)", what)
        except Exception:  # noqa: BLE001 - the attempt counts after all; nothing else is lost
            logger.warning("could not give back the attempt of %s", what, exc_info=True)

    await asyncio.shield(run())


async def recover_lost_jobs(ctx: dict[str, Any]) -> int:
    """Re-queue unfinished jobs whose arq entry vanished (e.g. Redis lost its data). Safe to run anywhere."""
    pool, redis = ctx["pool"], ctx["redis"]
    stale_after = 2 * ctx["settings"].job_heartbeat_ms / 1000
    n = 0
    async with pool.acquire() as conn:
        rows = await jobs_repo.unfinished_jobs(conn, stale_after)
    for row in rows:
        arq_id = (row["payload"] or {}).get("arq_job_id")
        if arq_id and await redis.zscore(INGEST_QUEUE, arq_id) is not None:
            await release_unbeaten(redis, arq_id, ctx["settings"].job_heartbeat_ms)  # (queued, but held back?)
            continue
        # the same id from every worker recovering this row at once (it names the row's last change), so
        # arq runs the job once
        rec_id = f"ingest-{row['id']}-rec-{row['updated_at'].timestamp():.6f}"
        # a result kept under that id is of a run that ended without touching the row (a job arq could not read,
        # as a pickled one from an older version): while arq keeps it (an hour) it would refuse the id
        await redis.delete(ARQ_RESULT.format(job_id=rec_id))
        if await enqueue_ingest(redis, pool, row["id"], rec_id):
            n += 1
    if n:
        logger.info("re-queued %d lost ingest jobs", n)
    return n


ORPHAN_UPLOAD_S = 24 * 3600


async def sweep_uploads(ctx: dict[str, Any]) -> int:
    """Delete uploaded files no video refers to, a day after they were last written: an upload cut short by a
    crash or a shutdown, or a file whose video row never committed. Also the empty folders of deleted courses.
    Returns the number of files deleted."""
    root: Path = ctx["settings"].data_dir / "uploads"
    cutoff = time.time() - ORPHAN_UPLOAD_S

    def old_files() -> list[Path]:
        if not root.is_dir():
            return []
        return [p for p in root.glob("*/*.upload") if p.stat().st_mtime < cutoff]

    found = await asyncio.to_thread(old_files)
    if found:  # a file is its video's by its place in the data folder, wherever the folder was when it was stored
        # (compared whole, every upload of a moved data folder was unreferenced, and deleted)
        courses = sorted({int(p.parent.name) for p in found if p.parent.name.isdigit()})
        async with ctx["pool"].acquire() as conn:
            kept = {videos_repo.upload_tail(r["file_path"]) for r in await conn.fetch(
                "SELECT file_path FROM videos WHERE course_id = ANY($1::bigint[]) AND file_path IS NOT NULL",
                courses)}
        found = [p for p in found if videos_repo.upload_tail(p) not in kept]

    def remove() -> None:
        for p in found:
            p.unlink(missing_ok=True)
        for d in (root.iterdir() if root.is_dir() else ()):
            if d.is_dir() and d.stat().st_mtime < cutoff and not any(d.iterdir()):
                with contextlib.suppress(OSError):  # a file just arrived
                    d.rmdir()

    await asyncio.to_thread(remove)
    if found:
        logger.info("deleted %d uploaded files no video refers to", len(found))
    return len(found)
