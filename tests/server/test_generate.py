"""Assignment generation from a real chapter (the eval course, ingested by the worker), drafts hidden from
learners until published, and the adaptive next step built from the learner's grades."""
from __future__ import annotations

import json
import re

import httpx

from tests.conftest import EvalCourse


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", text.lower())).strip()


def test_generated_items_cite_real_moments_and_stay_drafts(client, eval_course: EvalCourse):
    inst, learner = eval_course.instructor, eval_course.learner
    video_id = eval_course.videos["3b1b-bitcoin.srt"]
    chapters = client.get(f"/api/v1/courses/{eval_course.id}/videos/{video_id}/chapters", headers=inst.h).json()
    assert len(chapters) >= 2
    ch = chapters[1]
    transcript = _norm(" ".join(s["text"] for s in client.get(
        f"/api/v1/courses/{eval_course.id}/videos/{video_id}/transcript", headers=inst.h).json()))
    r = client.post(f"/api/v1/courses/{eval_course.id}/assignments/generate", headers=inst.h,
                    json={"chapter_id": ch["id"], "count": 4, "difficulty": "medium",
                          "types": ["multiple_choice", "short_answer"]})
    assert r.status_code == 201, r.text
    body = r.json()
    items = body["items"]
    assert body["generator"] == "offline" and len(items) == 4
    assert {i["type"] for i in items} == {"multiple_choice", "short_answer"}
    for it in items:
        assert it["status"] == "draft" and it["origin"] == "generated" and it["chapter_id"] == ch["id"]
        cite = it["citation"]
        assert cite["video_id"] == video_id and ch["start"] <= cite["start"] < ch["end"]
        assert _norm(cite["text"]) in transcript  # a real sentence of the chapter, at its real time
        if it["type"] == "multiple_choice":
            assert len(it["options"]) == 4 and len(set(it["options"])) == 4 and len(it["correct"]) == 1
            answer = it["options"][it["correct"][0]]
            assert "_____" in it["prompt"] and answer.lower() in cite["text"].lower()
            assert answer.lower() not in (it["title"] + " " + it["concept"]).lower()  # learners see these
            assert all(o.lower() not in cite["text"].lower().split() for i, o in enumerate(it["options"])
                       if i != it["correct"][0])
        else:
            assert it["reference_answer"] == cite["text"] and it["rubric"][0]["name"] == "correctness"
    # nor does one item's title or concept give away another's answer (they share the chapter's title)
    answers = [it["options"][it["correct"][0]].lower() for it in items if it["type"] == "multiple_choice"]
    assert not [a for a in answers for it in items if a in (it["title"] + " " + it["concept"]).lower()]
    # nor across generations: a second one on the chapter neither shows the first's answers in its titles nor
    # brings items whose answer the first's titles show (they were read side by side in the course's list)
    r = client.post(f"/api/v1/courses/{eval_course.id}/assignments/generate", headers=inst.h,
                    json={"chapter_id": ch["id"], "count": 8, "types": ["multiple_choice", "short_answer"]})
    assert r.status_code in (201, 409), r.text
    # (tester) and it asks about other sentences: offline the choice was the same, so a second generation stored
    # the same items again
    again = r.json()["items"] if r.status_code == 201 else []
    assert not {i["citation"]["start"] for i in items} & {i["citation"]["start"] for i in again}, (items, again)
    assert not {i["prompt"] for i in items} & {i["prompt"] for i in again}
    both = items + again
    answers = [it["options"][it["correct"][0]].lower() for it in both if it["type"] == "multiple_choice"]
    leaks = [(a, it["title"], it["concept"]) for a in answers for it in both
             if re.search(rf"\b{re.escape(a)}\b", (it["title"] + " " + it["concept"]).lower())]
    assert not leaks, leaks
    # drafts are invisible to learners until the instructor publishes them
    listed = client.get(f"/api/v1/courses/{eval_course.id}/assignments", headers=learner.h).json()["items"]
    assert not {i["id"] for i in items} & {a["id"] for a in listed}
    assert client.get(f"/api/v1/assignments/{items[0]['id']}", headers=learner.h).status_code == 404
    # a whole video: items spread over its chapters
    r = client.post(f"/api/v1/courses/{eval_course.id}/assignments/generate", headers=inst.h,
                    json={"video_id": video_id, "count": 3, "difficulty": "hard", "types": ["short_answer"]})
    assert r.status_code == 201 and len({i["chapter_id"] for i in r.json()["items"]}) == min(3, len(chapters))
    bad = client.post(f"/api/v1/courses/{eval_course.id}/assignments/generate", headers=inst.h,
                      json={"video_id": video_id, "chapter_id": ch["id"]})
    assert bad.status_code == 400 and bad.json()["field"] == "video_id"
    assert client.post(f"/api/v1/courses/{eval_course.id}/assignments/generate", headers=learner.h,
                       json={"video_id": video_id}).status_code == 403


