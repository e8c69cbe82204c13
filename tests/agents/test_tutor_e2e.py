"""The tutor through a running server: REST (JSON and SSE), sessions, limits, cache, Socratic mode, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import httpx

from tests.conftest import EVAL, ROOT, EvalCourse, Factory, clean_env, fetch, upload, wait_job


def _gold(qid: str) -> dict:
    spec = json.loads((EVAL / "questions.json").read_text())
    return next(q for q in spec["questions"] if q["id"] == qid)


def _in_gold(c: dict, q: dict, videos: dict) -> bool:
    return c["video_id"] == videos[q["file"]] and any(c["start"] <= b and c["end"] >= a for a, b in q["spans"])


def test_rest_ask_cites_the_moment(eval_course: EvalCourse, client):
    q = _gold("att-01")
    r = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": q["question"]},
                    headers=eval_course.learner.h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["grounded"] is True and body["citations"] and body["session_id"]
    assert any(_in_gold(c, q, eval_course.videos) for c in body["citations"][:3])
    for c in body["citations"]:
        assert 0 < c["end"] - c["start"] <= 60 and c["quote"] and c["label"]
    assert "[1]" in body["answer"]
    assert 2 <= len(body["follow_ups"]) <= 3


def test_out_of_scope_declines_without_citations(eval_course: EvalCourse, client):
    r = client.post(f"/api/v1/courses/{eval_course.id}/ask",
                    json={"question": "What is a good recipe for sourdough bread?"}, headers=eval_course.learner.h)
    body = r.json()
    assert body["grounded"] is False and body["citations"] == []
    assert "don't cover" in body["answer"] and body["nearest"]
    again = client.post(f"/api/v1/courses/{eval_course.id}/ask",
                        json={"question": "What is a good recipe for sourdough bread?"}, headers=eval_course.learner.h)
    assert again.json()["cached"] is True and again.json()["nearest"] == body["nearest"]  # as its text says


def test_a_greeting_is_greeted_not_answered_from_the_course(eval_course: EvalCourse, client):
    """"hi" and "thanks!" were answered as grounded questions, citing the course's "Hi." and "Thank you." moments
    (and "What time is it?" a lecture's "it's time to...")."""
    for greeting in ("hi", "Thanks!", "@tutor thank you so much", "Good morning :)", "What time is it?"):
        body = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": greeting},
                           headers=eval_course.learner.h).json()
        assert body["grounded"] is False and body["citations"] == [] and body["nearest"] == [], (greeting, body)
        # (tester) a thank-you was said "Hello!", and so was the time
        assert body["answer"].startswith({"Thanks!": "You're welcome!", "@tutor thank you so much": "You're welcome!",
                                          "What time is it?": "I can't tell the time"}.get(greeting, "Hello!")), body
    # a question that happens to hold a courteous word is a question
    body = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": "thanks, but what is a hash function?"},
                       headers=eval_course.learner.h).json()
    assert body["grounded"] is True and body["citations"], body


def _fresh_learner(eval_course: EvalCourse, client: httpx.Client, settings):  # type: ignore[no-untyped-def]
    """Another learner of the eval course: asks of their own, not from the shared learner's daily quota (40 in
    tests) that the module's other tests count on."""
    learner = Factory(settings).user("learner", tenant=eval_course.tenant)
    assert client.post(f"/api/v1/courses/{eval_course.id}/enrollments", json={"user_id": learner.id},
                       headers=eval_course.instructor.h).status_code == 201
    return learner


