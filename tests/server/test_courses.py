"""Courses and enrollments over real HTTP, including bad bodies (never a 500)."""
from __future__ import annotations

import httpx
import pytest

from tests.conftest import Factory, User, fetch, stop_process


def test_course_crud(client, make: Factory):
    inst = make.user("instructor")
    r = client.post("/api/v1/courses", json={"title": "  Linear Algebra ", "description": "Strang"}, headers=inst.h)
    assert r.status_code == 201
    course = r.json()
    assert course["title"] == "Linear Algebra" and course["published"] is False and course["owner_id"] == inst.id
    cid = course["id"]
    # a colleague of the same tenant sees and edits it
    colleague = make.user("instructor")
    r = client.patch(f"/api/v1/courses/{cid}", json={"published": True, "price_cents": 0}, headers=colleague.h)
    assert r.status_code == 200 and r.json()["published"] is True and r.json()["title"] == "Linear Algebra"
    listed = client.get("/api/v1/courses", headers=inst.h).json()
    assert [c["id"] for c in listed["items"]] == [cid]
    assert client.delete(f"/api/v1/courses/{cid}", headers=inst.h).status_code == 204
    assert client.get(f"/api/v1/courses/{cid}", headers=inst.h).status_code == 404
    assert client.delete(f"/api/v1/courses/{cid}", headers=inst.h).status_code == 404


def test_published_free_course_visible_and_self_enroll(client, make: Factory):
    inst, learner = make.user("instructor"), make.user("learner")
    free = client.post("/api/v1/courses", json={"title": "Free", "published": True}, headers=inst.h).json()
    paid = client.post("/api/v1/courses", json={"title": "Paid", "published": True, "price_cents": 1900},
                       headers=inst.h).json()
    draft = client.post("/api/v1/courses", json={"title": "Draft"}, headers=inst.h).json()
    # the catalog: published courses, free or paid (a paid one says so), not drafts
    seen = {c["id"]: (c["enrolled"], c["payment_required"])
            for c in client.get("/api/v1/courses", headers=learner.h).json()["items"]}
    assert seen == {free["id"]: (False, False), paid["id"]: (False, True)}
    r = client.post(f"/api/v1/courses/{free['id']}/enrollments", headers=learner.h)
    assert r.status_code == 201 and r.json()["user_id"] == learner.id
    assert client.get(f"/api/v1/courses/{free['id']}", headers=learner.h).json()["enrolled"] is True
    # enrolling twice is fine and idempotent
    assert client.post(f"/api/v1/courses/{free['id']}/enrollments", headers=learner.h).status_code == 200
    assert client.post(f"/api/v1/courses/{paid['id']}/enrollments", headers=learner.h).status_code == 402
    assert client.post(f"/api/v1/courses/{draft['id']}/enrollments", headers=learner.h).status_code == 404
    assert client.get(f"/api/v1/courses/{draft['id']}", headers=learner.h).status_code == 404
    other = make.user("learner")
    r = client.post(f"/api/v1/courses/{free['id']}/enrollments", json={"user_id": other.id}, headers=learner.h)
    assert r.status_code == 403
    # the learner leaves
    assert client.delete(f"/api/v1/courses/{free['id']}/enrollments/{learner.id}", headers=learner.h).status_code == 204


