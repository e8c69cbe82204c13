"""Leaderboards over REST: shape and access; Redis flushed under a running server and across a restart gives
every board back exactly; `leaderboard.changed` is throttled but always tells the last state."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from redis.asyncio import Redis

from store import keys, leaderboards, xp
from store.db import create_pool
from tests.conftest import ROOT, Factory, clean_env, fetch, run_sync, stop_process, wait_ready
from tests.progress_helpers import make_course, xp_store  # noqa: F401 - fixture
from tests.server.conftest import Client, spawn, spawn_ready
from tests.store.test_leaderboards import redis_db


def board(client: httpx.Client, user, scope: str, sid: int, period: str = "all", limit: int = 10):  # type: ignore[no-untyped-def]
    return client.get(f"/api/v1/leaderboards/{scope}/{sid}?period={period}&limit={limit}", headers=user.h)


async def test_board_shape_and_access(server, client, make: Factory, xp_store):
    pool, redis = xp_store
    course = make_course(client, make, learners=5, videos=0)
    inst, ls = course.instructor, course.learners
    pod = client.post(f"/api/v1/courses/{course.id}/pods", json={"name": "P"}, headers=inst.h).json()["id"]
    for u in ls[:3]:
        client.post(f"/api/v1/pods/{pod}/members", json={"user_id": u.id}, headers=inst.h)
    for i, u in enumerate(ls):
        await xp.award_xp(pool, redis, u.id, "assignment_passed", "a:1", course_id=course.id, points=100 * (i + 1))
    r = board(client, ls[0], "course", course.id, limit=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(e["user_id"], e["xp"], e["rank"]) for e in body["entries"]] == \
        [(ls[4].id, 500, 1), (ls[3].id, 400, 2), (ls[2].id, 300, 3)]
    assert body["entries"][0]["name"] == ls[4].name and body["count"] == 5
    assert body["me"] == {"rank": 5, "xp": 100}
    assert [e["user_id"] for e in body["neighbours"]] == [ls[2].id, ls[1].id, ls[0].id]
    pod_board = board(client, ls[0], "pod", pod).json()
    assert [e["user_id"] for e in pod_board["entries"]] == [ls[2].id, ls[1].id, ls[0].id]
    tenant = board(client, ls[0], "tenant", ls[0].tenant_id, "week").json()
    assert tenant["count"] == 5 and tenant["me"]["rank"] == 5
    assert board(client, inst, "course", course.id).json()["me"] == {"rank": None, "xp": 0}
    # access: not your pod, not your tenant, unknown scope, bad period or limit
    assert board(client, ls[4], "pod", pod).status_code == 404
    assert board(client, inst, "pod", pod).status_code == 200
    assert board(client, ls[0], "tenant", ls[0].tenant_id + 1).status_code == 404
    assert board(client, Factory(make.settings).user("learner"), "course", course.id).status_code == 404
    assert board(client, ls[0], "planet", 1).status_code == 404
    assert board(client, ls[0], "course", course.id, "year").status_code == 400
    assert board(client, ls[0], "course", course.id, limit=0).status_code == 400


async def test_leaving_a_course_or_pod_leaves_its_boards(server, client, make: Factory, xp_store):
    """Over REST: a learner who leaves a course is off its boards and its pods' boards at once (still on the
    tenant's); enrolled again, they are back with their XP; a member who leaves a pod is off its board."""
    pool, redis = xp_store
    course = make_course(client, make, learners=3, videos=0)
    inst, ls = course.instructor, course.learners
    pod = client.post(f"/api/v1/courses/{course.id}/pods", json={"name": "P"}, headers=inst.h).json()["id"]
    for u in ls:
        assert client.post(f"/api/v1/pods/{pod}/members", json={"user_id": u.id}, headers=inst.h).status_code == 201
    for i, u in enumerate(ls):
        await xp.award_xp(pool, redis, u.id, "assignment_passed", "a:1", course_id=course.id, points=100 * (i + 1))

    def on(scope: str, sid: int, period: str = "all") -> list[tuple[int, int]]:
        return [(e["user_id"], e["xp"]) for e in board(client, inst, scope, sid, period).json()["entries"]]

    assert on("course", course.id) == on("pod", pod) == [(ls[2].id, 300), (ls[1].id, 200), (ls[0].id, 100)]
    r = client.delete(f"/api/v1/courses/{course.id}/enrollments/{ls[2].id}", headers=ls[2].h)
    assert r.status_code == 204, r.text
    for period in leaderboards.PERIODS:
        assert on("course", course.id, period) == on("pod", pod, period) == [(ls[1].id, 200), (ls[0].id, 100)]
    assert (ls[2].id, 300) in on("tenant", ls[2].tenant_id)
    r = client.post(f"/api/v1/courses/{course.id}/enrollments", json={"user_id": ls[2].id}, headers=inst.h)
    assert r.status_code == 201, r.text
    assert on("course", course.id) == on("pod", pod) == [(ls[2].id, 300), (ls[1].id, 200), (ls[0].id, 100)]
    assert client.delete(f"/api/v1/pods/{pod}/members/{ls[1].id}", headers=ls[1].h).status_code == 204
    assert on("pod", pod) == [(ls[2].id, 300), (ls[0].id, 100)]
    assert on("course", course.id) == [(ls[2].id, 300), (ls[1].id, 200), (ls[0].id, 100)]
    assert client.post(f"/api/v1/pods/{pod}/members", json={"user_id": ls[1].id}, headers=inst.h).status_code == 201
    assert on("pod", pod) == [(ls[2].id, 300), (ls[1].id, 200), (ls[0].id, 100)]


