"""Helpers for the progress / XP / leaderboard / matcher tests: courses with ready videos made straight in the
database (no ingest needed), and the boards the XP ledger says there should be."""
from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import datetime

import asyncpg
import httpx
import pytest

from store import leaderboards
from tests.conftest import Factory, User, run_sync


class Course:
    def __init__(self, id: int, instructor: User, learners: list[User], videos: list[int]) -> None:
        self.id, self.instructor, self.learners, self.videos = id, instructor, learners, videos


def make_course(client: httpx.Client, make: Factory, *, learners: int = 2, videos: int = 2,
                duration: float = 100.0, chapters: int = 0) -> Course:
    """A course with `learners` enrolled learners and `videos` ready videos of `duration` seconds, each cut into
    `chapters` equal chapters."""
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Progress"}, headers=inst.h).json()["id"]
    users = [make.user("learner") for _ in range(learners)]
    for u in users:
        assert client.post(f"/api/v1/courses/{cid}/enrollments", json={"user_id": u.id},
                           headers=inst.h).status_code == 201

    async def go() -> list[int]:
        conn = await asyncpg.connect(make.settings.database_url)
        try:
            ids = []
            for i in range(videos):
                vid = await conn.fetchval(
                    """INSERT INTO videos (course_id, title, source, duration_s, status)
                       VALUES ($1, $2, 'transcript', $3, 'ready') RETURNING id""", cid, f"Lesson {i + 1}", duration)
                for k in range(chapters):
                    span = duration / chapters
                    await conn.execute(
                        "INSERT INTO chapters (video_id, idx, start_s, end_s, title) VALUES ($1, $2, $3, $4, $5)",
                        vid, k, k * span, (k + 1) * span, f"Lesson {i + 1} part {k + 1}")
                ids.append(vid)
            return ids
        finally:
            await conn.close()

    return Course(cid, inst, users, run_sync(go()))


async def course_in_new_tenant(conn: asyncpg.Connection, learners: int, *, enrol: bool = True
                               ) -> tuple[int, int, list[int]]:
    """Straight in the database: a tenant of its own with an instructor's course and `learners` learners
    (enrolled unless `enrol` is false). (course id, instructor id, learner ids)."""
    tid = await conn.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"t-{uuid.uuid4().hex[:10]}")
    owner = await conn.fetchval("INSERT INTO users (tenant_id, name, role) VALUES ($1, 'o', 'instructor') RETURNING id",
                                tid)
    cid = await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'c') RETURNING id",
                              tid, owner)
    ids = [await conn.fetchval("INSERT INTO users (tenant_id, name, role) VALUES ($1, $2, 'learner') RETURNING id",
                               tid, f"l{i}") for i in range(learners)]
    if enrol:
        for u in ids:
            await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", cid, u)
    return cid, owner, ids


async def ledger_boards(conn: asyncpg.Connection, now: datetime | None = None) -> dict[str, dict[bytes, int]]:
    """Every current board as the ledger defines it: key -> {member: xp} (computed independently of rebuild):
    course boards hold who is enrolled now, pod boards who is a member and enrolled in the pod's course now."""
    out: dict[str, dict[bytes, int]] = defaultdict(dict)
    month, week = leaderboards.period_bounds("month", now), leaderboards.period_bounds("week", now)
    enrolled = {(r["course_id"], r["user_id"]) for r in await conn.fetch("SELECT course_id, user_id FROM enrollments")}
    course_of = {r["id"]: r["course_id"] for r in await conn.fetch("SELECT id, course_id FROM pods")}
    in_pod = {(r["pod_id"], r["user_id"]) for r in await conn.fetch("SELECT pod_id, user_id FROM pod_members")}
    for r in await conn.fetch("SELECT tenant_id, user_id, points, course_id, pod_ids, at FROM xp_events"):
        u = r["user_id"]
        scopes = [("tenant", r["tenant_id"])]
        scopes += [("course", r["course_id"])] if r["course_id"] and (r["course_id"], u) in enrolled else []
        scopes += [("pod", p) for p in r["pod_ids"] if (p, u) in in_pod and (course_of.get(p), u) in enrolled]
        for scope, sid in scopes:
            for period, bounds in (("all", None), ("month", month), ("week", week)):
                if bounds is None or bounds[0] <= r["at"] < bounds[1]:
                    key = leaderboards.board_key(scope, sid, period, now)
                    m = str(r["user_id"]).encode()
                    out[key][m] = out[key].get(m, 0) + r["points"]
    return dict(out)


async def redis_boards(redis, wanted: list[str]) -> dict[str, dict[bytes, int]]:  # type: ignore[no-untyped-def]
    out = {}
    for key in wanted:
        got = await redis.zrange(key, 0, -1, withscores=True)
        out[key] = {m: int(s) for m, s in got}
    return out


@pytest.fixture
async def xp_store(settings):  # type: ignore[no-untyped-def]
    """A pool and Redis client of the test process (store functions called directly, as a worker does)."""
    from redis.asyncio import Redis

    from store.db import create_pool

    pool = await create_pool(settings.database_url, min_size=1, max_size=8)
    redis = Redis.from_url(settings.redis_url)
    yield pool, redis
    await redis.aclose()
    await pool.close()
