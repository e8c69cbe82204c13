"""Written answers graded by the real worker: per-criterion scores, the review queue, an instructor's override
reaching the learner as `grade.ready`, batches, and restarts that lose nothing."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import asyncpg
import httpx

from tests.agents.fake_llm_servers import FakeLLMServer, Reply
from tests.conftest import ROOT, Factory, clean_env, fetch, stop_process
from tests.server.conftest import Client, make_course, spawn_ready
from tests.server.test_assignments import published

REFERENCE = "Binary search halves the sorted interval at every step, so it needs logarithmic time."
ONE = {"type": "short_answer", "title": "Binary search", "prompt": "How does binary search work and how fast is it?",
       "reference_answer": REFERENCE}
TWO = {**ONE, "title": "Binary search (rubric)", "rubric": [
    {"name": "idea", "points": 60, "description": "The search interval is halved at every step"},
    {"name": "complexity", "points": 40, "description": "The running time is logarithmic, O(log n)"}]}
VAGUE = "Binary search is fast."


def wait_graded(client: httpx.Client, sid: int, headers: dict, timeout: float = 90) -> dict:
    """Poll until the grader has finished with the submission (graded or held)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = client.get(f"/api/v1/submissions/{sid}", headers=headers).json()
        if s["status"] != "grading":
            return s
        time.sleep(0.2)
    raise AssertionError(f"submission {sid} still grading after {timeout}s: {s}")


def submit(client: httpx.Client, assignment: dict, learner, answer: str) -> dict:  # type: ignore[no-untyped-def]
    r = client.post(f"/api/v1/assignments/{assignment['id']}/submissions", json={"answer": answer}, headers=learner.h)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "grading" and "score" not in r.json()
    return r.json()


async def test_written_answer_graded_by_the_worker_per_criterion(server, client, make: Factory, worker):
    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    one, two = published(client, course, ONE), published(client, course, TWO)
    ws = await Client.connect(server, course.room, learner)
    try:
        s = submit(client, one, learner, REFERENCE)
        ev = await ws.expect("grade.ready", timeout=90, submission_id=s["id"])
        assert ev["score"] > 80 and ev["passed"] and not ev["reviewed"]
    finally:
        await ws.close()
    final = client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).json()
    assert final["status"] == "graded" and final["score"] == ev["score"] and 0 < final["confidence"] <= 1
    assert final["feedback"]["right"] and final["feedback"]["improve"]
    assert "grader" not in final and "history" not in final  # grading internals are for staff
    s2 = submit(client, two, learner, "It halves the sorted list each step, so it is logarithmic.")
    graded = wait_graded(client, s2["id"], inst.h)
    assert [(c["name"], c["points"]) for c in graded["criteria"]] == [("idea", 60.0), ("complexity", 40.0)]
    assert all(0 <= c["score"] <= c["points"] and c["justification"] for c in graded["criteria"])
    assert abs(sum(c["score"] for c in graded["criteria"]) - graded["score"]) < 0.5
    assert graded["grader"] == "offline" and [h["kind"] for h in graded["history"]] == ["machine"]


