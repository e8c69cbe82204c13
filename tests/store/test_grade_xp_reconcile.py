"""A grade committed without its XP (the process died in between) gets its XP from the reconciler, once."""
from __future__ import annotations

import pytest
from redis.asyncio import Redis

from store.assignments import reconcile_grade_xp
from store.db import create_pool
from tests.conftest import Factory, fetch, run_sync


def _perfect_grade(settings, make: Factory, client, ago: str = "0 s"):  # type: ignore[no-untyped-def]
    """A learner with a final grade of 100 on a published assignment, stored with no XP, made final `ago`: (learner,
    course, assignment)."""
    inst, learner = make.user("instructor"), make.user("learner")
    cid = client.post("/api/v1/courses", json={"title": "XP"}, headers=inst.h).json()["id"]
    aid = fetch(settings, """INSERT INTO assignments (course_id, type, title, prompt, options, correct, status)
                             VALUES ($1, 'multiple_choice', 'Q', 'Pick', '["a","b"]', '[0]', 'published') RETURNING id""",
                cid)[0]["id"]
    fetch(settings, """INSERT INTO submissions (assignment_id, course_id, user_id, attempt, answer, status, score,
                                               final_at)
                       VALUES ($1, $2, $3, 1, '[0]', 'graded', 100, now() - $4::text::interval)""", aid, cid, learner.id,
          ago)
    return learner, cid, aid


async def _twice(settings) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Two reconciler runs in a row: (what the first brought in line, what the second found left)."""
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    redis = Redis.from_url(settings.redis_url)
    try:
        async with pool.acquire() as conn:
            return await reconcile_grade_xp(conn, redis), await reconcile_grade_xp(conn, redis)
    finally:
        await redis.aclose()
        await pool.close()


def test_missing_grade_xp_is_awarded_once(settings, make: Factory, client):
    learner, _, aid = _perfect_grade(settings, make, client)
    old, _, _ = _perfect_grade(settings, make, client, ago="40 days")  # beyond what each run looks at
    first, second = run_sync(_twice(settings))
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

    old, _, _ = _perfect_grade(settings, make, client, ago="40 days")  # beyond what each run looks at
    first, second = run_sync(go())
    assert first >= 1 and second == 0
    assert fetch(settings, "SELECT count(*) AS n FROM xp_events WHERE user_id = $1", old.id)[0]["n"] == 0
    (row,) = fetch(settings, "SELECT score FROM chapter_scores WHERE user_id = $1 AND chapter_id = $2", learner.id, chid)
    assert row["score"] == pytest.approx(0.5)


def test_a_lowered_grade_whose_hook_was_lost_has_its_xp_taken_back(settings, make: Factory, client):
    """A grade lowered below the mark, then the process died before its hook: the reconciler takes the XP back, once;
    raised again (hook lost too) it is earned again under the chain's next key, and a chain in line is left alone."""
    from store import xp

    learner, cid, aid = _perfect_grade(settings, make, client)

    async def go(score: float) -> tuple[int, int]:
        fetch(settings, "UPDATE submissions SET score = $2, final_at = now() WHERE assignment_id = $1 RETURNING 1",
              aid, score)
        return await _twice(settings)

    def ledger() -> tuple[int, set[str]]:
        rows = fetch(settings, "SELECT idempotency_key, points FROM xp_events WHERE user_id = $1", learner.id)
        return sum(r["points"] for r in rows), {r["idempotency_key"] for r in rows}

    async def award_first() -> None:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        redis = Redis.from_url(settings.redis_url)
        try:
            for kind, key in (("assignment_passed", f"assignment:{aid}"), ("perfect_score", f"perfect:{aid}")):
                await xp.award_xp(pool, redis, learner.id, kind, key, course_id=cid)
        finally:
            await redis.aclose()
            await pool.close()

    run_sync(award_first())
    assert ledger() == (150, {f"assignment:{aid}", f"perfect:{aid}"})
    assert run_sync(go(70))[1] == 0  # still a pass, no longer perfect (the first run, or the worker's, did it)
    assert ledger() == (100, {f"assignment:{aid}", f"perfect:{aid}", f"revoke:perfect:{aid}"})
    run_sync(go(10))
    assert ledger()[0] == 0 and f"revoke:assignment:{aid}" in ledger()[1]
    assert run_sync(go(100))[1] == 0
    total, keys = ledger()
    assert total == 150 and {f"assignment:{aid}#2", f"perfect:{aid}#2"} <= keys and len(keys) == 6
    assert fetch(settings, "SELECT xp FROM xp_totals WHERE user_id = $1", learner.id)[0]["xp"] == 150


