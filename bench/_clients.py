"""Load generator for the realtime benchmarks, run in its own process: many light websocket clients
(a minimal client on asyncio Protocols and uvloop, so the clients cost little next to the server).

Modes:
  fanout: N receivers + one sender at a fixed rate; prints deliveries/s and send→receive latency.
  idle:   N connections that only hold on; prints a mark when all are open and waits for stdin to close.
Progress marks go to stdout one per line (CONNECTED, SENDING, SENT, IDLE); the result is one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from array import array
from collections import Counter
from urllib.parse import quote

import uvloop

_TEXT = b'"text":"'
# What the baseline broadcasts: the size of studyhall's message.new for the same send, so both servers put
# the same bytes on the wire.
BASELINE_FRAME = ('{"type":"message.new","id":1000001,"seq":1001,"room":"course:1001","author":{"id":1000001,'
                  '"name":"teacher","role":"instructor"},"text":"<ns>","created_at":"2026-01-01T00:00:00.000000Z",'
                  '"client_msg_id":"0011223344"}')


class Ws(asyncio.Protocol):
    """A websocket client connection: handshake, unmasked server frames in, masked (zero key) frames out."""

    __slots__ = ("path", "host", "on_text", "transport", "buf", "open", "opened", "closed", "_head")

    def __init__(self, path: str, host: str, on_text) -> None:  # type: ignore[no-untyped-def]
        self.path, self.host, self.on_text = path, host, on_text
        self.transport = None
        self.buf = bytearray()
        self.open = False
        self.opened = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(bytes(buf[:80]).decode(errors="replace")))
                return
            del buf[:end + 4]
            self.open = True
            self.opened.set_result(None)
        pos, n = 0, len(buf)
        on_text = self.on_text
        while n - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            head = 2
            if b1 == 126:
                if n - pos < 4:
                    break
                b1, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif b1 == 127:
                if n - pos < 10:
                    break
                b1, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if n - pos < head + b1:
                break
            opcode = buf[pos] & 0x0F
            if opcode == 1:
                on_text(bytes(buf[pos + head:pos + head + b1]))
            elif opcode == 8 and not self.closed.done():
                self.closed.set_result(int.from_bytes(buf[pos + head:pos + head + 2], "big"))
            elif opcode == 9:  # the server's keepalive ping (uvicorn: every 20 s, closing a socket silent 20 s more)
                self.send(0x8A, bytes(buf[pos + head:pos + head + b1]))
            pos += head + b1
        if pos:
            del buf[:pos]

    def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed before handshake"))
        if not self.closed.done():
            self.closed.set_result(1006)

    def send_text(self, text: str) -> None:
        self.send(0x81, text.encode())

    def send(self, first: int, data: bytes) -> None:
        """One frame: `first` is FIN and the opcode (0x81 text, 0x8A pong)."""
        n = len(data)
        if n < 126:
            head = bytes((first, 0x80 | n))
        elif n < 65536:
            head = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
        self.transport.write(head + b"\0\0\0\0" + data)  # a zero masking key leaves the payload as is


class Stats:
    def __init__(self) -> None:
        self.received = 0
        self.lat = array("q")
        self.last_at = 0

    def on_text(self, payload: bytes) -> None:
        # {"type":"message.new",...,"text":"<ns>",...} from both servers
        if not payload.startswith(b'{"type":"message.new"'):
            return
        i = payload.find(_TEXT) + len(_TEXT)
        sent = int(payload[i:payload.index(b'"', i)])
        now = time.monotonic_ns()
        self.received += 1
        self.last_at = now
        self.lat.append(now - sent)


async def connect_many(host: str, port: int, paths: list[str], on_text, concurrency: int = 200) -> list[Ws]:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    out: list[Ws] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(path: str) -> None:
        async with sem:
            for attempt in range(5):
                try:
                    _, proto = await loop.create_connection(lambda: Ws(path, f"{host}:{port}", on_text), host, port)
                    await asyncio.wait_for(proto.opened, 30)
                    out.append(proto)
                    return
                except (ConnectionError, OSError, asyncio.TimeoutError):
                    await asyncio.sleep(0.2 * (attempt + 1))
            raise RuntimeError(f"could not connect {path}")

    await asyncio.gather(*(one(p) for p in paths))
    return out


def _paths(args: argparse.Namespace) -> tuple[list[str], str]:
    if args.baseline:
        return ["/"] * args.n, "/"
    tokens = json.loads(open(args.tokens).read())
    room = quote(tokens["room"], safe="")
    return ([f"/ws/rooms/{room}?token={t}" for t in tokens["learners"][:args.n]],
            f"/ws/rooms/{room}?token={tokens['sender']}")


def mark(tag: str) -> None:
    print(tag, flush=True)


async def fanout(args: argparse.Namespace) -> dict:
    stats = Stats()
    paths, sender_path = _paths(args)
    t0 = time.monotonic()
    conns = await connect_many(args.host, args.port, paths, stats.on_text)
    sender = (await connect_many(args.host, args.port, [sender_path], lambda _: None))[0]
    connect_s = time.monotonic() - t0
    await asyncio.sleep(float(os.environ.get("BENCH_SETTLE", "1.0")))  # let welcomes and presence settle
    stats.received, stats.lat = 0, array("q")
    mark("SENDING")
    total = int(args.rate * args.seconds)
    run = os.urandom(4).hex()  # client_msg_ids are idempotency keys: unique per run
    start = time.monotonic()
    for i in range(total):
        due = start + i / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        ns = str(time.monotonic_ns())
        sender.send_text(BASELINE_FRAME.replace("<ns>", ns) if args.baseline else
                         '{"type":"message.send","text":"' + ns + '","client_msg_id":"' + run + str(i) + '"}')
    mark("SENT")
    expected = total * len(conns)
    last, idle_since = -1, time.monotonic()
    while stats.received < expected and time.monotonic() - idle_since < 5:
        await asyncio.sleep(0.05)
        if stats.received != last:
            last, idle_since = stats.received, time.monotonic()
    elapsed = (stats.last_at / 1e9) - start if stats.received else float("nan")
    mark("DONE")
    lat = sorted(stats.lat)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6 if lat else float("nan")

    for c in conns + [sender]:
        c.transport.close()
    return {"clients": len(conns), "rate": args.rate, "seconds": args.seconds, "sent": total, "expected": expected,
            "received": stats.received, "elapsed_s": round(elapsed, 3),
            "deliveries_per_s": round(stats.received / elapsed, 1) if stats.received else 0,
            "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2), "max_ms": round(pct(1.0), 2),
            "connect_s": round(connect_s, 2)}


async def idle(args: argparse.Namespace) -> dict:
    paths, _ = _paths(args)
    t0 = time.monotonic()
    conns = await connect_many(args.host, args.port, paths, lambda _: None)
    connect_s = time.monotonic() - t0
    mark("IDLE")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the parent measures, then says go
    alive = sum(1 for c in conns if not c.closed.done())
    codes = Counter(str(c.closed.result()) for c in conns if c.closed.done())  # why the others closed
    for c in conns:
        c.transport.close()
    return {"clients": len(conns), "alive": alive, "closed": dict(codes), "connect_s": round(connect_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["fanout", "idle"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--tokens", help="JSON file {room, learners: [...], sender} (studyhall)")
    ap.add_argument("--baseline", action="store_true")
    args = ap.parse_args()
    result = uvloop.run(fanout(args) if args.mode == "fanout" else idle(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