def test_next_step_suggests_difficulty_and_what_to_rewatch(client, eval_course: EvalCourse):
    inst, learner = eval_course.instructor, eval_course.learner
    video_id = eval_course.videos["yale-psychology-happiness.vtt"]
    ch = client.get(f"/api/v1/courses/{eval_course.id}/videos/{video_id}/chapters", headers=inst.h).json()[0]
    items = client.post(f"/api/v1/courses/{eval_course.id}/assignments/generate", headers=inst.h,
                        json={"chapter_id": ch["id"], "count": 3, "difficulty": "medium",
                              "types": ["multiple_choice"]}).json()["items"]
    for it in items:
        assert client.post(f"/api/v1/assignments/{it['id']}/publish", headers=inst.h).status_code == 200
    first = items[0]
    wrong = next(i for i in range(4) if i not in first["correct"])
    seen = client.get(f"/api/v1/assignments/{first['id']}", headers=learner.h).json()
    assert "correct" not in seen and seen["citation"]["start"] == first["citation"]["start"]
    r = client.post(f"/api/v1/assignments/{first['id']}/submissions", json={"answer": [wrong]}, headers=learner.h)
    assert r.status_code == 201 and r.json()["score"] == 0
    nxt = client.get(f"/api/v1/courses/{eval_course.id}/me/next", headers=learner.h).json()
    assert nxt["difficulty"] == "easy" and "step down" in nxt["reason"]
    (weak,) = [c for c in nxt["struggling"] if c["chapter_id"] == ch["id"]]
    assert weak["mean_score"] == 0 and weak["attempted"] == 1
    starts = [m["start"] for m in weak["rewatch"]]
    assert round(ch["start"], 1) in starts and round(first["citation"]["start"], 1) in starts
    # the next item is one not tried yet, from the concept the learner struggles with
    assert nxt["next"]["id"] in {i["id"] for i in items[1:]}
    # (its concept is the chapter's title, without the item's answer in it)
    assert nxt["next"]["concept"] == next(i for i in items if i["id"] == nxt["next"]["id"])["concept"]


