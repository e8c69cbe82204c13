"""Videos of a course, their transcript segments, chunks and chapters."""
from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from redis.asyncio import Redis

from store import progress, xp
from store.db import LONG_S
from store.submissions import without_rewatch
from store.vectors import stored

_COLS = """v.id, v.course_id, v.title, v.source, v.youtube_id, v.filename, v.file_path, v.file_kind, v.file_size,
           v.duration_s, v.status, v.embed_model, v.embed_dim, v.language, v.captions_generated, v.chunk_count,
           v.error, v.created_at, v.updated_at"""


# An upload's place inside the data folder: uploads/<course>/<name>.upload. A video names its file by the absolute
# path it was stored at (as every release has: one still running beside a newer one during a deploy reads them so);
# a data folder moved since (a bigger disk, a restore, another mount point on each server) is looked in by that tail.
_UPLOAD_TAIL = re.compile(r"(?:^|/)(uploads/[^/]+/[^/]+\.upload)$")


def upload_tail(path: str | Path) -> str | None:
    """`uploads/<course>/<name>.upload` of an upload's path (None: not an upload of a data folder)."""
    m = _UPLOAD_TAIL.search(Path(path).as_posix())
    return m.group(1) if m else None


def upload_path(data_dir: Path, stored: str | None) -> Path | None:
    """The file a video's `file_path` names, as this process finds it: at its place in this process's data folder
    (moved since it was stored, every upload was "missing from storage" on re-ingest; and a copy restored beside
    the original must read and delete its own files, not the original's), else, for a file that is not a data
    folder's upload, where it was stored."""
    if not stored:
        return None
    p = Path(stored)
    tail = upload_tail(p)
    if tail is not None:
        return data_dir / tail
    return p if p.is_absolute() else data_dir / p


async def create_video(conn: asyncpg.Connection, course_id: int, title: str, source: str, *,
                       youtube_id: str | None = None, filename: str | None = None, file_path: str | None = None,
                       file_kind: str | None = None, file_size: int | None = None,
                       client_key: str | None = None) -> asyncpg.Record:
    return await conn.fetchrow(
        f"""INSERT INTO videos AS v (course_id, title, source, youtube_id, filename, file_path, file_kind, file_size,
                                     client_key)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {_COLS}""",
        course_id, title, source, youtube_id, filename, file_path, file_kind, file_size, client_key,
    )


async def by_client_key(conn: asyncpg.Connection, course_id: int, key: str) -> asyncpg.Record | None:
    """The video added to the course with this Idempotency-Key, with its first ingest job (`job_id`, `job_state`;
    None once the job is gone)."""
    return await conn.fetchrow(
        f"""SELECT {_COLS}, j.id AS job_id, j.state AS job_state FROM videos v
            LEFT JOIN LATERAL (SELECT id, state FROM jobs WHERE video_id = v.id AND kind = 'ingest' ORDER BY id
                               LIMIT 1) j ON true
            WHERE v.course_id = $1 AND v.client_key = $2""", course_id, key)


# The video's latest job (ingest, re-ingest or re-embed): where to read why it failed, or retry it.
_LAST_JOB = "(SELECT j.id FROM jobs j WHERE j.video_id = v.id ORDER BY j.id DESC LIMIT 1) AS job_id"


async def get_video(conn: asyncpg.Connection, video_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_COLS}, {_LAST_JOB} FROM videos v WHERE v.id = $1", video_id)


async def list_videos(conn: asyncpg.Connection, course_id: int, *,
                      limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {_COLS}, {_LAST_JOB} FROM videos v WHERE v.course_id = $1 ORDER BY v.id LIMIT $2 OFFSET $3",
        course_id, limit, offset)


async def set_status(conn: asyncpg.Connection, video_id: int, status: str, error: str | None = None) -> None:
    await conn.execute("UPDATE videos SET status = $2, error = $3, updated_at = now() WHERE id = $1",
                       video_id, status, error)


async def mark_processing(conn: asyncpg.Connection, video_id: int) -> None:
    """An ingest starts. A video that is ready (it has chunks) stays ready while it is re-ingested or
    re-embedded: learners keep searching, asking about and reporting progress on it meanwhile."""
    await conn.execute("""UPDATE videos SET status = 'processing', error = NULL, updated_at = now()
                          WHERE id = $1 AND NOT (status = 'ready' AND chunk_count > 0)""", video_id)


