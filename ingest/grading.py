"""arq jobs that grade written submissions with the grader graph (agents/grader.py).

Postgres holds the truth (the submission's status); arq only carries "grade submission N now". A job that
finds its submission no longer `grading` does nothing, so duplicate runs leave one grade. Lost queue
entries (a Redis flush, a worker killed mid-job) are re-queued by `recover_grading`.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
import zlib
from typing import Any

import asyncpg
from arq import Retry
from arq.connections import ArqRedis

from agents import grader, scoring
from agents.llm import LLMError, get_llm
from ingest.jobs import backoff_s, enqueue, give_back_if_stopping, heartbeat, release_unbeaten
from store import assignments as assignments_repo
from store import jobs as jobs_repo
from store import submissions as subs_repo
from store.db import UNREACHABLE
from store.keys import QUEUES, QUICK_QUEUE
from store.search import hybrid_search

logger = logging.getLogger(__name__)

GRADE_FUNCTION = "grade_submission"
BATCH_FUNCTION = "grade_batch"
BATCH_SIZE = 25
MAX_TRIES = 4
FAILED_PREFIX = "automatic grading "  # every reason `_hold_failed` gives starts so ("…failed: …", "…did not finish…")


async def enqueue_grade(arq: ArqRedis, pool: Any, submission_id: int, arq_id: str | None = None) -> str:
    """Queue the grading of one submission (already `grading`) and remember the arq id on it. arq queues an id
    once: callers passing the same `arq_id` start one run."""
    arq_id = arq_id or f"grade-{submission_id}-{uuid.uuid4().hex[:8]}"
    async with pool.acquire() as conn:
        await conn.execute("UPDATE submissions SET grade_job = $2 WHERE id = $1", submission_id, arq_id)
    await enqueue(arq, GRADE_FUNCTION, submission_id, _job_id=arq_id, _queue_name=QUICK_QUEUE)
    return arq_id


async def enqueue_batches(arq: ArqRedis, pool: Any, job_id: int, submission_ids: list[int]) -> int:
    """Grade many submissions as batched jobs of BATCH_SIZE; progress goes to jobs row `job_id`."""
    batches = [submission_ids[i:i + BATCH_SIZE] for i in range(0, len(submission_ids), BATCH_SIZE)]
    for n, batch in enumerate(batches):
        arq_id = f"grade-batch-{job_id}-{n}-{uuid.uuid4().hex[:6]}"
        async with pool.acquire() as conn:
            await conn.execute("UPDATE submissions SET grade_job = $2 WHERE id = ANY($1::bigint[])", batch, arq_id)
        await enqueue(arq, BATCH_FUNCTION, job_id, batch, _job_id=arq_id, _queue_name=QUICK_QUEUE)
    return len(batches)


# Postgres or Redis out of reach (a restart): the job goes again shortly, not failed for the every-minute recovery to
# find (its learners waited minutes more for their grades after an outage).
UNREACHABLE_RETRY_S = 5.0


async def grade_submission(ctx: dict[str, Any], submission_id: int) -> str:
    """Grade one written submission; transient failures retry with backoff. A worker dying mid-grade hands
    it to another within the heartbeat TTL."""
    async with heartbeat(ctx):
        try:
            return await _grade(ctx, submission_id)
        except UNREACHABLE as exc:
            logger.warning("grading %s: the database or Redis cannot be reached (%s); again in %g s", submission_id,
                           type(exc).__name__, UNREACHABLE_RETRY_S)
            raise Retry(defer=UNREACHABLE_RETRY_S) from exc


async def grade_batch(ctx: dict[str, Any], job_id: int, submission_ids: list[int]) -> str:
    """Grade a batch of one assignment's submissions (a retry skips those already graded)."""
    pool = ctx["pool"]
    results = []
    async with heartbeat(ctx):
        async with pool.acquire() as conn:  # under way (it read `queued` until its last batch ended)
            row = await conn.fetchrow(_GRADE_JOB_OUTCOME, job_id)
            if row and row["total"] and row["done"] < row["total"]:
                await jobs_repo.set_state(conn, job_id, "grading", row["done"] / row["total"])
        for sid in submission_ids:
            results.append(await _grade(ctx, sid))
    async with pool.acquire() as conn:
        # progress over the whole job: the share of its submissions no longer waiting for the grader
        row = await conn.fetchrow(_GRADE_JOB_OUTCOME, job_id)
        if row:
            finished = row["done"] == row["total"]  # (none left at all: the assignment or its course was deleted)
            await jobs_repo.set_state(conn, job_id, "done" if finished else "grading",
                                      row["done"] / row["total"] if row["total"] else 1.0,
                                      _grade_job_error(row) if finished else None)
    graded = sum(r not in (NOTHING_TO_DO, SUPERSEDED) for r in results)
    return f"{graded} graded" + (f", {len(results) - graded} no longer waiting" if graded < len(results) else "")


