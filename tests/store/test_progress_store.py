"""Progress reports stored straight through the store (as the API does), concurrently for one learner."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from store import progress, xp
from tests.conftest import Factory
from tests.progress_helpers import xp_store  # noqa: F401 - fixture


async def _video(pool, user, duration: float = 100.0) -> dict:  # type: ignore[no-untyped-def]
    async with pool.acquire() as conn:
        owner = await conn.fetchval("INSERT INTO users (tenant_id, name, role) VALUES ($1, $2, 'instructor') "
                                    "RETURNING id", user.tenant_id, f"instructor of {user.name}")
        cid = await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'c') RETURNING id",
                                  user.tenant_id, owner)
        await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", cid, user.id)
        rows = [await conn.fetchrow("INSERT INTO videos (course_id, title, source, duration_s, status) VALUES "
                                    "($1, $2, 'transcript', $3, 'ready') RETURNING *", cid, f"v{i}", duration)
                for i in range(2)]
    return {"course_id": cid, "videos": [dict(r) for r in rows]}


async def _report(pool, redis, user, video, watched, at=None):  # type: ignore[no-untyped-def]
    position, clean = progress.check_report(float(video["duration_s"]), 0, watched)
    async with xp.transaction(pool, redis) as tx:
        return await progress.report(tx, user.id, "learner", video, position, clean, 0.9, at=at)


def test_a_tail_range_past_the_end_adds_nothing():
    # inside the tolerance past the end: accepted, clamped, and never an inverted range
    assert progress.check_report(100.0, 100.2, [[100.1, 100.4], [90, 100.3]]) == (100.0, [[90.0, 100.0]])


async def test_concurrent_first_reports_keep_every_range(make: Factory, xp_store):
    pool, redis = xp_store
    u = make.user("learner")
    c = await _video(pool, u)
    v = c["videos"][0]
    parts = [[[i * 10, i * 10 + 5]] for i in range(8)]
    await asyncio.gather(*[_report(pool, redis, u, v, p) for p in parts])
    async with pool.acquire() as conn:
        row = await progress.video_progress(conn, u.id, v["id"])
    assert [list(r) for r in row["watched"]] == [p[0] for p in parts]
    assert row["watched_s"] == 40


async def test_completing_and_first_of_day_reports_do_not_deadlock(make: Factory, xp_store):
    pool, redis = xp_store
    for _ in range(5):
        u = make.user("learner")
        c = await _video(pool, u)
        v1, v2 = c["videos"]
        yesterday = datetime.now(timezone.utc) - timedelta(days=1)
        await _report(pool, redis, u, v1, [[0, 50]], at=yesterday)
        # one report completes v1 (lesson XP, then the streak), the other is today's first activity on v2
        # (the streak and its XP): both commit
        done, other = await asyncio.gather(_report(pool, redis, u, v1, [[50, 100]]),
                                           _report(pool, redis, u, v2, [[0, 5]]))
        assert done.completed_now and not other.completed_now
        async with pool.acquire() as conn:
            kinds = {r["kind"] for r in await conn.fetch("SELECT kind FROM xp_events WHERE user_id = $1", u.id)}
        assert {"lesson_completed", "first_lesson", "daily_streak"} <= kinds


async def test_a_report_read_before_a_re_ingest_shortened_the_video_is_cut_to_the_new_length(make: Factory,
                                                                                            xp_store):
    """The report checked its ranges against the length it read before the re-ingest committed, waited for the
    re-ingest's cut, then stored ranges past the new end."""
    pool, redis = xp_store
    u = make.user("learner")
    v = (await _video(pool, u))["videos"][0]  # 100 s, as the report reads it
    await _report(pool, redis, u, v, [[0, 40]])
    done = await _report_behind_re_ingest(pool, redis, u, v, [[40, 80]], 30.0)
    assert done.row["watched"] == [[0.0, 30.0]] and done.row["watched_s"] == 30.0, dict(done.row)


async def _report_behind_re_ingest(pool, redis, u, v, watched, duration: float):  # type: ignore[no-untyped-def]
    """A report of `watched` (checked against the video as `v` has it) that waits for a re-ingest making the video
    `duration` long (its progress fitted to it) and then is stored."""
    ingest = await pool.acquire()
    tx = ingest.transaction()
    await tx.start()
    try:  # the re-ingest, not committed yet
        await ingest.execute("SELECT 1 FROM videos WHERE id = $1 FOR UPDATE", v["id"])
        await ingest.execute("UPDATE videos SET duration_s = $2 WHERE id = $1", v["id"], duration)
        await progress.fit_to_duration(xp.XpTransaction(ingest), v["id"], duration, 0.9)
        late = asyncio.create_task(_report(pool, redis, u, v, watched))
        await asyncio.sleep(0.5)
        assert not late.done()  # it waits for the re-ingest
        await tx.commit()
    finally:
        await pool.release(ingest)
    return await late


