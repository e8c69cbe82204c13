"""Submissions, grading, the review queue and the adaptive next step.

    POST /api/v1/assignments/{id}/submissions {answer}      GET /api/v1/assignments/{id}/submissions
    POST /api/v1/assignments/{id}/grade-all                 GET /api/v1/submissions/{id}
    POST /api/v1/submissions/{id}/review {score?, comment?}  GET /api/v1/courses/{id}/grading-queue
    POST /api/v1/submissions/{id}/regrade
    GET  /api/v1/courses/{id}/me/next
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import asyncpg
import msgspec
from litestar import Controller, Request, Response, get, post

from server.api.assignment_schemas import (SHORT_ANSWER_MAX_CHARS, BatchAccepted, Criterion, CriterionScore, NextStep,
                                           Queue, QueueItem, ReviewIn, Submission, SubmissionIn, SubmissionList)
from server.api.assignments import assignment_or_404
from server.api.courses import course_or_404
from server.api.paging import ListLimit, Offset, PageLimit
from server.auth import AuthUser, staff_only
from server.decode import idempotency_key, read_json
from server.errors import ApiError
from store.frames import CONTROL, blank
from store import assignments as assignments_repo
from store import courses as courses_repo
from store import jobs as jobs_repo
from store import submissions as repo
from store.keys import rate_choice, rate_written
from store.ratelimit import SendLimiter

logger = logging.getLogger(__name__)

WRITTEN_PER_HOUR = 60  # written answers per learner (each is graded, with a model when one is configured),
WRITTEN_BURST = 20  # refilling evenly, in bursts of up to this many
# Multiple-choice answers are graded at once, without a model, but each stores an attempt and its grade: a loop
# of them grew the tables (and each later submit's work) without bound. Generous for a person, not for a script.
CHOICE_PER_MINUTE = 60
CHOICE_BURST = 30


def _criteria(raw: list | None) -> list[CriterionScore]:
    return [CriterionScore(c["name"], float(c["points"]), float(c["score"]), c.get("justification", ""))
            for c in raw or []]


def _repeat(done: asyncpg.Record, answer: Any, user: AuthUser) -> Response[Submission]:
    """The attempt an Idempotency-Key made, for a repeat of the same answer; another answer under the same key
    is refused rather than dropped."""
    if done["answer"] != answer:
        raise ApiError(409, "this Idempotency-Key was used for another answer; use a new key for a new attempt",
                       code="idempotency_key_reused", field="Idempotency-Key")
    return Response(to_submission(done, user), status_code=200)


def _released(r: asyncpg.Record | dict) -> dict | None:
    """The grade the learner was given before their answer went back to the grader (grade-all), if any."""
    released = r.get("released") if isinstance(r, dict) else (r["released"] if "released" in r else None)
    return released if released and released.get("score") is not None else None


def to_submission(r: asyncpg.Record | dict, user: AuthUser, history: list | None = None) -> Submission:
    final = r["status"] == "graded"
    out = Submission(id=r["id"], assignment_id=r["assignment_id"], user_id=r["user_id"], attempt=r["attempt"],
                     status=r["status"], answer=r["answer"], created_at=r["created_at"], final_at=r["final_at"])
    shown = r if final or user.is_staff else _released(r)  # while graded again, the learner sees their last grade
    if shown is not None:
        out.score = None if shown["score"] is None else round(float(shown["score"]), 1)
        out.confidence = None if shown["confidence"] is None else round(float(shown["confidence"]), 3)
        out.criteria = _criteria(shown["criteria"])
        out.feedback = shown["feedback"]
        out.review_comment = shown["review_comment"]
        if shown is not r:
            out.final_at = datetime.fromisoformat(shown["final_at"]) if shown.get("final_at") else None
    if user.is_staff:
        out.user_name = r.get("user_name") if isinstance(r, dict) else (r["user_name"] if "user_name" in r else None)
        out.grader, out.review_reason, out.reviewed_by = r["grader"], r["review_reason"], r["reviewed_by"]
        out.history = history
    return out


def _check_answer(a: asyncpg.Record, answer: str | list[int], max_chars: int) -> str | list[int]:
    if a["type"] == "multiple_choice":
        if not isinstance(answer, list):
            raise ApiError(400, "a multiple-choice answer is a list of chosen option indexes", field="answer")
        if not answer or len(set(answer)) != len(answer) or any(i >= len(a["options"]) for i in answer):
            raise ApiError(400, f"choose one or more distinct option indexes 0..{len(a['options']) - 1}",
                           field="answer")
        if len(a["correct"]) == 1 and len(answer) > 1:
            raise ApiError(400, "this question has exactly one correct option; choose one", field="answer")
        return sorted(answer)
    if not isinstance(answer, str):
        raise ApiError(400, f"a {a['type'].replace('_', ' ')} answer is text", field="answer")
    text = answer.strip()
    if not text or blank(text):  # zero-width spaces and the like are empty too
        raise ApiError(400, "the answer is empty", field="answer")
    limit = SHORT_ANSWER_MAX_CHARS if a["type"] == "short_answer" else max_chars
    if len(text) > limit:
        raise ApiError(400, f"the answer is {len(text)} characters; the limit is {limit}", code="too_long",
                       field="answer")
    if CONTROL.search(text):  # staff read it in the grading queue: no terminal escapes, bells
        raise ApiError(400, "the answer must not contain control characters other than tabs and line breaks",
                       field="answer")
    return text


_ADJUSTED = "Adjusted by the instructor."


def _opened(a: asyncpg.Record) -> None:
    if a["opens_at"] and datetime.now(timezone.utc) < a["opens_at"]:
        raise ApiError(409, f"this assignment opens at {a['opens_at'].isoformat()}", code="not_open")


def _open_check(a: asyncpg.Record, used: int) -> None:
    _opened(a)
    now = datetime.now(timezone.utc)
    if a["closes_at"] and now >= a["closes_at"]:
        raise ApiError(409, f"this assignment closed at {a['closes_at'].isoformat()}", code="closed")
    if a["max_attempts"] is not None and used >= a["max_attempts"]:
        raise ApiError(409, f"all {a['max_attempts']} attempts are used", code="attempts_exhausted")


async def _submission_or_404(conn: asyncpg.Connection, submission_id: int, user: AuthUser) -> asyncpg.Record:
    row = await repo.get_with_context(conn, submission_id)
    if row is None or row["tenant_id"] != user.tenant_id or (not user.is_staff and row["user_id"] != user.id):
        raise ApiError(404, f"submission {submission_id} not found")
    # a learner reads their attempts while they see the course, as its assignments and their list of attempts (a
    # learner removed from a draft course read one attempt but not the list)
    if not user.is_staff and await courses_repo.visible_course(conn, row["course_id"], user.id, user.tenant_id,
                                                               user.role) is None:
        raise ApiError(404, f"submission {submission_id} not found")
    return row


class SubmissionController(Controller):
    path = "/api/v1"
    tags = ["submissions"]

    @post("/assignments/{assignment_id:int}/submissions", status_code=201)
    async def submit(self, request: Request, assignment_id: int) -> Response[Submission]:
        """Submit an answer: text, or a list of chosen option indexes. Multiple choice is graded at once;
        written answers go to the grader (status `grading`). With an `Idempotency-Key` header, a repeat (a lost
        response, a double click) returns the attempt the key made (200) instead of making another."""
        state, user = request.app.state, request.user
        key = idempotency_key(request)
        async with state.pool.acquire() as conn:
            a = await assignment_or_404(conn, assignment_id, user)
            if user.role != "learner":
                raise ApiError(403, "only learners submit answers", code="forbidden")
            if not await courses_repo.is_enrolled(conn, a["course_id"], user.id):
                raise ApiError(403, "enroll in the course to submit answers", code="not_enrolled")
        data = await read_json(request, SubmissionIn)
        if key is not None:  # a repeat returns its attempt whatever the assignment's times say now (it was open)
            async with state.pool.acquire() as conn:
                if (done := await repo.by_client_key(conn, assignment_id, user.id, key)) is not None:
                    return _repeat(done, _check_answer(a, data.answer, state.settings.max_answer_chars), user)
        _opened(a)  # before anything about the answer: until it opens, its options are hidden
        answer = _check_answer(a, data.answer, state.settings.max_answer_chars)
        async with state.pool.acquire() as conn:  # an answer refused anyway does not use up the allowance
            try:
                _open_check(a, await repo.attempts(conn, assignment_id, user.id))  # (again under the lock below)
            except ApiError:
                # the same request, raced: its twin stored the attempt since the key was looked up above
                if key is not None and (done := await repo.by_client_key(conn, assignment_id, user.id, key)):
                    return _repeat(done, answer, user)
                raise
        if a["type"] == "multiple_choice":
            ok, wait = await SendLimiter(state.redis, CHOICE_PER_MINUTE / 60, CHOICE_BURST,
                                         key=rate_choice).take(user.id)
            if not ok:
                raise ApiError(429, f"at most {CHOICE_PER_MINUTE} multiple-choice answers a minute; retry in "
                               f"{wait:g}s", code="rate_limited", retry_after=wait)
        else:  # each written answer costs a grading run (a model call, with one)
            ok, wait = await SendLimiter(state.redis, WRITTEN_PER_HOUR / 3600, WRITTEN_BURST,
                                         key=rate_written).take(user.id)
            if not ok:
                raise ApiError(429, f"at most {WRITTEN_PER_HOUR} written answers an hour; retry in {wait:g}s",
                               code="rate_limited", retry_after=wait)
        async with state.pool.acquire() as conn:
            async with conn.transaction():
                used = await repo.lock_attempts(conn, assignment_id, user.id)
                if key is not None and (done := await repo.by_client_key(conn, assignment_id, user.id, key)):
                    return _repeat(done, answer, user)  # the same request, raced
                # the course first, as a deletion of it locks it (then its assignments): the attempt's insert, which
                # needs the course's key, after the assignment's lock deadlocked with a course deletion (tester)
                await conn.execute("SELECT 1 FROM courses WHERE id = $1 FOR KEY SHARE", a["course_id"])
                # graded against the assignment as it is now, held until this commits (a key change waits)
                checked, a = a, await assignments_repo.get(conn, assignment_id, lock="share")
                if a is None or a["status"] != "published":
                    raise ApiError(404, f"assignment {assignment_id} not found")
                _open_check(a, used)
                if a["type"] != checked["type"]:  # edited before anyone answered: the answer was for the old one
                    raise ApiError(409, "the assignment was changed while this answer was sent; read it again",
                                   code="invalid_state")
                answer = _check_answer(a, data.answer, state.settings.max_answer_chars)  # its options may have too
                if a["type"] == "multiple_choice":
                    score, criteria, feedback = assignments_repo.grade_choice(a, answer)  # type: ignore[arg-type]
                    row = await repo.create(conn, assignment_id, a["course_id"], user.id, used + 1, answer,
                                            status="graded", score=score, confidence=1.0, criteria=criteria,
                                            feedback=feedback, grader="auto", client_key=key)
                    await repo.record_event(conn, row["id"], "auto", score=score, confidence=1.0, criteria=criteria,
                                            feedback=feedback, grader="auto")
                else:
                    row = await repo.create(conn, assignment_id, a["course_id"], user.id, used + 1, answer,
                                            status="grading", client_key=key)
            if row["status"] == "graded":
                await assignments_repo.on_grade_final(conn, state.redis, row)
        if row["status"] == "grading":
            from ingest.grading import enqueue_grade

            try:
                await enqueue_grade(state.arq, state.pool, row["id"])
            except Exception:  # noqa: BLE001 - the attempt is stored; grading recovery queues it
                logger.warning("could not queue grading of submission %s now; recovery will", row["id"],
                               exc_info=True)
        return Response(to_submission(row, user), status_code=201)

    @get("/assignments/{assignment_id:int}/submissions")
    async def list_submissions(self, request: Request, assignment_id: int, limit: int = PageLimit,
                               offset: int = Offset) -> SubmissionList:
        """Staff: every submission; learners: their own attempts (their revision history)."""
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            await assignment_or_404(conn, assignment_id, user)
            rows = await repo.list_for_assignment(conn, assignment_id, None if user.is_staff else user.id, limit,
                                                  offset)
        return SubmissionList(items=[to_submission(r, user) for r in rows], limit=limit, offset=offset)

    @post("/assignments/{assignment_id:int}/grade-all", guards=[staff_only], status_code=202)
    async def grade_all(self, request: Request, assignment_id: int) -> Response[BatchAccepted]:
        """(Re)grade every written submission not graded by an instructor, in batched jobs (e.g. after a
        rubric change). Progress: GET /api/v1/jobs/{job_id}. While a grade-all of the assignment is under way and
        the assignment has not changed since it began, another (a double click, a retry) answers 200 with that
        job: starting over would throw away the grades it already made and pay the model twice."""
        from ingest.grading import BATCH_SIZE, enqueue_batches

        state, user = request.app.state, request.user
        async with state.pool.acquire() as conn:
            a = await assignment_or_404(conn, assignment_id, user)
            if a["type"] == "multiple_choice":
                raise ApiError(409, "multiple choice is graded on submission")
            async with conn.transaction():
                # grade-alls of one assignment take turns (the second sees the first's job)
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended('grade-all:' || $1::bigint::text, 0))", assignment_id)
                changed = await conn.fetchval("SELECT updated_at FROM assignments WHERE id = $1", assignment_id)
                running = await conn.fetchrow(
                    """SELECT id, jsonb_array_length(payload -> 'submission_ids') AS n FROM jobs
                       WHERE kind = 'grade' AND state NOT IN ('done', 'failed') AND course_id = $1
                         AND payload ->> 'assignment_id' = $2::bigint::text AND created_at >= $3
                       ORDER BY id DESC LIMIT 1""", a["course_id"], assignment_id, changed)
                if running is not None:
                    n = running["n"] or 0
                    return Response(BatchAccepted(job_id=running["id"], submissions=n, batches=-(-n // BATCH_SIZE)),
                                    status_code=200)
                ids = await repo.written_for_assignment(conn, assignment_id)
                job = await jobs_repo.create_job(conn, "grade", course_id=a["course_id"], video_id=None,
                                                 created_by=user.id, payload={"assignment_id": assignment_id,
                                                                              "submission_ids": ids})
                ids = await repo.mark_grading(conn, ids, None)
                if not ids:
                    await jobs_repo.set_state(conn, job["id"], "done", 1.0)
        try:
            batches = await enqueue_batches(state.arq, state.pool, job["id"], ids) if ids else 0
        except Exception:  # noqa: BLE001 - the job and its marks are stored; grading recovery queues them
            logger.warning("could not queue grade-all job %s now; recovery will", job["id"], exc_info=True)
            batches = 0
        return Response(BatchAccepted(job_id=job["id"], submissions=len(ids), batches=batches), status_code=202)

    @get("/submissions/{submission_id:int}")
    async def read(self, request: Request, submission_id: int) -> Submission:
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            row = await _submission_or_404(conn, submission_id, user)
            history = None
            if user.is_staff:
                await course_or_404(conn, row["course_id"], user, missing=f"submission {submission_id} not found")
                history = [dict(h) for h in await repo.history(conn, submission_id)]
        return to_submission(row, user, history)

    @post("/submissions/{submission_id:int}/regrade", guards=[staff_only], status_code=202)
    async def regrade(self, request: Request, submission_id: int) -> Submission:
        """Grade one written answer again automatically: one the grader could not grade (the model away: held for
        review saying why), or one to grade after a rubric change, without sending the whole assignment back
        (grade-all). The learner keeps seeing the grade they were given until the new one is final. An
        instructor's own grade is kept (409 `reviewed`); one being graded is left to that run."""
        from ingest.grading import enqueue_grade

        state, user = request.app.state, request.user
        async with state.pool.acquire() as conn:
            row = await _submission_or_404(conn, submission_id, user)
            await course_or_404(conn, row["course_id"], user, missing=f"submission {submission_id} not found")
            kind = await conn.fetchval("SELECT type FROM assignments WHERE id = $1", row["assignment_id"])
            if kind == "multiple_choice":
                raise ApiError(409, "multiple choice is graded on submission")
            async with conn.transaction():
                row = await repo.get(conn, submission_id, lock=True)
                if row is None:
                    raise ApiError(404, f"submission {submission_id} not found")
                if row["reviewed_by"] is not None:
                    raise ApiError(409, "an instructor graded this answer; change the grade with POST "
                                        f"/submissions/{submission_id}/review", code="reviewed")
                marked = row["status"] != "grading" and await repo.mark_grading(conn, [submission_id], None)
            if marked:
                try:
                    await enqueue_grade(state.arq, state.pool, submission_id)
                except Exception:  # noqa: BLE001 - marked `grading`: grading recovery queues it
                    logger.warning("could not queue grading of submission %s now; recovery will", submission_id,
                                   exc_info=True)
            row = await repo.get_with_context(conn, submission_id)
            history = [dict(h) for h in await repo.history(conn, submission_id)]
        return to_submission(row, user, history)

    @post("/submissions/{submission_id:int}/review", guards=[staff_only], status_code=200)
    async def review(self, request: Request, submission_id: int) -> Submission:
        """Approve the held grade (no `score`) or set another (`score` 0-100), with an optional comment.
        A final grade can be overridden the same way. The learner then gets `grade.ready`."""
        data = await read_json(request, ReviewIn)
        state, user = request.app.state, request.user
        # a blank comment (invisible characters too) keeps the earlier one, as none does
        comment = None if data.comment is None or blank(data.comment) else data.comment.strip()
        async with state.pool.acquire() as conn:
            row = await _submission_or_404(conn, submission_id, user)
            await course_or_404(conn, row["course_id"], user, missing=f"submission {submission_id} not found")
            async with conn.transaction():
                # Reviews of one submission take turns, each deciding on the grade as the last one left it: an
                # approval read before another reviewer's override would have put the old score back.
                row = await repo.get(conn, submission_id, lock=True)
                if row is None:
                    raise ApiError(404, f"submission {submission_id} not found")
                if row["status"] == "grading":
                    raise ApiError(409, "this submission is still being graded", code="grading")
                # to one decimal, as every view shows it: a 59.96 shown as 60 passes, a 99.97 shown as 100 is perfect
                score = round(data.score, 1) if data.score is not None else row["score"]
                if score is None:
                    raise ApiError(400, "the grader proposed no score; give one", field="score")
                criteria = list(row["criteria"] or [])
                rubric = await conn.fetchval("SELECT rubric FROM assignments WHERE id = $1", row["assignment_id"])
                # (a final grade only commented on keeps its criteria as graded: a rubric re-weighted since flattened
                # them over the new weights, each "Adjusted by the instructor": review)
                commented = data.score is None and row["status"] == "graded"
                if rubric and not commented and (not criteria or _as_graded(criteria) != _as_graded(rubric)):
                    # graded against a rubric changed since (criteria renamed, added, removed or weighed otherwise):
                    # its proposal scores criteria the assignment no longer has; or the grader gave none (it could
                    # not grade: an instructor's score made up an "instructor grade" criterion beside the rubric)
                    if criteria and data.score is None:
                        raise ApiError(409, "this grade was proposed for an earlier rubric: regrade it "
                                            f"(POST /submissions/{submission_id}/regrade) or give a score",
                                       code="stale_proposal")
                    criteria = [{"name": c["name"], "points": float(c["points"]), "score": 0.0, "justification": ""}
                                for c in rubric]
                unchanged = (row["status"] == "graded" and row["reviewed_by"] is not None
                             and abs(float(row["score"]) - float(score)) < 0.005  # stored as real
                             and comment in (None, row["review_comment"]))
                if not unchanged:
                    feedback = dict(row["feedback"] or {})
                    if comment:
                        feedback["comment"] = comment
                    if row["score"] is None or abs(float(row["score"]) - float(score)) >= 0.05:
                        # an override: the offline grader's verdict ("Correct.", "does not yet match what was asked")
                        # would contradict the grade the learner reads beside it; a model's "right" says what the
                        # answer got right, kept after the instructor's word
                        said = f"Your instructor set the grade to {float(score):g} out of 100."
                        if str(row["grader"] or "").startswith("llm:") and feedback.get("right"):
                            said = f"{said} {feedback['right']}"
                        feedback["right"] = said
                        if float(score) >= 99.95:  # full marks: nothing is missing, nothing to improve (the
                            feedback.pop("missing", None)  # grader's "could also name 4 more ideas" stood beside
                            feedback.pop("improve", None)  # the instructor's 100)
                        elif row["score"] is not None and _band(float(row["score"])) != _band(float(score)):
                            # across one of the grader's marks (80, 50): its word on what is missing says something
                            # else than the grade (its 100's "Nothing essential is missing." beside the
                            # instructor's 20, its 65's "The key ideas are there" beside a 10); their comment says
                            feedback.pop("missing", None)
                    row = await repo.save_review(conn, submission_id, score=float(score), comment=comment,
                                                 reviewer_id=user.id,
                                                 # an approval keeps the proposal's criteria as they are (rescaled
                                                 # to its one-decimal total they read "Adjusted by the instructor")
                                                 criteria=criteria if data.score is None
                                                 and (criteria or commented) and criteria == list(row["criteria"] or [])
                                                 else rescale(criteria, float(score)),
                                                 feedback=feedback)
                    if row is None:  # not possible while the row is locked; said plainly all the same
                        raise ApiError(409, "this submission is still being graded", code="grading")
            if not unchanged:  # an instructor's grade the learner has already: nothing to store or announce
                await assignments_repo.on_grade_final(conn, state.redis, row)
            history = [dict(h) for h in await repo.history(conn, submission_id)]
        return to_submission(row, user, history)

    @get("/courses/{course_id:int}/grading-queue", guards=[staff_only])
    async def grading_queue(self, request: Request, course_id: int, limit: int = PageLimit,
                            offset: int = Offset) -> Queue:
        """Grades held for an instructor's look, oldest first."""
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            rows = await repo.queue(conn, course_id, limit, offset)
        return Queue(items=[QueueItem(
            submission_id=r["id"], assignment_id=r["assignment_id"], assignment_title=r["assignment_title"],
            assignment_type=r["assignment_type"], prompt=r["prompt"], reference_answer=r["reference_answer"],
            rubric=[Criterion(c["name"], float(c["points"]), c.get("description", "")) for c in r["rubric"] or []],
            user_id=r["user_id"], user_name=r["user_name"], attempt=r["attempt"], answer=r["answer"],
            proposed_score=None if r["score"] is None else round(float(r["score"]), 1),
            confidence=None if r["confidence"] is None else round(float(r["confidence"]), 3), criteria=_criteria(r["criteria"]),
            feedback=r["feedback"], grader=r["grader"], reason=r["review_reason"], created_at=r["created_at"])
            for r in rows], limit=limit, offset=offset)

    @get("/courses/{course_id:int}/me/next")
    async def next_step(self, request: Request, course_id: int, limit: int = ListLimit,
                        offset: int = Offset) -> NextStep:
        """Per concept (chapter): how the learner does; the difficulty to try next; what to rewatch. The step
        is worked out over every concept; `concepts` is paged (`limit`, `offset`), `struggling` is its first
        `limit`, and the totals say how many there are."""
        from server.api.adaptive import next_step

        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, user)
            rows = await repo.learner_results(conn, course_id, user.id)
            why_not = ("only learners submit answers" if user.role != "learner" else None if
                       await courses_repo.is_enrolled(conn, course_id, user.id) else "enroll in the course to practise")
        step = next_step(rows, cannot_submit=why_not)
        return msgspec.structs.replace(step, concepts=step.concepts[offset:offset + limit],
                                       struggling=step.struggling[:limit], concepts_total=len(step.concepts),
                                       struggling_total=len(step.struggling), limit=limit, offset=offset)