def test_a_question_without_a_topic_or_in_another_language_is_told_so(eval_course: EvalCourse, client, settings):
    """(Tutor review) "why?" with nothing before it, and questions in Spanish, French or Russian, all got "The course
    videos don't cover this", which was not true: the one has no topic, the others are in another language."""
    from agents.tutor import NO_TOPIC_REPLY

    # (Tester) and those whose words happened to find moments were answered from them, cited
    asker = _fresh_learner(eval_course, client, settings)
    for q in ("why?", "tell me more", "can you give an example?", "can you explain that more simply?",
              "explain it again please", "what does it mean?"):
        body = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": q}, headers=asker.h).json()
        assert body["answer"] == NO_TOPIC_REPLY and body["citations"] == [] and not body["grounded"], (q, body)
    from agents.tutor import _no_topic

    assert not _no_topic({"question": "What will the next lecture be about?"})  # about the course: a topic
    # (Tester) invisible marks pasted from a PDF, and full-width or styled Latin, are the question as read
    for q in ("What is a ha\u200bsh func\u00adtion?", "ＷＨＡＴ ＩＳ Ａ ＨＡＳＨ ＦＵＮＣＴＩＯＮ？",
              "\U0001d416\U0001d421\U0001d41a\U0001d42d \U0001d422\U0001d42c \U0001d41a \U0001d421\U0001d41a\U0001d42c\U0001d421 "
              "\U0001d41f\U0001d42e\U0001d427\U0001d41c\U0001d42d\U0001d422\U0001d428\U0001d427?"):
        body = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": q}, headers=asker.h).json()
        assert body["grounded"] is True and body["citations"], (q, body)
        assert body["citations"][0]["video_id"] == eval_course.videos["3b1b-bitcoin.srt"], (q, body["citations"])
    from agents.tutor import foreign_question

    assert not foreign_question("What causes El Niño and La Niña?")  # an English question with Spanish names
    assert foreign_question("Was ist ein Eigenvektor?") and foreign_question("Qu'est-ce que la sélection naturelle ?")
    for q in ("¿Qué es una prueba de trabajo en bitcoin?", "Что такое естественный отбор?"):
        body = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": q},
                           headers=eval_course.learner.h).json()
        if not body["grounded"]:  # (found anyway: fine too)
            assert "another language" in body["answer"] and "don't cover" not in body["answer"], (q, body)


