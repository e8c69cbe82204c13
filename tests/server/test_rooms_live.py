"""Live sessions over REST and websocket: schedule, start, end, attendance, polls and their vote rules."""
from __future__ import annotations

import asyncio

import httpx
import websockets

from tests.conftest import Factory, fetch
from tests.server.conftest import Client, live_poll, make_course, ws_url


async def test_session_lifecycle_and_attendance(server, client, make: Factory, settings):
    course = make_course(server, make, learners=2)
    inst, (a, b) = course.instructor, course.learners
    r = client.post(f"/api/v1/courses/{course.id}/live", json={"title": "Office hours",
                                                             "scheduled_at": "2030-01-01T10:00:00Z"}, headers=inst.h)
    assert r.status_code == 201
    s = r.json()
    assert s["state"] == "scheduled" and s["room"] == f"live:{s['id']}" and s["scheduled_at"].startswith("2030-01-01")
    sid = s["id"]
    assert client.post(f"/api/v1/courses/{course.id}/live", json={"title": "x"}, headers=a.h).status_code == 403
    assert [x["id"] for x in client.get(f"/api/v1/courses/{course.id}/live", headers=a.h).json()] == [sid]
    outsider = make.user("learner")
    assert client.get(f"/api/v1/live/{sid}", headers=outsider.h).status_code == 404
    assert client.get(f"/api/v1/courses/{course.id}/live", headers=outsider.h).status_code == 404  # a draft course
    # a published course they can read but are not enrolled in: said so (it was "course not found")
    assert client.patch(f"/api/v1/courses/{course.id}", json={"published": True}, headers=inst.h).status_code == 200
    assert client.get(f"/api/v1/courses/{course.id}", headers=outsider.h).status_code == 200
    r = client.get(f"/api/v1/courses/{course.id}/live", headers=outsider.h)
    assert r.status_code == 403 and r.json()["code"] == "not_enrolled", r.text
    # paid: without access it is not found (content stays 404 until they pay); with access (given by staff, kept
    # after leaving) it is "enroll first" as for a free one (it was "course not found")
    assert client.patch(f"/api/v1/courses/{course.id}", json={"price_cents": 900}, headers=inst.h).status_code == 200
    assert client.get(f"/api/v1/courses/{course.id}/live", headers=outsider.h).status_code == 404
    enrolled = f"/api/v1/courses/{course.id}/enrollments"
    assert client.post(enrolled, json={"user_id": outsider.id}, headers=inst.h).status_code == 201
    assert client.delete(f"{enrolled}/{outsider.id}", headers=outsider.h).status_code == 204
    r = client.get(f"/api/v1/courses/{course.id}/live", headers=outsider.h)
    assert r.status_code == 403 and r.json()["code"] == "not_enrolled", r.text
    assert client.post(f"/api/v1/live/{sid}/end", headers=inst.h).status_code == 409  # not live yet
    r = client.post(f"/api/v1/live/{sid}/polls", json={"question": "?", "options": ["x", "y"]}, headers=inst.h)
    assert r.status_code == 409 and "started" in r.json()["message"]  # polls open once it is live

    ca = await Client.connect(server, s["room"], a)
    assert client.post(f"/api/v1/live/{sid}/start", headers=a.h).status_code == 403
    r = client.post(f"/api/v1/live/{sid}/start", headers=inst.h)
    assert r.status_code == 200 and r.json()["state"] == "live"
    started = await ca.expect("live.started")
    assert started["session_id"] == sid and started["seq"] == 1
    assert client.post(f"/api/v1/live/{sid}/start", headers=inst.h).status_code == 409

    cb = await Client.connect(server, s["room"], b)
    bot = client.post("/api/v1/bots", json={"name": f"bridge-{sid}", "label": "discord"}, headers=inst.h).json()
    bridge = await websockets.connect(ws_url(server, s["room"], bot["token"]), open_timeout=10)  # not a person
    await asyncio.sleep(0.3)
    await cb.close()
    await bridge.close()
    await asyncio.sleep(0.2)
    # a bridge's row from before bots stopped being recorded is not listed either
    fetch(settings, "INSERT INTO live_attendance (session_id, user_id, proc_id, joined_at, left_at) VALUES ($1, $2, "
                    "'old', now() - interval '1 second', now())", sid, bot["user_id"])
    report = {x["user_id"]: x for x in client.get(f"/api/v1/live/{sid}/attendance", headers=inst.h).json()}
    assert set(report) == {a.id, b.id}
    assert report[a.id]["last_left_at"] is None and report[b.id]["last_left_at"] is not None
    assert 0.2 < report[b.id]["seconds_live"] < 5 and report[b.id]["connections"] == 1
    assert client.get(f"/api/v1/live/{sid}/attendance", headers=a.h).status_code == 403

    r = client.post(f"/api/v1/live/{sid}/end", headers=inst.h)
    assert r.status_code == 200 and r.json()["state"] == "ended"
    ended = await ca.expect("live.ended")
    assert ended["seq"] == 2
    await ca.close()
    await asyncio.sleep(0.2)
    rows = fetch(settings, "SELECT count(*) AS n FROM live_attendance WHERE session_id = $1 AND left_at IS NULL", sid)
    assert rows[0]["n"] == 0
    # who only opens the room after it ended (to read it back) did not attend
    late = make.user("learner")
    assert client.post(f"/api/v1/courses/{course.id}/enrollments", json={"user_id": late.id},
                       headers=inst.h).status_code == 201
    reader = await Client.connect(server, s["room"], late)
    again = await Client.connect(server, s["room"], a)  # and who reads it back stays counted as they were
    await asyncio.sleep(0.2)
    report = {x["user_id"]: x for x in client.get(f"/api/v1/live/{sid}/attendance", headers=inst.h).json()}
    assert set(report) == {a.id, b.id}
    assert report[a.id]["connections"] == 1 and report[a.id]["last_left_at"] is not None, report[a.id]
    await reader.close()
    await again.close()