async def note_retry(conn: asyncpg.Connection, video_id: int, job_id: int, error: str) -> None:
    """An attempt of the video's latest job failed and waits for its retry: a video not ready is `queued` again,
    with the reason and when it goes again as its error (until the next attempt starts)."""
    await conn.execute("""UPDATE videos v SET status = 'queued', error = $3, updated_at = now()
                          WHERE id = $1 AND NOT (status = 'ready' AND chunk_count > 0)
                            AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.video_id = v.id AND j.id > $2)""",
                       video_id, job_id, error)


async def mark_requeued(conn: asyncpg.Connection, video_id: int) -> None:
    """A new ingest of a failed video is queued (a retry, a re-ingest): it is `queued` again, without the old
    error, from now on rather than once a worker starts it."""
    await conn.execute("""UPDATE videos SET status = 'queued', error = NULL, updated_at = now()
                          WHERE id = $1 AND status = 'failed'""", video_id)


async def mark_failed(conn: asyncpg.Connection, video_id: int, reason: str, job_id: int | None = None) -> None:
    """An ingest gave up. A video still serving its earlier chunks stays ready, with the reason kept in
    `error`; one that never became ready is `failed`. Nothing changes when a later ingest of the video (than job
    `job_id`) has finished: the video is that one's now, and its error would be none of its own."""
    await conn.execute("""UPDATE videos SET status = CASE WHEN status = 'ready' AND chunk_count > 0 THEN 'ready'
                                                     ELSE 'failed' END,
                                 error = $2, updated_at = now()
                          WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.video_id = $1 AND j.id > $3
                                                          AND j.kind = 'ingest' AND j.state = 'done')""",
                       video_id, reason, job_id or 0)


async def replace_transcript(conn: asyncpg.Connection, video_id: int, cues: Sequence[Any]) -> None:
    """Store the cleaned cues of a video, replacing earlier ones (caller holds the transaction)."""
    await conn.execute("DELETE FROM transcript_segments WHERE video_id = $1", video_id)
    await conn.copy_records_to_table(
        "transcript_segments", columns=["video_id", "idx", "start_s", "end_s", "text"],
        records=[(video_id, i, float(c.start), float(c.end), c.text) for i, c in enumerate(cues)],
    )


# BM25 statistics (course_term_stats: N and total length; course_term_df: df per lexeme) are kept incrementally:
# replace_chunks subtracts a video's old contribution and adds its new one, so ingest costs the same whatever the
# course's size. Upkeep is serialized per course (transaction-scoped advisory lock): concurrent ingests of one
# course would otherwise update the same df rows in different orders and could deadlock.
_TERMS_LOCK = "SELECT pg_advisory_xact_lock(5147, hashint8($1))"

# The video's current postings and sizes, taken out of the course's df and N/total (nothing for a new video).
_FORGET_TERMS = """
WITH old AS (
    SELECT t.course_id, t.embed_model, t.lexeme, count(*)::int AS n
    FROM chunks c JOIN chunk_terms t ON t.chunk_id = c.id WHERE c.video_id = $1
    GROUP BY 1, 2, 3),
df_gone AS (
    DELETE FROM course_term_df d USING old o
    WHERE d.course_id = o.course_id AND d.embed_model = o.embed_model AND d.lexeme = o.lexeme AND d.df <= o.n),
df_less AS (
    UPDATE course_term_df d SET df = d.df - o.n FROM old o
    WHERE d.course_id = o.course_id AND d.embed_model = o.embed_model AND d.lexeme = o.lexeme AND d.df > o.n),
sizes AS (
    SELECT course_id, embed_model, count(*)::int AS n, coalesce(sum(n_terms), 0) AS total
    FROM chunks WHERE video_id = $1 GROUP BY 1, 2),
stats_gone AS (
    DELETE FROM course_term_stats s USING sizes z
    WHERE s.course_id = z.course_id AND s.embed_model = z.embed_model AND s.n_chunks <= z.n)
UPDATE course_term_stats s SET n_chunks = s.n_chunks - z.n, total_terms = s.total_terms - z.total
FROM sizes z WHERE s.course_id = z.course_id AND s.embed_model = z.embed_model AND s.n_chunks > z.n
"""

