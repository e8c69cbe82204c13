"""Several server processes on one Redis: one order for everyone, presence across processes, and a kill -9
in the middle of 1,000 messages that loses nothing and doubles nothing."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import websockets

from tests.conftest import Factory, fetch
from tests.server.conftest import Client, live_poll, make_course, ws_url


async def test_two_processes_one_order(cluster, make: Factory):
    a_url, b_url = cluster.urls
    course = make_course(a_url, make, learners=6)
    clients = [await Client.connect(a_url if i % 2 else b_url, course.room, u, after=0)
               for i, u in enumerate(course.learners)]
    per_client = 20

    async def chatter(c: Client) -> None:
        for i in range(per_client):
            await c.send({"type": "message.send", "text": f"{c.user.name}:{i}", "client_msg_id": str(i)})

    await asyncio.gather(*(chatter(c) for c in clients))
    total = per_client * len(clients)
    views = []
    for c in clients:
        got = []
        while len(got) < total:
            f = await c.recv(timeout=10)
            if f["type"] == "message.new":
                got.append((f["seq"], f["id"], f["text"]))
        views.append(got)
        await c.close()
    assert [s for s, _, _ in views[0]] == list(range(1, total + 1))
    assert all(v == views[0] for v in views)
    # each author's messages keep the order they were sent in
    for c in clients:
        mine = [t for _, _, t in views[0] if t.startswith(c.user.name + ":")]
        assert mine == [f"{c.user.name}:{i}" for i in range(per_client)]


async def test_presence_across_processes_and_after_kill(cluster, victim, make: Factory, settings):
    a_url, b_url = cluster.urls
    v_proc, v_url = victim
    course = make_course(a_url, make, learners=3)
    watcher, x, y = course.learners
    with httpx.Client(base_url=a_url) as c:
        sid = c.post(f"/api/v1/courses/{course.id}/live", json={"title": "Lab"}, headers=course.instructor.h).json()["id"]
        assert c.post(f"/api/v1/live/{sid}/start", headers=course.instructor.h).status_code == 200
    room = f"live:{sid}"
    w = await Client.connect(a_url, room, watcher)
    cy = await Client.connect(b_url, room, y)
    assert (await w.expect("presence", action="joined"))["user"]["id"] == y.id
    cx = await Client.connect(v_url, room, x)
    assert (await w.expect("presence", action="joined"))["user"]["id"] == x.id
    assert {u["id"] for u in cx.welcome["online"]} == {watcher.id, x.id, y.id}
    with httpx.Client(base_url=b_url) as c:
        online = c.get(f"/api/v1/rooms/{room}/presence", headers=watcher.h).json()
    assert online["online_count"] == 3 and {u["id"] for u in online["online"]} == {watcher.id, x.id, y.id}
    # a second connection of y on another process: closing one of them does not make y leave
    cy2 = await Client.connect(a_url, room, y)
    await cy.close()
    assert [f for f in await w.quiet(0.5) if f["type"] == "presence"] == []
    # y's last socket closes on one process and y is back on the other within the grace (a reload landing
    # elsewhere): nobody sees y leave or join
    await cy2.close()
    await asyncio.sleep(0.5)  # the page loading again
    cy2 = await Client.connect(b_url, room, y)
    assert [f for f in await w.quiet(settings.presence_grace_s + 0.5) if f["type"] == "presence"] == []

    t0 = time.monotonic()
    os.kill(v_proc.pid, signal.SIGKILL)
    v_proc.wait()
    left = await w.expect("presence", action="left", timeout=15)
    assert left["user"]["id"] == x.id and left["online_count"] == 2
    assert time.monotonic() - t0 < 10  # TTL is 2 s here; 15 s by default, so well under 30 s
    with httpx.Client(base_url=a_url) as c:
        online = c.get(f"/api/v1/rooms/{room}/presence", headers=watcher.h).json()
    assert {u["id"] for u in online["online"]} == {watcher.id, y.id}
    # the dead process's attendance rows are closed by a survivor
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = fetch(settings, "SELECT left_at FROM live_attendance WHERE session_id = $1 AND user_id = $2", sid, x.id)
        if rows and rows[0]["left_at"] is not None:
            break
        await asyncio.sleep(0.2)
    assert rows and rows[0]["left_at"] is not None
    await w.close()
    await cy2.close()


class Member:
    """A client that reconnects to the survivor with ?after= when its server dies, and re-sends what was
    not acknowledged (same client_msg_id)."""

    def __init__(self, user, url: str, fallback: str, room: str) -> None:  # type: ignore[no-untyped-def]
        self.user, self.url, self.fallback, self.room = user, url, fallback, room
        self.seqs: list[int] = []
        self.cmids: list[str] = []
        self.last = 0
        self.ws = None
        self.generation = 0
        self.connected = asyncio.Event()
        self.acked: set[str] = set()
        self.reconnects = 0

    async def run(self, total: int) -> None:
        while len(self.cmids) < total:
            try:
                async with websockets.connect(ws_url(self.url, self.room, self.user.token, self.last),
                                              open_timeout=10) as ws:
                    self.ws, self.generation = ws, self.generation + 1
                    self.connected.set()
                    async for raw in ws:
                        f = json.loads(raw)
                        if f["type"] == "message.new":
                            self.seqs.append(f["seq"])
                            self.cmids.append(f["client_msg_id"])
                            self.last = f["seq"]
                            if f["author"]["id"] == self.user.id:
                                self.acked.add(f["client_msg_id"])
                            if len(self.cmids) >= total:
                                return
            except (websockets.ConnectionClosed, OSError, asyncio.TimeoutError):
                pass
            self.connected.clear()
            self.url = self.fallback
            self.reconnects += 1
            await asyncio.sleep(0.05)

    async def send_all(self, n: int, window: int = 16) -> None:
        ids = [f"{self.user.id}-{i}" for i in range(n)]
        sent_gen, nxt = 0, 0
        while len(self.acked) < n:
            await self.connected.wait()
            ws = self.ws
            try:
                if self.generation != sent_gen:  # new connection: re-send everything not acknowledged
                    sent_gen = self.generation
                    for cmid in ids[:nxt]:
                        if cmid not in self.acked:
                            await ws.send(json.dumps({"type": "message.send", "text": cmid, "client_msg_id": cmid}))
                while nxt < n and nxt - len(self.acked) < window:
                    cmid = ids[nxt]
                    await ws.send(json.dumps({"type": "message.send", "text": cmid, "client_msg_id": cmid}))
                    nxt += 1
            except websockets.ConnectionClosed:
                pass
            await asyncio.sleep(0.002)


async def test_kill9_during_1000_messages_loses_nothing(cluster, victim, make: Factory, settings):
    a_url, _ = cluster.urls
    v_proc, v_url = victim
    course = make_course(a_url, make, learners=6)
    members = [Member(u, v_url if i < 3 else a_url, a_url, course.room) for i, u in enumerate(course.learners)]
    total, per_sender = 1000, 500
    readers = [asyncio.create_task(m.run(total)) for m in members]
    for m in members:
        await asyncio.wait_for(m.connected.wait(), 10)
    senders = [asyncio.create_task(members[0].send_all(per_sender)),  # on the victim
               asyncio.create_task(members[3].send_all(per_sender))]  # on the survivor

    while sum(len(m.acked) for m in (members[0], members[3])) < 300:
        await asyncio.sleep(0.005)
    os.kill(v_proc.pid, signal.SIGKILL)
    killed_at = max(len(m.seqs) for m in members)

    await asyncio.wait_for(asyncio.gather(*senders, *readers), 90)
    assert killed_at < total
    expected = {f"{members[k].user.id}-{i}" for k in (0, 3) for i in range(per_sender)}
    for m in members:
        assert m.seqs == list(range(1, total + 1)), f"gaps or duplicates for {m.user.name}"
        assert len(m.cmids) == total and set(m.cmids) == expected
    assert all(m.reconnects >= 1 for m in members[:3])
    n = fetch(settings, "SELECT count(*) AS n, max(seq) AS s FROM messages WHERE room_id = $1", course.room)[0]
    assert n["n"] == total and n["s"] == total


async def test_committed_but_unpublished_events_still_arrive(cluster, make: Factory, worker_db):
    """A publisher that dies between commit and publish loses nothing: the hub notices the connection is behind
    the room's committed seq, or a later event shows the gap, and reads it from Postgres."""
    from redis.asyncio import Redis

    from store.embedded import free_port
    from store.messages import post_message

    pool, redis = worker_db
    a_url, _ = cluster.urls
    course = make_course(a_url, make, learners=1)
    c = await Client.connect(a_url, course.room, course.learners[0])
    dead = Redis(host="127.0.0.1", port=free_port())  # nothing listens: every publish fails (and is logged)
    try:
        t0 = time.monotonic()
        await post_message(pool, dead, course.room, None, "never published", {}, "u1")
        m = await c.expect("message.new", timeout=5)
        assert m["seq"] == 1 and m["text"] == "never published"
        assert time.monotonic() - t0 < 3  # presence TTL is 2 s here: caught up within two 0.67 s ticks
        # a gap shown by a later event is filled at once, in order
        await post_message(pool, dead, course.room, None, "lost", {}, "u2")
        t0 = time.monotonic()
        await post_message(pool, redis, course.room, None, "published", {}, "u3")
        got = [await c.recv(timeout=2), await c.recv(timeout=2)]
        assert [(f["seq"], f["text"]) for f in got] == [(2, "lost"), (3, "published")]
        assert time.monotonic() - t0 < 0.6
    finally:
        await dead.aclose()
        await c.close()


