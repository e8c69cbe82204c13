"""Pods over REST, and how membership opens and closes the pod's room."""
from __future__ import annotations

from tests.conftest import Factory
from tests.server.conftest import Client, closed_with, make_course, ws_url


async def test_pods(server, client, make: Factory):
    course = make_course(server, make, learners=2)
    inst, (a, b) = course.instructor, course.learners
    url = f"/api/v1/courses/{course.id}/pods"
    assert client.post(url, json={"name": "Group A"}, headers=a.h).status_code == 403
    assert client.post(url, json={"name": ""}, headers=inst.h).status_code == 400
    foreign = Factory(make.settings).user("instructor")
    assert client.post(url, json={"name": "x"}, headers=foreign.h).status_code == 404
    r = client.post(url, json={"name": "Group A"}, headers=inst.h)
    assert r.status_code == 201
    pod = r.json()
    pid = pod["id"]
    assert pod["room"] == f"pod:{pid}" and pod["course_id"] == course.id

    members = f"/api/v1/pods/{pid}/members"
    stranger = make.user("learner")
    r = client.post(members, json={"user_id": stranger.id}, headers=inst.h)
    assert r.status_code == 409 and r.json()["code"] == "not_enrolled" and r.json()["field"] == "user_id"
    assert client.post(members, json={"user_id": a.id}, headers=a.h).status_code == 403
    assert client.post(members, json={"user_id": a.id}, headers=inst.h).status_code == 201
    assert client.post(members, json={"user_id": a.id}, headers=inst.h).status_code == 200
    assert client.post(members, json={"user_id": foreign.id}, headers=inst.h).status_code == 404

    assert [p["id"] for p in client.get("/api/v1/me/pods", headers=a.h).json()] == [pid]
    assert client.get("/api/v1/me/pods", headers=b.h).json() == []
    assert [m["user_id"] for m in client.get(members, headers=a.h).json()] == [a.id]
    assert client.get(members, headers=b.h).status_code == 404  # not a member: not visible
    assert [p["id"] for p in client.get(url, headers=inst.h).json()] == [pid]
    assert client.get(url, headers=b.h).json() == []
    assert client.get(f"/api/v1/pods/{pid}", headers=foreign.h).status_code == 404

    c = await Client.connect(server, f"pod:{pid}", a)
    await c.close()
    assert (await closed_with(ws_url(server, f"pod:{pid}", b.token)))[0] == 4403
    # a learner may leave a pod, not remove others
    assert client.post(members, json={"user_id": b.id}, headers=inst.h).status_code == 201
    assert client.delete(f"{members}/{b.id}", headers=a.h).status_code == 403
    assert client.delete(f"{members}/{a.id}", headers=a.h).status_code == 204
    assert (await closed_with(ws_url(server, f"pod:{pid}", a.token)))[0] == 4403
    # unenrolled members lose the pod too
    assert client.delete(f"/api/v1/courses/{course.id}/enrollments/{b.id}", headers=inst.h).status_code == 204
    assert (await closed_with(ws_url(server, f"pod:{pid}", b.token)))[0] == 4403
    assert client.get("/api/v1/me/pods", headers=b.h).json() == []
    assert client.delete(f"/api/v1/pods/{pid}", headers=inst.h).status_code == 204
    assert client.get(f"/api/v1/pods/{pid}", headers=inst.h).status_code == 404
