"""Leaderboards: period keys roll over and expire on their own; a rebuild equals the ledger exactly, also
while awards keep arriving. Runs on its own Redis database so it can flush it."""
from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import pytest
from redis.asyncio import Redis

from store import keys, leaderboard_rebuild, leaderboards, xp
from store.db import create_pool
from tests.conftest import Factory
from tests.progress_helpers import ledger_boards, redis_boards


def redis_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@pytest.fixture
async def lb(settings):  # type: ignore[no-untyped-def]
    pool = await create_pool(settings.database_url, min_size=1, max_size=10)
    redis = Redis.from_url(redis_db(settings.redis_url, 3))
    await redis.flushdb()
    yield pool, redis
    await redis.flushdb()
    await redis.aclose()
    await pool.close()


def test_period_keys():
    at = datetime(2025, 12, 31, 23, 59, tzinfo=timezone.utc)  # Wednesday of ISO week 2026-W01
    assert leaderboards.board_key("course", 7, "all", at) == "sh:lb:course:7:all"
    assert leaderboards.board_key("course", 7, "month", at) == "sh:lb:course:7:m:2025-12"
    assert leaderboards.board_key("course", 7, "week", at) == "sh:lb:course:7:w:2026-W01"
    start, end = leaderboards.period_bounds("week", at)
    assert (start, end) == (datetime(2025, 12, 29, tzinfo=timezone.utc), datetime(2026, 1, 5, tzinfo=timezone.utc))
    assert leaderboards.expire_at("month", at) == int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()) + 86400
    assert leaderboards.expire_at("all", at) == 0


async def test_weekly_keys_roll_over(make: Factory, lb):
    pool, redis = lb
    a, b = make.user("learner"), make.user("learner")
    now = datetime.now(timezone.utc)
    last_week = now - timedelta(days=7)
    await xp.award_xp(pool, redis, a.id, "lesson_completed", "lesson:1", at=last_week)
    await xp.award_xp(pool, redis, b.id, "lesson_completed", "lesson:2", at=now)
    await xp.award_xp(pool, redis, b.id, "first_lesson", "first_lesson", at=now)
    tid = a.tenant_id
    week = await leaderboards.read(redis, "tenant", tid, tid, "week", a.id)
    assert [(e.user_id, e.xp) for e in week.entries] == [(b.id, 60)] and week.me is None
    all_time = await leaderboards.read(redis, "tenant", tid, tid, "all", a.id)
    assert [(e.user_id, e.xp, e.rank) for e in all_time.entries] == [(b.id, 60, 1), (a.id, 50, 2)]
    # last week's XP went to last week's key, which expires a day after that week ended
    old = leaderboards.board_key("tenant", tid, "week", last_week)
    assert old != leaderboards.board_key("tenant", tid, "week", now)
    ttl_old = await redis.ttl(old)
    assert ttl_old == -2 or 0 < ttl_old <= 86400  # gone already, or going within the grace day
    # this week's key expires a day after the week ends; next week starts empty
    _, end = leaderboards.period_bounds("week", now)
    ttl = await redis.ttl(leaderboards.board_key("tenant", tid, "week", now))
    assert abs(ttl - ((end - now).total_seconds() + 86400)) < 5
    nxt = await leaderboards.read(redis, "tenant", tid, tid, "week", b.id, at=now + timedelta(days=7))
    assert nxt.entries == [] and nxt.me is None


async def test_ranks_ties_and_neighbours(make: Factory, lb):
    pool, redis = lb
    users = [make.user("learner") for _ in range(7)]
    points = [500, 300, 300, 200, 100, 100, 50]
    for u, p in zip(users, points):
        await xp.award_xp(pool, redis, u.id, "course_completed", "course:1", points=p)
    tid = users[0].tenant_id
    board = await leaderboards.read(redis, "tenant", tid, tid, "all", users[3].id, limit=3)
    assert [e.xp for e in board.entries] == [500, 300, 300]
    assert [e.rank for e in board.entries] == [1, 2, 2]
    assert board.count == 7
    assert board.me.rank == 4 and board.me.xp == 200
    assert [e.rank for e in board.neighbours] == [2, 2, 4, 5, 5]
    assert [e.xp for e in board.neighbours] == [300, 300, 200, 100, 100]
    tied = await leaderboards.read(redis, "tenant", tid, tid, "all", users[5].id, limit=3)
    assert tied.me.rank == 5 and tied.me.xp == 100  # equal XP, equal rank, whatever the order
    last = await leaderboards.read(redis, "tenant", tid, tid, "all", users[6].id, limit=3)
    assert last.me.rank == 7 and [e.rank for e in last.neighbours] == [5, 5, 7]
    assert {e.name for e in board.neighbours} <= {u.name for u in users}
    # (Tester) a learner whose XP was all taken back (a helpful mark removed) stood on the board at 0, counted and
    # ranked below everyone, while learners who never earned any are not listed
    zero = make.user("learner")
    await xp.award_xp(pool, redis, zero.id, "helpful_answer", "helpful:1")
    async with xp.transaction(pool, redis) as tx:
        assert await tx.revoke(zero.id, "helpful:1") is not None
    assert await redis.zscore(leaderboards.board_key("tenant", tid, "all"), str(zero.id)) == 0  # (updates add up
    # in any order: a take-back applied before its award must not remove the member)
    reads = [await leaderboards.read(redis, "tenant", tid, tid, "all", u.id, limit=10) for u in (zero, users[6])]
    for b in reads:
        assert b.count == 7 and zero.id not in [e.user_id for e in b.entries + b.neighbours], b
    assert reads[0].me is None and reads[1].me.rank == 7 and [e.rank for e in reads[1].neighbours] == [5, 5, 7]
    async with pool.acquire() as conn:  # the ledger's reading (while Redis has no boards) is the same
        from_ledger = [await leaderboard_rebuild.read_ledger(conn, "tenant", tid, "all", u.id, limit=10)
                       for u in (zero, users[6])]
    assert [(b.entries, b.me, b.neighbours, b.count) for b in from_ledger] == \
        [(b.entries, b.me, b.neighbours, b.count) for b in reads]