async def test_leaderboard_changed_is_throttled(server, client, make: Factory, xp_store):
    pool, redis = xp_store
    course = make_course(client, make, learners=2, videos=0)
    a, b = course.learners
    old = leaderboards.EVENT_WINDOW_S
    leaderboards.EVENT_WINDOW_S = 0.6  # this process publishes; the window is cluster-wide (in Redis)
    ws = await Client.connect(server, f"course:{course.id}", b)
    try:
        t0 = time.monotonic()
        for i in range(6):
            await xp.award_xp(pool, redis, a.id, "helpful_answer", f"h:{i}", course_id=course.id)
        burst = time.monotonic() - t0
        # announced beside the awards, so the first event shows the board as it was then: one award or more
        first = await ws.expect("leaderboard.changed", period="all")
        assert first["top"][0]["user_id"] == a.id and first["top"][0]["xp"] in (25, 50, 75, 100, 125, 150)
        # the month's and the week's boards are announced with it
        for period in ("month", "week"):
            assert (await ws.expect("leaderboard.changed", period=period))["top"][0]["xp"] >= 25
        seen = [first]
        while seen[-1]["top"][0]["xp"] != 150:  # the end of the burst is announced
            seen.append(await ws.expect("leaderboard.changed", timeout=5, period="all"))
        later = [f for f in await ws.quiet(1.2) if f["type"] == "leaderboard.changed"]
        assert [f for f in later if f["period"] == "all"] == []  # the month's and week's of those windows only
        assert all(f["top"][0]["xp"] <= 150 for f in later)
        # one per window: two when the six awards fit in one window, never one per award
        assert len(seen) <= 2 + int(burst / leaderboards.EVENT_WINDOW_S)
    finally:
        leaderboards.EVENT_WINDOW_S = old
        await ws.close()


async def test_drain_tells_the_end_of_a_burst(server, client, make: Factory, xp_store):
    """`drain` (run at shutdown) announces the last change at once instead of losing it with its timer."""
    pool, redis = xp_store
    course = make_course(client, make, learners=2, videos=0)
    a, b = course.learners
    old = leaderboards.EVENT_WINDOW_S
    leaderboards.EVENT_WINDOW_S = 60.0
    ws = await Client.connect(server, f"course:{course.id}", b)
    try:
        await xp.award_xp(pool, redis, a.id, "helpful_answer", "burst:1", course_id=course.id)
        assert (await ws.expect("leaderboard.changed", period="all"))["top"][0]["xp"] == 25
        await xp.award_xp(pool, redis, a.id, "helpful_answer", "burst:2", course_id=course.id)  # inside the window
        due = [m.decode() for m in await redis.zrange(keys.LEADERBOARD_DUE, 0, -1)]
        assert any(m.startswith(f"course:{course.id}:") for m in due)  # for any process, should this one die
        await leaderboards.drain()
        assert (await ws.expect("leaderboard.changed", period="all", timeout=3))["top"][0]["xp"] == 50
        due = [m.decode() for m in await redis.zrange(keys.LEADERBOARD_DUE, 0, -1)]
        assert not any(m.startswith(f"course:{course.id}:") for m in due)  # told: nobody tells it again
    finally:
        leaderboards.EVENT_WINDOW_S = old
        await ws.close()


