"""Real servers for the whole test session: embedded Postgres+pgvector and Redis, and a studyhall
server process over real HTTP. Tests isolate themselves by creating their own tenant."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import httpx
import pytest

from server.auth import issue_token
from store.embedded import ensure_services, free_port
from store.migrate import migrate
from store.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT.parent / "shared" / "eval"


def run_sync(coro):  # type: ignore[no-untyped-def]
    """Run a coroutine to completion from sync or async code (in a thread with its own loop)."""
    box: dict = {}

    def target() -> None:
        try:
            box["v"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001
            box["e"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box.get("v")


# Settings every test process gets: small limits and fast retries so tests run quickly.
TEST_ENV = {
    "STUDYHALL_MAX_UPLOAD_MB": "20",
    "STUDYHALL_JOB_HEARTBEAT_S": "3",
    "STUDYHALL_JOB_RETRY_BASE_S": "0.2",
    "STUDYHALL_JOB_MAX_ATTEMPTS": "3",
    "STUDYHALL_TUTOR_DAILY_LIMIT": "40",
    # no automatic weekly rounds in the test servers' worker: tests start rounds themselves
    "STUDYHALL_MATCH_WEEKLY": "0",
}


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "STUDYHALL_SECRET", "OPENAI_API_KEY", "ANTHROPIC_API_KEY",
                        "OPENAI_BASE_URL", "STUDYHALL_LLM")}
    env["STUDYHALL_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(TEST_ENV)
    env.update(extra)
    return env


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def start_server(data_dir: Path, port: int, log: Path, *extra_args: str, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *extra_args],
        cwd=ROOT, env=env or clean_env(data_dir), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
    )
    wait_ready(f"http://127.0.0.1:{port}", proc)
    return proc


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("studyhall")


@pytest.fixture(scope="session")
def settings(data_dir: Path) -> Settings:
    os.environ.update(TEST_ENV)
    base = replace(load_settings(data_dir), database_url=None, redis_url=None)
    services = ensure_services(base)
    settings = base.with_urls(services.database_url, services.redis_url)
    run_sync(migrate(settings.database_url))
    yield settings
    services.close()


@pytest.fixture(scope="session")
def server(settings: Settings, data_dir: Path) -> str:
    """Base URL of a studyhall server process joined to the session's Postgres and Redis."""
    port = free_port()
    proc = start_server(data_dir, port, data_dir / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


class WorkerProcess:
    """An ingest worker process of the test session; tests may kill and restart it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], cwd=ROOT,
                                     env=clean_env(self.data_dir), stdout=open(self.data_dir / "worker.log", "ab"),
                                     stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


@pytest.fixture(scope="session")
def worker(settings: Settings, data_dir: Path) -> WorkerProcess:
    w = WorkerProcess(data_dir)
    w.start()
    yield w
    w.stop()


@pytest.fixture
def client(server: str) -> httpx.Client:
    # idle connections let go well before the server's keep-alive (uvicorn: 5 s) closes them: with both at 5 s a
    # request sent on a connection the server was closing at that moment was reset (ECONNRESET), once in CI
    with httpx.Client(base_url=server, timeout=30, limits=httpx.Limits(keepalive_expiry=2.0)) as c:
        yield c


class Factory:
    """Creates tenants and users straight in the database and signs tokens the way the server does."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tenant = f"t-{uuid.uuid4().hex[:10]}"

    def user(self, role: str = "learner", name: str | None = None, tenant: str | None = None) -> "User":
        name = name or f"{role}-{uuid.uuid4().hex[:6]}"
        tenant = tenant or self.tenant

        async def go() -> tuple[int, int]:
            conn = await asyncpg.connect(self.settings.database_url)
            try:
                tid = await conn.fetchval(
                    "INSERT INTO tenants (name) VALUES ($1) ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name "
                    "RETURNING id", tenant)
                uid = await conn.fetchval(
                    "INSERT INTO users (tenant_id, name, role) VALUES ($1, $2, $3) RETURNING id", tid, name, role)
                return tid, uid
            finally:
                await conn.close()

        tid, uid = run_sync(go())
        token = issue_token(self.settings.secret, uid, tid, role, ttl_s=3600)
        return User(id=uid, tenant_id=tid, name=name, role=role, token=token)


class User:
    def __init__(self, id: int, tenant_id: int, name: str, role: str, token: str) -> None:
        self.id, self.tenant_id, self.name, self.role, self.token = id, tenant_id, name, role, token

    @property
    def h(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def make(settings: Settings) -> Factory:
    return Factory(settings)


async def db_fetch(settings: Settings, sql: str, *args):  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def fetch(settings: Settings, sql: str, *args):  # type: ignore[no-untyped-def]
    return run_sync(db_fetch(settings, sql, *args))


@contextlib.contextmanager
def dead_port() -> Iterator[int]:
    """A port on which nothing answers, for as long as the block runs: bound, not listening, so connecting is refused
    and no other process takes it meanwhile (a port that was merely free at first was taken by another test's server,
    whose 404 read as a misconfigured service)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def wait_job(client: httpx.Client, job_id: int, headers: dict, timeout: float = 180) -> dict:
    """Poll a job until it is done or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}")


def upload(client: httpx.Client, course_id: int, headers: dict, name: str, data: bytes, title: str | None = None):
    form = {"title": title} if title else {}
    return client.post(f"/api/v1/courses/{course_id}/videos", files={"file": (name, data)}, data=form,
                       headers=headers)


class EvalCourse:
    def __init__(self, course_id: int, instructor: User, learner: User, videos: dict[str, int], tenant: str) -> None:
        self.id, self.instructor, self.learner, self.videos = course_id, instructor, learner, videos
        self.tenant = tenant  # name, for Factory.user(..., tenant=)


@pytest.fixture(scope="session")
def eval_course(server: str, worker: WorkerProcess, settings: Settings) -> EvalCourse:
    """A course built from ../shared/eval/transcripts through the real upload API and worker."""
    import json

    spec = json.loads((EVAL / "questions.json").read_text())
    factory = Factory(settings)
    inst, learner = factory.user("instructor"), factory.user("learner")
    with httpx.Client(base_url=server, timeout=60) as c:
        cid = c.post("/api/v1/courses", json={"title": "Eval course"}, headers=inst.h).json()["id"]
        c.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": learner.id}, headers=inst.h)
        videos, jobs = {}, {}
        for v in spec["videos"]:
            data = (EVAL / "transcripts" / v["file"]).read_bytes()
            r = upload(c, cid, inst.h, v["file"], data, v["title"])
            assert r.status_code == 202, r.text
            videos[v["file"]], jobs[v["file"]] = r.json()["video_id"], r.json()["job_id"]
        for f, job_id in jobs.items():
            job = wait_job(c, job_id, inst.h)
            assert job["state"] == "done", (f, job)
    return EvalCourse(cid, inst, learner, videos, factory.tenant)
