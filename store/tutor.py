"""Tutor sessions, answered turns (with accounting), feedback, the answer cache and per-day limits."""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from datetime import date
from typing import Any

import asyncpg

# Columns by name, never `*`: a statement asyncpg cached before a migration added a column would change its row
# type, which inside a transaction fails (InvalidCachedStatementError) on every process still running old code.
_SESSION_COLS = "id, course_id, user_id, title, created_at, updated_at"
_PENDING_COLS = "id, proc, user_id, course_id, room_id, message_id, reserved, turn_id, created_at, slot"
_TURN_COLS = """id, course_id, user_id, session_id, room_id, message_id, question, standalone, answer, grounded,
                citations, follow_ups, nearest, mode, provider, model, input_tokens, output_tokens, latency_ms, cost_usd,
                cache_hit, error, created_at"""


def normalize_question(text: str) -> str:
    """Case, spacing and the closing punctuation do not make another question; symbols inside it do
    ("x^2" is not "x*2", "P != NP" is not "P = NP"), nor does how an accent is encoded (NFC) or a full-width
    question mark."""
    return " ".join(unicodedata.normalize("NFC", text).lower().split()).rstrip("?!. ？！。")


def question_hash(text: str, names: Sequence[str] = ()) -> str:
    """`names`: what the judge takes for names in the question as typed (agents.judge.candidates): case does
    make another question where it makes a name ("RoPE" is a name the course may never say, "rope" a word)."""
    return hashlib.sha256((normalize_question(text) + "|" + "\x1f".join(names)).encode()).hexdigest()


# The course's content version (course id $1), as SQL: statements compare it within their own snapshot. The sum, not
# the max, of the update times: a transaction that began before another's yet commits after it writes an earlier
# now(), which would leave the max unchanged.
_VERSION = """(SELECT count(*) || ':' || coalesce(sum(id), 0) || ':' || coalesce(sum(extract(epoch FROM updated_at)), 0)
               FROM videos WHERE course_id = $1)"""


async def content_version(conn: asyncpg.Connection, course_id: int) -> str:
    """Changes whenever a video of the course is added, re-ingested, re-embedded or removed."""
    return await conn.fetchval(f"SELECT {_VERSION}", course_id)


async def create_session(conn: asyncpg.Connection, course_id: int, user_id: int, title: str) -> asyncpg.Record:
    return await conn.fetchrow(
        f"INSERT INTO tutor_sessions (course_id, user_id, title) VALUES ($1, $2, $3) RETURNING {_SESSION_COLS}",
        course_id, user_id, " ".join(title.split())[:200])  # one line (the question may have tabs and line breaks)


async def get_session(conn: asyncpg.Connection, session_id: int, user_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_SESSION_COLS} FROM tutor_sessions WHERE id = $1 AND user_id = $2",
                               session_id, user_id)


async def list_sessions(conn: asyncpg.Connection, user_id: int, course_id: int, *,
                        limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""SELECT {_SESSION_COLS} FROM tutor_sessions WHERE user_id = $1 AND course_id = $2
           ORDER BY updated_at DESC, id DESC
           LIMIT $3 OFFSET $4""", user_id, course_id, limit, offset)


async def delete_session(conn: asyncpg.Connection, session_id: int, user_id: int) -> bool:
    """Delete the learner's session and the text of its turns; their accounting (provider, tokens, cost,
    latency) and feedback stay, unlinked, for the course's statistics."""
    async with conn.transaction():
        if await conn.fetchval("SELECT id FROM tutor_sessions WHERE id = $1 AND user_id = $2 FOR UPDATE",
                               session_id, user_id) is None:
            return False
        await conn.execute("DELETE FROM tutor_cache WHERE turn_id IN (SELECT id FROM tutor_turns WHERE session_id = $1)",
                           session_id)
        await conn.execute("""UPDATE tutor_turns SET question = '', standalone = '', answer = '', citations = '[]',
                                     follow_ups = '[]', nearest = '[]' WHERE session_id = $1""", session_id)
        await conn.execute("DELETE FROM tutor_sessions WHERE id = $1", session_id)
    return True


async def session_turns(conn: asyncpg.Connection, session_id: int, limit: int = 200,
                        before: int | None = None) -> list[asyncpg.Record]:
    """The session's latest `limit` turns (before turn `before`, when given), oldest first."""
    rows = await conn.fetch(f"SELECT {_TURN_COLS} FROM tutor_turns WHERE session_id = $1 "
                            "AND ($3::bigint IS NULL OR id < $3) ORDER BY id DESC LIMIT $2", session_id, limit, before)
    return rows[::-1]


