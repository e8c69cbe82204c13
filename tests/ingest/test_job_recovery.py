"""Lost-job recovery takes only ingest jobs, once however many workers run it; a retry starts one run."""
from __future__ import annotations

import asyncio

import pytest

from ingest.jobs import connect_arq, recover_lost_jobs
from store import jobs as jobs_repo
from store.db import create_pool
from tests.conftest import Factory, fetch, run_sync


def test_recovery_skips_grade_jobs_and_queues_a_lost_job_once(settings, make: Factory, client):
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Jobs"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'v', 'transcript', "
                          "'processing') RETURNING id", cid)[0]["id"]
    lost, grade = (fetch(settings, """INSERT INTO jobs (kind, course_id, video_id, state, updated_at)
                                      VALUES ($1, $2, $3, 'queued', now() - interval '1 hour') RETURNING id""",
                         kind, cid, v)[0]["id"] for kind, v in (("ingest", vid), ("grade", None)))

    async def go() -> list[int]:
        pool = await create_pool(settings.database_url, min_size=1, max_size=4)
        arq = await connect_arq(settings.redis_url)
        try:
            ctx = {"pool": pool, "redis": arq, "settings": settings}
            # two workers starting at once: both see the lost job, arq queues it once
            got = await asyncio.gather(recover_lost_jobs(ctx), recover_lost_jobs(ctx))
            queued = [j for j in await arq.queued_jobs() if j.args and j.args[0] in (lost, grade)]
            for j in queued:  # leave nothing for the test worker to pick up
                await arq.zrem("arq:queue", j.job_id)
            async with pool.acquire() as conn:
                assert await jobs_repo.requeue(conn, grade) is None  # a grade job is not an ingest retry
            return [len(queued), *got]
        finally:
            await arq.aclose()
            await pool.close()

    n_queued, *got = run_sync(go())
    assert sorted(got) == [0, 1] and n_queued <= 1  # (a running test worker may already have taken it)
    assert fetch(settings, "SELECT state FROM jobs WHERE id = $1", grade)[0]["state"] == "queued"  # untouched


def test_a_ready_video_stays_ready_through_a_failed_reingest(settings, make: Factory, client):
    """Learners keep a ready video (search, tutor, progress) while it is re-ingested, also when that fails;
    a video that never became ready fails."""
    from store import videos as videos_repo

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Re"}, headers=inst.h).json()["id"]
    ready, fresh = (fetch(settings, "INSERT INTO videos (course_id, title, source, status, chunk_count) VALUES "
                                    "($1, 'v', 'transcript', $2, $3) RETURNING id", cid, st, n)[0]["id"]
                    for st, n in (("ready", 12), ("queued", 0)))

    async def go() -> None:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                for vid in (ready, fresh):
                    await videos_repo.mark_processing(conn, vid)
                assert (await conn.fetchval("SELECT status FROM videos WHERE id = $1", ready)) == "ready"
                assert (await conn.fetchval("SELECT status FROM videos WHERE id = $1", fresh)) == "processing"
                for vid in (ready, fresh):
                    await videos_repo.mark_failed(conn, vid, "network down")
        finally:
            await pool.close()

    run_sync(go())
    rows = {r["id"]: (r["status"], r["error"]) for r in fetch(settings, "SELECT id, status, error FROM videos "
                                                                        "WHERE course_id = $1", cid)}
    assert rows == {ready: ("ready", "network down"), fresh: ("failed", "network down")}


def test_grading_keeps_a_short_lived_in_progress_key(settings):
    """Grading functions run under the same heartbeat as ingest jobs: the in-progress key arq sets for hours is
    kept short, so a dead worker's grade is taken by another within seconds."""
    from redis.asyncio import Redis

    from ingest import grading
    from ingest.jobs import ARQ_IN_PROGRESS, heartbeat

    async def ttl_after(run) -> int:  # type: ignore[no-untyped-def]
        """PTTL of a job's in-progress key (set for hours, as arq does) after `run(ctx)`."""
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        redis = Redis.from_url(settings.redis_url)
        key = ARQ_IN_PROGRESS.format(job_id="grade-test-heartbeat")
        try:
            await redis.set(key, b"1", ex=4 * 3600 + 10)
            await run({"pool": pool, "redis": redis, "settings": settings, "embedder": lambda: None,
                       "job_id": "grade-test-heartbeat"})
            return await redis.pttl(key)
        finally:
            await redis.delete(key)
            await redis.aclose()
            await pool.close()

    async def hold(ctx) -> None:  # type: ignore[no-untyped-def]
        async with heartbeat(ctx):
            await asyncio.sleep(0.2)

    missing = [2**62 - i for i in range(5)]  # no such submissions: each is looked up, nothing is graded
    for run in (hold, lambda ctx: grading.grade_submission(ctx, missing[0]),
                lambda ctx: grading.grade_batch(ctx, 2**62, missing)):
        assert 0 < run_sync(ttl_after(run)) <= settings.job_heartbeat_ms


