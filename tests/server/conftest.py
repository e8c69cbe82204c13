"""Fixtures for realtime room tests: extra server processes on the session's Postgres and Redis, a course
with enrolled users, and a small websocket client over the `websockets` library."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from store import events
from tests.conftest import ROOT, Factory, User, clean_env, free_port, stop_process, wait_ready

# Tight knobs so the tests are fast: presence expires in 2 s, sends are not the bottleneck.
CLUSTER_ENV = {"STUDYHALL_PRESENCE_TTL": "2", "STUDYHALL_WS_SEND_RATE": "1000", "STUDYHALL_WS_SEND_BURST": "1000"}


def spawn(data_dir: Path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port)], cwd=ROOT,
        env=clean_env(data_dir, **env), stdout=open(data_dir / f"{name}.log", "ab"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def spawn_ready(data_dir: Path, names: list[str], env: dict[str, str]) -> list[tuple[subprocess.Popen, str]]:
    """Start several server processes at once and wait until each answers /ready."""
    started = [spawn(data_dir, n, env) for n in names]
    for proc, url in started:
        wait_ready(url, proc)
    return started


@dataclass
class Cluster:
    urls: list[str]
    procs: list[subprocess.Popen] = field(default_factory=list)


@pytest.fixture(scope="session")
def cluster(settings, data_dir: Path) -> Cluster:
    """Two more server processes sharing the session's Postgres and Redis."""
    started = spawn_ready(data_dir, ["cluster-a", "cluster-b"], CLUSTER_ENV)
    yield Cluster(urls=[u for _, u in started], procs=[p for p, _ in started])
    for proc, _ in started:
        stop_process(proc)


@pytest.fixture
def victim(settings, data_dir: Path):
    """A server process of the cluster's kind that a test may kill -9."""
    ((proc, url),) = spawn_ready(data_dir, [f"victim-{time.monotonic_ns()}"], CLUSTER_ENV)
    yield proc, url
    stop_process(proc)


@dataclass
class Course:
    id: int
    room: str
    instructor: User
    learners: list[User]


def make_course(base_url: str, make: Factory, learners: int = 2, **course: Any) -> Course:
    inst = make.user("instructor")
    with httpx.Client(base_url=base_url, timeout=30) as c:
        cid = c.post("/api/v1/courses", json={"title": "Realtime", **course}, headers=inst.h).json()["id"]
        users = [make.user("learner") for _ in range(learners)]
        for u in users:
            assert c.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": u.id}, headers=inst.h).status_code == 201
    return Course(id=cid, room=f"course:{cid}", instructor=inst, learners=users)


def live_poll(base_url: str, make: Factory, learners: int = 2) -> tuple[Course, int, dict]:
    """A course with `learners` learners, a started live session and an open two-option poll in it: (course,
    session id, poll)."""
    course = make_course(base_url, make, learners=learners)
    h = course.instructor.h
    with httpx.Client(base_url=base_url, timeout=30) as c:
        sid = c.post(f"/api/v1/courses/{course.id}/live", json={"title": "Quiz"}, headers=h).json()["id"]
        assert c.post(f"/api/v1/live/{sid}/start", headers=h).status_code == 200
        poll = c.post(f"/api/v1/live/{sid}/polls", json={"question": "?", "options": ["x", "y"]}, headers=h).json()
    return course, sid, poll


def ws_url(base_url: str, room: str, token: str | None = None, after: int | None = None) -> str:
    url = base_url.replace("http://", "ws://") + f"/ws/rooms/{room}"
    params = []
    if token is not None:
        params.append(f"token={token}")
    if after is not None:
        params.append(f"after={after}")
    return url + ("?" + "&".join(params) if params else "")


