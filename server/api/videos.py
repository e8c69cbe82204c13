"""Videos, chapters, transcripts, search and jobs: /api/v1/courses/{id}/videos..., /api/v1/jobs."""
from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import Parameter
from msgspec import Meta

from ingest.errors import IngestError
from ingest.progress import announce_job
from ingest.submit import (DuplicateVideo, FileTooLarge, RepeatedKey, UnsupportedFile, create_video, inspect_file,
                           queue_job, submit_job, title_from_filename)
from server.api.courses import course_or_404
from server.api.paging import ListLimit, Offset
from server.api.schemas import Strict, Title
from server.auth import AuthUser, staff_only
from server.decode import callers_key, idempotency_key, read_json, trimmed
from server.errors import ApiError
from store.frames import LINE_CONTROL, blank
from server.uploads import receive_upload
from store import jobs as jobs_repo
from store import videos as videos_repo
from store.keys import rate_search
from store.ratelimit import SendLimiter
from store.search import hybrid_search


UPLOAD_FIELDS = frozenset({"title"})  # the form fields an upload takes beside its `file`


class VideoIn(Strict):
    title: Title
    youtube: Annotated[str, Meta(min_length=1, max_length=500)]


class Accepted(msgspec.Struct):
    video_id: int
    job_id: int
    status: str = "queued"


class Video(msgspec.Struct):
    id: int
    course_id: int
    title: str
    source: str
    status: str
    youtube_id: str | None
    filename: str | None
    duration_s: float | None
    chunk_count: int
    embed_model: str | None
    language: str | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    job_id: int | None = None  # its latest job (staff): GET /jobs/{id} says why it failed; POST …/retry


class Chapter(msgspec.Struct):
    id: int
    index: int
    start: float
    end: float
    title: str
    summary: str


class Segment(msgspec.Struct):
    start: float
    end: float
    text: str


class SearchHit(msgspec.Struct):
    video_id: int
    video_title: str
    start: float
    end: float
    text: str
    score: float
    url: str | None = None
    # where in the chunk (start-end, up to 90 s) the query is: the start of its sentence sharing most of the query's
    # words (the chunk's start when none does); `url` starts the video there (it started up to 43 s early)
    moment: float = 0.0


class SearchResult(msgspec.Struct):
    query: str
    hits: list[SearchHit]
    # ready videos (of the search's scope) embedded by another model than the configured one, not searched until
    # re-embedded (`studyhall reembed`): a course switched to a new embedder finds nothing in them meanwhile
    awaiting_reembed: list[int] = msgspec.field(default_factory=list)


class Job(msgspec.Struct):
    id: int
    kind: str
    state: str
    progress: float
    error: str | None
    attempts: int
    max_attempts: int
    course_id: int | None
    video_id: int | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


def to_video(r: asyncpg.Record, user: AuthUser) -> Video:
    """The video as `user` sees it: why its ingest failed is for staff."""
    return Video(id=r["id"], course_id=r["course_id"], title=r["title"], source=r["source"], status=r["status"],
                 youtube_id=r["youtube_id"], filename=r["filename"], duration_s=r["duration_s"],
                 chunk_count=r["chunk_count"], embed_model=r["embed_model"], language=r["language"],
                 error=r["error"] if user.is_staff else None, created_at=r["created_at"], updated_at=r["updated_at"],
                 job_id=r.get("job_id") if user.is_staff else None)


def to_job(r: asyncpg.Record) -> Job:
    return Job(id=r["id"], kind=r["kind"], state=r["state"], progress=round(float(r["progress"]), 4), error=r["error"],
               attempts=r["attempts"], max_attempts=r["max_attempts"], course_id=r["course_id"],
               video_id=r["video_id"], created_at=r["created_at"], updated_at=r["updated_at"],
               finished_at=r["finished_at"])


def _repeat(video: asyncpg.Record | None, kw: dict, size: int | None) -> Response[Accepted]:
    """The video an Idempotency-Key made, for a repeat of the same request (the same YouTube video, or a file of
    the same name and size); another video under the same key is refused rather than dropped."""
    if video is None:  # the video the key made was deleted as this repeat came in
        raise ApiError(409, "the video this Idempotency-Key made was just deleted; use a new key", code="invalid_state",
                       field="Idempotency-Key")
    same = (video["youtube_id"] == kw["youtube_id"] if kw.get("youtube_id") else
            video["youtube_id"] is None and video["filename"] == kw.get("filename") and video["file_size"] == size)
    if not same:
        raise ApiError(409, "this Idempotency-Key was used for another video; use a new key for a new video",
                       code="idempotency_key_reused", field="Idempotency-Key")
    return Response(Accepted(video_id=video["id"], job_id=video["job_id"] or 0, status=video["job_state"] or "done"),
                    status_code=200)


