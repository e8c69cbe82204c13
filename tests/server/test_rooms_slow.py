"""A client that cannot keep up is closed with 4008 without delaying anyone, and resumes without loss."""
from __future__ import annotations

import asyncio
import json
import time

from store.messages import post_message
from tests.conftest import Factory
from tests.server.conftest import Client, RawWs, make_course, ws_url


async def test_slow_consumer_closed_4008_then_resumes(tight, make: Factory, worker_db):
    pool, redis = worker_db
    course, slow, fast = await _a_reader_and_a_watcher(tight, make)
    slow_user = course.learners[0]

    # ~44 KB frames (a long answer with big citations), so the ~4 MB the kernel buffers on loopback fill fast
    n, text, pad = 200, "x" * 4000, "y" * 40_000
    t0 = time.monotonic()
    for i in range(n):  # as a worker would: straight through the store, no rate limit
        await post_message(pool, redis, course.room, None, f"{i}:{text}", {"n": i, "pad": pad}, f"w{i}",
                           author_name="Tutor", author_role="tutor")
    # the fast client got everything promptly, the slow one did not hold it up
    got = []
    while len(got) < n:
        f = await fast.recv(timeout=10)
        if f["type"] == "message.new":
            got.append(f["seq"])
    assert got == list(range(1, n + 1)) and time.monotonic() - t0 < 20

    seqs = []
    while True:
        opcode, payload = await slow.frame(timeout=15)
        if opcode == 8:  # close
            assert int.from_bytes(payload[:2], "big") == 4008, payload
            break
        f = json.loads(payload)
        if f["type"] == "message.new":
            seqs.append(f["seq"])
    slow.close()
    assert len(seqs) < n and seqs == list(range(1, len(seqs) + 1))

    # it resumes from what it has and ends with exactly the full sequence
    again = await Client.connect(tight, course.room, slow_user, after=seqs[-1] if seqs else 0)
    while len(seqs) < n:
        f = await again.recv(timeout=10)
        if f["type"] == "message.new":
            seqs.append(f["seq"])
            assert f["author"] == {"id": None, "name": "Tutor", "role": "tutor"} and f["meta"]["n"] == f["seq"] - 1
    assert seqs == list(range(1, n + 1))
    await again.close()
    await fast.close()


async def test_a_reader_that_stops_reading_in_a_quiet_room_is_dropped(make: Factory, worker_db, data_dir):
    """A client that stops reading while a send waits for it (a hung tab) is closed once the send has waited
    STUDYHALL_WS_STALL_S, though the room is too quiet to fill its queue: it leaves presence ("left" goes out)
    and the server frees its socket, instead of staying online until TCP gives up."""
    from tests.conftest import stop_process
    from tests.server.conftest import CLUSTER_ENV, spawn_ready

    pool, redis = worker_db
    ((proc, url),) = spawn_ready(data_dir, ["stall"], {**CLUSTER_ENV, "STUDYHALL_WS_STALL_S": "2"})
    try:
        course, hung, watcher = await _a_reader_and_a_watcher(url, make)
        hung_user = course.learners[0]
        assert hung.server_end_open()
        # a few big frames: enough to fill the kernel buffers on loopback, far fewer than the 1,000-frame queue
        for i in range(150):
            await post_message(pool, redis, course.room, None, f"{i}:" + "x" * 4000, {"pad": "y" * 40_000}, f"s{i}",
                               author_name="Tutor", author_role="tutor")
        t0 = time.monotonic()
        left = await watcher.expect("presence", timeout=40, action="left")
        assert left["user"]["id"] == hung_user.id and left["online_count"] == 1
        assert time.monotonic() - t0 < 30
        # the close frame cannot reach a peer that does not read: once the close has waited its time the server
        # drops its end, rather than hold the socket and its unsent buffer until TCP gives up (never,
        # while the peer's window is shut)
        while hung.server_end_open():
            assert time.monotonic() - t0 < 60, "the server still holds the connection"
            await asyncio.sleep(0.5)
        hung.close()
        await watcher.close()
    finally:
        stop_process(proc)


async def _a_reader_and_a_watcher(url: str, make: Factory):  # type: ignore[no-untyped-def]
    """A course room with a client that reads only when told to (a tiny socket buffer) and one that reads all."""
    course = make_course(url, make, learners=2)
    reader = await RawWs.connect(ws_url(url, course.room, course.learners[0].token))
    opcode, payload = await reader.frame()
    assert json.loads(payload)["type"] == "welcome"
    return course, reader, await Client.connect(url, course.room, course.learners[1])
