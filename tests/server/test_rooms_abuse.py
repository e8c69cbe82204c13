"""Rooms hold against misuse: typing floods, kicked users over REST, look-alike room ids, odd `after` values."""
from __future__ import annotations

import asyncio
import json

import httpx

from tests.conftest import Factory
from tests.progress_helpers import xp_store  # noqa: F401 - fixture
from tests.server.conftest import Client, RawWs, closed_with, make_course, ws_url


async def test_alternating_typing_frames_do_not_flood_the_room(server, make: Factory):
    course = make_course(server, make, learners=2)
    a, b = course.learners
    ca = await Client.connect(server, course.room, a)
    cb = await Client.connect(server, course.room, b)
    await ca.expect("presence", action="joined")
    for i in range(60):
        await cb.send({"type": "typing", "active": i % 2 == 0})
    await asyncio.sleep(0.5)
    seen = [f for f in await ca.quiet(1.0) if f["type"] == "typing"]
    assert 1 <= len(seen) <= 2, seen  # one start, and the stop after it
    await ca.close()
    await cb.close()


async def test_typing_is_throttled_per_user_not_per_socket_and_never_from_the_muted(server, make: Factory):
    """One user with many sockets multiplied the typing events (the 2 s throttle was per socket); a muted user's
    typing still reached the room; a tab closed mid-sentence left them typing for everyone."""
    course = make_course(server, make, learners=3)
    watcher, typist, muted = course.learners
    w = await Client.connect(server, course.room, watcher)
    tabs = [await Client.connect(server, course.room, typist) for _ in range(6)]
    await w.quiet(0.5)
    for tab in tabs:
        await tab.send({"type": "typing", "active": True})
    await asyncio.sleep(0.5)
    starts = [f for f in await w.quiet(1.0) if f["type"] == "typing" and f["active"]]
    assert len(starts) == 1, starts  # one start for the user, whatever the number of their sockets
    # a start says how long to show it (a process that dies with the typist's socket sends no stop)
    assert starts[0]["expires_in"] == 6.0
    # the tab that announced it closes without a stop: the room hears the stop
    await asyncio.gather(*(t.close() for t in tabs))
    stops = [f for f in await w.quiet(1.0) if f["type"] == "typing" and not f["active"]]
    assert [f["user"]["id"] for f in stops] == [typist.id], stops
    assert "expires_in" not in stops[0]
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.post(f"/api/v1/rooms/{course.room}/mutes", json={"user_id": muted.id, "seconds": 60},
                      headers=course.instructor.h).status_code == 201
    m = await Client.connect(server, course.room, muted)
    await w.quiet(0.5)
    await m.send({"type": "typing", "active": True})
    assert not [f for f in await w.quiet(1.0) if f["type"] == "typing"]
    await m.close()
    await w.close()


async def test_a_kicked_user_is_kept_out_over_rest_too(server, make: Factory):
    course = make_course(server, make, learners=1)
    (bad,) = course.learners
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.post(f"/api/v1/rooms/{course.room}/messages", json={"text": "hi"}, headers=bad.h).status_code == 201
        assert c.post(f"/api/v1/rooms/{course.room}/kicks", json={"user_id": bad.id, "seconds": 60},
                      headers=course.instructor.h).status_code == 204
        r = c.post(f"/api/v1/rooms/{course.room}/messages", json={"text": "still here"}, headers=bad.h)
        assert r.status_code == 403 and r.json()["code"] == "kicked"
        assert c.get(f"/api/v1/rooms/{course.room}/messages", headers=bad.h).status_code == 403
        assert c.get(f"/api/v1/courses/{course.id}/live", headers=bad.h).json()["code"] == "kicked"
        assert c.get(f"/api/v1/rooms/{course.room}/messages", headers=course.instructor.h).status_code == 200


async def test_a_kick_whose_event_was_lost_still_stops_the_open_socket(server, make: Factory, settings):
    """Kicks reached open sockets only as a published event: one lost (its publish failed) left the barred learner
    posting on their open socket. Posting now checks the bar, and the socket closes."""
    from tests.conftest import fetch

    course = make_course(server, make, learners=1)
    (bad,) = course.learners
    sock = await Client.connect(server, course.room, bad)
    await sock.send({"type": "message.send", "text": "hi", "client_msg_id": "k1"})
    await sock.expect("message.new", client_msg_id="k1")
    fetch(settings, "INSERT INTO room_kicks (room_id, user_id, until) VALUES ($1, $2, now() + interval '1 hour')",
          course.room, bad.id)  # the bar stored, its event never published
    await sock.send({"type": "message.send", "text": "still here", "client_msg_id": "k2"})
    err = await sock.expect("error")
    assert err["code"] == "kicked", err
    assert await sock.closed() == (4403, "kicked")
    assert not fetch(settings, "SELECT 1 FROM messages WHERE room_id = $1 AND body = 'still here'", course.room)