async def test_a_course_kick_keeps_the_learner_out_of_its_live_sessions(server, client, make: Factory):
    """A live session's room is joined as its course room: a kick from the course room closes the learner's
    live sockets (an ended session's chat too) and keeps them out of its sessions (room, REST, votes)."""
    from tests.server.conftest import closed_with, ws_url

    course = make_course(server, make, learners=1)
    inst, (a,) = course.instructor, course.learners
    past = client.post(f"/api/v1/courses/{course.id}/live", json={"title": "Last week"}, headers=inst.h).json()["id"]
    assert client.post(f"/api/v1/live/{past}/start", headers=inst.h).status_code == 200
    assert client.post(f"/api/v1/live/{past}/end", headers=inst.h).status_code == 200
    sid = client.post(f"/api/v1/courses/{course.id}/live", json={"title": "Lab"}, headers=inst.h).json()["id"]
    assert client.post(f"/api/v1/live/{sid}/start", headers=inst.h).status_code == 200
    poll = client.post(f"/api/v1/live/{sid}/polls", json={"question": "?", "options": ["x", "y"]},
                       headers=inst.h).json()
    live = await Client.connect(server, f"live:{sid}", a)
    ended = await Client.connect(server, f"live:{past}", a)
    assert client.post(f"/api/v1/rooms/{course.room}/kicks", json={"user_id": a.id, "seconds": 600},
                       headers=inst.h).status_code == 204
    assert await live.closed() == (4403, "kicked")
    assert await ended.closed() == (4403, "kicked")
    code, _ = await closed_with(ws_url(server, f"live:{sid}", a.token))
    assert code == 4403
    for r in (client.get(f"/api/v1/live/{sid}", headers=a.h),
              client.post(f"/api/v1/polls/{poll['id']}/votes", json={"option": 0}, headers=a.h),
              client.post(f"/api/v1/rooms/live:{sid}/messages", json={"text": "hi"}, headers=a.h)):
        assert r.status_code == 403 and r.json()["code"] == "kicked", r.text
    (bar,) = client.get(f"/api/v1/rooms/live:{sid}/kicks", headers=inst.h).json()  # seen from the live room too
    assert bar["user_id"] == a.id and bar["room"] == course.room
    r = client.delete(f"/api/v1/rooms/live:{sid}/kicks/{a.id}", headers=inst.h)
    assert r.status_code == 404 and "course room" in r.json()["message"]
    assert client.delete(f"/api/v1/rooms/{course.room}/kicks/{a.id}", headers=inst.h).status_code == 204
    assert client.get(f"/api/v1/live/{sid}", headers=a.h).status_code == 200