async def test_awards_made_while_redis_failed_reach_the_boards_once_it_answers(make: Factory, lb):
    """XP awarded while Redis was down (a restart under running servers: no startup check sees it) stayed off the
    boards until the hourly check, up to an hour with `leaderboards check` failing: the process that missed the
    update checks those tenants' boards against the ledger as soon as Redis answers, and rebuilds them."""
    pool, redis = lb
    u = make.user("learner")
    await leaderboard_rebuild.rebuild(pool, redis)
    await xp.award_xp(pool, redis, u.id, "helpful_answer", "h:before")
    board = leaderboards.board_key("tenant", u.tenant_id, "all")
    xp.MISSED_TENANTS.clear()
    down = Redis.from_url("redis://127.0.0.1:1/0")  # nothing listens there
    try:
        assert await xp.award_xp(pool, down, u.id, "helpful_answer", "h:down") is not None  # stored all the same
        assert not await xp.repair_missed(pool, down)  # still down: kept for later
    finally:
        await down.aclose()
    assert xp.MISSED_TENANTS == {u.tenant_id} and await redis.zscore(board, str(u.id)) == 25
    assert await xp.repair_missed(pool, redis)
    assert await redis.zscore(board, str(u.id)) == 50 and not xp.MISSED_TENANTS


async def test_a_stop_ends_a_repair_in_flight_before_the_pool_closes(make: Factory, lb):
    """(Review) a repair the hub tick or the worker loop started was left running at a stop, its pool then closed
    under it; `stop_repair` ends it. The tenants stay listed for a later repair."""
    pool, _ = lb
    u = make.user("learner")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)  # a Redis that accepts and never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    hung = Redis.from_url(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0")
    xp.MISSED_TENANTS.clear()
    xp.MISSED_TENANTS.add(u.tenant_id)
    try:
        xp.repair_missed_soon(pool, hung)
        task = xp._repairing
        assert task is not None
        await asyncio.sleep(0.2)
        assert not task.done()  # waiting on the silent Redis
        await xp.stop_repair(timeout=5)
        assert task.done() and xp.MISSED_TENANTS == {u.tenant_id}
    finally:
        xp.MISSED_TENANTS.clear()
        await hung.aclose()
        server.close()


async def test_reads_from_redis_and_from_the_ledger_agree_with_learners_at_0_and_ties(make: Factory, lb):
    """(Review) every caller, every limit: the same entries, rank, neighbours and count, with ties and with learners
    whose XP was all taken back (at 0 in Redis, left out of both)."""
    pool, redis = lb
    rnd = random.Random(7)
    users = [make.user("learner") for _ in range(14)]
    tid = users[0].tenant_id
    for i, u in enumerate(users):
        await xp.award_xp(pool, redis, u.id, "course_completed", f"c:{i}", points=rnd.choice([50, 50, 100, 100, 200]))
        if rnd.random() < 0.45:
            async with xp.transaction(pool, redis) as tx:
                await tx.revoke(u.id, f"c:{i}")
    for limit in (1, 3, 5, 14):
        for u in users:
            r = await leaderboards.read(redis, "tenant", tid, tid, "all", u.id, limit=limit)
            async with pool.acquire() as conn:
                got = await leaderboard_rebuild.read_ledger(conn, "tenant", tid, "all", u.id, limit=limit)
            assert (r.entries, r.me, r.neighbours, r.count) == (got.entries, got.me, got.neighbours, got.count), \
                (limit, u.id)
    assert 0 < r.count < len(users)


async def test_flush_then_rebuild_is_identical(make: Factory, lb):
    pool, redis = lb
    f2 = Factory(make.settings)
    users = [make.user("learner") for _ in range(6)] + [f2.user("learner") for _ in range(3)]
    async with pool.acquire() as conn:
        cid = await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'c') RETURNING id",
                                  users[0].tenant_id, users[0].id)
        pod = await conn.fetchval("INSERT INTO pods (course_id, name) VALUES ($1, 'p') RETURNING id", cid)
        for u in users[:4]:
            await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", cid, u.id)
            await conn.execute("INSERT INTO pod_members (pod_id, user_id) VALUES ($1, $2)", pod, u.id)
    now = datetime.now(timezone.utc)
    rnd = random.Random(7)
    for i in range(60):
        u = rnd.choice(users)
        at = now - timedelta(days=rnd.choice([0, 0, 1, 3, 8, 20, 40, 400]))
        course = cid if u in users[:4] and rnd.random() < 0.7 else None
        await xp.award_xp(pool, redis, u.id, "helpful_answer", f"h:{i}", course_id=course, at=at,
                          points=rnd.choice([10, 25, 25, 50]))
    async with pool.acquire() as conn:
        want = await ledger_boards(conn, now)
    scopes = [("tenant", users[0].tenant_id), ("tenant", users[-1].tenant_id), ("course", cid), ("pod", pod)]
    mine = [leaderboards.board_key(sc, sid, p, now) for sc, sid in scopes for p in leaderboards.PERIODS]
    mine = [k for k in mine if k in want]
    assert len(mine) >= 10
    before = await redis_boards(redis, mine)
    assert before == {k: want[k] for k in mine}  # the live updates agree with the ledger
    tenant_of = {users[0].tenant_id: users[0].tenant_id, users[-1].tenant_id: users[-1].tenant_id}
    reads = [(sc, sid, p, tenant_of.get(sid, users[0].tenant_id)) for sc, sid in scopes for p in leaderboards.PERIODS]
    ranks_before = [await leaderboards.read(redis, sc, sid, t, p, users[0].id, limit=100) for sc, sid, p, t in reads]
    viewers = [u for u in users[:6] if u.tenant_id == users[0].tenant_id] + users[-2:]
    short_before = [await leaderboards.read(redis, sc, sid, t, p, u.id, limit=2)
                    for sc, sid, p, t in reads for u in viewers]

    def seen(boards: list[leaderboards.Board]) -> list:  # type: ignore[type-arg]
        return [(b.entries, b.me, b.neighbours, b.count) for b in boards]

    await redis.flushdb()
    assert (await leaderboards.read(redis, "tenant", users[0].tenant_id, users[0].tenant_id, "all", 0)).built is False
    # until the rebuild is done a read answers from the ledger: the same entries, ranks, neighbours and counts
    async with pool.acquire() as conn:
        assert seen([await leaderboard_rebuild.read_ledger(conn, sc, sid, p, users[0].id, limit=100)
                     for sc, sid, p, _ in reads]) == seen(ranks_before)
        assert seen([await leaderboard_rebuild.read_ledger(conn, sc, sid, p, u.id, limit=2)
                     for sc, sid, p, _ in reads for u in viewers]) == seen(short_before)
    assert any(b.me is not None and b.me.rank > 4 for b in short_before)  # neighbours beyond the top
    assert any(len({e.xp for e in b.entries}) < len(b.entries) for b in ranks_before)  # ties, in Redis's order
    done = await leaderboard_rebuild.ensure_built(pool, redis)
    assert done is not None and done.replayed == 0
    assert await leaderboard_rebuild.ensure_built(pool, redis) is None  # built: nothing to do
    assert await redis_boards(redis, mine) == before
    for k in mine:  # all-time boards never expire; period boards a day after their period
        ttl = await redis.ttl(k)
        assert ttl == -1 if k.endswith(":all") else abs(ttl - (leaderboards.expire_at(
            "month" if ":m:" in k else "week", now) - time.time())) < 5, (k, ttl)
    assert await redis.keys("sh:lb:tmp:*") == []
    ranks_after = [await leaderboards.read(redis, sc, sid, t, p, users[0].id, limit=100) for sc, sid, p, t in reads]
    assert [(b.entries, b.me, b.neighbours, b.count) for b in ranks_after] == \
        [(b.entries, b.me, b.neighbours, b.count) for b in ranks_before]
    assert any(b.me is not None for b in ranks_after) and all(b.built for b in ranks_after)
    assert await leaderboard_rebuild.check(pool, redis, tenant_ids=sorted({u.tenant_id for u in users})) == []


