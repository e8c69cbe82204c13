"""`studyhall ingest` and `studyhall reembed` from the shell, against the session's servers and worker."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

from tests.conftest import EVAL, ROOT, Factory, clean_env, fetch, run_sync, wait_job


def _cli(data_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=clean_env(data_dir),
                          capture_output=True, text=True, timeout=300)


def test_cli_ingest_file_with_progress(client, make: Factory, worker, data_dir, settings):
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "CLI"}, headers=inst.h).json()["id"]
    out = _cli(data_dir, "ingest", str(cid), "--file", str(EVAL / "transcripts" / "3b1b-bitcoin.srt"),
               "--title", "Bitcoin", "--json")
    assert out.returncode == 0, out.stderr
    assert "100.0% done" in out.stderr and "job" in out.stderr
    result = json.loads(out.stdout)  # --json: the ids on stdout for a script (the progress stays on stderr)
    assert result["state"] == "done" and result["error"] is None, result
    videos = client.get(f"/api/v1/courses/{cid}/videos", headers=inst.h).json()
    assert [(v["id"], v["title"], v["status"]) for v in videos] == [(result["video_id"], "Bitcoin", "ready")]
    assert wait_job(client, result["job_id"], inst.h)["state"] == "done"
    assert videos[0]["chunk_count"] > 10


def test_cli_ingest_keeps_to_the_upload_rules(client, make: Factory, worker, data_dir, settings, tmp_path):
    """The file is checked against STUDYHALL_MAX_UPLOAD_MB before it is copied (it was copied whole, whatever
    its size); a refused file leaves no copy in the uploads folder; a file name that is not UTF-8 is stored as an
    upload's would be (it was a database error, its copy left behind)."""
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "CLI rules"}, headers=inst.h).json()["id"]
    uploads = data_dir / "uploads" / str(cid)
    big = tmp_path / "big.srt"
    big.write_bytes(b"1\n00:00:01,000 --> 00:00:02,000\nhello\n\n" * 60_000)  # ~2.5 MB
    env = {**clean_env(data_dir), "STUDYHALL_MAX_UPLOAD_MB": "1"}
    out = subprocess.run([sys.executable, "-m", "server.cli", "ingest", str(cid), "--file", str(big)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "upload limit of 1 MB" in out.stderr and "Traceback" not in out.stderr, out.stderr
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    assert _cli(data_dir, "ingest", str(cid), "--file", str(junk)).returncode == 2
    folder = _cli(data_dir, "ingest", str(cid), "--file", str(tmp_path))  # (it said "no such file")
    assert folder.returncode == 2 and "is a directory, not a file" in folder.stderr, folder.stderr
    assert not uploads.exists() or list(uploads.iterdir()) == []  # no copy left of either
    odd = tmp_path / "Vorlesung_\udce4.srt"  # the byte 0xE4 (latin-1 "ä") in the name: not UTF-8
    odd.write_bytes((EVAL / "transcripts" / "3b1b-bitcoin.srt").read_bytes())
    out = subprocess.run([sys.executable.encode(), b"-m", b"server.cli", b"ingest", str(cid).encode(), b"--file",
                          bytes(odd)], cwd=ROOT, env=clean_env(data_dir), capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    (video,) = client.get(f"/api/v1/courses/{cid}/videos", headers=inst.h).json()
    assert video["status"] == "ready" and video["title"].startswith("Vorlesung"), video


def test_cli_ingest_rejects_bad_input(client, make: Factory, data_dir, tmp_path):
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "CLI"}, headers=inst.h).json()["id"]
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01garbage" * 10)
    out = _cli(data_dir, "ingest", str(cid), "--file", str(junk))
    assert out.returncode == 2 and "unsupported" in out.stderr
    out = _cli(data_dir, "ingest", str(cid), "--youtube", "https://example.com/watch?v=nope")
    assert out.returncode == 2 and "YouTube" in out.stderr
    assert _cli(data_dir, "ingest", "999999999", "--youtube", "dQw4w9WgXcQ").returncode == 2
    # titles as REST takes them: one line, at most 200 characters (an escape sequence reached tutor answers)
    for title in ("bad\x1b[31mred", "two\nlines", "x" * 201, " "):
        out = _cli(data_dir, "ingest", str(cid), "--youtube", "dQw4w9WgXcQ", "--title", title)
        assert out.returncode == 2 and "--title" in out.stderr, (repr(title), out.stderr)
    assert client.get(f"/api/v1/courses/{cid}/videos", headers=inst.h).json() == []
    # a token's lifetime is bounded as STUDYHALL_TOKEN_TTL is
    out = _cli(data_dir, "token", "--user", "ttl-check", "--role", "learner", "--ttl", str(2**40))
    assert out.returncode == 2 and "31,622,400" in out.stderr, out.stderr
    # --worker-wait is at least the worker's health-check period: shorter would take a live worker for gone
    out = _cli(data_dir, "ingest", str(cid), "--youtube", "dQw4w9WgXcQ", "--worker-wait", "4")
    assert out.returncode == 2 and "5 to 3600" in out.stderr, out.stderr


def test_reembed_after_model_switch(client, make: Factory, worker, data_dir, settings):
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Reembed"}, headers=inst.h).json()["id"]
    data = (EVAL / "transcripts" / "3b1b-bitcoin.srt").read_bytes()
    r = client.post(f"/api/v1/courses/{cid}/videos", files={"file": ("b.srt", data)}, headers=inst.h)
    vid = r.json()["video_id"]
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
    model = fetch(settings, "SELECT embed_model FROM videos WHERE id = $1", vid)[0]["embed_model"]
    n = fetch(settings, "SELECT count(*) AS n FROM chunks WHERE video_id = $1", vid)[0]["n"]
    # pretend the video was embedded by another model: search must not use its vectors
    fetch(settings, "UPDATE chunks SET embed_model = 'old-model' WHERE video_id = $1", vid)
    fetch(settings, "UPDATE videos SET embed_model = 'old-model' WHERE id = $1", vid)
    fetch(settings, "UPDATE chunk_terms SET embed_model = 'old-model' WHERE video_id = $1", vid)
    fetch(settings, "UPDATE course_term_stats SET embed_model = 'old-model' WHERE course_id = $1", cid)
    found = client.get(f"/api/v1/courses/{cid}/search", params={"q": "digital signature"}, headers=inst.h).json()
    assert found["hits"] == [] and found["awaiting_reembed"] == [vid], found  # says why it finds nothing
    # so does the tutor, and that decline is not cached for the next asker
    for _ in range(2):
        said = client.post(f"/api/v1/courses/{cid}/ask", json={"question": "How are digital signatures checked?"},
                           headers=inst.h).json()
        assert said["grounded"] is False and said["cached"] is False, said
        assert "1 of the course's videos is still being indexed" in said["answer"], said
    fetch(settings, "INSERT INTO jobs (kind, course_id, video_id, state) VALUES ('reembed', $1, $2, 'failed')",
          cid, vid)  # an earlier failed run does not stand in the way
    out = _cli(data_dir, "reembed", "--course", str(cid))
    assert out.returncode == 0 and "queued 1 re-embed jobs" in out.stdout, out.stderr
    assert "no worker is running" not in out.stderr  # (the session's worker is)
    job_id = int(out.stdout.split("[")[1].split("]")[0])
    assert wait_job(client, job_id, inst.h)["state"] == "done"
    assert fetch(settings, "SELECT embed_model FROM videos WHERE id = $1", vid)[0]["embed_model"] == model
    assert fetch(settings, "SELECT count(*) AS n FROM chunks WHERE video_id = $1 AND embed_model = $2", vid,
                 model)[0]["n"] == n
    found = client.get(f"/api/v1/courses/{cid}/search", params={"q": "digital signature"}, headers=inst.h).json()
    assert found["hits"] and found["awaiting_reembed"] == [], found
    said = client.post(f"/api/v1/courses/{cid}/ask", json={"question": "How are digital signatures checked?"},
                       headers=inst.h).json()
    assert said["grounded"] is True and "being indexed" not in said["answer"], said
    # run while a re-embed of the video is under way: nothing more is queued (a second run doubled the work)
    fetch(settings, "UPDATE videos SET embed_model = 'old-model' WHERE id = $1", vid)
    busy = fetch(settings, "INSERT INTO jobs (kind, course_id, video_id, state) VALUES ('reembed', $1, $2, "
                           "'running') RETURNING id", cid, vid)[0]["id"]
    try:
        again = _cli(data_dir, "reembed", "--course", str(cid))
        assert again.returncode == 0 and "queued 0 re-embed jobs" in again.stdout, again.stdout
    finally:
        fetch(settings, "DELETE FROM jobs WHERE id = $1", busy)
        fetch(settings, "UPDATE videos SET embed_model = $2 WHERE id = $1", vid, model)
    # with no worker alive the jobs would wait unseen: it says so (a Redis database no worker serves)
    fetch(settings, "UPDATE videos SET embed_model = 'old-model' WHERE id = $1", vid)
    lonely = subprocess.run([sys.executable, "-m", "server.cli", "reembed", "--course", str(cid)], cwd=ROOT,
                            env=clean_env(data_dir, DATABASE_URL=settings.database_url,
                                          REDIS_URL=settings.redis_url.rsplit("/", 1)[0] + "/7"),
                            capture_output=True, text=True, timeout=300)
    try:
        assert lonely.returncode == 0 and "queued 1 re-embed jobs" in lonely.stdout, lonely.stderr
        assert "no worker is running" in lonely.stderr, lonely.stderr
    finally:
        fetch(settings, "DELETE FROM jobs WHERE course_id = $1 AND kind = 'reembed' AND state = 'queued' RETURNING 1",
              cid)
        fetch(settings, "UPDATE videos SET embed_model = $2 WHERE id = $1", vid, model)


def test_videos_of_an_earlier_default_embedder_are_re_embedded_on_their_own(client, make: Factory, worker, settings):
    """An upgrade changed the offline default (MiniLM alone -> the MiniLM + e5 ensemble): what an ingest worker
    runs at start queues the old default's videos for re-embedding, and only those, once when several workers start
    together; not again while one is queued, nor after one failed (that is for a retry by hand) unless it failed by
    reaching a worker of the old version; nothing with another embedder configured."""
    from dataclasses import replace

    from agents.embedder import MINILM_NAME, default_name
    from ingest.jobs import connect_arq
    from ingest.errors import OTHER_MODEL
    from ingest.submit import reembed_superseded
    from store.db import create_pool

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Upgrade"}, headers=inst.h).json()["id"]
    data = (EVAL / "transcripts" / "3b1b-bitcoin.srt").read_bytes()
    vids = []
    for name in ("a.srt", "b.srt"):
        r = client.post(f"/api/v1/courses/{cid}/videos", files={"file": (name, data)}, headers=inst.h)
        assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"
        vids.append(r.json()["video_id"])
    old, other = vids
    fetch(settings, "UPDATE videos SET embed_model = $2 WHERE id = $1", old, MINILM_NAME)
    fetch(settings, "UPDATE videos SET embed_model = 'someone-else@1' WHERE id = $1", other)
    # titles a model wrote: the re-embed cuts the chapters where they were, and keeps them (no model calls again),
    # in the same rows (ids that assignments and clients hold)
    fetch(settings, "UPDATE chapters SET title = 'Kept ' || idx WHERE video_id = $1 AND idx > 0", old)
    cuts = [tuple(r) for r in fetch(settings, "SELECT id, start_s, end_s, title, summary FROM chapters "
                                              "WHERE video_id = $1 ORDER BY idx", old)]
    assert len(cuts) > 1

    async def run(s, times: int = 1) -> list[int]:  # type: ignore[no-untyped-def]
        pools = [await create_pool(s.database_url, min_size=1, max_size=2) for _ in range(times)]
        arq = await connect_arq(s.redis_url)
        try:  # as many workers starting at once
            got = await asyncio.gather(*(reembed_superseded(p, arq, s) for p in pools))
            return [j for jobs in got for j in jobs]
        finally:
            await arq.aclose()
            for p in pools:
                await p.close()

    try:
        assert run_sync(run(replace(settings, embedder="openai"))) == []
        (job,) = run_sync(run(settings, times=3))
        assert run_sync(run(settings)) == []  # queued already
        assert wait_job(client, job, inst.h)["state"] == "done"
        assert fetch(settings, "SELECT embed_model FROM videos WHERE id = $1", old)[0]["embed_model"] == default_name()
        assert [tuple(r) for r in fetch(settings, "SELECT id, start_s, end_s, title, summary FROM chapters "
                                                  "WHERE video_id = $1 ORDER BY idx", old)] == cuts
        found = client.get(f"/api/v1/courses/{cid}/search", params={"q": "digital signature"}, headers=inst.h).json()
        assert found["hits"] and found["awaiting_reembed"] == [other], found
        fetch(settings, "UPDATE videos SET embed_model = $2 WHERE id = $1", old, MINILM_NAME)
        fetch(settings, "UPDATE jobs SET state = 'failed', error = 'out of disk' WHERE id = $1", job)
        assert run_sync(run(settings)) == []  # failed for this model: left to a retry by hand
        fetch(settings, "UPDATE jobs SET error = $2 WHERE id = $1", job,
              f"{OTHER_MODEL} {MINILM_NAME}, and the re-embed was asked for {default_name()}: restart the workers")
        (again,) = run_sync(run(settings))  # an old worker took it (a rolling upgrade): queued again
        assert wait_job(client, again, inst.h)["state"] == "done"
    finally:
        fetch(settings, "UPDATE videos SET embed_model = $2 WHERE id = ANY ($1::bigint[])", vids, default_name())


def test_cli_ingest_gives_up_when_the_worker_is_gone(client, make: Factory, worker, data_dir, settings):
    """The worker dies after `ingest` handed it the job: the CLI says so and exits 1 instead of waiting forever;
    the job stays queued and the next worker runs it."""
    import redis

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "CLI gone"}, headers=inst.h).json()["id"]
    worker.kill()
    try:
        r = redis.Redis.from_url(settings.redis_url)
        # alive when the CLI looks (its start takes a while on a busy machine), gone soon after
        r.set("arq:queue:health-check", b"pretend", px=5000)
        r.close()
        t0 = time.monotonic()
        out = _cli(data_dir, "ingest", str(cid), "--file", str(EVAL / "transcripts" / "3b1b-bitcoin.srt"),
                   "--worker-wait", "5", "--json")
        assert out.returncode == 1 and "no worker has been consuming jobs for 5 s" in out.stderr, out.stderr
        assert time.monotonic() - t0 < 20  # not the default 20 s
        result = json.loads(out.stdout)
        job_id = result["job_id"]
        assert result["state"] == "queued" and int(out.stderr.split("job ")[1].split()[0].rstrip(",")) == job_id
        assert fetch(settings, "SELECT state FROM jobs WHERE id = $1", job_id)[0]["state"] == "queued"
    finally:
        worker.start()
    assert wait_job(client, job_id, inst.h, timeout=120)["state"] == "done"


