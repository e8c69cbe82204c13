"""Per-user limits in Redis, shared by every server process: a token bucket for sends, and slots for work
under way at once."""
from __future__ import annotations

import math
import uuid

from redis.asyncio import Redis

from collections.abc import Callable

from store.keys import rate_send, tutor_slots

# KEYS: bucket. ARGV: rate (tokens/s), burst, cost. -> {allowed (0/1), ms until `cost` tokens are available}
_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens, ts = tonumber(b[1]), tonumber(b[2])
if tokens == nil then tokens, ts = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local ok, wait = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  ok = 1
else
  wait = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {ok, wait}
"""


class SendLimiter:
    """`rate` sends per second per user, with bursts of up to `burst`. `key`: the user's bucket (default: their
    sends; progress reports and generation have buckets of their own)."""

    def __init__(self, redis: Redis, rate: float, burst: int, key: Callable[[int], str] = rate_send) -> None:
        self.rate = max(rate, 0.001)
        self.burst = max(burst, 1)
        self._key = key
        self._script = redis.register_script(_BUCKET)

    async def take(self, user_id: int | str, cost: int = 1) -> tuple[bool, float]:
        """(allowed, seconds to wait before retrying when not). `user_id`: what the bucket's key names (a user, or
        for some buckets a token)."""
        ok, wait_ms = await self._script(keys=[self._key(user_id)], args=[self.rate, self.burst, cost])
        return bool(ok), math.ceil(int(wait_ms) / 100) / 10


# KEYS: the user's slots. ARGV: most slots, slot lifetime ms, new slot id. -> 1 taken, 0 all in use.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_take_scripts: dict[int, object] = {}  # per Redis client


async def take_answer_slot(redis: Redis, user_id: int, most: int, ttl_ms: int) -> str | None:
    """One of the user's `most` tutor-answer slots (its id), or None when all are in use. A slot lapses after
    `ttl_ms` even if the process holding it died."""
    script = _take_scripts.get(id(redis))
    if script is None:
        script = _take_scripts[id(redis)] = redis.register_script(_TAKE_SLOT)
    slot = uuid.uuid4().hex
    taken = await script(keys=[tutor_slots(user_id)], args=[most, ttl_ms, slot])  # type: ignore[operator]
    return slot if taken else None


async def free_answer_slot(redis: Redis, user_id: int, slot: str) -> None:
    await redis.zrem(tutor_slots(user_id), slot)