# The video's new chunks: BM25 postings from the text's tsvector, accents folded (sh_fold, migration 0022; stemmed,
# stop words removed; tf = number of positions), each chunk's length, and their df and N/total added to the
# course's.
_ADD_TERMS = """
WITH terms AS (
    SELECT c.id, c.course_id, c.embed_model, c.video_id, u.lexeme, coalesce(array_length(u.positions, 1), 1) AS tf
    FROM chunks c, unnest(to_tsvector('english', sh_fold(c.text))) u WHERE c.video_id = $1),
lengths AS (SELECT id, sum(tf)::int AS dl FROM terms GROUP BY id),
upd AS (UPDATE chunks c SET n_terms = l.dl FROM lengths l WHERE c.id = l.id),
postings AS (
    INSERT INTO chunk_terms (course_id, embed_model, lexeme, chunk_id, video_id, tf, dl)
    SELECT t.course_id, t.embed_model, t.lexeme, t.id, t.video_id, t.tf, l.dl FROM terms t JOIN lengths l USING (id)),
df AS (
    INSERT INTO course_term_df AS d (course_id, embed_model, lexeme, df)
    SELECT course_id, embed_model, lexeme, count(*) FROM terms GROUP BY 1, 2, 3
    ON CONFLICT (course_id, embed_model, lexeme) DO UPDATE SET df = d.df + excluded.df)
INSERT INTO course_term_stats AS s (course_id, embed_model, n_chunks, total_terms)
SELECT c.course_id, c.embed_model, count(*), coalesce(sum(l.dl), 0)
FROM chunks c LEFT JOIN lengths l USING (id) WHERE c.video_id = $1 GROUP BY 1, 2
ON CONFLICT (course_id, embed_model)
DO UPDATE SET n_chunks = s.n_chunks + excluded.n_chunks, total_terms = s.total_terms + excluded.total_terms
"""

# The words the video's chunks use, as spoken (store/search.py vocabulary_coverage reads them). Tokens: runs of
# letters and digits joined by an apostrophe or a hyphen ("gpt-2", "hamilton's"), accents folded, lower-cased,
# curly apostrophes straight; agents/judge.py tokenizes questions the same way, migration 0008 did the same in SQL.
WORD_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def fold(text: str) -> str:
    """Accents off, curly apostrophes straight: "Schrödinger’s" -> "Schrodinger's"."""
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


# Longer "words" (a pasted hash, a run of digits) are nobody's search term, and past ~2,700 bytes they do not fit
# the words index at all.
MAX_WORD_CHARS = 100


def spoken_words(texts: Iterable[str]) -> set[str]:
    return {w for t in texts for w in WORD_RE.findall(fold(t).lower()) if len(w) <= MAX_WORD_CHARS}


# df recounted from the postings; only rows that changed are written.
_RECOUNT_DF = """
WITH fresh AS (
    SELECT embed_model, lexeme, count(*)::int AS df FROM chunk_terms WHERE course_id = $1 GROUP BY 1, 2),
gone AS (
    DELETE FROM course_term_df d WHERE d.course_id = $1
      AND NOT EXISTS (SELECT FROM fresh f WHERE f.embed_model = d.embed_model AND f.lexeme = d.lexeme))
INSERT INTO course_term_df AS d (course_id, embed_model, lexeme, df)
SELECT $1, embed_model, lexeme, df FROM fresh
ON CONFLICT (course_id, embed_model, lexeme) DO UPDATE SET df = excluded.df WHERE d.df <> excluded.df
"""


async def replace_chunks(conn: asyncpg.Connection, video_id: int, course_id: int, chunks: Sequence[Any],
                         embeddings: np.ndarray, embed_model: str) -> None:
    """Swap a video's chunks for new ones. Run inside a transaction: readers see the old set or the new one."""
    await conn.execute(_TERMS_LOCK, course_id)
    await conn.execute(_FORGET_TERMS, video_id)
    await conn.execute("DELETE FROM chunks WHERE video_id = $1", video_id)
    records = []
    for ch, vec in zip(chunks, embeddings, strict=True):
        sentences = [[round(s.start, 3), round(s.end, 3), s.text] for s in ch.sentences]
        records.append((video_id, course_id, ch.position, float(ch.start), float(ch.end), ch.text, sentences,
                        embed_model, stored(vec)))
    await conn.copy_records_to_table(
        "chunks", columns=["video_id", "course_id", "position", "start_s", "end_s", "text", "sentences",
                           "embed_model", "embedding"],
        records=records,
    )
    await conn.execute(_ADD_TERMS, video_id)
    await conn.execute("DELETE FROM video_words WHERE video_id = $1", video_id)  # the course lock serializes this
    words = await asyncio.to_thread(spoken_words, [c.text for c in chunks])  # seconds for a long lecture series
    await conn.copy_records_to_table("video_words", columns=["course_id", "word", "video_id"],
                                     records=[(course_id, w, video_id) for w in words])


