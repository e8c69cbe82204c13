"""Assignments over real HTTP: instructor CRUD, drafts, integrity, multiple choice graded at once (with the
`grade.ready` event), and bad submissions refused with nothing stored."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from tests.conftest import Factory, fetch
from tests.server.conftest import Client, make_course

MC = {"type": "multiple_choice", "title": "Stacks", "prompt": "Which structure is LIFO?",
      "options": ["queue", "stack", "heap", "tree"], "correct": [1], "difficulty": "easy"}
MULTI = {"type": "multiple_choice", "title": "Sorting", "prompt": "Which sorts are O(n log n) on average?",
         "options": ["merge sort", "bubble sort", "quicksort", "insertion sort"], "correct": [0, 2]}
WRITTEN = {"type": "short_answer", "title": "Binary search", "prompt": "How does binary search work?",
           "reference_answer": "It halves the sorted interval at every step."}


def published(client, course, body: dict) -> dict:  # type: ignore[no-untyped-def]
    h = course.instructor.h
    r = client.post(f"/api/v1/courses/{course.id}/assignments", json=body, headers=h)
    assert r.status_code == 201, r.text
    r = client.post(f"/api/v1/assignments/{r.json()['id']}/publish", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "published"
    return r.json()


def count_submissions(settings, assignment_id: int) -> int:  # type: ignore[no-untyped-def]
    return fetch(settings, "SELECT count(*) AS n FROM submissions WHERE assignment_id = $1", assignment_id)[0]["n"]


def test_instructor_crud_drafts_and_integrity(server, client, make: Factory):
    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    r = client.post(f"/api/v1/courses/{course.id}/assignments", json=WRITTEN, headers=inst.h)
    assert r.status_code == 201, r.text
    a = r.json()
    assert a["status"] == "draft" and a["rubric"] == [
        {"name": "correctness", "points": 100.0, "description": "The answer is correct and complete."}]
    assert a["reference_answer"] == WRITTEN["reference_answer"]
    # drafts are invisible to learners
    assert client.get(f"/api/v1/assignments/{a['id']}", headers=learner.h).status_code == 404
    assert client.get(f"/api/v1/courses/{course.id}/assignments", headers=learner.h).json()["items"] == []
    assert client.post(f"/api/v1/assignments/{a['id']}/submissions", json={"answer": "x"},
                       headers=learner.h).status_code == 404
    r = client.patch(f"/api/v1/assignments/{a['id']}", headers=inst.h, json={
        "rubric": [{"name": "idea", "points": 70, "description": "halving"},
                   {"name": "precondition", "points": 30, "description": "sorted input"}], "difficulty": "hard"})
    assert r.status_code == 200 and [c["name"] for c in r.json()["rubric"]] == ["idea", "precondition"]
    assert client.post(f"/api/v1/assignments/{a['id']}/publish", headers=inst.h).status_code == 200
    # learners see the rubric but never the reference answer or the correct options
    seen = client.get(f"/api/v1/assignments/{a['id']}", headers=learner.h).json()
    assert seen["difficulty"] == "hard" and "reference_answer" not in seen and "correct" not in seen
    mc = published(client, course, MC)
    listed = client.get(f"/api/v1/courses/{course.id}/assignments", headers=learner.h).json()["items"]
    assert {x["id"] for x in listed} == {a["id"], mc["id"]} and all("correct" not in x for x in listed)
    assert client.get(f"/api/v1/assignments/{mc['id']}", headers=inst.h).json()["correct"] == [1]
    r = client.patch(f"/api/v1/assignments/{mc['id']}", json={"reference_answer": "LIFO"}, headers=inst.h)
    assert r.status_code == 400 and r.json()["field"] == "reference_answer"  # not stored and dropped unsaid
    # a written draft becoming multiple choice leaves its rubric behind without being told to
    draft = client.post(f"/api/v1/courses/{course.id}/assignments", json=WRITTEN, headers=inst.h).json()
    r = client.patch(f"/api/v1/assignments/{draft['id']}", json={k: MC[k] for k in ("type", "options", "correct")},
                     headers=inst.h)
    assert r.status_code == 200 and r.json()["rubric"] == [] and r.json()["type"] == "multiple_choice"
    # learners cannot change anything; another tenant's instructor cannot even see it
    assert client.patch(f"/api/v1/assignments/{a['id']}", json={"title": "x"}, headers=learner.h).status_code == 403
    other = make.user("instructor", tenant=f"other-{make.tenant}")
    for method, path in (("GET", f"/api/v1/assignments/{a['id']}"), ("PATCH", f"/api/v1/assignments/{a['id']}"),
                         ("DELETE", f"/api/v1/assignments/{a['id']}"),
                         ("POST", f"/api/v1/assignments/{a['id']}/publish"),
                         ("GET", f"/api/v1/courses/{course.id}/grading-queue"),
                         ("POST", f"/api/v1/courses/{course.id}/assignments")):
        r = client.request(method, path, headers=other.h, json=WRITTEN if method != "GET" else None)
        assert r.status_code == 404, (method, path, r.text)
    assert client.delete(f"/api/v1/assignments/{a['id']}", headers=inst.h).status_code == 204
    assert client.get(f"/api/v1/assignments/{a['id']}", headers=inst.h).status_code == 404


def test_bad_assignment_bodies_name_the_field(server, client, make: Factory):
    course = make_course(server, make, learners=0)
    url, h = f"/api/v1/courses/{course.id}/assignments", course.instructor.h
    cases = [
        ({**MC, "correct": [7]}, "correct"), ({**MC, "options": ["a"]}, "options"), ({**MC, "correct": []}, "correct"),
        ({**MC, "type": "poem"}, "type"), ({**WRITTEN, "reference_answer": ""}, "reference_answer"),
        ({**WRITTEN, "rubric": [{"name": "a", "points": 0}]}, "rubric[0].points"),
        ({**WRITTEN, "rubric": [{"name": "a", "points": 1}, {"name": "b", "points": 0.125}]}, "rubric[1].points"),
        ({**WRITTEN, "options": ["a", "b"]}, "options"), ({**WRITTEN, "difficulty": "extreme"}, "difficulty"),
        ({**WRITTEN, "video_id": 999999999}, "video_id"), ({**WRITTEN, "surprise": 1}, "surprise"),
        ({**WRITTEN, "opens_at": "2030-01-02T00:00:00Z", "closes_at": "2030-01-01T00:00:00Z"}, "closes_at"),
        # nothing visible, control characters, a weight no score can be given in (every answer scored 0)
        ({**MC, "options": ["queue", "\u200b\u200b", "heap"]}, "options[1]"),
        ({**MC, "options": ["queue", "stack\nheap"]}, "options[1]"), ({**MC, "prompt": "Which \x1b[2J?"}, "prompt"),
        ({**WRITTEN, "rubric": [{"name": " \u3164 ", "points": 1, "description": "d"}]}, "rubric[0].name"),
        ({**WRITTEN, "rubric": [{"name": "a", "points": 1e-9, "description": "d"}]}, "rubric[0].points"),
        ({**WRITTEN, "reference_answer": "halves\x07"}, "reference_answer"),
        # nothing visible to grade against
        ({**WRITTEN, "reference_answer": "\u200b\u200b"}, "reference_answer"),
        ({**WRITTEN, "reference_answer": "", "rubric": [{"name": "a", "points": 1, "description": "\u3164"}]},
         "reference_answer"),
        # options (and criteria) that read the same are the same, as poll options are
        ({**MC, "options": ["Yes", "\uff39es", "No"]}, "options"), ({**MC, "options": ["Yes", "Yes\u200b"]}, "options"),
        ({**WRITTEN, "rubric": [{"name": "Idea", "points": 1, "description": "d"},
                                {"name": "idea\u200b", "points": 1, "description": "d"}]}, "rubric"),
        # what multiple choice does not use is refused, not dropped unsaid
        ({**MC, "reference_answer": "a stack"}, "reference_answer"),
        ({**MC, "rubric": [{"name": "a", "points": 1, "description": "d"}]}, "rubric"),
        # every option correct: choosing them all was a free 100 (and perfect-score XP)
        ({**MC, "options": ["yes", "no"], "correct": [0, 1]}, "correct"),
    ]
    for body, field in cases:
        r = client.post(url, json=body, headers=h)
        assert r.status_code in (400, 404), (body, r.text)
        assert r.json().get("field") == field, (body, r.json())
    assert fetch(make.settings, "SELECT count(*) AS n FROM assignments WHERE course_id = $1",
                 course.id)[0]["n"] == 0
    # a PATCH is held to the same rules: every option correct, or the reference answer taken from an assignment
    # with the default criterion (answers were then graded against its words alone)
    mc = client.post(url, json={**MC, "options": ["a", "b", "c"], "correct": [0]}, headers=h).json()
    r = client.patch(f"/api/v1/assignments/{mc['id']}", json={"correct": [0, 1, 2]}, headers=h)
    assert r.status_code == 400 and r.json()["field"] == "correct", r.text
    written = client.post(url, json={**WRITTEN, "reference_answer": "halves the range"}, headers=h).json()
    for gone in ("", None, "\u200b"):
        r = client.patch(f"/api/v1/assignments/{written['id']}", json={"reference_answer": gone}, headers=h)
        assert r.status_code == 400 and r.json()["field"] == "reference_answer", (gone, r.text)
    # a description of invisible characters is stored as none
    r = client.post(url, json={**WRITTEN, "rubric": [{"name": "a", "points": 1, "description": "\u200b"}]}, headers=h)
    assert r.status_code == 201 and r.json()["rubric"][0]["description"] == "", r.text


async def test_multiple_choice_is_graded_at_once_and_announced(server, client, make: Factory, settings):
    course = make_course(server, make, learners=2)
    (learner, other) = course.learners
    single, multi = published(client, course, MC), published(client, course, MULTI)
    ws = await Client.connect(server, course.room, learner)
    try:
        r = client.post(f"/api/v1/assignments/{single['id']}/submissions", json={"answer": [0]}, headers=learner.h)
        assert r.status_code == 201, r.text
        wrong = r.json()
        assert wrong["status"] == "graded" and wrong["score"] == 0 and wrong["confidence"] == 1.0
        assert (await ws.expect("grade.ready", submission_id=wrong["id"]))["passed"] is False
        right = client.post(f"/api/v1/assignments/{single['id']}/submissions", json={"answer": [1]},
                            headers=learner.h).json()
        assert right["score"] == 100 and right["attempt"] == 2 and right["feedback"]["right"] == "Correct."
        ev = await ws.expect("grade.ready", submission_id=right["id"])
        assert ev["score"] == 100 and ev["passed"] and ev["assignment_id"] == single["id"]
        # several correct options: all of them is full marks; a right and a wrong pick cancel out
        assert client.post(f"/api/v1/assignments/{multi['id']}/submissions", json={"answer": [2, 0]},
                           headers=learner.h).json()["score"] == 100
        assert client.post(f"/api/v1/assignments/{multi['id']}/submissions", json={"answer": [0]},
                           headers=learner.h).json()["score"] == 50
        assert client.post(f"/api/v1/assignments/{multi['id']}/submissions", json={"answer": [0, 1]},
                           headers=learner.h).json()["score"] == 0
    finally:
        await ws.close()
    # revision history: every attempt is kept; a learner sees only their own
    mine = client.get(f"/api/v1/assignments/{single['id']}/submissions", headers=learner.h).json()["items"]
    assert [s["attempt"] for s in mine] == [2, 1]
    assert client.get(f"/api/v1/assignments/{single['id']}/submissions", headers=other.h).json()["items"] == []
    assert client.get(f"/api/v1/submissions/{right['id']}", headers=other.h).status_code == 404
    assert client.get(f"/api/v1/submissions/{right['id']}", headers=learner.h).json()["score"] == 100
    staff = client.get(f"/api/v1/assignments/{single['id']}/submissions", headers=course.instructor.h).json()
    assert len(staff["items"]) == 2 and staff["items"][0]["user_name"] == learner.name


def test_bad_submissions_are_refused_and_nothing_is_stored(server, client, make: Factory, settings):
    course = make_course(server, make, learners=1, published=True)  # visible to the tenant's learners
    inst, (learner,) = course.instructor, course.learners
    mc = published(client, course, {**MC, "max_attempts": 1})
    written = published(client, course, WRITTEN)
    essay = published(client, course, {**WRITTEN, "type": "essay", "title": "Essay"})
    past = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    future = (datetime.now(timezone.utc) + timedelta(days=1)).isoformat()
    closed = published(client, course, {**MC, "title": "Closed", "closes_at": past})
    not_yet = published(client, course, {**MC, "title": "Later", "opens_at": future})
    stranger = make.user("learner")  # same tenant, sees the published course, not enrolled
    sub = lambda a, body, who=learner: client.post(f"/api/v1/assignments/{a['id']}/submissions", json=body,  # noqa: E731
                                                   headers=who.h)
    cases = [
        (sub(written, {"answer": "x" * 2001}), 400, "too_long"),
        (sub(essay, {"answer": "x" * 20_001}), 400, "too_long"),
        (sub(written, {"answer": "   "}), 400, "bad_request"),
        (sub(written, {"answer": [0]}), 400, "bad_request"),
        (sub(mc, {"answer": "stack"}), 400, "bad_request"),
        (sub(mc, {"answer": [9]}), 400, "bad_request"),
        (sub(mc, {"answer": [1, 2]}), 400, "bad_request"),
        (sub(mc, {"answer": [1, 1]}), 400, "bad_request"),
        (sub(mc, {"answer": True}), 400, "bad_request"),
        (sub(mc, {}), 400, "bad_request"),
        (sub(closed, {"answer": [1]}), 409, "closed"),
        (sub(not_yet, {"answer": [1]}), 409, "not_open"),
        (sub(not_yet, {"answer": [9]}), 409, "not_open"),  # nothing about the hidden options (their count)
        (sub(not_yet, {"answer": [0, 1]}), 409, "not_open"),
        (sub(written, {"answer": "\u200b\u200b"}), 400, "bad_request"),  # nothing visible
        (sub(written, {"answer": "halves\x1b[2J\x07"}), 400, "bad_request"),  # staff read it: no terminal escapes
        (sub(written, {"answer": "halves\u009b"}), 400, "bad_request"),
        (sub(written, {"answer": "halves"}, stranger), 403, "not_enrolled"),
        (sub(written, {"answer": "halves"}, inst), 403, "forbidden"),
    ]
    for r, status, code in cases:
        assert r.status_code == status and r.json()["code"] == code, (status, code, r.text)
    for a in (mc, written, essay, closed, not_yet):
        assert count_submissions(settings, a["id"]) == 0
    assert sub(mc, {"answer": [1]}).status_code == 201
    r = sub(mc, {"answer": [1]})
    assert r.status_code == 409 and r.json()["code"] == "attempts_exhausted" and "1 attempts" in r.json()["message"]
    assert count_submissions(settings, mc["id"]) == 1


async def test_a_corrected_answer_key_scores_the_answers_again(server, client, make: Factory, settings):
    """A wrong key fixed after learners answered: their answers are scored again (announced, the new passes
    earn XP, the history says why); the number of options, which stored answers point into, cannot change."""
    course = make_course(server, make, learners=2)
    a, b = course.learners
    item = published(client, course, MC)
    url = f"/api/v1/assignments/{item['id']}"
    first = client.post(f"{url}/submissions", json={"answer": [1]}, headers=a.h).json()
    second = client.post(f"{url}/submissions", json={"answer": [2]}, headers=b.h).json()
    assert (first["score"], second["score"]) == (100, 0)
    ws = await Client.connect(server, course.room, b)
    try:
        r = client.patch(url, json={"correct": [2]}, headers=course.instructor.h)
        assert r.status_code == 200 and r.json()["correct"] == [2]
        assert (await ws.expect("grade.ready", submission_id=second["id"]))["passed"] is True
    finally:
        await ws.close()
    assert client.get(f"/api/v1/submissions/{first['id']}", headers=a.h).json()["score"] == 0
    again = client.get(f"/api/v1/submissions/{second['id']}", headers=course.instructor.h).json()
    assert again["score"] == 100 and again["history"][-1]["reason"] == "the answer key changed"
    assert fetch(settings, "SELECT count(*) AS n FROM xp_events WHERE user_id = $1 AND kind = 'assignment_passed'",
                 b.id)[0]["n"] == 1
    r = client.patch(url, json={"options": ["queue", "stack", "heap"], "correct": [1]}, headers=course.instructor.h)
    assert r.status_code == 409 and r.json()["field"] == "options"
    r = client.patch(url, json={"options": ["a queue", "a stack", "a heap", "a tree"]}, headers=course.instructor.h)
    assert r.status_code == 200  # wording may change


async def test_a_lowered_grade_takes_its_xp_back_and_a_raised_one_earns_again(server, client, make: Factory, settings):
    """XP follows the learner's best grade on the assignment: a corrected key that fails a perfect answer took back
    neither the pass nor the perfect-score bonus (the boards kept 150 XP for a grade of 0). Now both are taken back
    (`xp.revoked`), and earned again when the grade comes back; a better attempt keeps them whatever a worse one
    scores."""
    course = make_course(server, make, learners=2)
    a, b = course.learners
    item = published(client, course, {**MC, "max_attempts": 2})
    url = f"/api/v1/assignments/{item['id']}"

    def xp_of(user) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
        me = client.get("/api/v1/me/stats", headers=user.h).json()
        board = client.get(f"/api/v1/leaderboards/course/{course.id}?period=all", headers=user.h).json()
        assert board["me"] is None or board["me"]["xp"] == me["xp"], (board, me)
        return me["xp"], {k: v for k, v in me["counts"].items() if k in ("assignment_passed", "perfect_score")}

    assert client.post(f"{url}/submissions", json={"answer": [1]}, headers=a.h).json()["score"] == 100
    assert client.post(f"{url}/submissions", json={"answer": [1]}, headers=b.h).json()["score"] == 100
    assert client.post(f"{url}/submissions", json={"answer": [0]}, headers=b.h).json()["score"] == 0
    assert xp_of(a) == xp_of(b) == (150, {"assignment_passed": 1, "perfect_score": 1})  # b's best attempt counts
    ws = await Client.connect(server, course.room, a)
    try:
        assert client.patch(url, json={"correct": [2]}, headers=course.instructor.h).status_code == 200
        taken = {(await ws.expect("xp.revoked"))["kind"] for _ in range(2)}
        assert taken == {"assignment_passed", "perfect_score"}
    finally:
        await ws.close()
    assert xp_of(a) == xp_of(b) == (0, {"assignment_passed": 0, "perfect_score": 0})
    # b's second attempt is now the right one: their best is 100 again, so they earn again; a stays at 0
    assert client.patch(url, json={"correct": [0]}, headers=course.instructor.h).status_code == 200
    assert xp_of(a)[0] == 0 and xp_of(b) == (150, {"assignment_passed": 1, "perfect_score": 1})
    assert client.patch(url, json={"correct": [1]}, headers=course.instructor.h).status_code == 200
    assert xp_of(a) == xp_of(b) == (150, {"assignment_passed": 1, "perfect_score": 1})
    keys = {r["idempotency_key"] for r in fetch(settings, "SELECT idempotency_key FROM xp_events WHERE user_id = $1",
                                                 a.id)}
    aid = item["id"]
    assert keys == {f"assignment:{aid}", f"perfect:{aid}", f"revoke:assignment:{aid}", f"revoke:perfect:{aid}",
                    f"assignment:{aid}#2", f"perfect:{aid}#2"}
    assert fetch(settings, "SELECT count(*) AS n FROM xp_events WHERE user_id = $1 AND kind = 'revoked'",
                 b.id)[0]["n"] == 2  # b: taken back once, earned again under #2, then kept (best stayed 100)


def test_an_answered_assignment_is_deleted_only_on_purpose(server, client, make: Factory, settings):
    course = make_course(server, make, learners=1)
    (learner,) = course.learners
    item = published(client, course, MC)
    fetch(settings, """UPDATE assignments SET citation = '{"video_id": 1, "start": 3.0, "text": "A stack is LIFO."}'
                       WHERE id = $1""", item["id"])
    seen = client.get(f"/api/v1/assignments/{item['id']}", headers=learner.h).json()
    assert seen["citation"]["start"] == 3.0 and seen["citation"]["text"] is None  # the key's own sentence is staff's
    assert client.get(f"/api/v1/assignments/{item['id']}",
                      headers=course.instructor.h).json()["citation"]["text"] == "A stack is LIFO."
    client.post(f"/api/v1/assignments/{item['id']}/submissions", json={"answer": [1]}, headers=learner.h)
    r = client.delete(f"/api/v1/assignments/{item['id']}", headers=course.instructor.h)
    assert r.status_code == 409 and r.json()["code"] == "has_submissions"
    assert count_submissions(settings, item["id"]) == 1
    assert client.delete(f"/api/v1/assignments/{item['id']}?force=true", headers=course.instructor.h).status_code == 204
    assert count_submissions(settings, item["id"]) == 0


def test_an_override_keeps_criteria_adding_up():
    from server.api.submissions import rescale

    crit = [{"name": "idea", "points": 60.0, "score": 0.0}, {"name": "complexity", "points": 40.0, "score": 40.0}]
    assert [c["score"] for c in rescale(crit, 100)] == [60.0, 40.0]
    crit = [{"name": "idea", "points": 60.0, "score": 50.0}, {"name": "complexity", "points": 40.0, "score": 40.0}]
    assert [c["score"] for c in rescale(crit, 100)] == [60.0, 40.0]
    assert sum(c["score"] for c in rescale(crit, 45)) == 45.0
    assert [c["score"] for c in rescale(crit, 0)] == [0.0, 0.0]
    twice = rescale(rescale(crit, 45), 30)  # overridden again: the note once
    assert all(c["justification"].count("Adjusted by the instructor.") == 1 for c in twice), twice
    # criteria worth hundredths: each stays within its points and they add up to the total (rounding to tenths
    # gave 0.05 -> 0.0 and 99.95 -> 100.0, or 33.4 of 33.35 twice, 100.1 in all)
    small = [{"name": "a", "points": 0.05, "score": 0.0}, {"name": "b", "points": 99.95, "score": 50.0}]
    assert [c["score"] for c in rescale(small, 100)] == [0.05, 99.95]
    thirds = [{"name": n, "points": p, "score": 10.0} for n, p in (("a", 33.35), ("b", 33.35), ("c", 33.3))]
    for total in (100, 50, 33.3, 0.1):
        got = rescale(thirds, total)
        assert round(sum(c["score"] for c in got), 2) == total, (total, got)
        assert all(0 <= c["score"] <= c["points"] for c in got), got


def test_an_answer_arriving_while_the_key_changes_is_graded_with_the_new_key(server, client, make: Factory, settings):
    """A submission read the assignment before a key change committed and graded with the old key, which the
    change's regrade could not see yet: now it waits for the change and is graded with what was committed."""
    import asyncio
    import threading

    import asyncpg

    course = make_course(server, make, learners=1)
    (learner,) = course.learners
    item = published(client, course, MC)
    got: list[dict] = []

    async def change_key_slowly() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM assignments WHERE id = $1 FOR UPDATE", item["id"])
                await conn.execute("UPDATE assignments SET correct = '[2]' WHERE id = $1", item["id"])
                t = threading.Thread(target=lambda: got.append(client.post(
                    f"/api/v1/assignments/{item['id']}/submissions", json={"answer": [2]}, headers=learner.h).json()))
                t.start()
                await asyncio.sleep(1.0)  # the answer arrives while the change is under way
                assert not got
        finally:
            await conn.close()
        await asyncio.to_thread(t.join, 30)

    asyncio.run(change_key_slowly())
    assert got and got[0]["score"] == 100, got


