"""The CLI's answers to mistakes: one line and exit status 2, never a traceback; nothing changed."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, Factory, clean_env, fetch


def _cli(settings, tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url, **env}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=clean_env(tmp_path / "d", **env),
                          capture_output=True, text=True, timeout=120)


def _refused(out: subprocess.CompletedProcess, words: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and words in out.stderr, out.stderr


def test_token_keeps_an_existing_users_role(settings, tmp_path, make: Factory):
    """Roles are read from the database: `token --role learner` for an instructor would have demoted them and
    broken their tokens."""
    inst = make.user("instructor")
    tenant = fetch(settings, "SELECT t.name FROM tenants t JOIN users u ON u.tenant_id = t.id WHERE u.id = $1",
                   inst.id)[0]["name"]
    out = _cli(settings, tmp_path, "token", "--user", inst.name, "--role", "learner", "--tenant", tenant)
    _refused(out, "has the role instructor, not learner")
    assert fetch(settings, "SELECT role FROM users WHERE id = $1", inst.id)[0]["role"] == "instructor"
    ok = _cli(settings, tmp_path, "token", "--user", inst.name, "--role", "instructor", "--tenant", tenant)
    assert ok.returncode == 0 and ok.stdout.count(".") == 2
    # (tester) a name as REST stores it: a pasted space or a zero-width character made a second, look-alike user
    # (" ann" a new learner; "ann\u200b" an instructor reading as ann) instead of refusing or finding the one there is
    for look_alike in (f" {inst.name}", f"{inst.name}\u200b", f"{inst.name} "):
        out = _cli(settings, tmp_path, "token", "--user", look_alike, "--role", "learner", "--tenant", f" {tenant}")
        _refused(out, "has the role instructor, not learner")
    assert not fetch(settings, "SELECT 1 FROM tenants WHERE name = $1", f" {tenant}")
    # (review) a name an older CLI stored as typed is still found by the same typing, not made again beside it
    tid = fetch(settings, "SELECT tenant_id FROM users WHERE id = $1", inst.id)[0]["tenant_id"]
    legacy = f" {inst.name}-old\u200b"
    fetch(settings, "INSERT INTO users (tenant_id, name, role) VALUES ($1, $2, 'instructor')", tid, legacy)
    out = _cli(settings, tmp_path, "token", "--user", legacy, "--role", "learner", "--tenant", tenant)
    _refused(out, "has the role instructor, not learner")
    assert not fetch(settings, "SELECT 1 FROM users WHERE tenant_id = $1 AND name = $2", tid, f"{inst.name}-old")


def test_mistakes_are_one_line_and_status_2(settings, tmp_path):
    # a setting that cannot be used too (it exited 1, the status of a failed job, without the "studyhall:" prefix)
    out = _cli(settings, tmp_path, "token", "--user", "x", "--role", "learner", STUDYHALL_PORT="70000")
    _refused(out, "STUDYHALL_PORT")
    assert out.stderr.startswith("studyhall: STUDYHALL_PORT"), out.stderr
    _refused(_cli(settings, tmp_path, "token", "--user", "x", "--role", "learner", "--ttl", "-100"), "--ttl")
    _refused(_cli(settings, tmp_path, "token", "--user", "  ", "--role", "learner"), "--user")
    _refused(_cli(settings, tmp_path, "token", "--user", "bad\x1bname", "--role", "learner"), "--user")
    _refused(_cli(settings, tmp_path, "token", "--user", "x", "--role", "learner", "--tenant", "   "), "--tenant")
    _refused(_cli(settings, tmp_path, "ask", "1", ""), "question")
    _refused(_cli(settings, tmp_path, "ask", "1", "why? " * 500), "longer than 2000")  # as over REST
    _refused(_cli(settings, tmp_path, "ask", "1", "clear \x1b[2J\x07"), "control characters")
    _refused(_cli(settings, tmp_path, "ask", "1", "@tutor"), "write your question after @tutor")  # as over REST
    not_utf8 = subprocess.run([sys.executable.encode(), b"-m", b"server.cli", b"ask", b"1", b"caf\xe9?"], cwd=ROOT,
                              env=clean_env(tmp_path / "d", DATABASE_URL=settings.database_url,
                                            REDIS_URL=settings.redis_url), capture_output=True, text=True, timeout=120)
    _refused(not_utf8, "UTF-8")  # (a traceback, status 1: the question failed where it was first encoded)
    _refused(_cli(settings, tmp_path, "ask", "99999999999999999999", "why?"), "course_id")
    _refused(_cli(settings, tmp_path, "reembed", "--course", "4242424242"), "course 4242424242 not found")
    _refused(_cli(settings, tmp_path, "serve", "--port", "70000"), "--port")
    _refused(_cli(settings, tmp_path, "worker", "--queues", "ingest,fast"), "--queues")
    unreachable = _cli(settings, tmp_path, "migrate", DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    _refused(unreachable, "studyhall: ")
    assert len(unreachable.stderr.strip().splitlines()) <= 3, unreachable.stderr
    # Redis unreachable at `serve`: one line and 2 as well (it was uvicorn's traceback and exit status 3)
    from tests.conftest import dead_port, free_port

    with dead_port() as dead:
        no_redis = _cli(settings, tmp_path, "serve", "--port", str(free_port()), REDIS_URL=f"redis://127.0.0.1:{dead}/0")
    _refused(no_redis, "studyhall: ")
    assert no_redis.stderr.strip().splitlines()[-1].startswith("studyhall: "), no_redis.stderr


def test_a_failing_model_service_is_one_line_too(settings, tmp_path, make: Factory):
    """`ask` (and `reembed`) with an embedding service that does not answer printed the SDK's traceback."""
    from tests.conftest import dead_port

    inst = make.user("instructor")
    cid = fetch(settings, "INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'Embed') RETURNING id",
                inst.tenant_id, inst.id)[0]["id"]
    with dead_port() as dead:
        out = _cli(settings, tmp_path, "ask", str(cid), "why?", STUDYHALL_EMBEDDER="openai", OPENAI_API_KEY="sk-test",
                   OPENAI_BASE_URL=f"http://127.0.0.1:{dead}/v1")
    _refused(out, "embedding service failed")  # after the SDK's logged retries
    assert out.stderr.strip().splitlines()[-1].startswith("studyhall: "), out.stderr