async def test_held_grade_waits_for_the_instructor_then_reaches_the_learner(server, client, make: Factory, worker,
                                                                             settings):
    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    a = published(client, course, TWO)
    ws = await Client.connect(server, course.room, learner)
    try:
        s = submit(client, a, learner, VAGUE)
        held = wait_graded(client, s["id"], inst.h)
        assert held["status"] == "review_pending" and held["review_reason"]
        # the learner sees that a review is pending, and nothing of the proposed grade
        mine = client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).json()
        assert mine["status"] == "review_pending"
        assert not {"score", "confidence", "criteria", "feedback"} & set(mine)
        queue = client.get(f"/api/v1/courses/{course.id}/grading-queue", headers=inst.h).json()["items"]
        (item,) = queue
        assert item["submission_id"] == s["id"] and item["user_name"] == learner.name and item["answer"] == VAGUE
        assert item["proposed_score"] is not None and len(item["criteria"]) == 2 and item["reason"]
        assert client.get(f"/api/v1/courses/{course.id}/grading-queue", headers=learner.h).status_code == 403
        assert client.post(f"/api/v1/submissions/{s['id']}/review", json={"score": 75},
                           headers=learner.h).status_code == 403
        assert (await ws.quiet(0.3)) == []  # nothing announced while the grade is held
        r = client.post(f"/api/v1/submissions/{s['id']}/review", headers=inst.h,
                        json={"score": 75, "comment": "Right idea; say why it is logarithmic."})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "graded" and r.json()["score"] == 75
        ev = await ws.expect("grade.ready", submission_id=s["id"])
        assert ev["score"] == 75 and ev["reviewed"] and ev["passed"]
    finally:
        await ws.close()
    mine = client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).json()
    assert mine["score"] == 75 and mine["review_comment"].startswith("Right idea")
    assert mine["feedback"]["right"] == "Your instructor set the grade to 75 out of 100."  # not the grader's verdict
    assert abs(sum(c["score"] for c in mine["criteria"]) - 75) < 0.5
    assert client.get(f"/api/v1/courses/{course.id}/grading-queue", headers=inst.h).json()["items"] == []
    history = client.get(f"/api/v1/submissions/{s['id']}", headers=inst.h).json()["history"]
    assert [(h["kind"], h["held"]) for h in history] == [("machine", True), ("review", False)]
    # to one decimal and three, as every view shows them (stored as real: 85.9000015258789 came out)
    assert all(h[k] is None or h[k] == round(h[k], n) for h in history for k, n in (("score", 1), ("confidence", 3))), \
        history
    # approving the final grade again (no comment) keeps the comment the learner reads
    assert client.post(f"/api/v1/submissions/{s['id']}/review", json={}, headers=inst.h).status_code == 200
    assert client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).json()["review_comment"].startswith("Right")
    # an invisible comment is a blank one (it replaced the comment with nothing to see); control characters are
    # refused, as in every text a learner reads
    assert client.post(f"/api/v1/submissions/{s['id']}/review", json={"comment": "\u200b\u3164"},
                       headers=inst.h).status_code == 200
    assert client.get(f"/api/v1/submissions/{s['id']}", headers=learner.h).json()["review_comment"].startswith("Right")
    r = client.post(f"/api/v1/submissions/{s['id']}/review", json={"comment": "\x1b[2J\x07bad"}, headers=inst.h)
    assert r.status_code == 400 and r.json()["field"] == "comment", r.text
    if fetch(settings, "SELECT to_regclass('xp_events') IS NOT NULL AS x")[0]["x"]:  # the XP hook, when present
        kinds = [r["kind"] for r in fetch(settings, "SELECT kind FROM xp_events WHERE user_id = $1", learner.id)]
        assert "assignment_passed" in kinds


def test_one_answer_is_graded_again_on_its_own(server, client, make: Factory, worker, settings):
    """A grade that failed (the model away) or was held could only be retried by sending the whole assignment back
    to the grader (grade-all: everyone's grades re-made and re-announced). Now one answer can be."""
    course = make_course(server, make, learners=2)
    inst, (learner, other) = course.instructor, course.learners
    a = published(client, course, TWO)
    s = submit(client, a, learner, VAGUE)
    held = wait_graded(client, s["id"], inst.h)
    theirs = wait_graded(client, submit(client, a, other, VAGUE)["id"], inst.h)
    fetch(settings, "UPDATE submissions SET review_reason = 'automatic grading failed: the model was away' "
                    "WHERE id = $1", s["id"])
    assert client.post(f"/api/v1/submissions/{s['id']}/regrade", headers=learner.h).status_code == 403
    r = client.post(f"/api/v1/submissions/{s['id']}/regrade", headers=inst.h)
    assert r.status_code == 202 and r.json()["status"] == "grading", r.text
    again = wait_graded(client, s["id"], inst.h)
    assert again["status"] == held["status"] and again["review_reason"] != "automatic grading failed: the model was away"
    assert [h["kind"] for h in again["history"]] == ["machine", "machine"]
    assert client.get(f"/api/v1/submissions/{theirs['id']}", headers=inst.h).json()["history"] == theirs["history"]
    # an instructor's grade stays theirs; another tenant's staff do not find the answer
    assert client.post(f"/api/v1/submissions/{s['id']}/review", json={"score": 70}, headers=inst.h).status_code == 200
    r = client.post(f"/api/v1/submissions/{s['id']}/regrade", headers=inst.h)
    assert r.status_code == 409 and r.json()["code"] == "reviewed", r.text
    stranger = make.user("instructor", tenant="elsewhere")
    assert client.post(f"/api/v1/submissions/{s['id']}/regrade", headers=stranger.h).status_code == 404