@pytest.mark.parametrize("how", ["stopped", "killed"])
async def test_a_server_gone_mid_window_still_tells_the_last_change(server, client, make: Factory, data_dir, how):
    """Through a real server process: XP earned on it inside the event window, then the process goes. Stopped
    (SIGTERM): a learner watching from another server hears the last change at once. Killed (SIGKILL): the board
    is on the due list in Redis, and the surviving server tells the room once the window ends. Never: no one."""
    course = make_course(client, make, learners=2, videos=0)
    (a, b), inst = course.learners, course.instructor
    room = f"course:{course.id}"
    window = {"stopped": 60, "killed": 4}[how]
    ((proc, url),) = spawn_ready(data_dir, [f"lb-{how}"], {"STUDYHALL_LEADERBOARD_EVENT_S": str(window)})
    ws = await Client.connect(server, room, b)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            msgs = [c.post(f"/api/v1/rooms/{room}/messages", json={"text": f"answer {i}"}, headers=a.h).json()
                    for i in range(2)]
            assert c.post(f"/api/v1/rooms/{room}/messages/{msgs[0]['id']}/helpful",
                          headers=inst.h).status_code in (200, 201)
            assert (await ws.expect("leaderboard.changed", period="all", timeout=10))["top"][0]["xp"] == 25
            assert c.post(f"/api/v1/rooms/{room}/messages/{msgs[1]['id']}/helpful",
                          headers=inst.h).status_code in (200, 201)  # inside the window: held back
        held = [f for f in await ws.quiet(0.5) if f["type"] == "leaderboard.changed" and f["top"][0]["xp"] == 50]
        assert not held  # (the first change's month and week events are all that came)
        stop_process(proc, signal.SIGTERM if how == "stopped" else signal.SIGKILL)
        t0 = time.monotonic()
        changed = await ws.expect("leaderboard.changed", period="all", timeout=15)
        assert changed["top"][0]["xp"] == 50 and time.monotonic() - t0 < (3 if how == "stopped" else window + 5)
    finally:
        stop_process(proc)
        await ws.close()


def _all_boards(client: httpx.Client, viewers: dict, boards: list[tuple[str, int]]) -> list:  # type: ignore[type-arg]
    out = []
    for scope, sid in boards:
        for period in leaderboards.PERIODS:
            for u in viewers[(scope, sid)]:
                r = board(client, u, scope, sid, period, limit=100)
                assert r.status_code == 200, r.text
                out.append(r.json())
    return out


@pytest.fixture
def lb_redis(settings):  # type: ignore[no-untyped-def]
    """Redis database 4 of the session's server, empty: this test may flush it."""
    url = redis_db(settings.redis_url, 4)

    async def flush() -> None:
        r = Redis.from_url(url)
        await r.flushdb()
        await r.aclose()

    run_sync(flush())
    yield url
    run_sync(flush())


