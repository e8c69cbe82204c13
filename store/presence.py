"""Who is online in each room, across server processes (Redis; rebuilt by heartbeats if lost).

Per room, a ZSET of users scored by the expiry of their freshest process, and per (room, user) a ZSET of the
processes holding their connections. Each process heartbeats its (room, user) pairs every TTL/3; a process
that dies stops heartbeating and its entries expire; whichever survivor sweeps the room first removes the
user (atomically, so `left` is announced once). Times come from Redis (TIME), so clocks need not agree.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from store.events import UserRef
from store.keys import PROCS, presence_room, presence_user

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: room, user key. ARGV: member, proc, ttl_ms. -> {joined (0/1), online count}
_JOIN = _NOW + """
local ttl = tonumber(ARGV[3])
local exp = now + ttl
local prev = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], exp, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl * 2)
redis.call('ZADD', KEYS[1], 'GT', exp, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
local joined = 0
if (not prev) or tonumber(prev) < now then joined = 1 end
return {joined, redis.call('ZCOUNT', KEYS[1], now, '+inf')}
"""

# KEYS: room, user key. ARGV: member, proc. -> {left (0/1), online count}
_LEAVE = _NOW + """
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local top = redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local left = 0
if #top == 0 then
  left = redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], top[2], ARGV[1])
end
return {left, redis.call('ZCOUNT', KEYS[1], now, '+inf')}
"""

# KEYS: room. ARGV: user key prefix. -> {members that left, online count}
_SWEEP = _NOW + """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 200)
local left = {}
for _, m in ipairs(expired) do
  local ukey = ARGV[1] .. string.match(m, '^(%d+)|')
  redis.call('ZREMRANGEBYSCORE', ukey, '-inf', now)
  local top = redis.call('ZREVRANGE', ukey, 0, 0, 'WITHSCORES')
  if #top == 0 then
    redis.call('ZREM', KEYS[1], m)
    table.insert(left, m)
  else
    redis.call('ZADD', KEYS[1], top[2], m)
  end
end
return {left, redis.call('ZCOUNT', KEYS[1], now, '+inf')}
"""

# KEYS: procs. ARGV: proc, ttl_ms, then (room key, user key, member) triples.
# -> {1 when the process was not on the list (reaped, or Redis lost it), indexes (0-based, per triple) of users
#     that had expired and are back}
_HEARTBEAT = _NOW + """
local ttl = tonumber(ARGV[2])
local exp = now + ttl
local back = {}
local added = redis.call('ZADD', KEYS[1], exp, ARGV[1])
for i = 3, #ARGV, 3 do
  local rk, uk, m = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  redis.call('ZADD', uk, exp, ARGV[1])
  redis.call('PEXPIRE', uk, ttl * 2)
  local prev = redis.call('ZSCORE', rk, m)
  redis.call('ZADD', rk, 'GT', exp, m)
  redis.call('PEXPIRE', rk, ttl * 2)
  if (not prev) or tonumber(prev) < now then table.insert(back, (i - 3) / 3) end
end
return {added, back}
"""

# KEYS: room. ARGV: limit. -> {online count, members}
_ONLINE = _NOW + """
return {redis.call('ZCOUNT', KEYS[1], now, '+inf'),
        redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'LIMIT', 0, tonumber(ARGV[1]))}
"""

# KEYS: procs. ARGV: proc to skip, then the candidates. -> flat list of the candidates still expired and their
# expiry (ms), each removed (so returned to one caller only)
_DEAD = _NOW + """
local out = {}
for i = 2, #ARGV do
  local p = ARGV[i]
  local s = redis.call('ZSCORE', KEYS[1], p)
  if p ~= ARGV[1] and s and tonumber(s) < now and redis.call('ZREM', KEYS[1], p) == 1 then
    table.insert(out, p)
    table.insert(out, s)
  end
end
return out
"""

# KEYS: procs. -> up to 100 procs whose lease has lapsed
_EXPIRED = _NOW + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 100)
"""


def member(user: UserRef) -> str:
    return f"{user.id}|{user.role}|{user.name}"


def user_of(m: bytes | str) -> UserRef:
    text = m.decode() if isinstance(m, bytes) else m
    uid, role, name = text.split("|", 2)
    return UserRef(id=int(uid), name=name, role=role)


@dataclass(frozen=True)
class Change:
    changed: bool  # joined (for join) or left (for leave)
    online_count: int

# KEYS: procs. ARGV: procs. -> per proc: 1 alive, 0 expired, -1 not listed
_ALIVE = _NOW + """
local out = {}
for i, p in ipairs(ARGV) do
  local s = redis.call('ZSCORE', KEYS[1], p)
  if not s then out[i] = -1 elseif tonumber(s) >= now then out[i] = 1 else out[i] = 0 end
end
return out
"""