async def _reembedding(conn, course_id: int):  # type: ignore[no-untyped-def]
    """A ready video with a ten-cue transcript and its re-embed job, started: (video id, job row)."""
    vid = await conn.fetchval("INSERT INTO videos (course_id, title, source, status, chunk_count, duration_s) "
                              "VALUES ($1, 'v', 'transcript', 'ready', 1, 30) RETURNING id", course_id)
    await conn.executemany("INSERT INTO transcript_segments (video_id, idx, start_s, end_s, text) VALUES ($1, $2, $3, "
                           "$4, $5)", [(vid, i, i * 3.0, i * 3.0 + 2.5, f"Sentence number {i} about hashing.")
                                       for i in range(10)])
    job = await jobs_repo.create_job(conn, "reembed", course_id=course_id, video_id=vid, created_by=None)
    return vid, await jobs_repo.start_attempt(conn, job["id"])


def _run_racing(settings, setup, meanwhile) -> tuple[list[str], str]:  # type: ignore[no-untyped-def]
    """Run the pipeline for the job `setup(conn)` makes ((video id, started job)); `meanwhile(conn, job)` runs
    once it starts embedding (the race, made certain). -> (the video's stored transcript texts, the job's state)."""
    from agents.config import embedder_for
    from ingest.pipeline import ingest_video
    from ingest.progress import JobReporter
    from store import videos as videos_repo

    class Meanwhile(JobReporter):
        async def stage(self, state: str, fraction: float = 0.0) -> None:
            await super().stage(state, fraction)
            if state == "embedding":
                async with self.pool.acquire() as conn:
                    await meanwhile(conn, self.job)

    async def go() -> tuple[list[str], str]:
        pool = await create_pool(settings.database_url, min_size=1, max_size=4)
        try:
            async with pool.acquire() as conn:
                vid, job = await setup(conn)
            await ingest_video(pool, settings, embedder_for(settings), job, Meanwhile(pool, None, job))
            async with pool.acquire() as conn:
                texts = [r["text"] for r in await videos_repo.list_segments(conn, vid)]
                state = await conn.fetchval("SELECT state FROM jobs WHERE id = $1", job["id"])
            return texts, state
        finally:
            await pool.close()

    return run_sync(go())


async def _newer_transcript(conn, job) -> None:  # type: ignore[no-untyped-def]
    await conn.execute("UPDATE transcript_segments SET text = 'newer ' || text WHERE video_id = $1", job["video_id"])


def test_a_reembed_does_not_put_back_a_replaced_transcript(settings, make: Factory, client):
    """A re-embed reads the stored transcript; when a re-ingest replaces it before the re-embed commits, the
    newer transcript and its chunks stand."""
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Race"}, headers=inst.h).json()["id"]
    texts, state = _run_racing(settings, lambda conn: _reembedding(conn, cid), _newer_transcript)
    assert state == "done" and all(t.startswith("newer ") for t in texts)


def test_an_older_ingest_finishing_after_a_newer_one_keeps_the_newer_transcript(settings, make: Factory, client,
                                                                                 tmp_path):
    """A re-ingest asked for while an ingest ran (a second worker takes it) fetched the source later and finished
    first; the older run then committed its older transcript over it."""
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Race"}, headers=inst.h).json()["id"]
    srt = tmp_path / "old.srt"
    srt.write_text("1\n00:00:01,000 --> 00:00:04,000\nThe older captions say this.\n")

    async def ingesting(conn):  # type: ignore[no-untyped-def]
        vid = await conn.fetchval("INSERT INTO videos (course_id, title, source, status, file_path, filename) "
                                  "VALUES ($1, 'v', 'transcript', 'ready', $2, 'old.srt') RETURNING id", cid, str(srt))
        await conn.execute("INSERT INTO transcript_segments (video_id, idx, start_s, end_s, text) "
                           "VALUES ($1, 0, 1, 4, 'what the newer run stored')", vid)
        job = await jobs_repo.create_job(conn, "ingest", course_id=cid, video_id=vid, created_by=None)
        return vid, await jobs_repo.start_attempt(conn, job["id"])

    async def newer_done(conn, job):  # type: ignore[no-untyped-def]
        await _newer_transcript(conn, job)  # a newer ingest job of the video stored its transcript and is done
        await conn.execute("INSERT INTO jobs (kind, course_id, video_id, state) VALUES ('ingest', $1, $2, 'done')",
                           cid, job["video_id"])

    texts, state = _run_racing(settings, ingesting, newer_done)
    assert state == "done" and texts == ["newer what the newer run stored"], texts