async def test_boards_ahead_of_a_restored_ledger_are_rebuilt_at_startup(make: Factory, lb):
    """Postgres restored from a backup under the same Redis: the ledger lost its newest events, the boards still
    count them. The startup check sees the boards hold a later ledger id than the ledger has and rebuilds."""
    pool, redis = lb
    a, b = make.user("learner"), make.user("learner")
    tid = a.tenant_id
    await xp.award_xp(pool, redis, a.id, "lesson_completed", "restore:1")
    await xp.award_xp(pool, redis, b.id, "helpful_answer", "restore:2")
    assert await leaderboard_rebuild.ensure_built(pool, redis) is not None  # first start: built
    assert await leaderboard_rebuild.ensure_built(pool, redis) is None  # nothing lost: nothing to do
    lost = await xp.award_xp(pool, redis, a.id, "course_completed", "restore:3")
    assert lost is not None
    board = await leaderboards.read(redis, "tenant", tid, tid, "all", a.id)
    assert board.me is not None and board.me.xp == 550
    async with pool.acquire() as conn:  # the backup was taken before that award
        await conn.execute("DELETE FROM xp_events WHERE id = $1", lost.id)
        await conn.execute("UPDATE xp_totals SET xp = xp - 500 WHERE user_id = $1", a.id)
    assert await leaderboard_rebuild.ensure_built(pool, redis) is not None
    board = await leaderboards.read(redis, "tenant", tid, tid, "all", a.id)
    assert board.me is not None and board.me.xp == 50
    assert await leaderboard_rebuild.ensure_built(pool, redis) is None  # rebuilt: the marks agree again
    again = await xp.award_xp(pool, redis, a.id, "course_completed", "restore:4")  # the ledger carries on
    assert again is not None and int(await redis.get(keys.LEADERBOARD_HIGH)) == again.id
    assert await leaderboard_rebuild.ensure_built(pool, redis) is None


async def test_a_batch_of_awards_takes_each_room_window_once(make: Factory, lb):
    """Awards settled together (a lesson and a first lesson in one transaction) announce each room once: the
    first award naming the room takes its window, the others neither try again nor leave the board due for a
    second announcement at the window's end."""
    pool, redis = lb
    u = make.user("learner")
    async with pool.acquire() as conn:
        cid = await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'c') RETURNING id",
                                  u.tenant_id, u.id)
        await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", cid, u.id)
    async with xp.transaction(pool, redis) as tx:
        await tx.award(u.id, "lesson_completed", "batch:1", course_id=cid)
        await tx.award(u.id, "first_lesson", "batch:2", course_id=cid)
    assert await redis.pttl(keys.leaderboard_throttle("course", cid)) > 0  # the window: taken, announced
    assert await redis.zrange(keys.LEADERBOARD_DUE, 0, -1) == []
    await leaderboards.drain()


async def test_due_boards_a_failed_look_did_not_tell_stay_due(lb, monkeypatch):
    """`take_due` takes the due boards off the list before telling them; those it could not tell (Redis failed,
    the duty ran out of time) go back on the list for the next look instead of being lost."""
    _, redis = lb
    await redis.zadd(keys.LEADERBOARD_DUE, {"course:1:9": 0, "course:2:9": 0, "course:3:9": 0})
    told: list[int] = []

    async def flaky(redis, scope, scope_id, tenant_id):  # type: ignore[no-untyped-def]
        if scope_id == 2 and not told.count(-2):
            told.append(-2)
            raise ConnectionError("Redis went away")
        told.append(scope_id)

    monkeypatch.setattr(leaderboards, "nudge", flaky)
    with pytest.raises(ConnectionError):
        await leaderboards.take_due(redis)
    assert told == [1, -2]
    assert sorted(await redis.zrange(keys.LEADERBOARD_DUE, 0, -1)) == [b"course:2:9", b"course:3:9"]
    assert await leaderboards.take_due(redis) == 2
    assert told == [1, -2, 2, 3] and await redis.zrange(keys.LEADERBOARD_DUE, 0, -1) == []


async def test_rebuild_while_awards_arrive(make: Factory, lb):
    pool, redis = lb
    users = [make.user("learner") for _ in range(20)]
    for i, u in enumerate(users):
        await xp.award_xp(pool, redis, u.id, "helpful_answer", "warm", points=i)
    await redis.delete(keys.LEADERBOARD_BUILT)
    stop = time.monotonic() + 60

    async def awarding(k: int) -> None:
        for i in range(40):
            await xp.award_xp(pool, redis, users[(k * 7 + i) % 20].id, "helpful_answer", f"race:{k}:{i}")
            if time.monotonic() > stop:
                return

    results = await asyncio.gather(leaderboard_rebuild.rebuild(pool, redis), *(awarding(k) for k in range(4)),
                                   leaderboard_rebuild.rebuild(pool, redis))
    assert sum(r is not None for r in (results[0], results[-1])) >= 1
    assert await leaderboard_rebuild.check(pool, redis, tenant_ids=[users[0].tenant_id]) == []
    async with pool.acquire() as conn:
        want = await ledger_boards(conn)
    tid = users[0].tenant_id
    mine = [k for k in want if k.startswith(f"sh:lb:tenant:{tid}:")]
    assert await redis_boards(redis, mine) == {k: want[k] for k in mine}
    assert not await redis.exists(keys.LEADERBOARD_BUILDING) and not await redis.exists(keys.LEADERBOARD_LOCK)


