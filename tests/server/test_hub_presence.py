"""The hub's presence pairs against real Redis, without a server: a user's last socket closing starts a grace,
and the orderings around its end that a server run hits only by chance."""
from __future__ import annotations

import asyncio
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from server.realtime import socket as socket_mod
from server.realtime.conn import Conn
from server.realtime.hub import Hub
from store import live
from store.events import UserRef
from store.keys import PROCS
from store.rooms import RoomAccess
from tests.progress_helpers import course_in_new_tenant, xp_store  # noqa: F401 - fixture


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


async def test_a_resume_while_a_replay_ends_loses_no_live_event(settings, xp_store, make):  # type: ignore[no-untyped-def]
    """`resume` while a gap's replay was under way: the replay ended while the welcome read where the room is, so
    the next live event went to the socket ahead of the welcome and the new stream dropped it (nothing after the
    welcome until the hub's catch-up check)."""
    import json

    from server.realtime.conn import text_frame
    from store import messages, rooms

    pool, redis = xp_store
    u = make.user("learner")
    async with pool.acquire() as db:
        cid = await db.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'c') RETURNING id",
                                u.tenant_id, u.id)
        await rooms.ensure_room(db, f"course:{cid}")
    room = f"course:{cid}"
    for i in range(7):
        await messages.post_message(pool, redis, room, None, f"m{i + 1}")
    hub = await _hub(settings, xp_store)
    sent: list[dict] = []

    async def send(msg: dict) -> None:
        sent.append(json.loads(msg["text"]))

    conn = Conn(hub, RoomAccess(room_id=room, kind="course", course_id=cid, tenant_id=u.tenant_id, moderator=False),
                UserRef(id=u.id, name=u.name, role="learner"), send, 64)
    conn.ready, conn.filling, conn.last_seq = True, False, 5
    gate, events_after, online = asyncio.Event(), hub.events_after, hub.presence.online

    async def gated(*args):  # type: ignore[no-untyped-def]
        await gate.wait()
        return await events_after(*args)

    hub.events_after = gated  # type: ignore[method-assign]
    try:
        async with pool.acquire() as db:
            (_, seven), = await rooms.events_after(db, room, 6, 1)
        conn.offer(7, text_frame(seven))  # 6 is missing: a replay of 6..7 starts (and waits at the gate)
        replay = conn.fill_task

        async def held(*args):  # type: ignore[no-untyped-def]
            await asyncio.wait([replay])  # the welcome reads presence once the old replay is over...
            await messages.post_message(pool, redis, room, None, "m8")  # ...and seq 8 comes in meanwhile
            async with pool.acquire() as db:
                (_, eight), = await rooms.events_after(db, room, 7, 1)
            conn.offer(8, text_frame(eight))
            return await online(*args)

        hub.presence.online = held  # type: ignore[method-assign]
        welcome = asyncio.create_task(hub.welcome(conn, 7))  # the client: resume after_seq 7
        await asyncio.sleep(0)
        gate.set()
        await welcome
        await asyncio.sleep(0.3)
        last = max(i for i, f in enumerate(sent) if f["type"] == "welcome")
        assert [f.get("seq") for f in sent[last + 1:]] == [8], sent
    finally:
        conn.stop_fill()
        await hub.stop()


async def test_a_join_while_idle_rooms_are_unsubscribed_keeps_its_room(settings, xp_store):
    """Two rooms idle long enough: a join to the second while the first's unsubscribe waited for Redis made the
    sweep fail (KeyError), leaving the other idle rooms and users subscribed until a later tick."""
    hub = await _hub(settings, xp_store)
    first, second, third = (f"course:{uuid.uuid4().hex[:8]}" for _ in range(3))
    user = UserRef(id=9, name="w", role="learner")
    try:
        for room in (first, second, third):
            conn = _conn(hub, room, user)
            await hub.attach(conn)
            await hub.detach(conn)
        for room in (first, second, third):
            hub._idle_since[room] -= 3600  # idle for an hour
        unsubscribe, back = hub._pubsub.unsubscribe, _conn(hub, second, user)

        async def slow(*channels):  # type: ignore[no-untyped-def]
            if back.room not in hub.rooms:
                await hub.attach(back)  # the user is back in the second room while Redis confirms the first
            return await unsubscribe(*channels)

        hub._pubsub.unsubscribe = slow  # type: ignore[method-assign]
        await hub._unsubscribe_idle()
        assert hub._subscribed & {first, second, third} == {second} and hub.rooms[second] == {back}
    finally:
        await hub.stop()