def test_deleting_a_video_drops_the_citations_that_point_at_it(client, make, worker, settings):
    """An item's citation is a moment of a video: once the video is deleted, learners are not sent to it."""
    from tests.conftest import fetch, upload, wait_job

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Cited"}, headers=inst.h).json()["id"]
    srt = "".join(f"{i}\n00:00:{i * 5:02d},000 --> 00:00:{i * 5 + 4:02d},000\nA hash table keeps keys in buckets "
                  f"chosen by hashing, and a collision number {i} is resolved by chaining lists.\n\n" for i in range(1, 9))
    r = upload(client, cid, inst.h, "hash.srt", srt.encode())
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    vid = r.json()["video_id"]
    items = client.post(f"/api/v1/courses/{cid}/assignments/generate", headers=inst.h,
                        json={"video_id": vid, "count": 1, "types": ["short_answer"]}).json()["items"]
    assert items and items[0]["citation"]["video_id"] == vid
    # (tester) and a grade's advice to rewatch a moment of it: a multiple-choice item citing the video, answered
    learner = make.user("learner")
    client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": learner.id}, headers=inst.h)
    mc = client.post(f"/api/v1/courses/{cid}/assignments", headers=inst.h, json={
        "type": "multiple_choice", "title": "Buckets", "prompt": "Collisions are resolved by?",
        "options": ["chaining", "sorting"], "correct": [0], "video_id": vid}).json()
    fetch(settings, """UPDATE assignments SET citation = jsonb_build_object('video_id', $2::bigint, 'start', 5.0,
                                                                           'end', 9.0) WHERE id = $1""", mc["id"], vid)
    client.post(f"/api/v1/assignments/{mc['id']}/publish", headers=inst.h)
    sub = client.post(f"/api/v1/assignments/{mc['id']}/submissions", json={"answer": [1]}, headers=learner.h).json()
    assert sub["feedback"]["rewatch"]["video_id"] == vid, sub
    # (tester) a written answer's advice names the moment too, in its improve part, and a regrade keeps the grade
    # the learner was given (`released`) with the same: both stayed after the video was deleted
    from store.submissions import rewatch_advice

    moment = {"video_id": vid, "start": 140.0, "end": 150.0, "title": "Lecture 1"}
    advice = rewatch_advice(moment)
    assert advice == "Rewatch Lecture 1 at 2:20."
    written = {"right": "On the right track.", "improve": f"Explain chaining. {advice}", "rewatch": moment}
    fetch(settings, """UPDATE submissions SET feedback = feedback || $2::text::jsonb,
                           released = jsonb_build_object('score', 40, 'feedback', $2::text::jsonb) WHERE id = $1""",
          sub["id"], json.dumps(written))
    assert client.delete(f"/api/v1/courses/{cid}/videos/{vid}", headers=inst.h).status_code == 204
    row = fetch(settings, "SELECT feedback::text, released::text FROM submissions WHERE id = $1", sub["id"])[0]
    stored, released = json.loads(row["feedback"]), json.loads(row["released"])
    for fb in (stored, released["feedback"]):
        assert "rewatch" not in fb and fb["improve"] == "Explain chaining.", fb
    assert released["score"] == 40
    after = client.get(f"/api/v1/assignments/{items[0]['id']}", headers=inst.h).json()
    assert after.get("citation") is None and after["id"] == items[0]["id"]
    fb = client.get(f"/api/v1/submissions/{sub['id']}", headers=learner.h).json()["feedback"]
    assert "rewatch" not in fb and fb["right"] == "On the right track." and fb["improve"] == "Explain chaining.", fb