def test_an_ingest_job_whose_runs_keep_dying_fails_with_the_reason(settings, make: Factory, client):
    """Attempts that end without a word (a worker killed, out of memory, or past arq's timeout) are not run
    again forever: the attempt past `max_attempts` fails the job and says why, and a retry starts afresh."""
    from ingest.jobs import ingest_job

    # five attempts counted, none recorded an outcome: the row still says it is transcribing
    inst, vid, job = _transcribing_job(settings, make, client, attempts=5)

    async def go() -> str:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        arq = await connect_arq(settings.redis_url)
        try:
            return await ingest_job({"pool": pool, "redis": arq, "settings": settings, "job_id": None}, job)
        finally:
            await arq.aclose()
            await pool.close()

    assert run_sync(go()).startswith("failed: ingest did not finish in 5 attempts")
    row = fetch(settings, "SELECT state, error, attempts, max_attempts FROM jobs WHERE id = $1", job)[0]
    assert row["state"] == "failed" and "worker stopped or timed out" in row["error"]
    assert row["attempts"] == row["max_attempts"] == 5  # (tester: it showed 6 of 5)
    assert fetch(settings, "SELECT status FROM videos WHERE id = $1", vid)[0]["status"] == "failed"
    r = client.post(f"/api/v1/jobs/{job}/retry", headers=inst.h)
    assert r.status_code in (200, 202) and r.json()["attempts"] == 0


def _transcribing_job(settings, make: Factory, client, attempts: int):  # type: ignore[no-untyped-def]
    """A video being processed and its ingest job, mid-transcription after `attempts` of 5: (its instructor, video
    id, job id)."""
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Transcribing"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'v', 'transcript', "
                          "'processing') RETURNING id", cid)[0]["id"]
    job = fetch(settings, """INSERT INTO jobs (kind, course_id, video_id, state, attempts, max_attempts)
                             VALUES ('ingest', $1, $2, 'transcribing', $3, 5) RETURNING id""", cid, vid,
                attempts)[0]["id"]
    return inst, vid, job


def _cut_mid_run(settings, monkeypatch, owner, name: str, run):  # type: ignore[no-untyped-def]
    """`cut(stopping)`: run `run(ctx)` (a worker's job function) with `owner.name` hanging, and cancel it there as
    arq does (after marking the worker stopping, with `stopping`); it returns once the run has ended."""
    from ingest import jobs

    started: list[asyncio.Event] = []

    async def hang(*_a: object, **_k: object) -> None:
        started[-1].set()
        await asyncio.sleep(60)

    monkeypatch.setattr(owner, name, hang)

    async def cut(stopping: bool) -> None:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        arq = await connect_arq(settings.redis_url)
        monkeypatch.setattr(jobs, "STOPPING", False)
        try:
            started.append(asyncio.Event())
            task = asyncio.create_task(run({"pool": pool, "redis": arq, "settings": settings, "job_id": None,
                                            "embedder": lambda: None}))
            await asyncio.wait_for(started[-1].wait(), 10)
            if stopping:
                jobs.mark_stopping()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task  # the give-back is shielded: it has run by now
        finally:
            await arq.aclose()
            await pool.close()

    return cut


def test_an_attempt_cut_by_a_worker_stop_is_given_back(settings, make: Factory, client, monkeypatch):
    """arq cancels running jobs when its worker stops (a deploy, Ctrl-C); the job runs again elsewhere. Such an
    attempt is not counted, else five deploys during a long transcription failed it. A cancel that is not a
    stop (arq's time limit) still counts."""
    from ingest import jobs, pipeline

    _, _, job = _transcribing_job(settings, make, client, attempts=2)
    attempts = lambda: fetch(settings, "SELECT attempts FROM jobs WHERE id = $1", job)[0]["attempts"]  # noqa: E731
    cut = _cut_mid_run(settings, monkeypatch, pipeline, "ingest_video", lambda ctx: jobs.ingest_job(ctx, job))
    run_sync(cut(stopping=True))
    assert attempts() == 2  # counted at the start (3), given back at the stop
    run_sync(cut(stopping=False))
    assert attempts() == 3


def test_a_grading_try_cut_by_a_worker_stop_is_given_back(settings, make: Factory, client, monkeypatch):
    """The same for grading: deploys during grading would otherwise send a submission to review as one whose
    runs keep dying."""
    from agents import grader
    from ingest import grading, jobs

    inst, learner = make.user("instructor"), make.user("learner")
    cid = client.post("/api/v1/courses", json={"title": "Graded"}, headers=inst.h).json()["id"]
    aid = fetch(settings, "INSERT INTO assignments (course_id, type, title, prompt) VALUES ($1, 'essay', 'E', 'Why?') "
                          "RETURNING id", cid)[0]["id"]
    sid = fetch(settings, """INSERT INTO submissions (assignment_id, course_id, user_id, attempt, answer, status,
                                                      grade_tries)
                             VALUES ($1, $2, $3, 1, '"because"', 'grading', 1) RETURNING id""",
                aid, cid, learner.id)[0]["id"]
    tries = lambda: fetch(settings, "SELECT grade_tries FROM submissions WHERE id = $1", sid)[0]["grade_tries"]  # noqa: E731
    cut = _cut_mid_run(settings, monkeypatch, grader, "grade", lambda ctx: grading.grade_submission(ctx, sid))
    run_sync(cut(stopping=True))
    assert tries() == 1
    run_sync(cut(stopping=False))
    assert tries() == 2