async def test_a_socket_whose_removal_was_lost_cannot_delete_or_replay(server, client, make: Factory, settings):
    """A pod member removed (their close event lost) could still erase their messages (evidence a moderator may
    want) and replay the room's whole history with `resume`, as REST would not let them. Both now check access:
    the delete is refused and the socket closes; a resume closes it without a replay."""
    from tests.conftest import fetch

    course = make_course(server, make, learners=2)
    inst, (a, b) = course.instructor, course.learners
    pid = client.post(f"/api/v1/courses/{course.id}/pods", json={"name": "P"}, headers=inst.h).json()["id"]
    for u in (a, b):
        assert client.post(f"/api/v1/pods/{pid}/members", json={"user_id": u.id}, headers=inst.h).status_code == 201
    for what in ("delete", "resume"):
        fetch(settings, "INSERT INTO pod_members (pod_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", pid, a.id)
        ca = await Client.connect(server, f"pod:{pid}", a)
        await ca.send({"type": "message.send", "text": f"mine {what}", "client_msg_id": what})
        mine = await ca.expect("message.new", client_msg_id=what)
        fetch(settings, "DELETE FROM pod_members WHERE pod_id = $1 AND user_id = $2", pid, a.id)  # no event
        if what == "delete":
            await ca.send({"type": "message.delete", "id": mine["id"]})
            assert (await ca.expect("error"))["code"] == "access_revoked"
        else:
            await ca.send({"type": "resume", "after_seq": 0})
        assert await ca.closed() == (4403, "access revoked")
        assert fetch(settings, "SELECT deleted_at FROM messages WHERE id = $1", mine["id"])[0]["deleted_at"] is None
        assert [f["type"] for f in ca.frames].count("welcome") == 1, ca.frames  # the join's, no replay


def test_staff_cannot_be_muted_or_kicked_and_a_bar_can_be_lifted(server, make: Factory):
    """A moderator barred by another (or by themselves) could not reach the room to undo it; a kick's bar is
    listed and lifted like a mute."""
    course = make_course(server, make, learners=1)
    (learner,) = course.learners
    inst, other, admin = course.instructor, make.user("instructor"), make.user("admin")
    room = f"/api/v1/rooms/{course.room}"
    with httpx.Client(base_url=server, timeout=30) as c:
        for target in (inst, other, admin):
            for what, body in (("kicks", {"user_id": target.id, "seconds": 3600}),
                               ("mutes", {"user_id": target.id, "seconds": 3600})):
                r = c.post(f"{room}/{what}", json=body, headers=inst.h)
                assert r.status_code == 403 and r.json()["code"] == "staff", (what, target.role, r.text)
        assert c.get(f"{room}/messages", headers=admin.h).status_code == 200
        assert c.get(f"{room}/messages", headers=inst.h).status_code == 200

        assert c.post(f"{room}/kicks", json={"user_id": learner.id, "seconds": 3600}, headers=inst.h).status_code == 204
        assert c.get(f"{room}/messages", headers=learner.h).status_code == 403
        (bar,) = c.get(f"{room}/kicks", headers=inst.h).json()
        assert bar["user_id"] == learner.id
        assert c.get(f"{room}/kicks", headers=learner.h).status_code == 403
        assert c.delete(f"{room}/kicks/{learner.id}", headers=learner.h).status_code == 403
        assert c.delete(f"{room}/kicks/{learner.id}", headers=admin.h).status_code == 204
        assert c.get(f"{room}/messages", headers=learner.h).status_code == 200
        assert c.get(f"{room}/kicks", headers=inst.h).json() == []
        assert c.delete(f"{room}/kicks/{learner.id}", headers=inst.h).status_code == 404


def test_deletes_over_rest_spend_the_send_budget(server, make: Factory):
    """Deletes over REST share the budget of sends, edits and votes (a script could otherwise flood a room
    with `message.deleted`)."""
    course = make_course(server, make, learners=1)
    (u,) = course.learners
    room = f"/api/v1/rooms/{course.room}"
    with httpx.Client(base_url=server, timeout=30) as c:
        ids = []
        for i in range(200):  # (CI under load once took long enough over 20 sends for the budget to refill)
            r = c.post(f"{room}/messages", json={"text": f"m{i}"}, headers=u.h)
            if r.status_code != 201:
                assert r.status_code == 429
                break
            ids.append(r.json()["id"])
        assert len(ids) < 200  # the budget (burst 10) is spent
        codes = [c.delete(f"{room}/messages/{i}", headers=u.h).status_code for i in ids]
        assert 429 in codes, codes
        assert "retry_after" in c.delete(f"{room}/messages/{ids[-1]}", headers=u.h).json()


