"""The auth matrix over real HTTP."""
from __future__ import annotations

import time

import httpx
import jwt

from tests.conftest import Factory, fetch, upload


def test_no_token_401(client):
    r = client.get("/api/v1/courses")
    assert r.status_code == 401
    assert r.json()["code"] == "unauthorized"


def test_malformed_header_401(client):
    assert client.get("/api/v1/courses", headers={"Authorization": "Token abc"}).status_code == 401
    assert client.get("/api/v1/courses", headers={"Authorization": "Bearer not.a.jwt"}).status_code == 401


def test_bad_signature_401(client, make: Factory):
    u = make.user("instructor")
    claims = jwt.decode(u.token, options={"verify_signature": False})
    forged = jwt.encode(claims, "not-the-secret-but-as-long-as-one-should-be", algorithm="HS256")
    r = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {forged}"})
    assert r.status_code == 401


def test_alg_none_rejected(client, make: Factory):
    u = make.user("admin")
    claims = jwt.decode(u.token, options={"verify_signature": False})
    unsigned = jwt.encode(claims, key=None, algorithm="none")
    assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {unsigned}"}).status_code == 401


def test_expired_401(client, make: Factory, settings):
    u = make.user("instructor")
    now = int(time.time())
    expired = jwt.encode({"sub": str(u.id), "tenant": u.tenant_id, "role": "instructor", "iat": now - 100,
                          "exp": now - 10}, settings.secret, algorithm="HS256")
    r = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401
    assert "expired" in r.json()["message"]


def test_me(client, make: Factory):
    u = make.user("learner", name="ada")
    r = client.get("/api/v1/users/me", headers=u.h)
    assert r.status_code == 200
    assert r.json() == {"id": u.id, "name": "ada", "role": "learner", "tenant": make.tenant, "tenant_id": u.tenant_id}


def test_learner_cannot_create_course(client, make: Factory):
    r = client.post("/api/v1/courses", json={"title": "Mine"}, headers=make.user("learner").h)
    assert r.status_code == 403
    assert r.json()["code"] == "forbidden"


def test_other_tenant_course_is_404(client, make: Factory):
    a = make.user("instructor")
    b = Factory(make.settings).user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "A's course"}, headers=a.h).json()["id"]
    for method, body in (("GET", None), ("PATCH", {"title": "hijack"}), ("DELETE", None)):
        r = client.request(method, f"/api/v1/courses/{cid}", json=body, headers=b.h)
        assert r.status_code == 404, (method, r.text)
    assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": b.id}, headers=b.h).status_code == 404
    assert client.get("/api/v1/courses", headers=b.h).json()["items"] == []
    # and A's course is untouched
    assert client.get(f"/api/v1/courses/{cid}", headers=a.h).json()["title"] == "A's course"


def test_hidden_objects_are_not_found_as_themselves(client, make: Factory, settings):
    """An object in a course the caller may not see is 'X not found', the same as an id that does not exist:
    the answer must not confirm it exists nor name its course."""
    owner = make.user("instructor")
    other = Factory(make.settings)
    outsiders = [other.user("learner"), other.user("instructor"), make.user("learner")]  # + not enrolled
    cid = client.post("/api/v1/courses", json={"title": "Hidden"}, headers=owner.h).json()["id"]
    srt = b"1\n00:00:01,000 --> 00:00:04,000\nA sentence to ingest.\n"
    job = upload(client, cid, owner.h, "one.srt", srt).json()["job_id"]
    pod = client.post(f"/api/v1/courses/{cid}/pods", json={"name": "P"}, headers=owner.h).json()["id"]
    a = client.post(f"/api/v1/courses/{cid}/assignments", json={
        "type": "short_answer", "title": "T", "prompt": "Why?", "reference_answer": "Because."}, headers=owner.h)
    assignment = a.json()["id"]
    assert client.post(f"/api/v1/assignments/{assignment}/publish", headers=owner.h).status_code == 200
    turn = fetch(settings, """INSERT INTO tutor_turns (course_id, room_id, user_id, question, standalone, answer, grounded,
                                                     provider, model)
                              VALUES ($1, $2, $3, 'q', 'q', 'a', true, 'extractive', 'x')
                              RETURNING id""", cid, f"course:{cid}", owner.id)[0]["id"]
    for who in outsiders:
        for method, url, body, what in [
                ("GET", f"/api/v1/jobs/{job}", None, f"job {job}"),
                ("GET", f"/api/v1/assignments/{assignment}", None, f"assignment {assignment}"),
                ("POST", f"/api/v1/tutor/answers/{turn}/feedback", {"vote": 1}, f"answer {turn}"),
                ("PUT", f"/api/v1/rooms/pod:{pod}/tutor", {"mode": "socratic"}, f"room pod:{pod}")]:
            r = client.request(method, url, json=body, headers=who.h)
            if r.status_code == 403 and who.role == "learner":
                continue  # a staff-only route
            assert r.status_code == 404 and r.json()["message"] == f"{what} not found", (who.role, url, r.text)


