"""Submitting a video for ingest: what the REST API and `studyhall ingest` share.

Checks a file by content, creates the video and job rows in one transaction, then queues the job.
"""
from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import asyncpg
from arq.connections import ArqRedis

from agents.embedder import FORMER_DEFAULTS, default_name
from ingest.errors import OTHER_MODEL, PermanentIngestError
from ingest.jobs import enqueue_ingest
from store import jobs as jobs_repo
from store import videos as videos_repo
from store.settings import Settings

logger = logging.getLogger(__name__)

MAX_TRANSCRIPT_BYTES = 50 * 1024 * 1024
ACCEPTED = ("transcripts (.srt, .vtt, YouTube JSON, [text, start, end] JSON) or media (wav, mp3, aac, m4a, mp4, mov, "
            "webm, ogg, flac, mkv)")


class UnsupportedFile(PermanentIngestError):
    """The content is neither a transcript nor media we can read (HTTP 415)."""


class FileTooLarge(PermanentIngestError):
    """Over a size limit (HTTP 413)."""


# The start of a JSON transcript (a list of objects or of lists, or an object): "[Music] Welcome" is not one.
_JSON_SHAPED = re.compile(rb"^(?:\xef\xbb\xbf)?\s*(?:\[\s*[\[{\]]|\{\s*[\"}])")


def inspect_file(path: Path, filename: str | None = None) -> tuple[str, str]:
    """(source, kind) of a file judged by its content: ('media', 'mp4') or ('transcript', 'vtt').

    Raises UnsupportedFile, FileTooLarge, or PermanentIngestError (broken transcript or media) with the reason.
    """
    from ingest.media import SNIFF_BYTES, probe_media, sniff_media
    from ingest.transcripts import detect_transcript_format, extension, parse_transcript

    size = path.stat().st_size
    if size == 0:
        raise PermanentIngestError("the file is empty")
    with open(path, "rb") as fh:
        head = fh.read(max(SNIFF_BYTES, 64 * 1024))
    kind = sniff_media(head)
    if kind is not None:
        probe_media(path)
        return "media", kind
    fmt = detect_transcript_format(head)
    if fmt is None and size <= MAX_TRANSCRIPT_BYTES:
        fmt = detect_transcript_format(path.read_bytes())
    ext = extension(filename)
    if fmt is None and size <= MAX_TRANSCRIPT_BYTES and (ext in ("srt", "vtt", "json") or _JSON_SHAPED.match(head)):
        # named (or shaped) as a transcript that is not one: the parser says what is wrong, and where
        fmt = ext or "json"
    if fmt is None:
        raise UnsupportedFile(f"unsupported or unrecognised file; accepted: {ACCEPTED}")
    if size > MAX_TRANSCRIPT_BYTES:
        raise FileTooLarge(f"transcript files are limited to {MAX_TRANSCRIPT_BYTES // (1024 * 1024)} MB")
    try:
        cues = parse_transcript(path.read_bytes(), filename)
    except PermanentIngestError as exc:
        raise PermanentIngestError(f"broken transcript: {exc.reason}") from exc
    if not cues:
        raise PermanentIngestError("the transcript has no cues with text")
    return "transcript", fmt


class DuplicateVideo(Exception):
    """The course already has this YouTube video (`video_id`)."""

    def __init__(self, video_id: int) -> None:
        super().__init__(f"this YouTube video is already in the course as video {video_id}")
        self.video_id = video_id


class RepeatedKey(Exception):
    """The course already has a video added with this Idempotency-Key (`video`: its row)."""

    def __init__(self, video: asyncpg.Record | None) -> None:  # (None: deleted as the repeat came in)
        super().__init__("a video was added with this Idempotency-Key")
        self.video = video


def title_from_filename(filename: str | None) -> str:
    """A video's title from its file's name, which nobody wrote as a title: one line of at most 200 characters,
    "untitled" when nothing readable is left."""
    from store.frames import LINE_CONTROL, blank

    path = Path(filename or "")
    # a name that is only an extension (".srt": Path's stem keeps it whole, as for a dot file) has no title
    stem = "" if path.name.startswith(".") and path.name.count(".") == 1 and path.suffix == "" else path.stem
    title = " ".join(LINE_CONTROL.sub(" ", stem).split())[:200].strip()
    return title if title and not blank(title) else "untitled"