def test_a_one_shot_command_prints_what_was_asked_and_no_notes(data_dir, make: Factory):
    """`studyhall token` on the embedded servers wrote their start/stop notes (JSON INFO lines) to stderr around
    the token: a mistake is one line there, and a success says nothing, unless STUDYHALL_LOG_LEVEL asks."""
    user = make.user("learner")
    run = [sys.executable, "-m", "server.cli", "token", "--user", user.name, "--role", "learner"]
    out = subprocess.run(run, cwd=ROOT, env=clean_env(data_dir), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.count(".") == 2 and out.stderr == "", out.stderr
    loud = subprocess.run(run, cwd=ROOT, env=clean_env(data_dir, STUDYHALL_LOG_LEVEL="INFO"), capture_output=True,
                          text=True, timeout=120)
    assert loud.returncode == 0 and '"level": "INFO"' in loud.stderr.replace('"level":"INFO"', '"level": "INFO"')


def test_what_studyhall_writes_is_its_users_alone(settings, tmp_path, make: Factory):
    """The data dir (uploads, the embedded servers' files, the secret) was made with the usual umask: readable by
    every local user."""
    user = make.user("learner")
    out = _cli(settings, tmp_path, "token", "--user", user.name, "--role", "learner")
    assert out.returncode == 0, out.stderr
    made = [p for p in (tmp_path / "d").rglob("*")] + [tmp_path / "d"]
    assert made and all(p.stat().st_mode & 0o077 == 0 for p in made), [(p, oct(p.stat().st_mode)) for p in made]


def test_a_reader_gone_away_ends_the_command_quietly(settings, tmp_path):
    """`studyhall ask ... --json | head -c 300`: the reader closing the pipe made a BrokenPipeError traceback (or an
    "Exception ignored" at exit); now the command ends quietly, as other tools do (status 128 + SIGPIPE)."""
    import signal

    env = {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "token", "--user", "piped", "--role", "learner"],
                            cwd=ROOT, env=clean_env(tmp_path / "d", **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE.value, err
    assert "BrokenPipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_a_stop_while_the_jobs_module_is_still_importing_is_a_stop(monkeypatch):
    """SIGTERM reaching a worker while `ingest.jobs` was half imported (its `mark_stopping` not defined yet) raised
    AttributeError: the worker exited 1 instead of stopping, and `up` took that for a crash and started it again."""
    import signal
    import types

    import pytest

    from server import cli

    monkeypatch.setitem(sys.modules, "ingest.jobs", types.ModuleType("ingest.jobs"))  # half made
    with pytest.raises(cli._Stop):
        cli._on_signal(signal.SIGTERM, None)
    calls = []
    done = types.ModuleType("ingest.jobs")
    done.mark_stopping = lambda: calls.append(1)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ingest.jobs", done)
    with pytest.raises(cli._Stop):
        cli._on_signal(signal.SIGTERM, None)
    assert calls == [1]


def test_a_ctrl_c_while_ups_worker_is_importing_prints_no_traceback():
    """Ctrl-C reaches the whole process group: in the second or so `up`'s worker spent importing, it died of it with
    a KeyboardInterrupt traceback under `up`'s output. The worker now ignores SIGINT until its `main` takes it (`up`
    stops it with SIGTERM), also when started again from `up`'s watching thread."""
    import signal
    import threading
    import time

    from server import cli

    preexec = cli._worker_preexec()
    assert preexec is not None
    # the child stands for the worker's imports (a sleep), then shows what SIGINT does once they are done
    child = "import signal, time; time.sleep(1.5); print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"
    for from_thread in (False, True):
        procs: list[subprocess.Popen] = []
        spawned, done = threading.Event(), threading.Event()

        def spawn() -> None:
            procs.append(subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, preexec_fn=preexec))
            spawned.set()
            if from_thread:
                done.wait(30)  # (the death signal is the spawning thread's: it lives as long as its child, as `up`'s)

        if from_thread:
            t = threading.Thread(target=spawn)
            t.start()
            assert spawned.wait(30)
        else:
            spawn()
        time.sleep(0.3)
        procs[0].send_signal(signal.SIGINT)
        out, err = procs[0].communicate(timeout=30)
        done.set()
        assert procs[0].returncode == 0 and "Traceback" not in err, (from_thread, err)
        assert out.strip() == "True"  # ignored still; and the worker's main sets its own handler (`main`)


def test_an_address_that_cannot_be_listened_on_is_one_line_before_anything_starts(tmp_path):
    """STUDYHALL_HOST naming no address, or one not this machine's, started the embedded servers and ran the
    migrations, then uvicorn logged "[Errno -2] Name or service not known" (naming neither the setting nor the
    host) and exited 3; a port in use also went as far."""
    import socket

    taken = socket.create_server(("127.0.0.1", 0))
    try:
        for cmd, env in (("up", {"STUDYHALL_HOST": "999.1.1.1"}), ("serve", {"STUDYHALL_HOST": "no such host"}),
                         ("up", {"STUDYHALL_PORT": str(taken.getsockname()[1])})):
            out = subprocess.run([sys.executable, "-m", "server.cli", cmd], cwd=ROOT,
                                 env=clean_env(tmp_path / "d", **env), capture_output=True, text=True, timeout=120)
            _refused(out, "cannot listen on")
            assert "STUDYHALL_HOST" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
            assert not (tmp_path / "d" / "pg").exists()  # no embedded server was started for it
    finally:
        taken.close()


def test_ask_names_when_a_citations_quote_is_said():
    """(Tester) `studyhall ask` listed "[1] lec 0:10" while the offline answer said the quote came "at 0:20": the
    line names the quote's time too when it is later than the moment's start."""
    from server.cli import citation_line

    c = {"video_title": "lec", "label": "0:10", "start": 10.0, "quote_at": 20.4, "quote": "…", "url": None}
    assert citation_line(1, c) == "[1] lec 0:10 (quoted at 0:20)"
    assert citation_line(2, {**c, "quote_at": 10.0, "url": "https://youtu.be/x?t=10"}) == \
        "[2] lec 0:10 https://youtu.be/x?t=10"
    # (review) a start of 9.996 is labelled 0:09 and quoted at its rounded 10.0: the same moment; a Socratic hint
    # quotes nothing
    assert citation_line(3, {**c, "label": "0:09", "start": 9.996, "quote_at": 10.0}) == "[3] lec 0:09"
    assert citation_line(4, {**c, "quote": ""}) == "[4] lec 0:10"


async def test_ingest_watching_its_job_waits_out_a_database_restart(capsys):
    """(Tester) `studyhall ingest` watching its job exited 2 with a traceback line when the embedded Postgres was
    killed and revived under `up`, while the job went on and finished: `ingest && next` failed on a job that
    succeeded. The watch now waits for the database as long as for a worker (`--worker-wait`)."""
    from server import cli

    replies = [ConnectionRefusedError(111, "refused"), ConnectionRefusedError(111, "refused"),
               {"state": "done", "progress": 1.0, "error": None}]

    class Pool:
        async def fetchrow(self, *args):  # type: ignore[no-untyped-def]
            got = replies.pop(0)
            if isinstance(got, Exception):
                raise got
            return got

    class Arq:  # a worker alive all along
        async def exists(self, key):  # type: ignore[no-untyped-def]
            return True

    job = await cli._progress(Pool(), 1, Arq(), gone_after=10)
    assert job["state"] == "done"
    assert capsys.readouterr().err.count("cannot be reached") == 1  # said once per outage
    import pytest

    # an outage longer than the wait still ends the watch, with the error
    replies[:] = [ConnectionRefusedError(111, "refused")] * 10
    with pytest.raises(ConnectionRefusedError):
        await cli._progress(Pool(), 1, Arq(), gone_after=1.5)
    # (review) with no worker the job runs here, and failed with the database: no waiting for it
    replies[:] = [ConnectionRefusedError(111, "refused"), {"state": "running", "progress": 0.5, "error": None}]
    with pytest.raises(ConnectionRefusedError):
        await cli._progress(Pool(), 1, None, gone_after=10)


def test_a_one_shot_command_with_its_output_closed_says_so(monkeypatch, capsys):
    """(Tester) `studyhall token ... >&-` made the token and lost it without a word, then died of a traceback
    (sys.stdout is None): exit 2 with a line, before anything is made."""
    from server import cli

    monkeypatch.setattr(sys, "stdout", None)
    assert cli.main(["token", "--user", "nobody-made", "--role", "learner"]) == 2
    assert "standard output is closed" in capsys.readouterr().err
