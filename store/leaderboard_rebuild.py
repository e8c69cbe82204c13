"""Rebuild every leaderboard from the XP ledger, and check the boards against it.

Runs at server start when `sh:lb:built` is missing (Redis flushed or new), when a read finds it missing, from
`studyhall leaderboards rebuild`, and from the worker's hourly check when an all-time board disagrees with the
ledger. It reads one snapshot of the ledger, builds every current board under a temporary name and swaps them
all in atomically; awards that commit meanwhile are logged in a backlog and re-applied when the snapshot missed
them, so the result equals the ledger exactly (same XP, same ranks).
"""
from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from redis.asyncio import Redis

from store import keys, leaderboards
from store.aio import cancel_and_wait
from store.db import LONG_S
from store.events import LeaderboardEntry
from store.leaderboards import (ON_COURSE_SQL, ON_PODS_SQL, as_utc, board_key, boards_of, expire_at, period_bounds,
                                period_tag)

logger = logging.getLogger(__name__)

# --- rebuild -------------------------------------------------------------------------------------------

# Swap every rebuilt board in, stop the backlog and return it, and record the snapshot the boards were read
# from, all at once. Nothing is swapped (an error) when the rebuild lost what it stands on: its lock (another
# rebuild may have started), the building flag (its backlog), or a board it built (Redis flushed, restarted or
# evicting meanwhile): deleting the live boards and marking them built would leave them empty until the hourly
# check.
# KEYS: building, backlog, built, snapshot, lock, then pairs (live, temp): first the boards built, then the stale
# ones (no temporary board: deleted). ARGV: marker value, snapshot, lock token, number of boards built, then per
# pair the live key's expire-at (0: none). Temporary boards carry a one-hour TTL until they are swapped in.
_SWAP = """
if redis.call('GET', KEYS[5]) ~= ARGV[3] then return redis.error_reply('rebuild lost its lock') end
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('rebuild lost its building flag') end
local built = tonumber(ARGV[4])
for j = 0, built - 1 do
  if redis.call('EXISTS', KEYS[7 + 2 * j]) == 0 then return redis.error_reply('rebuild lost its boards') end
end
for i = 6, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i + 1]) == 1 then
    redis.call('RENAME', KEYS[i + 1], KEYS[i])
    local exp = tonumber(ARGV[(i - 6) / 2 + 5])
    if exp > 0 then redis.call('EXPIREAT', KEYS[i], exp) else redis.call('PERSIST', KEYS[i]) end
  else
    redis.call('DEL', KEYS[i])
  end
end
local backlog = redis.call('LRANGE', KEYS[2], 0, -1)
-- the built marker goes, not on: the backlog's awards are on the boards only once replayed (`_MARK_BUILT`); a
-- rebuild stopped before that (a deploy, a timeout, a crash) leaves the marker missing, so the next read or start
-- rebuilds instead of keeping boards without them
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SET', KEYS[4], ARGV[2], 'EX', 3600)
return backlog
"""
# KEYS: lock, built, high-water mark, due list. ARGV: token, marker value, high, the held score. After the replay,
# while the lock is ours. Boards whose change was held back while none were built are due now (told by the next
# server's tick).
_MARK_BUILT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
if tonumber(ARGV[3]) > tonumber(redis.call('GET', KEYS[3]) or '0') then redis.call('SET', KEYS[3], ARGV[3]) end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], ARGV[4], '+inf')) do redis.call('ZADD', KEYS[4], 0, m) end
return 1
"""

_swaps: dict[int, object] = {}


def _swap(redis: Redis):  # type: ignore[no-untyped-def]
    script = _swaps.get(id(redis))
    if script is None:
        script = _swaps[id(redis)] = redis.register_script(_SWAP)
    return script


# Who stands on a board: on the tenant board everyone with XP; on a course board the learners enrolled in it now;
# on a pod board its members with access now (in the pod and enrolled in its course). XP earned on a course or pod
# stays in the ledger: a learner who comes back stands there again with it. Per scope: (board id, ledger rows).
_BOARDS_FROM = {
    "tenant": ("x.tenant_id", "xp_events x"),
    "course": ("x.course_id", "xp_events x JOIN enrollments e ON e.course_id = x.course_id AND e.user_id = x.user_id"),
    "pod": ("pid", "xp_events x CROSS JOIN LATERAL unnest(x.pod_ids) AS pid "
                   "JOIN pod_members m ON m.pod_id = pid AND m.user_id = x.user_id "
                   "JOIN pods p ON p.id = pid JOIN enrollments e ON e.course_id = p.course_id AND e.user_id = x.user_id"),
}


def _sums(first: int) -> str:
    """All-time, month and week XP; parameters $first..$first+3: month start and end, week start and end."""
    a, b, c, d = (f"${first + i}" for i in range(4))
    return (f"sum(x.points) AS all_xp, sum(x.points) FILTER (WHERE x.at >= {a} AND x.at < {b}) AS month_xp, "
            f"sum(x.points) FILTER (WHERE x.at >= {c} AND x.at < {d}) AS week_xp")


_BOARDS_SQL = {scope: f"SELECT {sid} AS sid, x.user_id, {_sums(1)} FROM {frm} GROUP BY 1, 2"
               for scope, (sid, frm) in _BOARDS_FROM.items()}


# One board straight from the ledger, ranked and ordered as Redis orders it (equal XP: the higher member string
# first, as ZREVRANGE does): the top $5, and the caller's position with $6 neighbours each side.
# $1 board id, $2/$3 the period's [start, end) (NULL: all time), $4 the caller. The ledger has no index on tenant,
# course or pods (each one more page written per award): the rows are found through their learners.
_WHO = {"tenant": "SELECT id FROM users WHERE tenant_id = $1", "course": "SELECT user_id FROM enrollments "
        "WHERE course_id = $1", "pod": "SELECT user_id FROM pod_members WHERE pod_id = $1"}
_ONE_BOARD_SQL = {scope: f"""
WITH b AS (SELECT x.user_id, sum(x.points)::bigint AS xp FROM {frm}
           WHERE {sid} = $1 AND x.user_id IN ({_WHO[scope]})
             AND ($2::timestamptz IS NULL OR x.at >= $2 AND x.at < $3) GROUP BY x.user_id HAVING sum(x.points) > 0),
