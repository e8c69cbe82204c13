"""The ingest pipeline for one video: source → cues → sentences → chunks → embeddings → chapters → stored.

Everything a reader sees is swapped in one transaction at the end, so a re-ingest or a retry after a crash
leaves exactly one set of chunks and chapters.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from agents.embedder import primary_part
from ingest.chapters import build_chapters, llm_titles
from ingest.chunking import chunk_sentences, to_sentences
from ingest.cues import Cue
from ingest.errors import OTHER_MODEL, PermanentIngestError
from ingest.progress import JobReporter
from store import jobs as jobs_repo
from store import progress as progress_repo
from store import videos as videos_repo
from store import xp
from store.settings import Settings

logger = logging.getLogger(__name__)

EMBED_BATCH = 256
# Chunk size tuned on ../shared/eval with bench/search_quality.py: ~120 word-pieces beat 180 on hit@5
# (0.95 vs 0.93 with hybrid search) while staying well inside MiniLM's 256-piece window.
CHUNK_TARGET_TOKENS = 120


@dataclass
class SourceResult:
    cues: list[Cue]
    duration_s: float | None = None
    language: str | None = None
    captions_generated: bool | None = None


async def fetch_cues(video: asyncpg.Record, settings: Settings, reporter: JobReporter) -> SourceResult:
    """Turn the video's source into cleaned, timed cues."""
    source = video["source"]
    if source == "youtube":
        from ingest.youtube import fetch_youtube_transcript, proxy_config

        await reporter.stage("fetching")
        yt = await asyncio.to_thread(fetch_youtube_transcript, video["youtube_id"], list(settings.youtube_languages),
                                     proxy_config=proxy_config(settings.youtube_proxy))
        from ingest.transcripts import clean_cues

        return SourceResult(await asyncio.to_thread(clean_cues, yt.cues), language=yt.language_code,
                            captions_generated=yt.is_generated)
    path = videos_repo.upload_path(settings.data_dir, video["file_path"]) or Path("")
    if not path.exists():
        raise PermanentIngestError("the uploaded file is missing from storage; upload it again")
    if source == "transcript":
        from ingest.transcripts import parse_transcript

        await reporter.stage("fetching")
        data = await asyncio.to_thread(path.read_bytes)
        return SourceResult(await asyncio.to_thread(parse_transcript, data, video["filename"]))
    if source == "media":
        from ingest.media import probe_media
        from ingest.transcribe import TranscriptionStopped, get_transcriber

        await reporter.stage("transcribing")
        await asyncio.to_thread(probe_media, path)  # unreadable media is refused before the model loads
        loop = asyncio.get_running_loop()

        def on_progress(fraction: float) -> None:
            asyncio.run_coroutine_threadsafe(reporter.advance(fraction), loop)

        transcriber = await asyncio.to_thread(get_transcriber, settings.whisper_model)
        # the thread stops at its next segment, not the end, when the progress writes find the job deleted or
        # when the worker stops (this run is over either way)
        try:
            done = await asyncio.to_thread(transcriber.run, path, on_progress=on_progress, cancel=reporter.deleted)
        except asyncio.CancelledError:
            reporter.deleted.set()
            raise
        except TranscriptionStopped:
            raise PermanentIngestError("the video was deleted") from None
        from ingest.transcripts import clean_cues

        # the length that decoded: a truncated file's header claims the whole
        return SourceResult(await asyncio.to_thread(clean_cues, done.cues), duration_s=done.duration_s,
                            language=done.language, captions_generated=True)
    raise PermanentIngestError(f"unknown video source {source!r}")


# One batch embeds at a time per worker process: the model already uses every core, so two jobs embedding at
# once only oversubscribe them; meanwhile the other job fetches, chunks and writes to Postgres.
_embedding: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


async def embed_texts(embedder: Any, texts: list[str], reporter: JobReporter | None = None) -> np.ndarray:
    """Embed in batches off the event loop, reporting progress between batches; a job found deleted (its video or
    course) stops at the next batch (it held the worker's embedder, ahead of every other job's batches)."""
    if not texts:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    lock = _embedding.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    parts = []
    for i in range(0, len(texts), EMBED_BATCH):
        if reporter is not None and reporter.deleted.is_set():
            raise PermanentIngestError("the video was deleted")
        async with lock:
            parts.append(await asyncio.to_thread(embedder.embed, texts[i: i + EMBED_BATCH]))
        if reporter is not None:
            await reporter.advance((i + EMBED_BATCH) / len(texts))
    return np.vstack(parts)


def keep_titles(chapters: list[Any], old: list[Any]) -> list[Any] | None:
    """When `chapters` are cut exactly where the `old` ones were (a re-embed whose model cuts the same, as the
    ensemble does on its MiniLM half): each keeps its old title where that differs from the one built now (a
    model wrote it); returns the chapters left with the built title (a model may title them now). None when the
    cuts moved (new chapters, titled afresh)."""
    if not chapters or len(chapters) != len(old) or any(
            c.start != o["start_s"] or c.end != o["end_s"] for c, o in zip(chapters, old)):
        return None
    untitled = []
    for c, o in zip(chapters, old):
        if o["title"] != c.title:
            c.title = o["title"]
        else:
            untitled.append(c)
    return untitled


