"""arq jobs: the tutor checks a learner's reply to someone's question and marks it helpful when the course
videos agree with it (agents/helpful.py; rows in `reply_checks`, store/replies.py).

The tutor marks at most one reply per question (the first it accepts) and at most STUDYHALL_TUTOR_HELPFUL_PER_DAY
replies per learner in 24 hours (0: it checks none); a reply past that is `skipped` and staff may still mark it.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq.connections import ArqRedis

from agents.helpful import check_reply
from agents.llm import get_llm
from agents.tutor import Tutor
from ingest.jobs import enqueue
from store import replies
from store.keys import QUICK_QUEUE
from store.progress import HelpfulError, mark_helpful

logger = logging.getLogger(__name__)

CHECK_FUNCTION = "check_reply"
RECOVER_AFTER_S = 120.0  # a pending check this old is queued again (its job lost with Redis, or never queued)


async def enqueue_check(arq: ArqRedis, message_id: int, tries: int = 0) -> None:
    """Queue the check of reply `message_id` (its `pending` row exists). One queue entry per try count: callers
    recovering the same row at once queue one run."""
    await enqueue(arq, CHECK_FUNCTION, message_id, _job_id=f"reply-check-{message_id}-{tries}",
                  _queue_name=QUICK_QUEUE)


async def queue_check(arq: ArqRedis, message_id: int) -> None:
    """`enqueue_check` right after the reply was posted; a failure is logged (the recovery queues it later)."""
    try:
        await enqueue_check(arq, message_id)
    except Exception:  # noqa: BLE001
        logger.warning("could not queue the check of reply %s; the worker's recovery will", message_id, exc_info=True)


class _Taken(Exception):
    """Another reply to the question was marked meanwhile."""


async def check_reply_job(ctx: dict[str, Any], message_id: int) -> str:
    """Check one reply (see the module's docstring); returns its status. A run that fails leaves the row pending
    for the recovery; past store.replies.MAX_TRIES it is `failed` with the reason."""
    pool, redis, settings = ctx["pool"], ctx["redis"], ctx["settings"]
    async with pool.acquire() as conn:
        row = await replies.claim(conn, message_id)
        if row is None:
            return "nothing to do"
        if row["tries"] > replies.MAX_TRIES:
            await replies.record(conn, message_id, "failed", row["reason"]
                                 or f"the check did not finish in {replies.MAX_TRIES} tries")
            return "failed"
        why = None
        if row["reply_deleted"] or row["question_deleted"]:
            why = "the reply or the question was deleted"
        elif settings.tutor_helpful_per_day == 0:
            why = "the tutor does not mark replies (STUDYHALL_TUTOR_HELPFUL_PER_DAY=0)"
        elif await replies.tutor_marks_since(conn, row["author_id"]) >= settings.tutor_helpful_per_day:
            why = (f"the learner reached the tutor's limit of helpful marks in 24 hours "
                   f"({settings.tutor_helpful_per_day}, STUDYHALL_TUTOR_HELPFUL_PER_DAY)")
        elif row["marked"]:
            why = "the reply was already marked helpful"
        elif await replies.answered(conn, row["question_id"]) is not None:
            why = "another reply to this question was already marked helpful"
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
            await replies.record(conn, message_id, check.status, check.reason, check.score)
        return check.status

    async def first_for_question(conn: Any) -> None:  # in the mark's transaction
        if await replies.answered(conn, row["question_id"], lock=True) is not None:
            raise _Taken
        await replies.record(conn, message_id, "helpful", check.reason, check.score)

    try:
        _, created = await mark_helpful(pool, redis, row["room_id"], message_id, None, reason=check.reason,
                                        also=first_for_question)
    except _Taken:
        async with pool.acquire() as conn:
            await replies.record(conn, message_id, "skipped", "another reply to this question was already marked helpful")
        return "skipped"
    except HelpfulError as exc:  # deleted meanwhile, or its author is no longer a learner
        async with pool.acquire() as conn:
            await replies.record(conn, message_id, "skipped", str(exc))
        return "skipped"
    if not created:  # staff marked it meanwhile
        async with pool.acquire() as conn:
            await replies.record(conn, message_id, "skipped", "the reply was already marked helpful")
        return "skipped"
    logger.info("the tutor marked reply %s helpful (%s)", message_id, check.checker)
    return "helpful"


async def recover_reply_checks(ctx: dict[str, Any]) -> int:
    """Every minute: queue again the checks pending for RECOVER_AFTER_S (lost with Redis, a worker killed)."""
    async with ctx["pool"].acquire() as conn:
        rows = await replies.stale_pending(conn, RECOVER_AFTER_S)
    for r in rows:
        await enqueue_check(ctx["redis"], r["message_id"], r["tries"])
    if rows:
        logger.info("re-queued %d pending reply checks", len(rows))
    return len(rows)