r AS (SELECT user_id, xp, rank() OVER (ORDER BY xp DESC) AS rank,
             row_number() OVER (ORDER BY xp DESC, user_id::text COLLATE "C" DESC) - 1 AS pos FROM b),
me AS (SELECT pos FROM r WHERE user_id = $4)
SELECT r.user_id, coalesce(u.name, '') AS name, r.xp, r.rank, r.pos, (SELECT count(*) FROM b) AS count,
       (SELECT pos FROM me) AS me_pos
FROM r LEFT JOIN users u ON u.id = r.user_id
WHERE r.pos < $5 OR r.pos BETWEEN (SELECT pos FROM me) - $6 AND (SELECT pos FROM me) + $6
ORDER BY r.pos""" for scope, (sid, frm) in _BOARDS_FROM.items()}


async def read_ledger(conn: asyncpg.Connection, scope: str, scope_id: int, period: str, user_id: int, *,
                      limit: int = 10, at: datetime | None = None) -> leaderboards.Board:
    """A board as `leaderboards.read` gives it, computed from the ledger: what a read answers while Redis has no
    boards built (flushed, restarted empty) and the rebuild has not finished. Slower (it sums the ledger rows of
    the board), so only for then."""
    bounds = period_bounds(period, at)
    rows = await conn.fetch(_ONE_BOARD_SQL[scope], scope_id, bounds and bounds[0], bounds and bounds[1], user_id,
                            limit, leaderboards.NEIGHBOURS)
    at_pos = {r["pos"]: LeaderboardEntry(user_id=r["user_id"], name=r["name"], xp=int(r["xp"]), rank=int(r["rank"]))
              for r in rows}
    entries = [e for pos, e in at_pos.items() if pos < limit]
    me_pos = rows[0]["me_pos"] if rows else None
    neighbours = [] if me_pos is None else [e for pos, e in at_pos.items()
                                            if abs(pos - me_pos) <= leaderboards.NEIGHBOURS]
    me = next((e for e in neighbours if e.user_id == user_id), None)
    return leaderboards.Board(entries=entries, me=me, neighbours=neighbours, count=int(rows[0]["count"]) if rows else 0,
                              built=False)


@dataclass(frozen=True)
class Rebuilt:
    boards: int
    entries: int
    replayed: int  # awards committed during the rebuild that its snapshot missed
    seconds: float


# The ledger's highest event id: what the boards' high-water mark (keys.LEADERBOARD_HIGH) is compared with.
_LEDGER_HIGH = "SELECT coalesce(max(id), 0) FROM xp_events"


async def rebuild(pool: asyncpg.Pool, redis: Redis, *, now: datetime | None = None) -> Rebuilt | None:
    """Rebuild every board from the ledger; None when another process is already rebuilding."""
    token = secrets.token_hex(8)
    if not await redis.set(keys.LEADERBOARD_LOCK, token, px=int(LOCK_TTL_S * 1000), nx=True):
        return None
    t0 = time.perf_counter()
    keeper = asyncio.create_task(_keep_lock(redis, token))  # however long it takes, no second rebuild starts
    finished = False
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.LEADERBOARD_BUILDING, b"1", px=int(2 * LOCK_TTL_S * 1000))  # kept up with the lock
            pipe.delete(keys.LEADERBOARD_BACKLOG)
            await pipe.execute()
        now = as_utc(now)
        month, week = period_bounds("month", now), period_bounds("week", now)
        assert month and week
        temp = keys.leaderboard_temp(token)
        live_keys: list[str] = []
        n_entries = 0
        async with pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                # the transaction's snapshot (its first statement fixes it): which awards the boards will hold
                # and when it was taken: a transaction that begins later is not in it (see leaderboards._AWARD)
                snapshot = await conn.fetchval("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint || ';' "
                                               "|| pg_current_snapshot()::text")
                taken, seen_ids = snapshot.split(";", 1)  # with the period boards built (their tags)
                snapshot = f"{taken};{period_tag('month', now)},{period_tag('week', now)};{seen_ids}"
                high = await conn.fetchval(_LEDGER_HIGH)
                boards: dict[str, dict[int, int]] = defaultdict(dict)
                scoped: dict[str, tuple[str, int]] = {}  # course and pod boards: whose
                for scope, sql in _BOARDS_SQL.items():
                    for r in await conn.fetch(sql, month[0], month[1], week[0], week[1], timeout=LONG_S):
                        for period, col in (("all", "all_xp"), ("month", "month_xp"), ("week", "week_xp")):
                            if r[col] is not None:
                                key = board_key(scope, r["sid"], period, now)
                                boards[key][r["user_id"]] = int(r[col])
                                if scope != "tenant":
                                    scoped[key] = (scope, r["sid"])
                names = await conn.fetch(
                    "SELECT u.tenant_id, u.id, u.name FROM users u WHERE u.id IN (SELECT user_id FROM xp_totals)",
                    timeout=LONG_S)
                async with redis.pipeline(transaction=False) as pipe:
                    for key, scores in boards.items():
                        items = list(scores.items())
                        for i in range(0, len(items), 5000):
                            pipe.zadd(temp + key, {str(u): x for u, x in items[i:i + 5000]})
                        n_entries += len(items)
                        pipe.expire(temp + key, 3600)  # a crashed rebuild leaves nothing behind for long
                        live_keys.append(key)
                        if len(pipe) >= 200:
                            await pipe.execute()
                    by_tenant: dict[int, dict[str, str]] = defaultdict(dict)
                    for r in names:
                        by_tenant[r["tenant_id"]][str(r["id"])] = r["name"]
                    for tid, mapping in by_tenant.items():
                        pipe.hset(keys.leaderboard_names(tid), mapping=mapping)
                    await pipe.execute()
                # current boards the ledger has nothing for (XP a crash took from the ledger, a deleted course or
                # pod): the swap deletes them, as it has no temporary board to put in their place
                stale = await _stale_boards(redis, now, set(live_keys))
                swap_keys = [keys.LEADERBOARD_BUILDING, keys.LEADERBOARD_BACKLOG, keys.LEADERBOARD_BUILT,
                             keys.LEADERBOARD_SNAPSHOT, keys.LEADERBOARD_LOCK]
                for key in live_keys + stale:
                    swap_keys += [key, temp + key]
                backlog = await _swap(redis)(keys=swap_keys, args=[now.isoformat(), snapshot, token, len(live_keys)]
                                             + [_period_expiry(k, now) for k in live_keys + stale])
                # the boards' high-water mark is now the ledger's (awards since raise it again)
                await redis.set(keys.LEADERBOARD_HIGH, high)
                ids = sorted({int(x) for x in backlog})
                seen = {r["id"] for r in await conn.fetch("SELECT id FROM xp_events WHERE id = ANY($1::bigint[])", ids)}
            # a course or pod deleted after the snapshot: its deletion may have dropped its boards before the swap
            # put them back (all-time boards never expire; nobody can read them any more)
            gone = await _gone(conn, scoped)
            if gone:
                await redis.delete(*gone)
            missed = [i for i in ids if i not in seen]
            replayed = await _replay(conn, redis, missed, set(live_keys + stale) - set(gone), now) if missed else 0
            await redis.eval(_MARK_BUILT, 4, keys.LEADERBOARD_LOCK, keys.LEADERBOARD_BUILT, keys.LEADERBOARD_HIGH,
                             keys.LEADERBOARD_DUE, token, now.isoformat(), max([high or 0, *ids]),
                             leaderboards.HELD_SCORE)
        took = time.perf_counter() - t0
        logger.info("leaderboards rebuilt", extra={"fields": {"boards": len(live_keys), "entries": n_entries,
                                                              "replayed": replayed, "seconds": round(took, 3)}})
        finished = True
        return Rebuilt(boards=len(live_keys), entries=n_entries, replayed=replayed, seconds=took)
    finally:
        await cancel_and_wait(keeper)  # (a cancel lost during its renewal left it renewing every 10 s for good)
        # release only our own lock; a rebuild that did not finish (failed, or cut by a stop) also takes down its
        # building flag (awards went on logging to the backlog for a minute) and its temporary boards (an hour)
        await redis.eval(_RELEASE, 2, keys.LEADERBOARD_LOCK, keys.LEADERBOARD_BUILDING, token, int(not finished))
        if not finished:
            await _drop_temporary(redis, keys.leaderboard_temp(token))


# KEYS: lock, building flag. ARGV: token, 1 to take the building flag down too. Only the lock's holder does.
_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] == '1' then redis.call('DEL', KEYS[2]) end
return 1
"""