@pytest.mark.parametrize(("change", "status", "field"), [
    ("options = '[\"a\", \"b\"]', correct = '[0]'", 400, "answer"),  # option 3 is gone
    ("type = 'short_answer', options = '[]', correct = '[]', reference_answer = 'x'", 409, None)])
def test_an_answer_checked_before_an_edit_committed_is_checked_again(server, client, make: Factory, settings,
                                                                    change, status, field):
    """An answer was checked against the assignment as it was, then stored against the edited one (an option
    that no longer exists; a list of indexes as a written answer). Nobody had answered, so the edit was allowed."""
    import asyncio
    import threading

    import asyncpg

    course = make_course(server, make, learners=1)
    (learner,) = course.learners
    item = published(client, course, MC)
    got: list[httpx.Response] = []

    async def edit_slowly() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM assignments WHERE id = $1 FOR UPDATE", item["id"])
                await conn.execute(f"UPDATE assignments SET {change} WHERE id = $1", item["id"])
                t = threading.Thread(target=lambda: got.append(client.post(
                    f"/api/v1/assignments/{item['id']}/submissions", json={"answer": [3]}, headers=learner.h)))
                t.start()
                await asyncio.sleep(1.0)  # checked against the old version, now waiting for the edit
                assert not got
        finally:
            await conn.close()
        await asyncio.to_thread(t.join, 30)

    asyncio.run(edit_slowly())
    assert got[0].status_code == status and got[0].json().get("field") == field, got[0].text
    assert not fetch(settings, "SELECT 1 FROM submissions WHERE assignment_id = $1", item["id"])