def test_learner_not_enrolled(client, make: Factory):
    inst, learner = make.user("instructor"), make.user("learner")
    cid = client.post("/api/v1/courses", json={"title": "Draft"}, headers=inst.h).json()["id"]
    assert client.get(f"/api/v1/courses/{cid}", headers=learner.h).status_code == 404
    assert client.post(f"/api/v1/courses/{cid}/enrollments", headers=learner.h).status_code == 404
    # enrolled by the instructor, the learner sees it
    r = client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": learner.id}, headers=inst.h)
    assert r.status_code == 201
    assert client.get(f"/api/v1/courses/{cid}", headers=learner.h).status_code == 200
    # but still cannot change it
    assert client.patch(f"/api/v1/courses/{cid}", json={"title": "x"}, headers=learner.h).status_code == 403


def test_names_must_be_visible_and_free_of_control_characters(client, make: Factory):
    inst = make.user("instructor")
    assert client.post("/api/v1/bots", json={"name": "nul\x00"}, headers=inst.h).status_code == 400  # any NUL
    for name in ("   ", "b2\n", "tab\there"):
        r = client.post("/api/v1/bots", json={"name": name}, headers=inst.h)
        assert r.status_code == 400 and r.json()["field"] == "name", (name, r.text)
        r = client.post("/api/v1/users", json={"name": name, "role": "learner"}, headers=inst.h)
        assert r.status_code == 400 and r.json()["field"] == "name", (name, r.text)
    r = client.post("/api/v1/bots", json={"name": "  spaced bot "}, headers=inst.h)
    assert r.status_code == 201 and r.json()["name"] == "spaced bot"
    # (Tester) invisible characters made a second bot that reads as another ("tw\u200bin" is "twin") or turned a
    # name around (a bidi override): dropped, so the name is the one it reads as
    twin = client.post("/api/v1/bots", json={"name": "twin"}, headers=inst.h).json()
    for look_alike in ("tw\u200bin", "\u202etwin", "twin\ufeff"):
        r = client.post("/api/v1/bots", json={"name": look_alike}, headers=inst.h)
        assert r.status_code == 201 and r.json()["name"] == "twin" and r.json()["user_id"] == twin["user_id"], r.text
    r = client.post("/api/v1/users", json={"name": "ca\u0301fe\u200b", "role": "learner"}, headers=inst.h)
    assert r.status_code == 201 and r.json()["name"] == "c\u00e1fe", r.text
    r = client.post("/api/v1/bots", json={"name": "\U0001f468\u200d\U0001f4bb"}, headers=inst.h)  # the joiner stays
    assert r.status_code == 201 and r.json()["name"] == "\U0001f468\u200d\U0001f4bb", r.text


