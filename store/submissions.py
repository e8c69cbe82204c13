"""Submissions (every attempt kept), their grade history, the review queue and per-concept performance.

A submission is `grading` (a job will grade it), `review_pending` (the grader's proposal waits for an
instructor) or `graded` (final; only now does the learner see the score). All of it is Postgres state, so a
restart of any process loses no pending review.
"""
from __future__ import annotations

from typing import Any

import asyncpg

from store.frames import mmss

_COLS = """s.id, s.assignment_id, s.course_id, s.user_id, s.attempt, s.answer, s.status, s.score, s.confidence,
           s.criteria, s.feedback, s.grader, s.review_reason, s.review_comment, s.reviewed_by, s.grade_job,
           s.grade_tries, s.grade_gen, s.created_at, s.updated_at, s.final_at, s.released"""
COLUMNS = _COLS  # a submission's columns, by name (alias `s`)
EXEMPLAR_LIMIT = 200


# a wrong multiple-choice answer's advice when its question has a moment (it names none: `without_rewatch` drops it)
CHOICE_REWATCH = "Rewatch the moment this question is based on, then try again."


def rewatch_advice(moment: dict[str, Any]) -> str:
    """The sentence a grade's `improve` ends with for its moment to rewatch ("Rewatch Lecture 1 at 2:20.")."""
    return f"Rewatch {moment.get('title') or 'the video'} at {mmss(float(moment['start']))}."


def without_rewatch(feedback: dict[str, Any] | None) -> dict[str, Any] | None:
    """Feedback without its moment to rewatch (the video is gone): the link and the sentence that names it."""
    if not feedback or not feedback.get("rewatch"):
        return feedback
    out = dict(feedback)
    moment = out.pop("rewatch")
    improve = out.get("improve") or ""
    for advice in (rewatch_advice(moment), CHOICE_REWATCH):
        if improve.endswith(advice):
            out["improve"] = improve[: -len(advice)].rstrip()
            if not out["improve"]:
                out.pop("improve")
            break
    return out


async def attempts(conn: asyncpg.Connection, assignment_id: int, user_id: int) -> int:
    """The learner's attempts at the assignment so far."""
    return await conn.fetchval(
        "SELECT count(*) FROM submissions WHERE assignment_id = $1 AND user_id = $2", assignment_id, user_id)


async def lock_attempts(conn: asyncpg.Connection, assignment_id: int, user_id: int) -> int:
    """Serialise one learner's submissions to one assignment (inside a transaction); returns attempts so far."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('submit:' || $1::bigint::text || ':' || $2::bigint::text, 0))",
                       assignment_id, user_id)
    return await attempts(conn, assignment_id, user_id)


async def create(conn: asyncpg.Connection, assignment_id: int, course_id: int, user_id: int, attempt: int,
                 answer: Any, *, status: str, score: float | None = None, confidence: float | None = None,
                 criteria: list | None = None, feedback: dict | None = None, grader: str | None = None,
                 grade_job: str | None = None, client_key: str | None = None) -> asyncpg.Record:
    return await conn.fetchrow(
        f"""INSERT INTO submissions AS s (assignment_id, course_id, user_id, attempt, answer, status, score, confidence,
                                          criteria, feedback, grader, grade_job, final_at, client_key)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, CASE WHEN $6 = 'graded' THEN clock_timestamp() END, $13)
            RETURNING {_COLS}""",
        assignment_id, course_id, user_id, attempt, answer, status, score, confidence, criteria or [], feedback,
        grader, grade_job, client_key)


async def by_client_key(conn: asyncpg.Connection, assignment_id: int, user_id: int,
                        client_key: str) -> asyncpg.Record | None:
    """The learner's submission made with this Idempotency-Key, if any."""
    return await conn.fetchrow(
        f"SELECT {_COLS} FROM submissions s WHERE s.assignment_id = $1 AND s.user_id = $2 AND s.client_key = $3",
        assignment_id, user_id, client_key)


async def get(conn: asyncpg.Connection, submission_id: int, *, lock: bool = False) -> asyncpg.Record | None:
    """The submission; `lock` (inside a transaction): held until it ends, so reviews of it take turns."""
    return await conn.fetchrow(f"SELECT {_COLS} FROM submissions s WHERE s.id = $1" + (" FOR UPDATE" if lock else ""),
                               submission_id)


async def get_with_context(conn: asyncpg.Connection, submission_id: int) -> asyncpg.Record | None:
    """The submission with its course's tenant (for access checks) and the learner's name."""
    return await conn.fetchrow(
        f"""SELECT {_COLS}, c.tenant_id, u.name AS user_name FROM submissions s JOIN courses c ON c.id = s.course_id
            JOIN users u ON u.id = s.user_id WHERE s.id = $1""",
        submission_id)