def test_paid_course_needs_payment(client, make: Factory):
    inst, learner = make.user("instructor"), make.user("learner")
    paid = client.post("/api/v1/courses", json={"title": "Paid", "published": True, "price_cents": 1900},
                       headers=inst.h).json()
    # learners find a paid course in the catalog but not its content, and cannot enroll themselves (402, nothing
    # stored)
    listed = client.get(f"/api/v1/courses/{paid['id']}", headers=learner.h).json()
    assert listed["price_cents"] == 1900 and listed["payment_required"] and not listed["enrolled"]
    for path in ("videos", "assignments", f"search?q=x", "live"):
        assert client.get(f"/api/v1/courses/{paid['id']}/{path}", headers=learner.h).status_code == 404, path
    r = client.post(f"/api/v1/courses/{paid['id']}/enrollments", headers=learner.h)
    assert r.status_code == 402 and r.json()["code"] == "payment_required", r.text
    assert fetch(make.settings, "SELECT 1 FROM enrollments WHERE course_id = $1 AND user_id = $2", paid["id"],
                 learner.id) == []
    # in once staff enrolled them
    assert client.post(f"/api/v1/courses/{paid['id']}/enrollments", json={"user_id": learner.id},
                       headers=inst.h).status_code == 201
    now = client.get(f"/api/v1/courses/{paid['id']}", headers=learner.h).json()
    assert now["enrolled"] and not now["payment_required"]
    assert client.get(f"/api/v1/courses/{paid['id']}/videos", headers=learner.h).status_code == 200
    # a learner who leaves a paid course they were let into may come back themselves (they left with a 404 before:
    # only staff could let them in again)
    assert client.delete(f"/api/v1/courses/{paid['id']}/enrollments/{learner.id}", headers=learner.h).status_code == 204
    again = client.get(f"/api/v1/courses/{paid['id']}", headers=learner.h).json()
    assert not again["enrolled"] and not again["payment_required"]
    assert client.get(f"/api/v1/courses/{paid['id']}/videos", headers=learner.h).status_code == 404
    assert client.post(f"/api/v1/courses/{paid['id']}/enrollments", headers=learner.h).status_code == 201
    # access is per learner: another still pays
    other = make.user("learner")
    assert client.post(f"/api/v1/courses/{paid['id']}/enrollments", headers=other.h).status_code == 402
    # removed by staff, a learner loses their access too: no enrolling again themselves
    assert client.delete(f"/api/v1/courses/{paid['id']}/enrollments/{learner.id}", headers=inst.h).status_code == 204
    assert client.post(f"/api/v1/courses/{paid['id']}/enrollments", headers=learner.h).status_code == 402
    # also when they had left first (a refund after leaving): staff's removal took nothing (404) and the learner
    # could come back without paying for as long as they liked
    assert client.post(f"/api/v1/courses/{paid['id']}/enrollments", json={"user_id": learner.id},
                       headers=inst.h).status_code == 201
    assert client.delete(f"/api/v1/courses/{paid['id']}/enrollments/{learner.id}", headers=learner.h).status_code == 204
    assert client.delete(f"/api/v1/courses/{paid['id']}/enrollments/{learner.id}", headers=inst.h).status_code == 204
    assert client.post(f"/api/v1/courses/{paid['id']}/enrollments", headers=learner.h).status_code == 402
    # neither enrolled nor with access: nothing to remove
    assert client.delete(f"/api/v1/courses/{paid['id']}/enrollments/{learner.id}", headers=inst.h).status_code == 404
    # staff are never asked to pay
    mine = client.get(f"/api/v1/courses/{paid['id']}", headers=inst.h).json()
    assert not mine["payment_required"] and not mine["enrolled"]
    assert not next(c for c in client.get("/api/v1/courses", headers=inst.h).json()["items"]
                    if c["id"] == paid["id"])["payment_required"]


def test_instructor_enrollments(client, make: Factory):
    inst = make.user("instructor")
    learners = [make.user("learner") for _ in range(3)]
    cid = client.post("/api/v1/courses", json={"title": "C"}, headers=inst.h).json()["id"]
    for u in learners:
        assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": u.id}, headers=inst.h).status_code == 201
    items = client.get(f"/api/v1/courses/{cid}/enrollments", headers=inst.h).json()["items"]
    assert [i["user_id"] for i in items] == [u.id for u in learners]
    page = client.get(f"/api/v1/courses/{cid}/enrollments?limit=2&offset=2", headers=inst.h).json()["items"]
    assert [i["user_id"] for i in page] == [learners[2].id]
    assert client.delete(f"/api/v1/courses/{cid}/enrollments/{learners[0].id}", headers=inst.h).status_code == 204
    assert client.delete(f"/api/v1/courses/{cid}/enrollments/{learners[0].id}", headers=inst.h).status_code == 404
    # a user from another tenant cannot be enrolled
    stranger = Factory(make.settings).user("learner")
    r = client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": stranger.id}, headers=inst.h)
    assert r.status_code == 404
    # learners cannot list enrollments
    assert client.get(f"/api/v1/courses/{cid}/enrollments", headers=learners[1].h).status_code == 403
    # staff see every course already: enrolled, they counted as pod members and poll voters (bots are enrolled to
    # bridge a pod's room)
    for who in (make.user("instructor").id, make.user("admin").id):
        r = client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": who}, headers=inst.h)
        assert r.status_code == 400 and r.json()["field"] == "user_id" and "only learners" in r.json()["message"]
    bot = client.post("/api/v1/bots", json={"name": "bridge"}, headers=inst.h).json()
    assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": bot["user_id"]},
                       headers=inst.h).status_code == 201