def test_grading_a_whole_assignment_runs_as_batched_jobs(server, client, make: Factory, worker, settings):
    course = make_course(server, make, learners=3)
    inst = course.instructor
    a = published(client, course, ONE)
    subs = [submit(client, a, who, answer) for who, answer in
            zip(course.learners, [REFERENCE, VAGUE, "Binary search checks the middle and keeps one half."])]
    for s in subs:
        wait_graded(client, s["id"], inst.h)
    # 24 more answers (stored as graded, as if from before a rubric change): 27 in all, two batches of <= 25
    more = [make.user("learner") for _ in range(24)]
    for u in more:
        assert client.post(f"/api/v1/courses/{course.id}/enrollments", json={"user_id": u.id},
                           headers=inst.h).status_code == 201
    extra = [r["id"] for r in fetch(settings, """
        INSERT INTO submissions (assignment_id, course_id, user_id, attempt, answer, status, score, final_at)
        SELECT s.assignment_id, s.course_id, u, 1, s.answer, 'graded', s.score, now()
        FROM submissions s, unnest($2::bigint[]) AS u WHERE s.id = $1 RETURNING id""",
        subs[0]["id"], [u.id for u in more])]
    assert len(extra) == 24
    r = client.post(f"/api/v1/assignments/{a['id']}/grade-all", headers=inst.h)
    assert r.status_code == 202 and r.json()["submissions"] == 27 and r.json()["batches"] == 2
    job_id = r.json()["job_id"]
    # a second one while it runs (a double click, a retry) is that job: a new one threw the grades already made
    # away and paid the model twice
    again = client.post(f"/api/v1/assignments/{a['id']}/grade-all", headers=inst.h)
    assert again.status_code == 200 and again.json() == r.json(), again.json()
    deadline = time.monotonic() + 120
    while (job := client.get(f"/api/v1/jobs/{job_id}", headers=inst.h).json())["state"] != "done":
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["progress"] == 1.0
    # a grade-all under way from before the assignment last changed (a rubric edit) is not the one asked for
    (stale,) = fetch(settings, """INSERT INTO jobs (kind, course_id, created_by, state, payload, created_at)
                                  VALUES ('grade', $1, $2, 'running', jsonb_build_object('assignment_id', $3::bigint,
                                          'submission_ids', '[]'::jsonb), now() - interval '1 hour') RETURNING id""",
                     course.id, inst.id, a["id"])
    fresh = client.post(f"/api/v1/assignments/{a['id']}/grade-all", headers=inst.h)
    assert fresh.status_code == 202 and fresh.json()["job_id"] not in (job_id, stale["id"]), fresh.json()
    fetch(settings, "UPDATE jobs SET state = 'failed' WHERE id = $1", stale["id"])
    while (job := client.get(f"/api/v1/jobs/{fresh.json()['job_id']}", headers=inst.h).json())["state"] != "done":
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    # the job is staff's (and its creator's) to see; a grading job is started again, not retried
    assert client.get(f"/api/v1/jobs/{job_id}", headers=course.learners[0].h).status_code == 404
    assert client.get(f"/api/v1/jobs/{job_id}", headers=make.user("instructor", tenant="other-tenant").h).status_code == 404
    r = client.post(f"/api/v1/jobs/{job_id}/retry", headers=inst.h)
    assert r.status_code == 409 and "not retried" in r.json()["message"]
    for s in subs:
        again = client.get(f"/api/v1/submissions/{s['id']}", headers=inst.h).json()
        assert again["status"] != "grading" and [h["kind"] for h in again["history"]] == ["machine"] * 3
    regraded = fetch(settings, "SELECT s.status, count(e.id) AS n FROM submissions s LEFT JOIN grade_events e "
                               "ON e.submission_id = s.id AND e.kind = 'machine' WHERE s.id = ANY($1::bigint[]) "
                               "GROUP BY s.id, s.status", extra)
    assert len(regraded) == 24 and all(r["status"] != "grading" and r["n"] == 2 for r in regraded)


