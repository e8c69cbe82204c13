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

from store import keys
from store.leaderboards import as_utc, board_key, boards_of, expire_at, period_bounds, period_tag

logger = logging.getLogger(__name__)

# --- rebuild -------------------------------------------------------------------------------------------

# Swap every rebuilt board in, stop the backlog and return it, and record the snapshot the boards were read
# from, all at once.
# KEYS: building, backlog, built, snapshot, then pairs (live, temp). ARGV: marker value, snapshot, then per pair
# the live key's expire-at (0: none). Temporary boards carry a one-hour TTL until they are swapped in.
_SWAP = """
for i = 5, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i + 1]) == 1 then
    redis.call('RENAME', KEYS[i + 1], KEYS[i])
    local exp = tonumber(ARGV[(i - 5) / 2 + 3])
    if exp > 0 then redis.call('EXPIREAT', KEYS[i], exp) else redis.call('PERSIST', KEYS[i]) end
  else
    redis.call('DEL', KEYS[i])
  end
end
local backlog = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SET', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], ARGV[2], 'EX', 3600)
return backlog
"""

_swaps: dict[int, object] = {}


def _swap(redis: Redis):  # type: ignore[no-untyped-def]
    script = _swaps.get(id(redis))
    if script is None:
        script = _swaps[id(redis)] = redis.register_script(_SWAP)
    return script


_BOARDS_SQL = {
    "tenant": "SELECT tenant_id AS sid, user_id, {sums} FROM xp_events GROUP BY 1, 2",
    "course": "SELECT course_id AS sid, user_id, {sums} FROM xp_events WHERE course_id IS NOT NULL GROUP BY 1, 2",
    "pod": "SELECT p AS sid, user_id, {sums} FROM xp_events, unnest(pod_ids) AS p GROUP BY 1, 2",
}
_SUMS = ("sum(points) AS all_xp, sum(points) FILTER (WHERE at >= $1 AND at < $2) AS month_xp, "
         "sum(points) FILTER (WHERE at >= $3 AND at < $4) AS week_xp")


@dataclass(frozen=True)
class Rebuilt:
    boards: int
    entries: int
    replayed: int  # awards committed during the rebuild that its snapshot missed
    seconds: float


async def rebuild(pool: asyncpg.Pool, redis: Redis, *, now: datetime | None = None) -> Rebuilt | None:
    """Rebuild every board from the ledger; None when another process is already rebuilding."""
    token = secrets.token_hex(8)
    if not await redis.set(keys.LEADERBOARD_LOCK, token, px=int(LOCK_TTL_S * 1000), nx=True):
        return None
    t0 = time.perf_counter()
    keeper = asyncio.create_task(_keep_lock(redis, token))  # however long it takes, no second rebuild starts
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
                snapshot = await conn.fetchval("SELECT pg_current_snapshot()::text")
                boards: dict[str, dict[int, int]] = defaultdict(dict)
                for scope, sql in _BOARDS_SQL.items():
                    for r in await conn.fetch(sql.format(sums=_SUMS), month[0], month[1], week[0], week[1]):
                        for period, col in (("all", "all_xp"), ("month", "month_xp"), ("week", "week_xp")):
                            if r[col] is not None:
                                boards[board_key(scope, r["sid"], period, now)][r["user_id"]] = int(r[col])
                names = await conn.fetch(
                    "SELECT u.tenant_id, u.id, u.name FROM users u WHERE u.id IN (SELECT user_id FROM xp_totals)")
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
                             keys.LEADERBOARD_SNAPSHOT]
                for key in live_keys + stale:
                    swap_keys += [key, temp + key]
                backlog = await _swap(redis)(keys=swap_keys, args=[now.isoformat(), snapshot]
                                             + [_period_expiry(k, now) for k in live_keys + stale])
                ids = sorted({int(x) for x in backlog})
                seen = {r["id"] for r in await conn.fetch("SELECT id FROM xp_events WHERE id = ANY($1::bigint[])", ids)}
            missed = [i for i in ids if i not in seen]
            replayed = await _replay(conn, redis, missed, set(live_keys + stale), now) if missed else 0
        took = time.perf_counter() - t0
        logger.info("leaderboards rebuilt", extra={"fields": {"boards": len(live_keys), "entries": n_entries,
                                                              "replayed": replayed, "seconds": round(took, 3)}})
        return Rebuilt(boards=len(live_keys), entries=n_entries, replayed=replayed, seconds=took)
    finally:
        keeper.cancel()
        # release only our own lock
        await redis.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                         "return 0", 1, keys.LEADERBOARD_LOCK, token)


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
        """SELECT e.id, e.tenant_id, e.user_id, e.points, e.course_id, e.pod_ids, e.at FROM xp_events e
           WHERE e.id = ANY($1::bigint[])""", ids)
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