async def test_an_unsubscribe_that_fails_is_tried_again(settings, xp_store):
    """An idle room whose unsubscribe failed (Redis dropped) was forgotten, but redis-py subscribes its channel
    again on reconnecting: the process received the room's events for good, for no one."""
    hub = await _hub(settings, xp_store)
    room = f"course:{uuid.uuid4().hex[:8]}"
    user = UserRef(id=11, name="w", role="learner")
    try:
        conn = _conn(hub, room, user)
        await hub.attach(conn)
        await hub.detach(conn)
        hub._idle_since[room] -= 3600
        unsubscribe = hub._pubsub.unsubscribe

        async def dropped(*channels):  # type: ignore[no-untyped-def]
            raise ConnectionError("Connection closed by server.")

        hub._pubsub.unsubscribe = dropped  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            await hub._unsubscribe_idle()
        assert room in hub._idle_since  # still to be dropped
        hub._pubsub.unsubscribe = unsubscribe  # type: ignore[method-assign]
        hub._subscribed.add(room)  # as re-subscribing on the reconnect confirms it
        await hub._unsubscribe_idle()
        assert room not in hub._idle_since and room not in hub._subscribed
    finally:
        await hub.stop()


async def test_a_channel_subscribed_for_nobody_is_dropped_by_the_idle_sweep(settings, xp_store):
    """A subscription confirmed for a room (or user) nobody here wants any more (redis-py subscribing again, on a
    reconnect, to a channel whose unsubscribe got no reply; a confirmation arriving late) went on the subscribed
    list but never on the idle one: its events came to this process for good, for no one."""
    from store.events import room_topic, user_topic
    from store.keys import events_channel

    hub = await _hub(settings, xp_store)
    room = f"course:{uuid.uuid4().hex[:8]}"
    try:
        await hub._pubsub.subscribe(events_channel(room_topic(room)), events_channel(user_topic(424242)))
        for _ in range(50):  # the reader takes the confirmations
            if room in hub._subscribed and 424242 in hub._user_subs:
                break
            await asyncio.sleep(0.05)
        assert room in hub._subscribed and room in hub._idle_since and 424242 in hub._user_subs
        hub._idle_since[room] -= 3600
        await hub._unsubscribe_idle()
        assert room not in hub._subscribed and room not in hub._idle_since and 424242 not in hub._user_subs
    finally:
        await hub.stop()


def test_attendance_times_are_on_the_database_clock():
    """A socket's leaving was stamped with its server host's clock, its joining with the database's: hosts whose
    clocks were off shortened (or dropped) or lengthened every connection in the report. The leaving is now the
    database's time the socket opened at, plus the time since on this host's steady clock."""
    import time
    from datetime import datetime, timedelta, timezone

    conn = Conn.__new__(Conn)
    conn.opened_at = datetime(2030, 1, 1, tzinfo=timezone.utc)  # the database said, an hour off this host
    conn.opened_mono = time.monotonic() - 90
    assert abs(conn.db_now() - (conn.opened_at + timedelta(seconds=90))) < timedelta(seconds=1)


# --- attendance reopened after this process was taken for dead (review cases) ---------------------------------


@asynccontextmanager
async def _live_hub(settings, pool, redis):  # type: ignore[no-untyped-def]
    """A started hub with one open socket in a live session's room, its attendance row 5 minutes old: (hub, conn);
    stopped on the way out."""
    async with pool.acquire() as c:
        cid, owner, ids = await course_in_new_tenant(c, 1)
        sid = (await live.create_session(c, cid, "s", None, owner))["id"]
    await live.start_session(pool, redis, sid)
    hub = Hub(settings, pool, redis)
    await hub.start()
    room = live.room_of(sid)

    async def send(msg):  # type: ignore[no-untyped-def]
        pass

    access = RoomAccess(room_id=room, kind="live", course_id=cid, tenant_id=1, moderator=False)
    conn = Conn(hub, access, UserRef(id=ids[0], name="u", role="learner"), send, 8)
    try:
        async with pool.acquire() as c:
            conn.attendance_id = await live.attendance_join(c, sid, ids[0], hub.proc)
            await c.execute("UPDATE live_attendance SET joined_at = now() - interval '5 minutes' WHERE id = $1",
                            conn.attendance_id)
        hub.rooms.setdefault(room, set()).add(conn)
        yield hub, conn
    finally:
        hub.rooms.clear()
        hub._pairs.clear()
        await hub.stop()


