"""The tutor's checks of learners' replies (table `reply_checks`; agents/helpful.py decides, ingest/replies.py runs).

A learner's message with `reply_to` naming someone else's message gets a `pending` row in the reply's own
transaction (store.messages.post_message), so a crash before the check is queued loses nothing: the worker's
every-minute recovery queues the rows pending since their last try began RECOVER_AFTER_S ago. Each run counts a
try; past MAX_TRIES the row is `failed` with the reason. A verdict is written once: only over a row still pending,
so a second run of the same check (a recovery while the first still ran) changes nothing.
"""
from __future__ import annotations

import asyncpg

MAX_TRIES = 4
RECOVER_AFTER_S = 300.0  # a check pending this long after its last try began goes again (a model may take minutes)
_COLS = "message_id, room_id, question_id, author_id, status, reason, score, checker, tries, created_at, checked_at"


async def claim(conn: asyncpg.Connection, message_id: int) -> asyncpg.Record | None:
    """Count a try of a pending check and return what it needs (the reply, the question and who asked it, the
    course, whether either was deleted, whether the reply is marked already); None when it is not pending."""
    return await conn.fetchrow(
        """WITH c AS (UPDATE reply_checks SET tries = tries + 1, claimed_at = now()
                      WHERE message_id = $1 AND status = 'pending'
                      RETURNING message_id, room_id, question_id, author_id, tries, reason)
           SELECT c.message_id, c.room_id, c.question_id, c.author_id, c.tries, c.reason, r.course_id,
                  m.body AS reply, m.deleted_at IS NOT NULL AS reply_deleted,
                  q.body AS question, q.deleted_at IS NOT NULL AS question_deleted, q.author_id AS asker_id,
                  q.meta -> 'relay' ->> 'id' AS asker_relay,
                  coalesce((q.meta ->> 'tutor_ask')::boolean, false) AS asked_tutor,
                  EXISTS (SELECT 1 FROM helpful_marks h WHERE h.message_id = c.message_id) AS marked
           FROM c JOIN messages m ON m.id = c.message_id JOIN messages q ON q.id = c.question_id
           JOIN rooms r ON r.id = c.room_id""", message_id)


async def record(conn: asyncpg.Connection, message_id: int, status: str, reason: str, score: float | None = None,
                 checker: str | None = None) -> bool:
    """The verdict, over a check still pending (False: another run of it gave one first)."""
    return await conn.fetchval(
        "UPDATE reply_checks SET status = $2, reason = $3, score = $4, checker = $5, checked_at = now() "
        "WHERE message_id = $1 AND status = 'pending' RETURNING true", message_id, status, reason[:500], score,
        checker) is not None


async def overrule(conn: asyncpg.Connection, message_id: int, status: str, reason: str) -> None:
    """Replace a verdict already given (the tutor's `helpful`, when staff's mark of the reply came first)."""
    await conn.execute("UPDATE reply_checks SET status = $2, reason = $3, checked_at = now() WHERE message_id = $1",
                       message_id, status, reason[:500])


async def note_error(conn: asyncpg.Connection, message_id: int, reason: str) -> None:
    """Why the last try of a pending check failed (what `failed` says once the tries are spent)."""
    await conn.execute("UPDATE reply_checks SET reason = $2 WHERE message_id = $1 AND status = 'pending'",
                       message_id, reason[:500])


async def get(conn: asyncpg.Connection, message_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_COLS} FROM reply_checks WHERE message_id = $1", message_id)


# The reason a check gets when staff remove the tutor's mark of the reply (store.progress.unmark_helpful), and when
# they remove their own mark while the tutor's check was still to run.
STAFF_REMOVED = "staff removed the tutor's mark"
STAFF_REMOVED_OWN = "staff marked this reply helpful, then removed the mark"


