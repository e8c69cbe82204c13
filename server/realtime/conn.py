"""One websocket connection to a room: ordered, exactly-once delivery of sequenced events, and a bounded
outbound queue drained by its own writer task (a slow client never delays anyone else).

Delivery rule: `last_seq` is the highest seq handed to the writer. A live event with seq <= last_seq is a
duplicate and dropped; seq == last_seq + 1 is delivered; anything higher means a gap (or a replay in
progress): the event waits in `pending` and `_fill` reads the missing range from Postgres, then drains
`pending` in order. Replays wait for queue space; live events that find the queue full close the
connection with 4008 (the client resumes with ?after=).
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from store.events import CLOSE_SLOW_CONSUMER, Event, UserRef, encode
from store.rooms import RoomAccess

if TYPE_CHECKING:
    from server.realtime.hub import Hub

logger = logging.getLogger(__name__)

FILL_BATCH = 500


class Conn:
    __slots__ = ("hub", "access", "room", "user", "send", "queue", "queue_max", "writer", "fill_task", "closer",
                 "main_task", "last_seq", "start_seq", "filling", "pending", "ready", "closing", "typing_at",
                 "typing_active", "__weakref__")

    def __init__(self, hub: Hub, access: RoomAccess, user: UserRef, send: Any, queue_max: int) -> None:
        self.hub = hub
        self.access = access
        self.room = access.room_id
        self.user = user
        self.send = send
        self.queue_max = max(queue_max, 1)
        self.queue: asyncio.Queue[str] = asyncio.Queue(self.queue_max)
        self.writer: asyncio.Task | None = None
        self.fill_task: asyncio.Task | None = None
        self.closer: asyncio.Task | None = None
        self.main_task: asyncio.Task | None = None
        self.last_seq = 0
        self.start_seq = 0  # where this connection's stream began (?after= or the room's seq at welcome)
        self.filling = True  # until the welcome is out, live events wait in `pending`
        self.pending: dict[int, str] = {}
        self.ready = False  # ephemeral events (presence, typing) are dropped before the welcome
        self.closing: tuple[int, str] | None = None
        self.typing_at = 0.0
        self.typing_active = False

    # --- outbound -------------------------------------------------------------------------------------

    def start_writer(self) -> None:
        self.writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        send, get = self.send, self.queue.get
        try:
            while True:
                await send({"type": "websocket.send", "text": await get()})
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the peer went away; the reader sees the disconnect
            pass

    def push(self, text: str) -> None:
        """Queue a frame; a full queue closes the connection (4008)."""
        if self.closing is not None:
            return
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            logger.info("closing slow consumer", extra={"fields": {"room": self.room, "user_id": self.user.id}})
            self.close_soon(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect with ?after=<last seq>")

    def push_event(self, event: Event) -> None:
        self.push(encode(event).decode())

    def ephemeral(self, text: str) -> None:
        if self.ready:
            self.push(text)

    def offer(self, seq: int, text: str) -> None:
        """A live sequenced event (possibly duplicated or out of order across processes)."""
        if seq <= self.last_seq or self.closing is not None:
            return
        if self.filling or seq != self.last_seq + 1:
            if len(self.pending) >= self.queue_max:
                self.pending.clear()  # nothing is lost: _fill reads the range from Postgres
            self.pending[seq] = text
            if not self.filling:
                self.start_fill()
            return
        self.last_seq = seq
        self.push(text)

    def own(self, seq: int, text: str) -> None:
        """The original of a re-sent message: deliver it once, in order if it belongs to this stream."""
        if seq <= self.start_seq:
            self.push(text)  # before this connection's stream: the client has not had it here
        else:
            self.offer(seq, text)

    # --- gap fill and replay --------------------------------------------------------------------------

    def start_fill(self) -> None:
        self.filling = True
        if self.fill_task is None or self.fill_task.done():
            self.fill_task = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        put = self.queue.put
        idle = 0
        try:
            while self.closing is None:
                rows = await self.hub.events_after(self.room, self.last_seq, FILL_BATCH)
                for seq, payload in rows:
                    if seq <= self.last_seq:
                        continue
                    if seq != self.last_seq + 1:  # seqs are never skipped; if rows were removed by hand, go on
                        logger.warning("hole in room log", extra={"fields": {"room": self.room, "seq": seq}})
                    await put(payload)  # waits for the writer: a replay never overflows the queue
                    self.last_seq = seq
                while (text := self.pending.pop(self.last_seq + 1, None)) is not None:
                    await put(text)
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
        except Exception:
            logger.exception("replay failed", extra={"fields": {"room": self.room, "user_id": self.user.id}})
            self.close_soon(1011, "replay failed; reconnect with ?after=")
        finally:
            self.filling = False

    def restart(self, after: int) -> None:
        """`resume`: drop what is queued and stream again from `after` (the caller pushes the welcome first)."""
        if self.fill_task is not None and not self.fill_task.done():
            self.fill_task.cancel()
        while not self.queue.empty():
            self.queue.get_nowait()
        self.last_seq = self.start_seq = after
        for seq in [s for s in self.pending if s <= after]:
            del self.pending[seq]
        self.filling = True

    # --- closing --------------------------------------------------------------------------------------

    def close_soon(self, code: int, reason: str) -> None:
        """Close with `code` from any context (fan-out, kick); queued frames are dropped."""
        if self.closing is not None:
            return
        self.closing = (code, reason)
        current = asyncio.current_task()
        for task in (self.writer, self.fill_task):
            if task is not None and task is not current and not task.done():
                task.cancel()
        self.closer = asyncio.create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        try:
            # Waits until the peer has read what is already in flight; a peer that never reads is cut off.
            await asyncio.wait_for(self.send({"type": "websocket.close", "code": code, "reason": reason}), 10)
        except Exception:  # noqa: BLE001
            if self.main_task is not None and not self.main_task.done():
                self.main_task.cancel()

    def stop(self) -> None:
        for task in (self.writer, self.fill_task):
            if task is not None and not task.done():
                task.cancel()