def test_sse_streams_deltas_then_answer(eval_course: EvalCourse, server):
    q = _gold("btc-01") if any(x["id"] == "btc-01" for x in json.loads((EVAL / "questions.json").read_text())["questions"]) else _gold("att-01")
    events = []
    with httpx.Client(base_url=server, timeout=60) as c, c.stream(
            "POST", f"/api/v1/courses/{eval_course.id}/ask", json={"question": q["question"]},
            headers={**eval_course.learner.h, "Accept": "text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((event, json.loads(line.split(":", 1)[1])))
    kinds = [e for e, _ in events]
    assert kinds[-1] == "answer" and kinds.count("delta") >= 2 and set(kinds) == {"delta", "answer"}
    streamed = "".join(d["text"] for e, d in events if e == "delta")
    final = events[-1][1]
    assert final["grounded"] and final["citations"]
    assert streamed.strip() == final["answer"].strip()


def test_sessions_follow_up_and_delete(eval_course: EvalCourse, client, make: Factory, settings):
    learner = make.user("learner", tenant=eval_course.tenant)
    client.post(f"/api/v1/courses/{eval_course.id}/enrollments", json={"user_id": learner.id},
                headers=eval_course.instructor.h)
    first = client.post(f"/api/v1/courses/{eval_course.id}/ask",
                        json={"question": "What is a digital signature in bitcoin?"}, headers=learner.h).json()
    assert "session_id" in first, first
    sid = first["session_id"]
    follow = client.post(f"/api/v1/courses/{eval_course.id}/ask",
                         json={"question": "why can't it be forged?", "session_id": sid}, headers=learner.h).json()
    assert follow["session_id"] == sid and follow["grounded"]
    assert {c["video_id"] for c in follow["citations"]} == {eval_course.videos["3b1b-bitcoin.srt"]}
    sessions = client.get(f"/api/v1/courses/{eval_course.id}/tutor/sessions", headers=learner.h).json()
    assert [s["id"] for s in sessions] == [sid]
    assert "turns" not in sessions[0] and "has_more" not in sessions[0]  # (a listing said null for both)
    full = client.get(f"/api/v1/tutor/sessions/{sid}", headers=learner.h).json()
    assert [t["question"] for t in full["turns"]] == ["What is a digital signature in bitcoin?", "why can't it be forged?"]
    assert full["has_more"] is False
    last = client.get(f"/api/v1/tutor/sessions/{sid}?limit=1", headers=learner.h).json()
    assert [t["question"] for t in last["turns"]] == ["why can't it be forged?"] and last["has_more"] is True
    older = client.get(f"/api/v1/tutor/sessions/{sid}?limit=1&before={last['turns'][0]['id']}", headers=learner.h).json()
    assert [t["question"] for t in older["turns"]] == ["What is a digital signature in bitcoin?"]
    assert older["has_more"] is False
    other = make.user("learner", tenant=eval_course.tenant)
    assert client.get(f"/api/v1/tutor/sessions/{sid}", headers=other.h).status_code == 404
    r = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": "x?", "session_id": sid},
                    headers=eval_course.learner.h)
    assert r.status_code == 404
    assert client.post(f"/api/v1/tutor/answers/{follow['turn_id']}/feedback", json={"vote": 1},
                       headers=learner.h).status_code == 204
    assert client.delete(f"/api/v1/tutor/sessions/{sid}", headers=learner.h).status_code == 204
    assert client.get(f"/api/v1/tutor/sessions/{sid}", headers=learner.h).status_code == 404
    # the learner's words are gone; what the answers cost, and the thumbs up, stay for the course's statistics
    turns = fetch(settings, "SELECT question, answer, session_id, provider, latency_ms FROM tutor_turns "
                            "WHERE id = ANY($1::bigint[])", [first["turn_id"], follow["turn_id"]])
    assert len(turns) == 2 and all(t["question"] == t["answer"] == "" and t["session_id"] is None for t in turns)
    assert all(t["provider"] and t["latency_ms"] > 0 for t in turns)
    assert fetch(settings, "SELECT count(*) AS n FROM tutor_feedback WHERE turn_id = $1",
                 follow["turn_id"])[0]["n"] == 1
    # an erased answer takes no more votes (they were stored, staff reading them beside an empty answer)
    r = client.post(f"/api/v1/tutor/answers/{first['turn_id']}/feedback", json={"vote": -1}, headers=learner.h)
    assert r.status_code == 404, r.text
    # a learner taken out of the course no longer reads their sessions of it (they read every quote still)
    kept = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": "What is\n\n\ta digital signature?"},
                       headers=learner.h).json()["session_id"]
    shown = client.get(f"/api/v1/tutor/sessions/{kept}", headers=learner.h)
    assert shown.status_code == 200 and shown.json()["title"] == "What is a digital signature?"  # one line
    assert client.delete(f"/api/v1/courses/{eval_course.id}/enrollments/{learner.id}",
                         headers=eval_course.instructor.h).status_code == 204
    assert client.get(f"/api/v1/tutor/sessions/{kept}", headers=learner.h).status_code == 404


def test_stats_add_up_costs_exactly(client, make: Factory, settings):
    """Per-answer costs are stored as `real`, and summed as `real` they drifted: 100,000 answers at $0.0004 came to
    $40.03."""
    teacher = make.user("instructor")
    course = client.post("/api/v1/courses", json={"title": "costs"}, headers=teacher.h).json()["id"]
    fetch(settings, """INSERT INTO tutor_turns (course_id, question, standalone, answer, grounded, provider, model,
                                                cost_usd)
                       SELECT $1, 'q', 'q', 'a', true, 'openai', 'gpt-4o-mini', 0.0004 FROM generate_series(1, 100000)
                       RETURNING 1""", course)
    stats = client.get(f"/api/v1/courses/{course}/tutor/stats", headers=teacher.h).json()
    assert stats["questions"] == 100_000 and stats["cost_usd"] == 40.0, stats


