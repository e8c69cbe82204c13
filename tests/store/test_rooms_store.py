"""The store layer of realtime rooms against the session's real Postgres and Redis: sequencing under
concurrency, publish-after-commit, posting from a worker, presence scripts, the send token bucket."""
from __future__ import annotations

import asyncio
import uuid

import msgspec
import pytest
from redis.asyncio import Redis

from store import events
from store import presence as presence_module
from store.db import create_pool
from store.events import UserRef
from store.keys import events_channel
from store.messages import Refused, delete_message, edit_message, post_message
from store.presence import Presence
from store.ratelimit import SendLimiter
from store.rooms import access, events_after, sequenced


@pytest.fixture
async def db(settings):
    pool = await create_pool(settings.database_url, min_size=1, max_size=12)
    redis = Redis.from_url(settings.redis_url)
    yield pool, redis
    await redis.aclose()
    await pool.close()


async def _course(pool) -> tuple[int, int, str]:  # type: ignore[no-untyped-def]
    """(tenant, learner enrolled in a new course, course room id)."""
    async with pool.acquire() as conn:
        tid = await conn.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"s-{uuid.uuid4().hex[:8]}")
        owner = await conn.fetchval("INSERT INTO users (tenant_id, name, role) VALUES ($1, 'o', 'instructor') RETURNING id",
                                    tid)
        learner = await conn.fetchval("INSERT INTO users (tenant_id, name, role) VALUES ($1, 'l', 'learner') RETURNING id",
                                      tid)
        cid = await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'c') RETURNING id",
                                  tid, owner)
        await conn.execute("INSERT INTO enrollments (course_id, user_id) VALUES ($1, $2)", cid, learner)
    return tid, learner, f"course:{cid}"


async def test_worker_posts_and_publishes_after_commit(db):
    pool, redis = db
    _, learner, room = await _course(pool)
    sub = redis.pubsub()
    await sub.subscribe(events_channel(events.room_topic(room)))
    await sub.get_message(timeout=1)  # subscribe confirmation
    posted = await post_message(pool, redis, room, None, "Eigenvectors keep their direction [12:04].",
                                {"citations": [{"video_id": 1, "start_s": 724.0}], "grounded": True}, "ans-1")
    assert posted.created and posted.event.author == UserRef(id=None, name="Tutor", role="tutor")
    msg = await sub.get_message(timeout=2)
    assert msg["data"] == posted.payload
    ev = events.decode(msg["data"])
    assert isinstance(ev, events.MessageNew) and ev.meta["grounded"] is True and ev.seq == 1
    # the same job run twice leaves one message
    again = await post_message(pool, redis, room, None, "different text", {}, "ans-1")
    assert not again.created and again.event == posted.event
    async with pool.acquire() as conn:
        assert [s for s, _ in await events_after(conn, room, 0, 10)] == [1]
    # nothing is published when the transaction fails
    with pytest.raises(RuntimeError):
        async with sequenced(pool, redis) as box:
            await box.append(room, lambda seq: events.LiveStarted(seq=seq, room=room, session_id=1,
                                                                   at=posted.event.created_at))
            raise RuntimeError("boom")
    assert await sub.get_message(timeout=0.3) is None
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT last_seq FROM rooms WHERE id = $1", room) == 1
        # publishing must follow the commit, so an open transaction is refused
        async with conn.transaction():
            with pytest.raises(RuntimeError):
                await post_message(conn, redis, room, learner, "x")
    await sub.aclose()


async def test_concurrent_posts_get_consecutive_seqs(db):
    pool, redis = db
    _, learner, room = await _course(pool)

    async def one(i: int):  # type: ignore[no-untyped-def]
        return await post_message(pool, redis, room, learner, f"m{i % 20}", None, f"c{i % 20}")

    results = await asyncio.gather(*(one(i) for i in range(60)))
    created = [r for r in results if r.created]
    assert len(created) == 20  # 20 distinct client_msg_ids
    by_cmid = {r.event.client_msg_id: r.event.id for r in created}
    assert all(by_cmid[r.event.client_msg_id] == r.event.id for r in results)
    async with pool.acquire() as conn:
        rows = await events_after(conn, room, 0, 100)
    assert [s for s, _ in rows] == list(range(1, 21))
    assert sorted(msgspec.json.decode(p)["seq"] for _, p in rows) == list(range(1, 21))
    # an id racing with another text: one is stored, the others are refused (none dropped silently)
    raced = await asyncio.gather(*(post_message(pool, redis, room, learner, f"race {i}", None, "r")
                                   for i in range(8)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) and r.created for r in raced) == 1
    assert all(isinstance(r, Refused) and r.code == "idempotency_key_reused" for r in raced
               if isinstance(r, BaseException)) and sum(isinstance(r, Refused) for r in raced) == 7, raced


async def test_times_rise_with_seq_under_concurrent_posts_and_edits(db):
    """(Tester) a message's `created_at` was its transaction's start, taken before it waited for the room's seq:
    concurrent senders' times went backwards down the history (6 of 39 pairs); two racing edits likewise left the
    later edit with the earlier `edited_at`."""
    pool, redis = db
    _, learner, room = await _course(pool)
    for _ in range(3):
        await asyncio.gather(*(post_message(pool, redis, room, learner, f"m{i}", None, uuid.uuid4().hex)
                               for i in range(30)))
    first = await post_message(pool, redis, room, learner, "to edit", None, "e")
    edits = await asyncio.gather(*(edit_message(pool, redis, room, first.event.id, learner, f"edit {i}")
                                   for i in range(12)))
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT seq, created_at FROM messages WHERE room_id = $1 ORDER BY seq", room)
    assert len(rows) == 91
    assert all(a["created_at"] <= b["created_at"] for a, b in zip(rows, rows[1:]))
    ordered = sorted(edits, key=lambda e: e.seq)
    assert all(a.edited_at <= b.edited_at for a, b in zip(ordered, ordered[1:]))