def test_generation_is_rate_limited_per_user(client, make, settings, eval_course: EvalCourse):
    """Each generation may call the model once per chapter: a user gets a bounded number an hour. A request refused
    (a video not ready, a mistyped chapter: nothing generated) spends none of it; ten such 404s spent a third."""
    from redis.asyncio import Redis

    from server.api.assignments import GENERATE_BURST, GENERATE_PER_HOUR
    from store.keys import rate_generate
    from store.ratelimit import SendLimiter
    from tests.conftest import fetch, run_sync

    async def drain(user_id: int) -> int:
        """Take the user's whole budget: how much was left."""
        redis = Redis.from_url(settings.redis_url)
        try:
            limiter = SendLimiter(redis, GENERATE_PER_HOUR / 3600, GENERATE_BURST, key=rate_generate)
            n = 0
            while (await limiter.take(user_id))[0]:
                n += 1
            return n
        finally:
            await redis.aclose()

    async def refill(user_id: int) -> None:
        redis = Redis.from_url(settings.redis_url)
        try:
            await redis.delete(rate_generate(user_id))
        finally:
            await redis.aclose()

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Costly"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'v', 'transcript', "
                          "'processing') RETURNING id", cid)[0]["id"]
    url = f"/api/v1/courses/{cid}/assignments/generate"
    codes = [client.post(url, json={"video_id": vid}, headers=inst.h).status_code for _ in range(GENERATE_BURST + 2)]
    assert codes == [409] * (GENERATE_BURST + 2)
    assert client.post(url, json={"chapter_id": 999999}, headers=inst.h).status_code == 404
    assert run_sync(drain(inst.id)) == GENERATE_BURST  # all of it left
    assert client.post(url, json={"video_id": vid}, headers=inst.h).status_code == 409  # (spent: still the reason)
    # a generation that would run, with the budget spent: 429
    owner = eval_course.instructor
    run_sync(drain(owner.id))
    try:
        r = client.post(f"/api/v1/courses/{eval_course.id}/assignments/generate", headers=owner.h,
                        json={"video_id": eval_course.videos["3b1b-bitcoin.srt"], "count": 1})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
        # one generation left, and a request sent twice at once with its Idempotency-Key: the twin the budget
        # refuses waits for the drafts of the one that runs (it was a 429)
        run_sync(refill(owner.id))

        async def leave_one() -> None:
            redis = Redis.from_url(settings.redis_url)
            try:
                limiter = SendLimiter(redis, GENERATE_PER_HOUR / 3600, GENERATE_BURST, key=rate_generate)
                for _ in range(GENERATE_BURST - 1):
                    assert (await limiter.take(owner.id))[0]
            finally:
                await redis.aclose()

        run_sync(leave_one())
        from concurrent.futures import ThreadPoolExecutor

        body = {"video_id": eval_course.videos["3b1b-bitcoin.srt"], "count": 1, "types": ["short_answer"]}

        def twin(_: int) -> httpx.Response:
            with httpx.Client(base_url=str(client.base_url), timeout=120) as c:
                return c.post(f"/api/v1/courses/{eval_course.id}/assignments/generate", json=body,
                              headers={**owner.h, "Idempotency-Key": "twins-on-a-spent-budget"})

        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(twin, range(2)))
        assert sorted(r.status_code for r in got) == [200, 201], [r.text for r in got]
        assert got[0].json()["items"] == got[1].json()["items"]
    finally:
        run_sync(refill(owner.id))


def test_a_slow_model_gets_one_deadline_for_the_whole_generation(eval_course: EvalCourse, data_dir):
    """The model was called once per chapter, one after another, each with its own timeout: a video of many
    chapters held the request for minutes. Now the calls share STUDYHALL_GENERATE_DEADLINE_S (and run a few at
    once); chapters the model has not written by then get offline items."""
    import time

    import httpx

    from tests.agents.fake_llm_servers import FakeLLMServer, Reply
    from tests.conftest import stop_process
    from tests.server.conftest import spawn_ready

    inst = eval_course.instructor
    video_id = eval_course.videos["3b1b-bitcoin.srt"]
    with FakeLLMServer(default=Reply(text='{"items": []}', wait_s=8.0)) as fake:
        ((proc, url),) = spawn_ready(data_dir, ["generate-deadline"], {
            "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake.openai_base_url, "STUDYHALL_LLM": "openai",
            "STUDYHALL_GENERATE_DEADLINE_S": "1"})
        try:
            t0 = time.monotonic()
            r = httpx.post(f"{url}/api/v1/courses/{eval_course.id}/assignments/generate", headers=inst.h,
                           json={"video_id": video_id, "count": 6, "types": ["short_answer"]}, timeout=60)
            took = time.monotonic() - t0
            assert r.status_code == 201, r.text
            assert r.json()["generator"] == "offline" and len(r.json()["items"]) >= 2
            assert took < 8, took  # not even one model reply was waited for
            assert len(fake.requests) >= 2  # the model was asked, several chapters at once
        finally:
            stop_process(proc)