def test_feedback_and_stats(eval_course: EvalCourse, client, make: Factory):
    body = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": "What is a transformer?"},
                       headers=eval_course.learner.h).json()
    r = client.post(f"/api/v1/tutor/answers/{body['turn_id']}/feedback", json={"vote": 1}, headers=eval_course.learner.h)
    assert r.status_code == 204
    assert client.post(f"/api/v1/tutor/answers/{body['turn_id']}/feedback", json={"vote": 3},
                       headers=eval_course.learner.h).status_code == 400
    r = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": "Why?", "session_id": 2**63},
                    headers=eval_course.learner.h)
    assert r.status_code == 400 and r.json()["field"] == "session_id", r.text  # (was a 400 naming nothing)
    # a private session's answer is its learner's to rate, not a classmate's
    classmate = make.user("learner", tenant=eval_course.tenant)
    client.post(f"/api/v1/courses/{eval_course.id}/enrollments", json={"user_id": classmate.id},
                headers=eval_course.instructor.h)
    assert client.post(f"/api/v1/tutor/answers/{body['turn_id']}/feedback", json={"vote": -1},
                       headers=classmate.h).status_code == 404
    stats = client.get(f"/api/v1/courses/{eval_course.id}/tutor/stats", headers=eval_course.instructor.h).json()
    assert stats["questions"] >= 1 and stats["thumbs_up"] >= 1 and stats["thumbs_down"] == 0
    assert client.get(f"/api/v1/courses/{eval_course.id}/tutor/stats", headers=eval_course.learner.h).status_code == 403
    # a comment is text a person wrote: no control characters; staff read the comments with the answer they rate
    r = client.post(f"/api/v1/tutor/answers/{body['turn_id']}/feedback", json={"vote": 1, "comment": "a\x1b[2Jb"},
                    headers=eval_course.learner.h)
    assert r.status_code == 400 and r.json()["field"] == "comment", r.text
    assert client.post(f"/api/v1/tutor/answers/{body['turn_id']}/feedback",
                       json={"vote": -1, "comment": "Cites the wrong moment.\nSee 3:10 instead."},
                       headers=eval_course.learner.h).status_code == 204
    url = f"/api/v1/courses/{eval_course.id}/tutor/feedback"
    said = client.get(url, params={"vote": -1}, headers=eval_course.instructor.h).json()
    mine = [f for f in said if f["turn_id"] == body["turn_id"]]
    assert mine and mine[0]["comment"] == "Cites the wrong moment.\nSee 3:10 instead." and mine[0]["vote"] == -1
    assert mine[0]["answer"] == body["answer"] and "user_id" not in mine[0] and "question" not in mine[0]
    assert all(f["vote"] == -1 for f in said)
    assert client.get(url, params={"vote": 1}, headers=eval_course.instructor.h).json()[:1] != mine[:1]
    assert client.get(url, params={"vote": 2}, headers=eval_course.instructor.h).status_code == 400
    assert client.get(url, headers=eval_course.learner.h).status_code == 403


def test_a_learner_kicked_from_a_room_cannot_rate_its_answers(eval_course: EvalCourse, client, make: Factory,
                                                             settings):
    """Rating a room's tutor answer is a room call: a kicked learner gets 403 `kicked`, as on every other."""
    from tests.conftest import fetch

    room = f"course:{eval_course.id}"
    learner = make.user("learner", tenant=eval_course.tenant)
    client.post(f"/api/v1/courses/{eval_course.id}/enrollments", json={"user_id": learner.id},
                headers=eval_course.instructor.h)
    (turn,) = fetch(settings, """INSERT INTO tutor_turns (course_id, user_id, room_id, question, standalone, answer,
                                                          grounded, provider, model)
                                 VALUES ($1, $2, $3, 'q', 'q', 'a', true, 'extractive', 'extractive') RETURNING id""",
                    eval_course.id, eval_course.learner.id, room)
    url = f"/api/v1/tutor/answers/{turn['id']}/feedback"
    assert client.post(url, json={"vote": 1}, headers=learner.h).status_code == 204  # anyone in the room may
    r = client.post(f"/api/v1/rooms/{room}/kicks", json={"user_id": learner.id, "seconds": 600},
                    headers=eval_course.instructor.h)
    assert r.status_code == 204, r.text
    r = client.post(url, json={"vote": -1}, headers=learner.h)
    assert r.status_code == 403 and r.json()["code"] == "kicked", r.text