async def _video_or_404(conn: asyncpg.Connection, course_id: int, video_id: int) -> asyncpg.Record:
    video = await videos_repo.get_video(conn, video_id)
    if video is None or video["course_id"] != course_id:
        raise ApiError(404, f"video {video_id} not found")
    return video


# a transcript page: a lecture's whole transcript at once (an hour is ~1,000 cues), a long one in pages
TranscriptLimit = Parameter(ge=1, le=5000, default=5000, description="cues per page; a shorter page is the last one")


class VideoController(Controller):
    path = "/api/v1/courses/{course_id:int}"
    tags = ["videos"]

    @post("/videos", guards=[staff_only], status_code=202)
    async def add_video(self, request: Request, course_id: int) -> Response[Accepted]:
        """Add a YouTube video (JSON) or upload a transcript/media file (multipart field `file`, + `title`). With
        an `Idempotency-Key` header, a repeat (a retried upload whose reply was lost) returns the video the key
        made (200) instead of storing and ingesting the file again."""
        state, user = request.app.state, request.user
        key = callers_key(user.id, idempotency_key(request))
        async with state.pool.acquire() as conn:
            await course_or_404(conn, course_id, user)
        ctype = request.headers.get("content-type", "")
        if ctype.lower().lstrip().startswith("multipart/form-data"):  # media types ignore case
            kw = await self._receive_file(request, course_id)
        elif ctype.lower().lstrip().startswith("application/x-www-form-urlencoded"):  # a form without its file
            raise ApiError(400, "an upload is multipart/form-data with the file in a `file` field (a urlencoded "
                                "form carries no file); JSON {title, youtube} adds a YouTube video", field="file")
        else:
            data = await read_json(request, VideoIn)
            from ingest.youtube import parse_youtube_id

            try:
                yt_id = parse_youtube_id(data.youtube)
            except ValueError as exc:
                raise ApiError(400, str(exc), field="youtube") from exc
            kw = dict(title=trimmed(data.title, "title"), youtube_id=yt_id)
        try:
            if key is not None:
                async with state.pool.acquire() as conn:
                    done = await videos_repo.by_client_key(conn, course_id, key)
                if done is not None:
                    raise RepeatedKey(done)
            video_id, job_id = await create_video(state.pool, state.settings, course_id, user.id, **kw,
                                                  client_key=key)
        except RepeatedKey as exc:
            size = None
            if kw.get("file_path"):  # the video the key made has its own copy
                size = Path(kw["file_path"]).stat().st_size
                Path(kw["file_path"]).unlink(missing_ok=True)
            return _repeat(exc.video, kw, size)
        except DuplicateVideo as exc:
            raise ApiError(409, str(exc), code="duplicate", field="youtube") from exc
        except BaseException:
            if kw.get("file_path"):
                Path(kw["file_path"]).unlink(missing_ok=True)
            raise
        # the stored video owns the file now: cut short while queueing (a shutdown), its job still finds it
        await queue_job(state.arq, state.pool, job_id)
        return Response(Accepted(video_id=video_id, job_id=job_id), status_code=202)

    async def _receive_file(self, request: Request, course_id: int) -> dict:
        settings = request.app.state.settings
        up = await receive_upload(request, settings.data_dir / "uploads" / str(course_id),
                                  max_bytes=settings.max_upload_bytes)
        try:
            unknown = sorted(set(up.fields) - UPLOAD_FIELDS)
            if unknown:  # a typo ("titel") or a JSON field sent as a form field ("youtube") is said, not ignored
                raise ApiError(400, f"unknown form field {unknown[0]!r}: an upload takes `file` and `title`",
                               field=unknown[0])
            title = (up.fields.get("title") or "").strip()
            if len(title) > 200:
                raise ApiError(400, "title is longer than 200 characters", field="title")
            if LINE_CONTROL.search(title):  # one line, as every title
                raise ApiError(400, "title must not contain control characters", field="title")
            if title:
                title = trimmed(title, "title")  # something to read, not only invisible characters
            else:
                title = title_from_filename(up.filename)
            try:
                source, kind = await asyncio.to_thread(inspect_file, up.path, up.filename)
            except UnsupportedFile as exc:
                raise ApiError(415, exc.reason, field="file") from exc
            except FileTooLarge as exc:
                raise ApiError(413, exc.reason, field="file") from exc
            except IngestError as exc:
                raise ApiError(400, exc.reason, field="file") from exc
        except BaseException:
            up.discard()
            raise
        return dict(title=title, source=source, kind=kind, filename=up.filename, file_path=up.path)

    @get("/videos")
    async def list_videos(self, request: Request, course_id: int,
                          limit: int = ListLimit, offset: int = Offset) -> list[Video]:
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            return [to_video(r, request.user) for r in await videos_repo.list_videos(conn, course_id, limit=limit,
                                                                                    offset=offset)]

    @get("/videos/{video_id:int}")
    async def read_video(self, request: Request, course_id: int, video_id: int) -> Video:
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            return to_video(await _video_or_404(conn, course_id, video_id), request.user)

    @delete("/videos/{video_id:int}", guards=[staff_only], status_code=204)
    async def delete_video(self, request: Request, course_id: int, video_id: int) -> None:
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            video = await _video_or_404(conn, course_id, video_id)
            if not await videos_repo.delete_video(conn, request.app.state.redis, course_id, video_id):
                raise ApiError(404, f"course {course_id} not found")
        if video["file_path"]:
            videos_repo.upload_path(request.app.state.settings.data_dir, video["file_path"]).unlink(missing_ok=True)

    @post("/videos/{video_id:int}/reingest", guards=[staff_only], status_code=202)
    async def reingest(self, request: Request, course_id: int, video_id: int) -> Accepted:
        """Run ingest again (e.g. new captions); the old chunks stay searchable until the new set replaces them. A
        re-ingest asked for while one is still waiting to start is that one (its job id)."""
        state = request.app.state
        async with state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            await _video_or_404(conn, course_id, video_id)
        try:
            job_id = await submit_job(state.pool, state.arq, state.settings, "ingest", course_id, video_id,
                                      request.user.id, reuse_waiting=True)
        except LookupError:  # deleted since the check above
            raise ApiError(404, f"video {video_id} not found") from None
        return Accepted(video_id=video_id, job_id=job_id)

    @get("/videos/{video_id:int}/chapters")
    async def chapters(self, request: Request, course_id: int, video_id: int) -> list[Chapter]:
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            await _video_or_404(conn, course_id, video_id)
            rows = await videos_repo.list_chapters(conn, video_id)
        return [Chapter(id=r["id"], index=r["idx"], start=r["start_s"], end=r["end_s"], title=r["title"],
                        summary=r["summary"]) for r in rows]

    @get("/videos/{video_id:int}/transcript")
    async def transcript(self, request: Request, course_id: int, video_id: int,
                         limit: int = TranscriptLimit, offset: int = Offset) -> list[Segment]:
        """The timestamped cues in order, `limit` (at most 5,000: a lecture's whole transcript) after `offset`."""
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            await _video_or_404(conn, course_id, video_id)
            rows = await videos_repo.list_segments(conn, video_id, limit=limit, offset=offset)
        return [Segment(start=r["start_s"], end=r["end_s"], text=r["text"]) for r in rows]

    @get("/search")
    async def search(self, request: Request, course_id: int,
                     q: str = Parameter(min_length=1, max_length=1000),
                     k: int = Parameter(ge=1, le=50, default=5),
                     video_id: int | None = Parameter(default=None, ge=1, le=2**62)) -> SearchResult:
        """Hybrid (vector + full-text) search of the course's transcripts."""
        from agents.config import embedder_for
        from agents.evidence import best_moment
        from ingest.youtube import watch_url

        state = request.app.state
        if blank(q):  # invisible characters too
            raise ApiError(400, "q must not be blank", field="q")
        if "\x00" in q:
            raise ApiError(400, "q must not contain NUL characters", field="q")
        if "\ufffd" in q and not _utf8_query(request.scope.get("query_string", b"")):
            raise ApiError(400, "q must be UTF-8 text (percent-encoded bytes that are not UTF-8 were sent)", field="q")
        embedder = await asyncio.to_thread(embedder_for, state.settings)
        async with state.pool.acquire() as conn:  # access first: the embedding is work done for the caller
            await course_or_404(conn, course_id, request.user)
            if video_id is not None:  # another course's video is not found here, as everywhere else
                await _video_or_404(conn, course_id, video_id)
            behind = await conn.fetch(
                """SELECT id FROM videos WHERE course_id = $1 AND ($2::bigint IS NULL OR id = $2) AND status = 'ready'
                   AND embed_model IS DISTINCT FROM $3 ORDER BY id LIMIT 100""", course_id, video_id, embedder.name)
        ok, wait = await SendLimiter(state.redis, SEARCH_RATE, SEARCH_BURST, key=rate_search).take(request.user.id)
        if not ok:
            raise ApiError(429, f"too many searches; retry in {wait:g}s", retry_after=wait)
        vec = await asyncio.to_thread(embedder.embed_query, q)
        async with state.pool.acquire() as conn:
            hits = await hybrid_search(conn, course_id, vec, q, embedder.name, k=k, video_id=video_id,
                                       question=False)  # a search box's words all count
        moments = [best_moment(q, h) for h in hits]
        return SearchResult(query=q, hits=[
            SearchHit(video_id=h.video_id, video_title=h.video_title, start=h.start, end=h.end, text=h.text,
                      score=h.score, url=watch_url(h.youtube_id, at) if h.youtube_id else None, moment=at)
            for h, at in zip(hits, moments)], awaiting_reembed=[r["id"] for r in behind])


