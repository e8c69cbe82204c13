"""Who may join which room (close codes), malformed frames, size and rate limits, mute and kick."""
from __future__ import annotations

import asyncio
import time
import json

import httpx
import jwt
import pytest
import websockets

from tests.conftest import Factory, stop_process
from tests.server.conftest import Client, closed_with, make_course, spawn_ready, ws_url


def _pod(server: str, course, members) -> int:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server) as c:
        pid = c.post(f"/api/v1/courses/{course.id}/pods", json={"name": "p"}, headers=course.instructor.h).json()["id"]
        for m in members:
            assert c.post(f"/api/v1/pods/{pid}/members", json={"user_id": m.id},
                          headers=course.instructor.h).status_code == 201
    return pid


def _live(server: str, course) -> int:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server) as c:
        return c.post(f"/api/v1/courses/{course.id}/live", json={"title": "Office hours"},
                      headers=course.instructor.h).json()["id"]


async def test_unauthenticated_4401(server, make: Factory, settings):
    course = make_course(server, make, learners=1)
    code, reason = await closed_with(ws_url(server, course.room))
    assert code == 4401 and "token" in reason
    assert (await closed_with(ws_url(server, course.room, "not.a.jwt")))[0] == 4401
    u = course.learners[0]
    forged = jwt.encode(jwt.decode(u.token, options={"verify_signature": False}), "wrong-secret-wrong-secret-wrong!!",
                        algorithm="HS256")
    assert (await closed_with(ws_url(server, course.room, forged)))[0] == 4401
    # the Authorization header works too
    c = await Client.connect(server, course.room, u)
    await c.close()
    async with websockets.connect(ws_url(server, course.room), additional_headers=u.h) as ws:
        assert json.loads(await ws.recv())["type"] == "welcome"


async def test_forbidden_4403(server, make: Factory):
    course = make_course(server, make, learners=2)
    member, other = course.learners
    pid = _pod(server, course, [member])
    sid = _live(server, course)
    stranger = make.user("learner")  # same tenant, not enrolled
    foreign = Factory(make.settings).user("instructor")  # another tenant's instructor
    bot = make.user("bot")
    admin = make.user("admin")
    cases = [
        (stranger, course.room, 4403), (foreign, course.room, 4403), (bot, course.room, None),
        (admin, course.room, None), (course.instructor, course.room, None), (member, course.room, None),
        (member, f"pod:{pid}", None), (other, f"pod:{pid}", 4403), (course.instructor, f"pod:{pid}", None),
        (bot, f"pod:{pid}", 4403), (foreign, f"pod:{pid}", 4403),
        (member, f"live:{sid}", None), (stranger, f"live:{sid}", 4403), (bot, f"live:{sid}", None),
        (member, "course:999999999", 4403), (member, "nonsense", 4403), (member, f"pod:{pid}0", 4403),
    ]
    for user, room, want in cases:
        if want is None:
            c = await Client.connect(server, room, user)
            assert c.welcome["room"] == room
            await c.close()
        else:
            code, reason = await closed_with(ws_url(server, room, user.token))
            assert code == want, (user.role, room, code, reason)
    assert (await closed_with(ws_url(server, course.room, member.token) + "&after=-1"))[0] == 4400


async def test_malformed_frames_keep_connection(server, make: Factory):
    course = make_course(server, make, learners=1)
    c = await Client.connect(server, course.room, course.learners[0])
    bad = [
        "not json",
        "[1, 2]",
        json.dumps({"type": "no.such.type"}),
        json.dumps({"text": "missing type"}),
        json.dumps({"type": "message.send", "text": 5}),
        json.dumps({"type": "message.send"}),
        json.dumps({"type": "message.send", "text": "x", "extra": 1}),
        json.dumps({"type": "message.edit", "id": "seven", "text": "x"}),
        json.dumps({"type": "typing", "active": "yes"}),
        json.dumps({"type": "resume", "after_seq": -4}),
        json.dumps({"type": "message.send", "text": "   "}),
    ]
    for frame in bad:
        await c.send(frame)
        err = await c.expect("error")
        assert err["code"] == "bad_frame", (frame, err)
        assert err["detail"]
    # a frame refused while decoding still names itself: its ref, else its client_msg_id
    await c.send({"type": "message.edit", "id": 0, "text": "x", "ref": "r1"})
    assert (await c.expect("error"))["ref"] == "r1"
    await c.send({"type": "message.send", "text": 5, "client_msg_id": "c1"})
    assert (await c.expect("error"))["ref"] == "c1"
    await c.ws.send(b"\x00binary")
    assert (await c.expect("error"))["code"] == "bad_frame"
    # a poll vote outside a live room is refused too
    await c.send({"type": "poll.vote", "poll_id": 1, "option": 0})
    assert (await c.expect("error"))["code"] == "bad_frame"
    # still connected and working
    await c.send({"type": "message.send", "text": "still here"})
    assert (await c.expect("message.new"))["text"] == "still here"
    await c.close()