async def test_a_course_mute_holds_in_its_live_sessions(server, client, make: Factory):
    """Muted in the course room, muted in its live sessions' rooms (joined as the course room), over the socket
    and REST, until the course room's mute is lifted."""
    course = make_course(server, make, learners=1)
    inst, (a,) = course.instructor, course.learners
    sid = client.post(f"/api/v1/courses/{course.id}/live", json={"title": "Lab"}, headers=inst.h).json()["id"]
    assert client.post(f"/api/v1/live/{sid}/start", headers=inst.h).status_code == 200
    live = await Client.connect(server, f"live:{sid}", a)
    await live.send({"type": "message.send", "text": "before", "client_msg_id": "m0"})
    mine = await live.expect("message.new", client_msg_id="m0")
    assert client.post(f"/api/v1/rooms/{course.room}/mutes", json={"user_id": a.id, "seconds": 600},
                       headers=inst.h).status_code == 201
    await live.send({"type": "message.send", "text": "still talking", "client_msg_id": "m1"})
    assert (await live.expect("error"))["code"] == "muted"
    await live.send({"type": "message.edit", "id": mine["id"], "text": "edited"})
    assert (await live.expect("error"))["code"] == "muted"
    r = client.post(f"/api/v1/rooms/live:{sid}/messages", json={"text": "over REST"}, headers=a.h)
    assert r.status_code == 403 and r.json()["code"] == "muted", r.text
    (mute,) = client.get(f"/api/v1/rooms/live:{sid}/mutes", headers=inst.h).json()
    assert mute["user_id"] == a.id and mute["room"] == course.room
    r = client.delete(f"/api/v1/rooms/live:{sid}/mutes/{a.id}", headers=inst.h)
    assert r.status_code == 404 and "course room" in r.json()["message"]
    assert client.delete(f"/api/v1/rooms/{course.room}/mutes/{a.id}", headers=inst.h).status_code == 204
    await live.send({"type": "message.send", "text": "back", "client_msg_id": "m2"})
    await live.expect("message.new", client_msg_id="m2")
    await live.close()