async def test_look_alike_room_ids_and_after_values_are_refused(server, make: Factory):
    course = make_course(server, make, learners=1)
    (u,) = course.learners
    with httpx.Client(base_url=server, timeout=30) as c:
        for room in (f"{course.room}%0A", f"course:0{course.id}", f"course:{course.id}%20"):
            r = c.post(f"/api/v1/rooms/{room}/messages", json={"text": "shadow"}, headers=u.h)
            assert r.status_code == 404, (room, r.status_code)
    code, _ = await closed_with(ws_url(server, course.room, u.token) + "&after=%C2%B2")  # a superscript two
    assert code == 4400
    # a seq is 0 to 2**62 on the socket as over REST: 19 digits under the bound were refused; past 64 bits, a
    # resume frame was taken
    for after in (str(2**62 + 1), "1" * 21, ""):  # (tester: empty was taken for no `after`)
        code, _ = await closed_with(ws_url(server, course.room, u.token) + f"&after={after}")
        assert code == 4400, after
    # (tester) given twice, the first `after` won: a client appending its own resumed from the old point; a second
    # token is as ambiguous
    for twice in ("&after=999999&after=1", "&after=1&after=999999", f"&token={u.token}"):
        assert (await closed_with(ws_url(server, course.room, u.token, after=5) + twice))[0] == 4400, twice
    ok = await Client.connect(server, course.room, u, after=10**18)
    await ok.send({"type": "resume", "after_seq": 2**64})
    err = await ok.expect("error")
    assert err["code"] == "bad_frame", err
    await ok.send({"type": "resume", "after_seq": 2**62})
    assert (await ok.expect("welcome"))["room"] == course.room
    await ok.close()


async def test_resume_during_a_replay_streams_on_at_once(server, make: Factory, xp_store):
    """A `resume` while the connection is still replaying a long history: the new stream starts right away
    (the cancelled replay used to keep the new one from starting until the periodic catch-up)."""
    import time

    from store import messages

    pool, redis = xp_store
    course = make_course(server, make, learners=1)
    (a,) = course.learners
    for i in range(1500):
        await messages.post_message(pool, redis, course.room, None, f"m{i}")
    c = await Client.connect(server, course.room, a, after=0)
    await c.send({"type": "resume", "after_seq": 1490})
    deadline = time.monotonic() + 10
    while True:  # skip the first stream's frames up to the second welcome
        f = await c.recv(timeout=10)
        if f["type"] == "welcome" and f.get("last_seq", 0) >= 1500:
            break
        assert time.monotonic() < deadline
    t0 = time.monotonic()
    seqs = []
    while len(seqs) < 10:
        f = await c.recv(timeout=10)
        if f["type"] == "message.new":
            seqs.append(f["seq"])
    assert seqs == list(range(1491, 1501)) and time.monotonic() - t0 < 2.0
    await c.close()


async def test_leaving_a_course_or_pod_closes_open_sockets_there(server, make: Factory):
    """Access is checked at join; removing a learner from the course (or a pod) also closes the sockets they
    still have open there, so they stop reading and posting: in the course room, its pods' rooms and its live
    rooms, ended sessions' included."""
    course = make_course(server, make, learners=2)
    gone, stays = course.learners
    inst = course.instructor.h
    with httpx.Client(base_url=server, timeout=30) as c:
        pod = c.post(f"/api/v1/courses/{course.id}/pods", json={"name": "p"}, headers=inst).json()
        for u in (gone, stays):
            assert c.post(f"/api/v1/pods/{pod['id']}/members", json={"user_id": u.id}, headers=inst).status_code == 201
        sid = c.post(f"/api/v1/courses/{course.id}/live", json={"title": "Lab"}, headers=inst).json()["id"]
        assert c.post(f"/api/v1/live/{sid}/start", headers=inst).status_code == 200
        assert c.post(f"/api/v1/live/{sid}/end", headers=inst).status_code == 200
    in_course = await Client.connect(server, course.room, gone)
    in_its_pod = await Client.connect(server, f"pod:{pod['id']}", gone)
    in_ended_live = await Client.connect(server, f"live:{sid}", gone)
    in_pod = await Client.connect(server, f"pod:{pod['id']}", stays)
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.delete(f"/api/v1/courses/{course.id}/enrollments/{gone.id}",
                        headers=course.instructor.h).status_code == 204
        assert c.delete(f"/api/v1/pods/{pod['id']}/members/{stays.id}", headers=stays.h).status_code == 204
    for cl in (in_course, in_its_pod, in_ended_live, in_pod):
        assert await cl.closed() == (4403, "access revoked")
    code, _ = await closed_with(ws_url(server, course.room, gone.token))
    assert code == 4403


async def test_a_bot_taken_out_of_a_pod_or_its_course_leaves_the_pod_room_only(server, make: Factory):
    """A bot (a Discord bridge, say) joins pod rooms as an enrolled member, like a learner: taken out of the pod,
    or of the course, its socket in the pod room closes; it stays in the course room, which bots join by role."""
    course = make_course(server, make, learners=1)
    inst = course.instructor.h
    bots = [make.user("bot"), make.user("bot")]
    with httpx.Client(base_url=server, timeout=30) as c:
        pod = c.post(f"/api/v1/courses/{course.id}/pods", json={"name": "p"}, headers=inst).json()["id"]
        for b in bots:
            assert c.post(f"/api/v1/courses/{course.id}/enrollments", json={"user_id": b.id},
                          headers=inst).status_code == 201
            assert c.post(f"/api/v1/pods/{pod}/members", json={"user_id": b.id}, headers=inst).status_code == 201
    pod_socks = [await Client.connect(server, f"pod:{pod}", b) for b in bots]
    course_sock = await Client.connect(server, course.room, bots[0])
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.delete(f"/api/v1/courses/{course.id}/enrollments/{bots[0].id}", headers=inst).status_code == 204
        assert c.delete(f"/api/v1/pods/{pod}/members/{bots[1].id}", headers=inst).status_code == 204
    for cl in pod_socks:
        assert await cl.closed() == (4403, "access revoked")
    learner = await Client.connect(server, course.room, course.learners[0])
    await learner.send({"type": "message.send", "text": "still there?", "client_msg_id": "m1"})
    assert (await course_sock.expect("message.new"))["text"] == "still there?"
    await learner.close()
    await course_sock.close()