# What `_grade` says of an answer it did not grade: no longer waiting for the grader (graded, deleted), or graded
# (or sent to the grader again) by another run while this one worked on it
NOTHING_TO_DO = "nothing to do"
SUPERSEDED = "already graded, or sent to the grader again"


# A grade-all job's submissions: how many are no longer waiting for the grader, how many of those the grader
# could not grade (held for review saying why: `_hold_failed`), and the first such reason. $1: the job.
_GRADE_JOB_OUTCOME = f"""
SELECT count(*) FILTER (WHERE s.status <> 'grading') AS done, count(*) AS total,
       count(*) FILTER (WHERE s.status <> 'grading' AND s.review_reason LIKE '{FAILED_PREFIX}%') AS failed,
       (array_agg(s.review_reason ORDER BY s.id) FILTER (WHERE s.status <> 'grading'
                                                         AND s.review_reason LIKE '{FAILED_PREFIX}%'))[1] AS reason
FROM submissions s, jobs j WHERE j.id = $1 AND s.id = ANY(
    SELECT jsonb_array_elements_text(j.payload -> 'submission_ids')::bigint)"""


def _grade_job_error(row: asyncpg.Record) -> str | None:
    """A finished grade-all job's `error`: None when every answer was graded (a doubtful grade held for review
    is graded), else how many the grader could not grade, with the first reason, or that none are left."""
    if not row["total"]:
        return "its answers were deleted before they were graded (the assignment or its course was deleted)"
    if not row["failed"]:
        return None
    return (f"{row['failed']} of {row['total']} answers could not be graded automatically and wait for review "
            f"(first: {row['reason']})")


async def _moment(conn: asyncpg.Connection, a: asyncpg.Record, embedder: Any) -> dict[str, Any] | None:
    """Where to rewatch: the item's cited moment, else its chapter, else the best search hit."""
    from ingest.youtube import watch_url

    async def video(video_id: int) -> asyncpg.Record | None:
        return await conn.fetchrow("SELECT title, youtube_id FROM videos WHERE id = $1", video_id)

    start: float | None = None
    end: float | None = None
    vid = None
    if a["citation"]:
        vid, start, end = a["citation"].get("video_id"), a["citation"].get("start"), a["citation"].get("end")
    elif a["chapter_id"]:
        ch = await conn.fetchrow("SELECT video_id, start_s, end_s FROM chapters WHERE id = $1", a["chapter_id"])
        if ch:
            vid, start, end = ch["video_id"], ch["start_s"], ch["end_s"]
    if vid is None:
        query = f"{a['prompt']} {a['reference_answer']}".strip()
        vec = await asyncio.to_thread(embedder.embed_query, query)
        hits = await hybrid_search(conn, a["course_id"], vec, query, embedder.name, k=1,
                                   video_id=a["video_id"])
        if not hits:
            return None
        vid, start, end = hits[0].video_id, hits[0].start, hits[0].end
    v = await video(vid) if vid else None
    if v is None or start is None:
        return None
    out = {"video_id": vid, "start": round(float(start), 1), "title": v["title"]}
    if end is not None:
        out["end"] = round(float(end), 1)
    if v["youtube_id"]:
        out["url"] = watch_url(v["youtube_id"], float(start))
    return out


def criteria_of(a: asyncpg.Record) -> list[grader.Criterion]:
    rubric = a["rubric"] or []
    if not rubric:
        return grader.default_rubric()
    return [{"name": c["name"], "points": float(c["points"]), "description": c.get("description", "")} for c in rubric]