def test_flush_and_restart_give_identical_boards(settings, data_dir, make: Factory, lb_redis):
    env = {"REDIS_URL": lb_redis, "DATABASE_URL": settings.database_url}
    proc, url = spawn(data_dir, "lb-a", env)
    wait_ready(url, proc)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            course = make_course(c, make, learners=6, videos=2, duration=60)
            inst, ls = course.instructor, course.learners
            pod = c.post(f"/api/v1/courses/{course.id}/pods", json={"name": "P"}, headers=inst.h).json()["id"]
            for u in ls[:4]:
                c.post(f"/api/v1/pods/{pod}/members", json={"user_id": u.id}, headers=inst.h)
            # live XP through the API (lessons, first lesson, course, streak) ...
            for i, u in enumerate(ls):
                for vid in course.videos[: 1 + i % 2]:
                    assert c.post(f"/api/v1/videos/{vid}/progress", json={"position": 60, "watched": [[0, 60]]},
                                  headers=u.h).status_code == 200
            # ... and older XP straight from the store, in earlier weeks and months
            run_sync(_older_xp(lb_redis, settings.database_url, ls, course.id))
            viewers = {("tenant", ls[0].tenant_id): ls[:2], ("course", course.id): [ls[0], ls[5], inst],
                       ("pod", pod): [ls[1], inst]}
            before = _all_boards(c, viewers, list(viewers))
            assert any(b["count"] >= 6 for b in before) and any(b["me"]["rank"] for b in before)

            # Redis flushed under a running server: reads answer from the ledger (never an empty or partial board)
            # and start a rebuild, which puts everything back
            run_sync(_flush(lb_redis))
            assert _all_boards(c, viewers, list(viewers)) == before
            deadline = time.monotonic() + 30
            while not run_sync(_built(lb_redis)):
                assert time.monotonic() < deadline, "boards not rebuilt after a flush"
                time.sleep(0.2)
            assert _all_boards(c, viewers, list(viewers)) == before
            # flushed again, then XP earned before anyone reads: the room hears of it once the boards are rebuilt
            # (which the held-back change starts), with the whole top ten, never a board holding only that XP
            answer = c.post(f"/api/v1/rooms/course:{course.id}/messages", json={"text": "the answer"},
                            headers=ls[5].h).json()
            run_sync(_told_after_rebuild(c, url, lb_redis, course.id, ls[0], inst, answer["id"]))
            before = _all_boards(c, viewers, list(viewers))
    finally:
        stop_process(proc)

    # flushed again while no server runs: the restarted server rebuilds before it answers /ready
    run_sync(_flush(lb_redis))
    proc, url = spawn(data_dir, "lb-b", env)
    wait_ready(url, proc)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert _all_boards(c, viewers, list(viewers)) == before
    finally:
        stop_process(proc)
    assert fetch(settings, "SELECT count(*) AS n FROM xp_events WHERE user_id = ANY($1::bigint[])",
                 [u.id for u in ls])[0]["n"] >= 6 * 4


async def _flush(url: str) -> None:
    r = Redis.from_url(url)
    await r.flushdb()
    await r.aclose()


async def _built(url: str) -> bool:
    r = Redis.from_url(url)
    try:
        return bool(await r.exists(keys.LEADERBOARD_BUILT))
    finally:
        await r.aclose()


async def _told_after_rebuild(c: httpx.Client, url: str, redis_url: str, course_id: int, watcher, inst,  # type: ignore[no-untyped-def]
                              message_id: int) -> None:
    room = f"course:{course_id}"
    ws = await Client.connect(url, room, watcher)
    try:
        await ws.quiet(0.3)
        await _flush(redis_url)
        assert c.post(f"/api/v1/rooms/{room}/messages/{message_id}/helpful", headers=inst.h).status_code == 201
        changed = await ws.expect("leaderboard.changed", period="all", timeout=30)
        assert await _built(redis_url)
        want = c.get(f"/api/v1/leaderboards/course/{course_id}?period=all", headers=inst.h).json()["entries"]
        assert changed["top"] == want and len(want) >= 6, (changed["top"], want)
    finally:
        await ws.close()


async def _older_xp(redis_url: str, dsn: str, learners, course_id: int) -> None:  # type: ignore[no-untyped-def]
    pool = await create_pool(dsn, min_size=1, max_size=2)
    redis = Redis.from_url(redis_url)
    now = datetime.now(timezone.utc)
    try:
        for i, u in enumerate(learners):
            for days in (8, 40, 400):
                await xp.award_xp(pool, redis, u.id, "assignment_passed", f"old:{days}", course_id=course_id,
                                  at=now - timedelta(days=days + i))
    finally:
        await redis.aclose()
        await pool.close()