async def test_restarts_lose_no_grade_and_no_pending_review(server, make: Factory, worker, settings, data_dir):
    """The worker is down when two answers arrive; the server is killed -9; both come back and nothing is lost:
    one grade is released, the other waits in the queue until the instructor reviews it on a new server."""
    (proc, url), = spawn_ready(data_dir, ["grading-a"], {})
    course = make_course(url, make, learners=2)
    inst, (released_to, held_for) = course.instructor, course.learners
    worker.kill()
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            a = published(c, course, ONE)
            good = submit(c, a, released_to, REFERENCE)
            vague = submit(c, a, held_for, VAGUE)
        stop_process(proc, signal.SIGKILL)
    finally:
        worker.start()
    (proc2, url2), = spawn_ready(data_dir, ["grading-b"], {})
    try:
        with httpx.Client(base_url=url2, timeout=30) as c:
            assert wait_graded(c, good["id"], inst.h)["status"] == "graded"
            assert wait_graded(c, vague["id"], inst.h)["status"] == "review_pending"
        # and once more while the review is pending: kill the server and the worker
        stop_process(proc2, signal.SIGKILL)
        worker.kill()
        worker.start()
        (proc2, url2), = spawn_ready(data_dir, ["grading-c"], {})
        with httpx.Client(base_url=url2, timeout=30) as c:
            queue = c.get(f"/api/v1/courses/{course.id}/grading-queue", headers=inst.h).json()["items"]
            assert [q["submission_id"] for q in queue] == [vague["id"]]
            ws = await Client.connect(url2, course.room, held_for)
            try:
                r = c.post(f"/api/v1/submissions/{vague['id']}/review", json={"comment": "Fine."}, headers=inst.h)
                assert r.status_code == 200 and r.json()["score"] == queue[0]["proposed_score"]  # approved as proposed
                ev = await ws.expect("grade.ready", submission_id=vague["id"])
                assert ev["score"] == queue[0]["proposed_score"] and ev["reviewed"]
            finally:
                await ws.close()
            assert c.get(f"/api/v1/submissions/{vague['id']}", headers=held_for.h).json()["status"] == "graded"
    finally:
        stop_process(proc2)


def test_a_worker_killed_mid_grade_is_taken_over_and_grades_once(server, client, make: Factory, worker, settings,
                                                                 data_dir):
    """A worker dies (kill -9) while a grade is under way (waiting on a slow model): another worker takes the
    job over once its lease lapses (STUDYHALL_JOB_HEARTBEAT_S, 3 s here) and the answer is graded exactly once."""
    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    a = published(client, course, ONE)
    worker.kill()
    with FakeLLMServer(api_key="sk-test") as llm:
        llm.reset(default=Reply(text="(no grade here)", wait_s=8))  # unusable when it comes: the offline grade stands
        env = {**clean_env(data_dir), "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm.openai_base_url,
               "STUDYHALL_LLM": "openai"}
        slow = subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], cwd=ROOT, env=env,
                                stdout=open(data_dir / "worker-slow.log", "ab"), stderr=subprocess.STDOUT)
        try:
            sub = submit(client, a, learner, REFERENCE)
            deadline = time.monotonic() + 60
            while not llm.requests:  # the grade is under way: offline scores done, the model asked
                assert time.monotonic() < deadline and slow.poll() is None, "the slow worker never asked the model"
                time.sleep(0.1)
            stop_process(slow, signal.SIGKILL)
        finally:
            stop_process(slow, signal.SIGKILL)
            worker.start()
    assert client.get(f"/api/v1/submissions/{sub['id']}", headers=inst.h).json()["status"] == "grading"
    done = wait_graded(client, sub["id"], inst.h, timeout=60)
    assert done["status"] in ("graded", "review_pending")
    machine = fetch(settings, "SELECT id FROM grade_events WHERE submission_id = $1 AND kind = 'machine'", sub["id"])
    assert len(machine) == 1