async def test_poll_vote_rules(server, client, make: Factory, settings):
    course = make_course(server, make, learners=3)
    inst, (a, b, c) = course.instructor, course.learners
    sid = client.post(f"/api/v1/courses/{course.id}/live", json={"title": "Quiz"}, headers=inst.h).json()["id"]
    client.post(f"/api/v1/live/{sid}/start", headers=inst.h)
    room = f"live:{sid}"
    ca = await Client.connect(server, room, a)
    cb = await Client.connect(server, room, b)

    url = f"/api/v1/live/{sid}/polls"
    assert client.post(url, json={"question": "?", "options": ["only one"]}, headers=inst.h).status_code == 400
    for bad, field in [({"question": "  ", "options": ["a", "b"]}, "question"),
                       ({"question": "?", "options": ["a", " \t"]}, "options[1]"),
                       ({"question": "?", "options": ["Yes", "yes "]}, "options"),
                       ({"question": "?", "options": ["Yes", "Yes\u200b"]}, "options"),  # the same to a voter
                       ({"question": "?", "options": ["Yes", "\uff39es"]}, "options"),
                       ({"question": "?", "options": ["Yes", "Yes\ufe0f"]}, "options"),  # a variation selector
                       ({"question": "?", "options": ["Yes", "Yes\u200d"]}, "options"),  # a joiner joining nothing
                       ({"question": "?", "options": ["\u0395\u03bb\u03bb\u03ac\u03b4\u03b1",  # (review) Greek
                                                      "\u0395\u03bb\u200d\u03bb\u03ac\u03b4\u03b1"]}, "options"),
                       ({"question": "?", "options": ["Yes\U0001f44d", "Yes\u200d\U0001f44d"]}, "options"),
                       ({"question": "\u200b", "options": ["a", "b"]}, "question")]:  # invisible only
        r = client.post(url, json=bad, headers=inst.h)
        assert r.status_code == 400 and r.json().get("field") == field, r.text
        assert any(w in r.json()["message"] for w in ("blank", "differ", "visible")), r.text
    r = client.post(f"/api/v1/courses/{course.id}/live", json={"title": "   "}, headers=inst.h)
    assert r.status_code == 400 and r.json()["field"] == "title" and "blank" in r.json()["message"]
    assert client.post(url, json={"question": "?", "options": ["a", "b"]}, headers=a.h).status_code == 403
    r = client.post(url, json={"question": " Best basis? ", "options": ["standard ", "eigen", "fourier"]},
                    headers=inst.h)
    assert r.status_code == 201
    poll = r.json()
    assert poll["question"] == "Best basis?" and poll["options"][0] == "standard"  # stored trimmed, as titles
    assert poll["counts"] == [0, 0, 0] and poll["closed"] is False and poll["my_vote"] is None
    opened = await ca.expect("poll.opened")
    assert opened["poll"] == {"id": poll["id"], "session_id": sid, "question": "Best basis?",
                              "options": ["standard", "eigen", "fourier"], "closed": False}

    await ca.send({"type": "poll.vote", "poll_id": poll["id"], "option": 1})
    await cb.send({"type": "poll.vote", "poll_id": poll["id"], "option": 1})
    res = await ca.expect("poll.results")
    while res["total"] < 2:
        res = await ca.expect("poll.results")
    assert res["counts"] == [0, 2, 0] and res["poll_id"] == poll["id"]
    # one vote per user, changeable while open
    await cb.send({"type": "poll.vote", "poll_id": poll["id"], "option": 2})
    res = await ca.expect("poll.results", counts=[0, 1, 1])
    assert res["total"] == 2
    # a bad option, an unknown poll
    await ca.send({"type": "poll.vote", "poll_id": poll["id"], "option": 3, "ref": "v"})
    err = await ca.expect("error")
    assert err["code"] == "bad_option" and err["ref"] == "v"
    await ca.send({"type": "poll.vote", "poll_id": poll["id"] + 1000, "option": 0})
    assert (await ca.expect("error"))["code"] == "not_found"
    # REST voting follows the same rules
    r = client.post(f"/api/v1/polls/{poll['id']}/votes", json={"option": 0}, headers=c.h)
    assert r.status_code == 200 and r.json()["my_vote"] == 0 and r.json()["counts"] == [1, 1, 1]
    assert client.post(f"/api/v1/polls/{poll['id']}/votes", json={"option": 9}, headers=c.h).status_code == 400
    assert client.post(f"/api/v1/polls/{poll['id']}/votes", json={"option": 0},
                       headers=make.user("learner").h).status_code == 404
    # (Tester) one of the tenant outside the course is told as much as of a poll that is not there (it named the
    # poll's session: the id existed)
    for pid in (poll["id"], poll["id"] + 1000):
        r = client.post(f"/api/v1/polls/{pid}/votes", json={"option": 0}, headers=make.user("learner").h)
        assert r.status_code == 404 and r.json()["message"] == f"poll {pid} not found", r.text
    # a bot (a bridge) joins the room but does not vote: its one vote would stand for everyone it relays; refused
    # before it spends its send budget (a Redis bucket)
    from redis.asyncio import Redis
    from store.keys import rate_send

    bot = make.user("bot")
    r = client.post(f"/api/v1/polls/{poll['id']}/votes", json={"option": 0}, headers=bot.h)
    assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
    cbot = await Client.connect(server, room, bot)
    await cbot.send({"type": "poll.vote", "poll_id": poll["id"], "option": 0, "ref": "b"})
    assert (await cbot.expect("error", ref="b"))["code"] == "forbidden"
    await cbot.close()
    redis = Redis.from_url(settings.redis_url)
    try:
        assert not await redis.exists(rate_send(bot.id))
    finally:
        await redis.aclose()

    assert client.post(f"/api/v1/polls/{poll['id']}/close", headers=a.h).status_code == 403
    r = client.post(f"/api/v1/polls/{poll['id']}/close", headers=inst.h)
    assert r.status_code == 200 and r.json()["closed"] is True
    closed = await cb.expect("poll.closed")
    assert closed["counts"] == [1, 1, 1] and closed["total"] == 3
    await ca.send({"type": "poll.vote", "poll_id": poll["id"], "option": 0})
    assert (await ca.expect("error"))["code"] == "poll_closed"
    assert client.post(f"/api/v1/polls/{poll['id']}/close", headers=inst.h).status_code == 409
    listed = client.get(url, headers=b.h).json()
    assert listed[0]["my_vote"] == 2 and listed[0]["counts"] == [1, 1, 1]

    # marks tell words apart in many scripts, superscripts are not digits, accents count
    apart = client.post(url, json={"question": "?", "options": ["\u0e02\u0e49\u0e32\u0e27", "\u0e02\u0e32\u0e27",
                                                                 "10\u00b2", "102", "resume", "r\u00e9sum\u00e9",
                                                                 # (Tester) a family emoji is not its faces; Persian
                                                                 # spells with the zero-width non-joiner
                                                                 "\U0001f468\u200d\U0001f469\u200d\U0001f467",
                                                                 "\U0001f468\U0001f469\U0001f467",
                                                                 "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
                                                                 "\u0645\u06cc\u062e\u0648\u0627\u0647\u0645",
                                                                 "\u1780\u17d2\u200c\u1780", "\u1780\u17d2\u1780"]},
                        headers=inst.h)
    assert apart.status_code == 201, apart.text

    # ending the session closes polls still open
    p2 = client.post(url, json={"question": "More?", "options": ["y", "n"]}, headers=inst.h).json()
    client.post(f"/api/v1/live/{sid}/end", headers=inst.h)
    final = await ca.expect("poll.closed", poll_id=p2["id"])
    assert final["total"] == 0
    await ca.expect("live.ended")
    assert client.post(url, json={"question": "late", "options": ["a", "b"]}, headers=inst.h).status_code == 409
    for cl in (ca, cb):
        await cl.close()