class Presence:
    """Presence operations for one server process (`proc`)."""

    def __init__(self, redis: Redis, proc: str, ttl_s: float) -> None:
        self.redis = redis
        self.proc = proc
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self._join = redis.register_script(_JOIN)
        self._leave = redis.register_script(_LEAVE)
        self._sweep = redis.register_script(_SWEEP)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._online = redis.register_script(_ONLINE)
        self._dead = redis.register_script(_DEAD)
        self._expired = redis.register_script(_EXPIRED)
        self._alive = redis.register_script(_ALIVE)
        # a heartbeat found this process off the list (taken for dead and reaped, or Redis lost the list): whoever
        # acts on it (the hub reopens the attendance a reaper closed) sets it back to False
        self.relisted = False

    async def join(self, room: str, user: UserRef) -> Change:
        joined, count = await self._join(keys=[presence_room(room), presence_user(room, user.id)],
                                         args=[member(user), self.proc, self.ttl_ms])
        return Change(bool(joined), int(count))

    async def leave(self, room: str, user: UserRef) -> Change:
        left, count = await self._leave(keys=[presence_room(room), presence_user(room, user.id)],
                                        args=[member(user), self.proc])
        return Change(bool(left), int(count))

    async def sweep(self, room: str) -> tuple[list[UserRef], int]:
        """Remove users whose every process stopped heartbeating; returns who left (each reported once)."""
        left, count = await self._sweep(keys=[presence_room(room)], args=[presence_room(room) + ":u:"])
        return [user_of(m) for m in left], int(count)

    async def heartbeat(self, pairs: list[tuple[str, UserRef]],
                        live: Callable[[str, UserRef], bool] | None = None) -> list[tuple[str, UserRef]]:
        """Refresh this process and its (room, user) pairs; returns pairs that had expired and are back.

        `live(room, user)`: whether a pair is still here. Pairs go out in chunks, one round trip each; a pair
        that left while an earlier chunk was on its way is not refreshed (that would put them back online)."""
        back: list[tuple[str, UserRef]] = []
        chunk = 500
        for start in range(0, max(len(pairs), 1), chunk):
            part = [p for p in pairs[start:start + chunk] if live is None or live(*p)]
            args: list[str | int] = [self.proc, self.ttl_ms]
            for room, user in part:
                args += [presence_room(room), presence_user(room, user.id), member(user)]
            added, indexes = await self._heartbeat(keys=[PROCS], args=args)
            self.relisted = self.relisted or bool(added)
            for i in indexes:
                back.append(part[int(i)])
        return back

    async def online(self, room: str, limit: int) -> tuple[int, list[UserRef]]:
        count, members = await self._online(keys=[presence_room(room)], args=[limit])
        return int(count), [user_of(m) for m in members]

    async def expired_procs(self) -> list[str]:
        """Other server processes whose lease has lapsed now (dead, or not renewed yet after a Redis stall)."""
        names = [p.decode() if isinstance(p, bytes) else p for p in await self._expired(keys=[PROCS])]
        return [p for p in names if p != self.proc]

    async def dead_procs(self, candidates: list[str]) -> list[tuple[str, float]]:
        """Those of `candidates` whose lease is still lapsed, each returned to exactly one caller and taken off
        the list: (proc, expiry s)."""
        if not candidates:
            return []
        flat = await self._dead(keys=[PROCS], args=[self.proc, *candidates])
        return [(flat[i].decode() if isinstance(flat[i], bytes) else flat[i], float(flat[i + 1]) / 1000)
                for i in range(0, len(flat), 2)]

    async def alive(self, procs: list[str]) -> dict[str, bool | None]:
        """Whether each server process heartbeats: True, False (expired), None (not listed: reaped already,
        stopped, or Redis lost the list)."""
        if not procs:
            return {}
        flags = await self._alive(keys=[PROCS], args=procs)
        return {p: None if f == -1 else bool(f) for p, f in zip(procs, flags)}

    async def return_dead(self, proc: str, expired_at: float) -> None:
        """Give back a dead process that `dead_procs` handed out but whose clean-up failed (unless it came back
        to life meanwhile)."""
        await self.redis.zadd(PROCS, {proc: int(expired_at * 1000)}, nx=True)

    async def now_s(self) -> float:
        """Redis's clock (the leases' expiries are on it), in seconds."""
        sec, usec = await self.redis.time()
        return sec + usec / 1e6

    async def forget_proc(self) -> None:
        await self.redis.zrem(PROCS, self.proc)
