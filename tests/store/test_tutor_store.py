"""Tutor quota and holds in the store: a reserved question is given back once, whoever gets there first (the
answering process or a survivor settling its holds), and a recorded answer is never given back."""
from __future__ import annotations

import uuid

from server import tutoring
from store import tutor as repo
from tests.progress_helpers import course_in_new_tenant, xp_store  # noqa: F401 - fixture


async def _reserved(pool) -> tuple[int, int, str, int, object]:  # type: ignore[no-untyped-def]
    """A learner with one question reserved under a hold of a process of its own: (user, course, proc, hold,
    day)."""
    proc = f"test-{uuid.uuid4().hex[:6]}"
    async with pool.acquire() as conn:
        cid, _, (uid,) = await course_in_new_tenant(conn, 1, enrol=False)
        pending = await repo.hold(conn, proc, uid, cid)
        day = await repo.reserve_turn(conn, uid, 10, pending)
    assert day is not None and await _used(pool, uid) == 1
    assert await pool.fetchval("SELECT reserved FROM tutor_pending WHERE id = $1", pending) == day
    return uid, cid, proc, pending, day


async def _used(pool, uid: int) -> int:  # type: ignore[no-untyped-def]
    return await pool.fetchval("SELECT coalesce(sum(used), 0) FROM tutor_quota WHERE user_id = $1", uid)


async def test_a_reserved_question_is_given_back_once(xp_store):
    pool, redis = xp_store
    uid, _, proc, pending, day = await _reserved(pool)
    async with pool.acquire() as conn:
        # the answering process gives it back; a second give-back (a late cancel) and a survivor find it gone
        assert await repo.release_turn(conn, uid, day, pending) is True
        assert await repo.release_turn(conn, uid, day, pending) is False
    assert await tutoring.recover(pool, redis, [proc]) == 1
    assert await _used(pool, uid) == 0


async def test_a_recorded_answer_is_not_given_back_by_a_survivor(xp_store):
    pool, redis = xp_store
    uid, cid, proc, pending, day = await _reserved(pool)
    async with pool.acquire() as conn:
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


async def test_a_cancel_after_the_answer_is_recorded_posts_that_answer_not_interrupted(xp_store, settings,
                                                                                      monkeypatch):
    """A server stopping just after a room answer was recorded (its question counted) posted "interrupted, ask
    again" for an answer the learner had paid for; the recorded answer is posted instead."""
    import asyncio
    from types import SimpleNamespace

    import pytest

    from agents.embedder import local_minilm
    from agents.tutor import Tutor
    from server.auth import AuthUser
    from store.messages import post_message

    pool, redis = xp_store
    proc = f"test-{uuid.uuid4().hex[:6]}"
    async with pool.acquire() as conn:
        cid, _, (uid,) = await course_in_new_tenant(conn, 1)
        room = f"course:{cid}"
        await conn.execute("INSERT INTO rooms (id, kind, course_id) VALUES ($1, 'course', $2)", room, cid)
        tid = await conn.fetchval("SELECT tenant_id FROM users WHERE id = $1", uid)
    user = AuthUser(id=uid, tenant_id=tid, tenant="t", name="l0", role="learner")
    state = SimpleNamespace(settings=settings, pool=pool, redis=redis, tutor=Tutor(pool, local_minilm(), None),
                            hub=SimpleNamespace(proc=proc))
    hold = tutoring.RoomQuestion(proc, uid, cid, room)
    asked = await post_message(pool, redis, room, uid, "@tutor what is a hash function?", also=hold)

    real = tutoring.public_error
    def cancelled_after_commit(error):  # type: ignore[no-untyped-def]  # the first call follows the record's commit
        monkeypatch.setattr(tutoring, "public_error", real)
        raise asyncio.CancelledError
    monkeypatch.setattr(tutoring, "public_error", cancelled_after_commit)
    with pytest.raises(asyncio.CancelledError):
        await tutoring.answer_in_room(state, user, cid, room, asked.event.id, "what is a hash function?", hold.pending)

    turn = await pool.fetchrow("SELECT id, answer FROM tutor_turns WHERE user_id = $1", uid)
    reply = await pool.fetchrow("SELECT body, meta FROM messages WHERE room_id = $1 AND client_msg_id = $2", room,
                                f"tutor:{asked.event.id}")
    assert reply["meta"]["turn_id"] == turn["id"] and reply["body"] == turn["answer"]
    assert tutoring.INTERRUPTED not in reply["body"]
    assert await pool.fetchval("SELECT count(*) FROM tutor_pending WHERE id = $1", hold.pending) == 0
    assert await _used(pool, uid) == 1


async def test_an_answer_of_content_that_changed_meanwhile_leaves_the_newer_cache_alone(xp_store):
    """An ask that read the course's content version before a video was added, and finished after others had cached
    answers of the new content, deleted all of them (and cached its own, which could never hit)."""
    pool, _ = xp_store
    async with pool.acquire() as conn:
        cid, owner, _ = await course_in_new_tenant(conn, 0, enrol=False)
        old = await repo.content_version(conn, cid)
        await conn.execute("INSERT INTO videos (course_id, title, source) VALUES ($1, 'v', 'transcript')", cid)
        new = await repo.content_version(conn, cid)
        assert new != old

        async def turn() -> int:
            return await conn.fetchval(
                """INSERT INTO tutor_turns (course_id, question, standalone, answer, grounded, provider, model)
                   VALUES ($1, 'q', 'q', 'a', true, 'extractive', 'extractive') RETURNING id""", cid)

        assert await repo.remember(conn, cid, new, "answer", "h-new", await turn()) is True
        assert await repo.remember(conn, cid, old, "answer", "h-old", await turn()) is False  # the slow one
        assert await conn.fetchval("SELECT array_agg(qhash) FROM tutor_cache WHERE course_id = $1", cid) == ["h-new"]