async def test_a_vote_whose_results_a_dead_process_never_sent_is_published(server, client, make: Factory, settings):
    """Results are coalesced in the voting process for 250 ms; a process killed inside that window left a stored
    vote that no `poll.results` ever counted. A survivor's periodic look publishes it (once)."""
    course, sid, poll = live_poll(server, make)
    inst, (a, b) = course.instructor, course.learners
    ws = await Client.connect(server, f"live:{sid}", a)
    try:
        # b's vote as a process that died right after storing it left it: stored, never published
        fetch(settings, "INSERT INTO poll_votes (poll_id, user_id, option, created_at, updated_at) "
                        "VALUES ($1, $2, 1, now() - interval '3 seconds', now() - interval '3 seconds')",
              poll["id"], b.id)
        results = await ws.expect("poll.results", timeout=20)
        assert results["poll_id"] == poll["id"] and results["counts"] == [0, 1]
        await asyncio.sleep(6)  # a later look finds nothing new: no second copy
        assert [f for f in await ws.quiet(0.5) if f["type"] == "poll.results"] == []
    finally:
        await ws.close()


async def test_a_scheduled_session_can_be_cancelled_not_one_that_took_place(server, client, make: Factory):
    course = make_course(server, make, learners=1)
    inst, (a,) = course.instructor, course.learners
    url = f"/api/v1/courses/{course.id}/live"
    planned = client.post(url, json={"title": "Maybe"}, headers=inst.h).json()["id"]
    held = client.post(url, json={"title": "Held"}, headers=inst.h).json()["id"]
    waiting = await Client.connect(server, f"live:{planned}", a)
    assert client.delete(f"/api/v1/live/{planned}", headers=a.h).status_code == 403
    assert client.delete(f"/api/v1/live/{planned}", headers=inst.h).status_code == 204
    assert await waiting.closed() == (4403, "room deleted")
    assert client.get(f"/api/v1/live/{planned}", headers=inst.h).status_code == 404
    assert [s["id"] for s in client.get(url, headers=a.h).json()] == [held]
    assert client.post(f"/api/v1/live/{held}/start", headers=inst.h).status_code == 200
    r = client.delete(f"/api/v1/live/{held}", headers=inst.h)
    assert r.status_code == 409 and "end it" in r.json()["message"]