async def _drop_temporary(redis: Redis, temp: str) -> None:
    """Delete an unfinished rebuild's temporary boards (they would expire within the hour on their own)."""
    try:
        async with asyncio.timeout(10):
            batch = []
            async for key in redis.scan_iter(match=temp + "*", count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    await redis.unlink(*batch)
                    batch = []
            if batch:
                await redis.unlink(*batch)
    except Exception:  # noqa: BLE001 - they expire on their own
        logger.info("an unfinished rebuild's temporary boards are left to expire")


# Renewed every third of it while the rebuild runs; a process that died mid-rebuild holds it (and keeps awards
# logging to the backlog) no longer than this, so the next read, start or check rebuilds soon after.
LOCK_TTL_S = 30.0

# KEYS: lock, building flag. ARGV: token, ttl ms. Only the lock's holder renews; a building flag the swap already
# removed stays removed.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[2]))
return 1
"""


async def _keep_lock(redis: Redis, token: str) -> None:
    while True:
        await asyncio.sleep(LOCK_TTL_S / 3)
        try:
            await redis.eval(_RENEW, 2, keys.LEADERBOARD_LOCK, keys.LEADERBOARD_BUILDING, token,
                             int(LOCK_TTL_S * 1000))
        except Exception:  # noqa: BLE001 - the next beat tries again
            logger.warning("could not renew the leaderboard rebuild lock", exc_info=True)


async def _gone(conn: asyncpg.Connection, scoped: dict[str, tuple[str, int]]) -> list[str]:
    """The boards (of `scoped`, key -> (scope, id)) whose course or pod no longer exists."""
    ids = {scope: sorted({sid for sc, sid in scoped.values() if sc == scope}) for scope in ("course", "pod")}
    rows = await conn.fetch("SELECT 'course' AS scope, id FROM courses WHERE id = ANY($1::bigint[]) "
                            "UNION ALL SELECT 'pod', id FROM pods WHERE id = ANY($2::bigint[])", ids["course"], ids["pod"])
    there = {(r["scope"], r["id"]) for r in rows}
    return sorted(k for k, owner in scoped.items() if owner not in there)


def _period_expiry(key: str, now: datetime) -> int:
    tag = key.rsplit(":", 2)
    if key.endswith(":all"):
        return 0
    return expire_at("month" if tag[-2] == "m" else "week", now)


async def _stale_boards(redis: Redis, now: datetime, built: set[str]) -> list[str]:
    """Boards of the current periods in Redis that the rebuild did not build."""
    out = []
    for period in ("all", "month", "week"):
        tag = period_tag(period, now)
        shape = re.compile(re.escape(keys.LEADERBOARD).replace(r"\{scope\}", "(tenant|course|pod)")
                           .replace(r"\{scope_id\}", r"\d+").replace(r"\{period\}", re.escape(tag)))
        async for raw in redis.scan_iter(match=keys.leaderboard("*", "*", tag), count=1000):  # type: ignore[arg-type]
            key = raw.decode() if isinstance(raw, bytes) else raw
            if shape.fullmatch(key) and key not in built:
                out.append(key)
    return out


async def _replay(conn: asyncpg.Connection, redis: Redis, ids: list[int], swapped: set[str], now: datetime) -> int:
    """Re-apply awards whose board updates landed on boards the swap replaced or deleted (their snapshot missed
    them)."""
    rows = await conn.fetch(
        f"""SELECT x.id, x.tenant_id, x.user_id, x.points, x.at,
                   CASE WHEN {ON_COURSE_SQL.format(course="x.course_id", user="x.user_id")} THEN x.course_id END
                       AS course_id,
                   {ON_PODS_SQL.format(user="x.user_id", pods="x.pod_ids")} AS pod_ids
            FROM xp_events x WHERE x.id = ANY($1::bigint[])""", ids)
    n = 0
    async with redis.pipeline(transaction=False) as pipe:
        for r in rows:
            for key, _ in boards_of(r["tenant_id"], r["course_id"], list(r["pod_ids"]), r["at"]):
                if key in swapped:
                    pipe.zincrby(key, r["points"], str(r["user_id"]))
                    expiry = _period_expiry(key, now)
                    if expiry:  # a deleted board comes back: with its period's end, like every write sets
                        pipe.expireat(key, expiry)
                    n += 1
        await pipe.execute()
    return n


REBUILD_BACKOFF_S = 30.0  # after a failed rebuild, reads do not start another one for this long


def rebuild_soon(app_state) -> None:  # type: ignore[no-untyped-def]
    """Redis lost the boards while we run: rebuild in the background (one rebuild at a time, cluster-wide).
    `app_state` holds `pool`, `redis` and the task (`lb_rebuild`). A rebuild that failed (Redis out of memory, say)
    is not retried by every read: at most every 30 s."""
    _in_background(app_state, rebuild)


def check_soon(app_state) -> None:  # type: ignore[no-untyped-def]
    """Another server process died: awards it committed may have died with their board updates (a kill between
    the two), and a later award's high mark hides that from the startup check. Check every board against the
    ledger in the background, rebuilding when one differs (in `rebuild_soon`'s slot: one at a time, awaited by a
    stopping server)."""
    _in_background(app_state, check_and_repair)


def _in_background(app_state, work) -> None:  # type: ignore[no-untyped-def]
    task = getattr(app_state, "lb_rebuild", None)
    if task is not None and not task.done() or getattr(app_state, "lb_rebuild_stopped", False):
        return
    if time.monotonic() - getattr(app_state, "lb_rebuild_failed_at", -1e9) < REBUILD_BACKOFF_S:
        return

    def done(t: asyncio.Task) -> None:
        if not t.cancelled() and t.exception() is not None:
            app_state.lb_rebuild_failed_at = time.monotonic()
            logger.warning("leaderboard rebuild failed; reads try again in %g s", REBUILD_BACKOFF_S,
                           exc_info=t.exception())

    app_state.lb_rebuild = asyncio.create_task(work(app_state.pool, app_state.redis))
    app_state.lb_rebuild.add_done_callback(done)


async def ensure_built(pool: asyncpg.Pool, redis: Redis) -> Rebuilt | None:
    """Startup check: rebuild when Redis has no boards built from the ledger (flushed, or first start), or when the
    boards hold a later ledger event than the ledger has (Postgres restored from a backup: the boards still count
    the XP it lost)."""
    async with redis.pipeline(transaction=False) as pipe:
        built, high = await pipe.exists(keys.LEADERBOARD_BUILT).get(keys.LEADERBOARD_HIGH).execute()
    if built:
        newest = await pool.fetchval(_LEDGER_HIGH)
        if high is not None and int(high) < newest and await check(pool, redis):
            # behind the ledger: Redis came back without its last writes (an append-only file synced every second,
            # a restored snapshot, a replica behind): the hourly check would have found it, an hour later
            logger.warning("the leaderboards miss XP events of the ledger (Redis lost its last writes?): rebuilding "
                           "them", extra={"fields": {"boards_high": int(high), "ledger_high": newest}})
        elif high is None or int(high) <= newest:
            return None
        else:
            logger.warning("the leaderboards hold XP events the ledger does not have (Postgres restored from a "
                           "backup?): rebuilding them",
                           extra={"fields": {"boards_high": int(high), "ledger_high": newest}})
    return await rebuild(pool, redis)


async def check(pool: asyncpg.Pool, redis: Redis, settle_s: float = 1.0, *,
                tenant_ids: list[int] | None = None, now: datetime | None = None) -> list[str]:
    """Boards (tenant, course, pod; all-time and this month's and week's) that disagree with the ledger (keys);
    empty when every one matches. `tenant_ids`: only those tenants' boards (default: every tenant's).

    The ledger and the boards are read at different moments, so an award committed but not yet on its boards
    (its process is between the two) looks like drift: the learners that differ are read again, up to
    SETTLE_ROUNDS times `settle_s` apart, and only a difference that is still there every time counts."""
    now = as_utc(now)
    tags = ["all", period_tag("month", now), period_tag("week", now)]
    async with pool.acquire() as conn:
        want = await _ledger_boards(conn, tenant_ids, None, now)
        boards = {keys.leaderboard(r["scope"], r["sid"], tag) for r in await conn.fetch(
            """SELECT 'tenant' AS scope, t.id AS sid FROM tenants t WHERE $1::bigint[] IS NULL OR t.id = ANY($1)
               UNION ALL SELECT 'course', c.id FROM courses c WHERE $1::bigint[] IS NULL OR c.tenant_id = ANY($1)
               UNION ALL SELECT 'pod', p.id FROM pods p JOIN courses c ON c.id = p.course_id
                         WHERE $1::bigint[] IS NULL OR c.tenant_id = ANY($1)""", tenant_ids, timeout=LONG_S)
            for tag in tags}
    differ: dict[str, set[bytes]] = {}
    for key in sorted(boards | want.keys()):
        scores = want.get(key, {})
        have = {m: int(s) for m, s in await redis.zrange(key, 0, -1, withscores=True)}
        members = {m for m in scores.keys() | have.keys() if scores.get(m) != have.get(m)}
        if members:
            differ[key] = members
    # Read those learners again, a few times: a learner earning XP right now (a reconcile awarding several of
    # their grades one after another) can differ at every single look while nothing is wrong.
    for _ in range(SETTLE_ROUNDS):
        if not differ:
            return []
        await asyncio.sleep(settle_s)
        differ = await _still_differ(pool, redis, differ, now)
    return sorted(differ)


SETTLE_ROUNDS = 3


async def _ledger_boards(conn: asyncpg.Connection, tenant_ids: list[int] | None, user_ids: list[int] | None,
                         now: datetime) -> dict[str, dict[bytes, int]]:
    """Every all-time board and those of the month and week of `now`, as the ledger defines them,
    key -> {member: xp}; only ledger rows of `tenant_ids` and learners `user_ids` (None: all)."""
    month, week = period_bounds("month", now), period_bounds("week", now)
    assert month and week
    columns = (("all", "all_xp"), (period_tag("month", now), "month_xp"), (period_tag("week", now), "week_xp"))
    out: dict[str, dict[bytes, int]] = defaultdict(dict)
    for scope, (sid, frm) in _BOARDS_FROM.items():
        for r in await conn.fetch(f"""SELECT {sid} AS sid, x.user_id, {_sums(3)} FROM {frm}
                                      WHERE ($1::bigint[] IS NULL OR x.tenant_id = ANY($1))
                                        AND ($2::bigint[] IS NULL OR x.user_id = ANY($2)) GROUP BY 1, 2""",
                                  tenant_ids, user_ids, *month, *week, timeout=LONG_S):
            member = str(r["user_id"]).encode()
            for tag, column in columns:
                if r[column] is not None:  # (no XP in the period: not on its board)
                    out[keys.leaderboard(scope, r["sid"], tag)][member] = int(r[column])
    return out


async def _still_differ(pool: asyncpg.Pool, redis: Redis, differ: dict[str, set[bytes]],
                        now: datetime) -> dict[str, set[bytes]]:
    """Of the learners that differed, those whose board XP still differs from the ledger's."""
    async with pool.acquire() as conn:  # the ledger again, for just those learners
        ledger = await _ledger_boards(conn, None, sorted({int(m) for ms in differ.values() for m in ms}), now)
    still: dict[str, set[bytes]] = {}
    for key, member_set in differ.items():
        members = sorted(member_set)
        have = await redis.zmscore(key, members)
        want = ledger.get(key, {})
        off = {m for m, sc in zip(members, have) if want.get(m) != (None if sc is None else int(sc))}
        if off:
            still[key] = off
    return still


