"""Per-user token bucket in Redis, shared by every server process."""
from __future__ import annotations

import math

from redis.asyncio import Redis

from store.keys import rate_send

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
    """`rate` sends per second per user, with bursts of up to `burst`."""

    def __init__(self, redis: Redis, rate: float, burst: int) -> None:
        self.rate = max(rate, 0.001)
        self.burst = max(burst, 1)
        self._script = redis.register_script(_BUCKET)

    async def take(self, user_id: int, cost: int = 1) -> tuple[bool, float]:
        """(allowed, seconds to wait before retrying when not)."""
        ok, wait_ms = await self._script(keys=[rate_send(user_id)], args=[self.rate, self.burst, cost])
        return bool(ok), math.ceil(int(wait_ms) / 100) / 10