def _utf8_query(raw: bytes) -> bool:
    """Whether every parameter of a raw query string decodes as UTF-8 (a U+FFFD in a decoded value may stand for
    bytes that were not: `q=%FF` searched for the replacement character)."""
    from urllib.parse import unquote_to_bytes

    try:
        for part in raw.split(b"&"):
            unquote_to_bytes(part.replace(b"+", b" ")).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Searches per user and second, refilling evenly, with bursts of SEARCH_BURST: each embeds its query.
SEARCH_RATE = 5.0
SEARCH_BURST = 20


class JobController(Controller):
    path = "/api/v1/jobs"
    tags = ["jobs"]

    async def _job(self, conn: asyncpg.Connection, job_id: int, user: AuthUser) -> asyncpg.Record:
        job = await jobs_repo.get_job(conn, job_id)
        if job is None or job["course_id"] is None:
            raise ApiError(404, f"job {job_id} not found")
        await course_or_404(conn, job["course_id"], user, missing=f"job {job_id} not found")
        if not user.is_staff and job["created_by"] != user.id:
            raise ApiError(404, f"job {job_id} not found")
        return job

    @get("/{job_id:int}")
    async def read(self, request: Request, job_id: int) -> Job:
        async with request.app.state.pool.acquire() as conn:
            return to_job(await self._job(conn, job_id, request.user))

    @post("/{job_id:int}/retry", guards=[staff_only], status_code=202)
    async def retry(self, request: Request, job_id: int) -> Job:
        """Retry a failed job from the start."""
        state = request.app.state
        async with state.pool.acquire() as conn:
            job = await self._job(conn, job_id, request.user)
            if job["kind"] not in jobs_repo.INGEST_KINDS:
                raise ApiError(409, f"a {job['kind']} job is not retried here; start it again instead")
            if job["state"] != "failed":
                raise ApiError(409, f"only failed jobs can be retried; this one is {job['state']}")
            async with conn.transaction():
                # the video row before the job's, in the order deleting the video takes them (no deadlock)
                if job["video_id"] is not None and await conn.fetchval(
                        "SELECT 1 FROM videos WHERE id = $1 FOR NO KEY UPDATE", job["video_id"]) is None:
                    raise ApiError(404, f"job {job_id} not found")  # deleted with its video meanwhile
                job = await jobs_repo.requeue(conn, job_id)
                if job is None:  # another retry took it first
                    raise ApiError(409, "this job is already being retried")
                if job["video_id"] is not None:
                    await videos_repo.mark_requeued(conn, job["video_id"])
        # who started it sees it queued again, not still failed (before a worker can report its first stage)
        await announce_job(state.redis, job)
        await queue_job(state.arq, state.pool, job_id)
        return to_job(job)