def test_grade_xp_brought_in_line_by_many_at_once_is_given_once(settings, make: Factory, client):
    """Hooks of two attempts and the reconciler running together: one pass and one bonus, not one each."""
    import asyncio

    from store.assignments import sync_grade_xp

    learner, _, aid = _perfect_grade(settings, make, client)

    async def go() -> list[int]:
        pool = await create_pool(settings.database_url, min_size=6, max_size=6)
        redis = Redis.from_url(settings.redis_url)

        async def one() -> int:
            async with pool.acquire() as conn:
                return await sync_grade_xp(conn, redis, learner.id, aid)
        try:
            return await asyncio.gather(*(one() for _ in range(6)))
        finally:
            await redis.aclose()
            await pool.close()

    assert sum(run_sync(go())) <= 2  # (the worker's reconcile may have got there first)
    assert fetch(settings, "SELECT count(*) AS n FROM xp_events WHERE user_id = $1", learner.id)[0]["n"] == 2
    assert fetch(settings, "SELECT xp FROM xp_totals WHERE user_id = $1", learner.id)[0]["xp"] == 150


def test_the_reconciler_looks_back_from_its_last_run_and_sweeps_the_lookback_hourly(settings, make: Factory, client):
    """Each run checked every grade of 30 days (3-4 s on 600,000): now the grades made final since the last run (and
    a margin), with a full sweep hourly or when Redis lost its note."""
    import time

    from store.assignments import GRADE_XP_FULL_EVERY_S, GRADE_XP_SWEEP_KEY

    learner, _, aid = _perfect_grade(settings, make, client, ago="2 hours")

    async def go(note: dict | None) -> int:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        redis = Redis.from_url(settings.redis_url)
        try:
            await redis.delete(GRADE_XP_SWEEP_KEY)
            if note:
                await redis.hset(GRADE_XP_SWEEP_KEY, mapping=note)
            async with pool.acquire() as conn:
                await reconcile_grade_xp(conn, redis)
            return len(fetch(settings, "SELECT 1 FROM xp_events WHERE user_id = $1", learner.id))
        finally:
            await redis.aclose()
            await pool.close()

    now = time.time()
    assert run_sync(go({"to": now, "full": now})) == 0  # two hours before the last run: not looked at
    assert run_sync(go({"to": now, "full": now - GRADE_XP_FULL_EVERY_S - 5})) == 2  # the hourly sweep finds it
    fetch(settings, "DELETE FROM xp_events WHERE user_id = $1 RETURNING 1", learner.id)
    fetch(settings, "DELETE FROM xp_totals WHERE user_id = $1 RETURNING 1", learner.id)
    assert run_sync(go(None)) == 2  # no note (Redis flushed, a first run): a sweep
    fetch(settings, "DELETE FROM xp_events WHERE user_id = $1 RETURNING 1", learner.id)
    fetch(settings, "DELETE FROM xp_totals WHERE user_id = $1 RETURNING 1", learner.id)
    later = time.time() + 3600  # a note from the future (the database's clock went back): swept, not held off
    assert run_sync(go({"to": later, "full": later})) == 2


def test_a_grade_made_final_as_its_assignment_is_deleted_keeps_the_xp(settings, make: Factory, client):
    """(Tester) a review committed beside a forced deletion of the assignment: its hook found no answers left, took
    the best grade for none and took back every award (8 runs in 12), where a deletion keeps the XP earned."""
    from store.assignments import on_grade_final, sync_grade_xp

    learner, cid, aid = _perfect_grade(settings, make, client)
    sub = fetch(settings, "SELECT * FROM submissions WHERE assignment_id = $1", aid)[0]

    async def go(after_delete: bool) -> int:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        redis = Redis.from_url(settings.redis_url)
        try:
            async with pool.acquire() as conn:
                if not after_delete:
                    return await sync_grade_xp(conn, redis, learner.id, aid)
                await conn.execute("DELETE FROM assignments WHERE id = $1", aid)  # (as the forced DELETE: answers too)
                wrote = await sync_grade_xp(conn, redis, learner.id, aid)
                await on_grade_final(conn, redis, sub)  # the hook of the review that committed first
                return wrote
        finally:
            await redis.aclose()
            await pool.close()

    assert run_sync(go(False)) in (0, 2)  # (the worker's reconcile may have got there first)
    assert fetch(settings, "SELECT xp FROM xp_totals WHERE user_id = $1", learner.id)[0]["xp"] == 150
    assert run_sync(go(True)) == 0
    assert fetch(settings, "SELECT xp FROM xp_totals WHERE user_id = $1", learner.id)[0]["xp"] == 150
    assert not fetch(settings, "SELECT 1 FROM xp_events WHERE user_id = $1 AND kind = 'revoked'", learner.id)