def test_a_rubric_stored_before_the_two_decimal_rule_stays_editable(server, client, make: Factory, settings):
    course = make_course(server, make, learners=0)
    h = course.instructor.h
    a = client.post(f"/api/v1/courses/{course.id}/assignments", json=WRITTEN, headers=h).json()
    fetch(settings, "UPDATE assignments SET rubric = $2::jsonb WHERE id = $1", a["id"], json.dumps(
          [{"name": "a", "points": 33.333, "description": ""}, {"name": "b", "points": 66.667, "description": ""}]))
    r = client.patch(f"/api/v1/assignments/{a['id']}", json={"title": "Renamed"}, headers=h)
    assert r.status_code == 200 and r.json()["title"] == "Renamed", r.text
    r = client.patch(f"/api/v1/assignments/{a['id']}", json={"rubric": [{"name": "a", "points": 0.125}]}, headers=h)
    assert r.status_code == 400 and r.json()["field"] == "rubric[0].points"


def _result(aid: int, *, chapter_id: int | None, video_id: int, difficulty: str = "easy", score: float | None = None,
            opens_at: datetime | None = None, concept: str = "", chapter_title: str | None = None) -> dict:
    """A row as `store.submissions.learner_results` returns it."""
    return {"assignment_id": aid, "title": f"item {aid}", "type": "multiple_choice", "difficulty": difficulty,
            "max_attempts": 1, "opens_at": opens_at, "closes_at": None, "video_id": video_id,
            "chapter_id": chapter_id, "concept": concept, "citation": None, "chapter_start": 0.0,
            "chapter_end": 60.0, "chapter_title": chapter_title, "video_title": f"video {video_id}",
            "youtube_id": None, "scores": [] if score is None else [score], "attempts": 0 if score is None else 1,
            "last_at": None if score is None else datetime.now(timezone.utc)}