def test_a_job_for_a_video_deleted_meanwhile_is_a_lookup_error(settings, make: Factory, client):
    """Re-ingest racing a delete: the job's insert finds the video gone; that is a 404 for the API, not a 500."""
    from ingest.submit import submit_job

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Gone"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'v', 'transcript', "
                          "'ready') RETURNING id", cid)[0]["id"]
    fetch(settings, "DELETE FROM videos WHERE id = $1", vid)

    async def go() -> None:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        arq = await connect_arq(settings.redis_url)
        try:
            with pytest.raises(LookupError):
                await submit_job(pool, arq, settings, "ingest", cid, vid, inst.id)
        finally:
            await arq.aclose()
            await pool.close()

    run_sync(go())
    assert not fetch(settings, "SELECT 1 FROM jobs WHERE video_id = $1", vid)


def test_a_late_duplicate_run_does_not_write_over_a_finished_job(settings, make: Factory, client):
    """Run A's lease lapsed and run B finished the job: A's later stage, error or failure leaves B's `done`
    (and the ready video) as they are."""
    from ingest.progress import JobReporter

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Late"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status, chunk_count) VALUES "
                          "($1, 'v', 'transcript', 'ready', 0) RETURNING id", cid)[0]["id"]
    job = fetch(settings, """INSERT INTO jobs (kind, course_id, video_id, state, attempts)
                             VALUES ('ingest', $1, $2, 'embedding', 1) RETURNING *""", cid, vid)[0]

    async def go() -> bool:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            late = JobReporter(pool, None, job)  # run A, still holding the row it started with
            async with pool.acquire() as conn:
                assert await jobs_repo.set_state(conn, job["id"], "done", 1.0) is not None  # run B finishes
                await jobs_repo.note_error(conn, job["id"], "network down; retrying in 2s")
            await late.stage("chaptering")
            return await late.fail("internal error")
        finally:
            await pool.close()

    assert run_sync(go()) is False
    row = fetch(settings, "SELECT state, error, progress FROM jobs WHERE id = $1", job["id"])[0]
    assert row["state"] == "done" and row["error"] is None and row["progress"] == 1.0
    assert fetch(settings, "SELECT status FROM videos WHERE id = $1", vid)[0]["status"] == "ready"


def test_uploaded_files_no_video_refers_to_are_swept_after_a_day(settings, make: Factory, client, tmp_path):
    """An upload cut short by a crash or shutdown left its file for good; the worker's sweep deletes files no
    video refers to once they are a day old (a file still being written is newer), and empty course folders."""
    import dataclasses
    import os
    import time

    from ingest.jobs import ORPHAN_UPLOAD_S, sweep_uploads

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Files"}, headers=inst.h).json()["id"]
    folder = (tmp_path / "uploads" / str(cid)).resolve()
    folder.mkdir(parents=True)
    kept, orphan, fresh, moved = (folder / f"{n}.upload" for n in ("kept", "orphan", "fresh", "moved"))
    gone_course = tmp_path.resolve() / "uploads" / "999999999"
    gone_course.mkdir()
    for p in (kept, orphan, fresh, moved):
        p.write_bytes(b"data")
    old = time.time() - ORPHAN_UPLOAD_S - 60
    for p in (kept, orphan, gone_course, moved):
        os.utime(p, (old, old))
    fetch(settings, "INSERT INTO videos (course_id, title, source, file_path) VALUES ($1, 'v', 'media', $2)",
          cid, str(kept))  # (named by its absolute path, as before)
    # (tester) a file is its video's by its place in the data folder: after the folder was moved, every upload was
    # "unreferenced" (its video names the old place) and the sweep deleted them all
    fetch(settings, "INSERT INTO videos (course_id, title, source, file_path) VALUES ($1, 'v', 'media', $2)",
          cid, f"/old/place/.studyhall/uploads/{cid}/moved.upload")

    async def go() -> int:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            mine = dataclasses.replace(settings, data_dir=tmp_path.resolve())
            return await sweep_uploads({"pool": pool, "settings": mine})
        finally:
            await pool.close()

    assert run_sync(go()) == 1
    assert kept.exists() and fresh.exists() and moved.exists() and not orphan.exists() and not gone_course.exists()


def test_an_upload_is_found_in_a_moved_data_folder(tmp_path):
    """(Tester) moved to another place (a bigger disk, a restore), the data folder kept its uploads, but every video
    named them by the old absolute path: re-ingests failed "missing from storage". A file not where it was stored is
    looked for at its place in this process's data folder."""
    from store.videos import upload_path, upload_tail

    old, here = tmp_path / "old", tmp_path / "data"
    (here / "uploads" / "7").mkdir(parents=True)
    (here / "uploads" / "7" / "a.upload").write_bytes(b"x")
    stored = str(old / "uploads" / "7" / "a.upload")
    assert upload_tail(stored) == "uploads/7/a.upload"
    assert upload_path(here, stored) == here / "uploads" / "7" / "a.upload"
    (old / "uploads" / "7").mkdir(parents=True)
    (old / "uploads" / "7" / "a.upload").write_bytes(b"x")
    # (review) a copy restored beside the original reads and deletes its own files, never the original's
    assert upload_path(here, stored) == here / "uploads" / "7" / "a.upload"
    elsewhere = str(tmp_path / "elsewhere.srt")  # (not a data folder's upload: as stored)
    assert upload_tail(elsewhere) is None and upload_path(here, elsewhere) == tmp_path / "elsewhere.srt"
    assert upload_path(here, None) is None

