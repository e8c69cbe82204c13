"""The tutor's checks of learners' replies (table `reply_checks`; agents/helpful.py decides, ingest/replies.py runs).

A learner's message with `reply_to` naming someone else's message gets a `pending` row in the reply's own
transaction (store.messages.post_message), so a crash before the check is queued loses nothing: the worker's
every-minute recovery queues the pending rows again. Each run counts a try; past MAX_TRIES the row is `failed`
with the reason.
"""
from __future__ import annotations

import asyncpg

MAX_TRIES = 4
_COLS = "message_id, room_id, question_id, status, reason, score, tries, created_at, checked_at"


async def claim(conn: asyncpg.Connection, message_id: int) -> asyncpg.Record | None:
    """Count a try of a pending check and return what it needs (the reply, the question, the course, whether
    either was deleted since); None when it is not pending any more."""
    return await conn.fetchrow(
        """WITH c AS (UPDATE reply_checks SET tries = tries + 1 WHERE message_id = $1 AND status = 'pending'
                      RETURNING message_id, room_id, question_id, tries, reason)
           SELECT c.message_id, c.room_id, c.question_id, c.tries, c.reason, r.course_id, m.author_id, m.body AS reply,
                  m.deleted_at IS NOT NULL AS reply_deleted, q.body AS question, q.deleted_at IS NOT NULL AS
                  question_deleted, EXISTS (SELECT 1 FROM helpful_marks h WHERE h.message_id = c.message_id) AS marked
           FROM c JOIN messages m ON m.id = c.message_id JOIN messages q ON q.id = c.question_id
           JOIN rooms r ON r.id = c.room_id""", message_id)


async def record(conn: asyncpg.Connection, message_id: int, status: str, reason: str,
                 score: float | None = None) -> None:
    await conn.execute("UPDATE reply_checks SET status = $2, reason = $3, score = $4, checked_at = now() "
                       "WHERE message_id = $1", message_id, status, reason[:500], score)


async def note_error(conn: asyncpg.Connection, message_id: int, reason: str) -> None:
    """Why the last try of a pending check failed (what `failed` says once the tries are spent)."""
    await conn.execute("UPDATE reply_checks SET reason = $2 WHERE message_id = $1 AND status = 'pending'",
                       message_id, reason[:500])


async def get(conn: asyncpg.Connection, message_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_COLS} FROM reply_checks WHERE message_id = $1", message_id)


async def tutor_marks_since(conn: asyncpg.Connection, author_id: int, hours: float = 24.0) -> int:
    """Helpful marks the tutor gave `author_id` in the last `hours`."""
    return await conn.fetchval(
        "SELECT count(*) FROM helpful_marks WHERE by_tutor AND author_id = $1 "
        "AND marked_at > now() - make_interval(secs => $2)", author_id, hours * 3600.0)


async def answered(conn: asyncpg.Connection, question_id: int, lock: bool = False) -> int | None:
    """The reply to `question_id` the tutor already marked helpful, if any. `lock`: first take the question's row
    (FOR UPDATE), so two checks of replies to one question mark one of them."""
    if lock:
        await conn.execute("SELECT 1 FROM messages WHERE id = $1 FOR UPDATE", question_id)
    return await conn.fetchval("SELECT message_id FROM reply_checks WHERE question_id = $1 AND status = 'helpful' "
                               "LIMIT 1", question_id)


async def stale_pending(conn: asyncpg.Connection, older_than_s: float, limit: int = 200) -> list[asyncpg.Record]:
    """Pending checks created more than `older_than_s` ago (their job lost, or still waiting), oldest first."""
    return await conn.fetch(
        "SELECT message_id, tries FROM reply_checks WHERE status = 'pending' "
        "AND created_at < now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2", older_than_s, limit)