async def _kinds(pool, user_id: int) -> list[str]:  # type: ignore[no-untyped-def]
    async with pool.acquire() as conn:
        return sorted(r["kind"] for r in await conn.fetch("SELECT kind FROM xp_events WHERE user_id = $1", user_id))


async def test_a_first_report_racing_the_course_deletion_is_not_found_not_a_deadlock(make: Factory, xp_store):
    """The report locked the video, then its new row's key check waited for the course row, which the deletion
    held while its cascade waited for the video: a deadlock, a 500 for one of the two."""
    pool, redis = xp_store
    u = make.user("learner")
    c = await _video(pool, u)
    deleting = await pool.acquire()
    tx = deleting.transaction()
    await tx.start()
    try:  # as store.courses.delete_course: the course row, then the delete
        await deleting.execute("SELECT 1 FROM courses WHERE id = $1 FOR UPDATE", c["course_id"])
        late = asyncio.create_task(_report(pool, redis, u, c["videos"][0], [[0, 10]]))
        await asyncio.sleep(0.5)
        await deleting.execute("DELETE FROM courses WHERE id = $1", c["course_id"])
        await tx.commit()
    finally:
        await pool.release(deleting)
    try:
        await late
        raise AssertionError("stored a report on a deleted course")
    except progress.Gone:
        pass
    assert await _kinds(pool, u.id) == []


async def test_a_report_finishing_the_course_while_its_last_other_video_is_deleted_earns_the_course(
        make: Factory, xp_store):
    """The report read the other video as still there (its deletion not committed), the deletion's catch-up ran
    before the report committed: neither awarded `course_completed`."""
    pool, redis = xp_store
    from store import videos

    u = make.user("learner")
    c = await _video(pool, u)
    v1, v2 = c["videos"]
    await _report(pool, redis, u, v1, [[0, 50]], at=datetime.now(timezone.utc) - timedelta(days=1))
    h1, h2 = await pool.acquire(), await pool.acquire()
    t1, t2 = h1.transaction(), h2.transaction()
    await t1.start()
    await t2.start()
    try:
        # hold the deletion after it deleted v2 (at the course's search statistics it recounts next)...
        await h1.execute(videos._TERMS_LOCK, c["course_id"])
        # ...and the report after its course check (at its streak), until the deletion has committed
        await h2.execute("SELECT 1 FROM streaks WHERE user_id = $1 FOR UPDATE", u.id)
        async with pool.acquire() as conn:
            deletion = asyncio.create_task(videos.delete_video(conn, redis, c["course_id"], v2["id"]))
            await asyncio.sleep(0.3)
            finishing = asyncio.create_task(_report(pool, redis, u, v1, [[50, 100]]))
            await asyncio.sleep(0.5)
            await t1.commit()
            assert await deletion
            await asyncio.sleep(0.2)
            await t2.commit()
            await finishing
    finally:
        await pool.release(h1)
        await pool.release(h2)
    assert await _kinds(pool, u.id) == ["course_completed", "daily_streak", "daily_streak", "first_lesson",
                                        "lesson_completed"]


async def test_a_re_ingest_that_shortens_a_video_completes_it_for_who_watched_enough_and_cuts_bookmarks(make: Factory, xp_store):
    """45 s of 100 watched; the video is 50 s now: 90 % of it, complete, with its XP (and the course's)."""
    pool, redis = xp_store
    u, other = make.user("learner"), make.user("learner")
    c = await _video(pool, u)
    v1, v2 = c["videos"]
    await _report(pool, redis, u, v2, [[0, 100]])
    await _report(pool, redis, u, v1, [[0, 45]])
    gone = make.user("learner")  # watched as much, then left the course: the completion, but no XP
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", c["course_id"], gone.id)
    await _report(pool, redis, gone, v1, [[0, 45]])
    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM enrollments WHERE user_id = $1", gone.id)
        for at in (20.0, 80.0):
            await progress.add_bookmark(conn, u.id, v1["id"], at, f"at {at:g}")
    async with pool.acquire() as conn:
        await conn.execute("UPDATE videos SET course_id = $1 WHERE id = $2", c["course_id"], v1["id"])
    async with xp.transaction(pool, redis) as tx:
        await tx.conn.execute("UPDATE videos SET duration_s = 50 WHERE id = $1", v1["id"])
        await progress.fit_to_duration(tx, v1["id"], 50.0, 0.9)
    assert [a.kind for a in tx.awards] == ["lesson_completed", "course_completed"]
    async with pool.acquire() as conn:
        row = await progress.video_progress(conn, u.id, v1["id"])
    assert row["completed_at"] is not None and row["watched_s"] == 45
    async with pool.acquire() as conn:  # a bookmark past the new end marks the end, with its note
        marks = await progress.list_bookmarks(conn, u.id, v1["id"])
    assert [(m["at_s"], m["note"]) for m in marks] == [(20.0, "at 20"), (50.0, "at 80")]
    assert await _kinds(pool, u.id) == ["course_completed", "daily_streak", "first_lesson", "lesson_completed",
                                        "lesson_completed"]
    assert await _kinds(pool, other.id) == []
    assert await _kinds(pool, gone.id) == ["daily_streak"]
    async with pool.acquire() as conn:  # back in the course, their next report completes it, with its XP
        assert (await progress.video_progress(conn, gone.id, v1["id"]))["completed_at"] is None
        await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", c["course_id"], gone.id)
    v1 = {**v1, "duration_s": 50.0}
    await _report(pool, redis, gone, v1, [[0, 1]])
    assert "lesson_completed" in await _kinds(pool, gone.id)