async def record_turn(conn: asyncpg.Connection, **fields: Any) -> asyncpg.Record:
    cols = list(fields)
    row = await conn.fetchrow(
        f"INSERT INTO tutor_turns ({', '.join(cols)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(cols)))}) "
        f"RETURNING {_TURN_COLS}",
        *fields.values(),
    )
    if fields.get("session_id"):
        await conn.execute("UPDATE tutor_sessions SET updated_at = now() WHERE id = $1", fields["session_id"])
    return row


async def get_turn(conn: asyncpg.Connection, turn_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_TURN_COLS} FROM tutor_turns WHERE id = $1", turn_id)


async def reserve_turn(conn: asyncpg.Connection, user_id: int, limit: int, pending: int | None = None) -> date | None:
    """Take one of today's (UTC) `limit` questions for the user, atomically; the day it counts on, or None when
    none is left. Concurrent calls never pass the limit together. With `pending` (a `hold`), the hold records
    the day in the same statement, so a process that dies mid-answer leaves the question to give back."""
    if limit <= 0:
        return None
    # with a hold, only while it stands (locked, as a course's deletion locks its holds before giving their questions
    # back): one its course's deletion took is no answer any more, and a question taken for it was lost
    return await conn.fetchval(
        """WITH p AS (SELECT id FROM tutor_pending WHERE id = $3 FOR UPDATE),
           q AS (
               INSERT INTO tutor_quota AS q (user_id, day, used)
               SELECT $1, (now() AT TIME ZONE 'UTC')::date, 1 WHERE $3::bigint IS NULL OR EXISTS (SELECT 1 FROM p)
               ON CONFLICT (user_id, day) DO UPDATE SET used = q.used + 1 WHERE q.used < $2
               RETURNING day
           ), h AS (
               UPDATE tutor_pending SET reserved = (SELECT day FROM q) WHERE id = $3 AND EXISTS (SELECT 1 FROM q)
           )
           SELECT day FROM q""", user_id, limit, pending)


async def used_today(conn: asyncpg.Connection, user_id: int) -> int:
    """Questions the learner has taken from today's (UTC) quota."""
    return await conn.fetchval(
        "SELECT coalesce((SELECT used FROM tutor_quota WHERE user_id = $1 AND day = (now() AT TIME ZONE 'UTC')::date), 0)",
        user_id)


async def release_turn(conn: asyncpg.Connection, user_id: int, day: date, pending: int | None = None) -> bool:
    """Give back a question reserved for an answer that never came (an internal failure). With `pending`, only
    while that hold still holds it (it is cleared in the same statement): a question is given back once, by
    whichever of the answering process or a survivor comes first. True when it was given back."""
    return bool(await conn.fetchval(
        """WITH h AS (UPDATE tutor_pending SET reserved = NULL WHERE id = $3 AND reserved IS NOT NULL RETURNING 1),
                q AS (UPDATE tutor_quota SET used = used - 1
                      WHERE user_id = $1 AND day = $2 AND used > 0 AND ($3::bigint IS NULL OR EXISTS (SELECT 1 FROM h))
                      RETURNING 1)
           SELECT count(*) FROM q""",
        user_id, day, pending))


# --- answers under way (tutor_pending): what a dead process leaves to its survivors ---------------------------

async def hold(conn: asyncpg.Connection, proc: str, user_id: int, course_id: int, room_id: str | None = None,
               message_id: int | None = None, slot: str | None = None) -> int:
    """Record an answer that `proc` is about to give, with the learner's answer slot it holds; `drop_hold` when it
    has been delivered."""
    return await conn.fetchval(
        """INSERT INTO tutor_pending (proc, user_id, course_id, room_id, message_id, slot)
           VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""", proc, user_id, course_id, room_id, message_id, slot or None)


async def question_withdrawn(conn: asyncpg.Connection, course_id: int, pending: int) -> bool:
    """In the transaction recording an answer to a room question: whether the question was deleted meanwhile. Its
    message is held (FOR SHARE) until the record commits, so a deletion coming now waits and then finds the turn to
    clear (read without a lock, one committing meanwhile found no turn, and the question's text stayed). The course
    row is taken first, as every path locking a course's rows does (the turn's foreign key takes it after the
    message otherwise, and a course being deleted, holding it and waiting for the message, deadlocked)."""
    await conn.execute("SELECT 1 FROM courses WHERE id = $1 FOR KEY SHARE", course_id)
    return bool(await conn.fetchval(
        """SELECT m.deleted_at IS NOT NULL FROM tutor_pending p JOIN messages m ON m.id = p.message_id
           WHERE p.id = $1 FOR SHARE OF m""", pending))


async def hold_answered(conn: asyncpg.Connection, pending: int, turn_id: int) -> None:
    """The answer is recorded (its quota question is spent): all that is left is to post it in the room."""
    await conn.execute("UPDATE tutor_pending SET reserved = NULL, turn_id = $2 WHERE id = $1", pending, turn_id)