async def test_hourly_check_repairs_a_drifted_board(make: Factory, lb):
    pool, redis = lb
    u, v = make.user("learner"), make.user("learner")
    await xp.award_xp(pool, redis, u.id, "lesson_completed", "lesson:1")
    await xp.award_xp(pool, redis, v.id, "helpful_answer", "helpful:1")
    mine = [u.tenant_id]  # other tenants' XP in the shared ledger (a worker's award meanwhile) is not this test's
    assert await leaderboard_rebuild.check_and_repair(pool, redis, tenant_ids=mine) is not None  # never built here
    assert await leaderboard_rebuild.check_and_repair(pool, redis, tenant_ids=mine) is None  # all agree: nothing to do
    key = leaderboards.board_key("tenant", u.tenant_id, "all")
    await redis.zincrby(key, 500, str(v.id))  # e.g. a process died between its commit and its board update
    assert await leaderboard_rebuild.check(pool, redis, tenant_ids=[u.tenant_id]) == [key]
    assert await leaderboard_rebuild.check_and_repair(pool, redis, tenant_ids=[u.tenant_id]) is not None
    board = await leaderboards.read(redis, "tenant", u.tenant_id, u.tenant_id, "all", v.id)
    assert [(e.user_id, e.xp) for e in board.entries] == [(u.id, 50), (v.id, 25)]
    # this week's and month's boards are checked too: one lost on its own (evicted: they are the keys with an
    # expiry) came back with only the next award's XP and stayed wrong until the period ended
    week, month = (leaderboards.board_key("tenant", u.tenant_id, p) for p in ("week", "month"))
    await redis.delete(week)
    await redis.zincrby(month, -20, str(u.id))
    assert await leaderboard_rebuild.check(pool, redis, settle_s=0.05, tenant_ids=mine) == sorted([week, month])
    assert await leaderboard_rebuild.check_and_repair(pool, redis, tenant_ids=mine) is not None
    for period in ("week", "month"):
        board = await leaderboards.read(redis, "tenant", u.tenant_id, u.tenant_id, period, v.id)
        assert [(e.user_id, e.xp) for e in board.entries] == [(u.id, 50), (v.id, 25)], period
    assert await leaderboard_rebuild.check(pool, redis, settle_s=0.05, tenant_ids=mine) == []


async def test_a_rebuild_deletes_current_boards_the_ledger_has_nothing_for(lb):
    """XP on boards whose ledger rows are gone (an asynchronously committed award lost in a Postgres crash; a
    deleted course or pod) is not kept by a rebuild: it builds what the ledger has and deletes the rest of the
    current boards, while boards the ledger does have stay."""
    from tests.progress_helpers import course_in_new_tenant

    pool, redis = lb
    async with pool.acquire() as conn:
        cid, _, (lost, kept) = await course_in_new_tenant(conn, 2)
        pod = await conn.fetchval("INSERT INTO pods (course_id, name) VALUES ($1, 'p') RETURNING id", cid)
        await conn.execute("INSERT INTO pod_members (pod_id, user_id) VALUES ($1, $2)", pod, lost)
    gone = await xp.award_xp(pool, redis, lost, "helpful_answer", "helpful:lost", course_id=cid)
    await xp.award_xp(pool, redis, kept, "helpful_answer", "helpful:kept")  # tenant boards only
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM xp_events WHERE id = $1", gone.id)
        await conn.execute("DELETE FROM xp_totals WHERE user_id = $1", lost)
    await redis.delete(keys.LEADERBOARD_LOCK)
    assert await leaderboard_rebuild.rebuild(pool, redis) is not None
    for scope, sid in (("course", cid), ("pod", pod)):
        for period in ("all", "month", "week"):
            assert not await redis.exists(leaderboards.board_key(scope, sid, period)), (scope, period)
    for period in ("all", "month", "week"):
        board = await leaderboards.read(redis, "tenant", gone.tenant_id, gone.tenant_id, period, kept)
        assert [(e.user_id, e.xp) for e in board.entries] == [(kept, 25)], period


async def test_a_rebuild_that_lost_its_boards_midway_swaps_nothing_and_the_next_one_builds(lb, monkeypatch):
    """Redis lost the temporary boards (flushed, restarted, evicting) between their writing and the swap: the swap
    deleted every live board as if the ledger had nothing for it and marked them built, so reads showed empty
    boards, as built, until the hourly check."""
    from redis.exceptions import ResponseError

    from tests.progress_helpers import course_in_new_tenant

    pool, redis = lb
    async with pool.acquire() as conn:
        cid, _, learners = await course_in_new_tenant(conn, 3)
    for u in learners:
        a = await xp.award_xp(pool, redis, u, "helpful_answer", f"helpful:{u}", course_id=cid)
    tenant = a.tenant_id
    real = leaderboard_rebuild._stale_boards

    async def flushed_first(*args, **kw):  # type: ignore[no-untyped-def]
        await redis.flushdb()
        return await real(*args, **kw)

    monkeypatch.setattr(leaderboard_rebuild, "_stale_boards", flushed_first)
    await redis.delete(keys.LEADERBOARD_LOCK)
    with pytest.raises(ResponseError, match="lost"):
        await leaderboard_rebuild.rebuild(pool, redis)
    assert not await redis.exists(keys.LEADERBOARD_BUILT)  # so the next read or start rebuilds
    monkeypatch.setattr(leaderboard_rebuild, "_stale_boards", real)
    assert await leaderboard_rebuild.ensure_built(pool, redis) is not None
    board = await leaderboards.read(redis, "tenant", tenant, tenant, "all", learners[0])
    assert board.count == 3 and board.built

    # one temporary board evicted (lock and flag still there): nothing is swapped, the live boards stay
    async def one_evicted(*args, **kw):  # type: ignore[no-untyped-def]
        temp = [k async for k in redis.scan_iter("sh:lb:tmp:*")]
        await redis.delete(temp[0])
        return await real(*args, **kw)

    monkeypatch.setattr(leaderboard_rebuild, "_stale_boards", one_evicted)
    await redis.delete(keys.LEADERBOARD_LOCK)
    with pytest.raises(ResponseError, match="lost its boards"):
        await leaderboard_rebuild.rebuild(pool, redis)
    board = await leaderboards.read(redis, "tenant", tenant, tenant, "all", learners[0])
    assert board.count == 3 and board.built


async def test_an_award_in_flight_is_not_drift(make: Factory, lb):
    """An award committed to the ledger whose board update lands a moment later (its process is between the
    two) is not reported as drift, so the hourly check does not rebuild every busy hour."""
    pool, redis = lb
    u = make.user("learner")
    await xp.award_xp(pool, redis, u.id, "lesson_completed", "lesson:1")
    assert await leaderboard_rebuild.check_and_repair(pool, redis, tenant_ids=[u.tenant_id]) is not None  # built
    async with pool.acquire() as conn:
        in_flight = await xp.insert_award(conn, u.id, "helpful_answer", "helpful:1")  # committed, not on the board

    async def lands_later() -> None:
        await asyncio.sleep(0.2)
        await xp.settle(redis, [in_flight])

    landing = asyncio.create_task(lands_later())
    assert await leaderboard_rebuild.check(pool, redis, settle_s=1.0, tenant_ids=[u.tenant_id]) == []
    await landing
    assert await leaderboard_rebuild.check_and_repair(pool, redis, tenant_ids=[u.tenant_id]) is None