async def submit_video(pool: asyncpg.Pool, arq: ArqRedis | None, settings: Settings, course_id: int,
                       created_by: int | None, title: str, **kw: Any) -> tuple[int, int]:
    """Create the video and its ingest job, then queue it; returns (video_id, job_id). See `create_video`."""
    video_id, job_id = await create_video(pool, settings, course_id, created_by, title, **kw)
    if arq is not None:
        await queue_job(arq, pool, job_id)
    return video_id, job_id


async def create_video(pool: asyncpg.Pool, settings: Settings, course_id: int, created_by: int | None, title: str,
                       *, youtube_id: str | None = None, file_path: Path | None = None, filename: str | None = None,
                       source: str | None = None, kind: str | None = None,
                       client_key: str | None = None) -> tuple[int, int]:
    """Store the video and its ingest job (one transaction); returns (video_id, job_id). From then on the
    video owns the file: its job reads it, deleting the video removes it. Queue the job with `queue_job`.

    A file must already be stored at `file_path` and checked with `inspect_file`. `client_key`: the request's
    Idempotency-Key; RepeatedKey when the course has a video added with it (also one added at the same moment).
    """
    if youtube_id is None and file_path is None:
        raise ValueError("a video needs a YouTube id or a file")
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                video = await videos_repo.create_video(
                    conn, course_id, title, "youtube" if youtube_id else (source or "transcript"),
                    youtube_id=youtube_id, filename=filename,
                    file_path=str(file_path) if file_path else None,
                    file_kind=kind, file_size=file_path.stat().st_size if file_path else None, client_key=client_key)
                job = await jobs_repo.create_job(conn, "ingest", course_id=course_id, video_id=video["id"],
                                                 created_by=created_by, max_attempts=settings.job_max_attempts)
        except asyncpg.UniqueViolationError as exc:
            if client_key is not None and exc.constraint_name == "videos_client_key":
                raise RepeatedKey(await videos_repo.by_client_key(conn, course_id, client_key)) from None
            # the same YouTube video, added before (or at the same moment)
            existing = await conn.fetchval("SELECT min(id) FROM videos WHERE course_id = $1 AND youtube_id = $2",
                                           course_id, youtube_id)
            raise DuplicateVideo(existing) from None
    return video["id"], job["id"]


async def queue_job(arq: ArqRedis, pool: asyncpg.Pool, job_id: int) -> None:
    """Queue a stored job now if Redis takes it; if not, a worker's lost-job recovery queues it later."""
    try:
        await enqueue_ingest(arq, pool, job_id)
    except Exception:  # noqa: BLE001 - the job row is durable; workers re-queue lost jobs
        logger.warning("could not queue job %s now; a worker will pick it up", job_id, exc_info=True)


async def submit_job(pool: asyncpg.Pool, arq: ArqRedis, settings: Settings, kind: str, course_id: int,
                     video_id: int, created_by: int | None, *, reuse_waiting: bool = False,
                     payload: dict | None = None) -> int:
    """Create an ingest/reembed job for an existing video and queue it; returns the job id. Raises LookupError
    when the video is gone (deleted meanwhile). `reuse_waiting`: a job of this kind for the video that has not
    started yet (queued, or waiting for its retry) is the one asked for again: its id, and no second run (three
    clicks on re-ingest ran the whole pipeline, a transcription included, three times). One already running
    does not count: what it read may be what changed."""
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                # the course first, as a deletion of it locks it (then its videos): a job's insert (which the
                # course's key must stay for) after the video's lock deadlocked with a course deletion (tester)
                if await conn.fetchval("SELECT id FROM courses WHERE id = $1 FOR KEY SHARE", course_id) is None:
                    raise LookupError(f"video {video_id} not found")
                if reuse_waiting:  # under the video's lock: two requests at once find the one job
                    if await conn.fetchval("SELECT id FROM videos WHERE id = $1 FOR NO KEY UPDATE", video_id) is None:
                        raise LookupError(f"video {video_id} not found")
                    waiting = await conn.fetchval(
                        "SELECT id FROM jobs WHERE video_id = $1 AND kind = $2 AND state = 'queued' ORDER BY id "
                        "LIMIT 1", video_id, kind)
                    if waiting is not None:
                        return waiting
                job = await jobs_repo.create_job(conn, kind, course_id=course_id, video_id=video_id,
                                                 created_by=created_by, max_attempts=settings.job_max_attempts,
                                                 payload=payload)
                await videos_repo.mark_requeued(conn, video_id)
        except asyncpg.ForeignKeyViolationError:
            raise LookupError(f"video {video_id} not found") from None
    await queue_job(arq, pool, job["id"])
    return job["id"]


