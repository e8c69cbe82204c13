"""Reply threading (`reply_to`) and the tutor marking learners' replies helpful when the course videos agree
with them (agents/helpful.py, ingest/replies.py), against the real server, worker, Postgres and Redis."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx
import pytest

from agents import helpful
from agents.embedder import local_default
from agents.llm import OpenAIChat
from agents.tutor import Tutor
from ingest import replies as reply_jobs
from ingest.jobs import connect_arq
from store import replies
from store.messages import post_message
from store.progress import mark_helpful
from tests.agents.fake_llm_servers import FakeLLMServer, Reply
from tests.conftest import EvalCourse, Factory, fetch
from tests.server.conftest import Client, make_course

QUESTION = "what does natural selection need in order to happen?"
RIGHT = ("there has to be variation between individuals, that variation has to be heritable, and it has to affect "
         "reproductive success")
WRONG = "the organisms have to be really big and live for a long time"


def _post(c: httpx.Client, room: str, user, text: str, **kw):  # type: ignore[no-untyped-def]
    return c.post(f"/api/v1/rooms/{room}/messages", json={"text": text, **kw}, headers=user.h)


def _check(settings, message_id: int):  # type: ignore[no-untyped-def]
    return fetch(settings, "SELECT status, reason, score, tries FROM reply_checks WHERE message_id = $1", message_id)


def _settled(settings, message_id: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = _check(settings, message_id)
        if rows and rows[0]["status"] != "pending":
            return dict(rows[0])
        time.sleep(0.2)
    raise AssertionError(f"the check of reply {message_id} did not finish: {_check(settings, message_id)}")


async def test_reply_to_names_a_message_of_the_same_room(server, client: httpx.Client, make: Factory, settings):
    course = make_course(server, make, learners=2)
    other = make_course(server, make, learners=1)
    inst, (a, b) = course.instructor, course.learners
    room = course.room
    q = _post(client, room, a, "how do I pick a pivot?").json()
    r = _post(client, room, b, "take the first nonzero entry", reply_to=q["id"])
    assert r.status_code == 201 and r.json()["reply_to"] == q["id"]
    # a learner's reply to someone else's message waits for the tutor's check, stored with it
    assert _check(settings, r.json()["id"])[0]["status"] in ("pending", "skipped")
    # the history keeps the thread
    page = client.get(f"/api/v1/rooms/{room}/messages", headers=a.h).json()["items"]
    assert [(m["id"], m["reply_to"], m["helpful"]) for m in page] == [(q["id"], None, False),
                                                                      (r.json()["id"], q["id"], False)]
    # no reply to check: one's own message, a reply by staff
    own = _post(client, room, a, "or any nonzero one?", reply_to=q["id"]).json()
    staff = _post(client, room, inst, "any nonzero entry works", reply_to=q["id"]).json()
    assert _check(settings, own["id"]) == [] and _check(settings, staff["id"]) == []

    before = fetch(settings, "SELECT count(*) AS n FROM messages")[0]["n"]
    elsewhere = _post(client, other.room, other.learners[0], "hello").json()
    gone = _post(client, room, a, "never mind").json()
    assert client.delete(f"/api/v1/rooms/{room}/messages/{gone['id']}", headers=a.h).status_code == 204
    for target, words in ((999_999_999, "is not in this room"), (elsewhere["id"], "is not in this room"),
                          (gone["id"], "(it was deleted)")):
        bad = _post(client, room, b, "an answer", reply_to=target)
        assert bad.status_code == 404, bad.text
        body = bad.json()
        assert body["code"] == "reply_to_not_found" and body["field"] == "reply_to" and words in body["message"]
    assert _post(client, room, b, "an answer", reply_to=0).status_code == 400
    assert _post(client, room, b, "an answer", reply_to="1").status_code == 400
    # nothing of the refused replies was stored (the two counted are `elsewhere` and `gone`)
    assert fetch(settings, "SELECT count(*) AS n FROM messages")[0]["n"] == before + 2

    c = await Client.connect(server, room, b)
    await c.send({"type": "message.send", "text": "an answer", "reply_to": 999_999_999, "ref": "r1"})
    err = await c.expect("error", ref="r1")
    assert err["code"] == "reply_to_not_found" and "reply_to" in err["detail"]
    await c.send({"type": "message.send", "text": "first nonzero", "reply_to": q["id"], "client_msg_id": "x1"})
    assert (await c.expect("message.new", client_msg_id="x1"))["reply_to"] == q["id"]
    await c.close()


async def test_the_tutor_marks_a_reply_the_videos_agree_with(eval_course: EvalCourse, server, settings):
    room = f"course:{eval_course.id}"
    factory = Factory(settings)
    asker = eval_course.learner
    b, c = factory.user("learner", tenant=eval_course.tenant), factory.user("learner", tenant=eval_course.tenant)
    with httpx.Client(base_url=server, timeout=30) as http:
        for u in (b, c):
            http.post(f"/api/v1/courses/{eval_course.id}/enrollments", json={"user_id": u.id},
                      headers=eval_course.instructor.h)
        watcher = await Client.connect(server, room, b)
        q = _post(http, room, asker, QUESTION).json()
        wrong = _post(http, room, c, WRONG, reply_to=q["id"]).json()
        right = _post(http, room, b, RIGHT, reply_to=q["id"]).json()
        mark = await watcher.expect("message.helpful", timeout=60, message_id=right["id"])
        assert mark["by"] == "tutor" and mark["author_id"] == b.id and "Natural Selection" in mark["reason"]
        assert (await watcher.expect("xp.awarded", timeout=10, kind="helpful_answer"))["points"] == 25
        assert _settled(settings, right["id"])["status"] == "helpful"
        got = _settled(settings, wrong["id"])
        assert got["status"] == "not_helpful" and "could not confirm" in got["reason"]
        # one reply per question: a second right answer is not marked again
        again = _post(http, room, c, RIGHT + " (as the lecture says)", reply_to=q["id"]).json()
        assert _settled(settings, again["id"])["reason"] == "another reply to this question was already marked helpful"
        page = http.get(f"/api/v1/rooms/{room}/messages", params={"after": q["seq"] - 1}, headers=b.h).json()["items"]
        assert {m["id"]: m["helpful"] for m in page} == {q["id"]: False, wrong["id"]: False, right["id"]: True,
                                                         again["id"]: False}
        marks = fetch(settings, "SELECT marked_by, by_tutor FROM helpful_marks WHERE message_id = $1", right["id"])
        assert [tuple(m) for m in marks] == [(None, True)]
        # a reply to a message that asks nothing is not checked
        note = _post(http, room, asker, "I finished the lecture today.").json()
        skipped = _settled(settings, _post(http, room, b, RIGHT, reply_to=note["id"]).json()["id"])
        assert skipped == {**skipped, "status": "skipped", "reason": "the message replied to does not ask anything"}
        await watcher.close()


async def test_daily_cap_failures_and_recovery(eval_course: EvalCourse, server, settings, worker_db):
    pool, redis = worker_db
    room = f"course:{eval_course.id}"
    factory = Factory(settings)
    b = factory.user("learner", tenant=eval_course.tenant)
    with httpx.Client(base_url=server, timeout=30) as http:
        http.post(f"/api/v1/courses/{eval_course.id}/enrollments", json={"user_id": b.id},
                  headers=eval_course.instructor.h)
        assert http.get(f"/api/v1/rooms/{room}/messages", headers=b.h).status_code == 200  # (the room's row)
    # posted straight through the store, as if the server died before queueing the check
    q = await post_message(pool, redis, room, eval_course.learner.id, QUESTION)
    r = await post_message(pool, redis, room, b.id, RIGHT, reply_to=q.event.id)
    assert r.check_reply
    ctx = {"pool": pool, "redis": redis, "settings": settings, "embedder": local_default}
    # the cap: replies the tutor already marked today count against it
    capped = {**ctx, "settings": dataclasses.replace(settings, tutor_helpful_per_day=0)}
    assert await reply_jobs.check_reply_job(capped, r.event.id) == "skipped"
    assert "STUDYHALL_TUTOR_HELPFUL_PER_DAY=0" in (await replies.get(pool, r.event.id))["reason"]
    await pool.execute("UPDATE reply_checks SET status = 'pending' WHERE message_id = $1", r.event.id)
    await pool.execute("INSERT INTO helpful_marks (message_id, room_id, author_id, by_tutor) VALUES ($1, $2, $3, true)",
                       q.event.id, room, b.id)  # (a mark of b's today, whatever message it names)
    one = {**ctx, "settings": dataclasses.replace(settings, tutor_helpful_per_day=1)}
    assert await reply_jobs.check_reply_job(one, r.event.id) == "skipped"
    assert (await replies.get(pool, r.event.id))["reason"] == (
        "the learner reached the tutor's limit of helpful marks in 24 hours (1, STUDYHALL_TUTOR_HELPFUL_PER_DAY)")
    await pool.execute("DELETE FROM helpful_marks WHERE message_id = $1", q.event.id)

    # a check that keeps failing ends `failed`, saying why
    await pool.execute("UPDATE reply_checks SET status = 'pending', reason = NULL, tries = 0 WHERE message_id = $1",
                       r.event.id)
    broken = {**ctx, "embedder": lambda: (_ for _ in ()).throw(RuntimeError("no model here"))}
    for _ in range(replies.MAX_TRIES):
        with pytest.raises(RuntimeError):
            await reply_jobs.check_reply_job(broken, r.event.id)
    assert (await replies.get(pool, r.event.id))["status"] == "pending"
    assert await reply_jobs.check_reply_job(broken, r.event.id) == "failed"
    row = await replies.get(pool, r.event.id)
    assert (row["status"], row["reason"]) == ("failed", "the check failed: RuntimeError: no model here")

    # a reply staff marked helpful first is not checked again
    r2 = await post_message(pool, redis, room, b.id, RIGHT + " (see the lecture)", reply_to=q.event.id)
    await mark_helpful(pool, redis, room, r2.event.id, eval_course.instructor.id)
    assert await reply_jobs.check_reply_job(ctx, r2.event.id) == "skipped"
    assert (await replies.get(pool, r2.event.id))["reason"] == "the reply was already marked helpful"

    # a pending check whose job was lost is queued again by the recovery, and the worker runs it
    await pool.execute("UPDATE reply_checks SET status = 'pending', tries = 0, reason = NULL, "
                       "created_at = now() - interval '10 minutes' WHERE message_id = $1", r.event.id)
    arq = await connect_arq(settings.redis_url)
    try:
        assert await reply_jobs.recover_reply_checks({**ctx, "redis": arq}) >= 1
    finally:
        await arq.aclose()
    for _ in range(300):
        row = await replies.get(pool, r.event.id)
        if row["status"] != "pending":
            break
        await asyncio.sleep(0.2)
    assert row["status"] == "helpful", dict(row)


def test_early_gates_need_no_search():
    assert helpful.asks("how do I pick a pivot") and helpful.asks("pivot?") and not helpful.asks("I finished it.")

    async def go() -> list[helpful.Check]:
        return [await helpful.check_reply(None, None, None, 1, "I finished it.", RIGHT),
                await helpful.check_reply(None, None, None, 1, QUESTION, "do you mean selection of genes?"),
                await helpful.check_reply(None, None, None, 1, QUESTION, "yes, same")]

    got = asyncio.run(go())
    assert [(c.status, c.reason) for c in got] == [
        ("skipped", "the message replied to does not ask anything"),
        ("skipped", "the reply asks a question of its own"),
        ("not_helpful", "the reply is too short to answer the question")]


async def test_a_chat_model_decides_when_configured(eval_course: EvalCourse, worker_db):
    pool, _ = worker_db
    embedder = local_default()
    tutor = Tutor(pool, embedder, None)
    with FakeLLMServer(api_key="sk-test") as fake:
        llm = OpenAIChat("sk-test", "gpt-4o-mini", base_url=fake.openai_base_url, max_retries=0)
        fake.script(Reply(text='{"helpful": true, "confidence": 0.93, "why": "Names all three conditions."}'),
                    Reply(text='{"helpful": true, "confidence": 0.6, "why": "Partly."}'),
                    Reply(text="I think so!"))
        yes = await helpful.check_reply(tutor, embedder, llm, eval_course.id, QUESTION, WRONG)
        assert (yes.status, yes.reason, yes.score, yes.checker) == ("helpful", "Names all three conditions.", 0.93,
                                                                   "llm:openai:gpt-4o-mini")
        unsure = await helpful.check_reply(tutor, embedder, llm, eval_course.id, QUESTION, RIGHT)
        assert unsure.status == "not_helpful" and unsure.reason == "Partly."
        # an unusable reply: the offline check decides
        fallback = await helpful.check_reply(tutor, embedder, llm, eval_course.id, QUESTION, RIGHT)
        assert (fallback.status, fallback.checker) == ("helpful", "offline")
        prompt = fake.requests[0].body["messages"][-1]["content"]
        assert json.dumps(WRONG) in prompt and "Transcript excerpts:" in prompt and json.dumps(QUESTION) in prompt