def test_a_job_deleted_while_it_runs_stops_at_its_next_progress_write(settings, make: Factory, client):
    """Deleting a video (or its course) deletes its job; the run notices at its next progress write: a running
    transcription's thread is told to stop (the `deleted` event is its cancel flag) and the next stage raises."""
    import numpy as np

    from ingest.errors import PermanentIngestError
    from ingest.pipeline import EMBED_BATCH, embed_texts
    from ingest.progress import JobReporter

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Deleted"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source) VALUES ($1, 'v', 'media') RETURNING id",
                cid)[0]["id"]
    job_id = fetch(settings, "INSERT INTO jobs (kind, course_id, video_id) VALUES ('ingest', $1, $2) RETURNING id",
                   cid, vid)[0]["id"]

    async def go() -> None:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                job = await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
            reporter = JobReporter(pool, None, job, min_interval=0)
            await reporter.stage("transcribing")
            await reporter.advance(0.3)
            assert not reporter.deleted.is_set()
            assert client.delete(f"/api/v1/courses/{cid}/videos/{vid}", headers=inst.h).status_code == 204
            await reporter.advance(0.4)  # what the transcription thread's progress callback runs
            assert reporter.deleted.is_set()
            with pytest.raises(PermanentIngestError, match="deleted"):
                await reporter.stage("chunking")
            # embedding stops at its next batch too (it went on to the end, holding up every other job's batches)
            embedded = []

            class Counting:
                dim = 4

                def embed(self, texts: list[str]) -> np.ndarray:
                    embedded.append(len(texts))
                    return np.zeros((len(texts), 4), dtype=np.float32)

            with pytest.raises(PermanentIngestError, match="deleted"):
                await embed_texts(Counting(), ["words"] * (EMBED_BATCH * 5), reporter)
            assert embedded == []
        finally:
            await pool.close()

    run_sync(go())


def test_deleting_a_course_while_an_ingest_commits_does_not_deadlock(settings, make: Factory, client, monkeypatch):
    """The ingest's last transaction locked the video, then (inserting chunks) the course; a course delete
    locks them the other way round: one of the two was killed as a deadlock, and it was the delete (a 500)."""
    import asyncio

    from agents.config import embedder_for
    from ingest.pipeline import ingest_video
    from ingest.progress import JobReporter
    from store import videos as videos_repo

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Going"}, headers=inst.h).json()["id"]
    real = videos_repo.replace_transcript

    async def slow(*a, **kw):  # type: ignore[no-untyped-def]
        await asyncio.sleep(1.0)  # the course delete arrives now
        return await real(*a, **kw)

    monkeypatch.setattr(videos_repo, "replace_transcript", slow)

    async def go() -> int:
        pool = await create_pool(settings.database_url, min_size=1, max_size=4)
        try:
            async with pool.acquire() as conn:
                _, job = await _reembedding(conn, cid)
            ingest = asyncio.create_task(ingest_video(pool, settings, embedder_for(settings), job,
                                                      JobReporter(pool, None, job)))
            await asyncio.sleep(0.5)
            deleted = await asyncio.to_thread(client.delete, f"/api/v1/courses/{cid}", headers=inst.h)
            await asyncio.gather(ingest, return_exceptions=True)
            return deleted.status_code
        finally:
            await pool.close()

    assert run_sync(go()) == 204
    assert client.get(f"/api/v1/courses/{cid}", headers=inst.h).status_code == 404


