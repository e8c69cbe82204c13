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
"""
from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0


class HttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_bytes = 0
        self.head_timer: asyncio.TimerHandle | None = None  # set while a request head is awaited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._head_done()
        self.head_bytes = 0
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
        if self.head_timer is not None:  # a head is being read: bytes fed so far have not completed it
            if self.head_bytes > MAX_HEAD_BYTES:
                self._head_done()
                self._refuse_head()
                return
            self.head_bytes += len(data)
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head_done()
        super().on_headers_complete()

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
        self.transport.close()
