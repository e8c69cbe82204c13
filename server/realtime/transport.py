"""The websocket transport under the app: uvicorn's websockets (sans-I/O) protocol, with two guards it lacks.

- **Pings are rate-limited.** uvicorn answers every ping at once, into the socket's write buffer, whether or not
  the peer reads: a client that sent pings and never read grew the server by the size of its flood (119 MB of
  pings in 10 s: RSS 138 -> 249 MB, and on). Here a peer may send PING_BURST pings at once and PING_RATE a
  second after that (a keepalive needs one every few seconds); over that it is closed with 1008 "too many
  pings", so the pongs a non-reader can make us hold stay a few kilobytes.
- **A finished connection ends.** When the app is done with a socket (it closed it, or gave up on a peer that
  stopped reading) or the keepalive ping went unanswered, asyncio's close waits for the write buffer to drain,
  which a peer that never reads never lets happen: its socket and buffer stayed open until TCP gave up (with a
  zero receive window, never). uvicorn's send waits without limit for the buffer to drain, so the app bounds
  its own close (`Conn._close` gives up after 10 s and ends the handler); an app that finishes while the peer
  still has not read what it was sent now cuts the connection at once, and any other connection not ended
  `close_timeout` + REAP_S after the app finished (or REAP_S after a keepalive timeout) is cut. Cut: aborted
  with a reset (see `cut`).
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

PING_BURST = 20
PING_RATE = 2.0  # pings a second, on average, after the burst
REAP_S = 5.0  # after the close handshake's own timeout, a connection that has not ended is aborted
CLOSE_TOO_MANY_PINGS = 1008
PONG_HEAD = b"\x8a"  # FIN + the pong opcode: the first byte of a pong frame


class WsProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ping_tokens = float(PING_BURST)
        self.ping_at = time.monotonic()
        self.reaper: asyncio.TimerHandle | None = None

    # --- pings: not too many ---------------------------------------------------------------------------

    def handle_ping(self) -> None:
        # The protocol object queued a pong for each ping it parsed in this read; the first call of a read takes
        # them all (the others find none), so the budget is charged per pong, not per call.
        output = self.conn.data_to_send()
        if self.close_sent or self.transport.is_closing():
            return  # nothing more goes out on a closing connection
        now = time.monotonic()
        self.ping_tokens = min(PING_BURST, self.ping_tokens + (now - self.ping_at) * PING_RATE)
        self.ping_at = now
        pongs = sum(1 for chunk in output if chunk[:1] == PONG_HEAD)
        if pongs > self.ping_tokens:
            self.refuse_pings()
            return
        self.ping_tokens -= pongs
        self.transport.write(b"".join(output))

    def refuse_pings(self) -> None:
        """Close with 1008: the app is told, the close frame goes out after what is already written, then our
        end of the stream (FIN), and nothing more is read. The socket is not closed at once: closing it with
        unread input sends a reset, which can destroy the close frame before the peer reads it; the peer has
        REAP_S to read it, then the connection is cut."""
        reason = "too many pings"
        self.conn.fail(CLOSE_TOO_MANY_PINGS, reason)  # from here on its parser discards what arrives
        self.queue.put_nowait({"type": "websocket.disconnect", "code": CLOSE_TOO_MANY_PINGS, "reason": reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        if self.transport.can_write_eof():  # TLS transports cannot half-close
            self.transport.write_eof()
        self.close_sent = True
        self.read_paused = False  # not the app's pause any more: nothing it does resumes reading
        self.transport.pause_reading()
        self.close_timer = self.loop.call_later(REAP_S, self.cut)

    # --- ending: a connection the app is done with does not outlive its close handshake ---------------

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.writable.is_set() and not self.disconnected:
            self.cut()  # the app gave up on a peer that has not read for a while: its close frame never went out
        else:
            self.reap_later(self.close_timeout + REAP_S)

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()  # a close frame, then a close that waits for the write buffer
        self.reap_later(REAP_S)

    def reap_later(self, delay: float) -> None:
        if not self.disconnected and self.reaper is None:
            self.reaper = self.loop.call_later(delay, self.reap)

    def reap(self) -> None:
        self.reaper = None
        if not self.disconnected:
            self.cut()

    def cut(self) -> None:
        """Abort the connection with a reset. A plain abort closes our descriptor but leaves the kernel to keep
        trying to send what is buffered (an orphaned socket, retried for minutes); with a zero linger time the
        close discards it."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reaper is not None:
            self.reaper.cancel()
            self.reaper = None
        super().connection_lost(exc)
