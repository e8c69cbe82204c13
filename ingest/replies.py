"""arq jobs: the tutor checks a learner's reply to someone's question and marks it helpful when the course
videos agree with it (agents/helpful.py; rows in `reply_checks`, store/replies.py).

Limits (a reply past one is `skipped`, with the reason; staff may still mark it):
- one reply per question is marked (the first the tutor accepts), and one reply per learner and question is checked;
- a question asked to the tutor (`@tutor`, `tutor.ask`) is not: the tutor answers it itself;
- per learner in 24 hours: STUDYHALL_TUTOR_HELPFUL_PER_DAY marks (0: the tutor checks nothing), PAIR_LIMIT of them
  for replies to one person, and CHECKS_PER_MARK times that many checks (each is a search, perhaps a paid model call).
The last checks before a mark run in the mark's own transaction, under locks: the check's row, the learner's limits,
the reply (unchanged since it was checked) and the question (not deleted; no other reply marked).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq.connections import ArqRedis

from agents.helpful import Check, check_reply
from agents.llm import get_llm
from agents.tutor import Tutor
from ingest.jobs import enqueue
from store import moderation, replies, rooms
from store.keys import QUICK_QUEUE
from store.progress import HelpfulError, mark_helpful

logger = logging.getLogger(__name__)

CHECK_FUNCTION = "check_reply"
# A run is stopped after this (a model answering slowly, a search that hangs): before the recovery, RECOVER_AFTER_S
# after the try began, starts another, so two runs of one check never overlap for long.
CHECK_TIMEOUT_S = 0.8 * replies.RECOVER_AFTER_S
PAIR_LIMIT = 2  # tutor marks a day for one learner's replies to one other person (two accounts feeding each other)
CHECKS_PER_MARK = 4  # replies of a learner checked a day, per mark the limit allows
_MENTION = "@tutor"
ALREADY_MARKED = "the reply was already marked helpful"


async def enqueue_check(arq: ArqRedis, message_id: int, job_id: str | None = None) -> None:
    """Queue the check of reply `message_id` (its `pending` row exists)."""
    await enqueue(arq, CHECK_FUNCTION, message_id, _job_id=job_id or f"reply-check-{message_id}",
                  _queue_name=QUICK_QUEUE)


async def queue_check(arq: ArqRedis, message_id: int) -> None:
    """`enqueue_check` right after the reply was posted; a failure is logged (the recovery queues it later)."""
    try:
        await enqueue_check(arq, message_id)
    except Exception:  # noqa: BLE001
        logger.warning("could not queue the check of reply %s; the worker's recovery will", message_id, exc_info=True)


class _Skip(Exception):
    """The mark does not happen; `reason` (None: another run of this check gave its verdict first)."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason


async def _limit(conn: Any, row: Any, per_day: int, besides: int | None = None) -> str | None:
    """Which of the learner's daily limits on marks a mark now would pass, if any."""
    if await replies.tutor_marks_since(conn, row["author_id"], besides=besides) >= per_day:
        return (f"the learner reached the tutor's limit of helpful marks in 24 hours ({per_day}, "
                "STUDYHALL_TUTOR_HELPFUL_PER_DAY)")
    if row["asker_id"] is not None and await replies.tutor_marks_since(
            conn, row["author_id"], asker_id=row["asker_id"], besides=besides,
            asker_relay=row["asker_relay"]) >= PAIR_LIMIT:
        return f"the tutor marks at most {PAIR_LIMIT} of a learner's replies to one person in 24 hours"
    return None


async def _before_checking(conn: Any, row: Any, settings: Any) -> str | None:
    """Why the reply is not checked at all (None: it is)."""
    per_day = settings.tutor_helpful_per_day
    if row["reply_deleted"] or row["question_deleted"]:
        return "the reply or the question was deleted"
    if per_day == 0:
        return "the tutor does not mark replies (STUDYHALL_TUTOR_HELPFUL_PER_DAY=0)"
    if row["marked"]:
        return ALREADY_MARKED
    if row["asked_tutor"] or _MENTION in row["question"].lower():
        return "the question was asked to the tutor, which answers it itself"
    if await replies.checked_before(conn, row["question_id"], row["author_id"], row["message_id"]):
        return "another reply of the learner to this question was checked already"
    if await replies.checks_since(conn, row["author_id"], besides=row["message_id"]) >= CHECKS_PER_MARK * per_day:
        return f"the tutor checks at most {CHECKS_PER_MARK * per_day} replies of a learner in 24 hours"
    if await replies.answered(conn, row["question_id"]) is not None:
        return "another reply to this question was already marked helpful"
    return await _limit(conn, row, per_day)