def test_bot_token_revocation(client, make: Factory):
    inst = make.user("instructor")
    r = client.post("/api/v1/bots", json={"name": "discord-bot", "label": "discord"}, headers=inst.h)
    assert r.status_code == 201
    bot = r.json()
    bh = {"Authorization": f"Bearer {bot['token']}"}
    claims = jwt.decode(bot["token"], options={"verify_signature": False})
    assert "exp" not in claims and claims["jti"] == bot["token_id"]
    me = client.get("/api/v1/users/me", headers=bh).json()
    assert me["role"] == "bot"
    # bots read the tenant's courses but cannot create them
    assert client.get("/api/v1/courses", headers=bh).status_code == 200
    assert client.post("/api/v1/courses", json={"title": "x"}, headers=bh).status_code == 403
    listed = client.get("/api/v1/tokens", headers=inst.h).json()
    assert [t["id"] for t in listed] == [bot["token_id"]]
    # another tenant's instructor cannot revoke it
    other = Factory(make.settings).user("instructor")
    assert client.delete(f"/api/v1/tokens/{bot['token_id']}", headers=other.h).status_code == 404
    # (Tester) a bot may end its own token (a leaked one), not another bot's; a learner none
    second = client.post("/api/v1/bots", json={"name": "discord-bot", "label": "spare"}, headers=inst.h).json()
    other_bot = client.post("/api/v1/bots", json={"name": "whop-bot"}, headers=inst.h).json()
    learner = make.user("learner")
    assert client.delete(f"/api/v1/tokens/{other_bot['token_id']}", headers=bh).status_code == 404
    assert client.delete(f"/api/v1/tokens/{second['token_id']}", headers=learner.h).status_code == 403
    assert client.delete(f"/api/v1/tokens/{second['token_id']}", headers=bh).status_code == 204
    assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {second['token']}"}).status_code == 401
    assert client.get("/api/v1/users/me", headers=bh).status_code == 200  # its other token still works
    assert client.delete(f"/api/v1/tokens/{bot['token_id']}", headers=inst.h).status_code == 204
    r = client.get("/api/v1/users/me", headers=bh)
    assert r.status_code == 401


def test_staff_creates_learner_with_token(client, make: Factory):
    inst = make.user("instructor")
    r = client.post("/api/v1/users", json={"name": "grace"}, headers=inst.h)
    assert r.status_code == 201
    created = r.json()
    me = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {created['token']}"}).json()
    assert me["name"] == "grace" and me["role"] == "learner" and me["tenant"] == make.tenant
    # a retry whose first reply was lost: the conflict names the learner it made (there is no user listing)
    again = client.post("/api/v1/users", json={"name": " grace "}, headers=inst.h)
    assert again.status_code == 409 and again.json()["user_id"] == created["id"] and again.json()["role"] == "learner"
    assert client.post(f"/api/v1/users/{created['id']}/tokens", headers=inst.h).status_code == 201
    colleague = make.user("instructor", name=f"colleague-{created['id']}")  # not a learner: not named to instructors
    taken = client.post("/api/v1/users", json={"name": colleague.name}, headers=inst.h)
    assert taken.status_code == 409 and "user_id" not in taken.json()
    blank = client.post("/api/v1/users", json={"name": "   "}, headers=inst.h)
    assert blank.status_code == 400 and blank.json()["field"] == "name"
    # an instructor cannot mint admins; a learner cannot mint anyone
    assert client.post("/api/v1/users", json={"name": "boss", "role": "admin"}, headers=inst.h).status_code == 403
    assert client.post("/api/v1/users", json={"name": "x"}, headers=make.user("learner").h).status_code == 403


def test_deleted_user_token_rejected(client, make: Factory, settings):
    from tests.conftest import fetch

    u = make.user("learner")
    fetch(settings, "DELETE FROM users WHERE id = $1", u.id)
    assert client.get("/api/v1/users/me", headers=u.h).status_code == 401


def test_a_token_from_a_server_whose_clock_is_a_little_ahead_works(client, make: Factory, settings):
    """Tokens issued by another host (the CLI on an operator's machine, another server behind the balancer) whose
    clock ran ahead were 'invalid token' until this clock caught up."""
    u = make.user("instructor")
    now = int(time.time())

    def token(iat: int) -> dict:
        t = jwt.encode({"sub": str(u.id), "tenant": u.tenant_id, "role": "instructor", "iat": iat,
                        "exp": iat + 3600}, settings.secret, algorithm="HS256")
        return {"Authorization": f"Bearer {t}"}

    assert client.get("/api/v1/users/me", headers=token(now + 30)).status_code == 200
    r = client.get("/api/v1/users/me", headers=token(now + 600))
    assert r.status_code == 401 and "clock" in r.json()["message"], r.text