async def check_and_repair(pool: asyncpg.Pool, redis: Redis, *, tenant_ids: list[int] | None = None) -> Rebuilt | None:
    """Rebuild when the boards are missing or any board of `check` (of `tenant_ids`, default all) disagrees with
    the ledger."""
    if not await redis.exists(keys.LEADERBOARD_BUILT) or await check(pool, redis, tenant_ids=tenant_ids):
        return await rebuild(pool, redis)
    return None


# --- one learner's standing on a course's boards -------------------------------------------------------

# The learner's XP on the course's board and each of its pods' boards, and whether they stand there now.
# $1 learner, $2 course, $3-$6 month and week bounds.
_MEMBER_BOARDS = f"""
SELECT b.scope, b.sid, b.member, {_sums(3)}
FROM (SELECT 'course' AS scope, c.id AS sid, {ON_COURSE_SQL.format(course="c.id", user="$1")} AS member
      FROM courses c WHERE c.id = $2
      UNION ALL
      SELECT 'pod', pod.id, cardinality({ON_PODS_SQL.format(user="$1", pods="ARRAY[pod.id]")}) > 0
      FROM pods pod WHERE pod.course_id = $2) AS b
LEFT JOIN xp_events x ON x.user_id = $1
     AND CASE WHEN b.scope = 'course' THEN x.course_id = b.sid ELSE b.sid = ANY(x.pod_ids) END
GROUP BY 1, 2, 3
"""

