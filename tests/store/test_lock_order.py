"""(Audit) paths that locked a row of a course before the course's key, racing the course's deletion (which locks the
course FOR UPDATE, then the course's tutor holds, then cascades): each now takes the course's key first."""
from __future__ import annotations

import asyncio

import asyncpg

from store import courses, messages
from tests.conftest import Factory
from tests.progress_helpers import xp_store  # noqa: F401 - fixture


async def _course(pool, make: Factory, price: int = 0) -> int:  # type: ignore[no-untyped-def]
    inst = make.user("instructor")
    async with pool.acquire() as conn:
        return await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title, published, price_cents) "
                                   "VALUES ($1, $2, 'c', true, $3) RETURNING id", inst.tenant_id, inst.id, price)


async def _second_lock(x: asyncpg.Connection, sql: str, *args) -> BaseException | None:  # type: ignore[no-untyped-def]
    await x.execute("SET LOCAL lock_timeout = '5s'")
    try:
        await x.execute(sql, *args)
    except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
        return exc
    return None


async def test_recovering_a_recorded_room_answer_racing_a_course_deletion(make: Factory, xp_store):
    """server.tutoring.recover locks a dead process's holds (tutor_pending FOR UPDATE SKIP LOCKED) and, inside that
    transaction, posts each recorded answer through ANOTHER pooled connection: post_message(also=link) ->
    rooms.lock_room -> courses FOR KEY SHARE. delete_course holds the course FOR UPDATE, then locks the course's
    holds: a wait cycle through the application, which Postgres cannot detect (both sit until the pool's 60 s
    command timeout)."""
    from server import tutoring

    pool, redis = xp_store
    cid = await _course(pool, make)
    learner = make.user("learner")
    room = f"course:{cid}"
    q = await messages.post_message(pool, redis, room, None, "what is a hash?", author_name="x", author_role="tutor")
    async with pool.acquire() as conn:  # an answer recorded (hold_answered), its reply not posted: the process died
        turn = await conn.fetchval(
            """INSERT INTO tutor_turns (course_id, user_id, room_id, question, standalone, answer, grounded, provider,
                                        model) VALUES ($1, $2, $3, 'q', 'q', 'an answer', true, 'x', 'x') RETURNING id""",
            cid, learner.id, room)
        await conn.execute("""INSERT INTO tutor_pending (proc, user_id, course_id, room_id, message_id, turn_id)
                              VALUES ('dead-proc-audit', $1, $2, $3, $4, $5)""", learner.id, cid, room, q.event.id, turn)
    # (review) and a hold of the same dead process in another course, settled whatever happens to the first one
    other = await _course(pool, make)
    async with pool.acquire() as conn:
        await conn.execute("""INSERT INTO tutor_pending (proc, user_id, course_id) VALUES ('dead-proc-audit', $1, $2)""",
                           learner.id, other)
    x = await pool.acquire()
    tr = x.transaction()
    await tr.start()
    try:
        await x.execute("SELECT id FROM courses WHERE id = $1 FOR UPDATE", cid)  # delete_course's first lock
        task = asyncio.create_task(tutoring.recover(pool, redis, ["dead-proc-audit"]))
        await asyncio.sleep(1.0)
        # delete_course's next lock: the course's holds (to give their questions back)
        caught = await _second_lock(x, "SELECT 1 FROM tutor_pending WHERE course_id = $1 FOR UPDATE", cid)
        # recovery did not wait for the deletion: the other course's hold is settled already (it waited on the
        # course being deleted, holding up every other course's recovery)
        settled_meanwhile = task.done() and await x.fetchval(
            "SELECT NOT EXISTS (SELECT 1 FROM tutor_pending WHERE course_id = $1)", other)
    finally:
        await tr.rollback()
        await pool.release(x)
    await asyncio.wait_for(task, 30)
    assert caught is None, f"lock inversion: {type(caught).__name__}: {caught}"
    assert settled_meanwhile
    assert await tutoring.recover(pool, redis, ["dead-proc-audit"]) == 1  # (not deleted after all: settled now)


async def test_staff_enrolling_an_enrolled_learner_in_a_paid_course_racing_its_deletion(make: Factory, xp_store):
    """courses.enroll as staff call it (POST /courses/{id}/enrollments takes no course lock for staff): its ON
    CONFLICT DO UPDATE locks the learner's enrollment row, then the course_access insert's key check wants the
    course, which the deletion holds while its cascade wants the enrollment."""
    pool, redis = xp_store
    cid = await _course(pool, make, price=500)
    learner = make.user("learner")
    async with pool.acquire() as conn:  # enrolled while the course was free: no course_access row
        await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", cid, learner.id)
    x = await pool.acquire()
    tr = x.transaction()
    await tr.start()
    try:
        await x.execute("SELECT id FROM courses WHERE id = $1 FOR UPDATE", cid)
        async with pool.acquire() as conn, conn.transaction():  # (as the route runs it: review)
            task = asyncio.create_task(courses.enroll(conn, cid, learner.id))
            await asyncio.sleep(0.5)
            caught = await _second_lock(x, "SELECT 1 FROM enrollments WHERE course_id = $1 FOR UPDATE", cid)
            await tr.rollback()
            try:
                await task
            except asyncpg.DeadlockDetectedError as exc:  # (the detector may pick the enroll instead)
                caught = caught or exc
    finally:
        if x.is_in_transaction():
            await tr.rollback()
        await pool.release(x)
    assert caught is None, f"lock inversion: {type(caught).__name__}: {caught}"