class Client:
    """A room connection that records every frame; `expect` waits for a frame of a given type."""

    def __init__(self, ws: ClientConnection, user: User | None) -> None:
        self.ws = ws
        self.user = user
        self.frames: list[dict] = []
        self._unread: list[dict] = []
        self.welcome: dict | None = None

    @classmethod
    async def connect(cls, base_url: str, room: str, user: User, after: int | None = None, *,
                      welcome: bool = True, **kw: Any) -> "Client":
        # No client-side flow control by default: with it, websockets stops reading above 16 buffered frames
        # and resumes only at 4, so a test holding 5 unread frames would never see the server's close reply.
        kw.setdefault("max_queue", None)
        ws = await websockets.connect(ws_url(base_url, room, user.token, after), open_timeout=10, **kw)
        client = cls(ws, user)
        if welcome:
            client.welcome = await client.expect("welcome")
        return client

    async def send(self, frame: dict | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 5) -> dict:
        if self._unread:
            return self._unread.pop(0)
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        events.decode(raw)  # every frame the server sends is a valid protocol event
        frame = json.loads(raw)
        self.frames.append(frame)
        return frame

    async def expect(self, type_: str, timeout: float = 5, **match: Any) -> dict:
        """The next frame of `type_` (matching `match`); frames of other types are kept for later reads."""
        deadline = time.monotonic() + timeout
        skipped: list[dict] = []
        try:
            for i, f in enumerate(self._unread):
                if f["type"] == type_ and all(f.get(k) == v for k, v in match.items()):
                    return self._unread.pop(i)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {type_} {match or ''} within {timeout}s; got {[f['type'] for f in skipped]}")
                raw = await asyncio.wait_for(self.ws.recv(), left)
                events.decode(raw)
                f = json.loads(raw)
                self.frames.append(f)
                if f["type"] == type_ and all(f.get(k) == v for k, v in match.items()):
                    return f
                skipped.append(f)
        finally:
            self._unread.extend(skipped)

    async def quiet(self, seconds: float = 0.3) -> list[dict]:
        """Frames that arrive within `seconds` (checks that nothing unexpected comes)."""
        got = list(self._unread)
        self._unread.clear()
        try:
            while True:
                raw = await asyncio.wait_for(self.ws.recv(), seconds)
                f = json.loads(raw)
                self.frames.append(f)
                got.append(f)
        except (TimeoutError, asyncio.TimeoutError):
            return got

    def seqs(self, type_: str | None = None) -> list[int]:
        return [f["seq"] for f in self.frames if "seq" in f and (type_ is None or f["type"] == type_)]

    async def closed(self, timeout: float = 5) -> tuple[int, str]:
        """Read on until the server closes the socket: its close (code, reason). Fails (times out) otherwise."""
        try:
            while True:
                await self.recv(timeout)
        except websockets.ConnectionClosed as exc:
            return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")

    async def close(self) -> None:
        await self.ws.close()


async def closed_with(url: str, timeout: float = 5, **kw: Any) -> tuple[int, str]:
    """Connect and return the close (code, reason) the server answers with."""
    kw.setdefault("open_timeout", 10)
    async with websockets.connect(url, **kw) as ws:
        try:
            while True:
                await asyncio.wait_for(ws.recv(), timeout)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else 1006, exc.rcvd.reason if exc.rcvd else ""


@pytest.fixture(scope="session")
def tight(settings, data_dir: Path) -> str:
    """A server whose per-connection outbound queue holds only 8 frames (slow consumers are cut quickly)."""
    ((proc, url),) = spawn_ready(data_dir, ["tight"], {**CLUSTER_ENV, "STUDYHALL_WS_QUEUE": "8"})
    yield url
    stop_process(proc)


@pytest.fixture
async def worker_db(settings):
    """A pool and Redis client of the test process, to act as a worker does (store functions directly)."""
    from redis.asyncio import Redis

    from store.db import create_pool

    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    redis = Redis.from_url(settings.redis_url)
    yield pool, redis
    await redis.aclose()
    await pool.close()


class RawWs:
    """A minimal websocket client over asyncio streams that reads only when asked. The `websockets` client
    keeps draining the socket in the background, so it cannot play a client that stops reading."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, url: str, rcvbuf: int = 4096) -> "RawWs":
        import base64
        import os
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((parts.hostname, parts.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
        key = base64.b64encode(os.urandom(16)).decode()
        path = parts.path + ("?" + parts.query if parts.query else "")
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def frame(self, timeout: float = 10) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame (server frames are not masked)."""
        async def read() -> tuple[int, bytes]:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            return b0 & 0x0F, await self.reader.readexactly(n)

        return await asyncio.wait_for(read(), timeout)

    def send_frame(self, opcode: int, payload: bytes = b"", times: int = 1) -> None:
        """Write `times` copies of one masked client frame (payload under 126 bytes), without waiting."""
        import os

        assert len(payload) < 126
        mask = os.urandom(4)
        frame = bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(frame * times)

    def close(self) -> None:
        self.writer.close()

    def server_end_open(self) -> bool:
        """Whether the server still holds its end of this connection (an entry in the kernel's TCP table)."""
        here, there = self.writer.get_extra_info("sockname")[1], self.writer.get_extra_info("peername")[1]
        with open("/proc/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        return any(int(r[1].split(":")[1], 16) == there and int(r[2].split(":")[1], 16) == here for r in rows)