async def list_for_assignment(conn: asyncpg.Connection, assignment_id: int, user_id: int | None,
                              limit: int, offset: int) -> list[asyncpg.Record]:
    """Submissions of an assignment, newest first; only `user_id`'s when given."""
    return await conn.fetch(
        f"""SELECT {_COLS}, u.name AS user_name FROM submissions s JOIN users u ON u.id = s.user_id
            WHERE s.assignment_id = $1 AND ($2::bigint IS NULL OR s.user_id = $2)
            ORDER BY s.id DESC LIMIT $3 OFFSET $4""", assignment_id, user_id, limit, offset)


async def record_event(conn: asyncpg.Connection, submission_id: int, kind: str, *, score: float | None,
                       confidence: float | None = None, criteria: list | None = None, feedback: dict | None = None,
                       grader: str | None = None, held: bool = False, reason: str | None = None,
                       comment: str | None = None, by_user: int | None = None) -> None:
    await conn.execute(
        """INSERT INTO grade_events (submission_id, kind, score, confidence, criteria, feedback, grader, held, reason,
                                     comment, by_user) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)""",
        submission_id, kind, score, confidence, criteria or [], feedback, grader, held, reason, comment, by_user)


async def history(conn: asyncpg.Connection, submission_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT id, kind, round(score::numeric, 1)::float8 AS score, round(confidence::numeric, 3)::float8 AS confidence,
                  criteria, grader, held, reason, comment, by_user, created_at
           FROM grade_events WHERE submission_id = $1 ORDER BY id""", submission_id)  # (stored as real: 85.9000015)


async def save_machine_grade(conn: asyncpg.Connection, submission_id: int, *, score: float, confidence: float,
                             criteria: list, feedback: dict, grader: str, held: bool,
                             reason: str | None, gen: int) -> asyncpg.Record | None:
    """Store a grader result on a submission still `grading` for the same request (`gen`, read when the run
    started); None: already graded (a duplicate run) or sent to the grader again since (a newer run saves)."""
    row = await conn.fetchrow(
        f"""UPDATE submissions s SET status = CASE WHEN $7 THEN 'review_pending' ELSE 'graded' END,
                   score = $2, confidence = $3, criteria = $4, feedback = $5, grader = $6, review_reason = $8,
                   final_at = CASE WHEN $7 THEN NULL ELSE clock_timestamp() END, updated_at = now()
            WHERE s.id = $1 AND s.status = 'grading' AND s.grade_gen = $9 RETURNING {_COLS}""",
        submission_id, score, confidence, criteria, feedback, grader, held, reason, gen)
    if row is not None:
        await record_event(conn, submission_id, "machine", score=score, confidence=confidence, criteria=criteria,
                           feedback=feedback, grader=grader, held=held, reason=reason)
    return row


async def regrade_choices(conn: asyncpg.Connection, a: asyncpg.Record) -> list[asyncpg.Record]:
    """After multiple-choice assignment `a`'s answer key changed: score again every answer no instructor graded,
    in the caller's transaction. Returns the submissions whose score changed (for `on_grade_final` after
    commit)."""
    from store.assignments import grade_choice

    out = []
    for r in await conn.fetch(f"SELECT {_COLS} FROM submissions s WHERE s.assignment_id = $1 "
                              "AND s.status = 'graded' AND s.reviewed_by IS NULL ORDER BY s.id FOR UPDATE", a["id"]):
        score, criteria, feedback = grade_choice(a, list(r["answer"]))
        if r["score"] is not None and abs(score - float(r["score"])) < 0.05:
            continue
        out.append(await conn.fetchrow(
            f"""UPDATE submissions s SET score = $2, criteria = $3, feedback = $4, final_at = clock_timestamp(),
                       updated_at = now()
                WHERE s.id = $1 RETURNING {_COLS}""", r["id"], score, criteria, feedback))
        await record_event(conn, r["id"], "auto", score=score, confidence=1.0, criteria=criteria, feedback=feedback,
                           grader="auto", reason="the answer key changed")
    return out


async def save_review(conn: asyncpg.Connection, submission_id: int, *, score: float, comment: str | None,
                      reviewer_id: int, criteria: list, feedback: dict) -> asyncpg.Record | None:
    """An instructor's final grade (approval or override); None if the submission is still being graded."""
    row = await conn.fetchrow(
        f"""UPDATE submissions s SET status = 'graded', score = $2, review_comment = coalesce($3, review_comment),
                   reviewed_by = $4,
                   criteria = $5, feedback = $6, final_at = clock_timestamp(), updated_at = now()
            WHERE s.id = $1 AND s.status IN ('review_pending', 'graded') RETURNING {_COLS}""",
        submission_id, score, comment, reviewer_id, criteria, feedback)
    if row is not None:
        await record_event(conn, submission_id, "review", score=score, criteria=criteria, feedback=feedback,
                           grader="instructor", comment=comment, by_user=reviewer_id)
    return row


