"""The hub's presence pairs against real Redis, without a server: a user's last socket closing starts a grace,
and the orderings around its end that a server run hits only by chance."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from server.realtime.conn import Conn
from server.realtime.hub import Hub
from store.events import UserRef
from store.rooms import RoomAccess
from tests.progress_helpers import xp_store  # noqa: F401 - fixture


async def _hub(settings, xp_store) -> Hub:  # type: ignore[no-untyped-def]
    pool, redis = xp_store
    hub = Hub(replace(settings, presence_grace_s=0.3), pool, redis)
    await hub.start()
    return hub


def _conn(hub: Hub, room: str, user: UserRef) -> Conn:
    async def send(msg: dict) -> None:
        pass

    access = RoomAccess(room_id=room, kind="course", course_id=1, tenant_id=1, moderator=False)
    return Conn(hub, access, user, send, 8)


async def _online(hub: Hub, room: str) -> set[int]:
    return {u.id for u in (await hub.presence.online(room, 10))[1]}


async def test_back_as_the_grace_ends_is_still_online(settings, xp_store):
    """The grace ends (its `left` under way) just as the user's new socket attaches: the join waits for the leave,
    so the user ends up online, not connected but missing from presence until the next heartbeat."""
    hub = await _hub(settings, xp_store)
    room, user = f"course:{uuid.uuid4().hex[:8]}", UserRef(id=7, name="u", role="learner")
    try:
        first = _conn(hub, room, user)
        await hub.attach(first)
        await hub.detach(first)
        assert await _online(hub, room) == {7}  # in the grace: still online
        key = (room, user.id)
        leave = hub.presence.leave

        async def slow_leave(*args):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.05)  # its round trip to Redis takes a while
            return await leave(*args)

        hub.presence.leave = slow_leave  # type: ignore[method-assign]
        hub._leaving.pop(key).cancel()
        hub._grace_over(key)  # the timer fires; its leave starts on the next turn of the loop
        await hub.attach(_conn(hub, room, user))  # and the user is back in that same turn
        await asyncio.sleep(0.2)  # whatever was under way has landed
        assert await _online(hub, room) == {7}
    finally:
        await hub.stop()


async def test_a_connection_that_never_attached_does_not_take_the_user_offline(settings, xp_store):
    """A socket whose attach failed early (a subscribe error) is detached all the same: it must not count down a
    pair it never counted, or another socket of the user's would be announced as gone after the grace."""
    hub = await _hub(settings, xp_store)
    room, user = f"course:{uuid.uuid4().hex[:8]}", UserRef(id=8, name="v", role="learner")
    try:
        await hub.attach(_conn(hub, room, user))
        await hub.detach(_conn(hub, room, user))  # never attached
        await asyncio.sleep(0.6)  # past the grace
        assert await _online(hub, room) == {8} and hub._pairs[(room, user.id)][0] == 1
    finally:
        await hub.stop()