async def _left(pool, aid):  # type: ignore[no-untyped-def]
    return await pool.fetchval("SELECT left_at FROM live_attendance WHERE id = $1", aid)


async def test_a_reapers_close_landing_after_the_relisting_is_reopened(settings, xp_store):
    """(Review) the reopen ran once, on the beat that found the process back on the list: a reaper's close
    landing after it (the reaper waits for a connection between its claim and its update) stayed for good."""
    pool, redis = xp_store
    async with _live_hub(settings, pool, redis) as (hub, conn):
        # the reaper (another process) claims this one: _DEAD's ZREM
        assert await redis.zrem(PROCS, hub.proc) == 1
        # this process's heartbeat comes before the reaper's Postgres update: relisted, nothing to reopen yet
        await hub._heartbeat()
        assert hub.presence.relisted is False
        # the reaper's close lands (at the last sign of life, a lease and more ago)
        last_seen = datetime.now(timezone.utc) - timedelta(seconds=3 * settings.presence_ttl_s)
        async with pool.acquire() as c:
            assert await live.attendance_close_proc(c, hub.proc, last_seen) == 1
        for _ in range(3):  # later beats: listed all along now
            await hub._heartbeat()
        assert conn in hub.rooms[conn.room] and conn.attendance_id is not None  # the socket is open
        assert await _left(pool, conn.attendance_id) is None, "socket open, its row closed for good"


async def test_a_socket_closing_while_its_row_is_reopened_has_it_closed(settings, xp_store, monkeypatch):
    """(Review) the socket's own close found its row closed by the reaper; the reopen then opened it for good."""
    pool, redis = xp_store
    async with _live_hub(settings, pool, redis) as (hub, conn):
        aid = conn.attendance_id
        # reaped a while ago: row closed at the last sign of life
        async with pool.acquire() as c:
            await live.attendance_close_proc(c, hub.proc, datetime.now(timezone.utc) - timedelta(minutes=1))
        await redis.zrem(PROCS, hub.proc)
        real = live.attendance_reopen

        async def slow_reopen(db, proc, ids, s):  # type: ignore[no-untyped-def]
            # the socket closes while the reopen waits for its pool connection: its cleanup runs now
            st = SimpleNamespace(pool=pool)
            hub.rooms[conn.room].discard(conn)
            await socket_mod._cleanup(st, hub, conn)
            return await real(db, proc, ids, s)
        monkeypatch.setattr(live, "attendance_reopen", slow_reopen)
        await hub._heartbeat()
        monkeypatch.setattr(live, "attendance_reopen", real)
        for _ in range(3):
            await hub._heartbeat()
        assert conn.attendance_id is None  # the socket is gone
        assert await _left(pool, aid) is not None, "row of a closed socket open for good"


async def test_a_failed_reopen_does_not_lose_the_joined_announcements(settings, xp_store, monkeypatch):
    """(Review) the reopen ran before the "joined" of the users back, which a heartbeat reports once."""
    from store.events import room_topic
    from store.keys import events_channel, presence_room
    pool, redis = xp_store
    async with _live_hub(settings, pool, redis) as (hub, conn):
        room, user = conn.room, conn.user
        hub._pairs[(room, user.id)] = [1, user]
        sub = redis.pubsub()
        await sub.subscribe(events_channel(room_topic(room)))
        try:
            await hub._heartbeat()  # listed, the pair online
            while await sub.get_message(timeout=0.5) is not None:
                pass
            # taken for dead: reaped (off the list) and its users swept from the room (others saw `left`)
            await redis.zrem(PROCS, hub.proc)
            await redis.delete(presence_room(room))

            async def failing(*a, **k):  # type: ignore[no-untyped-def]
                raise OSError("database unreachable for a moment")
            monkeypatch.setattr(live, "attendance_reopen", failing)
            try:
                await hub._heartbeat()
            except OSError:
                pass
            monkeypatch.undo()
            await hub._heartbeat()
            await hub._heartbeat()
            got = []
            while (m := await sub.get_message(timeout=0.5)) is not None:
                if m["type"] == "message":
                    got.append(m["data"])
            assert any(b'"joined"' in g for g in got), got
        finally:
            await sub.aclose()