async def mark_grading(conn: asyncpg.Connection, submission_ids: list[int], job: str | None) -> list[int]:
    """Send submissions (back) to the grader, except those an instructor graded; returns the ids marked. A grade
    the learner was given is kept in `released` (they see it until the new one is final)."""
    rows = await conn.fetch(
        """UPDATE submissions SET status = 'grading', grade_job = coalesce($2, grade_job), grade_tries = 0,
                  released = CASE WHEN status = 'graded' THEN jsonb_build_object(
                      'score', score, 'confidence', confidence, 'criteria', criteria, 'feedback', feedback,
                      'review_comment', review_comment, 'final_at', final_at) ELSE released END,
                  grade_gen = grade_gen + 1, final_at = NULL, updated_at = now()
           WHERE id = ANY($1::bigint[]) AND reviewed_by IS NULL RETURNING id""", submission_ids, job)
    return [r["id"] for r in rows]


async def note_try(conn: asyncpg.Connection, submission_id: int, job: str | None = None) -> int:
    """Count a grading attempt; returns the number of tries so far."""
    return await conn.fetchval(
        """UPDATE submissions SET grade_tries = grade_tries + 1, grade_job = coalesce($2, grade_job),
                  updated_at = now() WHERE id = $1 RETURNING grade_tries""", submission_id, job) or 0


async def give_back_try(conn: asyncpg.Connection, submission_id: int) -> None:
    """A try cut short by its worker stopping (a deploy) does not count towards sending it to review."""
    await conn.execute("UPDATE submissions SET grade_tries = greatest(grade_tries - 1, 0) "
                       "WHERE id = $1 AND status = 'grading'", submission_id)


async def stale_grading(conn: asyncpg.Connection, older_than_s: float) -> list[asyncpg.Record]:
    """Submissions waiting for a grade whose row has not moved for a while (their job may be lost)."""
    return await conn.fetch(
        """SELECT id, grade_job FROM submissions WHERE status = 'grading'
           AND updated_at < now() - make_interval(secs => $1) ORDER BY id""", older_than_s)


async def written_for_assignment(conn: asyncpg.Connection, assignment_id: int) -> list[int]:
    return [r["id"] for r in await conn.fetch(
        "SELECT id FROM submissions WHERE assignment_id = $1 AND reviewed_by IS NULL ORDER BY id", assignment_id)]


async def exemplars(conn: asyncpg.Connection, assignment_id: int, exclude_user: int | None = None) -> list[asyncpg.Record]:
    """Answers to this assignment whose grade an instructor set or confirmed, newest first."""
    return await conn.fetch(
        """SELECT answer, score FROM submissions WHERE assignment_id = $1 AND reviewed_by IS NOT NULL
           AND status = 'graded' AND ($2::bigint IS NULL OR user_id <> $2) ORDER BY final_at DESC LIMIT $3""",
        assignment_id, exclude_user, EXEMPLAR_LIMIT)


async def queue(conn: asyncpg.Connection, course_id: int, limit: int, offset: int) -> list[asyncpg.Record]:
    """The course's held grades, oldest first (first in, first reviewed)."""
    return await conn.fetch(
        f"""SELECT {_COLS}, u.name AS user_name, a.title AS assignment_title, a.type AS assignment_type,
                   a.prompt, a.reference_answer, a.rubric
            FROM submissions s JOIN users u ON u.id = s.user_id JOIN assignments a ON a.id = s.assignment_id
            WHERE s.course_id = $1 AND s.status = 'review_pending' ORDER BY s.created_at, s.id LIMIT $2 OFFSET $3""",
        course_id, limit, offset)


async def learner_results(conn: asyncpg.Connection, course_id: int, user_id: int) -> list[asyncpg.Record]:
    """Per published assignment: the scores of the learner's graded attempts, latest attempt first (an earlier
    attempt graded later, say on review, does not count as the latest), when the latest of them was submitted,
    and the concept the assignment belongs to."""
    return await conn.fetch(
        """SELECT a.id AS assignment_id, a.title, a.type, a.difficulty, a.max_attempts, a.opens_at, a.closes_at,
                  a.video_id, a.chapter_id, a.concept, a.citation,
                  ch.start_s AS chapter_start, ch.end_s AS chapter_end, ch.title AS chapter_title, v.title AS video_title,
                  v.youtube_id,
                  coalesce(array_agg(CASE WHEN s.status = 'graded' THEN s.score
                                          ELSE (s.released ->> 'score')::float8 END ORDER BY s.attempt DESC)
                           FILTER (WHERE s.status = 'graded' OR s.released ->> 'score' IS NOT NULL), '{}') AS scores,
                  count(s.id) AS attempts,
                  (array_agg(s.created_at ORDER BY s.attempt DESC)
                       FILTER (WHERE s.status = 'graded' OR s.released ->> 'score' IS NOT NULL))[1] AS last_at
           FROM assignments a
           LEFT JOIN chapters ch ON ch.id = a.chapter_id
           LEFT JOIN videos v ON v.id = a.video_id
           LEFT JOIN submissions s ON s.assignment_id = a.id AND s.user_id = $2
           WHERE a.course_id = $1 AND a.status = 'published'
           GROUP BY a.id, ch.id, v.id ORDER BY a.id""", course_id, user_id)
