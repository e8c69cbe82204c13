"""The HTTP transport under the app: uvicorn's httptools protocol, with two guards it lacks.

- **A request head has a size limit.** uvicorn buffers the request line and headers without one (each piece
  appended to what came before: a 100 MB header took 12 s of the event loop, every socket of the process stalled,
  and 230 MB). Past MAX_HEAD_BYTES without the head complete, the request is answered 431 and the connection
  closed.
- **A request head has a deadline.** uvicorn times out an idle keep-alive connection only after a response, and
  any byte cancels that: a client that opened connections and sent a few header bytes now and then (slowloris)
  held them, and their file descriptors, for ever. A head not complete HEAD_TIMEOUT_S after the connection opened
  or the previous response ended closes the connection. (Bodies have no deadline: a large upload over a slow link
  is legitimate.)
- **A response has a reader.** A client that stops reading kept its response in memory for good: the app waits
  for the write buffer to drain (it never does), and closing a connection waits for the same. While the buffer
  is over its high-water mark, a client that takes nothing of it for WRITE_STALL_S is cut (reset), as a stalled
  websocket is; one that reads, however slowly, gets the whole response (closes still wait for the drain).
"""
from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0
REFUSED_LINGER_S = 2.0  # a connection answered 431 is closed this long after, the client's bytes dropped meanwhile
WRITE_STALL_S = 60.0  # nothing of a full write buffer taken for this long: the client is gone (or never reads)


def _ends_head(data: bytes) -> bool:
    """Whether a request head ends in `data` (a blank line: CRLF CRLF, or bare LFs, which the parser takes too)."""
    return b"\r\n\r\n" in data or b"\n\n" in data


class HttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_bytes = 0
        self.head_tail = b""  # the last bytes of the head so far
        self.refused = False  # answered 431
        self.head_timer: asyncio.TimerHandle | None = None  # set while a request head is awaited
        self.stall_timer: asyncio.TimerHandle | None = None  # set while the write buffer is over its high-water mark
        self.stall_left = 0  # the buffer's size when the stall timer was set
        # between a request's head and the end of its body: bytes read then are body, not a head. A response sent
        # before the body ended (a 413 refusing an upload early) arms the next head's deadline at once, but the
        # rest of the body is not counted against its size (that request was refused 431)
        self.in_body = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        self._unstalled()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stall_timer is None:
            self._watch_drain()

    def resume_writing(self) -> None:
        self._unstalled()
        super().resume_writing()

    def _watch_drain(self) -> None:
        self.stall_left = self.transport.get_write_buffer_size()
        self.stall_timer = self.loop.call_later(WRITE_STALL_S, self._write_stalled)

    def _unstalled(self) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None

    def _write_stalled(self) -> None:
        self.stall_timer = None
        if self.transport.get_protocol() is not self:  # upgraded to a websocket meanwhile: its own guards apply
            return
        if self.transport.get_write_buffer_size() < self.stall_left:  # read from meanwhile: a slow reader
            self._watch_drain()
            return
        self.transport.abort()  # connection_lost follows: the app's wait for the drain ends

    def _await_head(self) -> None:
        self._head_done()
        self.head_bytes = 0
        self.head_tail = b""
        self.head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_timeout)

    def _head_done(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timeout(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.refused:  # answered 431: dropped until the connection closes
            return
        if self.head_timer is not None and not self.in_body:  # a head is being read: bytes so far did not end it
            room = MAX_HEAD_BYTES - self.head_bytes
            # past the limit, the head must end within it (the rest is a body, or pipelined requests): it was checked
            # only when the next read came, so a head arriving in one read (100 KB of headers) was served
            if len(data) > room and not _ends_head(self.head_tail + data[:max(room, 0)]):
                self._head_done()
                self._refuse_head()
                return
            self.head_bytes += len(data)
            self.head_tail = (self.head_tail + data)[-3:]  # an end of head split between reads
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_done()
        self.in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.in_body = False
        super().on_message_complete()
        if self.head_timer is not None and not self.transport.is_closing():
            # answered before its body ended (the deadline armed then): the next head starts now, counted from 0
            self._await_head()

    def on_response_complete(self) -> None:
        idle = not self.pipeline  # a pipelined request's head is already in
        super().on_response_complete()
        if idle and not self.transport.is_closing():
            self._await_head()

    def _refuse_head(self) -> None:
        msg = b"Request header fields too large."
        self.transport.write(b"".join([
            STATUS_LINE[431], b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(msg)).encode() + b"\r\n", b"connection: close\r\n\r\n", msg]))
        self.refused = True
        if self.transport.can_write_eof():
            # the answer, then the end of the stream; what the client is still sending is read and dropped for a
            # moment: closing with it unread resets the connection, and the client lost the 431 with it
            self.transport.write_eof()
            self.loop.call_later(REFUSED_LINGER_S, self._close_refused)
        else:
            self.transport.close()

    def _close_refused(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()