async def _grade(ctx: dict[str, Any], submission_id: int) -> str:
    pool = ctx["pool"]
    async with pool.acquire() as conn:
        sub = await subs_repo.get(conn, submission_id)
        if sub is None or sub["status"] != "grading":
            return NOTHING_TO_DO
        a = await assignments_repo.get(conn, sub["assignment_id"])
        tries = await subs_repo.note_try(conn, submission_id)
        if tries > MAX_TRIES + 1:  # its runs keep dying (the worker killed, or a save that cannot work)
            return await _hold_failed(ctx, submission_id, sub["grade_gen"],
                                      f"automatic grading did not finish in {tries - 1} tries")
    try:  # from the counted try on, a stopping worker's run goes again elsewhere and is not a try
        try:  # (loaded before the try was counted, a model that would not load kept it in `grading` for good)
            embedder = await asyncio.to_thread(ctx["embedder"])
        except Exception as exc:  # noqa: BLE001
            if tries < MAX_TRIES:
                logger.exception("grading %s: the embedding model did not load; retrying", submission_id)
                raise Retry(defer=backoff_s(tries, ctx["settings"].job_retry_base_s)) from exc
            return await _hold_failed(ctx, submission_id, sub["grade_gen"],
                                      f"automatic grading failed: the embedding model did not load: {exc}")
        async with pool.acquire() as conn:
            ex_rows = await subs_repo.exemplars(conn, a["id"], exclude_user=sub["user_id"])
            try:
                moment = await _moment(conn, a, embedder)
            except Exception:  # noqa: BLE001 - feedback without a moment is still feedback
                logger.warning("no rewatch moment for assignment %s", a["id"], exc_info=True)
                moment = None
        return await _grade_counted(ctx, submission_id, sub, a, tries, ex_rows, moment, embedder)
    except asyncio.CancelledError:
        await give_back_if_stopping(pool, lambda conn: subs_repo.give_back_try(conn, submission_id),
                                    f"grading of submission {submission_id}")
        raise


async def _grade_counted(ctx: dict[str, Any], submission_id: int, sub: asyncpg.Record, a: asyncpg.Record, tries: int,
                         ex_rows: list[asyncpg.Record], moment: dict[str, Any] | None, embedder: Any) -> str:
    """One counted try at grading the submission (the model, then the grade saved in its transaction)."""
    pool, redis, settings = ctx["pool"], ctx["redis"], ctx["settings"]
    answer = sub["answer"] if isinstance(sub["answer"], str) else str(sub["answer"])
    inputs: grader.GradeState = {
        "question": a["prompt"], "reference": a["reference_answer"], "criteria": criteria_of(a), "answer": answer,
        "exemplars": [scoring.Exemplar(r["answer"], float(r["score"]) / 100.0) for r in ex_rows
                      if isinstance(r["answer"], str) and r["score"] is not None],
        "moment": moment, "threshold": settings.review_threshold, "band": settings.review_band,
    }
    try:
        llm = get_llm(settings)
    except LLMError as exc:
        logger.warning("LLM misconfigured, grading offline: %s", exc.message)
        llm = None
    try:
        result = await grader.grade(inputs, embedder=embedder, llm=llm)
    except LLMError as exc:  # only transient provider failures get here
        if tries < MAX_TRIES:
            delay = backoff_s(tries, settings.job_retry_base_s)
            logger.info("grading %s: %s; retry in %.1fs", submission_id, exc.message, delay)
            raise Retry(defer=delay) from exc
        try:
            result = await grader.grade(inputs, embedder=embedder, llm=None)
        except Exception as offline_exc:  # noqa: BLE001 - retries are spent: say why, do not just die
            logger.exception("grading %s: the offline fallback failed too", submission_id)
            return await _hold_failed(ctx, submission_id, sub["grade_gen"],
                                      f"automatic grading failed: LLM grader unavailable ({exc.message}); offline "
                                      f"grader: {type(offline_exc).__name__}: {offline_exc}")
        result["note"] = f"LLM grader unavailable ({exc.message}); offline grade"
    except Exception as exc:  # noqa: BLE001
        if tries < MAX_TRIES:
            logger.exception("grading %s crashed; retrying", submission_id)
            raise Retry(defer=backoff_s(tries, settings.job_retry_base_s)) from exc
        return await _hold_failed(ctx, submission_id, sub["grade_gen"],
                                  f"automatic grading failed: {type(exc).__name__}: {exc}")
    held = bool(result["held"])
    async with pool.acquire() as conn:
        try:
            async with conn.transaction():
                feedback = result["feedback"]
                moment = (feedback or {}).get("rewatch")
                # the moment was read before the model's call: its video deleted since, the grade does not advise
                # rewatching it (the video is held, KEY SHARE, so a deletion waits for this grade and clears it)
                if moment and await conn.fetchval("SELECT 1 FROM videos WHERE id = $1 FOR KEY SHARE",
                                                  moment.get("video_id")) is None:
                    feedback = subs_repo.without_rewatch(feedback)
                row = await subs_repo.save_machine_grade(
                    conn, submission_id, score=result["total"], confidence=result["confidence"],
                    criteria=result["scores"], feedback=feedback, grader=result["grader"], held=held,
                    reason="; ".join(r for r in (result.get("reason"), result.get("note")) if r) or None,
                    gen=sub["grade_gen"])
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:  # never works on a retry
            logger.exception("grade of submission %s cannot be saved", submission_id)
            return await _hold_failed(ctx, submission_id, sub["grade_gen"],
                                      f"the automatic grade could not be saved: {exc}")
        if row is None:
            return SUPERSEDED
        if not held:
            await assignments_repo.on_grade_final(conn, redis, row)
    logger.info("graded submission %s: %.1f (confidence %.2f, %s)%s", submission_id, result["total"],
                result["confidence"], result["grader"], " held for review" if held else "")
    return "held" if held else "graded"


