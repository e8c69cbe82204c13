"""The embedded servers' lifecycle through the real CLI: up, joiners, clean stop, restart with data kept."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from store.embedded import free_port, read_connection_env
from tests.conftest import ROOT, clean_env, start_server, stop_process, wait_ready


def _cli(data_dir, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=clean_env(data_dir),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _up(tmp_path, ddir) -> tuple[subprocess.Popen, str]:  # type: ignore[no-untyped-def]
    """`studyhall up` on a free port, its output in tmp_path/up.log: (the process, its base URL)."""
    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "server.cli", "up", "--port", str(port)], cwd=ROOT,
                          env=clean_env(ddir), stdout=open(tmp_path / "up.log", "wb"), stderr=subprocess.STDOUT)
    return up, f"http://127.0.0.1:{port}"


def _alive(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _need_the_password(urls: dict[str, str]) -> None:
    """Listening on 127.0.0.1 keeps other hosts out, not other users of this one: without the data dir's password
    (owner-only, as the URLs in connection.env) neither server lets anyone in (Postgres trusted every local
    connection as its superuser; Redis took any command)."""
    import asyncio
    from urllib.parse import urlparse

    import asyncpg
    import pytest
    from redis import Redis
    from redis.exceptions import AuthenticationError, ResponseError

    db, rd = urlparse(urls["DATABASE_URL"]), urlparse(urls["REDIS_URL"])
    assert db.password and rd.password

    async def without() -> None:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(host="127.0.0.1", port=db.port, user="postgres", database="studyhall",
                                  password="guess")
        conn = await asyncpg.connect(urls["DATABASE_URL"])
        await conn.close()

    asyncio.run(without())
    anonymous = Redis(host="127.0.0.1", port=rd.port)
    with pytest.raises((AuthenticationError, ResponseError)):
        anonymous.ping()
    anonymous.close()
    assert Redis.from_url(urls["REDIS_URL"]).ping()


def test_up_joiners_stop_and_restart(tmp_path):
    ddir = tmp_path / "data"
    # `token` before anything runs starts the embedded servers itself and stops them after
    first_token = _cli(ddir, "token", "--user", "ann", "--role", "instructor").strip()
    assert first_token.count(".") == 2 and "\n" not in first_token
    assert not (ddir / "connection.env").exists()

    up, base = _up(tmp_path, ddir)
    try:
        wait_ready(base, up)
        urls = read_connection_env(ddir)
        assert urls["DATABASE_URL"].startswith("postgresql://") and urls["REDIS_URL"].startswith("redis://")
        assert urls["EMBEDDED"] == "pg,redis"
        assert (ddir / "connection.env").stat().st_mode & 0o777 == 0o600  # an outside URL can hold a password
        _need_the_password(urls)
        # the first token (made before `up`) still works: same data, same secret
        h = {"Authorization": f"Bearer {first_token}"}
        cid = httpx.post(base + "/api/v1/courses", json={"title": "Persisted"}, headers=h).json()["id"]
        # a token made while `up` runs joins the same servers
        tok = _cli(ddir, "token", "--user", "bo", "--role", "learner").strip()
        assert httpx.get(base + "/api/v1/users/me", headers={"Authorization": f"Bearer {tok}"}).json()["name"] == "bo"
        # a second server process joins the same Postgres and Redis
        port2 = free_port()
        second = start_server(ddir, port2, tmp_path / "serve2.log")
        try:
            r = httpx.get(f"http://127.0.0.1:{port2}/api/v1/courses/{cid}", headers=h)
            assert r.status_code == 200 and r.json()["title"] == "Persisted"
        finally:
            stop_process(second)
        log = (tmp_path / "up.log").read_bytes().decode()
        assert "dev instructor token" in log
    finally:
        stop_process(up, signal.SIGTERM)
    assert up.returncode == 0
    # everything is stopped cleanly: no server answers, connection.env is gone
    assert not (ddir / "connection.env").exists()
    deadline = time.monotonic() + 10
    while _alive(base) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(base)
    assert not (ddir / "pg" / "postmaster.pid").exists()

    # start again on the same data dir: the course is there
    port3 = free_port()
    again = start_server(ddir, port3, tmp_path / "again.log")
    try:
        r = httpx.get(f"http://127.0.0.1:{port3}/api/v1/courses/{cid}", headers={"Authorization": f"Bearer {first_token}"})
        assert r.status_code == 200 and r.json()["title"] == "Persisted"
    finally:
        stop_process(again)
    assert not (ddir / "pg" / "postmaster.pid").exists()


def _workers_of(pid: int) -> set[int]:
    """The `studyhall worker` children of process `pid` (from /proc)."""
    import os

    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"server.cli" in cmd and b"worker" in cmd:
            found.add(int(entry))
    return found


def test_up_starts_its_worker_again_and_checks_its_port_first(tmp_path):
    """A worker killed under `up` (the out-of-memory killer, say) is started again, else uploads stayed queued;
    a port in use stops `up` before it starts a worker or announces a URL."""
    import os

    ddir = tmp_path / "data"
    _cli(ddir, "token", "--user", "dev-instructor", "--role", "admin")  # up's dev user keeps a staff role it has
    port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "server.cli", "up", "--port", str(port)], cwd=ROOT,
                          env=clean_env(ddir), stdout=open(tmp_path / "up.log", "wb"), stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", up)
        deadline = time.monotonic() + 30
        while not (first := _workers_of(up.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        (pid,) = first
        os.kill(pid, signal.SIGKILL)
        while time.monotonic() < deadline:
            again = _workers_of(up.pid) - {pid}
            if again:
                break
            time.sleep(0.2)
        assert again, (tmp_path / "up.log").read_text()
        assert "starting it again" in (tmp_path / "up.log").read_text()
        # a worker stopped on a signal (Ctrl-C reaches the whole process group) is not started again
        (pid,) = again
        os.kill(pid, signal.SIGTERM)
        while time.monotonic() < deadline and "the worker stopped" not in (tmp_path / "up.log").read_text():
            time.sleep(0.2)
        time.sleep(2.5)
        assert not _workers_of(up.pid), (tmp_path / "up.log").read_text()
        # the same port again: refused before anything starts
        second = subprocess.run([sys.executable, "-m", "server.cli", "up", "--port", str(port)], cwd=ROOT,
                                env=clean_env(ddir), capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "studyhall is up" not in second.stdout, second.stdout
    finally:
        stop_process(up, signal.SIGTERM)
    assert up.returncode == 0 and not _workers_of(up.pid)


def test_a_first_start_cut_off_midway_is_redone(tmp_path):
    """Ctrl-C during the very first start left a data directory half made (PG_VERSION but no `postgres`
    database, none of our settings): every later start failed. Now the next start initialises it again."""
    ddir = tmp_path / "data"
    (ddir / "pg" / "base").mkdir(parents=True)
    (ddir / "pg" / "PG_VERSION").write_text("16\n")
    (ddir / "pg" / "postgresql.conf").write_text("# initdb was cut off here\n")
    token = _cli(ddir, "token", "--user", "ann", "--role", "instructor").strip()
    assert token.count(".") == 2
    assert "unix_socket_directories = ''" in (ddir / "pg" / "postgresql.conf").read_text()
    (aside,) = ddir.glob("pg.incomplete-*")  # moved aside, never deleted
    assert (aside / "PG_VERSION").exists()
    # a complete directory whose settings an operator edited is kept as it is
    conf = ddir / "pg" / "postgresql.conf"
    conf.write_text(conf.read_text().replace("max_connections = 300", "max_connections = 310"))
    _cli(ddir, "token", "--user", "bo", "--role", "learner")
    assert "max_connections = 310" in conf.read_text() and len(list(ddir.glob("pg.incomplete-*"))) == 1


def test_an_embedded_server_that_will_not_start_is_one_line_and_leaves_nothing_running(tmp_path):
    """A Postgres refusing its settings was a chained traceback; a Redis that could not start left the Postgres
    just started running for nobody."""
    ddir = tmp_path / "data"
    _cli(ddir, "migrate")  # initialised (and stopped again when the command ends)
    conf = ddir / "pg" / "postgresql.conf"
    good = conf.read_text()
    conf.write_text(good + "\nnot_a_setting = 1\n")
    out = subprocess.run([sys.executable, "-m", "server.cli", "migrate"], cwd=ROOT, env=clean_env(ddir),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and out.stderr.startswith("studyhall: ") and "Traceback" not in out.stderr, out.stderr
    conf.write_text(good)
    (ddir / "redis").rename(ddir / "redis.aside")
    (ddir / "redis").write_text("a file where Redis keeps its data")
    out = subprocess.run([sys.executable, "-m", "server.cli", "migrate"], cwd=ROOT, env=clean_env(ddir),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    from store.embedded import _pg_running_port

    assert _pg_running_port(ddir / "pg") is None  # the Postgres it started is stopped again


def test_a_redis_that_exits_before_it_daemonizes_is_one_line(tmp_path, monkeypatch):
    """redis-server failing before it forked (bad arguments, a binary that cannot run) raised CalledProcessError:
    a traceback instead of the one line every other start failure gives."""
    import pytest

    from store import embedded

    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR: Bad directive' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(embedded, "_redis_bin", lambda: str(fake))
    with pytest.raises(embedded.EmbeddedError, match="exit 1.*Bad directive"):
        embedded._ensure_redis(tmp_path / "data")


def test_a_postgres_that_will_not_start_says_why(tmp_path):
    from store.embedded import _pg_failure

    (tmp_path / "server.log").write_text("LOG: starting\nFATAL:  could not open file \"global/pg_filenode.map\": "
                                         "Permission denied\n")
    msg = _pg_failure(tmp_path, "pg_ctl: could not start server\n")
    assert "could not start server" in msg and "Permission denied" in msg and "chown -R" in msg


def test_a_stale_connection_env_is_not_trusted_for_embedded_servers(tmp_path):
    """After a crash, connection.env may name ports that something else now answers on: the embedded servers
    are found through their own pid files instead, and started when they are not running."""
    ddir = tmp_path / "data"
    ddir.mkdir()
    impostors = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]  # answer, then hang up

    def serve(s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            conn.close()

    for s in impostors:
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    pg_port, redis_port = (s.getsockname()[1] for s in impostors)
    (ddir / "connection.env").write_text(f"DATABASE_URL=postgresql://postgres@127.0.0.1:{pg_port}/studyhall\n"
                                         f"REDIS_URL=redis://127.0.0.1:{redis_port}/0\nEMBEDDED=pg,redis\n")
    try:
        token = _cli(ddir, "token", "--user", "cy", "--role", "instructor").strip()
    finally:
        for s in impostors:
            s.close()
    assert token.count(".") == 2
    assert not (ddir / "pg" / "postmaster.pid").exists()  # its own Postgres ran and stopped again


def test_a_joiner_keeps_an_outside_server_announced_as_such(tmp_path):
    """connection.env naming an outside server (not embedded) is passed on as outside: the next joiner uses it
    too instead of starting an embedded server of its own."""
    from dataclasses import replace

    from store.embedded import ensure_services
    from store.settings import load_settings

    ddir = tmp_path / "data"
    ddir.mkdir()
    outside = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]  # "outside servers": they answer
    pg, rd = (s.getsockname()[1] for s in outside)
    (ddir / "connection.env").write_text(f"DATABASE_URL=postgresql://u@127.0.0.1:{pg}/x\n"
                                         f"REDIS_URL=redis://127.0.0.1:{rd}/0\nEMBEDDED=\n")
    try:
        services = ensure_services(replace(load_settings(ddir), database_url=None, redis_url=None))
        try:
            assert services.database_url.endswith(f":{pg}/x") and services.redis_url.endswith(f":{rd}/0")
            assert read_connection_env(ddir).get("EMBEDDED", "") == ""  # still outside for the next joiner
        finally:
            services.close()
    finally:
        for s in outside:
            s.close()
    assert not (ddir / "pg").exists()  # no embedded Postgres was started


def test_a_one_off_command_given_its_own_url_announces_nothing(tmp_path):
    """`DATABASE_URL=<staging> studyhall migrate` beside a running `up` rewrote connection.env with the staging URL:
    every later joiner without URLs (a token, an ingest, `up`'s restarted worker) used staging. A one-off command
    (announce=False) joins what is announced and writes nothing; a lasting process still announces."""
    from dataclasses import replace

    from store.embedded import ensure_services
    from store.settings import load_settings

    ddir = tmp_path / "data"
    ddir.mkdir()
    outside = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]  # "outside servers": they answer
    pg, rd, staging = (s.getsockname()[1] for s in outside)
    announced = f"DATABASE_URL=postgresql://u@127.0.0.1:{pg}/x\nREDIS_URL=redis://127.0.0.1:{rd}/0\nEMBEDDED=\n"
    (ddir / "connection.env").write_text(announced)
    given = replace(load_settings(ddir), database_url=f"postgresql://u@127.0.0.1:{staging}/staging", redis_url=None)
    try:
        services = ensure_services(given, announce=False)
        try:
            assert services.database_url.endswith("/staging") and services.redis_url.endswith(f":{rd}/0")
            assert (ddir / "connection.env").read_text() == announced
        finally:
            services.close()
        services = ensure_services(given)  # a server or worker given the URL: joiners follow it
        try:
            assert read_connection_env(ddir)["DATABASE_URL"].endswith("/staging")
        finally:
            services.close()
    finally:
        for s in outside:
            s.close()


def test_a_process_given_its_own_url_beside_running_ones_leaves_the_announcement(tmp_path):
    """(Tester) `REDIS_URL=<a typo> studyhall serve` beside a running `up` rewrote connection.env and failed: every
    later joiner (`up`'s restarted worker, the one-shot commands, a plain `serve`) used the typo until the file was
    deleted by hand. While other processes use the data dir, what they announced stays."""
    from dataclasses import replace

    from store.embedded import ensure_services
    from store.settings import load_settings

    ddir = tmp_path / "data"
    ddir.mkdir()
    outside = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]  # "outside servers": they answer
    pg, rd, other = (s.getsockname()[1] for s in outside)
    base = load_settings(ddir)
    announced = f"DATABASE_URL=postgresql://u@127.0.0.1:{pg}/x\nREDIS_URL=redis://127.0.0.1:{rd}/0\nEMBEDDED=\n"
    (ddir / "connection.env").write_text(announced)
    try:
        running = ensure_services(replace(base, database_url=None, redis_url=None))  # `up`, joined to them
        try:
            joiner = ensure_services(replace(base, database_url=None, redis_url=f"redis://127.0.0.1:{other}/0"))
            assert joiner.redis_url.endswith(f":{other}/0")  # it uses what it was given...
            assert (ddir / "connection.env").read_text() == announced  # ... and announces nothing over `up`
            joiner.close()
            assert (ddir / "connection.env").read_text() == announced
            same = ensure_services(replace(base, database_url=None, redis_url=None))  # a plain joiner: `up`'s
            assert same.redis_url.endswith(f":{rd}/0")
            same.close()
        finally:
            running.close()
    finally:
        for s in outside:
            s.close()


def test_postgres_down_is_a_503_to_retry_and_the_server_recovers(tmp_path):
    """With Postgres stopped under a running server, requests were 500 "internal" (a traceback each) and a
    socket opening was refused with an HTTP 403; now 503 `unavailable` with Retry-After, the socket closes
    with 1013 "try again later", and once Postgres is back the same server answers again."""
    import asyncio

    import websockets

    from store.embedded import _pg_bin, _pg_running_port, _pg_system_user

    ddir = tmp_path / "data"
    token = _cli(ddir, "token", "--user", "ann", "--role", "instructor").strip()
    port = free_port()
    server = start_server(ddir, port, tmp_path / "serve.log")
    base, h = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    pgdata = ddir / "pg"
    try:
        assert httpx.get(base + "/api/v1/courses", headers=h).status_code == 200
        pg_port = _pg_running_port(pgdata)
        subprocess.run([_pg_bin("pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"], check=True,
                       capture_output=True, user=_pg_system_user(pgdata))
        r = httpx.get(base + "/api/v1/courses", headers=h, timeout=30)
        assert r.status_code == 503 and r.json()["code"] == "unavailable" and r.headers["Retry-After"] == "5", r.text
        ready = httpx.get(base + "/ready", timeout=30)  # (the probe a load balancer polls said nothing of when)
        assert ready.status_code == 503 and ready.headers.get("Retry-After") == "5", ready.headers

        async def opening() -> tuple[int, str]:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/rooms/course:1?token={token}") as ws:
                try:
                    await asyncio.wait_for(ws.recv(), timeout=20)
                except websockets.ConnectionClosed as exc:
                    return exc.rcvd.code, exc.rcvd.reason
            return 0, ""

        assert asyncio.run(opening()) == (1013, "try again later")
        import json

        ours = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()
                if line.startswith("{") and '"logger": "server.' in line]
        assert any("service unreachable" in d["msg"] for d in ours)  # one line each, not a traceback each
        assert not [d for d in ours if "exc" in d], [d["msg"] for d in ours if "exc" in d]
        subprocess.run([_pg_bin("pg_ctl"), "-D", str(pgdata), "-w", "-l", str(pgdata / "server.log"),
                        "-o", f"-p {pg_port}", "start"],  # back on its port
                       check=True, capture_output=True, user=_pg_system_user(pgdata))
        deadline = time.monotonic() + 30
        while httpx.get(base + "/api/v1/courses", headers=h).status_code != 200:
            assert time.monotonic() < deadline, "the server did not recover"
            time.sleep(0.5)
    finally:
        stop_process(server)


def test_a_stalled_postgres_is_a_503_not_a_hang(tmp_path):
    """(Tester) a Postgres that stopped answering (every process of it stopped) held a request for as long as it
    did (120 s: the statement's 60 s, then its connection's rollback); statements now give up after
    STUDYHALL_DB_TIMEOUT_S with a 503 to retry, and the server carries on once Postgres is back."""
    import os
    import subprocess

    ddir = tmp_path / "data"
    token = _cli(ddir, "token", "--user", "ann", "--role", "instructor").strip()
    port = free_port()
    server = start_server(ddir, port, tmp_path / "serve.log", env=clean_env(ddir, STUDYHALL_DB_TIMEOUT_S="2"))
    base, h = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    postmaster = int((ddir / "pg" / "postmaster.pid").read_text().split()[0])
    try:
        assert httpx.get(base + "/api/v1/courses", headers=h).status_code == 200
        pids = [postmaster] + [int(p) for p in subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True,
                                                              text=True).stdout.split()]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = httpx.get(base + "/api/v1/courses", headers=h, timeout=60)
            took = time.monotonic() - t0
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert r.status_code == 503 and r.json()["code"] == "unavailable" and took < 15, (r.text, took)
        deadline = time.monotonic() + 30
        while httpx.get(base + "/api/v1/courses", headers=h, timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the server did not recover"
            time.sleep(0.5)
    finally:
        stop_process(server)


def test_an_upload_under_way_when_its_server_stops_is_a_json_503(tmp_path):
    """(Tester) a slow upload still arriving when its server was stopped got uvicorn's plain-text 500 "Internal
    Server Error" at the end of its 10 s wait; now a JSON 503 `unavailable` to send again, and no file is left."""
    import json
    import socket as socket_

    ddir = tmp_path / "data"
    token = _cli(ddir, "token", "--user", "ann", "--role", "instructor").strip()
    port = free_port()
    server = start_server(ddir, port, tmp_path / "serve.log")
    base, h = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        cid = httpx.post(base + "/api/v1/courses", json={"title": "Stop"}, headers=h).json()["id"]
        head = (f"--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"talk.srt\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
        total = len(head) + 1_000_000
        conn = socket_.create_connection(("127.0.0.1", port))
        conn.sendall((f"POST /api/v1/courses/{cid}/videos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                      f"Content-Type: multipart/form-data; boundary=b0\r\nContent-Length: {total}\r\n\r\n").encode()
                     + head + b"1\n" * 1000)
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        conn.settimeout(0.2)
        reply, t0 = b"", time.monotonic()
        while time.monotonic() - t0 < 30 and b"\r\n\r\n" not in reply:
            try:
                conn.sendall(b"1\n" * 10)  # a slow client: it never finishes in time
            except OSError:
                pass
            try:
                got = conn.recv(65536)
            except socket_.timeout:
                continue
            except OSError:
                break
            if not got:
                break
            reply += got
        try:
            conn.settimeout(2)
            reply += conn.recv(65536)
        except OSError:
            pass
        conn.close()
        status, _, rest = reply.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 503"), reply[:300]
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["code"] == "unavailable", reply[:600]
        server.wait(timeout=30)
        assert not [p for p in (ddir / "uploads").rglob("*") if p.is_file()]
    finally:
        stop_process(server)


def test_a_stalled_redis_is_a_503_not_a_hang(tmp_path):
    """A Redis that stops answering (a partition, a stalled process) held requests until TCP gave up; commands
    now give up after 10 s with a 503 to retry, and the server carries on once Redis is back."""
    import os

    ddir = tmp_path / "data"
    token = _cli(ddir, "token", "--user", "ann", "--role", "instructor").strip()
    port = free_port()
    server = start_server(ddir, port, tmp_path / "serve.log")
    base, h = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    pid = int((ddir / "redis" / "redis.pid").read_text().strip())
    try:
        cid = httpx.post(base + "/api/v1/courses", json={"title": "Stall"}, headers=h).json()["id"]
        url = f"{base}/api/v1/rooms/course:{cid}/messages"
        assert httpx.post(url, json={"text": "before", "client_msg_id": "a"}, headers=h).status_code == 201
        import asyncio
        import concurrent.futures

        import websockets

        async def opening() -> tuple[int, str]:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/rooms/course:{cid}?token={token}") as ws:
                try:
                    while True:
                        await asyncio.wait_for(ws.recv(), timeout=40)
                except websockets.ConnectionClosed as exc:
                    return exc.rcvd.code, exc.rcvd.reason

        def timed(fn):  # type: ignore[no-untyped-def]
            t0 = time.monotonic()
            return fn(), time.monotonic() - t0

        os.kill(pid, signal.SIGSTOP)
        try:  # at once: each waits out the 10 s
            with concurrent.futures.ThreadPoolExecutor(3) as ex:
                posted = ex.submit(timed, lambda: httpx.post(url, json={"text": "during", "client_msg_id": "b"},
                                                             headers=h, timeout=60))
                added = ex.submit(timed, lambda: httpx.post(f"{base}/api/v1/courses/{cid}/videos", headers=h,
                                                            json={"title": "T", "youtube": "dQw4w9WgXcQ"}, timeout=60))
                socket_ = ex.submit(timed, lambda: asyncio.run(opening()))
                (r, took), (video, video_took), (closed, socket_took) = posted.result(), added.result(), socket_.result()
        finally:
            os.kill(pid, signal.SIGCONT)
        assert r.status_code == 503 and r.json()["code"] == "unavailable" and took < 30, (r.text, took)
        # the video is stored and its job queued later by recovery: enqueueing gave up instead of hanging
        assert video.status_code == 202 and video_took < 30, (video.text, video_took)
        assert closed == (1013, "try again later") and socket_took < 30, (closed, socket_took)
        r = httpx.post(url, json={"text": "after", "client_msg_id": "c"}, headers=h)
        assert r.status_code == 201, r.text
    finally:
        stop_process(server)


def test_a_postgres_that_refuses_the_password_says_so_in_a_line(tmp_path):
    """The embedded servers' password is made with the data dir (`embedded.secret`): one replaced afterwards was a
    traceback from psql; it is one line naming the file."""
    ddir = tmp_path / "data"
    _cli(ddir, "migrate")
    (ddir / "embedded.secret").write_text("not-the-password\n")
    out = subprocess.run([sys.executable, "-m", "server.cli", "migrate"], cwd=ROOT, env=clean_env(ddir),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("studyhall: the embedded Postgres") and "embedded.secret" in out.stderr, out.stderr
    from store.embedded import _pg_running_port

    assert _pg_running_port(ddir / "pg") is None  # the Postgres it started is stopped again


def test_a_data_dir_that_trusted_local_connections_asks_for_the_password_from_its_next_start(tmp_path):
    """Data dirs made before the embedded Postgres had a password trust every local connection (any user of the
    machine was its superuser). At the next start the superuser gets the data dir's password and pg_hba.conf asks
    for it."""
    from dataclasses import replace

    from store.embedded import ensure_services
    from store.settings import load_settings

    ddir = tmp_path / "data"
    _cli(ddir, "migrate")
    hba = ddir / "pg" / "pg_hba.conf"
    hba.write_text(hba.read_text().replace("scram-sha-256", "trust"))  # as such a dir's was
    (ddir / "embedded.secret").unlink()  # nor had it a secret
    services = ensure_services(replace(load_settings(ddir), database_url=None, redis_url=None))
    try:
        assert " trust" not in hba.read_text() and "scram-sha-256" in hba.read_text()
        _need_the_password({"DATABASE_URL": services.database_url, "REDIS_URL": services.redis_url})
    finally:
        services.close()
    _cli(ddir, "token", "--user", "ann", "--role", "instructor")  # and the next start just uses it


def test_pid_files_naming_a_pid_reused_by_another_process_are_stale(tmp_path):
    """After a reboot or a container restart the pid files may name a PID some other process now has (PIDs
    start low again), and a port something else answers on: that was taken for the running servers (the
    commands talked to a stranger), Postgres refused to start over the lock file, and a stop sent SIGTERM to
    the stranger."""
    ddir = tmp_path / "data"
    _cli(ddir, "migrate")  # initialised, then stopped when the command ended
    stranger = subprocess.Popen(["sleep", "120"])
    impostor = socket.create_server(("127.0.0.1", 0))  # listens, never answers
    port = impostor.getsockname()[1]
    pgdata = ddir / "pg"
    try:
        (pgdata / "postmaster.pid").write_text(
            f"{stranger.pid}\n{pgdata}\n{int(time.time())}\n{port}\n\n127.0.0.1\n  1234567         0\nready   \n")
        (ddir / "redis" / "redis.pid").write_text(f"{stranger.pid}\n")
        (ddir / "redis" / "port").write_text(f"{port}\n")
        token = _cli(ddir, "token", "--user", "di", "--role", "instructor").strip()
        assert token.count(".") == 2
        assert stranger.poll() is None  # not sent a signal by anyone
        from store.embedded import _pg_running_port, _redis_running_port, stop_embedded

        assert _pg_running_port(pgdata) is None and _redis_running_port(ddir / "redis") is None  # both stopped again
        (ddir / "redis" / "redis.pid").write_text(f"{stranger.pid}\n")
        stop_embedded(ddir)  # a stop with a stale pid file leaves the stranger alone
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
        impostor.close()


def test_a_stalled_embedded_redis_is_still_the_one_running(tmp_path):
    """(Review) a PING timing out (a slow fsync, a fork, a long script) made the data dir's Redis look dead, and the
    next command started a second redis-server on the same data dir and files."""
    from redis import Redis

    from store import embedded

    ddir = tmp_path / "data"
    url = embedded._ensure_redis(ddir)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    sleeper = threading.Thread(target=lambda: Redis.from_url(url).execute_command("DEBUG", "SLEEP", "2.5"))
    try:
        sleeper.start()
        time.sleep(0.3)
        assert embedded._redis_running_port(ddir / "redis") == port
        assert embedded._ensure_redis(ddir) == url  # no second server
    finally:
        sleeper.join()
        embedded.stop_embedded(ddir)


def test_up_starts_a_killed_embedded_server_again_on_its_port(tmp_path):
    """(Crash experiment) an embedded Redis or Postgres killed under `up` stayed down (the server answered 503 until
    `up` was restarted), and the next command started it on another port, where the running processes never
    looked. `up` now starts it again on its port, and everything carries on."""
    import os

    ddir = tmp_path / "data"
    up, url = _up(tmp_path, ddir)
    try:
        wait_ready(url, up)
        before = read_connection_env(ddir)
        for pidfile in (ddir / "redis" / "redis.pid", ddir / "pg" / "postmaster.pid"):
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _alive(url) and time.monotonic() < deadline:  # down, as far as the server can tell
                time.sleep(0.2)
            wait_ready(url, up, timeout=90)  # back by itself
            assert read_connection_env(ddir) == before, pidfile  # on the same ports
        assert "had stopped; starting it again" in (tmp_path / "up.log").read_text()
        _cli(ddir, "token", "--user", "after", "--role", "learner")  # a one-off joins the same servers
        assert read_connection_env(ddir) == before
    finally:
        stop_process(up, signal.SIGTERM)
    assert up.returncode == 0


def test_a_start_waits_for_a_redis_still_loading_its_data(tmp_path, caplog, monkeypatch):
    """(Tester) the embedded Redis counts as started once it answers at all, LOADING included; the start's one PING
    then failed with BusyLoadingError: `up` exited 2 after every restart of a Redis holding some tens of MB, and
    stopped the Redis on its way out, so the next try loaded again and failed the same way."""
    import logging
    import os
    from types import SimpleNamespace

    from redis import Redis

    from server import cli
    from store import embedded

    ddir = tmp_path / "data"
    redis = Redis.from_url(embedded._ensure_redis(ddir))
    try:
        pipe = redis.pipeline(transaction=False)
        for i in range(2_000):  # 20 MB: a loading Redis answers (LOADING) only after each 2 MB it read
            pipe.set(f"k{i}", os.urandom(5_000).hex())  # (not compressible)
        pipe.execute()
        redis.bgrewriteaof()  # the keys in the file's RDB preamble, which the start below loads slowly
        while any(redis.info("persistence")[k] for k in ("aof_rewrite_in_progress", "aof_rewrite_scheduled")):
            time.sleep(0.05)
        redis.close()
        embedded.stop_embedded(ddir)
        write = embedded.write_owner_only  # the next start takes 1 ms a key: about 2 s of LOADING
        monkeypatch.setattr(embedded, "write_owner_only",
                            lambda path, text: write(path, text + "key-load-delay 1000\n" * (path.name == "redis.conf")))
        url = embedded._ensure_redis(ddir)  # answers LOADING
        t0 = time.monotonic()
        with caplog.at_level(logging.INFO, logger="studyhall"):
            cli._check_redis(SimpleNamespace(redis_url=url))
        assert time.monotonic() - t0 > 0.5, "the data was loaded already: the test proves nothing"
        assert "loading its data" in caplog.text
        assert Redis.from_url(url).dbsize() == 2_000
    finally:
        embedded.stop_embedded(ddir)


def test_an_embedded_server_never_takes_the_port_the_server_is_about_to_listen_on(tmp_path):
    """(Tester) `up --port P`, P the embedded Redis's port of last time: free when checked, it was given back to
    Redis, and the server's own bind failed after the migrations (a uvicorn error, exit 3)."""
    from store import embedded

    record = tmp_path / "port"
    port = embedded.free_port()
    record.write_text(str(port))
    assert embedded._port_again(record) == port  # free: taken again, as before
    embedded.RESERVED_PORTS.add(port)
    try:
        assert embedded._port_again(record) != port
        assert int(record.read_text()) != port
    finally:
        embedded.RESERVED_PORTS.discard(port)


def test_a_killed_redis_whose_port_was_taken_waits_for_it_rather_than_moving(tmp_path, caplog):
    """(Tester) revived on a new port (its own taken meanwhile by another program), the embedded Redis was where no
    running process looked: 503s until `up` was restarted, and nothing said so. It now starts again only on its
    port, saying at ERROR why it waits, and does once the port is free."""
    import logging
    import os
    import socket
    from types import SimpleNamespace

    from store import embedded

    ddir = tmp_path / "data"
    url = embedded._ensure_redis(ddir)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    services = SimpleNamespace(data_dir=ddir, embedded_pg=False, embedded_redis=True)
    try:
        pid = int((ddir / "redis" / "redis.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (embedded._runs(pid, "redis-server", zombie_dead=True) or embedded._port_open(port)) \
                and time.monotonic() < deadline:
            time.sleep(0.1)  # (gone, and its port too: a save's child of it may hold the port a moment longer)
        squatter = socket.socket()
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        try:
            with caplog.at_level(logging.ERROR, logger="store.embedded"):
                assert embedded.revive(services) == []
                assert embedded.revive(services) == []  # (said once, not at every look: review)
            assert sum("cannot start again on its port" in r.getMessage() for r in caplog.records) == 1
            assert int((ddir / "redis" / "port").read_text()) == port  # not moved
        finally:
            squatter.close()
        assert embedded.revive(services) == ["redis"]
        assert embedded._redis_running_port(ddir / "redis") == port
    finally:
        embedded.stop_embedded(ddir)


def test_up_and_serve_reserve_their_port_before_the_embedded_servers_start(tmp_path, monkeypatch):
    """(Review) that `_check_listen` itself reserves the port `ensure_services` then keeps clear of."""
    from server import cli
    from store import embedded

    monkeypatch.setenv("STUDYHALL_DATA_DIR", str(tmp_path))
    port = free_port()
    try:
        cli._check_listen(cli.build_parser().parse_args(["serve", "--port", str(port)]))
        assert port in embedded.RESERVED_PORTS
    finally:
        embedded.RESERVED_PORTS.discard(port)
