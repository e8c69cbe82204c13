"""The hub's Redis subscription over a connection that goes silent (a partition, a proxy that lost Redis): it is
noticed, readiness fails meanwhile, and the hub subscribes again once Redis can be reached."""
from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from redis.asyncio import Redis

from server.realtime import hub as hub_module
from server.realtime.hub import Hub
from store.events import events_channel
from tests.progress_helpers import xp_store  # noqa: F401 - fixture


class Proxy:
    """TCP in front of Redis. `silence()` makes every open connection go quiet both ways (bytes are swallowed,
    nothing is closed): a half-open connection. Connections opened later work."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.live: list[dict] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._pair, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _pair(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.target)
        state = {"quiet": False, "writers": (writer, up_w)}
        self.live.append(state)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if not state["quiet"]:
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, OSError):
                pass

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))

    def silence(self) -> None:
        for s in self.live:
            s["quiet"] = True
        self.live = []

    async def close(self) -> None:
        self.server.close()


async def test_a_silent_subscription_is_noticed_and_taken_up_again(settings, xp_store, monkeypatch):
    """The subscription had no read timeout and never pinged: over a half-open connection it waited forever, and
    readiness said all was well while no typing, presence or kick reached the process (a kicked learner's socket
    stayed open for the two hours of TCP keepalive)."""
    pool, redis = xp_store
    monkeypatch.setattr(hub_module, "SUB_PING_S", 0.2)
    monkeypatch.setattr(hub_module, "SUB_DEAD_S", 1.0)
    url = urlsplit(settings.redis_url)
    proxy = Proxy(url.hostname or "127.0.0.1", url.port or 6379)
    port = await proxy.start()
    sub_redis = Redis.from_url(settings.redis_url.replace(f":{url.port}", f":{port}", 1))
    hub = Hub(settings, pool, redis, pubsub_redis=sub_redis)
    got: list[bytes] = []
    hub._dispatch = lambda channel, data: got.append(data)  # type: ignore[method-assign]
    await hub.start()
    try:
        channel = events_channel(f"proc:{hub.proc}")
        await redis.publish(channel, encode_ping(1))
        await wait_for(lambda: got)
        assert hub.receiving()
        proxy.silence()  # a partition: the subscription's connection stays open and hears nothing
        await wait_for(lambda: not hub.receiving(), timeout=10)
        await wait_for(hub.receiving, timeout=15)  # a new connection, subscribed again
        await redis.publish(channel, encode_ping(2))
        await wait_for(lambda: len(got) >= 2, timeout=10)
    finally:
        await hub.stop()
        await sub_redis.aclose()
        await proxy.close()


def encode_ping(n: int) -> bytes:
    return b'{"type":"test.note","n":%d}' % n


async def wait_for(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


def test_logs_carry_no_tokens_nor_traced_frames():
    """At debug level the websocket protocol traced the handshake ("< authorization: Bearer …", a bot's token
    that never expires) and every frame (learners' messages) into the server log."""
    import logging

    from server.realtime.lifespan import _RedactTokens

    f = _RedactTokens()

    def rec(level: int, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", level, __file__, 1, msg, args, None)

    assert not f.filter(rec(logging.DEBUG, "< %s: %s", "authorization", "Bearer eyJsecret"))
    assert not f.filter(rec(logging.DEBUG, "< TEXT %s", '{"type":"message.send","text":"my private words"}'))
    for r in (rec(logging.INFO, '%s - "WebSocket %s" [accepted]', "1.2.3.4", "/ws/rooms/x?token=eyJsecret"),
              rec(logging.WARNING, "bad header Authorization: Bearer eyJsecret"),
              # (tester) the key percent-encoded, as the query parser reads it, let the token in and into the log
              rec(logging.INFO, '%s - "WebSocket %s" [accepted]', "1.2.3.4", "/ws/rooms/x?%74oken=eyJsecret"),
              rec(logging.INFO, '%s - "WebSocket %s" [accepted]', "1.2.3.4", "/ws/rooms/x?a=1&%54O%6bEn=eyJsecret")):
        assert f.filter(r) and "eyJsecret" not in r.getMessage() and "[redacted]" in r.getMessage()
