"""Ingest through the real API, queue and worker process: timestamps, search quality, chapters, failures."""
from __future__ import annotations

import io
import json
import math
import time
import wave

import numpy as np
import pytest

from store.videos import upload_path
from tests.conftest import EVAL, EvalCourse, Factory, fetch, upload, wait_job

# Measured 0.95 (57/60) with the offline defaults on ../shared/eval (bench/search_quality.py); the issue's
# floor is 0.92. Losing more than one question of what we measured fails here.
SEARCH_TOP5_FLOOR = 0.93
MAX_CHUNK_SECONDS = 90.0


def test_eval_transcripts_chunked_with_sane_timestamps(eval_course: EvalCourse, settings):
    for file, video_id in eval_course.videos.items():
        chunks = fetch(settings, "SELECT position, start_s, end_s, text FROM chunks WHERE video_id = $1 ORDER BY position",
                       video_id)
        segs = fetch(settings, "SELECT start_s, end_s FROM transcript_segments WHERE video_id = $1 ORDER BY idx",
                     video_id)
        video = fetch(settings, "SELECT duration_s, chunk_count, status, embed_model FROM videos WHERE id = $1",
                      video_id)[0]
        assert video["status"] == "ready" and video["chunk_count"] == len(chunks) > 0, file
        assert [c["position"] for c in chunks] == list(range(len(chunks)))
        starts = [c["start_s"] for c in chunks]
        assert starts == sorted(starts), f"{file}: chunk starts not monotonic"
        for c in chunks:
            assert 0 <= c["start_s"] <= c["end_s"] <= video["duration_s"] + 1e-6, (file, c["position"])
            assert c["end_s"] - c["start_s"] <= MAX_CHUNK_SECONDS, (file, c["position"], c["end_s"] - c["start_s"])
        # chunks cover the transcript: no gap between consecutive chunks, first and last line up with the cues
        assert abs(chunks[0]["start_s"] - segs[0]["start_s"]) < 1.0
        assert abs(chunks[-1]["end_s"] - segs[-1]["end_s"]) < 1.0
        spans = [(c["start_s"], c["end_s"]) for c in chunks]
        for s in segs:
            mid = (s["start_s"] + s["end_s"]) / 2
            assert any(a - 0.5 <= mid <= b + 0.5 for a, b in spans), f"{file}: cue at {s['start_s']} in no chunk"


def _overlaps(hit: dict, spans: list) -> bool:
    return any(hit["start"] <= b and hit["end"] >= a for a, b in spans)


def _search(client, course: EvalCourse, **params):  # type: ignore[no-untyped-def]
    """The course's learner searches, waiting when told to as a client should (the per-user search limit is
    shared by the tests of this module)."""
    while (r := client.get(f"/api/v1/courses/{course.id}/search", params=params,
                           headers=course.learner.h)).status_code == 429:
        time.sleep(float(r.headers["Retry-After"]))
    return r


def test_search_finds_gold_spans(eval_course: EvalCourse, client):
    spec = json.loads((EVAL / "questions.json").read_text())
    hits_at_5, total, misses = 0, 0, []
    for q in spec["questions"]:
        r = _search(client, eval_course, q=q["question"], k=5)
        assert r.status_code == 200, r.text
        vid = eval_course.videos[q["file"]]
        ok = any(h["video_id"] == vid and _overlaps(h, q["spans"]) for h in r.json()["hits"])
        hits_at_5 += ok
        total += 1
        if not ok:
            misses.append(q["id"])
    rate = hits_at_5 / total
    print(f"search top-5 hit rate {rate:.3f} ({hits_at_5}/{total}); misses: {misses}")
    assert rate >= SEARCH_TOP5_FLOOR, misses


