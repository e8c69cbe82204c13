"""One websocket connection to a room: ordered, exactly-once delivery of sequenced events, and a bounded
outbound queue (a slow client never delays anyone else).

Delivery rule: `last_seq` is the highest seq handed to the socket. A live event with seq <= last_seq is a
duplicate and dropped; seq == last_seq + 1 is delivered; anything higher means a gap (or a replay in
progress): the event waits in `pending` and `_fill` reads the missing range from Postgres, then drains
`pending` in order. Replays wait for queue space; live events that find the queue full close the
connection with 4008 (the client resumes with ?after=).

Sending: an ASGI send only suspends when the transport is paused (its buffer is full). So frames are sent by
driving the send coroutine directly, with no task switch per frame (that switch was most of fan-out's
cost); when a send does suspend, it is resumed from the transport's wake-up, as a Task would resume it,
and later frames wait in `out`, at most `queue_max` of them and QUEUE_MAX_CHARS of text (a count alone let a
replay of the largest messages hold ~16 MB per socket).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from server.errors import UNREACHABLE
from store.events import CLOSE_SLOW_CONSUMER, SEQUENCED, Event, UserRef, encode
from store.rooms import RoomAccess

if TYPE_CHECKING:
    from server.auth import AuthUser
    from server.realtime.hub import Hub

logger = logging.getLogger(__name__)

FILL_BATCH = 200  # events read per replay query (held while a slow reader takes them)
QUEUE_MAX_CHARS = 1_000_000  # text queued for one socket (besides `queue_max` frames)


def _kind(text: str) -> str:
    """An encoded event's type: msgspec writes the tag first (`{"type":"message.new",...`)."""
    end = text.find('"', 9)
    return text[9:end] if text.startswith('{"type":"') and end > 0 else ""


def text_frame(text: str) -> dict[str, Any]:
    """The ASGI message for a text frame. The hub builds one per event and every local connection shares it."""
    return {"type": "websocket.send", "text": text}


class _Reply(dict):
    """A room event sent as the direct answer to a frame (the original of a re-sent message, from before this
    stream began): a `resume` keeps it queued, as it keeps errors, when the new stream will not send it again."""

    def __init__(self, seq: int, text: str) -> None:
        super().__init__(type="websocket.send", text=text)
        self.seq = seq


# Replies to re-sends of messages from before a socket's stream that it remembers, so that each comes once.
OWNED_MAX = 256


