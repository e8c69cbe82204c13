"""The XP ledger: idempotency under concurrent duplicates, levels, achievements unlocked once, learners only."""
from __future__ import annotations

import asyncio

import pytest

from store import achievements, leaderboards, xp
from store.achievements import level_for
from tests.conftest import Factory
from tests.progress_helpers import xp_store  # noqa: F401 - fixture


@pytest.mark.parametrize("points,level", [(0, 0), (99, 0), (100, 1), (399, 1), (400, 2), (899, 2), (900, 3),
                                          (9_999, 9), (10_000, 10), (62_499, 24), (62_500, 25)])
def test_level_edges(points: int, level: int):
    assert level_for(points) == level
    assert xp.xp_for_level(level) <= points < xp.xp_for_level(level + 1)


def test_achievements_are_data():
    defs = achievements.BY_ID.values()
    assert len(defs) >= 12
    assert {a.tier for a in defs} == set(achievements.TIERS)
    assert len({a.stat for a in defs}) >= 6


async def test_concurrent_duplicates_count_once(make: Factory, xp_store):
    pool, redis = xp_store
    u = make.user("learner")
    # 30 racing copies of one event, and 10 distinct events racing beside them
    dup = [xp.award_xp(pool, redis, u.id, "lesson_completed", "lesson:1") for _ in range(30)]
    distinct = [xp.award_xp(pool, redis, u.id, "helpful_answer", f"helpful:{i}") for i in range(10)]
    got = await asyncio.gather(*dup, *distinct)
    assert sum(a is not None for a in got[:30]) == 1
    assert all(a is not None for a in got[30:])
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT kind, count(*) AS n FROM xp_events WHERE user_id = $1 GROUP BY kind", u.id)
        total, counts = await xp.totals(conn, u.id)
    assert {r["kind"]: r["n"] for r in rows} == {"lesson_completed": 1, "helpful_answer": 10}
    assert total == 50 + 10 * 25 and counts == {"lesson_completed": 1, "helpful_answer": 10}
    board = await leaderboards.read(redis, "tenant", u.tenant_id, u.tenant_id, "all", u.id)
    assert board.me is not None and board.me.xp == total and board.me.rank == 1
    assert [e.user_id for e in board.entries] == [u.id] and board.entries[0].name == u.name
    # again, later: still once
    assert await xp.award_xp(pool, redis, u.id, "lesson_completed", "lesson:1") is None


async def test_only_learners_earn(make: Factory, xp_store):
    pool, redis = xp_store
    inst = make.user("instructor")
    assert await xp.award_xp(pool, redis, inst.id, "lesson_completed", "lesson:1") is None
    with pytest.raises(ValueError):
        await xp.award_xp(pool, redis, make.user().id, "made_up_kind", "x")


async def test_achievements_unlock_once_and_level_up(make: Factory, xp_store):
    pool, redis = xp_store
    u = make.user("learner")
    first = await xp.award_xp(pool, redis, u.id, "lesson_completed", "lesson:1")
    assert [x.achievement.id for x in first.unlocked] == ["first-lesson"]
    assert first.level == 0 and first.previous_level == 0
    second = await xp.award_xp(pool, redis, u.id, "lesson_completed", "lesson:2")
    assert second.unlocked == [] and second.level == 1 and second.previous_level == 0  # 100 XP: level 1
    big = await xp.award_xp(pool, redis, u.id, "course_completed", "course:1", points=2400)  # 2500 XP: level 5
    assert {x.achievement.id for x in big.unlocked} == {"course-1", "level-5"}
    async with pool.acquire() as conn:
        assert await achievements.sync(conn, u.id) == []  # nothing missed
        got = await achievements.unlocked_of(conn, u.id)
    assert set(got) == {"first-lesson", "course-1", "level-5"}


async def test_transaction_rolls_back_awards(make: Factory, xp_store):
    pool, redis = xp_store
    u = make.user("learner")
    with pytest.raises(RuntimeError):
        async with xp.transaction(pool, redis) as tx:
            await tx.award(u.id, "lesson_completed", "lesson:9")
            raise RuntimeError("grade not final after all")
    async with pool.acquire() as conn:
        assert await xp.totals(conn, u.id) == (0, {})
        # a connection already inside a transaction is refused: the commit must be ours to follow
        async with conn.transaction():
            with pytest.raises(RuntimeError):
                await xp.award_xp(conn, redis, u.id, "lesson_completed", "lesson:9")
    assert (await leaderboards.read(redis, "tenant", u.tenant_id, u.tenant_id, "all", u.id)).me is None


async def test_statement_unlocks_exactly_what_the_definitions_say(make: Factory, xp_store):
    """The award statement records the crossed achievements itself; check it against the definitions
    (`achievements.crossed`) over a run of mixed awards, some crossing several thresholds at once."""
    import random

    pool, redis = xp_store
    u = make.user("learner")
    rnd = random.Random(5)
    total, counts, held = 0, {}, set()
    async with pool.acquire() as conn:
        for i in range(60):
            kind = rnd.choice(sorted(xp.POINTS))
            points = rnd.choice([None, None, 0, 700, 3000, 9000])
            a = await xp.insert_award(conn, u.id, kind, f"mix:{i}", points=points)
            gained = xp.POINTS[kind] if points is None else points
            before = achievements.stats(total, counts, 0)
            total, counts = total + gained, dict(counts, **{kind: counts.get(kind, 0) + 1})
            after = {k: v for k, v in achievements.stats(total, counts, 0).items() if k != "streak"}
            want = {x.id for x in achievements.crossed(before, after)} - held
            assert {x.achievement.id for x in a.unlocked} == want, (i, kind, gained)
            held |= want
            assert (a.xp, a.level, a.previous_level) == (total, level_for(total), level_for(total - gained))
        assert set(await achievements.unlocked_of(conn, u.id)) == held
        assert await achievements.sync(conn, u.id) == []  # nothing missed
    assert {"level-5", "level-10", "level-25"} <= held


async def test_a_learner_who_left_a_course_earns_nothing_on_its_pods(xp_store):
    """Pod membership outlives an enrollment (it comes back with a re-enrolment), but a learner who left the
    course earns nothing on its pods' boards meanwhile, and their unlocks are not announced in its pod rooms. The
    ledger row still names the pods (as it names the course): back in the course, the XP counts there as it does on
    the course board."""
    from tests.progress_helpers import course_in_new_tenant

    pool, redis = xp_store
    async with pool.acquire() as conn:
        cid, _, (uid,) = await course_in_new_tenant(conn, 1)
        pod = await conn.fetchval("INSERT INTO pods (course_id, name) VALUES ($1, 'p') RETURNING id", cid)
        await conn.execute("INSERT INTO pod_members (pod_id, user_id) VALUES ($1, $2)", pod, uid)
        assert f"pod:{pod}" in await conn.fetchval(f"SELECT {achievements.ROOMS_SQL}", uid)
    before = await xp.award_xp(pool, redis, uid, "daily_streak", "streak:1")
    assert before.pod_ids == [pod]
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM enrollments WHERE course_id = $1 AND user_id = $2", cid, uid)
        assert await conn.fetchval(f"SELECT {achievements.ROOMS_SQL}", uid) == []
    after = await xp.award_xp(pool, redis, uid, "daily_streak", "streak:2")  # no course: every pod it may count on
    assert after.pod_ids == [pod] and after.board_pod_ids == []
    board = await leaderboards.read(redis, "pod", pod, after.tenant_id, "all", uid)
    assert board.me is not None and board.me.xp == before.points