def test_search_scoping_and_access(eval_course: EvalCourse, client, make: Factory, settings):
    vid = eval_course.videos["3b1b-bitcoin.srt"]
    r = _search(client, eval_course, q="digital signatures", k=3, video_id=vid)
    assert r.status_code == 200 and r.json()["hits"]
    assert {h["video_id"] for h in r.json()["hits"]} == {vid}
    # another course's video (or none at all) is not found here, rather than an empty result
    other = client.post("/api/v1/courses", json={"title": "Other"}, headers=eval_course.instructor.h).json()["id"]
    theirs = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'v', 'transcript', "
                             "'ready') RETURNING id", other)[0]["id"]
    for missing in (theirs, theirs + 1000):
        r = _search(client, eval_course, q="signatures", video_id=missing)
        assert r.status_code == 404 and r.json()["message"] == f"video {missing} not found", r.text
    stranger = make.user("learner")
    assert client.get(f"/api/v1/courses/{eval_course.id}/search", params={"q": "x"},
                      headers=stranger.h).status_code == 404
    for blank in ("", "\u200b\u3164 "):
        bad = _search(client, eval_course, q=blank, k=3)
        assert bad.status_code == 400 and bad.json()["field"] == "q", bad.text
    assert _search(client, eval_course, q="x", k=500).status_code == 400
    nul = _search(client, eval_course, q="a\x00b")
    assert nul.status_code == 400 and nul.json()["field"] == "q"
    # bytes that are not UTF-8 are refused (they were searched as U+FFFD); a real U+FFFD is text like any other
    raw = client.get(f"/api/v1/courses/{eval_course.id}/search?q=hash%FF%FE&k=3", headers=eval_course.learner.h)
    assert raw.status_code == 400 and "UTF-8" in raw.json()["message"] and raw.json()["field"] == "q", raw.text
    assert _search(client, eval_course, q="hash \ufffd", k=3).status_code == 200
    assert _search(client, eval_course, q="signatures", k=3).json()["awaiting_reembed"] == []
    # each search embeds its query: a burst of 20 per user, then 429 with when to come back
    eager = make.user("learner", tenant=eval_course.tenant)
    assert client.post(f"/api/v1/courses/{eval_course.id}/enrollments", json={"user_id": eager.id},
                       headers=eval_course.instructor.h).status_code == 201
    import time

    from server.api.videos import SEARCH_BURST, SEARCH_RATE

    codes, t0 = [], time.monotonic()
    while len(codes) < 200 and (not codes or codes[-1].status_code == 200):
        codes.append(client.get(f"/api/v1/courses/{eval_course.id}/search", params={"q": "hash"}, headers=eager.h))
    # the burst, and what refilled while it ran (searches are slow on a busy machine)
    allowed = SEARCH_BURST + SEARCH_RATE * (time.monotonic() - t0)
    assert codes[-1].status_code == 429, codes[-1].text
    assert SEARCH_BURST <= len(codes) - 1 <= allowed + 1, (len(codes), allowed)
    assert 0 < float(codes[-1].headers["Retry-After"]) <= 1


def test_chapters_tile_each_video(eval_course: EvalCourse, client):
    for file, vid in eval_course.videos.items():
        r = client.get(f"/api/v1/courses/{eval_course.id}/videos/{vid}/chapters", headers=eval_course.learner.h)
        assert r.status_code == 200
        chapters = r.json()
        assert chapters, file
        assert [c["index"] for c in chapters] == list(range(len(chapters)))
        for a, b in zip(chapters, chapters[1:]):
            assert a["end"] == pytest.approx(b["start"]) and a["start"] < b["start"]
        assert all(c["title"] and c["summary"] for c in chapters)
    # a long lecture gets more than one chapter
    long_vid = eval_course.videos["yale-psychology-happiness.vtt"]
    chapters = client.get(f"/api/v1/courses/{eval_course.id}/videos/{long_vid}/chapters",
                          headers=eval_course.learner.h).json()
    assert len(chapters) >= 3


def test_video_listing_and_transcript(eval_course: EvalCourse, client):
    videos = client.get(f"/api/v1/courses/{eval_course.id}/videos", headers=eval_course.learner.h).json()
    assert {v["id"] for v in videos} == set(eval_course.videos.values())
    assert all(v["job_id"] is None for v in videos)  # jobs are staff's
    assert all(v["status"] == "ready" and v["embed_model"] for v in videos)
    vid = eval_course.videos["mit-18.06-linear-algebra-lec1.vtt"]
    segs = client.get(f"/api/v1/courses/{eval_course.id}/videos/{vid}/transcript", headers=eval_course.learner.h).json()
    assert segs[0]["text"].startswith("Hi") and segs[0]["start"] == pytest.approx(8.711, abs=0.01)


def _course(client, make: Factory):
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Uploads"}, headers=inst.h).json()["id"]
    return inst, cid


def _wav(seconds: float = 1.0) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        t = np.arange(int(16000 * seconds)) / 16000
        w.writeframes((np.sin(2 * math.pi * 440 * t) * 3000).astype("<i2").tobytes())
    return buf.getvalue()