async def test_a_board_update_arriving_after_a_rebuild_is_not_counted_twice(make: Factory, lb):
    """An award committed before a rebuild read the ledger, whose board update comes only after the swap (its
    process stalled in between), is already on the rebuilt boards: it must not count again. One committed
    after that read still counts."""
    pool, redis = lb
    u = make.user("learner")
    await xp.award_xp(pool, redis, u.id, "lesson_completed", "lesson:1")
    async with pool.acquire() as conn:
        stalled = await xp.insert_award(conn, u.id, "helpful_answer", "helpful:stalled")  # committed, no Redis yet
    assert await leaderboard_rebuild.rebuild(pool, redis) is not None
    async with pool.acquire() as conn:
        later = await xp.insert_award(conn, u.id, "helpful_answer", "helpful:later")
    await xp.settle(redis, [stalled, later])
    assert await leaderboard_rebuild.check(pool, redis, tenant_ids=[u.tenant_id]) == []
    board = await leaderboards.read(redis, "tenant", u.tenant_id, u.tenant_id, "all", u.id)
    assert board.me is not None and board.me.xp == 50 + 25 + 25


async def test_an_award_a_rebuild_counted_still_counts_on_the_next_weeks_board(make: Factory, lb):
    """A rebuild just before a week ends, an award just after it that committed before the rebuild read the ledger
    and reached Redis only after the swap: the rebuild counted it on the boards it built (all-time, its week), so
    it skipped every board, the new week's too, which the rebuild never built."""
    from datetime import datetime, timedelta, timezone

    pool, redis = lb
    u = make.user("learner")
    sunday = datetime.now(timezone.utc).replace(hour=23, minute=59, second=59, microsecond=0)
    sunday += timedelta(days=(6 - sunday.weekday()) % 7)  # this week's Sunday, a second before it ends
    monday = sunday + timedelta(seconds=1)
    async with pool.acquire() as conn:  # committed at the new week's start, no Redis yet
        stalled = await xp.insert_award(conn, u.id, "helpful_answer", "helpful:monday", at=monday)
    assert await leaderboard_rebuild.rebuild(pool, redis, now=sunday) is not None
    await xp.settle(redis, [stalled])
    tid = u.tenant_id
    assert await redis.zscore(leaderboards.board_key("tenant", tid, "all"), str(u.id)) == 25  # once
    assert await redis.zscore(leaderboards.board_key("tenant", tid, "week", monday), str(u.id)) == 25  # not 0
    assert await redis.zscore(leaderboards.board_key("tenant", tid, "week", sunday), str(u.id)) is None


async def test_awards_after_a_rebuild_count_though_postgres_hands_out_old_transaction_ids(make: Factory, lb):
    """A Postgres restored from a backup (or set up anew) under the same Redis hands out transaction ids the last
    rebuild's snapshot already covers: by id alone, every award of the next hour looked counted by that rebuild and
    was left off the boards. A transaction that began after the snapshot was taken cannot be in it."""
    import re

    pool, redis = lb
    u = make.user("learner")
    await xp.award_xp(pool, redis, u.id, "lesson_completed", "lesson:1")
    assert await leaderboard_rebuild.rebuild(pool, redis) is not None
    # the snapshot's ids moved far past every id Postgres hands out now, as after a restore rewound them
    snap = (await redis.get(keys.LEADERBOARD_SNAPSHOT)).decode()
    rewound = re.sub(r"\d+:\d+:[\d,]*$", f"{10**15}:{10**15}:", snap)
    assert rewound != snap
    await redis.set(keys.LEADERBOARD_SNAPSHOT, rewound, ex=3600)
    await asyncio.sleep(0.01)  # the next transaction begins after the snapshot was taken
    await xp.award_xp(pool, redis, u.id, "helpful_answer", "helpful:after-restore")
    board = await leaderboards.read(redis, "tenant", u.tenant_id, u.tenant_id, "all", u.id)
    assert board.me is not None and board.me.xp == 50 + 25


async def test_a_failing_rebuild_is_not_retried_by_every_read(lb):
    """Reads that find the boards gone start a rebuild; when it fails, the next reads do not start another one
    for a while (each would aggregate the whole ledger again)."""
    from types import SimpleNamespace

    from store.leaderboard_rebuild import rebuild_soon

    _, redis = lb
    state = SimpleNamespace(pool=None, redis=redis)  # no database: the rebuild fails
    rebuild_soon(state)
    first = state.lb_rebuild
    await asyncio.wait([first])
    assert first.exception() is not None
    rebuild_soon(state)
    assert state.lb_rebuild is first  # backing off
    assert not await redis.exists(keys.LEADERBOARD_LOCK)  # the failed rebuild let go of the lock
    # (Review) a stopping server starts none (a hub tick after the lifespan awaited the last one)
    stopped = SimpleNamespace(pool=None, redis=redis, lb_rebuild_stopped=True)
    rebuild_soon(stopped)
    assert getattr(stopped, "lb_rebuild", None) is None


async def test_a_long_rebuild_keeps_its_lock(make: Factory, lb, monkeypatch):
    """The rebuild lock is renewed while the rebuild runs, so a second one cannot start halfway through it."""
    from contextlib import asynccontextmanager
    from types import SimpleNamespace

    pool, redis = lb
    monkeypatch.setattr(leaderboard_rebuild, "LOCK_TTL_S", 1)

    @asynccontextmanager
    async def slow_acquire():  # type: ignore[no-untyped-def]
        await asyncio.sleep(2.5)  # a big ledger
        async with pool.acquire() as conn:
            yield conn

    running = asyncio.create_task(leaderboard_rebuild.rebuild(SimpleNamespace(acquire=slow_acquire), redis))
    await asyncio.sleep(1.8)  # past the lock's first lifetime
    assert await leaderboard_rebuild.rebuild(pool, redis) is None  # still locked: no second rebuild
    assert await running is not None


async def test_a_rebuild_lock_is_kept_while_its_holder_lives_and_lapses_soon_after_it_dies(lb, monkeypatch):
    """The lock (and the building flag) lived ten minutes: a process killed mid-rebuild kept every read, start
    and check from rebuilding the boards for that long. Now they live LOCK_TTL_S, renewed by the holder."""
    pool, redis = lb
    assert leaderboard_rebuild.LOCK_TTL_S <= 30
    monkeypatch.setattr(leaderboard_rebuild, "LOCK_TTL_S", 0.6)
    await redis.set(keys.LEADERBOARD_LOCK, "holder", px=600)
    await redis.set(keys.LEADERBOARD_BUILDING, b"1", px=1200)
    keeper = asyncio.create_task(leaderboard_rebuild._keep_lock(redis, "holder"))
    await asyncio.sleep(1.5)  # past both TTLs: renewed
    assert await redis.get(keys.LEADERBOARD_LOCK) == b"holder" and await redis.exists(keys.LEADERBOARD_BUILDING)
    assert await leaderboard_rebuild.rebuild(pool, redis) is None  # held
    keeper.cancel()  # the holder dies
    await asyncio.sleep(1.3)
    assert not await redis.exists(keys.LEADERBOARD_LOCK, keys.LEADERBOARD_BUILDING)
    assert await leaderboard_rebuild.rebuild(pool, redis) is not None


