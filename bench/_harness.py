"""Shared set-up of the realtime benchmarks: services, a studyhall server process, seeded users, CPU/RSS probes."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

from server.auth import issue_token
from store.embedded import Services, ensure_services, free_port
from store.migrate import migrate
from store.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def services(name: str, data_dir: str | None = None) -> tuple[Settings, Services]:
    """Settings joined to Postgres and Redis (embedded in `data_dir`, by default ./.bench/<name>)."""
    ddir = Path(data_dir) if data_dir else ROOT / ".bench" / name
    base = load_settings(ddir)
    svc = ensure_services(base)
    settings = base.with_urls(svc.database_url, svc.redis_url)
    asyncio.run(migrate(settings.database_url))
    return settings, svc


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready")


def start_studyhall(settings: Settings, **env: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    full.update(STUDYHALL_DATA_DIR=str(settings.data_dir), STUDYHALL_LOG_LEVEL="WARNING", **env)
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], cwd=ROOT, env=full,
                            stdout=subprocess.DEVNULL, stderr=open(settings.data_dir / "bench-server.log", "ab"))
    wait_ready(f"http://127.0.0.1:{port}", proc)
    return proc, port


def start_baseline() -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench._baseline", "--port", str(port)], cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("baseline server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _seed(settings: Settings, n: int) -> tuple[str, list[str], str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        tid = await conn.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"bench-{uuid.uuid4().hex[:8]}")
        inst = await conn.fetchval(
            "INSERT INTO users (tenant_id, name, role) VALUES ($1, 'teacher', 'instructor') RETURNING id", tid)
        cid = await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'bench') RETURNING id",
                                  tid, inst)
        ids = await conn.fetch(
            """INSERT INTO users (tenant_id, name, role) SELECT $1, 'learner-' || g, 'learner'
               FROM generate_series(1, $2) g RETURNING id""", tid, n)
        await conn.execute("INSERT INTO enrollments (course_id, user_id) SELECT $1, unnest($2::bigint[])",
                           cid, [r["id"] for r in ids])
    finally:
        await conn.close()
    tokens = [issue_token(settings.secret, r["id"], tid, "learner", ttl_s=3600) for r in ids]
    return f"course:{cid}", tokens, issue_token(settings.secret, inst, tid, "instructor", ttl_s=3600)


def seed(settings: Settings, n: int) -> tuple[str, list[str], str]:
    """A course with `n` enrolled learners: (room id, their tokens, an instructor token)."""
    return asyncio.run(_seed(settings, n))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run_clients(args: list[str], on_line=None) -> dict:  # type: ignore[no-untyped-def]
    """Run the load generator in its own process; `on_line(tag)` sees its progress marks; returns its result."""
    import json

    proc = subprocess.Popen([sys.executable, "-m", "bench._clients", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    result: dict = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            result = json.loads(line)
        elif on_line is not None:
            on_line(line)
    if proc.wait() != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode})")
    return result