async def test_text_limit_and_oversize_frame(server, make: Factory):
    course = make_course(server, make, learners=1)
    c = await Client.connect(server, course.room, course.learners[0], max_size=None)
    await c.send({"type": "message.send", "text": "x" * 4001, "client_msg_id": "long"})
    err = await c.expect("error")
    assert err["code"] == "too_long" and err["ref"] == "long"
    await c.send({"type": "message.send", "text": "é" * 4000})  # 4,000 characters is fine (8 KB of UTF-8)
    assert len((await c.expect("message.new"))["text"]) == 4000
    # a frame over 64 KiB closes the connection with 1009
    await c.send({"type": "message.send", "text": "x" * (65 * 1024)})
    with pytest.raises(websockets.ConnectionClosed) as info:
        await c.recv(timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_rate_limit_keeps_connection(server, make: Factory):
    course = make_course(server, make, learners=1)
    c = await Client.connect(server, course.room, course.learners[0])
    for i in range(15):  # default burst is 10, refilled at 3/s
        await c.send({"type": "message.send", "text": f"r{i}", "client_msg_id": f"r{i}"})
    got = [await c.recv() for _ in range(15)]
    errors = [f for f in got if f["type"] == "error"]
    sent = [f for f in got if f["type"] == "message.new"]
    assert errors and all(e["code"] == "rate_limited" for e in errors) and len(sent) >= 10
    assert {e["ref"] for e in errors} <= {f"r{i}" for i in range(15)}
    assert all(0 < e["retry_after"] <= 1 for e in errors)  # refilled at 3/s: one token within a third of a second
    await asyncio.sleep(1.0)
    await c.send({"type": "message.send", "text": "later"})
    assert (await c.expect("message.new"))["text"] == "later"
    await c.close()


async def test_mute_and_unmute(server, client, make: Factory):
    course = make_course(server, make, learners=2)
    a, b = course.learners
    ca = await Client.connect(server, course.room, a)
    url = f"/api/v1/rooms/{course.room}/mutes"
    assert client.post(url, json={"user_id": a.id, "seconds": 60}, headers=b.h).status_code == 403
    r = client.post(url, json={"user_id": a.id, "seconds": 60}, headers=course.instructor.h)
    assert r.status_code == 201 and r.json()["user_id"] == a.id
    await ca.send({"type": "message.send", "text": "let me speak", "client_msg_id": "m"})
    err = await ca.expect("error")
    assert err["code"] == "muted" and err["ref"] == "m"
    assert [m["user_id"] for m in client.get(url, headers=course.instructor.h).json()] == [a.id]
    # REST posting honours the mute too
    r = client.post(f"/api/v1/rooms/{course.room}/messages", json={"text": "hi"}, headers=a.h)
    assert r.status_code == 403 and r.json()["code"] == "muted"
    assert client.delete(f"{url}/{a.id}", headers=course.instructor.h).status_code == 204
    await ca.send({"type": "message.send", "text": "thanks"})
    assert (await ca.expect("message.new"))["text"] == "thanks"
    # a short mute ends by itself
    client.post(url, json={"user_id": a.id, "seconds": 1}, headers=course.instructor.h)
    await ca.send({"type": "message.send", "text": "x"})
    assert (await ca.expect("error"))["code"] == "muted"
    await asyncio.sleep(1.2)
    await ca.send({"type": "message.send", "text": "back"})
    assert (await ca.expect("message.new"))["text"] == "back"
    await ca.close()


async def test_kick_closes_sockets_on_every_process(cluster, make: Factory):
    a_url, b_url = cluster.urls
    course = make_course(a_url, make, learners=2)
    bad, good = course.learners
    on_a = await Client.connect(a_url, course.room, bad)
    on_b = await Client.connect(b_url, course.room, bad)
    witness = await Client.connect(b_url, course.room, good)
    with httpx.Client(base_url=a_url) as c:
        assert c.post(f"/api/v1/rooms/{course.room}/kicks", json={"user_id": bad.id},
                      headers=good.h).status_code == 403
        assert c.post(f"/api/v1/rooms/{course.room}/kicks", json={"user_id": bad.id, "seconds": 60},
                      headers=course.instructor.h).status_code == 204
    for cl in (on_a, on_b):
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await cl.recv(timeout=5)
        assert info.value.rcvd.code == 4403 and info.value.rcvd.reason == "kicked"
    # barred from rejoining for the given time; the others stay
    code, reason = await closed_with(ws_url(a_url, course.room, bad.token))
    assert code == 4403 and reason.startswith("kicked until")
    await witness.send({"type": "ping"})
    await witness.expect("pong")
    await witness.close()


async def test_one_send_budget_over_rest_edits_and_processes(server, make: Factory, data_dir):
    """Sends, edits, deletes and REST posts draw on one per-user bucket in Redis, whichever process they reach:
    six REST posts to one server leave four of the default ten for edits on another. (Both at one send per 20 s:
    at the default three a second, a loaded machine refilled the bucket between the posts and the edits.)"""
    course = make_course(server, make, learners=1)
    (a,) = course.learners
    (poster, post_url), (editor, edit_url) = spawn_ready(
        data_dir, [f"rate-{i}-{time.monotonic_ns()}" for i in (1, 2)], {"STUDYHALL_WS_SEND_RATE": "0.05"})
    try:
        c = await Client.connect(edit_url, course.room, a)
        with httpx.Client(base_url=post_url, timeout=30) as h:
            posted = [h.post(f"/api/v1/rooms/{course.room}/messages", json={"text": f"p{i}"}, headers=a.h)
                      for i in range(6)]
        assert [r.status_code for r in posted] == [201] * 6
        for i, r in enumerate(posted):
            await c.send({"type": "message.edit", "id": r.json()["id"], "text": f"edited {i}", "ref": f"e{i}"})
        frames = await c.quiet(1.0)
        refused = [f["ref"] for f in frames if f["type"] == "error" and f["code"] == "rate_limited"]
        edited = [f for f in frames if f["type"] == "message.edited"]
        assert refused and len(edited) + len(refused) == 6 and len(edited) <= 5, (edited, refused)
        await c.close()
    finally:
        stop_process(poster)
        stop_process(editor)