async def ensure_built(pool: asyncpg.Pool, redis: Redis) -> Rebuilt | None:
    """Startup check: rebuild when Redis has no boards built from the ledger (flushed, or first start)."""
    if await redis.exists(keys.LEADERBOARD_BUILT):
        return None
    return await rebuild(pool, redis)


async def check(pool: asyncpg.Pool, redis: Redis, settle_s: float = 1.0, *,
                tenant_ids: list[int] | None = None) -> list[str]:
    """All-time tenant boards that disagree with the ledger (keys); empty when every one matches. `tenant_ids`:
    only those tenants' boards (default: every tenant's).

    The ledger and the boards are read at different moments, so an award committed but not yet on its boards
    (its process is between the two) looks like drift: the learners that differ are read again, up to
    SETTLE_ROUNDS times `settle_s` apart, and only a difference that is still there every time counts."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT tenant_id, user_id, sum(points) AS xp FROM xp_events "
                                "WHERE $1::bigint[] IS NULL OR tenant_id = ANY($1) GROUP BY 1, 2", tenant_ids)
    want: dict[int, dict[bytes, int]] = defaultdict(dict)
    for r in rows:
        want[r["tenant_id"]][str(r["user_id"]).encode()] = int(r["xp"])
    differ: dict[int, set[bytes]] = {}
    for tid, scores in want.items():
        have = {m: int(s) for m, s in await redis.zrange(board_key("tenant", tid, "all"), 0, -1, withscores=True)}
        members = {m for m in scores.keys() | have.keys() if scores.get(m) != have.get(m)}
        if members:
            differ[tid] = members
    # Read those learners again, a few times: a learner earning XP right now (a reconcile awarding several of
    # their grades one after another) can differ at every single look while nothing is wrong.
    for _ in range(SETTLE_ROUNDS):
        if not differ:
            return []
        await asyncio.sleep(settle_s)
        differ = await _still_differ(pool, redis, differ)
    return [board_key("tenant", tid, "all") for tid in sorted(differ)]


SETTLE_ROUNDS = 3


async def _still_differ(pool: asyncpg.Pool, redis: Redis, differ: dict[int, set[bytes]]) -> dict[int, set[bytes]]:
    """Of the learners that differed, those whose board XP still differs from the ledger's."""
    async with pool.acquire() as conn:  # the ledger again, for just those learners
        rows = await conn.fetch("SELECT tenant_id, user_id, sum(points) AS xp FROM xp_events "
                                "WHERE user_id = ANY($1::bigint[]) GROUP BY 1, 2",
                                sorted({int(m) for ms in differ.values() for m in ms}))
    now = {(r["tenant_id"], str(r["user_id"]).encode()): int(r["xp"]) for r in rows}
    still: dict[int, set[bytes]] = {}
    for tid, member_set in differ.items():
        members = sorted(member_set)
        have = await redis.zmscore(board_key("tenant", tid, "all"), members)
        off = {m for m, sc in zip(members, have) if now.get((tid, m)) != (None if sc is None else int(sc))}
        if off:
            still[tid] = off
    return still


async def check_and_repair(pool: asyncpg.Pool, redis: Redis, *, tenant_ids: list[int] | None = None) -> Rebuilt | None:
    """Rebuild when the boards are missing or any all-time tenant board (of `tenant_ids`, default all)
    disagrees with the ledger."""
    if not await redis.exists(keys.LEADERBOARD_BUILT) or await check(pool, redis, tenant_ids=tenant_ids):
        return await rebuild(pool, redis)
    return None