def test_a_grade_all_job_finishes_when_recovery_graded_its_answers(server, client, make: Factory, worker, settings):
    """Answers of a grade-all whose batch was lost are graded by recovery, one by one: the grade-all job is
    still marked done (its batch, which would have marked it, never ran)."""
    import asyncio

    import asyncpg

    from ingest.grading import finish_grade_jobs

    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    a = published(client, course, ONE)
    sub = submit(client, a, learner, REFERENCE)
    wait_graded(client, sub["id"], inst.h)
    (job,) = fetch(settings, """INSERT INTO jobs (kind, course_id, created_by, state, payload, updated_at)
                                VALUES ('grade', $1, $2, 'queued', jsonb_build_object('submission_ids', $3::bigint[]),
                                        now() - interval '1 minute') RETURNING id""",
                   course.id, inst.id, [sub["id"]])

    async def sweep() -> int:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await finish_grade_jobs(conn)
        finally:
            await conn.close()

    asyncio.run(sweep())  # the worker's own sweep (every minute) may come first: the count is not ours to check
    got = client.get(f"/api/v1/jobs/{job['id']}", headers=inst.h).json()
    assert got["state"] == "done" and got["progress"] == 1.0 and got["error"] is None
    # an answer the grader could not grade (held for review saying why) is done too, but the job says so: it
    # read "done, error null" when every grading had failed
    fetch(settings, """UPDATE submissions SET status = 'review_pending', grader = NULL,
                              review_reason = 'automatic grading failed: RuntimeError: boom' WHERE id = $1""", sub["id"])
    (job,) = fetch(settings, """INSERT INTO jobs (kind, course_id, created_by, state, payload, updated_at)
                                VALUES ('grade', $1, $2, 'queued', jsonb_build_object('submission_ids', $3::bigint[]),
                                        now() - interval '1 minute') RETURNING id""",
                   course.id, inst.id, [sub["id"]])
    asyncio.run(sweep())
    got = client.get(f"/api/v1/jobs/{job['id']}", headers=inst.h).json()
    assert got["state"] == "done" and got["progress"] == 1.0
    assert got["error"] == ("1 of 1 answers could not be graded automatically and wait for review "
                            "(first: automatic grading failed: RuntimeError: boom)"), got


async def test_two_reviews_at_once_take_turns_and_the_last_announcement_is_the_grade(server, make: Factory,
                                                                                    settings):
    """An approval read the held score before a colleague's override committed and then wrote it back (the
    override was lost, its comment kept); the learner's two events could end on the wrong score. Reviews now
    take turns, and `graded_at` orders the announcements."""
    import asyncio
    import json

    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    colleague = make.user("instructor")
    with httpx.Client(base_url=server, timeout=30) as c:
        a = published(c, course, ONE)
    ws = await Client.connect(server, course.room, learner)
    try:
        async with httpx.AsyncClient(base_url=server, timeout=30) as c:
            for attempt in range(1, 7):
                sid = fetch(settings, """INSERT INTO submissions (assignment_id, course_id, user_id, attempt, answer,
                                         status, score, grader) VALUES ($1, $2, $3, $4, $5, 'review_pending', 70,
                                         'offline') RETURNING id""",
                            a["id"], course.id, learner.id, attempt, json.dumps(VAGUE))[0]["id"]
                approve, override = await asyncio.gather(
                    c.post(f"/api/v1/submissions/{sid}/review", json={}, headers=inst.h),
                    c.post(f"/api/v1/submissions/{sid}/review", json={"score": 20, "comment": "see me"},
                           headers=colleague.h))
                assert approve.status_code == override.status_code == 200, (approve.text, override.text)
                stored = (await c.get(f"/api/v1/submissions/{sid}", headers=learner.h)).json()
                # whichever came first, the override stands: an approval after it approves 20, not 70 again
                assert stored["score"] == 20 and stored["review_comment"] == "see me", stored
                events = []
                while True:
                    try:
                        events.append(await ws.expect("grade.ready", timeout=1.5, submission_id=sid))
                    except TimeoutError:
                        break
                assert 1 <= len(events) <= 2 and max(events, key=lambda e: e["graded_at"])["score"] == 20, events
                # approving the final grade again changes nothing and tells nobody
                again = await c.post(f"/api/v1/submissions/{sid}/review", json={"comment": "  "}, headers=inst.h)
                assert again.status_code == 200 and again.json()["review_comment"] == "see me"
                same = await c.post(f"/api/v1/submissions/{sid}/review", json={"score": 20}, headers=colleague.h)
                assert same.status_code == 200 and same.json()["score"] == 20
                assert [f for f in await ws.quiet(0.5) if f["type"] == "grade.ready"] == []
                history = (await c.get(f"/api/v1/submissions/{sid}", headers=inst.h)).json()["history"]
                assert len(history) == len(events), history
    finally:
        await ws.close()


