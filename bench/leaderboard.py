"""Leaderboards at 100,000 learners: XP award (ledger insert + board updates + events) and top-10-plus-my-rank
read latency, each beside bare redis-py in the same run (ZINCRBY for the award, ZREVRANGE for the read).

Targets: read p99 <= 2 ms; award <= 5x the bare ZINCRBY (the award also commits to Postgres). The award is
measured with the default durable commit and with STUDYHALL_XP_ASYNC_COMMIT=1 (no wait for the WAL flush).
`python -m bench.leaderboard [--learners 100000] [--n 3000]`
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid

from redis.asyncio import Redis

from bench.common import pct, services
from store import leaderboard_rebuild, leaderboards, xp
from store.db import create_pool



async def seed(pool, redis, learners: int) -> tuple[int, int, list[int]]:  # type: ignore[no-untyped-def]
    """A tenant with `learners` learners, one course, and a ledger with one earlier award each (reused when
    it exists); the boards are rebuilt from that ledger."""
    name = f"bench-leaderboard-{learners}"
    async with pool.acquire() as conn:
        tid = await conn.fetchval("SELECT id FROM tenants WHERE name = $1", name)
        if tid is None:
            t0 = time.perf_counter()
            async with conn.transaction():
                tid = await conn.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", name)
                owner = await conn.fetchval(
                    "INSERT INTO users (tenant_id, name, role) VALUES ($1, 'owner', 'instructor') RETURNING id", tid)
                await conn.execute("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'bench')", tid, owner)
                await conn.copy_records_to_table("users", columns=["tenant_id", "name", "role"],
                                                 records=[(tid, f"learner-{i:06d}", "learner") for i in range(learners)])
                rnd = random.Random(1)
                users = await conn.fetch("SELECT id FROM users WHERE tenant_id = $1 AND role = 'learner'", tid)
                rows = [(tid, u["id"], "lesson_completed", rnd.randint(0, 5000), "seed") for u in users]
                await conn.copy_records_to_table("xp_events", columns=["tenant_id", "user_id", "kind", "points",
                                                                       "idempotency_key"], records=rows)
                await conn.execute("""INSERT INTO xp_totals (user_id, xp, counts)
                                      SELECT user_id, points, '{"lesson_completed": 1}' FROM xp_events
                                      WHERE tenant_id = $1""", tid)
            print(f"seeded {learners:,} learners in {time.perf_counter() - t0:.1f} s")
        cid = await conn.fetchval("SELECT c.id FROM courses c WHERE c.tenant_id = $1", tid)
        # enrolled: an award with the course counts on its boards only for learners enrolled in it
        await conn.execute("""INSERT INTO enrollments (course_id, user_id)
                              SELECT $1, id FROM users WHERE tenant_id = $2 AND role = 'learner'
                              ON CONFLICT DO NOTHING""", cid, tid)
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM users WHERE tenant_id = $1 AND role = 'learner'", tid)]
    await redis.delete("sh:lb:lock")
    done = await leaderboard_rebuild.rebuild(pool, redis)
    assert done is not None
    print(f"rebuild from the ledger: {done.boards:,} boards, {done.entries:,} entries in {done.seconds:.2f} s")
    return tid, cid, ids


async def _loaded(redis: Redis) -> None:
    """Wait while a restarted Redis replays its append-only file."""
    from redis.exceptions import BusyLoadingError

    while True:
        try:
            if not (await redis.info("persistence")).get("loading"):
                return
        except BusyLoadingError:
            pass
        await asyncio.sleep(0.2)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--learners", type=int, default=100_000)
    ap.add_argument("--n", type=int, default=3000, help="operations per measurement")
    args = ap.parse_args()
    settings, svc = await services("leaderboard")
    pool = await create_pool(settings.database_url, min_size=2, max_size=4)
    redis = Redis.from_url(settings.redis_url)
    await _loaded(redis)
    try:
        tid, cid, ids = await seed(pool, redis, args.learners)
        board = leaderboards.board_key("tenant", tid, "all")
        assert await redis.zcard(board) == len(ids)
        # the readers: learners with XP on the board (one seeded at 0 is not listed, so has no rank to read)
        readers = [r["user_id"] for r in await pool.fetch(
            "SELECT t.user_id FROM xp_totals t JOIN users u ON u.id = t.user_id WHERE u.tenant_id = $1 AND t.xp > 0",
            tid)]
        bare = f"sh:bench:bare:{uuid.uuid4().hex[:6]}"
        await redis.zadd(bare, {str(u): x for u, x in await redis.zrange(board, 0, -1, withscores=True)})
        rnd = random.Random(7)
        run = uuid.uuid4().hex[:8]
        n = args.n

        async def timed(fn, k: int) -> list[float]:  # type: ignore[no-untyped-def]
            out = []
            for i in range(k):
                t0 = time.perf_counter()
                await fn(i)
                out.append((time.perf_counter() - t0) * 1000)
            return out

        seq = iter(range(10**9))
        unlocks = [0, 0]  # awards that unlocked an achievement, awards

        async def award(i: int) -> None:
            a = await xp.award_xp(pool, redis, rnd.choice(ids), "helpful_answer", f"bench:{run}:{next(seq)}",
                                  course_id=cid)
            assert a is not None
            unlocks[0] += bool(a.unlocked)
            unlocks[1] += 1

        async def bare_write(i: int) -> None:
            await redis.zincrby(bare, 25, str(rnd.choice(ids)))

        async with pool.acquire() as conn:  # the Postgres floor: one durable single-row insert, nothing else
            await conn.execute("""CREATE TABLE IF NOT EXISTS bench_bare_insert (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, user_id bigint NOT NULL, k text NOT NULL,
                UNIQUE (user_id, k))""")

        async def bare_insert(i: int) -> None:
            await pool.execute("INSERT INTO bench_bare_insert (user_id, k) VALUES ($1, $2)", rnd.choice(ids),
                               f"{run}:{next(seq)}")

        async def read(i: int) -> None:
            b = await leaderboards.read(redis, "tenant", tid, tid, "all", rnd.choice(readers), limit=10)
            assert len(b.entries) == 10 and b.me is not None

        async def bare_read(i: int) -> None:
            await redis.zrevrange(bare, 0, 9, withscores=True)

        # warm up, then interleave the rounds so every side sees the same machine load
        sides = (("award", award), ("award_async", award), ("bare_write", bare_write), ("bare_insert", bare_insert),
                 ("read", read), ("bare_read", bare_read))
        res: dict[str, list[float]] = {k: [] for k, _ in sides}
        for rnd_no in range(6):
            for key, fn in sides:
                xp.ASYNC_COMMIT = key == "award_async"
                got = await timed(fn, 100 if rnd_no == 0 else n // 5)
                if rnd_no:
                    res[key] += got
        xp.ASYNC_COMMIT = False

        def row(name: str, xs: list[float]) -> tuple[float, float]:
            p50, p99 = statistics.median(xs), pct(xs, 99)
            print(f"  {name:<52} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms")
            return p50, p99

        print(f"\n{len(ids):,} learners on the board, {n:,} operations each; "
              f"{unlocks[0] / unlocks[1]:.0%} of the awards unlocked an achievement (a first helpful answer)")
        a50, a99 = row("award (ledger commit + boards + events)", res["award"])
        s50, s99 = row("award, STUDYHALL_XP_ASYNC_COMMIT=1", res["award_async"])
        w50, w99 = row("bare redis-py ZINCRBY", res["bare_write"])
        i50, i99 = row("bare asyncpg INSERT of one row (own transaction)", res["bare_insert"])
        r50, r99 = row("read: top 10 + my rank + neighbours + names", res["read"])
        b50, b99 = row("bare redis-py ZREVRANGE 0 9 WITHSCORES", res["bare_read"])
        print(f"\naward / bare write:              p50 {a50 / w50:5.1f}x   p99 {a99 / w99:5.1f}x   (target <= 5x)")
        print(f"award (async commit) / bare write: p50 {s50 / w50:5.1f}x   p99 {s99 / w99:5.1f}x")
        print(f"award / (bare insert + bare write): p50 {a50 / (i50 + w50):5.1f}x   p99 {a99 / (i99 + w99):5.1f}x")
        print(f"bare insert / bare write:          p50 {i50 / w50:5.1f}x   p99 {i99 / w99:5.1f}x   "
              "(the floor of any award that commits to Postgres durably)")
        print(f"read / bare read:                 p50 {r50 / b50:5.1f}x   p99 {r99 / b99:5.1f}x")
        print(f"read p99 {r99:.3f} ms (target <= 2 ms): {'ok' if r99 <= 2 else 'MISSED'}")
        await redis.delete(bare)
        await pool.execute("TRUNCATE bench_bare_insert")
    finally:
        await redis.aclose()
        await pool.close()
        svc.close()


if __name__ == "__main__":
    asyncio.run(main())