async def test_joining_while_the_session_is_cancelled_closes_as_room_deleted(server, client, make: Factory, settings):
    """The attendance row of a learner joining a session that is cancelled at that moment cannot be stored: the
    socket closes with 4403 "room deleted" (as for everyone already in it), not 1011 "internal error"."""
    import asyncpg

    course = make_course(server, make, learners=1)
    inst, (a,) = course.instructor, course.learners
    sid = client.post(f"/api/v1/courses/{course.id}/live", json={"title": "Maybe"}, headers=inst.h).json()["id"]
    db = await asyncpg.connect(settings.database_url)
    try:
        tx = db.transaction()
        await tx.start()
        # the cancel has the session row: the join's attendance row waits for it, then finds the session gone
        await db.execute("SELECT 1 FROM live_sessions WHERE id = $1 FOR UPDATE", sid)
        joining = await Client.connect(server, f"live:{sid}", a)
        await asyncio.sleep(0.3)
        await db.execute("DELETE FROM rooms WHERE id = $1", f"live:{sid}")
        await db.execute("DELETE FROM live_sessions WHERE id = $1", sid)
        await tx.commit()
        assert await joining.closed() == (4403, "room deleted")
    finally:
        await db.close()


async def test_rest_votes_waiting_on_redis_hold_no_database_connection(server, make: Factory, settings):
    """A REST vote took its send budget (a Redis call) while holding a pooled Postgres connection: with Redis
    stalled, a class voting at once (more votes than the pool's 20 connections) kept every other request waiting."""
    import time

    import httpx
    from redis.asyncio import Redis

    course, sid, poll = live_poll(server, make, learners=24)
    inst = course.instructor
    async with httpx.AsyncClient(base_url=server, timeout=30) as c:
        redis = Redis.from_url(settings.redis_url)
        try:
            await redis.execute_command("CLIENT", "PAUSE", "3000", "WRITE")  # the budget's script waits
            votes = [asyncio.create_task(c.post(f"/api/v1/polls/{poll['id']}/votes", json={"option": 1}, headers=l.h))
                     for l in course.learners]
            await asyncio.sleep(0.8)  # every vote is waiting on Redis
            t0 = time.monotonic()
            read = await c.get(f"/api/v1/live/{sid}", headers=inst.h)
            took = time.monotonic() - t0
            done = await asyncio.gather(*votes)
        finally:
            await redis.execute_command("CLIENT", "UNPAUSE")
            await redis.aclose()
    assert read.status_code == 200 and took < 1.0, took
    assert [v.status_code for v in done] == [200] * len(course.learners), [v.text for v in done if v.status_code != 200]