def test_cli_progress_of_a_job_deleted_meanwhile_is_one_line(settings):
    """The video (or course) deleted while `studyhall ingest` watches: a CliError (one line, status 2), not a
    TypeError traceback."""
    import asyncio

    import pytest

    from server.cli import CliError, _progress
    from store.db import create_pool

    async def go() -> None:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            await _progress(pool, 2**62)
        finally:
            await pool.close()

    with pytest.raises(CliError, match="is gone"):
        asyncio.run(go())


def test_a_failed_ingest_drops_only_a_copy_no_video_claims(settings, make: Factory, client, tmp_path):
    """`ingest --file` deletes its copy when the submit fails, unless the video committed first (a stop landing
    during the enqueue, after the commit, had deleted the file of a stored video)."""
    import asyncio

    from server.cli import _drop_unclaimed
    from store.db import create_pool

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Copies"}, headers=inst.h).json()["id"]
    claimed, loose = tmp_path / "claimed.upload", tmp_path / "loose.upload"
    for p in (claimed, loose):
        p.write_bytes(b"1\n00:00:01,000 --> 00:00:02,000\nhi\n")
    fetch(settings, "INSERT INTO videos (course_id, title, source, status, file_path) VALUES ($1, 'v', 'transcript', "
                    "'queued', $2)", cid, str(claimed))

    async def go() -> None:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            for p in (claimed, loose):
                await _drop_unclaimed(pool, p)
        finally:
            await pool.close()

    asyncio.run(go())
    assert claimed.exists() and not loose.exists()