async def test_kicks_and_removals_published_while_a_subscription_was_down_still_close_the_sockets(
        server, make: Factory, settings):
    """Kicks, removals and revocations reach sockets only as pub/sub messages, which a dropped subscription
    never gets again: once it is back, the process checks its sockets against the database."""
    from redis.asyncio import Redis

    course = make_course(server, make, learners=4)
    kicked, closed_only, removed, stays = course.learners
    doomed = make_course(server, make, learners=1)
    clients = [await Client.connect(server, course.room, u) for u in course.learners]
    in_doomed = await Client.connect(server, doomed.room, doomed.learners[0])
    redis = Redis.from_url(settings.redis_url)
    try:
        with httpx.Client(base_url=server, timeout=30) as c:
            # published while the server's subscription is down (it retries after half a second)
            await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            for user, body in ((kicked, {"seconds": 3600}), (closed_only, {})):  # a bar, and a kick without one
                assert c.post(f"/api/v1/rooms/{course.room}/kicks", json={"user_id": user.id, **body},
                              headers=course.instructor.h).status_code == 204
            assert c.delete(f"/api/v1/courses/{course.id}/enrollments/{removed.id}",
                            headers=course.instructor.h).status_code == 204
            assert c.delete(f"/api/v1/courses/{doomed.id}", headers=doomed.instructor.h).status_code == 204
    finally:
        await redis.aclose()
    assert await clients[0].closed(10) == (4403, "kicked")
    assert await clients[1].closed(10) == (4403, "kicked")
    assert await clients[2].closed(10) == (4403, "access revoked")
    assert await in_doomed.closed(10) == (4403, "room deleted")
    await clients[3].send({"type": "ping", "ref": "still"})
    assert (await clients[3].expect("pong", timeout=10))["ref"] == "still"
    await clients[3].close()
    # the kick without a bar closed the sockets of then; a new one may join
    again = await Client.connect(server, course.room, closed_only)
    await again.close()