def test_a_learner_keeps_seeing_their_grade_while_it_is_graded_again(server, client, make: Factory, settings):
    """grade-all sent a released grade back to the grader: the learner stopped seeing its score (and, when the
    regrade was held, until an instructor reviewed it), and their next step lost it."""
    from store import submissions as repo
    from tests.conftest import run_sync

    course = make_course(server, make, learners=1)
    (learner,) = course.learners
    one = published(client, course, ONE)
    sid = submit(client, one, learner, VAGUE)["id"]
    fetch(settings, """UPDATE submissions SET status = 'graded', score = 85, confidence = 0.9, final_at = now(),
                       criteria = '[{"name": "correctness", "points": 100, "score": 85, "justification": "ok"}]',
                       feedback = '{"right": "Good.", "improve": "More."}' WHERE id = $1""", sid)
    given = client.get(f"/api/v1/submissions/{sid}", headers=learner.h).json()

    async def regrade() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            assert await repo.mark_grading(conn, [sid], None) == [sid]  # what grade-all does first
        finally:
            await conn.close()

    run_sync(regrade())
    now = client.get(f"/api/v1/submissions/{sid}", headers=learner.h).json()
    assert now["status"] == "grading" and now["score"] == 85, now
    assert {k: now[k] for k in ("criteria", "feedback", "final_at")} == {k: given[k] for k in ("criteria", "feedback",
                                                                                              "final_at")}
    nxt = client.get(f"/api/v1/courses/{course.id}/me/next", headers=learner.h).json()
    assert [c["mean_score"] for c in nxt["concepts"]] == [85.0], nxt
    fetch(settings, "UPDATE submissions SET status = 'review_pending', score = 20 WHERE id = $1", sid)  # held
    assert client.get(f"/api/v1/submissions/{sid}", headers=learner.h).json()["score"] == 85


def test_a_grade_does_not_wait_behind_a_long_ingest(server, client, make: Factory, worker, data_dir):
    """Grading has its own queue: with the worker's one ingest slot (STUDYHALL_WORKER_CONCURRENCY=1) held by an
    ingest stalled on YouTube (through a proxy that never answers: 30 s per request), an answer is graded while
    that ingest's first attempt is still under way. (One queue had graded it only after the ingest let go.)"""
    import socket

    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    a = published(client, course, ONE)
    stall = socket.socket()
    stall.bind(("127.0.0.1", 0))
    stall.listen(8)  # connections complete in the kernel's backlog; nothing ever answers
    worker.kill()  # the session's worker would take either job
    env = clean_env(data_dir, STUDYHALL_WORKER_CONCURRENCY="1",
                    STUDYHALL_YOUTUBE_PROXY=f"http://127.0.0.1:{stall.getsockname()[1]}")
    one_slot = subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], cwd=ROOT, env=env,
                                stdout=open(data_dir / "worker-one-slot.log", "ab"), stderr=subprocess.STDOUT)
    try:
        r = client.post(f"/api/v1/courses/{course.id}/videos", json={"title": "Stalled", "youtube": "dQw4w9WgXcQ"},
                        headers=inst.h)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 30
        while (job := client.get(f"/api/v1/jobs/{job_id}", headers=inst.h).json())["state"] == "queued":
            assert time.monotonic() < deadline and one_slot.poll() is None, "the worker never took the ingest"
            time.sleep(0.1)
        t0 = time.monotonic()
        sub = submit(client, a, learner, REFERENCE)
        done = wait_graded(client, sub["id"], inst.h, timeout=60)
        took = time.monotonic() - t0
        job = client.get(f"/api/v1/jobs/{job_id}", headers=inst.h).json()
        assert done["status"] in ("graded", "review_pending")
        assert job["attempts"] == 1 and job["state"] not in ("queued", "done", "failed"), (job, took)
    finally:
        stop_process(one_slot, signal.SIGKILL)  # a stop would wait out the stalled request's thread (30 s)
        stall.close()
        worker.start()