# Another look this long after a change (and again while a look still changes something, up to AGAIN_LOOKS):
# an award committed before the change whose board update was still in flight (or a rebuild whose snapshot
# predates the change) is then settled; the hourly check catches anything later.
AGAIN_AFTER_S = 2.0
AGAIN_LOOKS = 3
_again: dict[asyncio.Task, tuple[asyncpg.Pool, Redis, int, int]] = {}  # pending looks: (pool, redis, learner, course)


async def resync_member(pool: asyncpg.Pool, redis: Redis, user_id: int, course_id: int, *,
                        again_after_s: float | None = AGAIN_AFTER_S, now: datetime | None = None) -> None:
    """After an enrolment or pod membership changed (committed): set the learner's XP on the course's boards and
    its pods' boards from the ledger, or take them off where they no longer belong; announce boards that
    changed. Failures are logged (the hourly check repairs). `again_after_s`: look once more that much later."""
    await _look_now(pool, redis, user_id, course_id, now)
    if again_after_s is not None:
        task = asyncio.create_task(_resync_later(pool, redis, user_id, course_id, again_after_s))
        _again[task] = (pool, redis, user_id, course_id)
        task.add_done_callback(lambda t: _again.pop(t, None))


async def drain(timeout: float = 5.0) -> None:
    """At shutdown, before the pool and Redis close: take the pending looks now rather than lose them."""
    pending = [(t, args) for t, args in list(_again.items()) if not t.done()]
    for task, _ in pending:
        task.cancel()
    _again.clear()
    if pending:
        await asyncio.wait([asyncio.create_task(_look_now(*args)) for _, args in pending], timeout=timeout)