async def tutor_marks_since(conn: asyncpg.Connection, author_id: int, hours: float = 24.0,
                            asker_id: int | None = None, besides: int | None = None,
                            asker_relay: str | None = None) -> int:
    """Helpful marks the tutor gave `author_id` in the last `hours` (with `asker_id`: for replies to that person's
    messages; for a bot, to those it relayed for `asker_relay`, each relayed person being one), not counting message
    `besides`. Marks staff removed since count too (from their removal): removing the marks two accounts farmed must
    not free their limits for more."""
    return await conn.fetchval(
        """SELECT (SELECT count(*) FROM helpful_marks h
                   WHERE h.by_tutor AND h.author_id = $1 AND h.marked_at > now() - make_interval(secs => $2)
                     AND h.message_id IS DISTINCT FROM $4
                     AND ($3::bigint IS NULL OR EXISTS (
                         SELECT 1 FROM reply_checks c JOIN messages q ON q.id = c.question_id
                         WHERE c.message_id = h.message_id AND q.author_id = $3
                           AND q.meta -> 'relay' ->> 'id' IS NOT DISTINCT FROM $6)))
                + (SELECT count(*) FROM reply_checks c JOIN messages q ON q.id = c.question_id
                   WHERE c.author_id = $1 AND c.status = 'not_helpful' AND c.reason = $5
                     AND c.checked_at > now() - make_interval(secs => $2) AND c.message_id IS DISTINCT FROM $4
                     AND ($3::bigint IS NULL
                          OR q.author_id = $3 AND q.meta -> 'relay' ->> 'id' IS NOT DISTINCT FROM $6))""",
        author_id, hours * 3600.0, asker_id, besides, STAFF_REMOVED, asker_relay)


# The reason of a check that searched the videos and found the question not covered (agents.helpful).
NOT_COVERED = "the course videos do not cover the question, so the reply cannot be checked"
# A check counts as run once it gave a verdict on what the reply said, or once a try of it began (it may be running),
# or once it searched the videos and found the question not covered (a tester's 21 such replies, each a search, did
# not count, and a 24th check followed; a skip before any search, "the message replied to does not ask anything",
# still does not count: review).
_RAN = ("(status IN ('helpful', 'not_helpful') OR (status = 'pending' AND tries > 0)"
        f" OR (status = 'skipped' AND reason = '{NOT_COVERED}'))")


async def checks_since(conn: asyncpg.Connection, author_id: int, hours: float = 24.0,
                       besides: int | None = None) -> int:
    """Checks of `author_id`'s replies run in the last `hours` (but `besides`)."""
    return await conn.fetchval(
        f"SELECT count(*) FROM reply_checks WHERE author_id = $1 AND {_RAN} AND message_id IS DISTINCT FROM $3 "
        "AND coalesce(checked_at, claimed_at) > now() - make_interval(secs => $2)", author_id, hours * 3600.0, besides)


async def checked_before(conn: asyncpg.Connection, question_id: int, author_id: int, message_id: int) -> bool:
    """Whether another reply of `author_id` to `question_id` was checked already (one per learner and question)."""
    return await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM reply_checks WHERE question_id = $1 AND author_id = $2 AND message_id <> $3 "
        f"AND {_RAN})", question_id, author_id, message_id)


async def answered(conn: asyncpg.Connection, question_id: int) -> int | None:
    """The reply to `question_id` the tutor already marked helpful, if any."""
    return await conn.fetchval("SELECT message_id FROM reply_checks WHERE question_id = $1 AND status = 'helpful' "
                               "LIMIT 1", question_id)


async def stale_pending(conn: asyncpg.Connection, older_than_s: float, limit: int = 200) -> list[asyncpg.Record]:
    """Pending checks whose last try (or creation) began more than `older_than_s` ago, oldest first."""
    return await conn.fetch(
        "SELECT message_id, tries FROM reply_checks WHERE status = 'pending' "
        "AND coalesce(claimed_at, created_at) < now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2",
        older_than_s, limit)