async def drop_hold(conn: asyncpg.Connection, pending: int) -> None:
    await conn.execute("DELETE FROM tutor_pending WHERE id = $1", pending)


async def holders(conn: asyncpg.Connection, own: str) -> list[asyncpg.Record]:
    """Processes holding answers: (proc, age_s of their oldest hold); `own` (the caller's) first when it holds
    any, then up to 50 others."""
    return await conn.fetch(
        """SELECT proc, extract(epoch FROM now() - min(created_at))::float8 AS age_s FROM tutor_pending
           GROUP BY proc ORDER BY proc = $1 DESC LIMIT 51""", own)


async def claim_holds(conn: asyncpg.Connection, procs: list[str], limit: int = 50,
                      older_than_s: float = 0.0) -> list[asyncpg.Record]:
    """Lock up to `limit` holds of dead processes (in the caller's transaction; others skip them), only those
    older than `older_than_s`; their courses' keys first (a reply posted for one takes its course's key, on another
    connection, while these are held: a course deletion, which takes the course, then its holds, hung with it until
    the pool's timeout), skipping the holds of a course being deleted (they go with it, their questions given back
    by the deletion) rather than waiting for it."""
    courses = [r["id"] for r in await conn.fetch(
        """SELECT id FROM courses WHERE id IN (SELECT course_id FROM tutor_pending WHERE proc = ANY($1::text[])
                                                   AND created_at < now() - make_interval(secs => $2))
           ORDER BY id FOR KEY SHARE SKIP LOCKED""", procs, older_than_s)]
    return await conn.fetch(
        f"""SELECT {_PENDING_COLS} FROM tutor_pending WHERE proc = ANY($1::text[])
               AND created_at < now() - make_interval(secs => $3) AND course_id = ANY($4::bigint[])
           ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED""",
        procs, limit, older_than_s, courses)


async def cached_turn(conn: asyncpg.Connection, course_id: int, version: str, mode: str,
                      qhash: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""SELECT {', '.join('t.' + c.strip() for c in _TURN_COLS.split(','))} FROM tutor_cache k
            JOIN tutor_turns t ON t.id = k.turn_id
            WHERE k.course_id = $1 AND k.content_version = $2 AND k.mode = $3 AND k.qhash = $4""",
        course_id, version, mode, qhash)


async def remember(conn: asyncpg.Connection, course_id: int, version: str, mode: str, qhash: str,
                   turn_id: int) -> bool:
    """Cache the answer under the content `version` it was made from, and drop the entries of other versions (they
    can never hit again); unless the course's videos changed since that version was read: the answer is then not
    cached, and the entries of the newer content stay (a slow answer of the old content deleted them all)."""
    # each statement compares the version in its own snapshot: entries of newer content committed before it mean the
    # version it reads is newer too (nothing is done), and those committed after it it does not see
    current = await conn.fetchval(
        f"""WITH same AS (SELECT {_VERSION} = $2 AS yes)
            INSERT INTO tutor_cache (course_id, content_version, mode, qhash, turn_id)
            SELECT $1, $2, $3, $4, $5 FROM same WHERE yes ON CONFLICT DO NOTHING RETURNING true""",
        course_id, version, mode, qhash, turn_id)
    await conn.execute(f"DELETE FROM tutor_cache WHERE course_id = $1 AND content_version <> $2 AND {_VERSION} = $2",
                       course_id, version)
    return bool(current)


async def set_feedback(conn: asyncpg.Connection, turn_id: int, user_id: int, vote: int, comment: str) -> None:
    await conn.execute(
        """INSERT INTO tutor_feedback (turn_id, user_id, vote, comment) VALUES ($1, $2, $3, $4)
           ON CONFLICT (turn_id, user_id) DO UPDATE SET vote = EXCLUDED.vote, comment = EXCLUDED.comment,
                                                       created_at = now()""",
        turn_id, user_id, vote, comment)


async def tutor_mode(conn: asyncpg.Connection, course_id: int, room_id: str | None = None) -> str:
    """The mode in effect: the room's own when it has one, else the course's ('answer', 'socratic', or with 'auto'
    Socratic while the course has an open assignment)."""
    if room_id is not None:
        mode = await conn.fetchval("SELECT mode FROM room_tutor_settings WHERE room_id = $1", room_id)
        if mode:
            return mode
    return await conn.fetchval(
        """SELECT CASE WHEN c.tutor_mode <> 'auto' THEN c.tutor_mode
                       WHEN EXISTS (SELECT 1 FROM assignments a WHERE a.course_id = c.id AND a.status = 'published'
                                    AND (a.opens_at IS NULL OR a.opens_at <= now())
                                    AND (a.closes_at IS NULL OR a.closes_at > now())) THEN 'socratic'
                       ELSE 'answer' END
           FROM courses c WHERE c.id = $1""",
        course_id) or "answer"