@pytest.mark.parametrize("body,field", [
    ({}, "title"),
    ({"title": ""}, "title"),
    ({"title": "   "}, "title"),
    ({"title": 42}, "title"),
    ({"title": None}, "title"),
    ({"title": "x" * 201}, "title"),
    ({"title": "ok", "extra": 1}, "extra"),
    ({"title": "ok", "published": "yes"}, "published"),
    ({"title": "ok", "price_cents": -1}, "price_cents"),
    ({"title": "ok", "description": "d" * 10_001}, "description"),
])
def test_bad_course_bodies(client, make: Factory, body, field):
    r = client.post("/api/v1/courses", json=body, headers=make.user("instructor").h)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["field"] == field and err["status"] == 400 and err["message"]


@pytest.mark.parametrize("raw", [b"not json", b"", b"[1,2]", b'{"title": "x"', "\u00e9".encode("latin-1"), b"null"])
def test_non_json_bodies(client, make: Factory, raw):
    r = client.post("/api/v1/courses", content=raw, headers={**make.user("instructor").h,
                                                                 "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "bad_request"


def test_bad_patch_and_params(client, make: Factory):
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "C"}, headers=inst.h).json()["id"]
    r = client.patch(f"/api/v1/courses/{cid}", json={"title": ""}, headers=inst.h)
    assert r.status_code == 400 and r.json()["field"] == "title"
    r = client.patch(f"/api/v1/courses/{cid}", json={"owner_id": 1}, headers=inst.h)
    assert r.status_code == 400 and r.json()["field"] == "owner_id"
    assert client.get("/api/v1/courses?limit=0", headers=inst.h).status_code == 400
    assert client.get("/api/v1/courses?limit=abc", headers=inst.h).status_code == 400
    assert client.get("/api/v1/courses/abc", headers=inst.h).status_code in (400, 404)
    assert client.get("/api/v1/courses/99999999999", headers=inst.h).status_code == 404
    r = client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": "me"}, headers=inst.h)
    assert r.status_code == 400 and r.json()["field"] == "user_id"


def test_oversized_body_413(client, make: Factory):
    r = client.post("/api/v1/courses", content=b'{"title": "' + b"x" * (2 * 1024 * 1024) + b'"}',
                    headers=make.user("instructor").h)
    assert r.status_code == 413


def test_health_ready_metrics_schema(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "ok", "postgres": "ok", "redis": "ok",
                                                         "realtime": "ok"}
    client.get("/api/v1/courses")
    r = client.get("/metrics")
    assert "studyhall_http_requests_total" in r.text
    assert r.headers["content-type"].count("charset") == 1, r.headers["content-type"]  # (it said it twice)
    assert r.headers["content-type"].startswith("text/plain; version=")
    schema = client.get("/schema/openapi.json").json()
    assert "/api/v1/courses" in schema["paths"]


def test_metrics_can_be_kept_to_the_scraper(data_dir, make: Factory):
    """With STUDYHALL_METRICS_TOKEN set, /metrics answers only the scraper's bearer token (not an API user's)."""
    from tests.server.conftest import spawn_ready

    ((proc, url),) = spawn_ready(data_dir, ["metrics-token"], {"STUDYHALL_METRICS_TOKEN": "scrape-me"})
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-me"},
                            make.user("admin").h):
                r = c.get("/metrics", headers=headers)
                assert r.status_code == 401 and r.json()["code"] == "unauthorized", (headers, r.text)
                assert r.headers["WWW-Authenticate"] == "Bearer"
            got = c.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
            assert got.status_code == 200 and "studyhall_http_requests_total" in got.text
            assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200  # still open
    finally:
        stop_process(proc)