# Held (a transaction's advisory lock) while re-embeds are looked for and queued: workers starting at once (and
# `studyhall reembed`) queued one job per video each
_REEMBED_LOCK = 0x5245_454D_4244
REEMBED_LOCK_POLL_S = 0.2


async def submit_reembed(pool: asyncpg.Pool, arq: ArqRedis, settings: Settings, embed_model: str,
                         course_id: int | None = None, *, only_from: list[str] | None = None,
                         not_failed: bool = False, wait: bool = True) -> list[int] | None:
    """Queue a re-embed job for every ready video whose chunks were embedded by another model (`only_from`: by one
    of these), unless one for this model is queued or running already (a second `studyhall reembed` doubled the
    work); `not_failed`: nor one for this model that failed (other than by reaching a worker of another model, as
    in a rolling upgrade). One process at a time: `wait=False` queues none (None) while another is at it."""
    # a transaction's lock: a cancel or an error anywhere ends it with the transaction (a session lock taken on a
    # pooled connection could stay behind on it); asked for again and again, not waited for in a statement (the
    # pool's command timeout would end the wait)
    async with pool.acquire() as lock, lock.transaction():
        while not await lock.fetchval("SELECT pg_try_advisory_xact_lock($1)", _REEMBED_LOCK):
            if not wait:
                return None
            await asyncio.sleep(REEMBED_LOCK_POLL_S)
        rows = await lock.fetch(
            """SELECT v.id, v.course_id FROM videos v
               WHERE v.status = 'ready' AND v.embed_model IS DISTINCT FROM $1
                 AND ($2::bigint IS NULL OR v.course_id = $2) AND ($3::text[] IS NULL OR v.embed_model = ANY ($3))
                 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.video_id = v.id AND j.kind = 'reembed'
                                 AND coalesce(j.payload ->> 'embed_model', $1) = $1
                                 AND (j.state NOT IN ('done', 'failed')
                                      OR $4 AND j.state = 'failed' AND coalesce(j.error, '') NOT LIKE $5 || '%'))
               ORDER BY v.id""",
            embed_model, course_id, only_from, not_failed, OTHER_MODEL)
        jobs = []
        for r in rows:  # (each job commits on its own connection before the lock's transaction ends)
            try:
                # the model it is for: a worker still embedding with another (not restarted after the switch) fails
                # it saying so, instead of "re-embedding" with the old model, marking it done, round after round
                jobs.append(await submit_job(pool, arq, settings, "reembed", r["course_id"], r["id"], None,
                                             payload={"embed_model": embed_model}))
            except LookupError:  # deleted meanwhile
                continue
        return jobs


async def reembed_superseded(pool: asyncpg.Pool, arq: ArqRedis, settings: Settings) -> list[int]:
    """With the offline default embedder configured: queue re-embeds for the videos an earlier default embedded
    (agents.embedder.FORMER_DEFAULTS: MiniLM alone, before the ensemble), so an upgrade heals on its own; search
    lists them as awaiting_reembed meanwhile. Run when an ingest worker starts and every 5 minutes (workers at it
    together: one queues them). A re-embed that failed is left to `POST /jobs/{id}/retry` or `studyhall reembed`,
    not queued again at every pass, unless it failed by reaching a worker of the old version (a rolling upgrade)."""
    if settings.embedder != "local":
        return []
    jobs = await submit_reembed(pool, arq, settings, default_name(), only_from=list(FORMER_DEFAULTS),
                                not_failed=True, wait=False)
    if jobs is None:
        logger.info("re-embeds are being queued by another process; this pass leaves it to that one")
        return []
    if jobs:
        logger.info("queued %d re-embed jobs for videos of an earlier default embedder", len(jobs))
    return jobs