def test_daily_limit(eval_course: EvalCourse, client, make: Factory, settings):
    """The limit holds under concurrent asks (each takes its question from the quota atomically); over it,
    JSON and SSE both answer 429 before anything runs."""
    import concurrent.futures

    learner = make.user("learner", tenant=eval_course.tenant)
    client.post(f"/api/v1/courses/{eval_course.id}/enrollments", json={"user_id": learner.id},
                headers=eval_course.instructor.h)
    limit = settings.tutor_daily_limit
    fetch(settings, "INSERT INTO tutor_quota (user_id, day, used) VALUES ($1, (now() AT TIME ZONE 'UTC')::date, $2)",
          learner.id, limit - 2)
    url = f"{client.base_url}/api/v1/courses/{eval_course.id}/ask"

    def one(i: int) -> int:
        with httpx.Client(timeout=60) as c:
            return c.post(url, json={"question": f"What is attention, part {i}?"}, headers=learner.h).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(one, range(8)))
    assert codes == [200, 200] + [429] * 6, codes
    assert fetch(settings, "SELECT count(*) AS n FROM tutor_turns WHERE user_id = $1", learner.id)[0]["n"] == 2
    r = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": "What is attention?"}, headers=learner.h)
    assert r.status_code == 429 and r.json()["code"] == "daily_limit" and "resets" in r.json()["message"]
    now = datetime.now(timezone.utc)  # back at midnight UTC
    to_midnight = (datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), timezone.utc) - now)
    assert abs(int(r.headers["retry-after"]) - to_midnight.total_seconds()) < 60
    r = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": "What is attention?"},
                    headers={**learner.h, "Accept": "text/event-stream"})
    assert r.status_code == 429 and r.json()["code"] == "daily_limit"
    sessions = client.get(f"/api/v1/courses/{eval_course.id}/tutor/sessions", headers=learner.h).json()
    assert len(sessions) == 2  # a refused ask opens no session


def test_cache_and_invalidation(client, make: Factory, worker):
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Cache"}, headers=inst.h).json()["id"]
    data = (EVAL / "transcripts" / "3b1b-bitcoin.srt").read_bytes()
    r = upload(client, cid, inst.h, "b.srt", data)
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    q = {"question": "What does a digital signature prove?"}
    first = client.post(f"/api/v1/courses/{cid}/ask", json=q, headers=inst.h).json()
    # spacing, the first letter's case and the closing "?" make no other question ("DIGITAL" would: the judge
    # reads a word in capitals as a name to look up, see test_the_cache_tells_a_name_from_a_word)
    again = client.post(f"/api/v1/courses/{cid}/ask", json={"question": "  what does a digital   signature prove "},
                        headers=inst.h).json()
    assert first["cached"] is False and again["cached"] is True and again["answer"] == first["answer"]
    # the course's videos change: the cache no longer answers
    r = upload(client, cid, inst.h, "more.vtt", (EVAL / "transcripts" / "mit-18.06-linear-algebra-lec1.vtt").read_bytes())
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    third = client.post(f"/api/v1/courses/{cid}/ask", json=q, headers=inst.h).json()
    assert third["cached"] is False
    assert client.post(f"/api/v1/courses/{cid}/ask", json=q, headers=inst.h).json()["cached"] is True
    # a video deleted: the cache no longer answers either
    assert client.delete(f"/api/v1/courses/{cid}/videos/{r.json()['video_id']}", headers=inst.h).status_code == 204
    assert client.post(f"/api/v1/courses/{cid}/ask", json=q, headers=inst.h).json()["cached"] is False


def test_socratic_mode_gives_hints(client, make: Factory, worker):
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Socratic"}, headers=inst.h).json()["id"]
    r = upload(client, cid, inst.h, "b.srt", (EVAL / "transcripts" / "3b1b-bitcoin.srt").read_bytes())
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    assert client.patch(f"/api/v1/courses/{cid}/tutor", json={"mode": "socratic"}, headers=inst.h).status_code == 200
    body = client.post(f"/api/v1/courses/{cid}/ask", json={"question": "What does a digital signature prove?"},
                       headers=inst.h).json()
    assert body["mode"] == "socratic" and body["grounded"] and body["citations"]
    assert "Rewatch" in body["answer"] and "“" not in body["answer"]  # a pointer and a question, not the quote
    assert all(c["quote"] == "" and c["end"] > c["start"] for c in body["citations"])  # nor does a citation
    assert client.patch(f"/api/v1/courses/{cid}/tutor", json={"mode": "lecture"}, headers=inst.h).status_code == 400