def test_cli_check_and_rebuild(settings, data_dir, make: Factory, lb_redis):
    """`studyhall leaderboards check` exits 1 on boards never built or differing from the ledger, 0 when they
    match; `rebuild` puts them back."""
    tenant_id = run_sync(xp_award_one(settings.database_url, lb_redis, make))
    env = {**clean_env(data_dir), "REDIS_URL": lb_redis, "DATABASE_URL": settings.database_url}

    def cli(action: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "server.cli", "leaderboards", action], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)

    never = cli("check")  # never built (and missing what the ledger holds): it says so, not only that they differ
    assert never.returncode == 1 and "not built" in never.stdout and "rebuild" in never.stdout, never.stdout
    built = cli("rebuild")
    assert built.returncode == 0 and "rebuilt" in built.stdout
    ok = cli("check")
    assert ok.returncode == 0 and "match" in ok.stdout, ok.stdout + ok.stderr

    async def tamper() -> None:
        r = Redis.from_url(lb_redis)
        await r.zincrby(leaderboards.board_key("tenant", tenant_id, "all"), 7, "424242")
        await r.aclose()

    run_sync(tamper())
    bad = cli("check")
    assert bad.returncode == 1 and "differ" in bad.stdout
    assert cli("rebuild").returncode == 0 and cli("check").returncode == 0


async def xp_award_one(dsn: str, redis_url: str, make: Factory) -> int:
    """At least one award in the ledger, so there is a board to build; the learner's tenant."""
    learner = make.user("learner")
    pool = await create_pool(dsn, min_size=1, max_size=2)
    redis = Redis.from_url(redis_url)
    try:
        await xp.award_xp(pool, redis, learner.id, "daily_streak", "cli-check")
    finally:
        await redis.aclose()
        await pool.close()
    return learner.tenant_id


async def test_a_deleted_course_or_pod_takes_its_boards_out_of_redis(server, client, make: Factory, xp_store):
    """All-time boards never expire: a deleted course's or pod's stayed in Redis for good (nobody can read them)."""
    pool, redis = xp_store
    course = make_course(client, make, learners=2, videos=0)
    inst, ls = course.instructor, course.learners
    pods = [client.post(f"/api/v1/courses/{course.id}/pods", json={"name": n}, headers=inst.h).json()["id"]
            for n in ("P", "Q")]
    for p in pods:
        client.post(f"/api/v1/pods/{p}/members", json={"user_id": ls[0].id}, headers=inst.h)
    await xp.award_xp(pool, redis, ls[0].id, "assignment_passed", "a:1", course_id=course.id)
    boards = {(scope, sid): [leaderboards.board_key(scope, sid, period) for period in leaderboards.PERIODS]
              for scope, sid in [("course", course.id), ("pod", pods[0]), ("pod", pods[1])]}
    assert all([await redis.exists(k) for ks in boards.values() for k in ks])
    assert client.delete(f"/api/v1/pods/{pods[1]}", headers=inst.h).status_code == 204
    assert [await redis.exists(k) for k in boards[("pod", pods[1])]] == [0, 0, 0]
    assert all([await redis.exists(k) for k in boards[("pod", pods[0])]])
    assert client.delete(f"/api/v1/courses/{course.id}", headers=inst.h).status_code == 204
    assert [await redis.exists(k) for ks in boards.values() for k in ks] == [0] * 9
    assert await redis.exists(leaderboards.board_key("tenant", ls[0].tenant_id, "all"))  # the tenant's stays


async def test_reads_from_the_ledger_are_few_at_once(monkeypatch):
    """While Redis has lost the boards every read sums the ledger: forty at once held every pooled connection (the
    rebuild's too) for seconds. At most LEDGER_READS run at once per process; one that waits too long is a 503."""
    from types import SimpleNamespace

    from server.api import leaderboards as api
    from server.errors import ApiError

    monkeypatch.setattr(api, "LEDGER_WAIT_S", 0.2)
    state = SimpleNamespace()
    running, most = 0, 0

    async def read() -> str:
        nonlocal running, most
        try:
            async with api.ledger_read_slot(state):
                running += 1
                most = max(most, running)
                await asyncio.sleep(0.5)
                running -= 1
                return "read"
        except ApiError as exc:
            assert exc.status_code == 503 and exc.code == "rebuilding" and exc.retry_after
            return "503"

    got = await asyncio.gather(*(read() for _ in range(api.LEDGER_READS + 3)))
    assert most == api.LEDGER_READS and got.count("read") == api.LEDGER_READS and got.count("503") == 3
    assert [await read()] == ["read"]  # the slots were given back