def test_plain_lists_page(client, make: Factory, settings):
    """Lists that are JSON arrays take ?limit=&offset=: the pages, read in turn, are the whole list in order."""
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Paging"}, headers=inst.h).json()["id"]
    learner = make.user("learner")  # the same (test's own) tenant
    assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": learner.id},
                       headers=inst.h).status_code == 201
    pods = [client.post(f"/api/v1/courses/{cid}/pods", json={"name": f"pod {i}"}, headers=inst.h).json()["id"]
            for i in range(5)]
    for p in pods[:3]:
        assert client.post(f"/api/v1/pods/{p}/members", json={"user_id": learner.id}, headers=inst.h).status_code == 201
    for _ in range(3):  # more members for the first pod
        other = make.user("learner")
        client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": other.id}, headers=inst.h)
        assert client.post(f"/api/v1/pods/{pods[0]}/members", json={"user_id": other.id},
                           headers=inst.h).status_code == 201
    for i in range(3):
        assert client.post("/api/v1/bots", json={"name": f"bot-{i}-{learner.id}"}, headers=inst.h).status_code == 201
    fetch(settings, "INSERT INTO tutor_sessions (course_id, user_id, title) SELECT $1, $2, 'q' || i "
                    "FROM generate_series(1, 5) i", cid, learner.id)

    def pages(path: str, who: User, key: str = "id") -> tuple[list, list]:
        whole = client.get(path, headers=who.h)
        assert whole.status_code == 200, whole.text
        got: list = []
        for offset in range(0, 8, 2):
            page = client.get(path, params={"limit": 2, "offset": offset}, headers=who.h).json()
            assert len(page) <= 2
            got += [x[key] for x in page]
        return [x[key] for x in whole.json()], got

    for path, who, key in [(f"/api/v1/courses/{cid}/pods", inst, "id"), (f"/api/v1/courses/{cid}/pods", learner, "id"),
                           ("/api/v1/me/pods", learner, "id"), (f"/api/v1/pods/{pods[0]}/members", inst, "user_id"),
                           ("/api/v1/tokens", inst, "id"),
                           (f"/api/v1/courses/{cid}/tutor/sessions", learner, "id")]:
        whole, paged = pages(path, who, key)
        assert len(whole) >= 3 and paged == whole, (path, whole, paged)
    assert [p["id"] for p in client.get(f"/api/v1/courses/{cid}/pods", headers=learner.h).json()] == pods[:3]
    for bad in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"limit": "x"}):
        r = client.get(f"/api/v1/courses/{cid}/pods", params=bad, headers=inst.h)
        assert r.status_code == 400, (bad, r.text)