async def test_a_dead_process_attendance_is_closed_on_the_database_clock(settings, xp_store, monkeypatch):
    """The reaper closed a dead process's rows at its lease expiry less a lease, a moment on Redis's clock written
    as the database's: a Redis host 2 minutes behind cut 2 minutes off every such row (a recent join became
    zero), and the reopen of a process wrongly taken for dead no longer matched. Now: the time since its last sign
    of life, on Redis's clock, taken from the database's now."""
    import time as time_mod

    pool, redis = xp_store
    ttl = settings.presence_ttl_s
    behind = 120.0  # Redis's host clock, behind the database's
    async with _live_hub(settings, pool, redis) as (hub, conn):
        sid = int(conn.room.split(":")[1])
        gone = f"gone-host:1:{uuid.uuid4().hex[:6]}"
        async with pool.acquire() as c:
            aid = await live.attendance_join(c, sid, conn.user.id, gone)
            await c.execute("UPDATE live_attendance SET joined_at = now() - interval '10 minutes' WHERE id = $1", aid)
        real_now = await hub.presence.now_s()
        expiry = real_now - behind - ttl  # lapsed a lease ago, on the lagging clock
        await redis.zadd(PROCS, {gone: int(expiry * 1000)})
        monkeypatch.setattr(hub.presence, "now_s", lambda: _value(real_now - behind))
        hub._expired_seen[gone] = time_mod.monotonic() - ttl - 1  # seen lapsed for a whole lease here
        await hub._reap_dead_procs()
        left, db_now = await pool.fetchrow("SELECT left_at, now() FROM live_attendance WHERE id = $1", aid)
        assert left is not None
        assert abs((db_now - left).total_seconds() - 2 * ttl) < 3, (db_now - left)


async def _value(x):  # type: ignore[no-untyped-def]
    return x


async def test_a_stop_as_a_heartbeat_ends_leaves_nobody_online(settings, xp_store):
    """(Review) the hub's loops were cancelled once and not awaited: a stop beginning as a heartbeat's round trip
    ended (the loop's wait_for dropped the cancel on Python 3.11) left the heartbeat running; it listed the process
    again after the stop took it off, and its users online again ("joined" right after "left")."""
    pool, redis = xp_store
    hub = Hub(replace(settings, presence_ttl_s=0.6, presence_grace_s=0.0), pool, redis)
    await hub.start()
    room, user = f"course:{uuid.uuid4().hex[:8]}", UserRef(id=7, name="u", role="learner")
    await hub.attach(_conn(hub, room, user))
    stopping: list[asyncio.Task] = []
    beat = hub.presence.heartbeat

    async def heartbeat(*args, **kw):  # type: ignore[no-untyped-def]
        got = await beat(*args, **kw)
        if not stopping:  # the stop begins as this beat's round trip ends
            stopping.append(asyncio.create_task(hub.stop()))
        return got

    hub.presence.heartbeat = heartbeat  # type: ignore[method-assign]
    while not stopping:
        await asyncio.sleep(0.01)
    await stopping[0]
    await asyncio.sleep(1.0)  # two beats' time
    assert all(t.done() for t in hub._tasks)
    assert await redis.zscore(PROCS, hub.proc) is None
    assert await _online(hub, room) == set()


async def test_a_stop_with_redis_hung_is_bounded(settings, xp_store, tmp_path):
    """(Tester) with Redis hung (not down), a stop announced each user's leave one after another, each waiting out
    the client's 10 s timeout: 100 s for a server with 9 users' rooms, hours for a busy one. The leaves go at once
    and within STOP_LEAVES_S; the process stays listed, and survivors sweep its users when its lease lapses."""
    import os
    import signal
    import time

    from server.app import command_redis
    from server.realtime import hub as hub_module
    from store import embedded

    pool, _ = xp_store
    ddir = tmp_path / "hung"
    url = embedded._ensure_redis(ddir)
    redis, sub = command_redis(url), command_redis(url)
    pid = int((ddir / "redis" / "redis.pid").read_text())
    hub = Hub(settings, pool, redis, pubsub_redis=sub)
    try:
        await hub.start()
        for i in range(6):
            await hub.attach(_conn(hub, f"course:{uuid.uuid4().hex[:8]}", UserRef(id=100 + i, name="u", role="learner")))
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        await hub.stop()
        took = time.monotonic() - t0
        bound = hub_module.STOP_LOOPS_S + 2 * hub_module.STOP_LEAVES_S + 5 + 3  # (+ the last votes' 5 s, slack)
        assert took < bound, f"the stop took {took:.1f} s"
    finally:
        os.kill(pid, signal.SIGCONT)
        await redis.aclose()
        await sub.aclose()
        embedded.stop_embedded(ddir)


