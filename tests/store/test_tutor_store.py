"""Tutor quota and holds in the store: a reserved question is given back once, whoever gets there first (the
answering process or a survivor settling its holds), and a recorded answer is never given back."""
from __future__ import annotations

import uuid

from server import tutoring
from store import tutor as repo
from tests.progress_helpers import xp_store  # noqa: F401 - fixture


async def _learner(pool) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    async with pool.acquire() as conn:
        tid = await conn.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"tq-{uuid.uuid4().hex[:8]}")
        owner = await conn.fetchval(
            "INSERT INTO users (tenant_id, name, role) VALUES ($1, 'o', 'instructor') RETURNING id", tid)
        cid = await conn.fetchval(
            "INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'c') RETURNING id", tid, owner)
        uid = await conn.fetchval(
            "INSERT INTO users (tenant_id, name, role) VALUES ($1, 'l', 'learner') RETURNING id", tid)
    return uid, cid


async def _used(pool, uid: int) -> int:  # type: ignore[no-untyped-def]
    return await pool.fetchval("SELECT coalesce(sum(used), 0) FROM tutor_quota WHERE user_id = $1", uid)


async def test_a_reserved_question_is_given_back_once(xp_store):
    pool, redis = xp_store
    uid, cid = await _learner(pool)
    proc = f"test-{uuid.uuid4().hex[:6]}"
    async with pool.acquire() as conn:
        pending = await repo.hold(conn, proc, uid, cid)
        day = await repo.reserve_turn(conn, uid, 10, pending)
        assert day is not None and await _used(pool, uid) == 1
        assert await pool.fetchval("SELECT reserved FROM tutor_pending WHERE id = $1", pending) == day
        # the answering process gives it back; a second give-back (a late cancel) and a survivor find it gone
        assert await repo.release_turn(conn, uid, day, pending) is True
        assert await repo.release_turn(conn, uid, day, pending) is False
    assert await tutoring.recover(pool, redis, [proc]) == 1
    assert await _used(pool, uid) == 0


async def test_a_recorded_answer_is_not_given_back_by_a_survivor(xp_store):
    pool, redis = xp_store
    uid, cid = await _learner(pool)
    proc = f"test-{uuid.uuid4().hex[:6]}"
    async with pool.acquire() as conn:
        pending = await repo.hold(conn, proc, uid, cid)
        day = await repo.reserve_turn(conn, uid, 10, pending)
        turn = await repo.record_turn(conn, course_id=cid, user_id=uid, question="q", standalone="q", answer="a",
                                      grounded=True, provider="extractive", model="extractive")
        await repo.hold_answered(conn, pending, turn["id"])
        assert await repo.release_turn(conn, uid, day, pending) is False  # a cancel after the commit
    assert await tutoring.recover(pool, redis, [proc]) == 1  # a REST hold: nothing to post, nothing to give
    assert await _used(pool, uid) == 1
    # without a hold (no server process: the CLI), a give-back is plain
    async with pool.acquire() as conn:
        assert await repo.release_turn(conn, uid, day) is True
    assert await _used(pool, uid) == 0