def test_staff_give_a_person_a_new_token_and_sign_them_out_everywhere(client, make: Factory):
    """There was no way but the operator's CLI to give a learner whose token expired a new one, nor to end a
    leaked one before it expired."""
    inst = make.user("instructor")
    learner = make.user("learner")  # one tenant: the factory's
    colleague, admin = make.user("instructor"), make.user("admin")
    bot = client.post("/api/v1/bots", json={"name": f"bot-{learner.id}"}, headers=inst.h).json()
    r = client.post(f"/api/v1/users/{learner.id}/tokens", headers=inst.h)
    assert r.status_code == 201 and r.json()["user_id"] == learner.id, r.text
    fresh = {"Authorization": f"Bearer {r.json()['token']}"}
    assert client.get("/api/v1/users/me", headers=fresh).json()["id"] == learner.id
    # who may: instructors for learners, admins for people; bots have their own tokens; other tenants see nothing
    assert client.post(f"/api/v1/users/{colleague.id}/tokens", headers=inst.h).status_code == 403
    assert client.post(f"/api/v1/users/{colleague.id}/tokens", headers=admin.h).status_code == 201
    assert client.post(f"/api/v1/users/{bot['user_id']}/tokens", headers=inst.h).status_code == 400
    assert client.post(f"/api/v1/users/{learner.id}/tokens", headers=learner.h).status_code == 403
    stranger = Factory(make.settings).user("admin")
    assert client.post(f"/api/v1/users/{learner.id}/tokens", headers=stranger.h).status_code == 404
    assert client.delete(f"/api/v1/users/{learner.id}/tokens", headers=stranger.h).status_code == 404
    # signed out everywhere: every token issued until now ends; one issued right after works at once
    assert client.delete(f"/api/v1/users/{learner.id}/tokens", headers=inst.h).status_code == 204
    for h in (learner.h, fresh):
        r = client.get("/api/v1/users/me", headers=h)
        assert r.status_code == 401 and "signed out" in r.json()["message"], r.text
    again = client.post(f"/api/v1/users/{learner.id}/tokens", headers=inst.h).json()["token"]
    assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {again}"}).status_code == 200
    # by generation, not by clock: a token stamped by a host whose clock runs ahead, and one issued between two
    # sign-outs within the same second, end with the next sign-out too
    ahead = jwt.encode({**jwt.decode(again, options={"verify_signature": False}), "iat": int(time.time()) + 30},
                       make.settings.secret, algorithm="HS256")
    assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {ahead}"}).status_code == 200
    assert client.delete(f"/api/v1/users/{learner.id}/tokens", headers=inst.h).status_code == 204
    between = client.post(f"/api/v1/users/{learner.id}/tokens", headers=inst.h).json()["token"]
    assert client.delete(f"/api/v1/users/{learner.id}/tokens", headers=inst.h).status_code == 204
    for t in (again, ahead, between):
        assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {t}"}).status_code == 401
    again = client.post(f"/api/v1/users/{learner.id}/tokens", headers=inst.h).json()["token"]
    # a bot ends its tokens one by one (DELETE /tokens/{id})
    bh = {"Authorization": f"Bearer {bot['token']}"}
    assert client.delete(f"/api/v1/users/{bot['user_id']}/tokens", headers=bh).status_code == 400
    # and signs out nobody else: 403 as for a learner (a 400 about its own tokens)
    assert client.delete(f"/api/v1/users/{learner.id}/tokens", headers=bh).status_code == 403
    # anyone may sign themselves out; a learner may not sign out someone else
    assert client.delete(f"/api/v1/users/{inst.id}/tokens", headers={"Authorization": f"Bearer {again}"}
                         ).status_code == 403
    assert client.delete(f"/api/v1/users/{colleague.id}/tokens", headers=colleague.h).status_code == 204
    assert client.get("/api/v1/users/me", headers=colleague.h).status_code == 401
    assert client.get("/api/v1/users/me", headers=inst.h).status_code == 200