def test_an_internal_failure_is_told_without_the_exceptions_words():
    """A job's (and its video's) reason quoted the exception: an embedding provider's 401 quotes the API key, and
    the video's reason is read in the course. A refused key does not retry either."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from agents.embedder import EmbedderError, OpenAIEmbedder
    from ingest.jobs import internal_reason

    class Refusing(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length") or 0))
            body = json.dumps({"error": {"message": "Incorrect API key provided: sk-live-SECRET123",
                                         "type": "invalid_request_error", "code": "invalid_api_key"}}).encode()
            self.send_response(401)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        emb = OpenAIEmbedder("local-embed", api_key="sk-live-SECRET123",
                             base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", dim=8, max_retries=0)
        with pytest.raises(EmbedderError) as info:
            emb.embed(["a"])
    finally:
        server.shutdown()
        server.server_close()
    assert "Incorrect API key" in str(info.value)  # the provider's words, for the log, a key in them masked
    assert "SECRET123" not in str(info.value) and "sk-***" in str(info.value)
    reason, permanent = internal_reason(info.value, 7)
    assert permanent and "SECRET" not in reason and "API key" in reason
    reason, permanent = internal_reason(KeyError("internal detail"), 7)
    assert not permanent and "internal detail" not in reason and "KeyError" in reason and "job 7" in reason


def test_why_a_video_failed_is_for_staff(settings, make: Factory, client):
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Failing"}, headers=inst.h).json()["id"]
    learner = make.user("learner")
    assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": learner.id},
                       headers=inst.h).status_code == 201
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status, error) VALUES ($1, 'v', "
                          "'transcript', 'failed', 'the embedding model failed') RETURNING id", cid)[0]["id"]
    url = f"/api/v1/courses/{cid}/videos/{vid}"
    assert client.get(url, headers=inst.h).json()["error"] == "the embedding model failed"
    assert client.get(url, headers=learner.h).json()["error"] is None
    assert [v["error"] for v in client.get(f"/api/v1/courses/{cid}/videos", headers=learner.h).json()] == [None]


def test_re_ingest_asked_again_before_it_starts_is_one_job(settings, make: Factory, client):
    """Three clicks on re-ingest ran the whole pipeline (a transcription, for media) three times."""
    import threading

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Clicks"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'v', 'transcript', "
                          "'ready') RETURNING id", cid)[0]["id"]
    url = f"/api/v1/courses/{cid}/videos/{vid}/reingest"
    # a re-ingest waiting to start (kept out of the queue: a worker of this session must not start it meanwhile)
    waiting = fetch(settings, "INSERT INTO jobs (kind, course_id, video_id, state) VALUES ('ingest', $1, $2, "
                              "'queued') RETURNING id", cid, vid)[0]["id"]
    got: list[int] = []

    def click() -> None:
        r = client.post(url, headers=inst.h)
        assert r.status_code == 202, r.text
        got.append(r.json()["job_id"])

    clicks = [threading.Thread(target=click) for _ in range(3)]
    for t in clicks:
        t.start()
    for t in clicks:
        t.join()
    assert got == [waiting] * 3, got
    assert [r["id"] for r in fetch(settings, "SELECT id FROM jobs WHERE video_id = $1", vid)] == [waiting]
    fetch(settings, "UPDATE jobs SET state = 'embedding' WHERE id = $1", waiting)  # it started
    client.post(url, headers=inst.h)
    assert len(fetch(settings, "SELECT id FROM jobs WHERE video_id = $1", vid)) == 2  # what it read may have changed


async def _fail_job(settings, job, reason: str) -> bool:  # type: ignore[no-untyped-def]
    """A job's run failing for good with `reason`, as the worker records it."""
    from ingest.progress import JobReporter

    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    arq = await connect_arq(settings.redis_url)
    try:
        return await JobReporter(pool, arq, job).fail(reason)
    finally:
        await arq.aclose()
        await pool.close()


def test_a_failing_ingest_fails_its_video_in_the_same_commit(settings, make: Factory, client, monkeypatch):
    """The job's `failed` and its video's `failed` commit together: the process dying between two commits left
    the video `processing` for good (nothing revisits a failed job). Here the video's update breaks off, as a
    kill would: the job is not failed either, and the next run fails both."""
    from store import videos as videos_repo

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Fail"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'v', 'transcript', "
                          "'processing') RETURNING id", cid)[0]["id"]
    (job,) = fetch(settings, """INSERT INTO jobs (kind, course_id, video_id, state, attempts, created_by)
                                VALUES ('ingest', $1, $2, 'embedding', 1, $3) RETURNING *""", cid, vid, inst.id)
    real = videos_repo.mark_failed

    async def killed(conn, video_id, reason, job_id=None):  # type: ignore[no-untyped-def]
        raise ConnectionResetError("the worker died here")

    async def go(mark) -> bool:  # type: ignore[no-untyped-def]
        monkeypatch.setattr(videos_repo, "mark_failed", mark)
        return await _fail_job(settings, job, "the transcript could not be read")

    with pytest.raises(ConnectionResetError):
        run_sync(go(killed))
    state = lambda: (fetch(settings, "SELECT state FROM jobs WHERE id = $1", job["id"])[0]["state"],  # noqa: E731
                     fetch(settings, "SELECT status, error FROM videos WHERE id = $1", vid)[0]["status"])
    assert state() == ("embedding", "processing")  # neither: the job is still there to run again
    assert run_sync(go(real)) is True
    assert state() == ("failed", "failed")
    error = fetch(settings, "SELECT error FROM videos WHERE id = $1", vid)[0]["error"]
    assert error == "the transcript could not be read"