def test_the_next_item_is_one_the_learner_can_take_now_from_the_concept_they_struggle_with():
    """Chapter and video ids are separate counters: an item on video 7 is not in chapter 7. An item not open yet
    is not suggested; the suggestion's concept is named as in `concepts`."""
    from server.api.adaptive import next_step

    later = datetime.now(timezone.utc) + timedelta(days=3)
    rows = [_result(1, chapter_id=7, video_id=1, score=0.0, chapter_title="Pivots"),  # failed: chapter 7 is weak
            _result(2, chapter_id=None, video_id=7, difficulty="hard"),  # another video, whose id is 7
            _result(3, chapter_id=9, video_id=2, chapter_title="Determinants"),
            _result(4, chapter_id=7, video_id=1, opens_at=later, chapter_title="Pivots")]  # weak, but not open
    step = next_step(rows)  # type: ignore[arg-type]
    assert step.difficulty == "easy" and [s.chapter_id for s in step.struggling] == [7]
    assert step.next is not None and step.next.id == 3 and step.next.concept == "Determinants"
    rows.append(_result(5, chapter_id=7, video_id=1, chapter_title="Pivots"))
    assert next_step(rows).next.id == 5  # type: ignore[arg-type, union-attr]
    blocked = next_step(rows, cannot_submit="enroll in the course to practise")  # type: ignore[arg-type]
    assert blocked.next is None and blocked.reason.startswith("enroll in the course to practise; ")


