"""The HTTP transport's guards on a real uvicorn server over real sockets: a request head has a size limit and a
deadline (uvicorn has neither: a 100 MB header stalled the event loop for 12 s; a slowloris client held its
connections for ever)."""
from __future__ import annotations

import asyncio
import time

import pytest
import uvicorn

from server import http_transport
from tests.conftest import free_port


async def _app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            pass
        return
    body = b"ok"
    if scope["method"] == "POST":
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        body = str(len(body)).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _serve(app, **config) -> tuple[uvicorn.Server, asyncio.Task, int]:  # type: ignore[no-untyped-def]
    """A uvicorn server on our transport, started: (server, its task, port)."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=http_transport.HttpProtocol,
                                        log_config=None, lifespan="off", **config))
    task = asyncio.create_task(srv.serve())
    while not srv.started:
        await asyncio.sleep(0.01)
    return srv, task, port


@pytest.fixture
async def server(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(http_transport, "HEAD_TIMEOUT_S", 1.0)
    srv, task, port = await _serve(_app, timeout_keep_alive=30)
    yield port
    srv.should_exit = True
    await task


async def _exchange(port: int, *parts: bytes, pause: float = 0.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for p in parts:
            writer.write(p)
            await writer.drain()
            await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.read(), 10)
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        writer.close()


async def test_a_request_head_over_the_limit_is_431_and_a_normal_one_is_served(server):
    huge = [b"GET / HTTP/1.1\r\nHost: x\r\nX-A: "] + [b"a" * 16384] * 5 + [b"a"]  # the byte past the limit
    got = await _exchange(server, *huge, pause=0.05)
    assert got.startswith(b"HTTP/1.1 431"), got[:80]
    ok = await _exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"ok")
    # a body arriving with its head (well past the head limit) is no head over the limit
    body = b"x" * (3 * http_transport.MAX_HEAD_BYTES)
    post = (b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body)
    got = await _exchange(server, post)
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(str(len(body)).encode())


async def _early(scope, receive, send):  # type: ignore[no-untyped-def]
    """An app answering 413 before reading the body (as a refused upload)."""
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"3")]})
    await send({"type": "http.response.body", "body": b"big"})


async def test_the_rest_of_a_body_answered_early_is_not_the_next_head(server):
    """A response sent before its request's body ended (a 413 refusing an upload early): the rest of the body was
    counted as the next request's head, and the next request on the connection got 431."""
    srv, task, port = await _serve(_early, timeout_keep_alive=30)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b"x" * (3 * http_transport.MAX_HEAD_BYTES)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"big")).startswith(b"HTTP/1.1 413")
        for i in range(0, len(body), 8192):  # the client goes on sending its body, then asks again
            writer.write(body[i:i + 8192])
            await writer.drain()
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await writer.drain()
        again = await asyncio.wait_for(reader.read(), 10)
        assert again.startswith(b"HTTP/1.1 413"), again[:80]  # answered (by this app: 413), not 431
        writer.close()
    finally:
        srv.should_exit = True
        await task


async def test_the_head_guards_hold_after_a_request_answered_early_or_a_head_begun_with_the_last(server):
    """The rest-of-the-body fix (above) first held the head's deadline and size limit back until a message ended:
    the start of a next head sent with a request, or one body byte after an early answer, then left a connection
    with no deadline and no size limit at all (slowloris, a 4 MB header)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n")  # a request and a head begun
    await writer.drain()
    t0 = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 10) and time.monotonic() - t0 < 5  # cut at the 1 s deadline
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nX-A: ")
    try:
        for _ in range(64):  # a megabyte of one header: refused past the 64 KB limit
            writer.write(b"a" * 16384)
            await writer.drain()
    except (ConnectionResetError, BrokenPipeError):
        pass
    try:
        got = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:  # (closed with our bytes still coming: the 431 may be lost in the reset)
        got = b"431 (reset)"
    assert b"431" in got, got[:80]
    writer.close()

    srv, task, port = await _serve(_early, timeout_keep_alive=30)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        await writer.drain()
        assert (await reader.readuntil(b"big")).startswith(b"HTTP/1.1 413")
        writer.write(b"x")  # then a byte of body now and then: the connection is cut at the head's deadline
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        srv.should_exit = True
        await task


async def test_a_head_not_complete_in_time_closes_the_connection(server):
    t0 = time.monotonic()
    got = await _exchange(server, b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: 1\r\n", pause=0.4)  # dribbling
    assert got == b"" and time.monotonic() - t0 < 3
    reader, writer = await asyncio.open_connection("127.0.0.1", server)  # connected, nothing sent
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    # a keep-alive connection gets the same deadline for its next head; a slow response is not cut
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200")
    writer.write(b"GET / HTTP/1.1\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_client_that_stops_reading_is_cut_and_its_response_let_go(monkeypatch):
    """A client that asks for a large response and reads none of it held the response in memory (and the
    app's task, waiting for the drain) for as long as it kept the connection open. After WRITE_STALL_S of no
    reading the connection is cut and the app's send returns."""
    import socket

    monkeypatch.setattr(http_transport, "WRITE_STALL_S", 1.0, raising=False)
    finished = asyncio.Event()
    big = b"x" * (8 * 2**20)

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(big)).encode())]})
        try:
            await send({"type": "http.response.body", "body": big})
        finally:
            finished.set()

    srv, task, port = await _serve(app)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
    try:
        await asyncio.wait_for(finished.wait(), 10)
        deadline = time.monotonic() + 5
        while srv.server_state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not srv.server_state.connections  # the server let go of it, though the client still holds it
    finally:
        sock.close()
        srv.should_exit = True
        await task


async def test_a_slow_but_steady_reader_gets_the_whole_response(monkeypatch):
    """The stall cut is for a client that takes nothing: one reading slowly (here at most 128 KB each 50 ms, the
    response 16 MB, more than the kernel's buffers take: behind for longer than WRITE_STALL_S and the keep-alive
    timeout) gets every byte."""
    import socket

    monkeypatch.setattr(http_transport, "WRITE_STALL_S", 2.0)
    body = bytes(range(256)) * 65536  # 16 MiB

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    srv, task, port = await _serve(app, timeout_keep_alive=1)
    sock = socket.socket()
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 131072), 10)
            if not chunk:
                break
            got += chunk
            await asyncio.sleep(0.05)
            if got.endswith(body[-64:]) and len(got) >= len(body):
                break
        assert got.split(b"\r\n\r\n", 1)[1] == body
    finally:
        sock.close()
        srv.should_exit = True
        await task


async def test_a_head_over_the_limit_arriving_in_one_read_is_431(server):
    """The size was checked when the next read came: a head arriving whole in one read (one 100,000-byte header,
    2,000 headers of 80 KB, a 66 KB request line) was served."""
    big_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\nConnection: close\r\n\r\n"
    many = (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 30) for i in range(2000))
            + b"Connection: close\r\n\r\n")
    long_line = b"GET /" + b"p" * 66_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for head in (big_header, many, long_line):
        assert len(head) > http_transport.MAX_HEAD_BYTES
        got = await _exchange(server, head)
        assert got.startswith(b"HTTP/1.1 431"), got[:80]
    # just under the limit, in one read: served
    fits = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Fit: "
    fits += b"a" * (http_transport.MAX_HEAD_BYTES - len(fits) - 4) + b"\r\n\r\n"
    assert len(fits) == http_transport.MAX_HEAD_BYTES
    got = await _exchange(server, fits)
    assert got.startswith(b"HTTP/1.1 200"), got[:80]