async def _look_now(pool: asyncpg.Pool, redis: Redis, user_id: int, course_id: int,
                    now: datetime | None = None) -> int:
    """`_resync`, a failure logged (the ledger is the truth; the hourly check repairs): boards changed."""
    try:
        return await _resync(pool, redis, user_id, course_id, now)
    except Exception:  # noqa: BLE001
        logger.warning("could not update the boards of a learner's course", exc_info=True)
        return 0


RESYNC_WAIT_S = 1800.0  # the longest a membership change's look waits for a running rebuild


async def _resync_later(pool: asyncpg.Pool, redis: Redis, user_id: int, course_id: int, delay: float) -> None:
    await asyncio.sleep(delay)
    # as long as a rebuild runs (its flag lapses within 2 x LOCK_TTL_S of its holder dying): one whose swap came after
    # a fixed minute brought back the standing it had read before the change, and no look came after it
    deadline = time.monotonic() + RESYNC_WAIT_S
    try:
        while await redis.exists(keys.LEADERBOARD_BUILDING) and time.monotonic() < deadline:
            await asyncio.sleep(delay)  # a rebuild's swap may bring back what it read before the change
    except Exception:  # noqa: BLE001 - Redis unreachable: the look below says so
        pass
    for _ in range(AGAIN_LOOKS):
        if not await _look_now(pool, redis, user_id, course_id):
            return
        await asyncio.sleep(delay)