def test_next_step_suggests_nothing_to_who_cannot_submit(server, client, make: Factory):
    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    assert client.patch(f"/api/v1/courses/{course.id}", json={"published": True}, headers=inst.h).status_code == 200
    later = (datetime.now(timezone.utc) + timedelta(days=3)).isoformat()
    soon = published(client, course, {**MC, "title": "Later", "opens_at": later})
    now = published(client, course, {**MC, "title": "Now"})
    assert client.get(f"/api/v1/courses/{course.id}/me/next", headers=learner.h).json()["next"]["id"] == now["id"]
    assert soon["id"] != now["id"]
    viewer = make.user("learner")  # sees the published free course without enrolling
    for who, why in ((viewer, "enroll in the course to practise"), (inst, "only learners submit answers")):
        r = client.get(f"/api/v1/courses/{course.id}/me/next", headers=who.h)
        assert r.status_code == 200 and r.json()["next"] is None and r.json()["reason"].startswith(why), r.text


def test_before_it_opens_learners_see_that_an_assignment_exists_not_its_questions(server, client, make: Factory):
    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    later = (datetime.now(timezone.utc) + timedelta(days=3)).isoformat()
    a = published(client, course, {**MC, "opens_at": later})
    for r in (client.get(f"/api/v1/assignments/{a['id']}", headers=learner.h).json(),
              client.get(f"/api/v1/courses/{course.id}/assignments", headers=learner.h).json()["items"][0]):
        assert r["title"] == MC["title"] and r["opens_at"] and r["prompt"] == "" and r.get("options", []) == [], r
    staff = client.get(f"/api/v1/assignments/{a['id']}", headers=inst.h).json()
    assert staff["prompt"] == MC["prompt"] and staff["options"] == MC["options"]


def test_answered_options_may_be_reworded_in_place_but_not_moved(server, client, make: Factory, settings):
    """Answers are stored as option positions: a reordered list turned a right answer into a wrong one."""
    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    a = published(client, course, MC)
    r = client.post(f"/api/v1/assignments/{a['id']}/submissions", json={"answer": [1]}, headers=learner.h)
    assert r.status_code == 201 and r.json()["score"] == 100
    moved = client.patch(f"/api/v1/assignments/{a['id']}", headers=inst.h,
                         json={"options": ["stack", "queue", "heap", "tree"], "correct": [0]})
    assert moved.status_code == 409 and moved.json()["field"] == "options", moved.text
    reworded = client.patch(f"/api/v1/assignments/{a['id']}", headers=inst.h,
                            json={"options": ["a queue", "a stack", "heap", "tree"]})
    assert reworded.status_code == 200, reworded.text
    assert fetch(settings, "SELECT score FROM submissions WHERE assignment_id = $1", a["id"])[0]["score"] == 100