async def test_course_and_pod_boards_show_who_belongs_there_now(lb):
    """A learner who leaves a course leaves its boards and its pods' boards (every period; the tenant board keeps
    their XP); XP given with the course meanwhile stays off them; re-enrolling brings back everything earned
    there, on the course's boards and its pods' alike (a tester: the pod board of a member back in the course showed
    less than the course board). Leaving a pod leaves its boards. Live updates, the hourly check and a rebuild all
    agree."""
    from tests.progress_helpers import course_in_new_tenant

    pool, redis = lb
    async with pool.acquire() as conn:
        cid, _, (leaver, stayer) = await course_in_new_tenant(conn, 2)
        tid = await conn.fetchval("SELECT tenant_id FROM courses WHERE id = $1", cid)
        pod = await conn.fetchval("INSERT INTO pods (course_id, name) VALUES ($1, 'p') RETURNING id", cid)
        for u in (leaver, stayer):
            await conn.execute("INSERT INTO pod_members (pod_id, user_id) VALUES ($1, $2)", pod, u)
    await xp.award_xp(pool, redis, leaver, "lesson_completed", "lesson:1", course_id=cid)
    await xp.award_xp(pool, redis, stayer, "helpful_answer", "helpful:1", course_id=cid)
    await leaderboard_rebuild.rebuild(pool, redis)
    boards = [leaderboards.board_key(sc, sid, p) for sc, sid in (("course", cid), ("pod", pod), ("tenant", tid))
              for p in leaderboards.PERIODS]

    async def standing() -> dict[str, dict[bytes, int]]:
        return await redis_boards(redis, boards)

    async def agrees_with_ledger() -> dict[str, dict[bytes, int]]:
        async with pool.acquire() as conn:
            want = await ledger_boards(conn)
        now = await standing()
        assert now == {k: want.get(k, {}) for k in boards}
        assert await leaderboard_rebuild.check(pool, redis, settle_s=0.05, tenant_ids=[tid]) == []
        return now

    everyone = await agrees_with_ledger()
    assert everyone[boards[0]] == {str(leaver).encode(): 50, str(stayer).encode(): 25}

    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM enrollments WHERE course_id = $1 AND user_id = $2", cid, leaver)
    await leaderboard_rebuild.resync_member(pool, redis, leaver, cid, again_after_s=None)
    gone = await agrees_with_ledger()
    for key in boards[:6]:  # course and pod, every period
        assert str(leaver).encode() not in gone[key] and gone[key][str(stayer).encode()] == 25, key
    assert gone[boards[6]][str(leaver).encode()] == 50  # the tenant board keeps it
    # XP given with the course while away (a late grade): on the tenant board only
    late = await xp.award_xp(pool, redis, leaver, "assignment_passed", "assignment:1", course_id=cid)
    assert late is not None and late.course_id == cid and late.pod_ids == [pod] and late.board_pod_ids == []
    away = await agrees_with_ledger()
    assert str(leaver).encode() not in away[boards[0]] and away[boards[6]][str(leaver).encode()] == 150
    await redis.delete(keys.LEADERBOARD_LOCK)
    await leaderboard_rebuild.rebuild(pool, redis)
    assert await standing() == away  # a rebuild counts the same

    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", cid, leaver)
    await leaderboard_rebuild.resync_member(pool, redis, leaver, cid, again_after_s=None)
    back = await agrees_with_ledger()
    assert back[boards[0]][str(leaver).encode()] == 150  # everything earned with the course
    assert back[boards[3]][str(leaver).encode()] == 150  # its pod: the same (they stayed a member)

    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM pod_members WHERE pod_id = $1 AND user_id = $2", pod, leaver)
    await leaderboard_rebuild.resync_member(pool, redis, leaver, cid, again_after_s=None)
    left_pod = await agrees_with_ledger()
    assert str(leaver).encode() not in left_pod[boards[3]] and left_pod[boards[0]][str(leaver).encode()] == 150
    board = await leaderboards.read(redis, "pod", pod, tid, "all", leaver)
    assert board.me is None and [e.user_id for e in board.entries] == [stayer]


async def test_a_learner_put_back_on_a_board_by_an_award_in_flight_is_taken_off_again(lb):
    """An award read the enrolment just before the learner left, and its board update lands after they were
    taken off: the second look puts it right."""
    pool, redis = lb
    cid, leaver, in_flight = await _left_with_an_award_in_flight(pool, redis, again_after_s=0.3)
    key = leaderboards.board_key("course", cid, "all")
    assert await redis.zscore(key, str(leaver)) == 50
    await asyncio.sleep(1.0)
    assert await redis.zscore(key, str(leaver)) is None
    assert await leaderboard_rebuild.check(pool, redis, settle_s=0.05, tenant_ids=[in_flight.tenant_id]) == []


async def test_leaving_one_pod_or_course_keeps_the_other_boards(lb):
    """Two pods in one course and a pod of another course: leaving one pod takes the learner off that pod's
    board only; leaving a course takes them off its pods' boards, not the other course's; joining a pod again
    does not bring back a pod they left."""
    from tests.progress_helpers import course_in_new_tenant

    pool, redis = lb
    async with pool.acquire() as conn:
        c1, owner, (u,) = await course_in_new_tenant(conn, 1)
        tid = await conn.fetchval("SELECT tenant_id FROM courses WHERE id = $1", c1)
        c2 = await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'd') RETURNING id",
                                 tid, owner)
        await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", c2, u)
        p1, p2 = [await conn.fetchval("INSERT INTO pods (course_id, name) VALUES ($1, $2) RETURNING id", c1, n)
                  for n in ("p1", "p2")]
        q = await conn.fetchval("INSERT INTO pods (course_id, name) VALUES ($1, 'q') RETURNING id", c2)
        for pod in (p1, p2, q):
            await conn.execute("INSERT INTO pod_members (pod_id, user_id) VALUES ($1, $2)", pod, u)
    await xp.award_xp(pool, redis, u, "lesson_completed", "lesson:1", course_id=c1)
    await xp.award_xp(pool, redis, u, "helpful_answer", "helpful:1", course_id=c2)
    me = str(u).encode()

    async def on(pod: int) -> bool:
        return me in (await redis_boards(redis, [leaderboards.board_key("pod", pod, "all")]))[
            leaderboards.board_key("pod", pod, "all")]

    assert [await on(p) for p in (p1, p2, q)] == [True, True, True]
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM pod_members WHERE pod_id = $1 AND user_id = $2", p1, u)
    await leaderboard_rebuild.resync_member(pool, redis, u, c1, again_after_s=None)
    assert [await on(p) for p in (p1, p2, q)] == [False, True, True]
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM enrollments WHERE course_id = $1 AND user_id = $2", c2, u)
    await leaderboard_rebuild.resync_member(pool, redis, u, c2, again_after_s=None)
    assert [await on(p) for p in (p1, p2, q)] == [False, True, False]
    await leaderboard_rebuild.resync_member(pool, redis, u, c1, again_after_s=None)  # e.g. a pod joined
    assert [await on(p) for p in (p1, p2, q)] == [False, True, False]
    assert await leaderboard_rebuild.check(pool, redis, settle_s=0.05, tenant_ids=[tid]) == []