async def refresh_term_stats(conn: asyncpg.Connection, course_id: int) -> None:
    """Recount BM25's N, total length and df for the course (per embedding model) after chunks went away
    other than through replace_chunks (a video deleted). Reads all of the course's postings."""
    # (behind an ingest of the course committing: waited for with the pool's timeout, not LONG_S, since a video's
    # deletion holds the course row meanwhile, which every progress report of the course waits for)
    await conn.execute(_TERMS_LOCK, course_id)
    await conn.execute("DELETE FROM course_term_stats WHERE course_id = $1", course_id)
    await conn.execute(
        """INSERT INTO course_term_stats (course_id, embed_model, n_chunks, total_terms)
           SELECT course_id, embed_model, count(*), coalesce(sum(n_terms), 0) FROM chunks
           WHERE course_id = $1 GROUP BY course_id, embed_model""",
        course_id, timeout=LONG_S,
    )
    await conn.execute(_RECOUNT_DF, course_id, timeout=LONG_S)


# Assignments of the video's old chapters move to the new chapter holding their cited moment, else to the one
# overlapping the old chapter most (new chapters carry negative idx until the old ones are gone).
_RELINK = """
UPDATE assignments a SET chapter_id = (
    SELECT n.id FROM chapters n WHERE n.video_id = $1 AND n.idx < 0
    ORDER BY (a.citation ->> 'video_id')::bigint = $1 AND (a.citation ->> 'start')::float8 >= n.start_s
             AND (a.citation ->> 'start')::float8 < n.end_s DESC NULLS LAST,
             greatest(0, least(n.end_s, o.end_s) - greatest(n.start_s, o.start_s)) DESC, n.idx DESC
    LIMIT 1)
FROM chapters o WHERE o.id = a.chapter_id AND o.video_id = $1 AND o.idx >= 0"""

# Learners' strengths on the new chapters, as `assignments._update_chapter_score` computes them (the old
# chapters' rows went with them).
_RESCORE = """
INSERT INTO chapter_scores (user_id, chapter_id, score, updated_at)
SELECT b.user_id, a.chapter_id, least(1, greatest(0, avg(b.score) / 100)), now()
FROM (SELECT s.user_id, s.assignment_id, max(s.score) AS score FROM submissions s
      WHERE s.status = 'graded' GROUP BY 1, 2) b
JOIN assignments a ON a.id = b.assignment_id JOIN chapters n ON n.id = a.chapter_id AND n.video_id = $1
GROUP BY b.user_id, a.chapter_id
ON CONFLICT (user_id, chapter_id) DO UPDATE SET score = EXCLUDED.score, updated_at = now()"""


async def replace_chapters(conn: asyncpg.Connection, video_id: int, chapters: Sequence[Any]) -> None:
    """Swap the video's chapters for new ones (in the caller's transaction). A re-ingest keeps what hangs on them:
    assignments move to the matching new chapter, and learners' chapter strengths are recomputed there."""
    # The old chapters are locked first: an assignment being written on one (its key held) is waited for and
    # then moved; one written after waits here and finds its chapter gone (a 404, not a chapter silently nulled
    # by the delete, as an assignment that slipped in between the move and the delete was). Their assignments
    # before them, as an edit locks an assignment and then its new chapter's key (the other order deadlocked).
    await conn.execute("""SELECT a.id FROM assignments a JOIN chapters c ON c.id = a.chapter_id
                          WHERE c.video_id = $1 AND c.idx >= 0 ORDER BY a.id FOR UPDATE OF a""", video_id)
    await conn.execute("SELECT id FROM chapters WHERE video_id = $1 AND idx >= 0 ORDER BY id FOR UPDATE", video_id)
    await conn.executemany(
        "INSERT INTO chapters (video_id, idx, start_s, end_s, title, summary) VALUES ($1, $2, $3, $4, $5, $6)",
        [(video_id, -1 - i, float(c.start), float(c.end), c.title, c.summary) for i, c in enumerate(chapters)],
    )
    if chapters:
        await conn.execute(_RELINK, video_id)
    await conn.execute("DELETE FROM chapters WHERE video_id = $1 AND idx >= 0", video_id)
    await conn.execute("UPDATE chapters SET idx = -1 - idx WHERE video_id = $1", video_id)
    await conn.execute(_RESCORE, video_id)