def test_an_interrupted_one_shot_command_says_so_and_does_not_exit_0(client, make: Factory, worker, data_dir,
                                                                      tmp_path):
    """Ctrl-C (or SIGTERM) ended `studyhall ingest` with status 0 and not a word: `ingest ... && next` went on as if
    the video were in. It says it was interrupted and exits 128 + the signal."""
    import signal

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "CLI stop"}, headers=inst.h).json()["id"]
    big = tmp_path / "long.srt"
    big.write_text("".join(f"{i}\n00:{i // 60 % 60:02d}:{i % 60:02d},000 --> 00:{i // 60 % 60:02d}:{i % 60:02d},900\n"
                           f"sentence number {i} about hashing and signatures.\n\n" for i in range(1, 3000)))
    # (a closed terminal's SIGHUP was said, and counted, as SIGTERM: 143)
    for sig in (signal.SIGINT, signal.SIGHUP):
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "ingest", str(cid), "--file", str(big)],
                                cwd=ROOT, env=clean_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 60
        while len(client.get(f"/api/v1/courses/{cid}/videos", headers=inst.h).json()) < (1 if sig == signal.SIGINT
                                                                                            else 2):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, (proc.returncode, err)
        assert f"interrupted ({sig.name}) before ingest finished" in err, err


def test_a_reembed_for_another_model_than_the_workers_fails_saying_so(client, make: Factory, worker, settings):
    """A re-embed job did not say which model it was for: a worker not restarted after STUDYHALL_EMBEDDER changed
    "re-embedded" with the old model and marked it done, and every `studyhall reembed` queued the same videos again.
    The job carries the model; a worker embedding with another fails it with the reason."""
    import asyncio

    from ingest.jobs import connect_arq
    from ingest.submit import submit_reembed
    from store.db import create_pool

    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Model"}, headers=inst.h).json()["id"]
    data = (EVAL / "transcripts" / "3b1b-bitcoin.srt").read_bytes()
    r = client.post(f"/api/v1/courses/{cid}/videos", files={"file": ("b.srt", data)}, headers=inst.h)
    assert wait_job(client, r.json()["job_id"], inst.h)["state"] == "done"

    async def queue() -> list[int]:
        pool = await create_pool(settings.database_url, min_size=1, max_size=2)
        arq = await connect_arq(settings.redis_url)
        try:
            return await submit_reembed(pool, arq, settings, "some-other-model@1", cid)
        finally:
            await arq.aclose()
            await pool.close()

    (job_id,) = asyncio.run(queue())
    job = wait_job(client, job_id, inst.h)
    assert job["state"] == "failed" and "asked for some-other-model@1" in job["error"], job
    videos = client.get(f"/api/v1/courses/{cid}/videos", headers=inst.h).json()
    assert [v["status"] for v in videos] == ["ready"]  # still searchable with what it has