async def test_an_award_still_in_its_transaction_when_the_learner_leaves_is_settled(lb):
    """An award that read the enrolment before the learner left, in a transaction still open while their boards
    are set: the resync waits for its commit, and its board update, which may still land after the first look (the
    award's process settles after its commit; under load the look came first, a CI flake of this test), is taken
    off by the second look, so the learner is not put back on the course board by it."""
    from tests.progress_helpers import course_in_new_tenant

    pool, redis = lb
    async with pool.acquire() as conn:
        cid, _, (u,) = await course_in_new_tenant(conn, 1)
    await xp.award_xp(pool, redis, u, "lesson_completed", "lesson:0", course_id=cid)
    key = leaderboards.board_key("course", cid, "all")

    async def slow_award() -> None:
        async with xp.transaction(pool, redis) as tx:
            await tx.award(u, "lesson_completed", "lesson:1", course_id=cid)
            await asyncio.sleep(0.5)

    awarding = asyncio.create_task(slow_award())
    await asyncio.sleep(0.1)
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM enrollments WHERE course_id = $1 AND user_id = $2", cid, u)
    await leaderboard_rebuild.resync_member(pool, redis, u, cid, again_after_s=600)
    await awarding
    await leaderboard_rebuild.drain()  # the second look, now
    assert await redis.zscore(key, str(u)) is None
    async with pool.acquire() as conn:
        tid = await conn.fetchval("SELECT tenant_id FROM users WHERE id = $1", u)
    assert await leaderboard_rebuild.check(pool, redis, settle_s=0.05, tenant_ids=[tid]) == []


async def test_pending_looks_are_taken_at_shutdown(lb):
    """A server stopping within the second look's wait takes that look at once (before its pool and Redis close)
    instead of leaving a board an in-flight award put wrong for the hourly check."""
    pool, redis = lb
    cid, leaver, _ = await _left_with_an_award_in_flight(pool, redis, again_after_s=600)
    key = leaderboards.board_key("course", cid, "all")
    assert await redis.zscore(key, str(leaver)) == 50
    await leaderboard_rebuild.drain()
    assert await redis.zscore(key, str(leaver)) is None and not leaderboard_rebuild._again


async def _left_with_an_award_in_flight(pool, redis, again_after_s: float):  # type: ignore[no-untyped-def]
    """A learner leaves their course while an award that read their enrolment is committed but not yet on the
    boards; its board update lands after the first look. (course id, learner id, the award)"""
    from tests.progress_helpers import course_in_new_tenant

    async with pool.acquire() as conn:
        cid, _, (leaver,) = await course_in_new_tenant(conn, 1)
        in_flight = await xp.insert_award(conn, leaver, "lesson_completed", "lesson:1", course_id=cid)
        await conn.execute("DELETE FROM enrollments WHERE course_id = $1 AND user_id = $2", cid, leaver)
    await leaderboard_rebuild.resync_member(pool, redis, leaver, cid, again_after_s=again_after_s)
    await xp.settle(redis, [in_flight])
    return cid, leaver, in_flight


async def test_an_award_waiting_on_redis_holds_no_database_connection(make: Factory, settings):
    """Awards (on their own or in an XP transaction) updated the boards while still holding their pooled
    connection: with Redis stalled, every award under way kept one, and the rest of the process waited."""
    u = make.user("learner")
    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    redis, admin = Redis.from_url(redis_db(settings.redis_url, 3)), Redis.from_url(settings.redis_url)
    try:
        async def transacted() -> None:
            async with xp.transaction(pool, redis) as tx:
                await tx.award(u.id, "helpful_answer", "stall:2")

        for award in (lambda: xp.award_xp(pool, redis, u.id, "helpful_answer", "stall:1"), transacted):
            await admin.execute_command("CLIENT", "PAUSE", "2000", "WRITE")  # the award's board script waits
            try:
                task = asyncio.create_task(award())
                await asyncio.sleep(0.5)  # committed, now waiting on Redis
                t0 = time.monotonic()
                assert await asyncio.wait_for(pool.fetchval("SELECT 1"), 10) == 1
                assert time.monotonic() - t0 < 0.5
            finally:
                await admin.execute_command("CLIENT", "UNPAUSE")
            await task
        assert await pool.fetchval("SELECT count(*) FROM xp_events WHERE user_id = $1", u.id) == 2
    finally:
        await leaderboards.drain()
        await redis.flushdb()
        await redis.aclose()
        await admin.aclose()
        await pool.close()