def test_a_course_in_answer_mode_answers_during_an_open_assignment(client, make: Factory, worker):
    """Socratic mode came on with any open assignment whatever the course said: one published without a closing
    date made every ask Socratic for good. 'auto' (the default) does that; 'answer' answers regardless."""
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Modes"}, headers=inst.h).json()["id"]
    r = upload(client, cid, inst.h, "b.srt", (EVAL / "transcripts" / "3b1b-bitcoin.srt").read_bytes())
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    q = {"question": "What does a digital signature prove?"}
    assert client.get(f"/api/v1/courses/{cid}/tutor", headers=inst.h).json() == {
        "course_id": cid, "mode": "auto", "in_effect": "answer"}
    a = client.post(f"/api/v1/courses/{cid}/assignments", headers=inst.h, json={
        "type": "short_answer", "title": "Signatures", "prompt": "What does a signature prove?",
        "reference_answer": "That the owner of the key approved the message."}).json()
    assert client.post(f"/api/v1/assignments/{a['id']}/publish", headers=inst.h).status_code == 200  # no closes_at
    assert client.post(f"/api/v1/courses/{cid}/ask", json=q, headers=inst.h).json()["mode"] == "socratic"
    r = client.patch(f"/api/v1/courses/{cid}/tutor", json={"mode": "answer"}, headers=inst.h)
    assert r.json() == {"course_id": cid, "mode": "answer", "in_effect": "answer"}, r.text
    body = client.post(f"/api/v1/courses/{cid}/ask", json=q, headers=inst.h).json()
    assert body["mode"] == "answer" and body["citations"][0]["quote"]
    r = client.patch(f"/api/v1/courses/{cid}/tutor", json={"mode": "auto"}, headers=inst.h)
    assert r.json()["in_effect"] == "socratic"


def test_bad_ask_bodies(eval_course: EvalCourse, client):
    for body, field in (({}, "question"), ({"question": ""}, "question"), ({"question": "\u200b \u2060"}, "question"),
                        ({"question": "x" * 2001}, "question"), ({"question": "what\x1b[2J is\x07 this"}, "question"),
                        ({"question": "hi", "session_id": "a"}, "session_id")):
        r = client.post(f"/api/v1/courses/{eval_course.id}/ask", json=body, headers=eval_course.learner.h)
        assert r.status_code == 400 and r.json()["field"] == field, (body, r.text)


def test_cli_ask_json_as_owner_or_a_learner(eval_course: EvalCourse, client, make: Factory, data_dir):
    """The REST API's JSON; --as asks as that user (their session, their quota); --session continues it; a user who may not see the
    course is refused before anything is asked."""
    def cli(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli", "ask", str(eval_course.id), *extra],
                              cwd=ROOT, env=clean_env(data_dir), capture_output=True, text=True, timeout=180)

    out = cli("What is a digital signature?", "--json")  # as the course's owner
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["grounded"] and body["citations"] and set(body) >= {"answer", "grounded", "citations", "follow_ups",
                                                                  "session_id"}
    learner = eval_course.learner
    out = cli("What is a digital signature?", "--json", "--as", str(learner.id))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["session_id"] != body["session_id"]
    sid = json.loads(out.stdout)["session_id"]
    out = cli("And who can check it?", "--json", "--as", str(learner.id), "--session", str(sid))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["session_id"] == sid
    turns = client.get(f"/api/v1/tutor/sessions/{sid}", headers=learner.h).json()["turns"]
    assert [t["question"] for t in turns][-2:] == ["What is a digital signature?", "And who can check it?"]
    out = cli("And who can check it?", "--as", str(learner.id), "--session", "987654321")  # a refusal REST gives
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == "studyhall: tutor session 987654321 not found"
    outsider = make.user("learner")  # not in the course: refused before anything is asked
    out = cli("What is a digital signature?", "--as", str(outsider.id), "--session", str(sid))
    assert out.returncode == 2 and "not found" in out.stderr and not out.stdout


