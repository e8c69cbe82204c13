"""Start and stop the realtime hub with the app (after the pools of the main lifespan exist)."""
from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar

from server.realtime.hub import Hub

logger = logging.getLogger(__name__)

# the key as the query parser reads it: a letter may be percent-encoded ("?%74oken=" let a learner in, and was logged
# whole: tester)
_KEY = "".join(f"(?:{c}|%{ord(c):02x}|%{ord(c.upper()):02x})" for c in "token")
_TOKEN = re.compile(rf"({_KEY}=|authorization:\s*(?:bearer\s+)?)[^&\s\"']+", re.IGNORECASE)


class _RedactTokens(logging.Filter):
    """uvicorn logs websocket paths with their query string: `?token=` must never reach a log, nor an
    `Authorization` header. At debug level the websocket protocol traces every handshake header and frame
    ("< authorization: Bearer …", "< TEXT '{…message…}'"): those lines are dropped (tokens, learners' words)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG and isinstance(record.msg, str) and record.msg[:2] in ("< ", "> "):
            return False
        if record.args:
            record.args = tuple(_TOKEN.sub(r"\1[redacted]", a) if isinstance(a, str) else a
                                for a in (record.args if isinstance(record.args, tuple) else (record.args,)))
        if isinstance(record.msg, str) and _TOKEN.search(record.msg):
            record.msg = _TOKEN.sub(r"\1[redacted]", record.msg)
        return True


@asynccontextmanager
async def realtime_lifespan(app: Litestar) -> AsyncIterator[None]:
    logging.getLogger("uvicorn.error").addFilter(_RedactTokens())
    hub = Hub(app.state.settings, app.state.pool, app.state.redis, pubsub_redis=app.state.pubsub_redis)
    hub.app_state = app.state  # the tutor (server/tutoring.py) answers rooms with the app's clients
    app.state.hub = hub
    await hub.start()
    try:
        yield
    finally:
        await hub.stop()