def test_a_grade_all_job_reads_grading_while_its_batches_run(server, client, make: Factory, worker, settings):
    """(Crash experiment) a grade-all job read `queued` the whole time its batches ran, until the last one ended."""
    import asyncio
    import functools

    import asyncpg

    from agents.config import embedder_for
    from ingest import grading
    from store import submissions as repo
    from store.db import create_pool

    course = make_course(server, make, learners=2)
    inst, learners = course.instructor, course.learners
    a = published(client, course, ONE)
    subs = [submit(client, a, u, REFERENCE) for u in learners]
    for s in subs:
        wait_graded(client, s["id"], inst.h)
    ids = [s["id"] for s in subs]
    (job,) = fetch(settings, """INSERT INTO jobs (kind, course_id, created_by, state, payload)
                                VALUES ('grade', $1, $2, 'queued', jsonb_build_object('submission_ids', $3::bigint[]))
                                RETURNING id""", course.id, inst.id, ids)

    async def batch(of: list[int], mark: bool = False) -> str:
        if mark:
            conn = await asyncpg.connect(settings.database_url)
            try:
                assert sorted(await repo.mark_grading(conn, ids, "held-by-this-test")) == sorted(ids)
            finally:
                await conn.close()
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        from redis.asyncio import Redis
        redis = Redis.from_url(settings.redis_url)
        try:
            ctx = {"pool": pool, "redis": redis, "settings": settings,
                   "embedder": functools.partial(embedder_for, settings)}
            return await grading.grade_batch(ctx, job["id"], of)
        finally:
            await redis.aclose()
            await pool.close()

    assert asyncio.run(batch(ids[:1], mark=True)) == "1 graded"  # one batch of two done
    got = client.get(f"/api/v1/jobs/{job['id']}", headers=inst.h).json()
    assert got["state"] == "grading" and got["progress"] == 0.5, got
    # (Tester) the assignment deleted before the last batch: that batch ends the job (it stayed `queued` until the
    # every-minute sweep, and said "1 graded" of an answer it never graded)
    assert client.delete(f"/api/v1/assignments/{a['id']}?force=true", headers=inst.h).status_code == 204
    assert asyncio.run(batch(ids[1:])) == "0 graded, 1 no longer waiting"
    got = client.get(f"/api/v1/jobs/{job['id']}", headers=inst.h).json()
    assert got["state"] == "done" and got["progress"] == 1.0 and "deleted" in got["error"], got


def _held(server: str, make: Factory, settings, score: float, criteria: list[dict]):  # type: ignore[no-untyped-def]
    """A published written assignment (ONE) with one machine grade held for review, with these criteria: (its
    instructor, the assignment, the submission's id)."""
    import json

    course = make_course(server, make, learners=1)
    with httpx.Client(base_url=server, timeout=30) as c:
        a = published(c, course, ONE)
    sid = fetch(settings, """INSERT INTO submissions (assignment_id, course_id, user_id, attempt, answer, status,
                             score, grader, criteria) VALUES ($1, $2, $3, 1, $4, 'review_pending', $5, 'offline', $6)
                             RETURNING id""",
                a["id"], course.id, course.learners[0].id, json.dumps(VAGUE), score, json.dumps(criteria))[0]["id"]
    return course.instructor, a, sid


def test_a_grade_proposed_for_an_earlier_rubric_is_not_approved_as_it_is(server, make: Factory, settings):
    """A held grade kept the criteria of the rubric it was graded against: approved after the rubric changed, the
    final grade scored criteria the assignment no longer had. Approving it is a 409 (regrade it, or give a score);
    a score given is spread over the rubric as it is now."""
    inst, a, sid = _held(server, make, settings, 40, [{"name": "correctness", "points": 100.0, "score": 40.0,
                                                       "justification": "vague"}])
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.patch(f"/api/v1/assignments/{a['id']}", json={"rubric": TWO["rubric"]},
                       headers=inst.h).status_code == 200
        r = c.post(f"/api/v1/submissions/{sid}/review", json={}, headers=inst.h)
        assert r.status_code == 409 and r.json()["code"] == "stale_proposal", r.text
        r = c.post(f"/api/v1/submissions/{sid}/review", json={"score": 50}, headers=inst.h)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["status"] == "graded" and [x["name"] for x in got["criteria"]] == ["idea", "complexity"], got
        assert sum(x["score"] for x in got["criteria"]) == 50 and all(x["score"] <= x["points"] for x in got["criteria"])