async def test_a_redis_stall_does_not_make_live_processes_reap_each_other(cluster, make: Factory, settings):
    """After a stall longer than the presence lease every process's lease has lapsed, live ones' too: the first
    to tick again took the others for dead, closed their live-session attendance and would have settled their
    tutor answers, while their sockets were open. A process reaps only once its own beats got through for a
    whole lease."""
    from redis.asyncio import Redis

    a_url, b_url = cluster.urls
    course = make_course(a_url, make, learners=2)
    with httpx.Client(base_url=a_url, timeout=30) as c:
        sid = c.post(f"/api/v1/courses/{course.id}/live", json={"title": "Stall"},
                     headers=course.instructor.h).json()["id"]
        assert c.post(f"/api/v1/live/{sid}/start", headers=course.instructor.h).status_code == 200
    clients = [await Client.connect(url, f"live:{sid}", u) for url, u in zip((a_url, b_url), course.learners)]
    open_rows = "SELECT count(*) AS n FROM live_attendance WHERE session_id = $1 AND left_at IS NULL"
    deadline = time.monotonic() + 10
    while fetch(settings, open_rows, sid)[0]["n"] < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    redis = Redis.from_url(settings.redis_url)
    try:
        await redis.execute_command("CLIENT", "PAUSE", "6000", "ALL")  # the test servers' lease is 2 s
    finally:
        await redis.aclose()
    await asyncio.sleep(6 + 2 * 2 + 1)  # the stall, then two leases for anyone to reap
    assert fetch(settings, open_rows, sid)[0]["n"] == 2
    for i, client in enumerate(clients):
        await client.send({"type": "ping", "ref": str(i)})
        assert (await client.expect("pong", timeout=10))["ref"] == str(i)
        await client.close()


