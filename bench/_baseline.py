"""The baseline: a bare `websockets` broadcast server (no auth, no storage, no Redis) on uvloop.
Every text frame a client sends is broadcast to every other client."""
from __future__ import annotations

import argparse
import asyncio
import logging

import uvloop
from websockets.asyncio.server import broadcast, serve

CLIENTS: set = set()


async def handler(ws) -> None:  # type: ignore[no-untyped-def]
    CLIENTS.add(ws)
    try:
        async for message in ws:
            broadcast(CLIENTS - {ws} if len(CLIENTS) < 64 else _others(ws), message)
    finally:
        CLIENTS.discard(ws)


def _others(ws):  # type: ignore[no-untyped-def]
    return (c for c in CLIENTS if c is not ws)


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, max_size=64 * 1024, compression=None, backlog=4096):
        await asyncio.Future()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    logging.getLogger("websockets").setLevel(logging.CRITICAL)  # clients that just drop are not news
    uvloop.run(main(ap.parse_args().port))
