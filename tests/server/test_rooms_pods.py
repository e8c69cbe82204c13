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
    # (Tester) a name is read as user names are: a bidi override or a zero-width space made look-alikes
    r = client.post(url, json={"name": "Group\u202e B\u200b "}, headers=inst.h)
    assert r.status_code == 201 and r.json()["name"] == "Group B", r.text
    assert client.delete(f"/api/v1/pods/{r.json()['id']}", headers=inst.h).status_code == 204
    assert client.post(url, json={"name": "\u200b\u202e"}, headers=inst.h).status_code == 400

    members = f"/api/v1/pods/{pid}/members"
    stranger = make.user("learner")
    r = client.post(members, json={"user_id": stranger.id}, headers=inst.h)
    assert r.status_code == 409 and r.json()["code"] == "not_enrolled" and r.json()["field"] == "user_id"
    # staff were told "not enrolled", which they cannot fix (enrolling them is refused too)
    r = client.post(members, json={"user_id": inst.id}, headers=inst.h)
    assert r.status_code == 400 and "staff" in r.json()["message"] and r.json()["field"] == "user_id", r.text
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


async def test_a_member_whose_removal_never_reached_the_socket_cannot_post(server, client, make: Factory, settings):
    """Removing a learner from a pod (or the course) closes their sockets through Redis; should that message be
    lost, the socket stayed open and posts went on (only kicks and mutes were checked at post time). Now a post or
    an edit from someone who left is refused (`access_revoked`) and the socket closes then."""
    from tests.conftest import fetch

    course = make_course(server, make, learners=1)
    inst, (a,) = course.instructor, course.learners
    pid = client.post(f"/api/v1/courses/{course.id}/pods", json={"name": "P"}, headers=inst.h).json()["id"]
    assert client.post(f"/api/v1/pods/{pid}/members", json={"user_id": a.id}, headers=inst.h).status_code == 201
    c = await Client.connect(server, f"pod:{pid}", a)
    try:
        await c.send({"type": "message.send", "text": "before", "client_msg_id": "b1"})
        mine = await c.expect("message.new")
        fetch(settings, "DELETE FROM pod_members WHERE pod_id = $1 AND user_id = $2", pid, a.id)  # no close sent
        await c.send({"type": "message.edit", "id": mine["id"], "text": "edited"})
        err = await c.expect("error")
        assert err["code"] == "access_revoked", err
        assert await c.closed() == (4403, "access revoked")
    finally:
        await c.close()
    fetch(settings, "INSERT INTO pod_members (pod_id, user_id) VALUES ($1, $2)", pid, a.id)
    c = await Client.connect(server, f"pod:{pid}", a)
    try:
        fetch(settings, "DELETE FROM enrollments WHERE course_id = $1 AND user_id = $2", course.id, a.id)
        await c.send({"type": "message.send", "text": "after", "client_msg_id": "a1"})
        err = await c.expect("error")
        assert err["code"] == "access_revoked", err
        assert await c.closed() == (4403, "access revoked")
    finally:
        await c.close()
    texts = [m["text"] for m in fetch(settings, "SELECT body AS text FROM messages WHERE room_id = $1", f"pod:{pid}")]
    assert texts == ["before"]


def test_access_revoked_is_a_403_over_rest():
    """A REST post or edit that loses the race with a removal is refused as a kick is (it was a 400)."""
    from server.api.rooms import refused
    from store.messages import ACCESS_REVOKED, Refused

    err = refused(Refused(ACCESS_REVOKED, "you no longer have access to this room"))
    assert err.status_code == 403 and err.code == "access_revoked"