async def test_two_bridges_asking_for_the_same_bot_at_once_both_get_a_token(server, make: Factory):
    """The loser of two concurrent creations of one bot got a 409 "try again"; it now finds the bot just made."""
    import asyncio

    inst = make.user("instructor")
    async with httpx.AsyncClient(base_url=server, timeout=30) as c:
        for i in range(5):
            rs = await asyncio.gather(*(c.post("/api/v1/bots", json={"name": f"bridge-{inst.id}-{i}"}, headers=inst.h)
                                        for _ in range(4)))
            assert [r.status_code for r in rs] == [201] * 4, [r.text for r in rs]
            assert len({r.json()["user_id"] for r in rs}) == 1 and len({r.json()["token_id"] for r in rs}) == 4


async def test_a_retried_bot_creation_gets_the_token_its_key_made(server, make: Factory):
    """A bridge retrying POST /bots after a lost reply got a second live token nobody held (listed, never
    revoked). With an Idempotency-Key the retry, and a twin sent at the same moment, get the token the key made."""
    import asyncio

    inst, colleague = make.user("instructor"), Factory(make.settings).user("instructor")
    body = {"name": f"retry-bot-{inst.id}", "label": "discord"}
    h = {**inst.h, "Idempotency-Key": "bridge-setup-1"}
    async with httpx.AsyncClient(base_url=server, timeout=30) as c:
        rs = await asyncio.gather(*(c.post("/api/v1/bots", json=body, headers=h) for _ in range(3)))
        assert sorted(r.status_code for r in rs) == [200, 200, 201], [r.text for r in rs]
        assert len({r.json()["token_id"] for r in rs}) == 1
        again = await c.post("/api/v1/bots", json=body, headers=h)
        assert again.status_code == 200 and again.json()["token_id"] == rs[0].json()["token_id"]
        bh = {"Authorization": f"Bearer {again.json()['token']}"}
        assert (await c.get("/api/v1/users/me", headers=bh)).json()["role"] == "bot"
        listed = (await c.get("/api/v1/tokens", headers=inst.h)).json()
        assert [t["id"] for t in listed if t["user_name"] == body["name"]] == [again.json()["token_id"]]
        # the same key for another bot or label: 409, and nothing made
        for other in ({**body, "label": "whop"}, {"name": f"other-bot-{inst.id}"}):
            r = await c.post("/api/v1/bots", json=other, headers=h)
            assert r.status_code == 409 and r.json()["code"] == "idempotency_key_reused", r.text
        assert len((await c.get("/api/v1/tokens", headers=inst.h)).json()) == 1
        # keys are the caller's own: a colleague's same key makes their own token
        mine = await c.post("/api/v1/bots", json={"name": f"their-bot-{colleague.id}"},
                            headers={**colleague.h, "Idempotency-Key": "bridge-setup-1"})
        assert mine.status_code == 201, mine.text
        # without a key each call is a new token, as before
        plain = [await c.post("/api/v1/bots", json=body, headers=inst.h) for _ in range(2)]
        assert [r.status_code for r in plain] == [201, 201] and plain[0].json()["token_id"] != plain[1].json()["token_id"]
        # the key's token revoked: a repeat says so rather than handing back a dead token
        assert (await c.delete(f"/api/v1/tokens/{again.json()['token_id']}", headers=inst.h)).status_code == 204
        r = await c.post("/api/v1/bots", json=body, headers=h)
        assert r.status_code == 409 and r.json()["code"] == "token_revoked", r.text
        bad = await c.post("/api/v1/bots", json=body, headers={**inst.h, "Idempotency-Key": "x" * 101})
        assert bad.status_code == 400 and bad.json()["field"] == "Idempotency-Key"