def test_cli_ingest_says_why_a_job_waits_for_its_retry(client, make: Factory, worker, data_dir):
    """(Tester) `studyhall ingest` of an unreachable YouTube video printed `0.0% queued` through every retry, then
    the failure: the retries' reasons were never shown."""
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "CLI retries"}, headers=inst.h).json()["id"]
    out = _cli(data_dir, "ingest", str(cid), "--youtube", "https://youtu.be/dQw4w9WgXcQ")
    assert out.returncode != 0 and "queued (" in out.stderr and "retrying in" in out.stderr, out.stderr


def test_the_progress_line_keeps_to_one_row_of_the_terminal(monkeypatch):
    """(Review) with a retry's reason the line ran past 80 columns: it wrapped, \\r rewrote only its last row, and the
    shorter line after it left the old reason's end on screen."""
    import io
    import os

    from server import cli

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    class Pool:
        def __init__(self) -> None:
            self.rows = [{"state": "queued", "progress": 0.0, "error": "could not connect to YouTube " * 8},
                         {"state": "running", "progress": 0.5, "error": None},
                         {"state": "done", "progress": 1.0, "error": None}]

        async def fetchrow(self, *_):  # type: ignore[no-untyped-def]
            return self.rows.pop(0)

    out = Tty()
    monkeypatch.setattr(cli.sys, "stderr", out)
    monkeypatch.setattr(cli.shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((80, 24)))
    real_sleep = asyncio.sleep
    monkeypatch.setattr(cli.asyncio, "sleep", lambda *_: real_sleep(0))
    assert run_sync(cli._progress(Pool(), 1))["state"] == "done"
    rows = out.getvalue().strip("\n").split("\r")[1:]
    assert rows and all(len(r) <= 79 for r in rows), [len(r) for r in rows]
    assert "YouTube" in rows[0] and "YouTube" not in rows[1] and rows[1].rstrip().endswith("running")
