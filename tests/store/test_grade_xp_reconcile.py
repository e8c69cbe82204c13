"""A grade committed without its XP (the process died in between) gets its XP from the reconciler, once."""
from __future__ import annotations

import pytest
from redis.asyncio import Redis

from store.assignments import reconcile_grade_xp
from store.db import create_pool
from tests.conftest import Factory, fetch, run_sync


def _perfect_grade(settings, make: Factory, client):  # type: ignore[no-untyped-def]
    """A learner with a final grade of 100 on a published assignment, stored with no XP: (learner, course, assignment)."""
    inst, learner = make.user("instructor"), make.user("learner")
    cid = client.post("/api/v1/courses", json={"title": "XP"}, headers=inst.h).json()["id"]
    aid = fetch(settings, """INSERT INTO assignments (course_id, type, title, prompt, options, correct, status)
                             VALUES ($1, 'multiple_choice', 'Q', 'Pick', '["a","b"]', '[0]', 'published') RETURNING id""",
                cid)[0]["id"]
    fetch(settings, """INSERT INTO submissions (assignment_id, course_id, user_id, attempt, answer, status, score,
                                               final_at)
                       VALUES ($1, $2, $3, 1, '[0]', 'graded', 100, now())""", aid, cid, learner.id)
    return learner, cid, aid


def test_missing_grade_xp_is_awarded_once(settings, make: Factory, client):
    learner, _, aid = _perfect_grade(settings, make, client)

    async def go() -> tuple[int, int]:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        redis = Redis.from_url(settings.redis_url)
        try:
            async with pool.acquire() as conn:
                return await reconcile_grade_xp(conn, redis), await reconcile_grade_xp(conn, redis)
        finally:
            await redis.aclose()
            await pool.close()

    old, _, old_aid = _perfect_grade(settings, make, client)  # graded long ago: beyond what each run looks at
    fetch(settings, "UPDATE submissions SET final_at = now() - interval '40 days' WHERE assignment_id = $1 "
                    "RETURNING 1", old_aid)
    first, second = run_sync(go())
    assert first >= 1 and second == 0
    assert fetch(settings, "SELECT count(*) AS n FROM xp_events WHERE user_id = $1", old.id)[0]["n"] == 0
    keys = {r["idempotency_key"] for r in fetch(settings, "SELECT idempotency_key FROM xp_events WHERE user_id = $1",
                                                 learner.id)}
    assert keys == {f"assignment:{aid}", f"perfect:{aid}"}


def test_a_lost_perfect_score_bonus_is_awarded(settings, make: Factory, client):
    """The pass was awarded but the perfect-score bonus was not (a crash between the two, before they were one
    transaction): the reconciler gives the bonus."""
    learner, cid, aid = _perfect_grade(settings, make, client)

    async def go() -> int:
        from store import xp

        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        redis = Redis.from_url(settings.redis_url)
        try:
            await xp.award_xp(pool, redis, learner.id, "assignment_passed", f"assignment:{aid}", course_id=cid)
            async with pool.acquire() as conn:
                return await reconcile_grade_xp(conn, redis)
        finally:
            await redis.aclose()
            await pool.close()

    assert run_sync(go()) >= 1
    keys = {r["idempotency_key"] for r in fetch(settings, "SELECT idempotency_key FROM xp_events WHERE user_id = $1",
                                                 learner.id)}
    assert keys == {f"assignment:{aid}", f"perfect:{aid}"}


def test_a_chapter_strength_that_missed_a_final_grade_is_recomputed(settings, make: Factory, client):
    """The grade committed, then the process died before the learner's chapter strength (read by the matcher)
    was updated: the reconciler computes it, once."""
    from store.assignments import reconcile_chapter_scores

    inst, learner = make.user("instructor"), make.user("learner")
    cid = client.post("/api/v1/courses", json={"title": "Strength"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'v', 'transcript', "
                          "'ready') RETURNING id", cid)[0]["id"]
    chid = fetch(settings, "INSERT INTO chapters (video_id, idx, start_s, end_s, title) VALUES ($1, 0, 0, 60, 'c') "
                           "RETURNING id", vid)[0]["id"]
    aid = fetch(settings, """INSERT INTO assignments (course_id, type, title, prompt, status, video_id, chapter_id)
                             VALUES ($1, 'short_answer', 'Q', 'Why?', 'published', $2, $3) RETURNING id""",
                cid, vid, chid)[0]["id"]
    fetch(settings, """INSERT INTO submissions (assignment_id, course_id, user_id, attempt, answer, status, score,
                                                final_at)
                       VALUES ($1, $2, $3, 1, '"because"', 'graded', 50, now())""", aid, cid, learner.id)
    # (a failing grade: a passing one would leave XP for the running worker's reconcile to award during later tests)

    async def go() -> tuple[int, int]:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                return await reconcile_chapter_scores(conn), await reconcile_chapter_scores(conn)
        finally:
            await pool.close()

    old, _, old_aid = _perfect_grade(settings, make, client)  # graded long ago: beyond what each run looks at
    fetch(settings, "UPDATE submissions SET final_at = now() - interval '40 days' WHERE assignment_id = $1 "
                    "RETURNING 1", old_aid)
    first, second = run_sync(go())
    assert first >= 1 and second == 0
    assert fetch(settings, "SELECT count(*) AS n FROM xp_events WHERE user_id = $1", old.id)[0]["n"] == 0
    (row,) = fetch(settings, "SELECT score FROM chapter_scores WHERE user_id = $1 AND chapter_id = $2", learner.id, chid)
    assert row["score"] == pytest.approx(0.5)
