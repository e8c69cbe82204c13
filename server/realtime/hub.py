"""The per-process fan-out hub: one Redis subscription for every room with local connections, each event
decoded once and its text shared by every local connection, presence heartbeats and sweeps, and a safety
net that re-reads Postgres for connections left behind (a publisher that died between commit and publish).
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from datetime import datetime

import asyncpg
import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from server import tutoring
from server.realtime.conn import Conn, text_frame
from server.realtime.standing import still_allowed
from store import leaderboard_rebuild, leaderboards, xp
from store import live as live_repo
from store import rooms as rooms_repo
from store import tutor as tutor_repo
from store.aio import cancel_and_wait
from store.events import (CLOSE_FORBIDDEN, CLOSE_SLOW_CONSUMER, CLOSE_UNAUTHENTICATED, INTERNAL, UserRef, Welcome,
                          publish, room_topic, user_topic)
from store.events import Presence as PresenceEvent
from store.keys import events_channel, poll_results_window, rate_connect, rate_connect_token
from store.presence import Presence
from store.ratelimit import SendLimiter
from store.settings import Settings

logger = logging.getLogger(__name__)

UNSUBSCRIBE_AFTER_S = 30.0
POLL_RESULTS_EVERY_S = 0.25
COMPLAIN_EVERY_S = 60.0  # a failure repeating every tick is logged again this often (see Hub._complain)
# Every local socket is checked against the database every this many presence leases anyway (60 s by default;
# see _recheck_soon): a kick or removal whose event was lost (its publish failed while every subscription was
# fine) still closes the socket.
RECHECK_EVERY_TTLS = 4
# The periodic check goes at most this many sockets a second per process (a few queries each: with tens of thousands
# of sockets it was a burst of queries every minute), in chunks of RECHECK_CHUNK per pooled connection; the check
# after a subscription break (when events were surely lost) goes at full speed.
RECHECK_PER_S = 200.0
RECHECK_CHUNK = 50
LEFT_RETRIES = 5  # ticks a `left` whose publish failed is published again (while the user stays away)
REFRESH_TRIES = 5  # rounds of the presence refresh after the subscription came back (rooms that failed again)
REFRESH_RETRY_S = 1.0
# The subscription is pinged this often, and taken for dead (reconnected, readiness failing meanwhile) when no pong
# came back for SUB_DEAD_S: a half-open connection (a partition, a proxy that lost Redis) reads nothing forever
# without an error.
SUB_PING_S = 5.0
SUB_DEAD_S = 15.0
# A process with attendance rows open that stays off the process list this many leases is dead (a live one lists
# itself again within one): its rows are closed (see Hub._close_unlisted).
UNLISTED_TTLS = 3


class _Who(msgspec.Struct):
    id: int | None = None


class _Envelope(msgspec.Struct):
    """The few fields the hub routes on; the rest of the event is forwarded untouched."""

    type: str
    seq: int = 0
    user: _Who | None = None
    user_id: int | None = None
    reason: str = "kicked"
    token_id: str | None = None
    gen: int = 0  # internal.signout
    course_id: int | None = None
    pod_id: int | None = None


_envelope = msgspec.json.Decoder(_Envelope)
_NOT_TO_SELF = frozenset({"typing", "achievement.unlocked"})
STOP_LOOPS_S = 2.0  # how long a stop waits for the hub's loops to end
STOP_LEAVES_S = 5.0  # how long it gives announcing its users' leaves, and again leaving the process list
BOT_CONNECTS = 20  # a bot's socket-open budget, in multiples of a person's (STUDYHALL_WS_CONNECT_RATE / _BURST)
BOT_SENDS = 20  # a bot's send budget, in multiples of a person's (STUDYHALL_WS_SEND_RATE / _BURST)


def _logged_leave(task: asyncio.Task) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:  # the entry expires with its heartbeats
        logger.warning("could not announce a user leaving a room", exc_info=exc)


class Hub:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: Redis, *,
                 pubsub_redis: Redis | None = None) -> None:
        """`pubsub_redis`: the client the subscription reads from (one without a read timeout: it waits for
        messages as long as it takes); default `redis`."""
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self.proc = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.presence = Presence(redis, self.proc, settings.presence_ttl_s)
        self.limiter = SendLimiter(redis, settings.ws_send_rate, settings.ws_send_burst)
        # a bot posts for everyone it relays (a Discord channel's people): BOT_SENDS times a person's send budget
        self.bot_limiter = SendLimiter(redis, settings.ws_send_rate * BOT_SENDS, settings.ws_send_burst * BOT_SENDS)
        self.connect_limiter = SendLimiter(redis, settings.ws_connect_rate, settings.ws_connect_burst, key=rate_connect)
        # bots bridge many rooms: BOT_CONNECTS times the budget, but one (a revoked token's reconnect loop was a
        # database lookup per try, unlimited)
        self.bot_connect_limiter = SendLimiter(redis, settings.ws_connect_rate * BOT_CONNECTS,
                                               settings.ws_connect_burst * BOT_CONNECTS, key=rate_connect)
        # the same budgets per token, taken before the database is asked (see keys.RATE_CONNECT_TOKEN)
        self.token_connect_limiter = SendLimiter(redis, settings.ws_connect_rate, settings.ws_connect_burst,
                                                 key=rate_connect_token)
        self.bot_token_connect_limiter = SendLimiter(redis, settings.ws_connect_rate * BOT_CONNECTS,
                                                     settings.ws_connect_burst * BOT_CONNECTS, key=rate_connect_token)
        self.tick_s = max(0.2, settings.presence_ttl_s / 3)
        self.rooms: dict[str, set[Conn]] = {}
        self._pairs: dict[tuple[str, int], list] = {}  # (room, user id) -> [local connections, UserRef]
        self._leaving: dict[tuple[str, int], asyncio.TimerHandle] = {}  # pairs with no connection, in their grace
        self._leave_tasks: dict[tuple[str, int], asyncio.Task] = {}  # `left` announcements under way, per pair
        self._stopping = False
        self._users: dict[int, set[Conn]] = {}  # user id -> local connections (personal `user:<id>` events)
        self._user_subs: set[int] = set()
        self._subscribed: set[str] = set()
        self._sub_waiters: dict[str, asyncio.Future] = {}
        self._idle_since: dict[str, float] = {}
        self._seen_seq: dict[str, int] = {}
        self._sub_broken = False  # the pub/sub connection failed and has not delivered anything since
        self._recheck_due = False  # sockets to check again (see _recheck_soon)
        self._recheck_hurry = False  # the next (or running) check at full speed
        self._recheck_task: asyncio.Task | None = None
        self._rechecked_at = time.monotonic()
        self._left_unsent: dict[tuple[str, int], tuple[UserRef, int]] = {}  # (room, user) -> (user, tries left)
        self._background: set[asyncio.Task] = set()
        self._expired_seen: dict[str, float] = {}  # other processes seen with a lapsed lease, and since when
        self._unclosed: dict[int, datetime] = {}  # attendance rows whose close failed -> when the socket closed
        self._unlisted_seen: dict[str, float] = {}  # processes with open attendance, off the list, and since when
        self._unlisted_checked = float("-inf")
        self._reopen_until = float("-inf")  # after this process found itself off the list: reopen its rows till then
        self._poll_flush: dict[int, asyncio.Task] = {}  # poll id -> the task that will publish its results
        self._poll_dirty: set[int] = set()  # polls with votes their last published results did not count
        self._prefix = events_channel("room:").encode()
        self._user_prefix = events_channel("user:").encode()
        self._pubsub = (pubsub_redis or redis).pubsub()
        self._tasks: list[asyncio.Task] = []
        self._failing: dict[str, float] = {}  # repeating failures (see _complain) -> when last logged

    # --- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._pubsub.subscribe(events_channel(f"proc:{self.proc}"))
        await self.presence.heartbeat([])
        self._pong_at = asyncio.get_running_loop().time()
        self._tasks = [asyncio.create_task(self._read(), name="hub-read"),
                       asyncio.create_task(self._tick(), name="hub-tick"),
                       asyncio.create_task(self._repair_gaps(), name="hub-gap-repair"),
                       asyncio.create_task(self._beat(), name="hub-heartbeat"),
                       asyncio.create_task(self._watch(), name="hub-watch")]
        logger.info("realtime hub started", extra={"fields": {"proc": self.proc}})

    def receiving(self) -> bool:
        """Whether this process receives the rooms' live events (its pub/sub reader runs and its connection
        works); readiness reports it."""
        reader = self._tasks[0] if self._tasks else None
        return reader is not None and not reader.done() and not self._sub_broken

    def send_limiter(self, role: str) -> SendLimiter:
        """The send budget of a user of this role (bots: BOT_SENDS times a person's)."""
        return self.bot_limiter if role == "bot" else self.limiter

    async def stop(self) -> None:
        self._stopping = True
        app_state = getattr(self, "app_state", None)
        if app_state is not None:  # this process's tutor answers end here, not by a survivor's takeover
            await tutoring.settle_own(app_state, self.proc)
        unsent = list(self._poll_flush)  # votes of the last window: their results go out now, not never
        for task in (self._tasks + list(self._poll_flush.values()) + [t for t in (self._recheck_task,) if t]
                     + list(self._background)):
            task.cancel()
        # the hub's own loops end before the leaves below (a heartbeat still running re-listed the process and its
        # users: "joined" right after "left"); a cancel they lost is sent again
        await asyncio.gather(*(cancel_and_wait(t, timeout=STOP_LOOPS_S) for t in self._tasks))
        await xp.stop_repair()  # one the tick started: before the pool closes
        self._poll_flush.clear()
        self._poll_dirty.clear()
        if unsent:
            await asyncio.wait([asyncio.create_task(self._publish_poll(p)) for p in unsent], timeout=5)
        for conns in list(self.rooms.values()):
            for conn in list(conns):
                conn.close_soon(1001, "server shutting down")
        for grace in self._leaving.values():
            grace.cancel()
        self._leaving.clear()
        if self._leave_tasks:
            await asyncio.wait(list(self._leave_tasks.values()), timeout=5)
        # every pair's `left` at once, and within STOP_LEAVES_S: one after another against a hung Redis, each waited
        # out its 10 s timeout (a server with 9 users' rooms took 100 s to stop). Not done: the process stays listed,
        # so survivors sweep its users once its lease lapses.
        left_all = True
        try:
            async with asyncio.timeout(STOP_LEAVES_S):
                results = await asyncio.gather(*(self._announce_leave(room, user)
                                                 for (room, _), (_, user) in list(self._pairs.items())),
                                               return_exceptions=True)
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                left_all = False
                logger.warning("presence cleanup failed for %d of %d rooms' users", len(failed), len(results),
                               exc_info=failed[0])
        except TimeoutError:
            left_all = False
            logger.warning("presence cleanup did not finish in %g s; survivors sweep this process's users once its "
                           "lease lapses", STOP_LEAVES_S)
        self._pairs.clear()
        settled = left_all
        try:
            await self._close_attendance()  # rows whose close failed earlier, at the moment each socket left
            async with self.pool.acquire() as db:  # and rows of sockets whose handlers have not cleaned up yet
                await live_repo.attendance_close_proc(db, self.proc)  # (the database's now)
        except Exception:  # noqa: BLE001
            # this process stays listed, so its lease lapses and a survivor's reaper closes its rows (forgotten,
            # nobody ever would)
            settled = False
            logger.warning("attendance rows left open; a survivor closes them once this process's lease lapses",
                           exc_info=True)
        try:
            async with asyncio.timeout(STOP_LEAVES_S):  # (a hung Redis: the lease lapses instead)
                if settled:
                    await self.presence.forget_proc()
                await self._pubsub.aclose()
        except Exception:  # noqa: BLE001 (TimeoutError included)
            logger.warning("hub shutdown incomplete", exc_info=True)

    # --- connections ----------------------------------------------------------------------------------

    def sockets_of(self, user_id: int) -> int:
        """The user's open sockets on this process."""
        return len(self._users.get(user_id, ()))

    async def attach(self, conn: Conn) -> None:
        """Register a connection; returns once this process receives the room's live events."""
        room = conn.room
        self.rooms.setdefault(room, set()).add(conn)
        self._idle_since.pop(room, None)
        if room not in self._subscribed:
            waiter = self._sub_waiters.get(room)
            if waiter is None:
                waiter = self._sub_waiters[room] = asyncio.get_running_loop().create_future()
                try:
                    await self._pubsub.subscribe(events_channel(room_topic(room)))
                except Exception as exc:  # the next join tries again; those waiting on this one fail now
                    self._sub_waiters.pop(room, None)
                    if not waiter.done():
                        waiter.set_exception(exc)
                        waiter.exception()  # retrieved: no "never retrieved" warning when nobody else waits
                    raise
            await asyncio.wait_for(asyncio.shield(waiter), 10)
        uid = conn.user.id
        self._users.setdefault(uid, set()).add(conn)
        if uid not in self._user_subs:
            self._user_subs.add(uid)
            try:
                await self._pubsub.subscribe(events_channel(user_topic(uid)))
            except BaseException:  # not subscribed: the user's next connection here tries again
                self._user_subs.discard(uid)
                raise
        key = (room, uid)
        while (leaving := self._leave_tasks.get(key)) is not None and not leaving.done():
            # their `left` is under way: it goes out first, then this join announces them again (not the other way
            # round, which would leave them connected but gone from presence)
            await asyncio.wait([leaving])
        if (grace := self._leaving.pop(key, None)) is not None:
            grace.cancel()  # back within the grace (a reload, a network blip): they never left
        conn.counted = True
        pair = self._pairs.get(key)
        if pair is None:
            self._pairs[key] = [1, conn.user]
            change = await self.presence.join(room, conn.user)
            if change.changed and change.online_count <= self.settings.presence_max:
                await publish(self.redis, room_topic(room), PresenceEvent(
                    room=room, action="joined", user=conn.user, online_count=change.online_count))
        else:
            pair[0] += 1

    async def detach(self, conn: Conn) -> None:
        conn.stop()
        room = conn.room
        conns = self.rooms.get(room)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.rooms[room]
                self._idle_since[room] = time.monotonic()
        mine = self._users.get(conn.user.id)
        if mine is not None:
            mine.discard(conn)
            if not mine:
                del self._users[conn.user.id]
        key = (room, conn.user.id)
        pair = self._pairs.get(key)
        if pair is not None and conn.counted:  # an attach that failed early never counted this connection
            conn.counted = False
            pair[0] -= 1
            if pair[0] <= 0:
                grace = self.settings.presence_grace_s
                if grace > 0 and self._tasks and not self._stopping:  # a stopping hub announces every pair itself
                    # Still online (heartbeats go on) for the grace: a reload or a blip reconnecting in time,
                    # here or on another process, shows neither `left` nor `joined`.
                    if key not in self._leaving:
                        self._leaving[key] = asyncio.get_running_loop().call_later(grace, self._grace_over, key)
                else:
                    del self._pairs[key]
                    await asyncio.shield(self._leave(key, conn.user))

    def _grace_over(self, key: tuple[str, int]) -> None:
        self._leaving.pop(key, None)
        pair = self._pairs.get(key)
        if pair is None or pair[0] > 0:
            return
        del self._pairs[key]
        self._leave(key, pair[1]).add_done_callback(_logged_leave)

    def _leave(self, key: tuple[str, int], user: UserRef) -> asyncio.Task:
        """Announce that the user left the room, as a task an `attach` of theirs waits for."""
        task = self._leave_tasks[key] = asyncio.create_task(self._announce_leave(key[0], user))
        task.add_done_callback(lambda t: self._leave_tasks.pop(key, None) if self._leave_tasks.get(key) is t else None)
        return task

    async def _announce_leave(self, room: str, user: UserRef) -> None:
        change = await self.presence.leave(room, user)
        if change.changed and change.online_count <= self.settings.presence_max:
            if not await publish(self.redis, room_topic(room), PresenceEvent(
                    room=room, action="left", user=user, online_count=change.online_count)):
                # gone from the presence set, so no sweep would ever say it: the next ticks do
                self._left_unsent[(room, user.id)] = (user, LEFT_RETRIES)

    async def _resend_left(self) -> None:
        """`left` events whose publish failed, again, while the user stays away from the room."""
        for key, (user, tries) in list(self._left_unsent.items()):
            room = key[0]
            if key in self._pairs:  # back on this process: their `joined` said so
                del self._left_unsent[key]
                continue
            count, online = await self.presence.online(room, self.settings.presence_max)
            if any(u.id == user.id for u in online):  # back elsewhere
                del self._left_unsent[key]
                continue
            sent = count <= self.settings.presence_max and await publish(
                self.redis, room_topic(room), PresenceEvent(room=room, action="left", user=user, online_count=count))
            if sent or tries <= 1:
                del self._left_unsent[key]
            else:
                self._left_unsent[key] = (user, tries - 1)

    async def _refresh_presence(self, tries: int = REFRESH_TRIES) -> None:
        """After the subscription came back: presence and typing are not stored, so what it missed (a `left`, a
        `joined`) is never replayed; every ready socket gets a new `welcome` with the room's presence as it is
        now. It continues the stream (`last_seq`: the last event queued before it), as after a `resume` — also on
        a socket whose gap is being filled (the one most likely to have missed something; its fill goes on after
        the welcome), not on one whose own welcome is being made. A room whose presence cannot be read is tried
        again, up to `tries` rounds REFRESH_RETRY_S apart (a Redis just back may fail a first read)."""
        rooms = list(self.rooms)
        for attempt in range(tries):
            failed = []
            for room in rooms:
                ready = [c for c in self.rooms.get(room, ()) if c.ready and c.closing is None and not c.welcoming]
                if not ready:
                    continue
                try:
                    count, online = await self.presence.online(room, self.settings.presence_max)
                except Exception:  # noqa: BLE001 - tried again below
                    failed.append(room)
                    continue
                for conn in ready:
                    if conn.ready and conn.closing is None and not conn.welcoming:
                        conn.push_event(Welcome(room=room, last_seq=conn.last_seq, online=online,
                                                online_count=count))
            if not failed:
                return
            rooms = failed
            if attempt + 1 < tries:
                await asyncio.sleep(REFRESH_RETRY_S)
        raise RuntimeError(f"the presence of {len(rooms)} rooms could not be read in {tries} tries")

    async def welcome(self, conn: Conn, after: int | None) -> None:
        """Start (or restart) the stream: welcome first, then every event after `after`, then live ones."""
        conn.stop_fill()  # a replay under way must not end (and stop holding live events back) while this reads
        conn.filling = True  # live events arriving while this reads where the room is wait, then come in order
        conn.welcoming = True
        try:
            async with self.pool.acquire() as db:
                last = (await rooms_repo.last_seqs(db, [conn.room])).get(conn.room, 0)
            count, online = await self.presence.online(conn.room, self.settings.presence_max)
        except BaseException:
            if conn.ready:  # a failed `resume`: the stream goes on where it was, the waiting events included
                conn.start_fill()
            raise
        finally:
            conn.welcoming = False
        start = last if after is None else min(after, last)
        conn.restart(start)
        conn.push_event(Welcome(room=conn.room, last_seq=last, online=online, online_count=count))
        conn.ready = True
        if start < last or conn.pending:
            conn.start_fill()
        else:
            conn.filling = False

    async def events_after(self, room: str, after: int, limit: int) -> list[tuple[int, str]]:
        async with self.pool.acquire() as db:
            return await rooms_repo.events_after(db, room, after, limit)

    def kick_local(self, room: str, user_id: int, reason: str = "kicked") -> None:
        for conn in list(self.rooms.get(room, ())):
            if conn.user.id == user_id:
                conn.close_soon(4403, reason[:100])

    # --- fan-out --------------------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Redis went away: retry; the position check fills any gap
                self._complain("read", "redis subscription failed; retrying")
                self._sub_broken = True
                await asyncio.sleep(0.5)
                continue
            self._failing.pop("read", None)
            if msg is None:
                continue
            self._pong_at = asyncio.get_running_loop().time()  # any message: the connection works
            if self._sub_broken:  # a message (re-subscribing answers too): the subscription works again
                self._sub_broken = False
                self._recheck_soon()
                self._refresh_soon()
            kind = msg["type"]
            if kind == "message":
                try:
                    self._dispatch(msg["channel"], msg["data"])
                except Exception:  # noqa: BLE001
                    logger.exception("could not dispatch an event")
            elif kind == "subscribe":
                room = msg["channel"][len(self._prefix):].decode() if msg["channel"].startswith(self._prefix) else None
                if room is not None:
                    self._subscribed.add(room)
                    waiter = self._sub_waiters.pop(room, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                    elif waiter is None and room not in self.rooms:
                        # nobody here wants it (confirmed late, or subscribed again by redis-py's reconnect after
                        # an unsubscribe that never got its reply): the idle sweep drops it, or it stayed for good
                        self._idle_since.setdefault(room, time.monotonic())
                elif msg["channel"].startswith(self._user_prefix):
                    uid = int(msg["channel"][len(self._user_prefix):])
                    if uid not in self._users:  # likewise: the sweep unsubscribes what is on this list
                        self._user_subs.add(uid)
            elif kind == "unsubscribe":
                if msg["channel"].startswith(self._prefix):
                    self._subscribed.discard(msg["channel"][len(self._prefix):].decode())

    async def _watch(self) -> None:
        """Ping the subscription; when the pongs (and every other message) stop for SUB_DEAD_S, drop its connection
        so the reader reconnects and subscribes again (it then re-checks the sockets, as after any outage)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SUB_PING_S)
            if loop.time() - self._pong_at > SUB_DEAD_S:
                await asyncio.sleep(0.1)  # a loop that was stalled: the reader takes what arrived meanwhile first
            if loop.time() - self._pong_at > SUB_DEAD_S:
                self._complain("ping", "redis subscription stopped answering; reconnecting")
                self._sub_broken = True
                self._pong_at = loop.time()  # the new connection gets its time
                conn = self._pubsub.connection
                if conn is not None:
                    try:
                        await conn.disconnect()  # the reader's pending read fails, and it reconnects
                    except Exception:  # noqa: BLE001
                        pass
                continue
            try:
                await asyncio.wait_for(self._pubsub.ping(), SUB_PING_S)
            except Exception:  # noqa: BLE001 - the reader sees a broken connection; a silent one, the next round
                pass

    def _refresh_soon(self) -> None:
        task = asyncio.create_task(self._refresh_presence(), name="hub-presence-refresh")
        self._background.add(task)
        task.add_done_callback(self._refreshed)

    def _refreshed(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("could not refresh presence after the subscription came back", exc_info=task.exception())

    def _recheck_soon(self, *, paced: bool = False) -> None:
        """Kicks, removals, revocations and room deletions published while the subscription was down never
        reach this process: check every local socket against the database again, a kick since it opened
        included (one pass at a time; a break during a pass asks for another). `paced`: the periodic check, at
        most RECHECK_PER_S sockets a second (a break's check hurries a paced pass along)."""
        if not paced:
            self._recheck_hurry = True
        self._recheck_due = True
        if self._recheck_task is None or self._recheck_task.done():
            self._recheck_task = asyncio.create_task(self._recheck(), name="hub-recheck")

    async def _recheck(self) -> None:
        while self._recheck_due:
            self._recheck_due = False
            hurry, self._recheck_hurry = self._recheck_hurry, False  # (one asked for meanwhile hurries this one too)
            self._rechecked_at = time.monotonic()
            conns = [c for room in list(self.rooms.values()) for c in list(room)]
            closed = 0
            try:
                for i in range(0, len(conns), RECHECK_CHUNK):
                    began = time.monotonic()
                    chunk = [c for c in conns[i: i + RECHECK_CHUNK]  # (still attached: gone since the pass began)
                             if c.closing is None and c.auth is not None and c in self.rooms.get(c.room, ())]
                    if chunk:
                        async with self.pool.acquire() as db:
                            for conn in chunk:
                                refused = await still_allowed(db, conn.room, conn.auth, conn.opened_at)
                                if refused is not None:
                                    conn.close_soon(*refused)
                                    closed += 1
                    if not (hurry or self._recheck_hurry):
                        await asyncio.sleep(max(0.0, len(chunk) / RECHECK_PER_S - (time.monotonic() - began)))
            except Exception:  # noqa: BLE001 - the database is away too: try again shortly
                logger.warning("could not check the sockets' access again", exc_info=True)
                self._recheck_due = True
                self._recheck_hurry |= hurry  # (a break's check stays at full speed)
                await asyncio.sleep(1.0)
            if closed:  # (while the subscription was down, or their close event was lost)
                logger.info("closed %d sockets whose access had ended", closed)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        if not channel.startswith(self._prefix):
            if channel.startswith(self._user_prefix):  # personal events (job progress): every socket of the user
                conns = self._users.get(int(channel[len(self._user_prefix):]), ())
                if data.startswith(b'{"type":"internal.'):
                    env = _envelope.decode(data)
                    if env.type == "internal.revoke" and env.token_id:
                        for conn in list(conns):
                            if conn.auth is not None and conn.auth.token_id == env.token_id:
                                conn.close_soon(CLOSE_UNAUTHENTICATED, "token revoked")
                    elif env.type == "internal.signout" and env.gen:
                        for conn in list(conns):
                            if conn.auth is not None and conn.auth.token_id is None and \
                                    conn.auth.token_gen < env.gen:
                                conn.close_soon(CLOSE_UNAUTHENTICATED, "token ended")
                    elif env.type == "internal.leave":
                        for conn in list(conns):
                            if (conn.room == f"pod:{env.pod_id}" if env.pod_id is not None
                                    else conn.access.course_id == env.course_id
                                    # a bot stays in course and live rooms (it joins those by role), not in pods
                                    and (conn.access.kind == "pod" or conn.auth is None or conn.auth.role != "bot")):
                                conn.close_soon(CLOSE_FORBIDDEN, "access revoked")
                    return
                msg = text_frame(data.decode())
                for conn in conns:
                    conn.ephemeral(msg)
            return
        room = channel[len(self._prefix):].decode()
        conns = self.rooms.get(room)
        if not conns:
            return
        env = _envelope.decode(data)
        if env.type in INTERNAL:
            if env.type == "internal.kick" and env.user_id is not None:
                self.kick_local(room, env.user_id, env.reason)
            elif env.type == "internal.close":
                for conn in list(conns):
                    conn.close_soon(CLOSE_FORBIDDEN, "room deleted")
            return
        msg = text_frame(data.decode())  # once per process; every connection shares this message
        if env.seq:
            seq = env.seq
            for conn in conns:
                conn.offer(seq, msg)
        else:
            # typing is not echoed; the learner hears of their own achievement on their personal topic
            skip = env.user.id if env.type in _NOT_TO_SELF and env.user is not None else None
            for conn in conns:
                if conn.user.id != skip:
                    conn.ephemeral(msg)

    # --- periodic duties ------------------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self._cut_stalled()
            if time.monotonic() - self._rechecked_at >= RECHECK_EVERY_TTLS * self.settings.presence_ttl_s:
                self._recheck_soon(paced=True)
            for duty in (self._sweep_presence, self._reap_dead_procs, self._settle_orphans,
                         self._unsubscribe_idle, self._unpublished_polls, self._close_attendance, self._close_unlisted,
                         self._due_boards, self._repair_boards, self._resend_left):
                try:
                    # bounded: a busy pool or a slow Redis delays this duty, not the next tick's (asyncio.timeout,
                    # not wait_for: on Python 3.11 wait_for drops a cancel arriving as the duty ends, and this loop
                    # outlived the hub's stop)
                    async with asyncio.timeout(self.tick_s * 2):
                        await duty()
                    self._failing.pop(duty.__name__, None)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 (TimeoutError included)
                    self._complain(duty.__name__, "hub duty %s failed", duty.__name__)

    async def _repair_gaps(self) -> None:
        """The gap repair (`_catch_up`), on a loop of its own: it needs only Postgres, and while Redis hangs it is
        the only way events committed elsewhere reach this process's sockets; behind the tick's duties (each may
        take two ticks against a hanging Redis) it ran every half minute or more."""
        await self._every_tick("_catch_up", "hub duty _catch_up failed")

    async def _every_tick(self, duty: str, failed: str) -> None:
        """Run the method named `duty` every tick, each run bounded to two ticks; failures are complained of."""
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                async with asyncio.timeout(self.tick_s * 2):  # (not wait_for: see _tick)
                    await getattr(self, duty)()
                self._failing.pop(duty, None)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 (TimeoutError included)
                self._complain(duty, failed)

    def _complain(self, key: str, msg: str, *args: object) -> None:
        """A failure that repeats every tick while Redis or Postgres is down: logged with its traceback the first
        time, then one line a minute while it lasts (a traceback every half second filled the disk)."""
        now, first = time.monotonic(), key not in self._failing
        if first or now - self._failing[key] >= COMPLAIN_EVERY_S:
            logger.warning(msg + ("" if first else " (still failing)"), *args, exc_info=first)
            self._failing[key] = now

    def _cut_stalled(self) -> None:
        """Close sockets whose client stopped reading (a send stuck past STUDYHALL_WS_STALL_S) with 4008: in a
        quiet room the queue never fills, so the slow-consumer limit would not catch them."""
        now, limit = time.monotonic(), self.settings.ws_stall_s
        for conns in list(self.rooms.values()):
            for conn in list(conns):
                if conn.stalled(now, limit):
                    logger.info("closing a stalled reader", extra={"fields": {"room": conn.room,
                                                                              "user_id": conn.user.id}})
                    conn.close_soon(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect with ?after=<last seq>")

    async def _beat(self) -> None:
        """The process's heartbeat on its own schedule: slow duties (a busy pool, many rooms) must never make
        other processes take this live one for dead and close its attendance."""
        await self._every_tick("_heartbeat", "hub heartbeat failed")

    async def _long_expired(self) -> list[str]:
        """Other processes whose lease has lapsed and stayed lapsed for a whole lease since this process first
        saw it. A lapse alone is not death: after a Redis stall or outage every lease has lapsed, live
        processes' too, until each renews its own; reaping them then closed their live-session attendance and
        settled their tutor answers while their sockets were open."""
        now = time.monotonic()
        expired = set(await self.presence.expired_procs())
        for proc in list(self._expired_seen):
            if proc not in expired:  # renewed, or reaped elsewhere
                del self._expired_seen[proc]
        for proc in expired:
            self._expired_seen.setdefault(proc, now)
        return self._lapsed_long()

    def _lapsed_long(self) -> list[str]:
        now = time.monotonic()
        return [p for p, since in self._expired_seen.items() if now - since >= self.settings.presence_ttl_s]

    async def _heartbeat(self) -> None:
        if self._stopping:  # a beat after the stop's leaves would list the process and its users again
            return
        pairs = [(room, user) for (room, _), (_, user) in self._pairs.items()]
        back = await self.presence.heartbeat(pairs, lambda room, user: (room, user.id) in self._pairs)
        if self.presence.relisted:
            # a reaper's close of this process's rows can land a while after it took it off the list: look again
            # on every beat for a few leases
            self.presence.relisted = False
            self._reopen_until = time.monotonic() + UNLISTED_TTLS * self.settings.presence_ttl_s
        for room, user in back:  # (first: the "back" pairs are reported once, whatever fails after)
            if (room, user.id) not in self._pairs:
                continue  # left meanwhile: their leave is announced, no "joined" after it
            count, _ = await self.presence.online(room, 0)
            if count <= self.settings.presence_max:
                await publish(self.redis, room_topic(room), PresenceEvent(
                    room=room, action="joined", user=user, online_count=count))
        if time.monotonic() < self._reopen_until:
            await self._reopen_attendance()

    async def _reopen_attendance(self) -> None:
        """This process was off the list (taken for dead while it could not reach Redis, its sockets open all along;
        or Redis lost the list): the attendance a reaper closed is reopened for the sockets still open, so the
        report counts them as there the whole time. A socket that closed while this ran has its row closed again
        (its own close found it closed already)."""
        ids = [c.attendance_id for conns in self.rooms.values() for c in conns if c.attendance_id is not None]
        if not ids:
            return
        async with self.pool.acquire() as db:
            reopened = await live_repo.attendance_reopen(db, self.proc, ids, self.settings.presence_ttl_s)
            held = {c.attendance_id for conns in self.rooms.values() for c in conns}
            for attendance_id in reopened:
                if attendance_id not in held:
                    await live_repo.attendance_leave(db, attendance_id)
        if reopened:
            logger.warning("this server process had been taken for dead: reopened the attendance of its open "
                           "sockets", extra={"fields": {"proc": self.proc, "reopened": len(reopened)}})

    async def _close_unlisted(self) -> None:
        """Open attendance rows of processes that are not on the list at all (Redis lost it, and they died before
        listing themselves again: no lease lapses, so the reaper never sees them): closed once a process has been
        off the list for UNLISTED_TTLS leases (a live one lists itself again within one), at the moment it was
        first seen off it. Every lease; each process looks, the update is idempotent."""
        ttl = self.settings.presence_ttl_s
        now = time.monotonic()
        if now - self._unlisted_checked < ttl:
            return
        self._unlisted_checked = now
        async with self.pool.acquire() as db:
            procs = await live_repo.attendance_procs(db, self.proc)
        alive = await self.presence.alive(procs)
        unlisted = {p for p, a in alive.items() if a is None}
        self._unlisted_seen = {p: self._unlisted_seen.get(p, now) for p in unlisted}
        for proc, since in list(self._unlisted_seen.items()):
            if now - since >= UNLISTED_TTLS * ttl:
                async with self.pool.acquire() as db:
                    closed = await live_repo.attendance_close_proc(db, proc, ago_s=now - since)
                del self._unlisted_seen[proc]
                logger.info("server process gone (not listed)", extra={"fields": {"proc": proc,
                                                                                  "attendance_closed": closed}})

    def close_attendance_later(self, attendance_id: int, left_at: datetime) -> None:
        """A socket's attendance row could not be closed when it left: the next ticks try again (the process
        lives, so no reaper would ever close it)."""
        self._unclosed[attendance_id] = left_at

    async def _due_boards(self) -> None:
        """`leaderboard.changed` that a dead process held back for the end of a board's window: every process
        looks, whoever takes a board off the due list tells its room. Boards held back because Redis lost them (see
        `leaderboards.HELD_SCORE`) start a rebuild: no read may come to start one."""
        await leaderboards.take_due(self.redis)
        state = getattr(self, "app_state", None)
        if state is not None and await leaderboards.held(self.redis):
            leaderboard_rebuild.rebuild_soon(state)

    async def _repair_boards(self) -> None:
        """Boards that missed this process's awards while Redis failed: checked against the ledger once it answers
        (`xp.repair_missed_soon`, in the background)."""
        xp.repair_missed_soon(self.pool, self.redis)

    async def _close_attendance(self) -> None:
        if not self._unclosed:
            return
        async with self.pool.acquire() as db:
            for attendance_id, left_at in list(self._unclosed.items()):
                await live_repo.attendance_leave(db, attendance_id, left_at)
                del self._unclosed[attendance_id]

    async def _sweep_presence(self) -> None:
        for room in list(self.rooms):
            left, count = await self.presence.sweep(room)
            for k, user in enumerate(left):
                now_online = count + len(left) - k - 1  # (each `left` with the count after it, not the last one)
                if now_online <= self.settings.presence_max:
                    if not await publish(self.redis, room_topic(room), PresenceEvent(
                            room=room, action="left", user=user, online_count=now_online)):
                        self._left_unsent[(room, user.id)] = (user, LEFT_RETRIES)  # swept: no sweep says it again

    async def _reap_dead_procs(self) -> None:
        due = await self._long_expired()
        if not due:
            return
        dead = await self.presence.dead_procs(due)
        # the last sign of life, as a time ago: the expiries are on Redis's clock, attendance on the database's
        # (a Redis host minutes behind cut that much off every closed row, and a reopen no longer matched it)
        redis_now = await self.presence.now_s() if dead else 0.0
        for i, (proc, expired_at) in enumerate(dead):
            ago_s = max(0.0, redis_now - (expired_at - self.settings.presence_ttl_s))
            try:
                async with self.pool.acquire() as db:
                    closed = await live_repo.attendance_close_proc(db, proc, ago_s=ago_s)
                answers = await tutoring.recover(self.pool, self.redis, [proc])
            except BaseException:  # failed, or cut off by the duty's time limit
                # this claim and the ones not reached yet are given back (still expired), so the next tick,
                # here or elsewhere, finishes the job
                for left in dead[i:]:
                    await asyncio.shield(self.presence.return_dead(*left))
                raise
            logger.info("server process gone", extra={"fields": {"proc": proc, "attendance_closed": closed,
                                                                 "tutor_answers_settled": answers}})
        state = getattr(self, "app_state", None)
        if dead and state is not None:  # its awards' board updates may have died with it (killed between the two)
            leaderboard_rebuild.check_soon(state)

    async def _settle_orphans(self) -> None:
        """Tutor answers held by processes that are gone but were not reaped here: expired ones the reaping duty
        has not claimed, and unlisted ones (stopped without settling, or Redis lost the list), whose holds are
        taken over one by one once older than `tutoring.orphan_after_s`. And this process's own holds older than
        any answer of its can still be working on them (`tutoring.own_stale_after_s`): a reply it could not post
        (Postgres away past its retries), a hold it could not drop; survivors leave a live process's holds alone,
        so without this they waited for its stop."""
        async with self.pool.acquire() as db:
            held = list(await tutor_repo.holders(db, self.proc))
        if held and held[0]["proc"] == self.proc:
            stale_s = tutoring.own_stale_after_s(self.settings)
            if held.pop(0)["age_s"] > stale_s:
                await tutoring.recover(self.pool, self.redis, [self.proc], older_than_s=stale_s)
        if not held:
            return
        alive = await self.presence.alive([r["proc"] for r in held])
        lapsed = set(self._lapsed_long())  # as the reaping duty saw them just before
        expired = [r["proc"] for r in held if alive[r["proc"]] is False and r["proc"] in lapsed]
        orphan_s = tutoring.orphan_after_s(self.settings)
        unlisted = [r["proc"] for r in held if alive[r["proc"]] is None and r["age_s"] > orphan_s]
        if expired:
            await tutoring.recover(self.pool, self.redis, expired)
        if unlisted:
            await tutoring.recover(self.pool, self.redis, unlisted, older_than_s=orphan_s)

    async def _catch_up(self) -> None:
        """Connections still behind a seq that was committed a whole tick ago re-read Postgres."""
        if not self.rooms:
            self._seen_seq.clear()
            return
        async with self.pool.acquire() as db:
            now = await rooms_repo.last_seqs(db, list(self.rooms))
        for room, conns in self.rooms.items():
            target = self._seen_seq.get(room, 0)
            for conn in conns:
                if conn.ready and not conn.filling and conn.closing is None and conn.last_seq < target:
                    logger.info("catching up a connection", extra={"fields": {"room": room, "seq": target}})
                    conn.start_fill()
        self._seen_seq = now

    async def _unsubscribe_idle(self) -> None:
        now = time.monotonic()
        for room, since in list(self._idle_since.items()):
            # (an earlier room's unsubscribe waited for Redis: a join meanwhile took this one off the list)
            if now - since >= UNSUBSCRIBE_AFTER_S and self._idle_since.get(room) == since:
                del self._idle_since[room]
                if room not in self.rooms and room in self._subscribed and room not in self._sub_waiters:
                    # forget it first: a join arriving before Redis confirms subscribes again (after this, in order)
                    self._subscribed.discard(room)
                    try:
                        await self._pubsub.unsubscribe(events_channel(room_topic(room)))
                    except BaseException:  # (a cancel too: the sweep's time ran out)
                        # Redis went away: redis-py re-subscribes the channel when it reconnects, so it stays on
                        # the list to be dropped by a later sweep (else its events came for good, to no one)
                        self._idle_since.setdefault(room, since)
                        raise
        for uid in [u for u in self._user_subs if u not in self._users]:
            if uid in self._users:  # came back while an earlier unsubscribe was on its way
                continue
            self._user_subs.discard(uid)
            try:
                await self._pubsub.unsubscribe(events_channel(user_topic(uid)))
            except BaseException:
                if uid not in self._users:  # as for a room: a later sweep tries again
                    self._user_subs.add(uid)
                raise

    # --- live polls -----------------------------------------------------------------------------------

    def poll_voted(self, poll_id: int) -> None:
        """Coalesce results: at most one `poll.results` per poll every 250 ms from this process."""
        self._poll_dirty.add(poll_id)
        if poll_id not in self._poll_flush:
            self._poll_flush[poll_id] = asyncio.create_task(self._flush_poll(poll_id))

    async def _flush_poll(self, poll_id: int) -> None:
        """Publish the poll's results every 250 ms while votes keep coming (the task stays registered until
        the results count every vote it was told of, so a stop can publish what a cancelled flush left)."""
        try:
            while poll_id in self._poll_dirty:
                await asyncio.sleep(POLL_RESULTS_EVERY_S)
                self._poll_dirty.discard(poll_id)
                await self._publish_poll(poll_id)
        finally:
            if self._poll_flush.get(poll_id) is asyncio.current_task():
                del self._poll_flush[poll_id]

    async def _unpublished_polls(self) -> None:
        """Votes whose results a dead process never published (it coalesces them for 250 ms): every process
        looks, one publishes (the check repeats under the room's lock)."""
        async with self.pool.acquire() as db:
            stale = await live_repo.stale_polls(db)
        for poll_id in stale:
            if poll_id not in self._poll_flush:  # this process publishes its own
                await live_repo.publish_results(self.pool, self.redis, poll_id)

    async def _publish_poll(self, poll_id: int) -> None:
        """Publish once the poll's window over all processes is ours (another process publishing in it may count
        this one's votes already: then nothing goes out); without Redis, at once."""
        window_ms = int(POLL_RESULTS_EVERY_S * 1000)
        key = poll_results_window(poll_id)
        try:
            while not await self.redis.set(key, self.proc, nx=True, px=window_ms):
                await asyncio.sleep(min(window_ms, max(5, await self.redis.pttl(key))) / 1000)
        except (RedisError, OSError):  # (Redis away: publish all the same)
            pass
        try:
            await live_repo.publish_results(self.pool, self.redis, poll_id)
        except Exception:  # noqa: BLE001
            logger.warning("could not publish poll results", exc_info=True)
