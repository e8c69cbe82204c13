"""Rooms hold against misuse: typing floods, kicked users over REST, look-alike room ids, odd `after` values."""
from __future__ import annotations

import asyncio

import httpx

from tests.conftest import Factory
from tests.server.conftest import Client, closed_with, make_course, ws_url


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
        assert c.get(f"/api/v1/rooms/{course.room}/messages", headers=course.instructor.h).status_code == 200


async def test_look_alike_room_ids_and_after_values_are_refused(server, make: Factory):
    course = make_course(server, make, learners=1)
    (u,) = course.learners
    with httpx.Client(base_url=server, timeout=30) as c:
        for room in (f"{course.room}%0A", f"course:0{course.id}", f"course:{course.id}%20"):
            r = c.post(f"/api/v1/rooms/{room}/messages", json={"text": "shadow"}, headers=u.h)
            assert r.status_code == 404, (room, r.status_code)
    code, _ = await closed_with(ws_url(server, course.room, u.token) + "&after=%C2%B2")  # a superscript two
    assert code == 4400