async def test_attendance_survives_a_process_taken_for_dead_and_ends_with_one_never_listed(cluster, victim,
                                                                                          make: Factory, settings):
    """A process cut off from Redis for a while (a stall, a partition) was reaped by the others, which closed its
    attendance rows; its sockets stayed open and its presence healed, but the rows stayed closed: the report cut
    those learners off at the stall. Now the process reopens them when it finds itself off the list. And rows of a
    process that died off the list (Redis lost it) were never closed: they are now, once it stays off it."""
    a_url, _ = cluster.urls
    v_proc, v_url = victim
    course = make_course(a_url, make, learners=3)
    watcher, x, ghost = course.learners
    with httpx.Client(base_url=a_url) as c:
        sid = c.post(f"/api/v1/courses/{course.id}/live", json={"title": "Lab"},
                     headers=course.instructor.h).json()["id"]
        assert c.post(f"/api/v1/live/{sid}/start", headers=course.instructor.h).status_code == 200
    room = f"live:{sid}"
    w = await Client.connect(a_url, room, watcher)
    cx = await Client.connect(v_url, room, x, ping_interval=None)
    await w.expect("presence", action="joined")
    rows = "SELECT left_at FROM live_attendance WHERE session_id = $1 AND user_id = $2"

    async def until(check, timeout: float = 20):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not check() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return check()

    assert await until(lambda: fetch(settings, rows, sid, x.id) and fetch(settings, rows, sid, x.id)[0]["left_at"]
                       is None)
    os.kill(v_proc.pid, signal.SIGSTOP)  # no heartbeat for longer than the others wait (2 s leases here)
    try:
        assert await until(lambda: fetch(settings, rows, sid, x.id)[0]["left_at"] is not None)  # reaped
    finally:
        os.kill(v_proc.pid, signal.SIGCONT)
    assert await until(lambda: fetch(settings, rows, sid, x.id)[0]["left_at"] is None), "not reopened"
    await cx.send({"type": "ping", "ref": "p"})
    assert (await cx.expect("pong", timeout=5))["ref"] == "p"
    # a row of a process that is not on the list at all (it died after Redis lost the list)
    fetch(settings, "INSERT INTO live_attendance (session_id, user_id, proc_id, joined_at) "
                    "VALUES ($1, $2, 'ghost-proc', now() - interval '1 minute')", sid, ghost.id)
    assert await until(lambda: fetch(settings, rows, sid, ghost.id)[0]["left_at"] is not None, 30), "never closed"
    assert fetch(settings, rows, sid, x.id)[0]["left_at"] is None  # (a live process's rows are not touched)
    await cx.close()
    await w.close()


async def test_poll_results_keep_their_pace_however_many_processes_take_the_votes(cluster, server, make: Factory,
                                                                                  settings):
    """Each process coalesced its own votes into one `poll.results` per 250 ms: votes arriving through three
    processes made three times as many (about 10 a second, each a stored event the room's posts queue behind and
    every reconnecting client replays). One window per poll over all processes keeps it at about 4 a second."""
    urls = [server, *cluster.urls]
    course, sid, poll = live_poll(server, make, learners=9)
    clients = [await Client.connect(urls[i % 3], f"live:{sid}", u) for i, u in enumerate(course.learners)]
    rounds, pause = 7, 0.4  # within the send rate (3 a second per user)
    t0 = time.monotonic()

    async def voter(i: int, cl: Client) -> None:
        await asyncio.sleep(i * pause / len(clients))
        for k in range(rounds):
            await cl.send({"type": "poll.vote", "poll_id": poll["id"], "option": k % 2})  # counts change at each
            await asyncio.sleep(pause)

    await asyncio.gather(*(voter(i, cl) for i, cl in enumerate(clients)))
    votes = fetch(settings, "SELECT option, count(*) AS n FROM poll_votes WHERE poll_id = $1 GROUP BY option "
                            "ORDER BY option", poll["id"])
    final = [sum(r["n"] for r in votes if r["option"] == o) for o in (0, 1)]
    deadline = time.monotonic() + 15  # the last votes' results, however loaded the machine
    while time.monotonic() < deadline:
        last = fetch(settings, "SELECT payload FROM room_events WHERE room_id = $1 AND type = 'poll.results' "
                               "ORDER BY seq DESC LIMIT 1", f"live:{sid}")
        if last and json.loads(last[0]["payload"])["counts"] == final:
            break
        await asyncio.sleep(0.2)
    took = time.monotonic() - t0
    for cl in clients:
        await cl.close()
    published = fetch(settings, "SELECT count(*) AS n FROM room_events WHERE room_id = $1 AND type = 'poll.results'",
                      f"live:{sid}")[0]["n"]
    assert published <= took / 0.25 + 3, (published, took)
    # and the last results count every vote as it stands
    assert last and json.loads(last[0]["payload"])["counts"] == final, (last, final)