async def retitle_chapters(conn: asyncpg.Connection, video_id: int, chapters: Sequence[Any]) -> bool:
    """Give the video's chapters these titles and summaries, in place, when they are exactly these spans (the
    caller's transaction); False (nothing changed) when they are not."""
    rows = await conn.fetch("SELECT id, start_s, end_s FROM chapters WHERE video_id = $1 AND idx >= 0 ORDER BY idx "
                            "FOR NO KEY UPDATE", video_id)
    if len(rows) != len(chapters) or any(r["start_s"] != float(c.start) or r["end_s"] != float(c.end)
                                         for r, c in zip(rows, chapters)):
        return False
    await conn.executemany("UPDATE chapters SET title = $2, summary = $3 WHERE id = $1 AND "
                           "(title, summary) IS DISTINCT FROM ($2, $3)",
                           [(r["id"], c.title, c.summary) for r, c in zip(rows, chapters)])
    return True


async def mark_ready(conn: asyncpg.Connection, video_id: int, *, duration_s: float, embed_model: str, embed_dim: int,
                     chunk_count: int, language: str | None, captions_generated: bool | None) -> None:
    await conn.execute(
        """UPDATE videos SET status = 'ready', error = NULL, duration_s = $2, embed_model = $3, embed_dim = $4,
                  chunk_count = $5, language = coalesce($6, language),
                  captions_generated = coalesce($7, captions_generated), updated_at = now()
           WHERE id = $1""",
        video_id, duration_s, embed_model, embed_dim, chunk_count, language, captions_generated,
    )


async def list_chapters(conn: asyncpg.Connection, video_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, idx, start_s, end_s, title, summary FROM chapters WHERE video_id = $1 ORDER BY idx", video_id)


async def list_segments(conn: asyncpg.Connection, video_id: int, *, limit: int | None = None,
                        offset: int = 0) -> list[asyncpg.Record]:
    """The video's cues in order (all of them without `limit`)."""
    return await conn.fetch(
        "SELECT idx, start_s, end_s, text FROM transcript_segments WHERE video_id = $1 ORDER BY idx LIMIT $2 OFFSET $3",
        video_id, limit, offset)


async def delete_video(conn: asyncpg.Connection, redis: Redis, course_id: int, video_id: int) -> bool:
    """Delete the video (its chunks, progress… cascade) in a transaction of its own, with the `course_completed`
    XP of learners for whom it was the last video left to finish; False when the course is gone. The course row
    is locked first and exclusively: racing the course's deletion, this waits and finds the course gone (instead
    of holding the video row that deletion's cascade needs while waiting for the course row itself, a deadlock),
    and a progress report (which takes the course row FOR SHARE) is either done before or sees the video gone: a
    learner finishing the one other video meanwhile completes the course either way."""
    async with xp.transaction(conn, redis) as tx:
        # NO KEY UPDATE: exclusive against reports' SHARE, but not against the KEY SHARE every insert of a row of
        # the course takes (a re-ingest's job, a submission), which FOR UPDATE deadlocked with
        if await conn.fetchval("SELECT 1 FROM courses WHERE id = $1 FOR NO KEY UPDATE", course_id) is None:
            return False
        await conn.execute("DELETE FROM videos WHERE id = $1 AND course_id = $2", video_id, course_id, timeout=LONG_S)
        # a citation is a moment of a video: pointing at a deleted one, it would send learners to a 404
        await conn.execute("""UPDATE assignments SET citation = NULL, updated_at = now()
                              WHERE course_id = $1 AND (citation ->> 'video_id')::bigint = $2""",
                           course_id, video_id)
        # and so is a grade's advice to rewatch a moment (it kept linking to the deleted video, and its sentence
        # naming the moment stayed, in the grade and in the one a learner sees during a regrade)
        # (locked: a grade or regrade committing meanwhile is not written over with the feedback read here)
        for r in await conn.fetch("""SELECT id, feedback, released FROM submissions
                                     WHERE course_id = $1 AND ((feedback -> 'rewatch' ->> 'video_id')::bigint = $2
                                           OR (released -> 'feedback' -> 'rewatch' ->> 'video_id')::bigint = $2)
                                     ORDER BY id FOR UPDATE""",
                                  course_id, video_id, timeout=LONG_S):
            released = dict(r["released"]) if r["released"] else None
            if released and (released.get("feedback") or {}).get("rewatch", {}).get("video_id") == video_id:
                released["feedback"] = without_rewatch(released["feedback"])
            feedback = r["feedback"]
            if feedback and (feedback.get("rewatch") or {}).get("video_id") == video_id:
                feedback = without_rewatch(feedback)
            await conn.execute("UPDATE submissions SET feedback = $2, released = $3 WHERE id = $1",
                               r["id"], feedback, released)
        await refresh_term_stats(conn, course_id)
        await progress.award_finished_courses(tx, course_id)
    return True