def test_an_older_ingest_failing_after_a_newer_one_finished_leaves_the_video_alone(settings, make: Factory, client):
    """An older ingest of a video, retrying after a newer one had finished, exhausted its attempts and stamped its
    error on the video the newer one had made ready (race review)."""
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Older"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status, chunk_count) VALUES ($1, 'v', "
                          "'transcript', 'ready', 0) RETURNING id", cid)[0]["id"]
    older, newer = (fetch(settings, """INSERT INTO jobs (kind, course_id, video_id, state, attempts, created_by)
                                      VALUES ('ingest', $1, $2, $3, 1, $4) RETURNING *""", cid, vid, st, inst.id)[0]
                    for st in ("embedding", "done"))

    # the older job says why it failed
    assert run_sync(_fail_job(settings, older, "YouTube did not respond in time (gave up after 3)")) is True
    assert fetch(settings, "SELECT state FROM jobs WHERE id = $1", older["id"])[0]["state"] == "failed"
    video = fetch(settings, "SELECT status, error FROM videos WHERE id = $1", vid)[0]
    assert (video["status"], video["error"]) == ("ready", None)  # the video is the newer ingest's


def test_a_lost_job_whose_recovery_id_holds_a_result_is_queued_again(settings, make: Factory, client):
    """A recovery queued under an id naming the row's last change; a run of it that ended without touching the row
    (arq could not read the job: a pickled one from an older version) left a result under that id, and arq
    refused the id while it kept the result (an hour): the job waited that long, not the 5 minutes of a pass."""
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Jobs"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'v', 'transcript', "
                          "'processing') RETURNING id", cid)[0]["id"]
    row = fetch(settings, """INSERT INTO jobs (kind, course_id, video_id, state, updated_at)
                             VALUES ('ingest', $1, $2, 'queued', now() - interval '1 hour') RETURNING id, updated_at""",
                cid, vid)[0]

    async def go() -> bool:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        arq = await connect_arq(settings.redis_url)
        rec_id = f"ingest-{row['id']}-rec-{row['updated_at'].timestamp():.6f}"
        try:
            await arq.set(f"arq:result:{rec_id}", b'{"s": false, "r": "DeserializationError"}', ex=3600)
            await recover_lost_jobs({"pool": pool, "redis": arq, "settings": settings})
            # (this job queued: counting all recovered was flaky, a job another test of this process left counted)
            queued = await arq.zscore("arq:queue", rec_id) is not None
            await arq.zrem("arq:queue", rec_id)  # nothing for the test worker to pick up
            return queued
        finally:
            await arq.aclose()
            await pool.close()

    assert run_sync(go())


async def test_a_job_heartbeat_is_finished_when_its_job_is(settings):
    """The lease-keeping task was only cancelled: a worker stopping closed its loop with it pending ("Task was
    destroyed but it is pending!" on every stop with a job running)."""
    import asyncio

    from ingest.jobs import connect_arq, heartbeat
    from store.keys import ARQ_IN_PROGRESS

    redis = await connect_arq(settings.redis_url)
    key = ARQ_IN_PROGRESS.format(job_id="beat-test")
    try:
        await redis.set(key, b"1")
        before = set(asyncio.all_tasks())
        async with heartbeat({"redis": redis, "job_id": "beat-test", "settings": settings}):
            await asyncio.sleep(0.05)
        assert not [t for t in asyncio.all_tasks() - before if not t.done()]  # (before anything else runs)
        assert 0 < await redis.pttl(key) <= settings.job_heartbeat_ms  # the lease was kept
    finally:
        await redis.delete(key)
        await redis.aclose()


async def test_an_ingest_attempts_heartbeat_is_finished_when_it_is(settings):
    """The ingest job's own heartbeat was only cancelled too (the worker's log: "Task was destroyed but it is
    pending!" for `_heartbeat()` on a stop)."""
    import asyncio

    from ingest.jobs import connect_arq, ingest_job
    from store.db import create_pool

    redis = await connect_arq(settings.redis_url)
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        before = set(asyncio.all_tasks())
        ctx = {"redis": redis, "job_id": "beat-ingest-test", "settings": settings, "pool": pool}
        assert await ingest_job(ctx, 2**62) == "already finished"  # no such job
        assert not [t for t in asyncio.all_tasks() - before if not t.done()]
    finally:
        await pool.close()
        await redis.aclose()


async def test_a_job_whose_worker_died_before_its_first_beat_is_freed(settings):
    """(Crash experiment) a worker killed between taking a job and its first heartbeat left arq's own lease on it:
    the in-progress key for 4 hours, the job queued but taken by no one, the submission `grading` all that time.
    Recovery frees a job whose lease no beat has shortened for a few beats since it was taken."""
    from ingest.jobs import _ARQ_LEASE_MS, UNBEATEN_BEATS, connect_arq, release_unbeaten
    from store.keys import ARQ_IN_PROGRESS

    beat = settings.job_heartbeat_ms
    redis = await connect_arq(settings.redis_url)
    keys = {name: ARQ_IN_PROGRESS.format(job_id=f"unbeaten-{name}") for name in ("dead", "just", "beating")}
    try:
        # taken 4 beats ago, never beaten; taken a moment ago; beating (its lease a beat long)
        await redis.psetex(keys["dead"], _ARQ_LEASE_MS - (UNBEATEN_BEATS + 1) * beat, b"1")
        await redis.psetex(keys["just"], _ARQ_LEASE_MS - 100, b"1")
        await redis.psetex(keys["beating"], beat, b"1")
        got = {name: await release_unbeaten(redis, f"unbeaten-{name}", beat) for name in keys}
        assert got == {"dead": True, "just": False, "beating": False}
        assert not await redis.exists(keys["dead"]) and await redis.exists(keys["just"], keys["beating"]) == 2
        assert await release_unbeaten(redis, "unbeaten-none", beat) is False  # no key: nothing to free
    finally:
        await redis.delete(*keys.values())
        await redis.aclose()