def test_a_pod_is_a_small_cohort(client, make: Factory, settings):
    """The matcher weighs every pair of a pod's members: a pod holds at most 50 (409 `pod_full`)."""
    from server.auth import issue_token

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Cohorts"}, headers=inst.h).json()["id"]
    made = client.post(f"/api/v1/courses/{cid}/pods", json={"name": "big"}, headers=inst.h).json()
    pod = made["id"]
    # every view of a pod names its course (staff's were null: only learners' lists had it)
    assert made["course_title"] == "Cohorts"
    assert client.get(f"/api/v1/pods/{pod}", headers=inst.h).json()["course_title"] == "Cohorts"
    assert [p["course_title"] for p in client.get(f"/api/v1/courses/{cid}/pods", headers=inst.h).json()] == ["Cohorts"]
    fetch(settings, """WITH u AS (INSERT INTO users (tenant_id, name, role)
                                  SELECT $2, 'member ' || i, 'learner' FROM generate_series(1, 50) i RETURNING id),
                            e AS (INSERT INTO enrollments (course_id, user_id) SELECT $1, id FROM u)
                       INSERT INTO pod_members (pod_id, user_id) SELECT $3, id FROM u""", cid, inst.tenant_id, pod)
    late = make.user("learner")
    assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": late.id},
                       headers=inst.h).status_code == 201
    r = client.post(f"/api/v1/pods/{pod}/members", json={"user_id": late.id}, headers=inst.h)
    assert r.status_code == 409 and r.json()["code"] == "pod_full", r.text
    member = fetch(settings, "SELECT user_id FROM pod_members WHERE pod_id = $1 LIMIT 1", pod)[0]["user_id"]
    assert client.post(f"/api/v1/pods/{pod}/members", json={"user_id": member}, headers=inst.h).status_code == 200
    # learners who left the course keep their places: staff see who holds them, and can free them
    gone = [r["user_id"] for r in fetch(settings, "SELECT user_id FROM pod_members WHERE pod_id = $1 "
                                                  "ORDER BY user_id DESC LIMIT 2", pod)]
    for g in gone:
        assert client.delete(f"/api/v1/courses/{cid}/enrollments/{g}", headers=inst.h).status_code == 204
    r = client.post(f"/api/v1/pods/{pod}/members", json={"user_id": late.id}, headers=inst.h)
    assert r.status_code == 409 and "2 of the places are held by learners who left the course" in r.json()["message"]
    listed = client.get(f"/api/v1/pods/{pod}/members", headers=inst.h).json()
    assert len(listed) == 50 and sorted(m["user_id"] for m in listed if m["departed"]) == sorted(gone)
    stays = next(m["user_id"] for m in listed if not m["departed"])
    token = issue_token(settings.secret, stays, inst.tenant_id, "learner", ttl_s=600)
    seen = client.get(f"/api/v1/pods/{pod}/members", headers={"Authorization": f"Bearer {token}"}).json()
    assert len(seen) == 48 and not any(m["departed"] for m in seen)  # a member sees those in the pod's room
    (listing,) = client.get(f"/api/v1/courses/{cid}/pods", headers=inst.h).json()
    assert listing["members"] == 48 and listing["places_taken"] == 50
    assert client.delete(f"/api/v1/pods/{pod}/members/{gone[0]}", headers=inst.h).status_code == 204
    assert client.post(f"/api/v1/pods/{pod}/members", json={"user_id": late.id}, headers=inst.h).status_code == 201
    # (Tester) a bot bridging the pod's room takes no place (the matcher never pairs it): a full pod still gets one
    bot = client.post("/api/v1/bots", json={"name": f"bridge-{pod}"}, headers=inst.h).json()
    assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": bot["user_id"]},
                       headers=inst.h).status_code == 201
    assert client.post(f"/api/v1/pods/{pod}/members", json={"user_id": bot["user_id"]}, headers=inst.h).status_code == 201
    (listing,) = client.get(f"/api/v1/courses/{cid}/pods", headers=inst.h).json()
    assert listing["places_taken"] == 50


async def test_a_course_made_paid_while_a_learner_enrolls_is_not_enrolled_for_free(server, make: Factory, settings):
    """The enrollment checked the course as it was read first, then enrolled: a change making the course paid
    (or a draft) committing in between let the learner keep it for free. The check now holds the course row until
    the enrollment commits, so the change waits for it or is seen."""
    import asyncio

    import asyncpg

    inst = make.user("instructor")
    learner = make.user("learner")
    async with httpx.AsyncClient(base_url=server, timeout=30) as c:
        course = (await c.post("/api/v1/courses", json={"title": "Soon paid", "published": True},
                               headers=inst.h)).json()
        db = await asyncpg.connect(settings.database_url)
        try:
            tx = db.transaction()
            await tx.start()
            await db.execute("UPDATE courses SET price_cents = 4900 WHERE id = $1", course["id"])  # not committed
            enrolling = asyncio.create_task(c.post(f"/api/v1/courses/{course['id']}/enrollments", headers=learner.h))
            await asyncio.sleep(1.0)
            assert not enrolling.done()  # it waits for the change
            await tx.commit()
            r = await enrolling
        finally:
            await db.close()
    assert r.status_code == 402 and r.json()["code"] == "payment_required", r.text
    assert fetch(settings, "SELECT 1 FROM enrollments WHERE course_id = $1 AND user_id = $2", course["id"],
                 learner.id) == []