async def test_delete_redacts_stored_events_and_mute_refuses(db):
    pool, redis = db
    _, learner, room = await _course(pool)
    posted = await post_message(pool, redis, room, learner, "secret")
    await delete_message(pool, redis, room, posted.event.id, learner, moderator=False)
    async with pool.acquire() as conn:
        (s1, p1), (s2, p2) = await events_after(conn, room, 0, 10)
        assert "secret" not in p1 and msgspec.json.decode(p1)["deleted"] is True
        assert msgspec.json.decode(p2)["type"] == "message.deleted"
        await conn.execute("INSERT INTO room_mutes (room_id, user_id, until) VALUES ($1, $2, now() + interval '1 min')",
                           room, learner)
    with pytest.raises(Refused) as info:
        await post_message(pool, redis, room, learner, "hi")
    assert info.value.code == "muted"


async def test_access_rules(db):
    pool, _ = db
    tid, learner, room = await _course(pool)
    async with pool.acquire() as conn:
        assert (await access(conn, room, learner, tid, "learner")) is not None
        assert (await access(conn, room, learner, tid + 10_000, "learner")) is None  # wrong tenant
        owner = await conn.fetchval("SELECT owner_id FROM courses WHERE id = $1", int(room.split(":")[1]))
        other, bot_id = [await conn.fetchval("INSERT INTO users (tenant_id, name, role) VALUES ($1, $2, $2) "
                                             "RETURNING id", tid, role) for role in ("learner", "bot")]
        assert (await access(conn, room, other, tid, "learner")) is None  # not enrolled
        assert (await access(conn, room, 0, tid, "instructor")) is None  # no such user: the role is the stored one
        staff = await access(conn, room, owner, tid, "instructor")
        assert staff is not None and staff.moderator
        bot = await access(conn, room, bot_id, tid, "bot")
        assert bot is not None and not bot.moderator
        for bad in ("course:0", "course:abc", "room:1", "pod:", "live:1:2", ""):
            assert (await access(conn, bad, learner, tid, "admin")) is None


async def test_presence_across_procs_and_expiry(db):
    _, redis = db
    room = f"course:p{uuid.uuid4().hex[:6]}"
    ada = UserRef(id=1, name="ada | lovelace", role="learner")
    p1, p2 = Presence(redis, "proc-1", ttl_s=1), Presence(redis, "proc-2", ttl_s=1)
    assert (await p1.join(room, ada)).changed
    assert not (await p2.join(room, ada)).changed  # already online through proc-1
    count, online = await p2.online(room, 10)
    assert count == 1 and online == [ada]
    assert not (await p1.leave(room, ada)).changed  # still on proc-2
    # proc-2 dies: no heartbeat; after the TTL two sweepers race and exactly one reports the leave
    await asyncio.sleep(1.2)
    (left_a, _), (left_b, _) = await asyncio.gather(p1.sweep(room), p2.sweep(room))
    assert left_a + left_b == [ada]
    assert await p1.online(room, 10) == (0, [])
    # a heartbeat keeps a user online past the TTL
    await p1.join(room, ada)
    for _ in range(3):
        await asyncio.sleep(0.4)
        assert await p1.heartbeat([(room, ada)]) == []
    assert (await p1.sweep(room))[0] == [] and (await p1.online(room, 10))[0] == 1
    assert (await p1.leave(room, ada)).changed


async def test_send_token_bucket(db):
    _, redis = db
    limiter = SendLimiter(redis, rate=10, burst=3)
    uid = int(uuid.uuid4().int % 10**9)
    results = [await limiter.take(uid) for _ in range(4)]
    assert [ok for ok, _ in results] == [True, True, True, False] and 0 < results[-1][1] <= 0.2
    await asyncio.sleep(0.15)
    assert (await limiter.take(uid))[0]


async def test_a_dead_process_handed_back_is_handed_out_again(db, monkeypatch):
    """A reaper whose Postgres clean-up fails gives the dead process back: the next reaper gets it (once), and a
    process that came back to life meanwhile is not marked dead again."""
    _, redis = db
    # a process list of this test's own: the running test servers reap the shared one every tick
    monkeypatch.setattr(presence_module, "PROCS", f"sh:test:procs:{uuid.uuid4().hex[:8]}")
    dead = f"proc-dead-{uuid.uuid4().hex[:6]}"
    gone, reaper = Presence(redis, dead, ttl_s=1), Presence(redis, "proc-reaper", ttl_s=1)
    await gone.heartbeat([])
    await asyncio.sleep(1.2)
    assert await reaper.expired_procs() == [dead]
    claimed = [(p, at) for p, at in await reaper.dead_procs([dead]) if p == dead]
    assert len(claimed) == 1 and [p for p, _ in await reaper.dead_procs([dead])].count(dead) == 0
    await reaper.return_dead(*claimed[0])
    assert [p for p, _ in await reaper.dead_procs([dead])].count(dead) == 1
    await reaper.return_dead(*claimed[0])
    await gone.heartbeat([])  # alive again before anyone reaped it: it is not dead any more
    await reaper.return_dead(*claimed[0])  # a late give-back does not kill it
    assert dead not in [p for p, _ in await reaper.dead_procs([dead])] and await reaper.expired_procs() == []
    await gone.forget_proc()