def test_cli_ask_prints_a_decline(eval_course: EvalCourse, data_dir):
    """A decline is not streamed: the CLI still prints it, with no citations."""
    out = subprocess.run([sys.executable, "-m", "server.cli", "ask", str(eval_course.id),
                          "Which wine goes best with sourdough bread?"], cwd=ROOT, env=clean_env(data_dir),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "don't cover" in out.stdout and "[1]" not in out.stdout


def test_open_assignment_switches_to_socratic(client, make: Factory, worker, settings):
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Open assignment"}, headers=inst.h).json()["id"]
    r = upload(client, cid, inst.h, "b.srt", (EVAL / "transcripts" / "3b1b-bitcoin.srt").read_bytes())
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    q = {"question": "What does a digital signature prove?"}
    assert client.post(f"/api/v1/courses/{cid}/ask", json=q, headers=inst.h).json()["mode"] == "answer"
    fetch(settings, """INSERT INTO assignments (course_id, type, title, prompt, reference_answer, status)
                       VALUES ($1, 'short_answer', 'Signatures', 'Explain signatures', 'They prove consent', 'published')""",
          cid)
    body = client.post(f"/api/v1/courses/{cid}/ask", json=q, headers=inst.h).json()
    assert body["mode"] == "socratic" and "Rewatch" in body["answer"]


def test_question_normalization_keeps_symbols():
    from store.tutor import question_hash

    assert question_hash("What is a Hash?") == question_hash("  what is a   hash")
    assert question_hash("what is x^2?") != question_hash("what is x*2?")
    assert question_hash("is P != NP") != question_hash("is P = NP")
    assert question_hash("How does RoPE work?", ["RoPE"]) != question_hash("how does rope work", [])
    import unicodedata  # an accent's encoding, a full-width question mark: the same question

    assert question_hash(unicodedata.normalize("NFD", "Wer war Gödel?")) == question_hash("wer war gödel？")


def test_a_tutor_mention_is_a_word_of_its_own():
    """"@tutor" inside a link, a code span or a longer name asked the tutor (and took a question of the quota)."""
    from server.tutoring import TUTOR_MENTION

    for text in ("@tutor why?", "hey @Tutor, why?", "why? @tutor", "(@tutor) why", "why @tutor."):
        assert TUTOR_MENTION.search(text), text
    for text in ("mail bob@tutor.com", "see https://mastodon.social/@tutor/123", "use `@tutor` to ask",
                 "@tutor-bot hi", "@tutors hi", "x@tutor"):
        assert not TUTOR_MENTION.search(text), text


def test_the_cache_tells_a_name_from_a_word(eval_course: EvalCourse, client):
    """"how does rope work" and "How does RoPE work?" normalize alike, but the judge reads a name the course never
    says only in the second: it is declined, not served the first one's cached answer."""
    h = eval_course.learner.h
    first = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": "how does rope work"}, headers=h)
    assert first.status_code == 200, first.text
    named = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": "How does RoPE work?"}, headers=h)
    assert named.status_code == 200, named.text
    body = named.json()
    assert body["cached"] is False and body["grounded"] is False and body["citations"] == []
    again = client.post(f"/api/v1/courses/{eval_course.id}/ask", json={"question": "how does RoPE work"}, headers=h)
    assert again.json()["cached"] is True and again.json()["grounded"] is False


def test_a_session_is_made_with_its_first_answer(eval_course: EvalCourse, make: Factory, settings):
    """An ask that fails between its checks and its answer leaves no empty session in the learner's list: the
    session is stored with the first turn, in one transaction."""
    import asyncio
    from types import SimpleNamespace

    from redis.asyncio import Redis

    from server.auth import AuthUser
    from server.tutoring import complete, prepare
    from store.db import create_pool

    learner = make.user("learner", tenant=eval_course.tenant)
    fetch(settings, "INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", eval_course.id, learner.id)
    user = AuthUser(id=learner.id, tenant_id=learner.tenant_id, tenant=eval_course.tenant, name=learner.name,
                    role="learner")
    sessions = lambda: fetch(settings, "SELECT id FROM tutor_sessions WHERE user_id = $1", learner.id)  # noqa: E731

    async def go() -> dict:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        redis = Redis.from_url(settings.redis_url)
        try:
            state = SimpleNamespace(settings=settings, pool=pool, redis=redis)
            prep = await prepare(state, user, eval_course.id, "What is a digital signature?")
            assert sessions() == []  # asked, not answered: a failure here would leave nothing
            return await complete(state, user, eval_course.id, prep)
        finally:
            await redis.aclose()
            await pool.close()

    out = asyncio.run(go())
    assert [s["id"] for s in sessions()] == [out["session_id"]] and out["grounded"]


def test_a_streamed_ask_ends_with_the_status_the_json_ask_would_give():
    """A deadlock, a course deleted mid-answer or a value Postgres refuses ended a streamed ask with a 500 where
    the JSON ask answers 409, 404 or 400 (README: the `error` event carries what the JSON ask would give)."""
    import asyncpg

    from server.api.tutor import stream_error

    assert stream_error(asyncpg.DeadlockDetectedError("deadlock detected"))["status"] == 409
    assert stream_error(asyncpg.SerializationError("could not serialize"))["code"] == "conflict"
    assert stream_error(asyncpg.ForeignKeyViolationError("gone"))["status"] == 404
    assert stream_error(asyncpg.DataError("out of range"))["status"] == 400
    assert stream_error(RuntimeError("a bug")) is None  # still a 500


def test_a_decline_while_a_video_is_still_being_ingested_says_so(eval_course: EvalCourse, client, settings):
    """(Tester) while a course's video was still in its first ingest, a question about it was declined as "the
    course videos don't cover this", with no word that a video could not be searched yet."""
    (vid,) = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'new', 'transcript', "
                             "'processing') RETURNING id", eval_course.id)
    try:
        body = client.post(f"/api/v1/courses/{eval_course.id}/ask",
                           json={"question": "What happened when the Mt. Gox bitcoin exchange collapsed in 2014?"},
                           headers=_fresh_learner(eval_course, client, settings).h).json()
        assert not body["grounded"] and "1 of the course's videos is still being indexed" in body["answer"], body
    finally:
        fetch(settings, "DELETE FROM videos WHERE id = $1", vid["id"])