async def check_reply_job(ctx: dict[str, Any], message_id: int) -> str:
    """Check one reply (see the module's docstring); returns its status. A run that fails leaves the row pending
    for the recovery; past store.replies.MAX_TRIES it is `failed` with the reason."""
    pool, redis, settings = ctx["pool"], ctx["redis"], ctx["settings"]
    # the claim and the gates in one transaction under the learner's lock: replies of theirs claimed at once are
    # counted one after the other (a claimed check counts as checked), so four rewordings sent together get one try
    async with pool.acquire() as conn, conn.transaction():
        row = await replies.claim(conn, message_id)
        if row is None:
            return "nothing to do"
        await _lock_learner(conn, row["author_id"])
        if row["tries"] > replies.MAX_TRIES:
            await replies.record(conn, message_id, "failed", row["reason"]
                                 or f"the check did not finish in {replies.MAX_TRIES} tries")
            return "failed"
        why = await _before_checking(conn, row, settings)
        if why is not None:
            await replies.record(conn, message_id, "skipped", why)
            return "skipped"
    try:
        embedder = await asyncio.to_thread(ctx["embedder"])
        tutor = ctx.get("reply_tutor")
        if tutor is None or tutor.embedder is not embedder:  # (its graph is built once per worker)
            tutor = ctx["reply_tutor"] = Tutor(pool, embedder, None)
        check = await check_reply(tutor, embedder, get_llm(settings), row["course_id"], row["question"], row["reply"])
    except Exception as exc:  # pending still: the recovery runs it again; the reason stays for the last try
        logger.exception("checking reply %s failed; it is tried again later", message_id)
        async with pool.acquire() as conn:
            await replies.note_error(conn, message_id, f"the check failed: {type(exc).__name__}: {exc}")
        raise
    if not check.helpful:
        async with pool.acquire() as conn:
            await replies.record(conn, message_id, check.status, check.reason, check.score, check.checker)
        return check.status
    return await _mark(pool, redis, row, check, settings.tutor_helpful_per_day)


async def _lock_learner(conn: Any, author_id: int) -> None:
    """The learner's limits, one claim or mark at a time (taken after the check's own row, as everywhere)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('studyhall:reply-marks:' || $1::bigint, 0))",
                       author_id)


async def _mark(pool: Any, redis: Any, row: Any, check: Check, per_day: int) -> str:
    message_id = row["message_id"]

    async def last_checks(conn: Any) -> None:  # in the mark's transaction, before it writes anything
        # Locks in the order a delete of the course, the room or a message takes them (course, room, messages, then
        # what hangs off them: this check's row), so a delete waits or goes first but never deadlocks with a mark.
        # KEY SHARE on the course and room lets posts go on.
        if await conn.fetchval("SELECT 1 FROM courses WHERE id = $1 FOR KEY SHARE", row["course_id"]) is None or \
                await conn.fetchval("SELECT 1 FROM rooms WHERE id = $1 FOR KEY SHARE", row["room_id"]) is None:
            raise _Skip("the room was deleted while the reply was checked")
        reply = await conn.fetchrow("SELECT body, deleted_at FROM messages WHERE id = $1 FOR NO KEY UPDATE",
                                    message_id)
        if reply is None or reply["deleted_at"] is not None or reply["body"] != row["reply"]:
            raise _Skip("the reply was edited or deleted while it was checked")
        # (the question's row: two replies to it marked at once, one waits for the other)
        question = await conn.fetchrow("SELECT body, deleted_at FROM messages WHERE id = $1 FOR NO KEY UPDATE",
                                       row["question_id"])
        if question is None or question["deleted_at"] is not None or question["body"] != row["question"]:
            raise _Skip("the question was edited or deleted while the reply was checked")
        status = await conn.fetchval("SELECT status FROM reply_checks WHERE message_id = $1 FOR UPDATE", message_id)
        if status != "pending":
            raise _Skip(None)
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM helpful_marks WHERE message_id = $1)", message_id):
            raise _Skip(ALREADY_MARKED)  # by staff while it was checked
        await _lock_learner(conn, row["author_id"])
        if await replies.answered(conn, row["question_id"]) is not None:
            raise _Skip("another reply to this question was already marked helpful")
        where = rooms.parse_room(row["room_id"])
        if (where is None or not await rooms.allowed(conn, where, row["author_id"])
                or await moderation.kicked_until(conn, row["room_id"], row["author_id"]) is not None):
            raise _Skip("the learner left the room, or was barred from it, while the reply was checked")
        if (why := await _limit(conn, row, per_day, besides=message_id)) is not None:
            raise _Skip(why)
        await replies.record(conn, message_id, "helpful", check.reason, check.score, check.checker)

    try:
        _, created = await mark_helpful(pool, redis, row["room_id"], message_id, None, reason=check.reason,
                                        first=last_checks)
    except (_Skip, HelpfulError) as exc:  # HelpfulError: deleted meanwhile, or its author is no longer a learner
        reason = exc.reason if isinstance(exc, _Skip) else str(exc)
        if reason is None:
            return "nothing to do"
        async with pool.acquire() as conn:
            await replies.record(conn, message_id, "skipped", reason)
        return "skipped"
    if not created:  # staff's mark committed between the look above and the tutor's: theirs stands, not a second
        async with pool.acquire() as conn:
            await replies.overrule(conn, message_id, "skipped", ALREADY_MARKED)
        return "skipped"
    logger.info("the tutor marked reply %s helpful (%s)", message_id, check.checker)
    return "helpful"


async def recover_reply_checks(ctx: dict[str, Any]) -> int:
    """Every minute: queue again the checks pending for store.replies.RECOVER_AFTER_S since their last try began
    (lost with Redis, a worker killed, a server that died before queueing). A second run of a check still under
    way gives no second verdict (store.replies.record)."""
    async with ctx["pool"].acquire() as conn:
        rows = await replies.stale_pending(conn, replies.RECOVER_AFTER_S)
    window = int(time.time() // replies.RECOVER_AFTER_S)  # a new queue entry per window (arq keeps an id an hour)
    for r in rows:
        await enqueue_check(ctx["redis"], r["message_id"], f"reply-check-{r['message_id']}-{r['tries']}-{window}")
    if rows:
        logger.info("re-queued %d pending reply checks", len(rows))
    return len(rows)
