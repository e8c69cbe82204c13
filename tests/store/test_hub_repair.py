"""What a process's realtime hub repairs on its own: presence a subscription missed (presence is not stored, so
nothing replays it), a `left` whose publish failed, and sockets whose kick or removal event was lost."""
from __future__ import annotations

import asyncio
import json
import uuid

import msgspec

from server.realtime import hub as hub_module
from server.realtime.conn import Conn
from server.realtime.hub import Hub
from store.events import UserRef, room_topic
from store.keys import events_channel
from store.rooms import RoomAccess
from tests.progress_helpers import xp_store  # noqa: F401 - fixture


def _user(name: str) -> UserRef:
    return UserRef(id=10**9 + int(uuid.uuid4().int % 10**6), name=name, role="learner")


async def test_a_subscription_that_came_back_sends_each_socket_the_presence_as_it_is(settings, xp_store):
    """A `left` published while this process's subscription was down never reached its sockets: they showed the
    user online until they reconnected. Once it is back, each ready socket gets a new `welcome` with the room's
    presence now, continuing its stream (`last_seq` as far as it got)."""
    pool, redis = xp_store
    hub = Hub(settings, pool, redis)
    await hub.start()
    room = f"course:{uuid.uuid4().int % 10**6}"
    access = RoomAccess(room_id=room, kind="course", course_id=1, tenant_id=1, moderator=False)
    me, gone = _user("me"), _user("gone")
    sent: list[dict] = []

    async def send(msg: dict) -> None:
        sent.append(json.loads(msg["text"]))

    try:
        conn = Conn(hub, access, me, send, 16)
        await hub.attach(conn)
        await hub.welcome(conn, None)
        await hub.presence.join(room, gone)
        await hub.presence.leave(room, gone)  # its `left` lost with the subscription
        conn.last_seq = 7  # as far as its stream got
        await asyncio.sleep(0.1)
        sent.clear()
        await hub._refresh_presence()
        await asyncio.sleep(0.1)
        (frame,) = sent
        assert frame["type"] == "welcome" and frame["last_seq"] == 7
        assert [u["id"] for u in frame["online"]] == [me.id] and frame["online_count"] == 1
        # a socket filling a gap is the one most likely to have missed a `left`: it was skipped, and kept showing
        # the user online; and a room whose presence read failed (Redis just back) was never tried again
        await hub.presence.join(room, gone)
        await hub.presence.leave(room, gone)
        conn.filling = True
        sent.clear()
        real, calls = hub.presence.online, []

        async def flaky(*args):  # type: ignore[no-untyped-def]
            calls.append(args)
            if len(calls) == 1:
                raise ConnectionError("Redis not back yet")
            return await real(*args)

        hub.presence.online = flaky  # type: ignore[method-assign]
        monkey = hub_module.REFRESH_RETRY_S
        hub_module.REFRESH_RETRY_S = 0.05
        try:
            await hub._refresh_presence()
        finally:
            hub_module.REFRESH_RETRY_S = monkey
            hub.presence.online = real  # type: ignore[method-assign]
        await asyncio.sleep(0.1)
        (frame,) = sent
        assert frame["type"] == "welcome" and frame["last_seq"] == 7 and len(calls) == 2
        conn.filling = False
        await hub.detach(conn)
    finally:
        await hub.stop()


async def test_a_left_whose_publish_failed_is_published_again(settings, xp_store, monkeypatch):
    """The user is gone from the presence set, so no sweep would ever announce it: every client kept showing them
    online. The next ticks publish it again (not once the user is back)."""
    pool, redis = xp_store
    hub = Hub(settings, pool, redis)
    room = f"course:{uuid.uuid4().int % 10**6}"
    gone, back = _user("gone"), _user("back")
    sub = redis.pubsub()
    await sub.subscribe(events_channel(room_topic(room)))
    await sub.get_message(timeout=1)
    real = hub_module.publish

    async def down(*_: object) -> bool:
        return False

    try:
        for u in (gone, back):
            await hub.presence.join(room, u)
        monkeypatch.setattr(hub_module, "publish", down)
        for u in (gone, back):
            await hub._announce_leave(room, u)
        monkeypatch.setattr(hub_module, "publish", real)
        await hub.presence.join(room, back)  # back meanwhile (elsewhere): no stale `left` for them
        await hub._resend_left()
        got = await sub.get_message(timeout=2)
        while got is not None and got["type"] != "message":
            got = await sub.get_message(timeout=2)
        event = msgspec.json.decode(got["data"])
        assert (event["type"], event["action"], event["user"]["id"]) == ("presence", "left", gone.id)
        assert await sub.get_message(timeout=0.5) is None and hub._left_unsent == {}
    finally:
        await sub.aclose()


async def test_sockets_are_checked_again_even_when_no_subscription_broke(settings, xp_store, monkeypatch):
    """A kick or removal whose publish failed, while every process's subscription was fine, left the socket
    reading the room for good (only its own posts were refused). Each process checks its sockets every few
    presence leases anyway."""
    from dataclasses import replace

    pool, redis = xp_store
    hub = Hub(replace(settings, presence_ttl_s=0.6), pool, redis)  # a tick every 0.2 s, a check every 2.4 s
    checked: list[float] = []
    real = hub._recheck

    async def counted() -> None:
        checked.append(asyncio.get_running_loop().time())
        await real()

    monkeypatch.setattr(hub, "_recheck", counted)
    await hub.start()
    try:
        await asyncio.sleep(5.5)
    finally:
        await hub.stop()
    assert len(checked) >= 2, checked


async def test_the_periodic_check_is_paced_and_a_breaks_check_is_not(settings, xp_store, monkeypatch):
    """Every socket's check is a few queries: with tens of thousands of sockets the periodic pass was a burst every
    minute. It goes at most RECHECK_PER_S sockets a second; the check after a subscription break (events surely
    lost) goes at once."""
    from server.auth import AuthUser

    pool, redis = xp_store
    hub = Hub(settings, pool, redis)
    room = f"course:{uuid.uuid4().int % 10**6}"
    access = RoomAccess(room_id=room, kind="course", course_id=1, tenant_id=1, moderator=False)
    checked: list[float] = []

    async def fine(db, room_id, auth, opened_at=None):  # type: ignore[no-untyped-def]
        checked.append(asyncio.get_running_loop().time())
        return None

    async def send(msg: dict) -> None:
        pass

    monkeypatch.setattr(hub_module, "still_allowed", fine)
    monkeypatch.setattr(hub_module, "RECHECK_PER_S", 40.0)
    monkeypatch.setattr(hub_module, "RECHECK_CHUNK", 10)
    for _ in range(60):
        user = _user("u")
        conn = Conn(hub, access, user, send, 16)
        conn.auth = AuthUser(id=user.id, tenant_id=1, tenant="t", name="u", role="learner")
        hub.rooms.setdefault(room, set()).add(conn)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    hub._recheck_soon(paced=True)
    await hub._recheck_task
    paced = loop.time() - t0
    checked.clear()
    t0 = loop.time()
    hub._recheck_soon()  # after a subscription break
    await hub._recheck_task
    assert len(checked) == 60 and paced >= 1.2 and loop.time() - t0 < 0.5, (paced, loop.time() - t0)