def test_a_rubric_weighed_otherwise_makes_a_proposal_stale_too(server, make: Factory, settings):
    """(Tester) Only the criteria's names were compared: a rubric whose points changed (60/40 to 10/90) let the old
    weights' proposal be approved as it was, a total the new rubric would not give."""
    inst, a, sid = _held(server, make, settings, 60, [
        {"name": "idea", "points": 60.0, "score": 60.0, "justification": "halves"},
        {"name": "complexity", "points": 40.0, "score": 0.0, "justification": "no O(log n)"}])
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.patch(f"/api/v1/assignments/{a['id']}", json={"rubric": TWO["rubric"]},
                       headers=inst.h).status_code == 200
        reweighed = [{**TWO["rubric"][0], "points": 10}, {**TWO["rubric"][1], "points": 90}]
        assert c.patch(f"/api/v1/assignments/{a['id']}", json={"rubric": reweighed}, headers=inst.h).status_code == 200
        r = c.post(f"/api/v1/submissions/{sid}/review", json={}, headers=inst.h)
        assert r.status_code == 409 and r.json()["code"] == "stale_proposal", r.text
        got = c.post(f"/api/v1/submissions/{sid}/review", json={"score": 20}, headers=inst.h).json()
        assert [(x["name"], x["points"]) for x in got["criteria"]] == [("idea", 10), ("complexity", 90)], got
        assert sum(x["score"] for x in got["criteria"]) == 20


def test_a_comment_on_a_final_grade_keeps_its_criteria_as_graded(server, make: Factory, settings):
    """(Review) a final grade only commented on after its rubric was re-weighted had its criteria flattened over the
    new weights (60/0 on 60/40 became 6/54 on 10/90, each "Adjusted by the instructor"): nobody changed the grade."""
    graded = [{"name": "idea", "points": 60.0, "score": 60.0, "justification": "halves"},
              {"name": "complexity", "points": 40.0, "score": 0.0, "justification": "no O(log n)"}]
    inst, a, sid = _held(server, make, settings, 60, graded)
    fetch(settings, "UPDATE submissions SET status = 'graded', final_at = now() WHERE id = $1", sid)
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.patch(f"/api/v1/assignments/{a['id']}", json={"rubric": TWO["rubric"]},
                       headers=inst.h).status_code == 200
        reweighed = [{**TWO["rubric"][0], "points": 10}, {**TWO["rubric"][1], "points": 90}]
        assert c.patch(f"/api/v1/assignments/{a['id']}", json={"rubric": reweighed}, headers=inst.h).status_code == 200
        r = c.post(f"/api/v1/submissions/{sid}/review", json={"comment": "Good start."}, headers=inst.h)
        assert r.status_code == 200, r.text
        assert r.json()["criteria"] == graded and r.json()["score"] == 60, r.json()


def test_a_score_for_an_answer_the_grader_could_not_grade_is_spread_over_the_rubric(server, make: Factory, settings):
    """(Tester) A grade the grader gave up on has no criteria: the instructor's score made one up ("instructor
    grade", 100 points) beside the assignment's rubric. It is spread over the rubric's criteria."""
    inst, a, sid = _held(server, make, settings, 0, [])
    fetch(settings, "UPDATE submissions SET score = NULL WHERE id = $1", sid)
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.patch(f"/api/v1/assignments/{a['id']}", json={"rubric": TWO["rubric"]},
                       headers=inst.h).status_code == 200
        r = c.post(f"/api/v1/submissions/{sid}/review", json={}, headers=inst.h)
        assert r.status_code == 400 and r.json()["field"] == "score", r.text
        got = c.post(f"/api/v1/submissions/{sid}/review", json={"score": 80}, headers=inst.h).json()
        assert [(x["name"], x["points"]) for x in got["criteria"]] == [("idea", 60), ("complexity", 40)], got
        assert sum(x["score"] for x in got["criteria"]) == 80 and all(x["score"] <= x["points"] for x in got["criteria"])


def test_approving_a_proposal_keeps_its_criteria_as_they_are(server, make: Factory, settings):
    """A plain approval rescaled the proposal's criteria (to 0.01) to its total (to 0.1): they changed by a few
    hundredths and each read "Adjusted by the instructor." though nobody changed anything."""
    inst, _, sid = _held(server, make, settings, 61.9, [{"name": "correctness", "points": 100.0, "score": 61.94,
                                                         "justification": "mostly there"}])
    with httpx.Client(base_url=server, timeout=30) as c:
        r = c.post(f"/api/v1/submissions/{sid}/review", json={}, headers=inst.h)
        assert r.status_code == 200, r.text
        assert r.json()["criteria"][0]["justification"] == "mostly there", r.json()["criteria"]