async def ingest_video(pool: asyncpg.Pool, settings: Settings, embedder: Any, job: asyncpg.Record,
                       reporter: JobReporter) -> int:
    """Run the whole pipeline for the job's video; returns the number of chunks stored."""
    target = (job["payload"] or {}).get("embed_model") if job["kind"] == "reembed" else None
    if target is not None and target != embedder.name:
        raise PermanentIngestError(f"{OTHER_MODEL} {embedder.name}, and the re-embed was asked for {target}: "
                                   "restart the workers with the STUDYHALL_EMBEDDER it was queued with, then retry")
    async with pool.acquire() as conn:
        video = await videos_repo.get_video(conn, job["video_id"])
        if video is None:
            raise PermanentIngestError("the video was deleted")
        await videos_repo.mark_processing(conn, video["id"])
    segs = None
    if job["kind"] == "reembed":
        # a new embedding model: re-chunk and re-embed the stored transcript, no refetch or transcription
        await reporter.stage("fetching")
        async with pool.acquire() as conn:
            segs = await videos_repo.list_segments(conn, video["id"])
        src = SourceResult([Cue(r["start_s"], r["end_s"], r["text"]) for r in segs], duration_s=video["duration_s"],
                           language=video["language"], captions_generated=video["captions_generated"])
    else:
        src = await fetch_cues(video, settings, reporter)
    if not src.cues:
        raise PermanentIngestError("no speech was heard in the audio" if video["source"] == "media"
                                   else "the transcript has no speech or text")
    await reporter.stage("chunking")
    # CPU work off the event loop: the job's heartbeat and the other job keep running meanwhile
    chunks = await asyncio.to_thread(
        lambda: chunk_sentences(to_sentences(src.cues), target_tokens=CHUNK_TARGET_TOKENS))
    if not chunks:
        raise PermanentIngestError("nothing to index: the transcript is empty after cleaning")
    await reporter.stage("embedding")
    emb = await embed_texts(embedder, [c.text for c in chunks], reporter)
    await reporter.stage("chaptering")
    # chapters from the primary member's vectors (an ensemble's MiniLM half): the cuts were tuned on MiniLM's
    chapters = await asyncio.to_thread(build_chapters, chunks, primary_part(embedder, emb))
    untitled = None
    if segs is not None:  # a re-embed: chapters cut where they were keep their rows and their model-written titles
        async with pool.acquire() as conn:
            untitled = keep_titles(chapters, await videos_repo.list_chapters(conn, video["id"]))
    from agents.llm import get_llm

    llm = get_llm(settings)
    to_title = chapters if untitled is None else untitled
    if llm is not None and to_title:
        # a model call per chapter: keep the job's pulse; all of them within one model timeout a chapter (a slow
        # model that answers gets its time; one that does not answer ends the titles at its first failure)
        await llm_titles(llm, to_title, progress=reporter.advance,
                         deadline_s=len(to_title) * settings.llm_timeout_s)
    duration = max(src.duration_s or 0.0, src.cues[-1].end)
    async with pool.acquire() as conn, conn.transaction():
        xtx = xp.XpTransaction(conn)  # the XP of videos the new length completes, settled after the commit
        # the course row first, as a course delete takes it (then its videos'): in the other order the two
        # deadlocked and the delete failed
        await conn.execute("SELECT 1 FROM courses WHERE id = $1 FOR KEY SHARE", video["course_id"])
        # lock the video row: two attempts racing (a slow "dead" worker and its replacement) serialize here
        locked = await conn.fetchrow("SELECT id FROM videos WHERE id = $1 FOR UPDATE", video["id"])
        if locked is None:
            raise PermanentIngestError("the video was deleted")
        current = await jobs_repo.get_job(conn, job["id"])
        if current is None or current["state"] in ("done", "failed"):
            logger.info("job %s already finished elsewhere; discarding this attempt", job["id"])
            return len(chunks)
        newer = None if job["kind"] != "ingest" else await conn.fetchval(
            "SELECT id FROM jobs WHERE video_id = $1 AND kind = 'ingest' AND id > $2 AND state = 'done' LIMIT 1",
            video["id"], job["id"])
        if newer is not None:
            # a re-ingest asked for after this one started (while it ran) fetched the source later and finished
            # first: its transcript stands, not this older one
            logger.info("job %s: newer ingest %s of the video finished first; keeping its result", job["id"], newer)
        elif segs is not None and list(map(tuple, await videos_repo.list_segments(conn, video["id"]))) != list(
                map(tuple, segs)):
            # a re-ingest replaced the transcript after this re-embed read it: its newer chunks stand
            logger.info("job %s: the transcript changed meanwhile; keeping the newer chunks", job["id"])
        else:
            await videos_repo.replace_transcript(conn, video["id"], src.cues)
            await videos_repo.replace_chunks(conn, video["id"], video["course_id"], chunks, emb, embedder.name)
            # the same cuts: the same rows (ids, assignments on them, learners' chapter strengths), titles updated
            if untitled is None or not await videos_repo.retitle_chapters(conn, video["id"], chapters):
                await videos_repo.replace_chapters(conn, video["id"], chapters)
            await videos_repo.mark_ready(conn, video["id"], duration_s=duration, embed_model=embedder.name,
                                         embed_dim=embedder.dim, chunk_count=len(chunks), language=src.language,
                                         captions_generated=src.captions_generated)
            await progress_repo.fit_to_duration(xtx, video["id"], duration, settings.video_complete_share)
        done = await jobs_repo.set_state(conn, job["id"], "done", 1.0)
    if xtx.awards and reporter.redis is not None:  # (without Redis the boards' check rebuilds them from the ledger)
        await xp.settle(reporter.redis, xtx.awards, xtx.unlocked)
    await reporter.announce(done)
    logger.info("ingested video %s: %d cues, %d chunks, %d chapters", video["id"], len(src.cues), len(chunks),
                len(chapters))
    return len(chunks)