def _band(score: float) -> int:
    """Which of the offline grader's verdicts a score gets (agents.grader._feedback: 80 and over, 50 and over)."""
    return 2 if score >= 80 else 1 if score >= 50 else 0


def _as_graded(criteria: list[dict]) -> list[tuple[str, float]]:
    """What a proposal's criteria must still match of the rubric: names and points, in order (a rubric whose points
    changed since was approved as it was graded: the old weights, a total the new rubric would not give)."""
    return [(c["name"], round(float(c["points"]), 2)) for c in criteria]


def rescale(criteria: list[dict], score: float) -> list[dict]:
    """Per-criterion scores that add up to the instructor's total: in proportion to the grader's, each within
    its points, and what a full criterion cannot take goes to those with room left."""
    if not criteria:
        return [{"name": "instructor grade", "points": 100.0, "score": round(score, 1), "justification": ""}]
    points = [float(c["points"]) for c in criteria]
    target = score / 100.0 * (sum(points) or 100.0)
    current = sum(float(c["score"]) for c in criteria)
    new = [min(p, float(c["score"]) * target / current if current > 0 else p * score / 100.0)
           for c, p in zip(criteria, points)]
    short, room = target - sum(new), [p - n for p, n in zip(points, new)]
    if short > 1e-9 and sum(room) > 0:
        new = [n + short * r / sum(room) for n, r in zip(new, room)]
    # to 0.01 of a point, as machine scores are, within each criterion's points; the rounding's few hundredths go
    # where there is room, so the criteria add up to the total
    new = [min(p, max(0.0, round(n, 2))) for n, p in zip(new, points)]
    diff = round(round(target, 2) - sum(new), 2)
    for i in sorted(range(len(new)), key=lambda i: new[i] - points[i] if diff > 0 else -new[i]):
        if abs(diff) < 0.005:
            break
        step = min(diff, points[i] - new[i]) if diff > 0 else max(diff, -new[i])
        new[i], diff = round(new[i] + step, 2), round(diff - step, 2)
    out = []
    for c, n in zip(criteria, new):
        changed = abs(n - float(c["score"])) > 0.005
        note = c.get("justification", "")
        if changed and not note.endswith(_ADJUSTED):  # once, however often it is overridden
            note = f"{note} {_ADJUSTED}"
        out.append({**c, "score": n, "justification": note.strip()})
    return out
