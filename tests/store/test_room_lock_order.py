"""Changes inside a room racing the deletion of its course or pod: both take the room's row first, so one waits
for the other instead of the two deadlocking (Postgres aborting one of them: a 500)."""
from __future__ import annotations

import asyncio

import pytest

from store import courses, live, messages, pods
from store.messages import Refused
from tests.conftest import Factory
from tests.progress_helpers import xp_store  # noqa: F401 - fixture


async def _course(pool, make: Factory) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """(course id, tenant id, instructor id)."""
    inst = make.user("instructor")
    async with pool.acquire() as conn:
        cid = await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'c') RETURNING id",
                                  inst.tenant_id, inst.id)
    return cid, inst.tenant_id, inst.id


async def _session(pool, cid: int, by: int) -> int:  # type: ignore[no-untyped-def]
    async with pool.acquire() as conn:
        return await conn.fetchval("INSERT INTO live_sessions (course_id, title, created_by) VALUES ($1, 'l', $2) "
                                   "RETURNING id", cid, by)


async def test_starting_a_session_while_its_course_is_deleted_is_not_found(make: Factory, xp_store):
    """The start locked its session, then creating the room needed the course row the deletion held, whose
    cascade waited for the session."""
    pool, redis = xp_store
    cid, tid, by = await _course(pool, make)
    sid = await _session(pool, cid, by)  # nobody joined: its room has no row yet
    deleting = await pool.acquire()
    tx = deleting.transaction()
    await tx.start()
    try:  # as store.courses.delete_course: the course row, then the delete
        await deleting.execute("SELECT 1 FROM courses WHERE id = $1 FOR UPDATE", cid)
        start = asyncio.create_task(live.start_session(pool, redis, sid))
        await asyncio.sleep(0.5)
        await deleting.execute("DELETE FROM courses WHERE id = $1", cid)
        await tx.commit()
    finally:
        await pool.release(deleting)
    with pytest.raises(Refused) as exc:
        await start
    assert exc.value.code == "not_found"


async def test_ending_a_session_while_its_course_is_deleted_does_both(make: Factory, xp_store):
    """The end held its session and waited at a poll (a vote under way) before the room; the deletion held the
    room and waited for the session."""
    pool, redis = xp_store
    cid, tid, by = await _course(pool, make)
    sid = await _session(pool, cid, by)
    await live.start_session(pool, redis, sid)
    poll, _ = await live.create_poll(pool, redis, sid, "q", ["a", "b"], by)
    voting = await pool.acquire()
    tx = voting.transaction()
    await tx.start()
    try:
        await voting.execute("SELECT 1 FROM polls WHERE id = $1 FOR SHARE", poll["id"])
        end = asyncio.create_task(live.end_session(pool, redis, sid))
        await asyncio.sleep(0.3)
        async with pool.acquire() as conn:
            deletion = asyncio.create_task(courses.delete_course(conn, cid, tid))
            await asyncio.sleep(0.3)
            await tx.commit()
            assert (await end)["ended_at"] is not None
            assert await deletion is not None
    finally:
        await pool.release(voting)


async def test_deleting_a_message_while_its_pod_is_deleted_does_both(make: Factory, xp_store):
    """The message's deletion held the message and then wanted the room's sequence; the pod's deletion held the
    room and waited for the message."""
    pool, redis = xp_store
    cid, tid, by = await _course(pool, make)
    async with pool.acquire() as conn:
        pid = await conn.fetchval("INSERT INTO pods (course_id, name) VALUES ($1, 'p') RETURNING id", cid)
    room = f"pod:{pid}"
    posted = await messages.post_message(pool, redis, room, None, "hello")
    holding = await pool.acquire()
    tx = holding.transaction()
    await tx.start()
    try:  # the message's deletion waits where it rewrites the stored event (after the message, before the seq)
        await holding.execute("SELECT 1 FROM room_events WHERE room_id = $1 FOR UPDATE", room)
        removal = asyncio.create_task(messages.delete_message(pool, redis, room, posted.event.id, by, True))
        await asyncio.sleep(0.3)
        async with pool.acquire() as conn:
            pod_gone = asyncio.create_task(pods.delete_pod(conn, pid))
            await asyncio.sleep(0.3)
            await tx.commit()
            await removal
            await pod_gone
    finally:
        await pool.release(holding)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM pods WHERE id = $1", pid) == 0


async def test_a_tutor_question_posted_while_its_course_is_deleted_is_gone(make: Factory, xp_store):
    """The question took the room's sequence, then its answer's hold (a row of the course's) waited for the
    course row the deletion held, whose cascade waited for the room."""
    from store import tutor

    pool, redis = xp_store
    cid, tid, by = await _course(pool, make)
    learner = make.user("learner")
    room = f"course:{cid}"
    await messages.post_message(pool, redis, room, None, "welcome")  # the room's row exists
    deleting = await pool.acquire()
    tx = deleting.transaction()
    await tx.start()
    try:
        await deleting.execute("SELECT 1 FROM courses WHERE id = $1 FOR UPDATE", cid)
        ask = asyncio.create_task(messages.post_message(
            pool, redis, room, learner.id, "@tutor why?",
            also=lambda conn, mid: tutor.hold(conn, "proc-x", learner.id, cid, room, mid)))
        await asyncio.sleep(0.5)
        await deleting.execute("DELETE FROM courses WHERE id = $1", cid)
        await tx.commit()
    finally:
        await pool.release(deleting)
    with pytest.raises(LookupError):
        await ask


async def test_deleting_a_video_while_it_is_re_ingested_does_both(make: Factory, xp_store):
    """The video's deletion locks its course row (to wait for progress reports under way): exclusively (FOR
    UPDATE) it also blocked the course key a re-ingest's new job row checks, while the re-ingest held the video
    the deletion needed: a deadlock."""
    from store import videos

    pool, redis = xp_store
    cid, tid, by = await _course(pool, make)
    async with pool.acquire() as conn:
        vid = await conn.fetchval("INSERT INTO videos (course_id, title, source, duration_s, status) VALUES "
                                  "($1, 'v', 'transcript', 10, 'ready') RETURNING id", cid)
    asking = await pool.acquire()
    tx = asking.transaction()
    await tx.start()
    try:  # as ingest.submit.submit_job: the video, then the job
        await asking.execute("SELECT id FROM videos WHERE id = $1 FOR NO KEY UPDATE", vid)
        async with pool.acquire() as conn:
            deleting = asyncio.create_task(videos.delete_video(conn, redis, cid, vid))
            await asyncio.sleep(0.5)
            await asking.execute("INSERT INTO jobs (kind, course_id, video_id) VALUES ('ingest', $1, $2)", cid, vid)
            await tx.commit()
            assert await deleting
    finally:
        await pool.release(asking)
