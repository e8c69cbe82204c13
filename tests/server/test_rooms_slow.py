"""A client that cannot keep up is closed with 4008 without delaying anyone, and resumes without loss."""
from __future__ import annotations

import json
import time

from store.messages import post_message
from tests.conftest import Factory
from tests.server.conftest import Client, RawWs, make_course, ws_url


async def test_slow_consumer_closed_4008_then_resumes(tight, make: Factory, worker_db):
    pool, redis = worker_db
    course = make_course(tight, make, learners=2)
    slow_user, fast_user = course.learners
    # The slow client reads nothing for a while (a tiny socket buffer, reads only when told to).
    slow = await RawWs.connect(ws_url(tight, course.room, slow_user.token))
    opcode, payload = await slow.frame()
    assert json.loads(payload)["type"] == "welcome"
    fast = await Client.connect(tight, course.room, fast_user)

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