async def test_deleting_a_pod_or_course_closes_the_sockets_in_its_rooms(server, make: Factory):
    """Sockets left open in a deleted room read nothing more and every send failed (`internal`): deleting a pod
    closes its room's sockets, deleting a course those of the course, its pods and its live sessions, staff's
    included (4403 `room deleted`)."""
    course = make_course(server, make, learners=1)
    (u,) = course.learners
    inst = course.instructor
    with httpx.Client(base_url=server, timeout=30) as c:
        pods = [c.post(f"/api/v1/courses/{course.id}/pods", json={"name": n}, headers=inst.h).json() for n in "ab"]
        for pod in pods:
            assert c.post(f"/api/v1/pods/{pod['id']}/members", json={"user_id": u.id},
                          headers=inst.h).status_code == 201
        sid = c.post(f"/api/v1/courses/{course.id}/live", json={"title": "Lab"}, headers=inst.h).json()["id"]
        assert c.post(f"/api/v1/live/{sid}/start", headers=inst.h).status_code == 200
    first_pod = await Client.connect(server, f"pod:{pods[0]['id']}", u)
    rest = [await Client.connect(server, room, who) for room, who in (
        (f"pod:{pods[1]['id']}", u), (course.room, u), (course.room, inst), (f"live:{sid}", u))]

    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.delete(f"/api/v1/pods/{pods[0]['id']}", headers=inst.h).status_code == 204
        assert await first_pod.closed() == (4403, "room deleted")
        await rest[0].send({"type": "message.send", "text": "still open"})  # the other rooms are untouched
        await rest[0].expect("message.new")
        assert c.delete(f"/api/v1/courses/{course.id}", headers=inst.h).status_code == 204
    for cl in rest:
        assert await cl.closed() == (4403, "room deleted")


def test_a_learner_who_left_the_course_is_not_listed_in_its_pods_and_may_leave_them(server, make: Factory):
    course = make_course(server, make, learners=2)
    gone, stays = course.learners
    inst = course.instructor.h
    with httpx.Client(base_url=server, timeout=30) as c:
        pod = c.post(f"/api/v1/courses/{course.id}/pods", json={"name": "p"}, headers=inst).json()
        for u in (gone, stays):
            assert c.post(f"/api/v1/pods/{pod['id']}/members", json={"user_id": u.id}, headers=inst).status_code == 201
        assert c.delete(f"/api/v1/courses/{course.id}/enrollments/{gone.id}", headers=gone.h).status_code == 204
        members = c.get(f"/api/v1/pods/{pod['id']}/members", headers=stays.h).json()
        assert [m["user_id"] for m in members] == [stays.id]  # the pod's room as its members see it
        members = c.get(f"/api/v1/pods/{pod['id']}/members", headers=inst).json()  # staff: who holds a place
        assert [(m["user_id"], m["departed"]) for m in members] == [(gone.id, True), (stays.id, False)]
        (listed,) = c.get(f"/api/v1/courses/{course.id}/pods", headers=inst).json()
        assert listed["members"] == 1 and listed["places_taken"] == 2
        # they may still drop the membership that would come back with a re-enrolment
        assert c.delete(f"/api/v1/pods/{pod['id']}/members/{gone.id}", headers=gone.h).status_code == 204
        assert c.post(f"/api/v1/courses/{course.id}/enrollments", json={"user_id": gone.id},
                      headers=inst).status_code == 201
        assert [m["user_id"] for m in c.get(f"/api/v1/pods/{pod['id']}/members", headers=inst).json()] == [stays.id]
        assert c.delete(f"/api/v1/pods/{pod['id']}/members/{gone.id}", headers=gone.h).status_code == 404


async def test_work_racing_a_course_deletion_is_404_not_500(server, make: Factory):
    """Enrolments, pods and members written while the course goes (the foreign key refuses them) are 404s."""
    inst = make.user("instructor")
    learners = [make.user("learner") for _ in range(4)]
    codes: list[int] = []
    async with httpx.AsyncClient(base_url=server, timeout=30) as c:
        for _ in range(4):
            cid = (await c.post("/api/v1/courses", json={"title": "doomed", "published": True},
                                headers=inst.h)).json()["id"]
            pod = (await c.post(f"/api/v1/courses/{cid}/pods", json={"name": "p"}, headers=inst.h)).json()
            await c.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": learners[0].id}, headers=inst.h)
            jobs = [c.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": u.id}, headers=u.h)
                    for u in learners[1:]]
            jobs += [c.post(f"/api/v1/courses/{cid}/pods", json={"name": f"q{i}"}, headers=inst.h) for i in range(3)]
            jobs += [c.post(f"/api/v1/pods/{pod['id']}/members", json={"user_id": learners[0].id}, headers=inst.h)]
            jobs.insert(3, c.delete(f"/api/v1/courses/{cid}", headers=inst.h))
            codes += [(r.request.method, r.request.url.path, r.status_code, r.text[:80])
                      for r in await asyncio.gather(*jobs)]
    assert {c[2] for c in codes} <= {200, 201, 204, 404}, [c for c in codes if c[2] not in (200, 201, 204, 404)]