class Conn:
    __slots__ = ("hub", "access", "room", "user", "send", "out", "queue_max", "inflight", "broken", "space",
                 "fill_task", "closer", "main_task", "last_seq", "start_seq", "filling", "pending", "ready",
                 "welcoming", "closing", "typing_at", "typing_active", "auth", "opened_at", "resumed_at",
                 "blocked_at", "out_chars", "counted", "attendance_id", "opened_mono", "owned", "__weakref__")

    def __init__(self, hub: Hub, access: RoomAccess, user: UserRef, send: Any, queue_max: int) -> None:
        self.hub = hub
        self.access = access
        self.room = access.room_id
        self.user = user
        self.send = send
        self.queue_max = max(queue_max, 1)
        self.out: deque[dict[str, Any]] = deque()  # outbound frames, at most queue_max
        self.out_chars = 0  # their text's length, at most QUEUE_MAX_CHARS
        self.inflight: Any = None  # the send coroutine waiting for the transport, if any
        self.broken = False  # a send failed: the peer is gone
        self.space: asyncio.Future | None = None  # a replay waiting for room in `out`
        self.fill_task: asyncio.Task | None = None
        self.closer: asyncio.Task | None = None
        self.main_task: asyncio.Task | None = None
        self.last_seq = 0
        self.start_seq = 0  # where this connection's stream began (?after= or the room's seq at welcome)
        self.filling = True  # until the welcome is out, live events wait in `pending`
        self.pending: dict[int, dict[str, Any]] = {}
        self.ready = False  # ephemeral events (presence, typing) are dropped before the welcome
        self.welcoming = False  # Hub.welcome is reading where the room is (its welcome has presence as it is)
        self.closing: tuple[int, str] | None = None
        self.typing_at = float("-inf")
        self.auth: AuthUser | None = None  # who opened the socket, with which API token (closed when revoked)
        self.opened_at = datetime.now(timezone.utc)  # a kick after this closes it (set from the database's clock)
        self.opened_mono = time.monotonic()  # this process's clock at `opened_at`
        self.attendance_id: int | None = None  # its live-session attendance row while open (see socket.py)
        self.typing_active = False
        self.resumed_at = float("-inf")  # when the client last sent `resume`
        self.blocked_at: float | None = None  # since when the send in flight waits for the client to read
        self.counted = False  # counted in the hub's presence pair for (room, user) (see Hub.attach)
        self.owned: dict[int, None] = {}  # seqs from before the stream this socket was sent as a re-send's reply

    def db_now(self) -> datetime:
        """Now on the database's clock, as this socket knows it (its `opened_at` and the time since): attendance
        times are all the database's, whichever host's clock is off."""
        return self.opened_at + timedelta(seconds=time.monotonic() - self.opened_mono)

    # --- outbound -------------------------------------------------------------------------------------

    def push(self, msg: dict[str, Any]) -> None:
        """Send a frame now, or queue it behind a send waiting for the transport; a full queue closes the
        connection (4008)."""
        if self.closing is not None or self.broken:
            return
        if len(self.out) >= self.queue_max or (self.out and self.out_chars + len(msg["text"]) > QUEUE_MAX_CHARS):
            logger.info("closing slow consumer", extra={"fields": {"room": self.room, "user_id": self.user.id}})
            self.close_soon(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect with ?after=<last seq>")
            return
        self.out.append(msg)
        self.out_chars += len(msg["text"])
        if self.inflight is None:
            self._pump()

    def _fill_cap(self) -> int:
        """How full a replay may make the queue: the last quarter stays free for live frames (a pong, typing,
        the user's own events), which would otherwise close a reader that is merely slow to replay (4008)."""
        return max(1, self.queue_max - self.queue_max // 4)

    def _full_for_replay(self) -> bool:
        return bool(self.out) and (len(self.out) >= self._fill_cap() or self.out_chars >= QUEUE_MAX_CHARS * 3 // 4)

    async def _put(self, msg: dict[str, Any]) -> None:
        """Queue a frame, waiting for room (replays: a slow reader only slows its own replay)."""
        while self._full_for_replay() and self.closing is None:
            self.space = asyncio.get_running_loop().create_future()
            await self.space
        if self.closing is None and not self.broken:
            self.out.append(msg)
            self.out_chars += len(msg["text"])
            if self.inflight is None:
                self._pump()

    def _pump(self) -> None:
        """Send queued frames until one has to wait for the transport."""
        out, send = self.out, self.send
        while out and self.inflight is None:
            if self.closing is not None or self.broken:
                out.clear()
                self.out_chars = 0
                break
            msg = out.popleft()
            self.out_chars -= len(msg["text"])
            self._drive(send(msg))
        if self.space is not None and not self._full_for_replay():
            space, self.space = self.space, None
            if not space.done():
                space.set_result(None)

    def _drive(self, coro: Any, exc: BaseException | None = None) -> None:
        """Run a send coroutine until it finishes or waits on a future (then resume it from `_wake`)."""
        try:
            waiting = coro.send(None) if exc is None else coro.throw(exc)
        except StopIteration:
            self.inflight = self.blocked_at = None
            return
        except (Exception, asyncio.CancelledError):  # the peer went away; the reader sees the disconnect
            self.inflight = self.blocked_at = None
            self.broken = True
            return
        if self.inflight is None:
            self.blocked_at = time.monotonic()
        self.inflight = coro
        if getattr(waiting, "_asyncio_future_blocking", False):
            waiting._asyncio_future_blocking = False
            waiting.add_done_callback(self._wake)
        else:  # a bare yield: go on at the next turn of the loop
            asyncio.get_running_loop().call_soon(self._wake, None)

    def _wake(self, fut: asyncio.Future | None) -> None:
        coro = self.inflight
        if coro is None:  # abandoned (closing)
            return
        exc = None
        if fut is not None:
            exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        self._drive(coro, exc)
        if self.inflight is None:
            self._pump()

    def stalled(self, now: float, limit_s: float) -> bool:
        """A send has waited more than `limit_s` for the client to read: a reader that stopped (a hung tab, a
        vanished peer) would otherwise hold its socket, its presence and its queue until TCP gives up."""
        return self.blocked_at is not None and now - self.blocked_at > limit_s and self.closing is None

    def _abandon_send(self) -> None:
        self.blocked_at = None
        coro, self.inflight = self.inflight, None
        if coro is not None:
            coro.close()  # it was waiting for the transport; nothing of it was written
        self.out.clear()
        self.out_chars = 0

    def push_event(self, event: Event) -> None:
        self.push(text_frame(encode(event).decode()))

    def ephemeral(self, msg: dict[str, Any]) -> None:
        if self.ready:
            self.push(msg)

    def offer(self, seq: int, msg: dict[str, Any]) -> None:
        """A live sequenced event (possibly duplicated or out of order across processes)."""
        if seq <= self.last_seq or self.closing is not None:
            return
        if self.filling or seq != self.last_seq + 1:
            if len(self.pending) >= self.queue_max:
                self.pending.clear()  # nothing is lost: _fill reads the range from Postgres
            self.pending[seq] = msg
            if not self.filling:
                self.start_fill()
            return
        self.last_seq = seq
        self.push(msg)

    def own(self, seq: int, text: str) -> None:
        """The original of a re-sent message: deliver it once, in order if it belongs to this stream."""
        if seq <= self.start_seq:  # before this connection's stream: the client had not had it here, until now
            if seq in self.owned:
                return
            if len(self.owned) >= OWNED_MAX:
                del self.owned[next(iter(self.owned))]
            self.owned[seq] = None
            self.push(_Reply(seq, text))
        else:
            self.offer(seq, text_frame(text))

    # --- gap fill and replay --------------------------------------------------------------------------

    def start_fill(self) -> None:
        self.filling = True
        if self.fill_task is None or self.fill_task.done():
            self.fill_task = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        put = self._put
        idle = 0
        try:
            while self.closing is None:
                rows = await self.hub.events_after(self.room, self.last_seq, FILL_BATCH)
                for seq, payload in rows:
                    if seq <= self.last_seq:
                        continue
                    if seq != self.last_seq + 1:  # seqs are never skipped; if rows were removed by hand, go on
                        logger.warning("hole in room log", extra={"fields": {"room": self.room, "seq": seq}})
                    await put(text_frame(payload))  # waits for room: a replay never overflows the queue
                    self.last_seq = seq
                while (msg := self.pending.pop(self.last_seq + 1, None)) is not None:
                    await put(msg)
                    self.last_seq += 1
                for seq in [s for s in self.pending if s <= self.last_seq]:
                    del self.pending[seq]
                if len(rows) == FILL_BATCH:
                    continue
                if not self.pending:
                    break
                if not rows:
                    # A published seq is always committed (seqs commit in order); give visibility a moment.
                    idle += 1
                    await asyncio.sleep(min(0.01 * idle, 0.5))
        except asyncio.CancelledError:
            raise
        except UNREACHABLE as exc:  # Postgres away (a failover): 1013, reconnect with backoff, not all at once
            logger.warning("replay stopped: %s: %s", type(exc).__name__, exc,
                           extra={"fields": {"room": self.room, "user_id": self.user.id}})
            self.close_soon(1013, "try again later; reconnect with ?after=")
        except Exception:
            logger.exception("replay failed", extra={"fields": {"room": self.room, "user_id": self.user.id}})
            self.close_soon(1011, "replay failed; reconnect with ?after=")
        finally:
            if self.fill_task is asyncio.current_task():  # a fill cancelled by `resume` leaves the new one be
                self.filling = False

    def stop_fill(self) -> None:
        """Cancel a replay under way (`resume` starts the stream again): ended while the new welcome waits, it
        would let live events through to the socket ahead of that welcome, and the new stream drop them."""
        if self.fill_task is not None and not self.fill_task.done():
            self.fill_task.cancel()
        self.fill_task = None  # the cancelled fill is not done yet: `start_fill` must not take it for running

    def restart(self, after: int) -> None:
        """`resume`: drop what is queued and stream again from `after` (the caller pushes the welcome first)."""
        self.stop_fill()
        # queued room events go (the new stream sends them again); errors, pongs and personal events stay. A send
        # already waiting for the transport goes first: it precedes the new welcome
        self.out = deque(m for m in self.out if (m.seq <= after if isinstance(m, _Reply)
                                                 else _kind(m["text"]) not in SEQUENCED))
        self.out_chars = sum(len(m["text"]) for m in self.out)
        self.last_seq = self.start_seq = after
        # a reply sent before the resume may be dropped by the client (sequenced events before the new welcome are to
        # be ignored): a re-send after it is answered again
        self.owned.clear()
        for seq in [s for s in self.pending if s <= after]:
            del self.pending[seq]
        self.filling = True

    # --- closing --------------------------------------------------------------------------------------

    def close_soon(self, code: int, reason: str) -> None:
        """Close with `code` from any context (fan-out, kick); queued frames are dropped."""
        if self.closing is not None:
            return
        self.closing = (code, reason)
        self._abandon_send()
        if self.fill_task is not None and self.fill_task is not asyncio.current_task() and not self.fill_task.done():
            self.fill_task.cancel()
        self.closer = asyncio.create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        try:
            # Waits until the peer has read what is already in flight; a peer that never reads is cut off.
            await asyncio.wait_for(self.send({"type": "websocket.close", "code": code, "reason": reason}), 10)
        except Exception:  # noqa: BLE001
            if self.main_task is not None and not self.main_task.done():
                self.main_task.cancel()

    def stop(self) -> None:
        if self.fill_task is not None and not self.fill_task.done():
            self.fill_task.cancel()
        if self.closing is None:
            self._abandon_send()