async def _resync(pool: asyncpg.Pool, redis: Redis, user_id: int, course_id: int, now: datetime | None) -> int:
    """Write the learner's standing on the course's boards; how many boards it changed."""
    now = as_utc(now)
    month, week = period_bounds("month", now), period_bounds("week", now)
    assert month and week
    async with pool.acquire() as conn, conn.transaction():
        # Awards of this learner take their totals row: one still in its transaction (it may have read the old
        # enrolment) commits before the ledger is read here, and one after waits until the boards are set, so
        # its own board update lands after this absolute one, not under it.
        await conn.execute("SELECT 1 FROM xp_totals WHERE user_id = $1 FOR UPDATE", user_id)
        who = await conn.fetchrow("SELECT tenant_id, name FROM users WHERE id = $1", user_id)
        rows = await conn.fetch(_MEMBER_BOARDS, user_id, course_id, month[0], month[1], week[0], week[1])
        if who is None or not rows:
            return 0
        changed = await _set_standing(redis, user_id, who, rows, now)
    for scope, sid in sorted(changed):
        await leaderboards.nudge(redis, scope, sid, who["tenant_id"])
    return len(changed)


async def _set_standing(redis: Redis, user_id: int, who: asyncpg.Record, rows: list[asyncpg.Record],
                        now: datetime) -> set[tuple[str, int]]:
    """Write the learner's XP on each board they stand on, take them off the others (one transaction); the
    (scope, id) of the boards that changed."""
    member = str(user_id)
    boards: list[tuple[str, int] | None] = []  # per command: the board whose change it reports, if any
    async with redis.pipeline(transaction=True) as pipe:
        for r in rows:
            for period, col in (("all", "all_xp"), ("month", "month_xp"), ("week", "week_xp")):
                key = board_key(r["scope"], r["sid"], period, now)
                boards.append((r["scope"], r["sid"]))
                if r["member"] and r[col] is not None:
                    pipe.zadd(key, {member: int(r[col])}, ch=True)
                    if period != "all":
                        boards.append(None)
                        pipe.expireat(key, expire_at(period, now))
                else:
                    pipe.zrem(key, member)
        pipe.hset(keys.leaderboard_names(who["tenant_id"]), member, who["name"])
        results = await pipe.execute()
    return {board for board, n in zip(boards, results) if board is not None and n}