def test_written_answers_are_rate_limited_per_learner(server, client, make: Factory):
    """Each written answer is a grading run (a model call, with one configured): bounded per learner. Multiple
    choice too, more generously (each stores an attempt and its grade)."""
    from server.api.submissions import CHOICE_BURST, CHOICE_PER_MINUTE, WRITTEN_BURST

    course = make_course(server, make, learners=1)
    (learner,) = course.learners
    past = (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()
    closed = published(client, course, {**WRITTEN, "closes_at": past})
    # refused answers (closed, no attempts left) are never graded: they do not use up the allowance
    assert {client.post(f"/api/v1/assignments/{closed['id']}/submissions", json={"answer": "It halves."},
                        headers=learner.h).status_code for _ in range(WRITTEN_BURST + 5)} == {409}
    a = published(client, course, WRITTEN)
    codes = [client.post(f"/api/v1/assignments/{a['id']}/submissions", json={"answer": f"It halves, {i}."},
                         headers=learner.h) for i in range(WRITTEN_BURST + 1)]
    assert [r.status_code for r in codes[:-1]] == [201] * WRITTEN_BURST, codes[0].text
    assert codes[-1].status_code == 429 and int(codes[-1].headers["Retry-After"]) >= 1, codes[-1].text
    closed_mc = published(client, course, {**MC, "title": "Closed MC", "closes_at": past})
    assert {client.post(f"/api/v1/assignments/{closed_mc['id']}/submissions", json={"answer": [1]},
                        headers=learner.h).status_code for _ in range(CHOICE_BURST + 5)} == {409}  # nothing taken
    mc = published(client, course, MC)  # multiple choice has an allowance of its own, a larger one
    # (it refills at one a second: on a loaded machine the burst takes longer than that, so the loop goes on until
    # refused and the answers stored are bounded by the burst plus the refill over the time it took)
    t0, codes = time.monotonic(), []
    while not codes or codes[-1].status_code == 201 and len(codes) <= 3 * CHOICE_BURST:
        codes.append(client.post(f"/api/v1/assignments/{mc['id']}/submissions", json={"answer": [len(codes) % 3]},
                                 headers=learner.h))
    took = time.monotonic() - t0
    assert [r.status_code for r in codes[:CHOICE_BURST]] == [201] * CHOICE_BURST, codes[0].text
    assert codes[-1].status_code == 429 and codes[-1].json()["code"] == "rate_limited", codes[-1].text
    stored = count_submissions(make.settings, mc["id"])  # a loop of them stored without bound
    assert stored == len(codes) - 1 and stored <= CHOICE_BURST + int(took * CHOICE_PER_MINUTE / 60) + 1, (stored, took)


async def test_a_retried_submit_with_its_idempotency_key_is_one_attempt(server, make: Factory, settings):
    """A lost response or a double click made a second attempt (or, with one attempt allowed, a 409 for the
    learner whose first had gone through)."""
    import asyncio

    import httpx

    course = make_course(server, make, learners=1)
    (learner,) = course.learners
    async with httpx.AsyncClient(base_url=server, timeout=30) as c:
        r = await c.post(f"/api/v1/courses/{course.id}/assignments", json={**MC, "max_attempts": 1},
                         headers=course.instructor.h)
        aid = r.json()["id"]
        assert (await c.post(f"/api/v1/assignments/{aid}/publish", headers=course.instructor.h)).status_code == 200
        h = {**learner.h, "Idempotency-Key": "quiz-1-try"}
        url = f"/api/v1/assignments/{aid}/submissions"
        first, second = await asyncio.gather(c.post(url, json={"answer": [1]}, headers=h),
                                             c.post(url, json={"answer": [1]}, headers=h))
        assert sorted([first.status_code, second.status_code]) == [200, 201], (first.text, second.text)
        assert first.json()["id"] == second.json()["id"] and first.json()["score"] == 100
        again = await c.post(url, json={"answer": [1]}, headers=h)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        changed = await c.post(url, json={"answer": [0]}, headers=h)  # the key of another answer: not dropped
        assert changed.status_code == 409 and changed.json()["code"] == "idempotency_key_reused", changed.text
        other = await c.post(url, json={"answer": [0]}, headers={**learner.h, "Idempotency-Key": "quiz-1-b"})
        assert other.status_code == 409 and other.json()["code"] == "attempts_exhausted"
        bad = await c.post(url, json={"answer": [1]}, headers={**learner.h, "Idempotency-Key": "x" * 101})
        assert bad.status_code == 400 and bad.json()["field"] == "Idempotency-Key"
        # (tester) a repeat returns its attempt also once the assignment opens later again (it was 409 not_open)
        later = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
        r = await c.patch(f"/api/v1/assignments/{aid}", json={"opens_at": later}, headers=course.instructor.h)
        assert r.status_code == 200, r.text
        again = await c.post(url, json={"answer": [1]}, headers=h)
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"], again.text
        fresh = await c.post(url, json={"answer": [1]}, headers={**learner.h, "Idempotency-Key": "quiz-1-c"})
        assert fresh.status_code == 409 and fresh.json()["code"] == "not_open", fresh.text
    assert count_submissions(settings, aid) == 1


def test_options_moved_or_only_respaced():
    from server.api.assignments import _moved

    assert _moved(["a", "b", "c"], ["b", "a", "c"]) and not _moved(["a", "b"], ["A ", "b"])
    assert not _moved(["a b", "a  b", "c"], ["a b", "a  b", "c"])  # the same list back is no move
    assert not _moved(["stack", "queue"], ["a stack", "queue"])  # reworded in place


def test_an_instructors_score_counts_as_it_is_shown(server, client, make: Factory, settings):
    """Scores show to one decimal: an override of 59.96 shows (and now counts) as 60, a pass with its XP, and
    99.97 as 100, a perfect score."""
    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    a = published(client, course, MC)
    s = client.post(f"/api/v1/assignments/{a['id']}/submissions", json={"answer": [0]}, headers=learner.h).json()
    r = client.post(f"/api/v1/submissions/{s['id']}/review", json={"score": 59.96}, headers=inst.h)
    assert r.status_code == 200 and r.json()["score"] == 60.0, r.text
    assert client.get(f"/api/v1/submissions/{s['id']}", headers=inst.h).json()["user_name"] == learner.name
    mine = client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).json()
    assert mine["score"] == 60.0 and mine["feedback"] is not None
    # (tester) the grader's "missing" and "improve" stood beside an instructor's full marks
    fetch(settings, """UPDATE submissions SET feedback = feedback || jsonb_build_object(
                           'missing', 'Your answer could also name 4 more ideas.', 'improve', 'Explain them.')
                       WHERE id = $1""", s["id"])
    client.post(f"/api/v1/submissions/{s['id']}/review", json={"score": 99.97}, headers=inst.h)
    kinds = {r["kind"] for r in fetch(settings, "SELECT kind FROM xp_events WHERE user_id = $1", learner.id)}
    assert {"assignment_passed", "perfect_score"} <= kinds, kinds
    fb = client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).json()["feedback"]
    assert "missing" not in fb and "improve" not in fb and "set the grade to 100 out of" in fb["right"], fb
    # (tester) lowered from the grader's 100, the grader's "Nothing essential is missing." stood beside a 20
    fetch(settings, """UPDATE submissions SET score = 100, feedback = feedback || jsonb_build_object(
                           'missing', 'Nothing essential is missing.', 'improve', 'Add why.') WHERE id = $1""", s["id"])
    client.post(f"/api/v1/submissions/{s['id']}/review", json={"score": 20, "comment": "Two steps are wrong."},
                headers=inst.h)
    fb = client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).json()["feedback"]
    assert "missing" not in fb and fb["comment"] == "Two steps are wrong." and "to 20 out of" in fb["right"], fb
    fetch(settings, "UPDATE submissions SET feedback = feedback || '{\"missing\": \"2 ideas.\"}' WHERE id = $1",
          s["id"])
    client.post(f"/api/v1/submissions/{s['id']}/review", json={"score": 30}, headers=inst.h)  # (below the mark still)
    assert client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).json()["feedback"]["missing"] == "2 ideas."
    # (review) and across 50: the grader's 65 said "The key ideas are there" beside the instructor's 10
    fetch(settings, """UPDATE submissions SET score = 65, feedback = feedback || '{"missing": "The key ideas are there."}'
                       WHERE id = $1""", s["id"])
    client.post(f"/api/v1/submissions/{s['id']}/review", json={"score": 10}, headers=inst.h)
    assert "missing" not in client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).json()["feedback"]


