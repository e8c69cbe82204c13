"""Real servers for the whole test session: embedded Postgres+pgvector and Redis, and a studyhall
server process over real HTTP. Tests isolate themselves by creating their own tenant."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
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


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "STUDYHALL_SECRET")}
    env["STUDYHALL_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
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


@pytest.fixture
def client(server: str) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=30) as c:
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
