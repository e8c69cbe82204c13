"""Shared set-up for benchmarks: embedded servers in a scratch data dir, eval data, a course loader."""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path

from store.embedded import ensure_services
from store.migrate import migrate
from store.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
EVAL = Path(os.environ.get("STUDYHALL_EVAL_DIR", ROOT.parent / "shared" / "eval"))


async def services(name: str):  # type: ignore[no-untyped-def]
    """Settings with resolved URLs (embedded servers under .bench/<name> unless URLs are set)."""
    ddir = ROOT / ".bench" / name
    settings = load_settings(ddir)
    svc = await asyncio.to_thread(ensure_services, settings)
    settings = settings.with_urls(svc.database_url, svc.redis_url)
    await migrate(settings.database_url)
    return settings, svc


def eval_path(part: str = "questions.json") -> Path:
    """A part of the eval data (a file or folder under EVAL); exits with a line saying where it was looked for."""
    if not (EVAL / part).exists():
        raise SystemExit(f"bench: no eval data at {EVAL / part} (the shared/eval folder beside the checkout; or set "
                         "STUDYHALL_EVAL_DIR to the folder holding questions.json, corpus/ and grading/)")
    return EVAL / part


def eval_spec() -> dict:
    return json.loads(eval_path("questions.json").read_text())


async def make_course(conn, title: str) -> int:  # type: ignore[no-untyped-def]
    tid = await conn.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"bench-{uuid.uuid4().hex[:8]}")
    uid = await conn.fetchval("INSERT INTO users (tenant_id, name, role) VALUES ($1, 'bench', 'instructor') "
                              "RETURNING id", tid)
    return await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, $3) RETURNING id",
                               tid, uid, title)


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (0-100) of xs, nearest rank."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a: object) -> None:
        self.s = time.perf_counter() - self.t0