async def test_a_generation_retried_with_its_idempotency_key_makes_one_set_of_drafts(server, eval_course: EvalCourse,
                                                                                     settings, make):
    """A generation runs inside the request (up to two minutes): a client or proxy timing out and retrying made a
    second set of drafts. With the same Idempotency-Key the retry gets the first set (200), also when both run at
    once (one set is stored)."""
    import asyncio

    import httpx

    from tests.conftest import fetch

    inst = eval_course.instructor
    vid = eval_course.videos["3b1b-bitcoin.srt"]
    url = f"/api/v1/courses/{eval_course.id}/assignments/generate"
    body = {"video_id": vid, "count": 1, "types": ["short_answer"]}
    before = fetch(settings, "SELECT count(*) AS n FROM assignments WHERE course_id = $1", eval_course.id)[0]["n"]
    async with httpx.AsyncClient(base_url=server, timeout=120) as c:
        first = await c.post(url, json=body, headers={**inst.h, "Idempotency-Key": "gen-1"})
        assert first.status_code == 201, first.text
        again = await c.post(url, json=body, headers={**inst.h, "Idempotency-Key": "gen-1"})
        assert again.status_code == 200 and [i["id"] for i in again.json()["items"]] == \
            [i["id"] for i in first.json()["items"]]
        # the same request with its types listed in another order is the same request
        same = await c.post(url, json={**body, "types": ["short_answer", "short_answer"]},
                            headers={**inst.h, "Idempotency-Key": "gen-1"})
        assert same.status_code == 200, same.text
        # the key with another body is refused (it returned the first request's drafts)
        other = await c.post(url, json={**body, "count": 2}, headers={**inst.h, "Idempotency-Key": "gen-1"})
        assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused", other.text
        both = await asyncio.gather(*(c.post(url, json=body, headers={**inst.h, "Idempotency-Key": "gen-2"})
                                      for _ in range(2)))
        assert sorted(r.status_code for r in both) == [200, 201], [r.text for r in both]
        assert [i["id"] for i in both[0].json()["items"]] == [i["id"] for i in both[1].json()["items"]]
        # a colleague's key is theirs: the same key from another instructor of the course is another generation
        colleague = make.user("instructor", tenant=eval_course.tenant)
        theirs = await c.post(url, json=body, headers={**colleague.h, "Idempotency-Key": "gen-1"})
        assert theirs.status_code == 201, theirs.text
        assert not {i["id"] for i in theirs.json()["items"]} & {i["id"] for i in first.json()["items"]}
    made = fetch(settings, "SELECT count(*) AS n FROM assignments WHERE course_id = $1", eval_course.id)[0]["n"]
    assert made - before == 2 * len(first.json()["items"]) + len(theirs.json()["items"])


def test_generating_again_on_a_chapter_whose_sentences_all_have_items_is_nothing_new(client, make, worker):
    """(Review) with every sentence asked about, a request neither generates (offline or by a model) nor spends the
    hour's budget: 409 `nothing_new` before it."""
    from tests.conftest import upload, wait_job

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Short"}, headers=inst.h).json()["id"]
    lines = ["Photosynthesis turns sunlight into chemical energy inside chloroplasts of leaves.",
             "Mitochondria release that stored energy through cellular respiration in every cell.",
             "Ribosomes assemble proteins from amino acids following messenger RNA instructions."]
    srt = "".join(f"{i}\n00:00:{i * 5:02d},000 --> 00:00:{i * 5 + 4:02d},000\n{t}\n\n" for i, t in enumerate(lines, 1))
    r = upload(client, cid, inst.h, "cells.srt", srt.encode())
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    vid = r.json()["video_id"]
    url = f"/api/v1/courses/{cid}/assignments/generate"
    first = client.post(url, headers=inst.h, json={"video_id": vid, "count": 10, "types": ["short_answer"]})
    assert first.status_code == 201, first.text
    cited = {i["citation"]["start"] for i in first.json()["items"]}
    while True:  # until every sentence worth an item has one
        r = client.post(url, headers=inst.h, json={"video_id": vid, "count": 10, "types": ["short_answer"]})
        if r.status_code != 201:
            break
        new = {i["citation"]["start"] for i in r.json()["items"]}
        assert not new & cited, (new, cited)
        cited |= new
    assert r.status_code == 409 and r.json()["code"] == "nothing_new", r.text