def test_learners_see_whether_to_choose_one_option_or_several(server, client, make: Factory):
    """(Tester) nothing told a learner a question took several answers: a one-option pick of two scored 50."""
    course = make_course(server, make, learners=1)
    (learner,) = course.learners
    one, several = published(client, course, MC), published(client, course, MULTI)
    seen = {a["id"]: a.get("multiple") for a in
            client.get(f"/api/v1/courses/{course.id}/assignments", headers=learner.h).json()["items"]}
    assert seen == {one["id"]: False, several["id"]: True}, seen
    written = published(client, course, WRITTEN)
    assert "multiple" not in client.get(f"/api/v1/assignments/{written['id']}", headers=learner.h).json()


def test_the_next_step_goes_by_the_latest_attempt_whenever_earlier_ones_are_reviewed(server, client, make: Factory):
    """An instructor approving attempt 1 (failed) after attempt 2 passed made attempt 1 the 'latest' grade: the
    learner was told to step down and rewatch."""
    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    a = published(client, course, {**MC, "max_attempts": 2})
    url = f"/api/v1/assignments/{a['id']}/submissions"
    first = client.post(url, json={"answer": [0]}, headers=learner.h).json()
    assert first["score"] == 0
    assert client.post(url, json={"answer": [1]}, headers=learner.h).json()["score"] == 100
    before = client.get(f"/api/v1/courses/{course.id}/me/next", headers=learner.h).json()
    r = client.post(f"/api/v1/submissions/{first['id']}/review", json={}, headers=inst.h)
    assert r.status_code == 200, r.text
    after = client.get(f"/api/v1/courses/{course.id}/me/next", headers=learner.h).json()
    assert [c["status"] for c in after["concepts"]] == [c["status"] for c in before["concepts"]] == ["mastered"]
    assert after["difficulty"] == before["difficulty"]


def test_chapter_strengths_follow_a_deleted_or_moved_assignment(client, make: Factory, settings):
    """A learner's strength on a chapter (the matcher reads it) still counted the grades of an assignment deleted
    with `?force=true`, or moved to another chapter."""
    from tests.progress_helpers import make_course as course_with_chapters

    course = course_with_chapters(client, make, learners=1, videos=1, chapters=2)
    (learner,), h = course.learners, course.instructor.h
    one, two = [c["id"] for c in fetch(settings, "SELECT id FROM chapters WHERE video_id = $1 ORDER BY idx",
                                       course.videos[0])]
    items = []
    for answer in ([1], [0]):  # right, then wrong
        a = client.post(f"/api/v1/courses/{course.id}/assignments", json={**MC, "chapter_id": one}, headers=h).json()
        assert client.post(f"/api/v1/assignments/{a['id']}/publish", headers=h).status_code == 200
        assert client.post(f"/api/v1/assignments/{a['id']}/submissions", json={"answer": answer},
                           headers=learner.h).status_code == 201
        items.append(a["id"])

    def strengths() -> dict[int, float]:
        return {r["chapter_id"]: r["score"] for r in fetch(
            settings, "SELECT chapter_id, score FROM chapter_scores WHERE user_id = $1", learner.id)}

    assert strengths() == {one: 0.5}
    assert client.delete(f"/api/v1/assignments/{items[1]}?force=true", headers=h).status_code == 204
    assert strengths() == {one: 1.0}  # only the right answer is left on chapter one
    assert client.patch(f"/api/v1/assignments/{items[0]}", json={"chapter_id": two}, headers=h).status_code == 200
    assert strengths() == {two: 1.0}  # it counts where it is now


def test_the_next_step_pages_its_concepts(client, make: Factory, settings):
    """Every concept of the course came back in one response, however many there were."""
    from tests.progress_helpers import make_course as course_with_chapters

    course = course_with_chapters(client, make, learners=1, videos=1, chapters=3)
    (learner,), h = course.learners, course.instructor.h
    for c in fetch(settings, "SELECT id FROM chapters WHERE video_id = $1 ORDER BY idx", course.videos[0]):
        a = client.post(f"/api/v1/courses/{course.id}/assignments", json={**MC, "chapter_id": c["id"]},
                        headers=h).json()
        assert client.post(f"/api/v1/assignments/{a['id']}/publish", headers=h).status_code == 200
        assert client.post(f"/api/v1/assignments/{a['id']}/submissions", json={"answer": [0]},
                           headers=learner.h).status_code == 201  # wrong: struggling there
    url = f"/api/v1/courses/{course.id}/me/next"
    whole = client.get(url, headers=learner.h).json()
    assert (whole["concepts_total"], whole["struggling_total"], len(whole["concepts"])) == (3, 3, 3)
    page = client.get(url, params={"limit": 2, "offset": 1}, headers=learner.h).json()
    assert [c["concept"] for c in page["concepts"]] == [c["concept"] for c in whole["concepts"][1:3]]
    assert len(page["struggling"]) == 2 and page["struggling_total"] == 3 and page["difficulty"] == whole["difficulty"]
    assert client.get(url, params={"limit": 0}, headers=learner.h).status_code == 400


def test_an_unanswered_assignment_can_be_unpublished(server, client, make: Factory, settings):
    course = make_course(server, make, learners=1)
    (learner,), h = course.learners, course.instructor.h
    item = published(client, course, MC)
    url = f"/api/v1/assignments/{item['id']}"
    assert client.get(url, headers=learner.h).status_code == 200
    r = client.post(f"{url}/unpublish", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "draft", r.text
    assert client.get(url, headers=learner.h).status_code == 404
    assert client.post(f"{url}/submissions", json={"answer": [1]}, headers=learner.h).status_code == 404
    assert client.post(f"{url}/unpublish", headers=learner.h).status_code == 403
    # published again and answered: learners read their grades through it, so it stays published
    assert client.post(f"{url}/publish", headers=h).status_code == 200
    assert client.post(f"{url}/submissions", json={"answer": [1]}, headers=learner.h).status_code == 201
    r = client.post(f"{url}/unpublish", headers=h)
    assert r.status_code == 409 and r.json()["code"] == "has_submissions"
    assert client.get(url, headers=learner.h).json()["status"] == "published"


def test_a_learner_removed_from_a_course_reads_none_of_its_attempts(server, client, make: Factory):
    """(Tester) one attempt read 200 while the list of them was 404."""
    course = make_course(server, make, learners=1)  # a draft course: only its learners see it
    (learner,) = course.learners
    a = published(client, course, MC)
    s = client.post(f"/api/v1/assignments/{a['id']}/submissions", json={"answer": [1]}, headers=learner.h).json()
    assert client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).status_code == 200
    client.delete(f"/api/v1/courses/{course.id}/enrollments/{learner.id}", headers=course.instructor.h)
    assert client.get(f"/api/v1/assignments/{a['id']}/submissions", headers=learner.h).status_code == 404
    assert client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).status_code == 404
    assert client.get(f"/api/v1/submissions/{s['id']}", headers=course.instructor.h).status_code == 200