async def test_a_dead_process_has_the_boards_checked_against_the_ledger(settings, xp_store):
    """(Tester) a server killed between an award's commit and its board update left the boards short for up to an
    hour: a later award's high mark hid it from every restart's check. The survivor that reaps it checks them."""
    import time as time_mod

    from store import keys, leaderboard_rebuild, leaderboards, xp

    pool, redis = xp_store
    await leaderboard_rebuild.ensure_built(pool, redis)
    async with pool.acquire() as c:
        _, _, (learner,) = await course_in_new_tenant(c, 1)
        award = await xp.insert_award(c, learner, "helpful_answer", "h:died-with-its-process")  # committed; no board
        board = leaderboards.board_key("tenant", award.tenant_id, "all")
    assert await redis.zscore(board, str(learner)) is None
    hub = Hub(settings, pool, redis)
    hub.app_state = SimpleNamespace(pool=pool, redis=redis, lb_rebuild=None)
    gone = f"gone-host:1:{uuid.uuid4().hex[:6]}"
    await redis.zadd(PROCS, {gone: int((await hub.presence.now_s() - 2 * settings.presence_ttl_s) * 1000)})
    hub._expired_seen[gone] = time_mod.monotonic() - settings.presence_ttl_s - 1
    await hub._reap_dead_procs()
    assert hub.app_state.lb_rebuild is not None
    await hub.app_state.lb_rebuild
    assert await redis.zscore(board, str(learner)) == 25 and await redis.exists(keys.LEADERBOARD_BUILT)


async def test_a_room_back_at_the_presence_cap_hears_who_left(settings, xp_store, monkeypatch):
    """(Tester) presence events go out while a room has at most STUDYHALL_PRESENCE_MAX online: a join to the cap
    was announced, but a leave back down to it was not (`<` where joins had `<=`), so everyone went on showing the
    one who left (bob, announced when he joined) online for good. The sweep of a dead process's users, and a
    `left` sent again after a failed publish, had the same off-by-one."""
    from server.realtime import hub as hub_mod

    sent: list[tuple[str, int, int]] = []
    real = hub_mod.publish

    async def recording(redis, topic, event):  # type: ignore[no-untyped-def]
        if isinstance(event, hub_mod.PresenceEvent):
            sent.append((event.action, event.user.id, event.online_count))
        return await real(redis, topic, event)

    monkeypatch.setattr(hub_mod, "publish", recording)
    pool, redis = xp_store
    hub = Hub(replace(settings, presence_grace_s=0, presence_max=2), pool, redis)
    await hub.start()
    room = f"course:{uuid.uuid4().hex[:8]}"
    ada, bob, cat = (UserRef(id=i, name=n, role="learner") for i, n in ((31, "ada"), (32, "bob"), (33, "cat")))
    try:
        conns = {u.id: _conn(hub, room, u) for u in (ada, bob, cat)}
        for u in (ada, bob, cat):
            await hub.attach(conns[u.id])
        assert sent == [("joined", 31, 1), ("joined", 32, 2)]  # cat, the third: over the cap, not announced
        await hub.detach(conns[32])
        assert sent[2:] == [("left", 32, 2)]  # the room is back at the cap: bob's leave is told
        # the sweep of a dead process's users, at the cap again
        back = _conn(hub, room, bob)
        await hub.attach(back)
        assert sent[3:] == []  # (bob back: three online, over the cap)
        async def swept(room_id):  # type: ignore[no-untyped-def]
            return [bob], 2
        monkeypatch.setattr(hub.presence, "sweep", swept)
        await hub._sweep_presence()
        assert sent[3:] == [("left", 32, 2)]
        # (tester) two swept at once: each `left` with the count after it (both said the last count, 1)
        async def swept_two(room_id):  # type: ignore[no-untyped-def]
            return [bob, cat], 1
        monkeypatch.setattr(hub.presence, "sweep", swept_two)
        await hub._sweep_presence()
        assert sent[4:] == [("left", 32, 2), ("left", 33, 1)]
    finally:
        await hub.stop()