async def test_a_question_deleted_while_its_answer_is_recorded_loses_its_text_and_deadlocks_nothing(xp_store):
    """Recording a room answer holds its question (FOR SHARE) so that a deletion of the question waits, then clears
    the turn it answered; the course row comes first, so deleting the course meanwhile waits instead of
    deadlocking (the turn's foreign key took the course after the message, the deletion the other way round)."""
    import asyncio

    import asyncpg

    from store.courses import delete_course
    from store.messages import delete_message, post_message

    pool, redis = xp_store
    async with pool.acquire() as conn:
        cid, _, (uid,) = await course_in_new_tenant(conn, 1)
        tenant = await conn.fetchval("SELECT tenant_id FROM courses WHERE id = $1", cid)
    room = f"course:{cid}"
    asked = await post_message(pool, redis, room, uid, "@tutor what is a hash?", client_msg_id="q1")
    qid = asked.event.id
    async with pool.acquire() as conn:
        pending = await repo.hold(conn, f"test-{uuid.uuid4().hex[:6]}", uid, cid, room, qid)

    async def record(then) -> int:  # type: ignore[no-untyped-def]  # what the tutor's record does, `then` meanwhile
        async with pool.acquire() as conn, conn.transaction():
            assert await repo.question_withdrawn(conn, cid, pending) is False
            other = asyncio.create_task(then())
            await asyncio.sleep(0.5)
            assert not other.done()  # it waits for this record
            turn = await repo.record_turn(conn, course_id=cid, user_id=uid, room_id=room, question="what is a hash?",
                                          standalone="what is a hash?", answer="a [1]", grounded=True,
                                          provider="extractive", model="extractive")
            await repo.hold_answered(conn, pending, turn["id"])
        await asyncio.wait_for(other, 10)
        return turn["id"]

    turn = await record(lambda: delete_message(pool, redis, room, qid, uid, moderator=False))
    assert await pool.fetchval("SELECT question FROM tutor_turns WHERE id = $1", turn) == ""

    async with pool.acquire() as conn:
        pending = await repo.hold(conn, f"test-{uuid.uuid4().hex[:6]}", uid, cid, room,
                                  (await post_message(pool, redis, room, uid, "and why?", client_msg_id="q2")).event.id)

    async def delete() -> object:
        async with pool.acquire() as conn:
            return await delete_course(conn, cid, tenant)

    try:
        await record(delete)
    except asyncpg.DeadlockDetectedError:  # pragma: no cover - what the order of locks prevents
        raise AssertionError("deleting the course deadlocked with recording an answer")
    assert await pool.fetchval("SELECT count(*) FROM courses WHERE id = $1", cid) == 0


async def test_a_dead_processs_answers_give_their_slots_back(xp_store, settings):
    """(Tester) a server killed mid-answer: a survivor settled its holds ("interrupted, please ask again") but the
    learner's two answer slots stayed taken until they lapsed, 3 minutes of `tutor_busy`."""
    pool, redis = xp_store
    async with pool.acquire() as conn:
        cid, _, (uid,) = await course_in_new_tenant(conn, 1)
        slots = [await tutoring.take_slot(redis, uid, "learner", settings) for _ in range(tutoring.MAX_RUNNING_PER_USER)]
        assert None not in slots and await tutoring.take_slot(redis, uid, "learner", settings) is None  # busy
        proc = f"dead-{uuid.uuid4().hex[:6]}"
        for slot in slots:
            await repo.hold(conn, proc, uid, cid, slot=slot)
    assert await tutoring.recover(pool, redis, [proc]) == len(slots)
    again = await tutoring.take_slot(redis, uid, "learner", settings)
    assert again is not None
    await tutoring.free_slot(redis, uid, again)


async def test_a_course_deleted_mid_answer_gives_the_question_back(xp_store):
    """(Tester) the course's deletion took the answer's hold with it (a cascade): the answer failed, its process
    found no hold to give the question back by, and the learner lost a question of their whole day."""
    from store.courses import delete_course

    pool, _ = xp_store
    uid, cid, _, pending, day = await _reserved(pool)
    async with pool.acquire() as conn:
        other = await repo.hold(conn, "another-proc", uid, cid)  # a second answer under way in it
        assert await repo.reserve_turn(conn, uid, 10, other) == day
        tenant = await conn.fetchval("SELECT tenant_id FROM courses WHERE id = $1", cid)
        assert await delete_course(conn, cid, tenant) is not None
        assert await _used(pool, uid) == 0
        assert await repo.release_turn(conn, uid, day, pending) is False  # (the answer failing now: once only)
    assert await _used(pool, uid) == 0
    # (review) a room question's hold is made when it is posted, its question taken later: one taken after the
    # deletion took the hold is not taken at all
    async with pool.acquire() as conn:
        cid2, _, _ = await course_in_new_tenant(conn, 1, enrol=False)
        late = await repo.hold(conn, "late-proc", uid, cid2)
        tenant = await conn.fetchval("SELECT tenant_id FROM courses WHERE id = $1", cid2)
        assert await delete_course(conn, cid2, tenant) is not None
        assert await repo.reserve_turn(conn, uid, 10, late) is None
    assert await _used(pool, uid) == 0