async def test_an_answer_racing_a_course_deletion_takes_the_course_lock_first(server, make: Factory, settings):
    """(Tester) an answer locked its assignment, then its insert waited for the course's key; a course deletion
    held the course and went for the assignment: a deadlock, one of the two a 409. The answer now takes the course
    first, as the deletion does: whoever holds the course, the other waits for it."""
    import asyncio

    import asyncpg

    course = make_course(server, make, learners=1)
    with httpx.Client(base_url=server, timeout=30) as c:
        a = published(c, course, MC)
    x = await asyncpg.connect(settings.database_url)
    try:
        tr = x.transaction()
        await tr.start()
        await x.execute("SELECT id FROM courses WHERE id = $1 FOR UPDATE", course.id)  # a deletion's first lock
        async with httpx.AsyncClient(base_url=server, timeout=30) as ac:
            answer = asyncio.create_task(ac.post(f"/api/v1/assignments/{a['id']}/submissions", json={"answer": [1]},
                                                 headers=course.learners[0].h))
            await asyncio.sleep(0.5)
            await x.execute("SET LOCAL lock_timeout = '5s'")
            # the deletion's cascade next: the answer holds nothing of the assignment's yet (it deadlocked here)
            await x.execute("SELECT id FROM assignments WHERE id = $1 FOR UPDATE", a["id"])
            await tr.rollback()  # (no deletion after all: the answer goes on)
            r = await answer
        assert r.status_code == 201, r.text
    finally:
        await x.close()


def _video_with_chapters(settings, course_id: int, n: int) -> tuple[int, list[int]]:  # type: ignore[no-untyped-def]
    """A ready 100 s video of the course with `n` chapters splitting it evenly: (video id, chapter ids)."""
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status, duration_s) VALUES ($1, 'v', "
                          "'transcript', 'ready', 100) RETURNING id", course_id)[0]["id"]
    spans = [(k, 100 * k / n, 100 * (k + 1) / n) for k in range(n)]
    return vid, [fetch(settings, "INSERT INTO chapters (video_id, idx, start_s, end_s, title) VALUES ($1, $2, $3, $4, "
                                 "'c') RETURNING id", vid, k, a, b)[0]["id"] for k, a, b in spans]


def _assignment(server: str, course, body: dict) -> int:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server, timeout=30) as c:
        r = c.post(f"/api/v1/courses/{course.id}/assignments", json=body, headers=course.instructor.h)
        assert r.status_code == 201, r.text
        return r.json()["id"]


async def test_moving_an_assignment_between_chapters_racing_its_videos_deletion(server, make: Factory, settings):
    """(Audit) a PATCH locked the assignment, then its update took the new chapter's key; a video's deletion held
    the chapters and went for the assignment (its cascade sets `chapter_id` null): a deadlock, the PATCH a 409."""
    import asyncio

    import asyncpg

    course = make_course(server, make, learners=0)
    vid, (c1, c2) = _video_with_chapters(settings, course.id, 2)
    aid = _assignment(server, course, {**MC, "chapter_id": c1})
    x = await asyncpg.connect(settings.database_url)
    try:
        tr = x.transaction()
        await tr.start()
        # as store.videos.delete_video: the course (NO KEY UPDATE), then the video's row and, in its cascade, its
        # chapters' rows (a course deletion holds the course FOR UPDATE and gets to the same rows the same way)
        await x.execute("SELECT 1 FROM courses WHERE id = $1 FOR NO KEY UPDATE", course.id)
        await x.execute("SELECT 1 FROM videos WHERE id = $1 FOR UPDATE", vid)
        await x.execute("SELECT 1 FROM chapters WHERE video_id = $1 ORDER BY id FOR UPDATE", vid)
        async with httpx.AsyncClient(base_url=server, timeout=30) as ac:
            patch = asyncio.create_task(ac.patch(f"/api/v1/assignments/{aid}", json={"chapter_id": c2},
                                                 headers=course.instructor.h))
            await asyncio.sleep(0.7)
            await x.execute("SET LOCAL lock_timeout = '5s'")
            try:  # the cascade's next step: chapters -> assignments.chapter_id SET NULL
                await x.execute("SELECT 1 FROM assignments WHERE id = $1 FOR UPDATE", aid)
                caught = None
            except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
                caught = exc
            await tr.rollback()
            r = await patch
        # (today: Postgres finds the deadlock and aborts the PATCH: 409 "a concurrent change got in the way")
        assert caught is None and r.status_code == 200, f"lock inversion: {caught!r}, PATCH {r.status_code} {r.text}"
    finally:
        await x.close()


async def test_linking_an_assignment_to_a_chapter_of_a_video_being_deleted_waits_for_it(server, make: Factory,
                                                                                        settings):
    """(Review) an assignment without a chapter PATCHed onto a chapter of a video being deleted: the chapter's key
    was taken before the assignment, but its video's only by the update, last; the deletion held the video and went
    for its chapters. The chapter's video is locked with the rest, first."""
    import asyncio

    import asyncpg

    course = make_course(server, make, learners=0)
    vid, (ch,) = _video_with_chapters(settings, course.id, 1)
    aid = _assignment(server, course, MC)
    x = await asyncpg.connect(settings.database_url)
    try:
        tr = x.transaction()
        await tr.start()
        await x.execute("SELECT 1 FROM courses WHERE id = $1 FOR NO KEY UPDATE", course.id)  # as delete_video
        await x.execute("SELECT 1 FROM videos WHERE id = $1 FOR UPDATE", vid)
        async with httpx.AsyncClient(base_url=server, timeout=30) as ac:
            patch = asyncio.create_task(ac.patch(f"/api/v1/assignments/{aid}", json={"chapter_id": ch},
                                                 headers=course.instructor.h))
            await asyncio.sleep(0.7)
            await x.execute("SET LOCAL lock_timeout = '5s'")
            await x.execute("SELECT 1 FROM chapters WHERE video_id = $1 ORDER BY id FOR UPDATE", vid)  # its cascade
            await tr.rollback()
            r = await patch
        assert r.status_code == 200 and r.json()["chapter_id"] == ch, r.text
    finally:
        await x.close()