def _mp4() -> bytes:
    import av

    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as c:
        stream = c.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(20):
            frame = av.AudioFrame.from_ndarray((np.sin(np.arange(1024) / 5) * 0.3).astype("float32").reshape(1, -1),
                                               format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize("name,data,status", [
    ("empty.srt", b"", 400),
    ("image.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, 415),
    ("notes.txt", b"just some notes, not a transcript at all", 415),
    ("broken.srt", b"1\n00:00:01,000 --> 00:00:02,000\nhello\n\n2\n00:00:03,000 --> 00:00:zz,000\nworld\n\n"
                   b"3\n00:00:05,000 --> 00:00:06,000\nagain\n\n", 400),
    ("negative.srt", b"1\n-00:00:01,000 --> 00:00:02,000\nhi\n", 400),  # was 415: named a transcript, the parser says
    ("colons.srt", b"1\n00:00:01:000 --> 00:00:02:000\nhi\n", 400),      # what is wrong and on which line
    ("header-only.wav", _wav(2.0)[:44], 400),
    ("truncated.mp4", _mp4()[: len(_mp4()) // 2], 400),
    ("fake.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, 400),
    ("tags-only.mp3", b"ID3\x03\x00\x00\x00\x00\x00\x00" * 700, 400),  # chained ID3 tags, no sound: was a 500
])
def test_bad_uploads_store_nothing(client, make: Factory, settings, name, data, status):
    inst, cid = _course(client, make)
    r = upload(client, cid, inst.h, name, data)
    assert r.status_code == status, r.text
    assert r.json()["message"]
    if name in ("negative.srt", "colons.srt"):
        assert "line 2" in r.json()["message"], r.text
    assert fetch(settings, "SELECT count(*) AS n FROM videos WHERE course_id = $1", cid)[0]["n"] == 0
    stored = settings.data_dir / "uploads" / str(cid)
    assert not stored.exists() or not list(stored.iterdir())


def test_oversize_upload_413(client, make: Factory, settings):
    inst, cid = _course(client, make)
    r = upload(client, cid, inst.h, "huge.srt", b"1\n00:00:01,000 --> 00:00:02,000\nhi\n\n" * 700_000)
    assert r.status_code == 413
    assert fetch(settings, "SELECT count(*) AS n FROM videos WHERE course_id = $1", cid)[0]["n"] == 0


def test_oversize_chunked_upload_is_413_and_too_many_fields_400(client, make: Factory, settings):
    """Without a Content-Length (chunked), an upload over the limit is still a 413 with the limit, not a
    'malformed multipart body'; a form with more text fields than any upload needs is refused early."""
    inst, cid = _course(client, make)
    boundary = "studyhallboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"huge.srt\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    cue = b"1\n00:00:01,000 --> 00:00:02,000\nhi\n\n"

    def chunks():  # a generator body: httpx sends it chunked, with no Content-Length
        yield head
        for _ in range(settings.max_upload_bytes // (len(cue) * 10_000) + 2):
            yield cue * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post(f"/api/v1/courses/{cid}/videos", content=chunks(),
                    headers={**inst.h, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "larger than" in r.json()["message"], r.text
    fields = {f"f{i}": "x" for i in range(200)}
    r = client.post(f"/api/v1/courses/{cid}/videos", data=fields, files={"file": ("a.srt", cue)}, headers=inst.h)
    assert r.status_code == 400 and "too many form fields" in r.json()["message"], r.text
    assert fetch(settings, "SELECT count(*) AS n FROM videos WHERE course_id = $1", cid)[0]["n"] == 0


def test_upload_content_type_in_any_case_and_a_long_file_name_as_title(client, make: Factory, settings):
    """Media types are case-insensitive; a title taken from a long file name is cut to fit (the user never sent a
    title to be told it is too long); a title with a NUL is refused."""
    inst, cid = _course(client, make)
    boundary = "studyhallboundary"
    name = "lecture-" + "x" * 230 + ".srt"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n1\n00:00:01,000 --> 00:00:02,000\nhi\n\r\n"
            f"--{boundary}--\r\n").encode()
    r = client.post(f"/api/v1/courses/{cid}/videos", content=body,
                    headers={**inst.h, "Content-Type": f"Multipart/Form-Data; boundary={boundary}"})
    assert r.status_code == 202, r.text
    title = client.get(f"/api/v1/courses/{cid}/videos/{r.json()['video_id']}", headers=inst.h).json()["title"]
    assert title == name.removesuffix(".srt")[:200]
    r = upload(client, cid, inst.h, "a.srt", b"1\n00:00:01,000 --> 00:00:02,000\nhi\n", title="bad\x00title")
    assert r.status_code == 400 and r.json()["field"] == "title", r.text
    # a field the upload does not take is said, not ignored (a misspelt title, a YouTube link sent as a form field)
    for field in ("titel", "youtube"):
        r = client.post(f"/api/v1/courses/{cid}/videos", data={field: "Lecture 1"}, headers=inst.h,
                        files={"file": ("b.srt", b"1\n00:00:01,000 --> 00:00:02,000\nhi\n")})
        assert r.status_code == 400 and r.json()["field"] == field, r.text
    assert len(client.get(f"/api/v1/courses/{cid}/videos", headers=inst.h).json()) == 1  # only the first


def test_a_youtube_video_is_added_to_a_course_once(client, make: Factory, settings):
    inst, cid = _course(client, make)
    first = client.post(f"/api/v1/courses/{cid}/videos", json={"title": "Rick", "youtube": "dQw4w9WgXcQ"},
                        headers=inst.h)
    assert first.status_code == 202
    again = client.post(f"/api/v1/courses/{cid}/videos",
                        json={"title": "Rick again", "youtube": "https://www.youtube.com/watch?v=dQw4w9WgXcQ"},
                        headers=inst.h)
    assert again.status_code == 409 and again.json()["code"] == "duplicate", again.text
    assert f"video {first.json()['video_id']}" in again.json()["message"]
    # the video names its job for staff (an instructor who lost the 202 could not find it to read why or retry)
    url = f"/api/v1/courses/{cid}/videos/{first.json()['video_id']}"
    assert client.get(url, headers=inst.h).json()["job_id"] == first.json()["job_id"]
    assert client.get(f"/api/v1/courses/{cid}/videos", headers=inst.h).json()[0]["job_id"] == first.json()["job_id"]
    assert fetch(settings, "SELECT count(*) AS n FROM videos WHERE course_id = $1", cid)[0]["n"] == 1
    other = client.post("/api/v1/courses", json={"title": "Another"}, headers=inst.h).json()["id"]
    assert client.post(f"/api/v1/courses/{other}/videos", json={"title": "Rick", "youtube": "dQw4w9WgXcQ"},
                       headers=inst.h).status_code == 202  # another course may have it too


async def test_a_retried_upload_with_its_idempotency_key_is_one_video(server, make: Factory, settings):
    """A retried upload (its reply lost behind a proxy) stored the file again and ingested it twice: with the same
    Idempotency-Key it gets the video the key made (200), also when the two arrive together; the key with another
    file is refused."""
    import asyncio
    from pathlib import Path

    import httpx

    inst = make.user("instructor")
    data = (EVAL / "transcripts" / "mit-18.06-linear-algebra-lec1.vtt").read_bytes()
    async with httpx.AsyncClient(base_url=server, timeout=60) as c:
        cid = (await c.post("/api/v1/courses", json={"title": "Retry"}, headers=inst.h)).json()["id"]
        url, key = f"/api/v1/courses/{cid}/videos", {**inst.h, "Idempotency-Key": "upload-1"}

        def send(body: bytes = data, name: str = "lec1.vtt"):  # type: ignore[no-untyped-def]
            return c.post(url, files={"file": (name, body)}, data={"title": "Lecture 1"}, headers=key)

        first = await send()
        assert first.status_code == 202, first.text
        again = await send()
        assert again.status_code == 200 and again.json()["video_id"] == first.json()["video_id"]
        assert again.json()["job_id"] == first.json()["job_id"]
        other = await send(data + b"\n", "lec2.vtt")
        assert other.status_code == 409 and other.json()["code"] == "idempotency_key_reused", other.text
        # a colleague's key is theirs: the same key from another instructor is another upload (it was refused, or
        # got the first one's video back and had its file deleted)
        colleague = {**make.user("instructor").h, "Idempotency-Key": "upload-1"}
        theirs = await c.post(url, files={"file": ("lec2.vtt", data + b"\n")}, data={"title": "Lecture 2"},
                              headers=colleague)
        assert theirs.status_code == 202 and theirs.json()["video_id"] != first.json()["video_id"], theirs.text
        key = {**inst.h, "Idempotency-Key": "upload-2"}
        both = await asyncio.gather(send(), send())  # at once: one stores it, the other finds it
        assert sorted(r.status_code for r in both) == [200, 202], [r.text for r in both]
        assert len({r.json()["video_id"] for r in both}) == 1
        yt = {**inst.h, "Idempotency-Key": "yt-1"}
        body = {"title": "Rick", "youtube": "dQw4w9WgXcQ"}
        assert (await c.post(url, json=body, headers=yt)).status_code == 202
        assert (await c.post(url, json=body, headers=yt)).status_code == 200
        assert (await c.post(url, json=body, headers={**inst.h, "Idempotency-Key": "k" * 101})).status_code == 400
    assert fetch(settings, "SELECT count(*) AS n FROM videos WHERE course_id = $1", cid)[0]["n"] == 4
    assert fetch(settings, "SELECT count(*) AS n FROM jobs WHERE course_id = $1", cid)[0]["n"] == 4
    uploads = Path(settings.data_dir) / "uploads" / str(cid)
    assert len(list(uploads.glob("*.upload"))) == 3  # the repeats' copies went


def test_bad_video_json(client, make: Factory):
    inst, cid = _course(client, make)
    for body, field in (({"title": "x", "youtube": "https://vimeo.com/123"}, "youtube"),
                        ({"title": "x"}, "youtube"), ({"youtube": "dQw4w9WgXcQ"}, "title")):
        r = client.post(f"/api/v1/courses/{cid}/videos", json=body, headers=inst.h)
        assert r.status_code == 400 and r.json()["field"] == field, r.text
    # a form sent urlencoded carries no file: said so (it was "request body is not valid JSON")
    r = client.post(f"/api/v1/courses/{cid}/videos", data={"title": "x"}, headers=inst.h)
    assert r.status_code == 400 and r.json()["field"] == "file" and "multipart/form-data" in r.json()["message"]
    learner = make.user("learner")
    assert client.post(f"/api/v1/courses/{cid}/videos", json={"title": "x", "youtube": "dQw4w9WgXcQ"},
                       headers=learner.h).status_code == 403


def test_unreachable_youtube_fails_with_reason_and_can_be_retried(client, make: Factory, worker, settings):
    # No network here: every attempt is a transient network error; after the last attempt the job fails
    # saying why, and an instructor can retry it. Whoever started the job hears each move as `job.progress`:
    # back to queued between attempts (saying why), failed, queued again on the retry.
    import redis as redis_sync

    from store.events import JobProgress, decode, user_topic
    from store.keys import events_channel

    inst, cid = _course(client, make)
    listener = redis_sync.Redis.from_url(settings.redis_url).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(events_channel(user_topic(inst.id)))
    listener.get_message(timeout=1)  # the subscription's confirmation (ignored: None)

    def heard() -> list[JobProgress]:
        out = []
        while (m := listener.get_message(timeout=0.05)) is not None:
            if isinstance(ev := decode(m["data"]), JobProgress):
                out.append(ev)
        return out

    r = client.post(f"/api/v1/courses/{cid}/videos", json={"title": "Rick", "youtube": "https://youtu.be/dQw4w9WgXcQ"},
                    headers=inst.h)
    assert r.status_code == 202
    # (tester) while an attempt waits for its retry the video says so: it said `processing`, no error, all along
    seen, deadline = set(), time.monotonic() + 120
    while (job := client.get(f"/api/v1/jobs/{r.json()['job_id']}", headers=inst.h).json())["state"] != "failed":
        v = client.get(f"/api/v1/courses/{cid}/videos/{r.json()['video_id']}", headers=inst.h).json()
        seen.add((v["status"], "retrying in" in (v["error"] or "")))
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert ("queued", True) in seen and ("processing", True) not in seen, seen
    assert job["state"] == "failed" and job["attempts"] == job["max_attempts"]
    # the reason is the network's, not a crash of ours
    assert job["error"].startswith(("could not connect to YouTube", "YouTube did not respond", "request to YouTube"))
    assert "gave up after" in job["error"] and "internal error" not in job["error"]
    first_run = heard()
    waits = [e for e in first_run if e.state == "queued"]
    assert len(waits) == job["max_attempts"] - 1 and all("retrying in" in (e.error or "") for e in waits), first_run
    assert first_run[-1].state == "failed" and first_run[-1].error == job["error"]
    video = client.get(f"/api/v1/courses/{cid}/videos/{r.json()['video_id']}", headers=inst.h).json()
    assert video["status"] == "failed" and video["error"]
    retried = client.post(f"/api/v1/jobs/{job['id']}/retry", headers=inst.h)
    assert retried.status_code == 202 and retried.json()["state"] == "queued"
    assert retried.json()["attempts"] == 0 and retried.json()["error"] is None  # a fresh run, not the old verdict
    time.sleep(0.2)
    told = heard()
    assert told and told[0].state == "queued" and told[0].error is None and told[0].progress == 0, told
    video = client.get(f"/api/v1/courses/{cid}/videos/{r.json()['video_id']}", headers=inst.h).json()
    # the video says so at once (not the old verdict; the fresh run's first attempt may have failed already)
    assert video["status"] in ("queued", "processing") and "retrying in" in (video["error"] or "retrying in"), video
    assert client.post(f"/api/v1/jobs/{job['id']}/retry", headers=inst.h).status_code == 409
    again = wait_job(client, job["id"], inst.h, timeout=120)
    assert again["state"] == "failed" and again["attempts"] == again["max_attempts"]  # it really ran again
    assert again["error"].startswith(("could not connect to YouTube", "YouTube did not respond", "request to YouTube"))
    listener.close()


def test_worker_killed_mid_job_completes_once(client, make: Factory, worker, settings):
    inst, cid = _course(client, make)
    corpus = sorted((EVAL / "corpus").glob("*.vtt"))
    # several long lectures in one file's worth of work: the biggest transcript of the corpus
    big = max(corpus, key=lambda p: p.stat().st_size)
    r = upload(client, cid, inst.h, big.name, big.read_bytes())
    assert r.status_code == 202, r.text
    job_id, video_id = r.json()["job_id"], r.json()["video_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = client.get(f"/api/v1/jobs/{job_id}", headers=inst.h).json()["state"]
        if state in ("chunking", "embedding", "chaptering", "done"):
            break
        time.sleep(0.02)
    worker.kill()
    before = client.get(f"/api/v1/jobs/{job_id}", headers=inst.h).json()
    # the longest lecture embeds for seconds: the kill must land mid-job, or this test proves nothing
    assert before["state"] in ("chunking", "embedding", "chaptering"), before
    worker.start()
    job = wait_job(client, job_id, inst.h, timeout=120)
    assert job["state"] == "done", job
    assert job["attempts"] >= 2
    rows = fetch(settings, "SELECT position FROM chunks WHERE video_id = $1 ORDER BY position", video_id)
    n = fetch(settings, "SELECT chunk_count FROM videos WHERE id = $1", video_id)[0]["chunk_count"]
    assert [r["position"] for r in rows] == list(range(n)) and n > 0


def test_reingest_replaces_chunks_atomically(client, make: Factory, worker, settings):
    inst, cid = _course(client, make)
    data = (EVAL / "transcripts" / "yale-evolution-natural-selection.vtt").read_bytes()
    r = upload(client, cid, inst.h, "evo.vtt", data)
    vid = r.json()["video_id"]
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    n = fetch(settings, "SELECT count(*) AS n FROM chunks WHERE video_id = $1", vid)[0]["n"]
    ids_before = {r["id"] for r in fetch(settings, "SELECT id FROM chunks WHERE video_id = $1", vid)}
    r2 = client.post(f"/api/v1/courses/{cid}/videos/{vid}/reingest", headers=inst.h)
    assert r2.status_code == 202
    seen_counts = set()
    while client.get(f"/api/v1/jobs/{r2.json()['job_id']}", headers=inst.h).json()["state"] not in ("done", "failed"):
        rows = fetch(settings, "SELECT id FROM chunks WHERE video_id = $1", vid)
        ids = {r["id"] for r in rows}
        seen_counts.add(len(ids))
        assert ids == ids_before or not (ids & ids_before), "a reader saw old and new chunks mixed"
        # learners keep the video meanwhile: it stays ready (progress and the tutor go on working)
        assert client.get(f"/api/v1/courses/{cid}/videos/{vid}", headers=inst.h).json()["status"] == "ready"
    assert seen_counts <= {n}
    after = {r["id"] for r in fetch(settings, "SELECT id FROM chunks WHERE video_id = $1", vid)}
    assert len(after) == n and not (after & ids_before)


def test_deleting_a_course_removes_its_uploaded_files(client, make: Factory, worker, settings):
    from pathlib import Path

    inst, cid = _course(client, make)
    data = (EVAL / "transcripts" / "3b1b-bitcoin.srt").read_bytes()
    r = upload(client, cid, inst.h, "b.srt", data)
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    (path,) = [upload_path(settings.data_dir, x["file_path"])
               for x in fetch(settings, "SELECT file_path FROM videos WHERE course_id = $1", cid)]
    assert path and path.exists()
    assert client.delete(f"/api/v1/courses/{cid}", headers=inst.h).status_code == 204
    assert not Path(path).exists()


def test_reingest_keeps_assignments_on_their_chapter_and_learners_strengths(client, make: Factory, worker, settings):
    """Re-ingesting replaces the video's chapters: an item stays tied to the new chapter holding its cited moment,
    and a learner's strength there is kept (the old rows went with the old chapters: the item lost its chapter and
    the learner's score vanished)."""
    inst, cid = _course(client, make)
    srt = "".join(f"{i}\n00:{i // 12:02d}:{i % 12 * 5:02d},000 --> 00:{i // 12:02d}:{i % 12 * 5 + 4:02d},000\n"
                  f"A hash table keeps keys in buckets chosen by hashing; collision number {i} is resolved "
                  f"by chaining lists.\n\n" for i in range(1, 30))
    r = upload(client, cid, inst.h, "hash.srt", srt.encode())
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    vid = r.json()["video_id"]
    chapter = client.get(f"/api/v1/courses/{cid}/videos/{vid}/chapters", headers=inst.h).json()[0]
    a = client.post(f"/api/v1/courses/{cid}/assignments", headers=inst.h, json={
        "type": "multiple_choice", "title": "Q", "prompt": "Which?", "options": ["x", "y"], "correct": [0],
        "chapter_id": chapter["id"]}).json()
    assert client.post(f"/api/v1/assignments/{a['id']}/publish", headers=inst.h).status_code == 200
    learner = make.user("learner")
    assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": learner.id},
                       headers=inst.h).status_code == 201
    assert client.post(f"/api/v1/assignments/{a['id']}/submissions", json={"answer": [0]},
                       headers=learner.h).status_code == 201
    r = client.post(f"/api/v1/courses/{cid}/videos/{vid}/reingest", headers=inst.h)
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    new_chapters = {c["id"] for c in client.get(f"/api/v1/courses/{cid}/videos/{vid}/chapters", headers=inst.h).json()}
    assert chapter["id"] not in new_chapters
    moved = client.get(f"/api/v1/assignments/{a['id']}", headers=inst.h).json()["chapter_id"]
    assert moved in new_chapters
    rows = fetch(settings, "SELECT chapter_id, score FROM chapter_scores WHERE user_id = $1", learner.id)
    assert [(r["chapter_id"], r["score"]) for r in rows] == [(moved, 1.0)]


def test_a_transcript_is_read_in_pages(eval_course: EvalCourse, client):
    """The whole transcript came back in one response whatever its size (200,000 cues: 28 MB) and ignored
    `limit`/`offset`."""
    vid = eval_course.videos["3b1b-bitcoin.srt"]
    url = f"/api/v1/courses/{eval_course.id}/videos/{vid}/transcript"
    whole = client.get(url, headers=eval_course.learner.h).json()
    assert 100 < len(whole) <= 5000
    page = client.get(url, params={"limit": 5, "offset": 10}, headers=eval_course.learner.h).json()
    assert page == whole[10:15]
    assert client.get(url, params={"limit": 5001}, headers=eval_course.learner.h).status_code == 400


def _srt(seconds: int) -> bytes:
    """Cues of 5 s each up to `seconds`."""
    return "".join(f"{i + 1}\n00:{t // 60:02d}:{t % 60:02d},000 --> 00:{(t + 5) // 60:02d}:{(t + 5) % 60:02d},000\n"
                   f"Sorting algorithm remark number {i} about merge sort and quicksort.\n\n"
                   for i, t in enumerate(range(0, seconds, 5))).encode()


def test_a_reingest_that_shortens_a_video_cuts_its_progress_to_the_new_length(client, make: Factory, worker,
                                                                               settings):
    """Watched seconds past the new end counted towards completion (a later empty report completed the lesson
    and the course, with their XP) and showed as watched; now progress is cut to the video as it is."""
    from pathlib import Path

    inst, cid = _course(client, make)
    r = upload(client, cid, inst.h, "sorting.srt", _srt(100))
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    vid = r.json()["video_id"]
    learner = make.user("learner")
    assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": learner.id},
                       headers=inst.h).status_code == 201
    url = f"/api/v1/videos/{vid}/progress"
    got = client.post(url, json={"position": 100, "watched": [[30, 100]]}, headers=learner.h).json()
    assert got["duration"] == 100 and got["fraction"] == 0.7 and not got["completed"]
    near = make.user("learner")  # 55 s of 100: of the 60 s the video will be, enough to complete it
    assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": near.id},
                       headers=inst.h).status_code == 201
    assert not client.post(url, json={"position": 55, "watched": [[0, 55]]}, headers=near.h).json()["completed"]
    (path,) = [upload_path(settings.data_dir, x["file_path"])
               for x in fetch(settings, "SELECT file_path FROM videos WHERE id = $1", vid)]
    Path(path).write_bytes(_srt(60))  # the source now says 60 s
    r = client.post(f"/api/v1/courses/{cid}/videos/{vid}/reingest", headers=inst.h)
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    now = client.get(url, headers=learner.h).json()
    assert (now["duration"], now["position"], now["watched"], now["watched_s"], now["fraction"]) == (
        60, 60, [[30, 60]], 30, 0.5), now
    done = client.get(url, headers=near.h).json()
    assert done["completed"] and done["watched_s"] == 55, done
    kinds = sorted(x["kind"] for x in fetch(settings, "SELECT kind FROM xp_events WHERE user_id = $1", near.id))
    assert kinds == ["course_completed", "daily_streak", "first_lesson", "lesson_completed"], kinds
    assert client.get(f"/api/v1/leaderboards/course/{cid}", headers=near.h).json()["me"]["xp"] == 560  # on the board
    again = client.post(url, json={"position": 10, "watched": []}, headers=learner.h).json()
    assert not again["completed"] and again["xp_awarded"] == [] and again["fraction"] == 0.5
    course = client.get(f"/api/v1/courses/{cid}/progress", headers=learner.h).json()
    assert course["videos"][0]["fraction"] == 0.5 and course["completion"] == 0
    # a learner who rewound before the new end: their ranges past it are cut all the same
    rewound = make.user("learner")
    assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": rewound.id},
                       headers=inst.h).status_code == 201
    client.post(url, json={"position": 60, "watched": [[20, 60]]}, headers=rewound.h)
    client.post(url, json={"position": 10, "watched": []}, headers=rewound.h)  # rewound to 0:10
    Path(path).write_bytes(_srt(40))
    r = client.post(f"/api/v1/courses/{cid}/videos/{vid}/reingest", headers=inst.h)
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    now = client.get(url, headers=rewound.h).json()
    assert (now["duration"], now["position"], now["watched"], now["watched_s"]) == (40, 10, [[20, 40]], 20), now


def test_a_search_hit_says_where_in_its_chunk_the_words_are(eval_course: EvalCourse, client, settings):
    """(Tester) a hit (a chunk of up to 90 s) said only where its chunk starts, and its YouTube link started there:
    searching a sentence said at 2114 s gave 2071 s. `moment` is the start of the chunk's sentence sharing most of
    the query's words."""
    import json as json_mod

    vid = eval_course.videos["3b1b-bitcoin.srt"]
    rows = fetch(settings, "SELECT start_s, sentences::text AS s FROM chunks WHERE video_id = $1 ORDER BY start_s", vid)
    chunk, sentence = next((r, s) for r in rows for s in json_mod.loads(r["s"])[2:]
                           if len(s[2].split()) >= 8 and float(s[0]) > float(r["start_s"]) + 5)
    r = _search(client, eval_course, q=sentence[2], k=5, video_id=vid)
    assert r.status_code == 200, r.text
    hit = next(h for h in r.json()["hits"] if abs(h["start"] - float(chunk["start_s"])) < 0.01)
    assert hit["moment"] == float(sentence[0]) and hit["start"] < hit["moment"] <= hit["end"], (hit, sentence)
    # a query sharing no word with it: the chunk's start
    assert all(h["start"] <= h["moment"] <= h["end"] for h in _search(client, eval_course, q="zzzqx", k=3).json()["hits"])