async def test_a_grade_job_that_cannot_reach_the_database_goes_again_shortly(settings):
    """A grading job run while Postgres was down failed for good (ConnectionRefusedError): its submission waited in
    `grading` for the every-minute recovery, minutes after Postgres was back. It is retried in a few seconds."""
    import asyncpg
    from arq import Retry

    from ingest.grading import UNREACHABLE_RETRY_S, grade_submission

    down = await asyncpg.create_pool("postgresql://nobody@127.0.0.1:1/none", min_size=0, max_size=1)
    try:
        with pytest.raises(Retry) as info:
            await grade_submission({"pool": down, "settings": settings}, 1)
        assert info.value.defer_score == UNREACHABLE_RETRY_S * 1000
    finally:
        await down.close()


async def test_a_heartbeat_stops_though_its_cancel_lands_during_a_redis_command(settings):
    """(Tester) a job ending while its first beat's PEXPIRE was being sent never ended: on Python 3.11 redis-py sends
    through `asyncio.wait_for` when a socket timeout is set (the worker sets one), which drops a cancel arriving as
    the command completes; the heartbeat went on beating and the job waited for it for good. Four such jobs (grades
    of a course just deleted: "nothing to do") took every grading slot of the worker."""
    import asyncio
    from types import SimpleNamespace

    from ingest.jobs import connect_arq, heartbeat
    from ingest.worker import REDIS_READ_TIMEOUT_S
    from store.keys import ARQ_IN_PROGRESS

    redis = await connect_arq(settings.redis_url)
    conns = redis.connection_pool
    conns.connection_kwargs["socket_timeout"] = REDIS_READ_TIMEOUT_S  # as the worker's client
    await conns.disconnect()
    conns.reset()
    ids = [f"beat-race-{i}" for i in range(4)]
    try:
        await asyncio.gather(*[redis.ping() for _ in ids])  # four connections open, as a busy worker's

        beats = SimpleNamespace(job_heartbeat_ms=30_000)  # the default: a beat every 10 s

        async def job(job_id: str, took_s: float) -> None:
            async with heartbeat({"redis": redis, "job_id": job_id, "settings": beats}):
                await asyncio.sleep(took_s)  # done at once, its first beat's command (maybe) in flight

        for n in range(60):
            runs = [asyncio.create_task(job(i, 0.0001 * (n % 8))) for i in ids]
            _, stuck = await asyncio.wait(runs, timeout=3)
            for t in stuck:
                t.cancel()
            assert not stuck, f"{len(stuck)} of 4 jobs never ended"
    finally:
        await redis.delete(*[ARQ_IN_PROGRESS.format(job_id=i) for i in ids])
        await redis.aclose()


def test_a_reingest_racing_a_course_deletion_takes_the_course_lock_first(settings, make: Factory, client):
    """(Tester) a re-ingest locked its video, then its job's insert waited for the course's key; a course deletion
    held the course and went for the video: a deadlock, one of the two a 409 (the course surviving once). The
    re-ingest now takes the course first: it waits for the deletion, then finds the video gone (404)."""
    import asyncpg

    from ingest.submit import submit_job

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Racing"}, headers=inst.h).json()["id"]
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source, status) VALUES ($1, 'v', 'transcript', "
                          "'ready') RETURNING id", cid)[0]["id"]

    async def go() -> None:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        arq = await connect_arq(settings.redis_url)
        x = await asyncpg.connect(settings.database_url)
        try:
            tr = x.transaction()
            await tr.start()
            await x.execute("SELECT id FROM courses WHERE id = $1 FOR UPDATE", cid)  # a deletion's first lock
            job = asyncio.create_task(submit_job(pool, arq, settings, "ingest", cid, vid, inst.id,
                                                 reuse_waiting=True))
            await asyncio.sleep(0.5)
            await x.execute("SET LOCAL lock_timeout = '5s'")
            await x.execute("SELECT id FROM videos WHERE id = $1 FOR UPDATE", vid)  # its cascade next (deadlocked)
            await x.execute("DELETE FROM courses WHERE id = $1", cid)
            await tr.commit()
            with pytest.raises(LookupError):
                await job
        finally:
            await x.close()
            await arq.aclose()
            await pool.close()

    run_sync(go())
    assert not fetch(settings, "SELECT 1 FROM jobs WHERE video_id = $1", vid)