async def _hold_failed(ctx: dict[str, Any], submission_id: int, gen: int, reason: str) -> str:
    """The grader cannot grade it: an instructor will (the learner sees `review_pending`). Not when it was
    sent to the grader again since this run started (`gen`): the newer run decides. The grader proposes nothing:
    a grade from before a regrade (a changed rubric) is no proposal for this one; the learner's is kept in
    `released`."""
    assert reason.startswith(FAILED_PREFIX), reason  # (how a grade-all job counts what could not be graded)
    async with ctx["pool"].acquire() as conn:
        async with conn.transaction():
            row = await conn.fetchrow(
                """UPDATE submissions SET status = 'review_pending', review_reason = $2, score = NULL,
                          confidence = NULL, criteria = '[]', feedback = NULL, grader = NULL, updated_at = now()
                   WHERE id = $1 AND status = 'grading' AND grade_gen = $3 RETURNING id""",
                submission_id, reason[:500], gen)
            if row:
                await subs_repo.record_event(conn, submission_id, "machine", score=None, held=True, reason=reason)
    logger.warning("submission %s sent to review: %s", submission_id, reason)
    return "held: grading failed"


async def _queued(redis: ArqRedis, arq_id: str) -> bool:
    """Whether a queue holds this job: the quick queue, or the ingest queue, where an earlier version queued grades
    (ingest workers still run those)."""
    async with redis.pipeline(transaction=False) as pipe:
        for queue in QUEUES:
            pipe.zscore(queue, arq_id)
        return any(score is not None for score in await pipe.execute())


async def recover_grading(ctx: dict[str, Any]) -> int:
    """Re-queue submissions waiting for a grade whose queue entry vanished or whose worker died."""
    pool, redis = ctx["pool"], ctx["redis"]
    stale_after = max(10.0, 4 * ctx["settings"].job_heartbeat_ms / 1000)
    async with pool.acquire() as conn:
        rows = await subs_repo.stale_grading(conn, stale_after)
    n = 0
    for row in rows:
        if row["grade_job"] and await _queued(redis, row["grade_job"]):
            # queued, but maybe held back by the lease of a worker that died taking it
            await release_unbeaten(redis, row["grade_job"], ctx["settings"].job_heartbeat_ms)
            continue
        # one id per lost job: workers recovering at the same moment (all start at once) queue one run
        lost = zlib.crc32((row["grade_job"] or "none").encode())
        await enqueue_grade(redis, pool, row["id"], f"grade-{row['id']}-r{lost:08x}")
        n += 1
    if n:
        logger.info("re-queued %d submissions waiting for a grade", n)
    async with pool.acquire() as conn:
        await assignments_repo.reconcile_grade_xp(conn, redis)
        await assignments_repo.reconcile_chapter_scores(conn)
        await finish_grade_jobs(conn)
    return n


async def finish_grade_jobs(conn: asyncpg.Connection) -> int:
    """Mark done the grade-all jobs whose submissions are all graded or held, also when some were graded by
    recovery runs (one submission each) instead of their batch, which would have marked the job."""
    rows = await conn.fetch(
        """SELECT j.id FROM jobs j
           WHERE j.kind = 'grade' AND j.state NOT IN ('done', 'failed') AND j.updated_at < now() - interval '10 seconds'
             AND NOT EXISTS (SELECT 1 FROM submissions s WHERE s.status = 'grading' AND s.id = ANY(
                 SELECT jsonb_array_elements_text(j.payload -> 'submission_ids')::bigint))""")
    for r in rows:
        await jobs_repo.set_state(conn, r["id"], "done", 1.0, _grade_job_error(await conn.fetchrow(_GRADE_JOB_OUTCOME,
                                                                                                   r["id"])))
    return len(rows)