def test_a_question_whose_hold_went_with_its_course_is_not_told_the_daily_limit(make, settings, eval_course):
    """(Review) a room question's hold went with its course, deleted as the question was being taken: nothing was
    taken, yet the asker was told the daily limit was reached (429)."""
    import asyncio

    import pytest
    from redis.asyncio import Redis
    from types import SimpleNamespace

    from server.auth import AuthUser
    from server.errors import ApiError
    from server.tutoring import prepare
    from store import tutor as repo
    from store.db import create_pool

    learner = make.user("learner", tenant=eval_course.tenant)
    fetch(settings, "INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", eval_course.id, learner.id)
    user = AuthUser(id=learner.id, tenant_id=learner.tenant_id, tenant=eval_course.tenant, name=learner.name,
                    role="learner")

    async def go() -> ApiError:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        redis = Redis.from_url(settings.redis_url)
        try:
            async with pool.acquire() as conn:
                pending = await repo.hold(conn, "gone-proc", learner.id, eval_course.id)
                await conn.execute("DELETE FROM tutor_pending WHERE id = $1", pending)  # (as the cascade did)
            state = SimpleNamespace(settings=settings, pool=pool, redis=redis)
            with pytest.raises(ApiError) as caught:
                await prepare(state, user, eval_course.id, "What is a digital signature?", pending=pending)
            return caught.value
        finally:
            await redis.aclose()
            await pool.close()

    err = asyncio.run(go())
    assert err.status_code == 404, err
    assert fetch(settings, "SELECT coalesce(sum(used), 0) AS n FROM tutor_quota WHERE user_id = $1",
                 learner.id)[0]["n"] == 0