async def test_a_rebuild_stopped_between_its_swap_and_its_replay_leaves_the_boards_to_be_built_again(
        make: Factory, lb, monkeypatch):
    """The swap marked the boards built and handed the backlog (awards made during the build) to Python memory: a
    rebuild stopped before replaying it (a deploy cancelling the hourly check, a timeout, a crash) left boards
    without those awards for good, marked built. Now the marker is set after the replay."""
    pool, redis = lb
    u = make.user("learner")
    await xp.award_xp(pool, redis, u.id, "lesson_completed", "lesson:1")
    real_stale = leaderboard_rebuild._stale_boards

    async def award_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]  # after the snapshot, before the swap
        await xp.award_xp(pool, redis, u.id, "helpful_answer", "helpful:during")
        return await real_stale(*args, **kwargs)

    async def stopped(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise asyncio.CancelledError()

    monkeypatch.setattr(leaderboard_rebuild, "_stale_boards", award_meanwhile)
    monkeypatch.setattr(leaderboard_rebuild, "_replay", stopped)
    with pytest.raises(asyncio.CancelledError):
        await leaderboard_rebuild.rebuild(pool, redis)
    monkeypatch.undo()
    assert not await redis.exists(keys.LEADERBOARD_BUILT)
    assert await leaderboard_rebuild.ensure_built(pool, redis) is not None
    board = await leaderboards.read(redis, "tenant", u.tenant_id, u.tenant_id, "all", u.id)
    assert board.me is not None and board.me.xp == 75 and board.built


async def test_a_course_deleted_during_a_rebuild_does_not_get_its_boards_back(lb, monkeypatch):
    """The course (and its pod) deleted after the rebuild's snapshot, its boards dropped before the swap: the swap
    put them back, all-time boards that never expire and nobody can read."""
    from tests.progress_helpers import course_in_new_tenant

    pool, redis = lb
    async with pool.acquire() as conn:
        cid, _, learners = await course_in_new_tenant(conn, 2)
        pod = await conn.fetchval("INSERT INTO pods (course_id, name) VALUES ($1, 'p') RETURNING id", cid)
        for u in learners:
            await conn.execute("INSERT INTO pod_members (pod_id, user_id) VALUES ($1, $2)", pod, u)
    for u in learners:
        await xp.award_xp(pool, redis, u, "helpful_answer", f"helpful:{u}", course_id=cid)
    assert await redis.exists(keys.leaderboard("course", cid, "all"), keys.leaderboard("pod", pod, "all")) == 2
    real = leaderboard_rebuild._stale_boards

    async def deleted_meanwhile(*args, **kw):  # type: ignore[no-untyped-def]  # after the snapshot, before the swap
        async with pool.acquire() as conn:
            await conn.execute("DELETE FROM courses WHERE id = $1", cid)
        await leaderboards.drop_boards(redis, [("course", cid), ("pod", pod)])
        return await real(*args, **kw)

    monkeypatch.setattr(leaderboard_rebuild, "_stale_boards", deleted_meanwhile)
    assert await leaderboard_rebuild.rebuild(pool, redis) is not None
    left = [k async for k in redis.scan_iter(f"sh:lb:course:{cid}:*")] + [k async for k in redis.scan_iter(f"sh:lb:pod:{pod}:*")]
    assert left == []
    tenant = await redis.zscore(keys.leaderboard("tenant", (await pool.fetchval(
        "SELECT tenant_id FROM users WHERE id = $1", learners[0])), "all"), str(learners[0]))
    assert tenant == 25  # the tenant board keeps the XP


async def test_boards_behind_the_ledger_are_rebuilt_at_startup(make: Factory, lb):
    """Redis back without its last writes (its append-only file synced once a second, a restored snapshot): the boards
    stayed marked built and missed that XP until the hourly check."""
    pool, redis = lb
    u = make.user("learner")
    await xp.award_xp(pool, redis, u.id, "lesson_completed", "lesson:1")
    assert await leaderboard_rebuild.ensure_built(pool, redis) is not None  # (built here first)
    async with pool.acquire() as conn:  # committed, its board update lost with Redis's last second
        assert await xp.insert_award(conn, u.id, "helpful_answer", "helpful:lost") is not None
    assert await leaderboard_rebuild.ensure_built(pool, redis) is not None
    board = await leaderboards.read(redis, "tenant", u.tenant_id, u.tenant_id, "all", u.id)
    assert board.me is not None and board.me.xp == 75


async def test_a_pod_named_twice_counts_once_everywhere(lb):
    """pod_ids [P, P]: the live boards counted the pod once, a rebuild (unnesting the ledger's list) twice, so the
    hourly check saw drift and each rebuild doubled the pod board."""
    from tests.progress_helpers import course_in_new_tenant

    pool, redis = lb
    async with pool.acquire() as conn:
        cid, _, (u,) = await course_in_new_tenant(conn, 1)
        pod = await conn.fetchval("INSERT INTO pods (course_id, name) VALUES ($1, 'p') RETURNING id", cid)
        await conn.execute("INSERT INTO pod_members (pod_id, user_id) VALUES ($1, $2)", pod, u)
    a = await xp.award_xp(pool, redis, u, "helpful_answer", "helpful:1", course_id=cid, pod_ids=[pod, pod])
    assert a is not None and a.pod_ids == [pod]
    await leaderboard_rebuild.rebuild(pool, redis)
    assert await redis.zscore(leaderboards.board_key("pod", pod, "all"), str(u)) == 25


async def test_a_rebuild_cut_by_a_stop_takes_down_its_flag_and_temporary_boards(lb, monkeypatch):
    """(Tester) a server stopped mid-rebuild released the lock but left the building flag (awards logged to the
    backlog for another minute) and its temporary boards (150,000 entries each, for an hour)."""
    from tests.progress_helpers import course_in_new_tenant

    pool, redis = lb
    async with pool.acquire() as conn:
        cid, _, learners = await course_in_new_tenant(conn, 2)
    for u in learners:
        await xp.award_xp(pool, redis, u, "helpful_answer", f"helpful:{u}", course_id=cid)
    written = asyncio.Event()

    async def stalled(*args, **kw):  # type: ignore[no-untyped-def]
        written.set()  # the temporary boards are written; the swap is next
        await asyncio.sleep(60)

    monkeypatch.setattr(leaderboard_rebuild, "_stale_boards", stalled)
    await redis.delete(keys.LEADERBOARD_LOCK)
    task = asyncio.create_task(leaderboard_rebuild.rebuild(pool, redis))
    await asyncio.wait_for(written.wait(), 30)
    assert await redis.exists(keys.LEADERBOARD_BUILDING) and await redis.keys("sh:lb:tmp:*")
    from store.aio import cancel_and_wait

    assert await cancel_and_wait(task, timeout=5, every=1.0)
    assert not await redis.exists(keys.LEADERBOARD_LOCK, keys.LEADERBOARD_BUILDING)
    assert await redis.keys("sh:lb:tmp:*") == []


async def test_a_rebuild_slower_than_the_servers_statement_timeout_still_finishes(settings, lb):
    """(Review) a server's statements give up after STUDYHALL_DB_TIMEOUT_S (15 s: a Postgres that stopped
    answering); a rebuild's sums over a whole ledger, run by servers, take their own longer timeout (LONG_S), or a
    big ledger's boards could never be rebuilt by any server. Here the pod scope's sums wait 1.5 s behind a lock,
    on a pool whose statements give up after 0.5 s."""
    pool, redis = lb
    short = await create_pool(settings.database_url, min_size=1, max_size=2, command_timeout=0.5)
    try:
        async with pool.acquire() as holder:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("LOCK TABLE pod_members IN ACCESS EXCLUSIVE MODE")
            await redis.delete(keys.LEADERBOARD_LOCK)
            rebuilding = asyncio.create_task(leaderboard_rebuild.rebuild(short, redis))
            await asyncio.sleep(1.5)
            await tx.rollback()
        assert await rebuilding is not None
    finally:
        await short.close()