async def test_a_vote_on_a_socket_whose_kick_or_removal_was_lost_is_refused(server, client, make: Factory, settings):
    """Posts check the author's standing (a lost kick or removal event left the socket open); votes did not: a
    barred learner, or one who left the course, kept voting on an open socket."""
    course, sid, poll = live_poll(server, make)
    inst, (a, b) = course.instructor, course.learners
    ca, cb = [await Client.connect(server, f"live:{sid}", u) for u in (a, b)]
    fetch(settings, "INSERT INTO rooms (id, kind, course_id) VALUES ($1, 'course', $2) ON CONFLICT DO NOTHING",
          course.room, course.id)
    fetch(settings, "INSERT INTO room_kicks (room_id, user_id, until) VALUES ($1, $2, now() + interval '1 hour')",
          course.room, a.id)  # the bar stored, its event never published
    fetch(settings, "DELETE FROM enrollments WHERE course_id = $1 AND user_id = $2", course.id, b.id)  # likewise
    for sock, code in ((ca, "kicked"), (cb, "access_revoked")):
        await sock.send({"type": "poll.vote", "poll_id": poll["id"], "option": 0})
        err = await sock.expect("error")
        assert err["code"] == code, err
        assert await sock.closed() == (4403, code.replace("_", " "))
    r = client.post(f"/api/v1/polls/{poll['id']}/votes", json={"option": 0}, headers=a.h)
    assert r.status_code == 403 and r.json()["code"] == "kicked"
    assert not fetch(settings, "SELECT 1 FROM poll_votes WHERE poll_id = $1", poll["id"])


def test_an_option_the_poll_lacks_names_the_field(server, client, make: Factory):
    course, sid, poll = live_poll(server, make)
    r = client.post(f"/api/v1/polls/{poll['id']}/votes", json={"option": 1000}, headers=course.learners[0].h)
    assert r.status_code == 400 and r.json()["code"] == "bad_option" and r.json()["field"] == "option", r.text


async def test_a_repeated_poll_opening_opens_one_poll(server, client, make: Factory, settings):
    """Two identical POST /live/{id}/polls (a double click, a retry after a lost reply) opened two polls: two
    `poll.opened` in the room, the votes split between them, two of the session's 200. With an Idempotency-Key
    the repeat, and a twin sent at once, get the poll the key opened."""
    course, sid, first = live_poll(server, make)
    inst = course.instructor
    url = f"/api/v1/live/{sid}/polls"
    body = {"question": "Ready?", "options": ["yes", "no"]}
    h = {**inst.h, "Idempotency-Key": "open-ready"}
    async with httpx.AsyncClient(base_url=server, timeout=30) as c:
        rs = await asyncio.gather(*(c.post(url, json=body, headers=h) for _ in range(3)))
        assert sorted(r.status_code for r in rs) == [200, 200, 201], [r.text for r in rs]
        assert len({r.json()["id"] for r in rs}) == 1
        other = await c.post(url, json={**body, "options": ["yes", "no", "maybe"]}, headers=h)
        assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused", other.text
        assert other.json()["field"] == "Idempotency-Key"
        bad = await c.post(url, json=body, headers={**inst.h, "Idempotency-Key": "k" * 101})
        assert bad.status_code == 400 and bad.json()["field"] == "Idempotency-Key"
        plain = await c.post(url, json=body, headers=inst.h)  # without a key: a new poll, as before
        assert plain.status_code == 201 and plain.json()["id"] != rs[0].json()["id"]
    opened = fetch(settings, "SELECT count(*) AS n FROM room_events WHERE room_id = $1 AND type = 'poll.opened'",
                   f"live:{sid}")[0]["n"]
    assert opened == 3  # the first poll, the keyed one once, the plain one