async def test_revoking_a_bot_token_closes_its_open_sockets(server, make: Factory):
    """Tokens are checked when a socket opens; revoking one also closes the sockets opened with it (4401)."""
    from tests.conftest import User

    course = make_course(server, make, learners=0)
    inst = course.instructor
    with httpx.Client(base_url=server, timeout=30) as c:
        bot = c.post("/api/v1/bots", json={"name": f"bot-{course.id}", "label": "discord"}, headers=inst.h).json()
    user = User(id=bot["user_id"], tenant_id=inst.tenant_id, name=bot["name"], role="bot", token=bot["token"])
    await _ending_closes_only_their_sockets(server, course, user, f"/api/v1/tokens/{bot['token_id']}",
                                            "token revoked")


async def test_signing_a_person_out_everywhere_closes_their_open_sockets(server, make: Factory):
    course = make_course(server, make, learners=1)
    (learner,) = course.learners
    await _ending_closes_only_their_sockets(server, course, learner, f"/api/v1/users/{learner.id}/tokens",
                                            "token ended")


async def _ending_closes_only_their_sockets(server: str, course, user, delete_url: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    """`user`'s socket closes with 4401 `reason` once the instructor DELETEs `delete_url`; the instructor's stays."""
    inst = course.instructor
    sock = await Client.connect(server, course.room, user)
    watcher = await Client.connect(server, course.room, inst)
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.delete(delete_url, headers=inst.h).status_code == 204
    assert await sock.closed() == (4401, reason)
    await watcher.send({"type": "ping", "ref": "still"})
    await watcher.expect("pong")  # the instructor's own socket stays
    await watcher.close()


async def test_a_socket_closes_when_its_token_expires(server, make: Factory, settings):
    import time

    from server.auth import issue_token
    from tests.conftest import User

    course = make_course(server, make, learners=1)
    (u,) = course.learners
    short = User(id=u.id, tenant_id=u.tenant_id, name=u.name, role=u.role,
                 token=issue_token(settings.secret, u.id, u.tenant_id, u.role, ttl_s=2))
    c = await Client.connect(server, course.room, short)
    t0 = time.monotonic()
    assert await c.closed(timeout=10) == (4401, "token expired")
    assert time.monotonic() - t0 < 6


def test_a_socket_opening_while_its_token_is_revoked_is_closed_once_attached(server, make: Factory, settings):
    """The token is read when the socket opens; if it is revoked before the socket receives revocations, the
    check made once it is attached closes it (4401 `token revoked`), like a kick or a removal (4403)."""
    from server.auth import AuthUser
    from server.realtime.standing import still_allowed
    from store.db import create_pool
    from tests.conftest import run_sync

    course = make_course(server, make, learners=1)
    inst = course.instructor
    with httpx.Client(base_url=server, timeout=30) as c:
        bot = c.post("/api/v1/bots", json={"name": f"bot-{course.id}", "label": "discord"}, headers=inst.h).json()
        assert c.delete(f"/api/v1/tokens/{bot['token_id']}", headers=inst.h).status_code == 204
        assert c.post(f"/api/v1/rooms/{course.room}/kicks", json={"user_id": course.learners[0].id, "seconds": 60},
                      headers=inst.h).status_code == 204
    as_bot = AuthUser(id=bot["user_id"], tenant_id=inst.tenant_id, tenant="", name=bot["name"], role="bot",
                      token_id=bot["token_id"])
    kicked = course.learners[0]
    as_kicked = AuthUser(id=kicked.id, tenant_id=kicked.tenant_id, tenant="", name=kicked.name, role="learner")
    as_staff = AuthUser(id=inst.id, tenant_id=inst.tenant_id, tenant="", name=inst.name, role="instructor")

    async def go() -> list:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            async with pool.acquire() as db:
                return [await still_allowed(db, course.room, u) for u in (as_bot, as_kicked, as_staff)]
        finally:
            await pool.close()

    assert run_sync(go()) == [(4401, "token revoked"), (4403, "kicked"), None]


async def test_a_connection_flooding_frames_is_told_then_closed(server, make: Factory):
    """Pings, typing or garbage cost the server a frame each: past the frame budget they are dropped unread with
    one `rate_limited` a second, and a connection that keeps on is closed (4429), while others are unaffected."""
    course = make_course(server, make, learners=2)
    a, b = course.learners
    flood = await Client.connect(server, course.room, a)
    calm = await Client.connect(server, course.room, b)
    for i in range(100):
        await flood.ws.send('{"type": "ping", "ref": "p%d"}' % i)
    err = await flood.expect("error", timeout=5)
    assert err["code"] == "rate_limited" and err["retry_after"] > 0
    for _ in range(400):
        await flood.ws.send("not json")
    assert await flood.closed() == (4429, "too many frames")
    await calm.send({"type": "ping", "ref": "fine"})
    await calm.expect("pong", ref="fine")
    # (tester) a dropped resume is named: its client ignores sequenced events until the welcome it asked for
    for _ in range(80):
        await calm.ws.send('{"type": "typing", "active": true}')
    await calm.send({"type": "resume", "after_seq": 0, "ref": "my-resume"})
    err = await calm.expect("error", ref="my-resume", timeout=5)
    assert err["code"] == "rate_limited" and "not handled" in err["detail"], err
    await asyncio.sleep(4)  # (the budget refills)
    for _ in range(75):  # (review) and one without a ref, as the README shows it: named "resume"
        await calm.ws.send('{"type": "typing", "active": true}')
    await calm.send({"type": "resume", "after_seq": 0})
    err = await calm.expect("error", ref="resume", timeout=5)
    assert err["code"] == "rate_limited" and "not handled" in err["detail"], err
    await calm.close()


async def test_a_bridge_has_a_bots_frame_budget(server, make: Factory):
    """(Tester) a bot's socket had a person's frame budget (60 at once, 20 a second): a bridge posting within its
    send budget (BOT_SENDS times a person's) lost frames and was closed with 4429."""
    course = make_course(server, make, learners=0)
    bot = make.user("bot")
    bridge = await Client.connect(server, course.room, bot)
    for i in range(150):
        await bridge.ws.send('{"type": "ping", "ref": "p%d"}' % i)
    for i in range(150):
        got = await bridge.recv()
        while got["type"] not in ("pong", "error"):
            got = await bridge.recv()
        assert got["type"] == "pong" and got["ref"] == f"p{i}", got
    await bridge.close()


async def test_sends_dropped_over_the_frame_budget_are_each_named(server, make: Factory, settings):
    """Typing frames spent the budget, then sends were dropped with one unnamed `rate_limited` for all: the client
    could not tell which of its messages were lost. Each dropped send is now named; typing is dropped quietly."""
    from tests.conftest import fetch

    course = make_course(server, make, learners=1)
    (a,) = course.learners
    sock = await Client.connect(server, course.room, a)
    # the burst (60) spent and 40 more, short of the close at 60 more: the sends still find no token after two
    # seconds of refill at 20 a second (59 once let a loaded CI machine's server refill enough for all six)
    for _ in range(100):
        await sock.ws.send('{"type": "typing", "active": true}')
    for i in range(6):
        await sock.send({"type": "message.send", "text": f"line {i}", "client_msg_id": f"l{i}"})
    got = {f["client_msg_id"] for f in await sock.quiet(1.5) if f["type"] == "message.new"}
    named = {f["ref"] for f in sock.frames if f["type"] == "error" and f["code"] == "rate_limited" and f.get("ref")}
    assert named and got | named == {f"l{i}" for i in range(6)} and not got & named, (got, named)
    stored = {r["client_msg_id"] for r in fetch(settings, "SELECT client_msg_id FROM messages WHERE room_id = $1",
                                                course.room)}
    assert stored == got
    await sock.close()


async def test_a_send_retried_after_its_retry_after_is_taken(server, make: Factory):
    """`retry_after` was one frame short (the dropped frame had taken a token too): a client that waited exactly
    that long was dropped again, and again."""
    course = make_course(server, make, learners=1)
    (a,) = course.learners
    sock = await Client.connect(server, course.room, a)
    for _ in range(70):  # past the burst: typing is dropped quietly
        await sock.ws.send('{"type": "typing", "active": true}')
    await sock.send({"type": "message.send", "text": "hello", "client_msg_id": "late1"})
    err = await sock.expect("error", timeout=5, ref="late1")
    assert err["code"] == "rate_limited" and err["retry_after"] > 0
    await asyncio.sleep(err["retry_after"])
    await sock.send({"type": "message.send", "text": "hello", "client_msg_id": "late1"})
    got = await sock.expect("message.new", timeout=5, client_msg_id="late1")
    assert got["text"] == "hello"
    await sock.close()


async def test_pings_are_answered_within_a_rate_and_a_ping_flood_is_closed_1008(server, make: Factory):
    """Websocket pings are answered below the app, so its frame budget does not see them: a keepalive's worth
    (a burst of 20, then two a second) is answered; a flood is closed with 1008, whether or not
    the peer reads (one that never read made the server hold every pong it was sent)."""
    from server.realtime.transport import PING_BURST

    course = make_course(server, make, learners=2)
    a, b = course.learners
    calm = await RawWs.connect(ws_url(server, course.room, a.token))
    assert (await calm.frame())[0] == 1  # the welcome
    calm.send_frame(9, b"k", times=PING_BURST)
    pongs = 0
    while pongs < PING_BURST:
        opcode, payload = await calm.frame()
        if opcode == 10:
            assert payload == b"k"
            pongs += 1
    await asyncio.sleep(1)
    calm.send_frame(9, b"again")
    while (frame := await calm.frame())[0] != 10:
        pass
    assert frame == (10, b"again")

    flood = await RawWs.connect(ws_url(server, course.room, b.token))
    flood.send_frame(9, b"p" * 125, times=10_000)  # 1.3 MB of pings in one go, nothing read yet
    await asyncio.sleep(0.5)
    frames = []
    while (frame := await flood.frame())[0] != 8:
        frames.append(frame[0])
    assert int.from_bytes(frame[1][:2], "big") == 1008 and frame[1][2:] == b"too many pings"
    assert frames.count(10) <= PING_BURST  # a read over the budget is not answered at all
    calm.close()
    flood.close()


async def test_resume_is_at_most_once_a_second_per_connection(server, make: Factory):
    course = make_course(server, make, learners=1)
    c = await Client.connect(server, course.room, course.learners[0])
    await c.send({"type": "resume", "after_seq": 0, "ref": "r1"})
    await c.expect("welcome")
    await c.send({"type": "resume", "after_seq": 0, "ref": "r2"})
    err = await c.expect("error")
    assert err["code"] == "rate_limited" and err["ref"] == "r2" and 0 < err["retry_after"] <= 1
    await asyncio.sleep(err["retry_after"])
    await c.send({"type": "resume", "after_seq": 0, "ref": "r3"})
    await c.expect("welcome")
    # (tester) one without a ref is named "resume", as a dropped one is: its client waits for a welcome
    await c.send({"type": "resume", "after_seq": 0})
    err = await c.expect("error")
    assert err["code"] == "rate_limited" and err["ref"] == "resume", err
    # (review) and a malformed one too, refused as bad_frame
    await c.send({"type": "resume", "after_seq": "x"})
    err = await c.expect("error")
    assert err["code"] == "bad_frame" and err["ref"] == "resume", err
    await c.close()


async def test_resumes_come_out_of_the_users_send_budget(server, make: Factory, settings):
    """Each resume re-reads a batch of events from Postgres; one a second per socket let a user's 50 sockets
    re-read 50 batches a second. Resumes now also take from the user's send budget, shared by their sockets."""
    course = make_course(server, make, learners=1)
    (a,) = course.learners
    sockets = [await Client.connect(server, course.room, a) for _ in range(settings.ws_send_burst + 5)]
    try:
        for i, c in enumerate(sockets):
            await c.send({"type": "resume", "after_seq": 0, "ref": f"r{i}"})
        got = []
        for c in sockets:
            f = await c.recv()
            while f["type"] not in ("welcome", "error"):
                f = await c.recv()
            got.append(f)
        refused = [f for f in got if f["type"] == "error"]
        assert refused and all(e["code"] == "rate_limited" and "resumes" in e["detail"] for e in refused), got
        assert len(got) - len(refused) >= settings.ws_send_burst  # (the budget refills meanwhile)
    finally:
        for c in sockets:
            await c.close()


async def test_one_user_opens_a_bounded_number_of_sockets(server, make: Factory, settings):
    course = make_course(server, make, learners=1)
    (a,) = course.learners
    limit = settings.ws_max_per_user
    opened = [await Client.connect(server, course.room, a) for _ in range(limit)]
    code, reason = await closed_with(ws_url(server, course.room, a.token))
    assert code == 4429 and "too many open sockets" in reason
    await opened.pop().close()
    await asyncio.sleep(0.2)
    opened.append(await Client.connect(server, course.room, a))  # one closed: one may open
    for c in opened:
        await c.close()


async def test_a_user_reconnecting_in_a_loop_is_refused_4429_before_any_database_work(server, make: Factory, settings):
    """Opening sockets is a token bucket per user over all processes (STUDYHALL_WS_CONNECT_RATE / _BURST): the
    burst covers a user filling every socket they may hold at once; a client reconnecting in a loop is refused
    with 4429 and the time to wait, others are unaffected, and after that wait it may connect again."""
    import websockets

    course = make_course(server, make, learners=2)
    a, b = course.learners
    url = ws_url(server, course.room, a.token)
    refused = None
    for _ in range(settings.ws_connect_burst + 20):
        async with websockets.connect(url) as ws:
            try:
                await asyncio.wait_for(ws.recv(), 5)  # the welcome, or the refusal
            except websockets.ConnectionClosed as exc:
                refused = (exc.rcvd.code, exc.rcvd.reason)
                break
    assert refused is not None and refused[0] == 4429 and refused[1].startswith("too many connects: retry in ")
    wait = float(refused[1].removeprefix("too many connects: retry in ").removesuffix(" s"))
    assert 0 < wait <= 1 / settings.ws_connect_rate + 0.1
    other = await Client.connect(server, course.room, b)
    await other.close()
    await asyncio.sleep(wait)
    again = await Client.connect(server, course.room, a)
    await again.close()


async def test_a_text_frame_that_is_not_utf8_closes_1007_without_an_error_in_the_log(server, make: Factory, data_dir):
    """Each one logged an ERROR with a traceback (uvicorn's): any client could fill the error log with them."""
    course = make_course(server, make, learners=1)
    log = data_dir / "server.log"
    before = log.stat().st_size
    for _ in range(3):
        ws = await RawWs.connect(ws_url(server, course.room, course.learners[0].token))
        assert (await ws.frame())[0] == 1  # the welcome
        ws.send_frame(1, b'{"type":"ping","ref":"\xff\xfe"}')
        while (frame := await ws.frame())[0] != 8:
            pass
        assert int.from_bytes(frame[1][:2], "big") == 1007
        ws.close()
    await asyncio.sleep(0.5)
    with open(log, "rb") as f:
        f.seek(before)
        lines = [line for line in f.read().decode(errors="replace").splitlines() if "UTF-8" in line]
    assert not any('"level": "ERROR"' in line or "Traceback" in line for line in lines), lines


async def _close_codes_until_4429(url: str, tries: int) -> list[int]:
    """Open sockets at `url` one after another: the close codes each got, up to the first 4429."""
    import websockets

    codes = []
    for _ in range(tries):
        async with websockets.connect(url) as ws:
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except websockets.ConnectionClosed as exc:
                codes.append(exc.rcvd.code)
                if exc.rcvd.code == 4429:
                    break
    return codes


async def test_a_revoked_bot_tokens_reconnect_loop_is_refused_4429_too(server, make: Factory, settings):
    """(Tester) bots were not limited at all: a bridge retrying with its revoked token cost a database lookup per try,
    550 a second. Theirs is a larger budget (hub.BOT_CONNECTS times a person's), but one."""
    import httpx
    import websockets

    from server.realtime.hub import BOT_CONNECTS

    course = make_course(server, make, learners=1)
    with httpx.Client(base_url=server, timeout=30) as http:
        bot = http.post("/api/v1/bots", json={"name": f"bridge-{course.id}"}, headers=course.instructor.h).json()
        assert http.delete(f"/api/v1/tokens/{bot['token_id']}", headers=course.instructor.h).status_code == 204
    # (the bucket refills meanwhile)
    codes = await _close_codes_until_4429(ws_url(server, course.room, bot["token"]),
                                          settings.ws_connect_burst * BOT_CONNECTS * 2)
    assert codes[-1] == 4429 and codes[0] == 4401, codes[:3]
    assert len(codes) > settings.ws_connect_burst  # more than a person's burst: a bridge reconnecting its rooms
    # (tester) the budget spent before the database is the token's: the bridge's new token joins at once (the
    # dead token's loop held the bot's whole budget, so its owner was locked out of every room)
    with httpx.Client(base_url=server, timeout=30) as http:
        fresh = http.post("/api/v1/bots", json={"name": f"bridge-{course.id}"}, headers=course.instructor.h).json()
    assert fresh["user_id"] == bot["user_id"] and fresh["token"] != bot["token"], fresh
    ok = await websockets.connect(ws_url(server, course.room, fresh["token"]))
    assert json.loads(await asyncio.wait_for(ok.recv(), 5))["type"] == "welcome"
    await ok.close()


async def test_a_signed_out_token_cannot_lock_its_user_out(server, make: Factory, settings):
    """(Tester) whoever held a cancelled token (signed out everywhere) kept spending its user's connect budget: the
    user's new token was refused 4429 in every room until the old one expired (a week)."""
    import httpx
    import websockets

    course = make_course(server, make, learners=1)
    (a,) = course.learners
    with httpx.Client(base_url=server, timeout=30) as http:
        assert http.delete(f"/api/v1/users/{a.id}/tokens", headers=course.instructor.h).status_code == 204
        new = http.post(f"/api/v1/users/{a.id}/tokens", headers=course.instructor.h).json()["token"]
    codes = await _close_codes_until_4429(ws_url(server, course.room, a.token), settings.ws_connect_burst + 20)
    assert codes[0] == 4401 and codes[-1] == 4429, codes[:3]
    async with websockets.connect(ws_url(server, course.room, new)) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "welcome"


async def test_a_handshake_waiting_on_postgres_is_told_to_come_back_before_a_clients_timeout(server, make: Factory,
                                                                                          settings):
    """(Tester) with Postgres not answering, opening a socket was held for about twice STUDYHALL_DB_TIMEOUT_S (30 s):
    a client's usual 10 s handshake timeout gave up without a close code. Its checks are bounded (CONNECT_DB_S): a
    1013 to come back. (Here the room's row is held by an open transaction, so its creation waits.)"""
    import time

    from server.realtime.socket import CONNECT_DB_S
    from store.db import create_pool

    course = make_course(server, make, learners=1)
    (u,) = course.learners
    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as db:
            held = db.transaction()
            await held.start()
            try:
                await db.execute("DELETE FROM rooms WHERE id = $1", course.room)
                await db.execute("INSERT INTO rooms (id, kind, course_id) VALUES ($1, 'course', $2)", course.room,
                                 course.id)
                t0 = time.monotonic()
                code, _ = await closed_with(ws_url(server, course.room, u.token), timeout=20, open_timeout=20)
                took = time.monotonic() - t0
            finally:
                await held.rollback()  # (the room is as it was)
    finally:
        await pool.close()
    assert code == 1013 and took < CONNECT_DB_S + 3, (code, took)
    ok = await Client.connect(server, course.room, u)
    await ok.close()