async def test_a_report_takes_its_time_once_it_is_the_learners_turn(make: Factory, xp_store):
    """Two reports straddling the learner's midnight, the later one stored first: the earlier one's time must not
    be older than what is stored (its day looked missed, the streak broken)."""
    pool, redis = xp_store
    u = make.user("learner")
    v = (await _video(pool, u))["videos"][0]
    holder = await pool.acquire()
    tx = holder.transaction()
    await tx.start()
    try:  # another report of the learner's, under way
        await holder.execute(progress._LEARNER_LOCK, u.id)
        waiting = asyncio.create_task(_report(pool, redis, u, v, [[0, 10]]))
        await asyncio.sleep(0.5)
        released = datetime.now(timezone.utc)
        await tx.commit()
    finally:
        await pool.release(holder)
    done = await waiting
    assert done.row["updated_at"] >= released


async def test_a_report_sent_again_adds_no_time_but_a_late_earlier_one_does(make: Factory, xp_store):
    """The same player's report with the seq already stored is that report again (its response lost): its ranges
    merge as before and its seconds are not counted twice. A lower seq arriving late was never counted."""
    pool, redis = xp_store
    u = make.user("learner")
    v = (await _video(pool, u, duration=600.0))["videos"][0]
    t0 = datetime.now(timezone.utc)

    async def send(watched: list, seq: int, at: datetime):  # type: ignore[no-untyped-def]
        position, clean = progress.check_report(600.0, watched[-1][1], watched)
        async with xp.transaction(pool, redis) as tx:
            return (await progress.report(tx, u.id, "learner", v, position, clean, 0.9, at=at, player="tab-1",
                                          seq=seq)).row

    assert (await send([[100, 110]], 7, t0))["time_spent_s"] == 10
    again = await send([[100, 110]], 7, t0 + timedelta(seconds=1))
    assert again["time_spent_s"] == 10 and again["watched"] == [[100.0, 110.0]]
    assert (await send([[110, 120]], 8, t0 + timedelta(seconds=11)))["time_spent_s"] == 20
    late = await send([[90, 100]], 6, t0 + timedelta(seconds=12))  # sent before 7, arriving now: counted
    assert late["time_spent_s"] == 30 and late["position_s"] == 120 and late["watched"] == [[90.0, 120.0]]
    # (tester) a report sent again moved the clock the next report's time is capped by: 20 s watched after a retry
    # half a second before counted 10.5
    assert (await send([[120, 140]], 9, t0 + timedelta(seconds=31)))["time_spent_s"] == 50
    assert (await send([[120, 140]], 9, t0 + timedelta(seconds=50.5)))["time_spent_s"] == 50
    assert (await send([[140, 160]], 10, t0 + timedelta(seconds=51)))["time_spent_s"] == 70


async def test_a_report_that_waited_out_a_re_ingest_making_the_video_longer_is_a_share_of_the_new_length(
        make: Factory, xp_store):
    """The report read the video as 100 s; a re-ingest made it 1,000 s while the report waited: 95 s watched is
    not 90 % of it (it completed the lesson, with XP, at a tenth watched)."""
    pool, redis = xp_store
    u = make.user("learner")
    v = (await _video(pool, u))["videos"][0]  # 100 s, as the report reads it
    done = await _report_behind_re_ingest(pool, redis, u, v, [[0, 95]], 1000.0)
    assert not done.completed_now and done.row["completed_at"] is None and done.duration == 1000.0
    assert "lesson_completed" not in await _kinds(pool, u.id)


def test_a_video_completes_at_its_share_give_or_take_a_hair():
    """At a share of 1, a player whose media ends a fraction of a second before the stored length (600.0 of
    600.04 s) could never complete the video."""
    assert progress.completes_at(1.0, 600.04) <= 600.0
    assert progress.completes_at(0.9, 600.0) == 540.0 - 0.5
    assert 0 < progress.completes_at(1.0, 2.0) < 2.0 and progress.completes_at(1.0, 0.3) > 0.29  # short videos
