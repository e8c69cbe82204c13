"""Live sessions (room `live:<id>`): schedule, start, end; attendance; polls with one changeable vote each."""
from __future__ import annotations

import logging
from datetime import datetime

import asyncpg
from redis.asyncio import Redis

from store.events import LiveEnded, LiveStarted, PollClosed, PollInfo, PollOpened, PollResults
from store import moderation, rooms
from store.messages import ACCESS_REVOKED, INVALID_STATE, REUSED, Refused
from store.rooms import RoomGone, lock_room, sequenced

logger = logging.getLogger(__name__)

_SESSION = "s.id, s.course_id, s.title, s.scheduled_at, s.started_at, s.ended_at, s.created_by, s.created_at"


def room_of(session_id: int) -> str:
    return f"live:{session_id}"


def state_of(row: asyncpg.Record) -> str:
    if row["ended_at"] is not None:
        return "ended"
    return "live" if row["started_at"] is not None else "scheduled"


# --- sessions ------------------------------------------------------------------------------------------

async def create_session(conn: asyncpg.Connection, course_id: int, title: str, scheduled_at: datetime | None,
                         by: int) -> asyncpg.Record:
    return await conn.fetchrow(
        f"""INSERT INTO live_sessions AS s (course_id, title, scheduled_at, created_by) VALUES ($1, $2, $3, $4)
            RETURNING {_SESSION}""", course_id, title, scheduled_at, by)


async def session_in_tenant(conn: asyncpg.Connection, session_id: int, tenant_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"""SELECT {_SESSION} FROM live_sessions s JOIN courses c ON c.id = s.course_id
            WHERE s.id = $1 AND c.tenant_id = $2""", session_id, tenant_id)


async def list_sessions(conn: asyncpg.Connection, course_id: int, *,
                        limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""SELECT {_SESSION} FROM live_sessions s WHERE s.course_id = $1
            ORDER BY coalesce(s.scheduled_at, s.created_at), s.id LIMIT $2 OFFSET $3""", course_id, limit, offset)


async def _lock_room(conn: asyncpg.Connection, session_id: int) -> None:
    """The session room's row before the session's or its polls' (see `store.rooms.lock_room`)."""
    try:
        await lock_room(conn, room_of(session_id))
    except RoomGone:
        raise Refused("not_found", f"live session {session_id} not found") from None


async def start_session(db: asyncpg.Pool, redis: Redis, session_id: int) -> asyncpg.Record:
    """scheduled → live; publishes `live.started`. Refused(INVALID_STATE) from any other state."""
    async with sequenced(db, redis) as box:
        await _lock_room(box.conn, session_id)
        row = await box.conn.fetchrow(
            f"""UPDATE live_sessions s SET started_at = now() WHERE id = $1 AND started_at IS NULL AND ended_at IS NULL
                RETURNING {_SESSION}""", session_id)
        if row is None:
            await _gone(box.conn, "live_sessions", session_id, "live session")
            raise Refused(INVALID_STATE, "the session has already started or ended")
        room = room_of(session_id)
        await box.append(room, lambda seq: LiveStarted(seq=seq, room=room, session_id=session_id,
                                                       at=row["started_at"]))
    return row


async def end_session(db: asyncpg.Pool, redis: Redis, session_id: int, reason: str | None = None) -> asyncpg.Record:
    """live → ended; closes open polls and publishes their final counts, then `live.ended` (with `reason` when
    it ended by itself: see `end_forgotten`)."""
    async with sequenced(db, redis) as box:
        await _lock_room(box.conn, session_id)
        row = await box.conn.fetchrow(
            f"""UPDATE live_sessions s SET ended_at = now() WHERE id = $1 AND started_at IS NOT NULL
                AND ended_at IS NULL RETURNING {_SESSION}""", session_id)
        if row is None:
            await _gone(box.conn, "live_sessions", session_id, "live session")
            raise Refused(INVALID_STATE, "the session is not live")
        room = room_of(session_id)
        for poll_id in await box.conn.fetch(
                "UPDATE polls SET closed_at = now() WHERE session_id = $1 AND closed_at IS NULL RETURNING id",
                session_id):
            await _append_closed(box, room, poll_id["id"])
        await box.append(room, lambda seq: LiveEnded(seq=seq, room=room, session_id=session_id, at=row["ended_at"],
                                                     reason=reason))
    return row


async def end_forgotten(db: asyncpg.Pool, redis: Redis, idle_min: int, max_hours: int, limit: int = 100) -> list[int]:
    """End the live sessions staff left running: for `idle_min` minutes nobody present (no socket open in the
    room, none closed since) and nothing in the room (no message, poll or vote, also a vote for the option the
    voter had, which changes no counts and so makes no room event), or `max_hours` after the start
    (each 0: never). Their open polls close with their final counts; `live.ended` says why. The ids ended."""
    rows = await db.fetch(
        """SELECT s.id, CASE WHEN $2 > 0 AND s.started_at < now() - make_interval(hours => $2) THEN 'max_length'
                             ELSE 'idle' END AS reason
           FROM live_sessions s
           WHERE s.started_at IS NOT NULL AND s.ended_at IS NULL
             AND (($2 > 0 AND s.started_at < now() - make_interval(hours => $2))
                  OR ($1 > 0 AND s.started_at < now() - make_interval(mins => $1)
                      AND NOT EXISTS (SELECT 1 FROM live_attendance a WHERE a.session_id = s.id
                                          AND (a.left_at IS NULL OR a.left_at > now() - make_interval(mins => $1)))
                      AND NOT EXISTS (SELECT 1 FROM (SELECT e.created_at FROM room_events e
                                                     WHERE e.room_id = 'live:' || s.id ORDER BY e.seq DESC LIMIT 1) last
                                      WHERE last.created_at > now() - make_interval(mins => $1))
                      -- a vote that left the counts as they were (the same option again) makes no room event
                      AND NOT EXISTS (SELECT 1 FROM polls p JOIN poll_votes v ON v.poll_id = p.id
                                      WHERE p.session_id = s.id
                                        AND v.updated_at > now() - make_interval(mins => $1))))
           ORDER BY s.id LIMIT $3""", idle_min, max_hours, limit)
    ended = []
    for r in rows:
        try:
            await end_session(db, redis, r["id"], reason=r["reason"])
        except Refused:  # ended (or deleted) meanwhile: by staff, or by another worker
            continue
        except Exception:  # noqa: BLE001 - one that fails (a deadlock, Redis away) must not hold up the others
            logger.warning("could not end live session %s left running; next minute again", r["id"], exc_info=True)
            continue
        ended.append(r["id"])
    return ended


async def _gone(conn: asyncpg.Connection, table: str, row_id: int, what: str) -> None:
    """Refused("not_found") when the row no longer exists (deleted with its course, or cancelled, while the
    caller waited): a change that found nothing to change is invalid only when there was something there."""
    if not await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table} WHERE id = $1)", row_id):
        raise Refused("not_found", f"{what} {row_id} not found")


async def cancel_session(conn: asyncpg.Connection, session_id: int) -> None:
    """Delete a session that never started, with its room (messages posted while it was scheduled go too).
    Refused(INVALID_STATE) once it has started: a session that took place keeps its attendance and polls."""
    async with conn.transaction():
        await _lock_room(conn, session_id)
        started = await conn.fetchval("SELECT started_at FROM live_sessions WHERE id = $1 FOR UPDATE", session_id)
        if started is not None:
            raise Refused(INVALID_STATE, "only a session that has not started can be cancelled; end it instead")
        await conn.execute("DELETE FROM rooms WHERE id = $1", room_of(session_id))
        await conn.execute("DELETE FROM live_sessions WHERE id = $1", session_id)


# --- attendance ----------------------------------------------------------------------------------------

async def attendance_join(conn: asyncpg.Connection, session_id: int, user_id: int, proc_id: str) -> int:
    return await conn.fetchval(
        "INSERT INTO live_attendance (session_id, user_id, proc_id) VALUES ($1, $2, $3) RETURNING id",
        session_id, user_id, proc_id)


async def attendance_leave(conn: asyncpg.Connection, attendance_id: int, at: datetime | None = None) -> None:
    """Close the row at `at` (default now): a retried close keeps the moment the socket closed."""
    await conn.execute("UPDATE live_attendance SET left_at = greatest(joined_at, coalesce($2, now())) "
                       "WHERE id = $1 AND left_at IS NULL", attendance_id, at)


async def attendance_close_proc(conn: asyncpg.Connection, proc_id: str, at: datetime | None = None,
                                ago_s: float = 0.0) -> int:
    """Close the open rows of a server process that died (or stops), at its last sign of life: `at`, else the
    database's now() less `ago_s` seconds."""
    result = await conn.execute(
        "UPDATE live_attendance SET left_at = greatest(joined_at, coalesce($2, now() - make_interval(secs => $3))) "
        "WHERE proc_id = $1 AND left_at IS NULL", proc_id, at, ago_s)
    return int(result.split()[-1])


async def attendance_reopen(conn: asyncpg.Connection, proc_id: str, attendance_ids: list[int],
                            closed_before_s: float) -> list[int]:
    """Reopen rows of this process's open sockets that another process closed, taking it for dead (its heartbeats
    could not reach Redis for a while, its sockets stayed open): their rows closed at least `closed_before_s` ago.
    A row its own socket closed just now (at the database's now) is not one of them."""
    if not attendance_ids:
        return []
    return [r["id"] for r in await conn.fetch(
        """UPDATE live_attendance SET left_at = NULL WHERE id = ANY($2::bigint[]) AND proc_id = $1
           AND left_at IS NOT NULL AND left_at < now() - make_interval(secs => $3) RETURNING id""",
        proc_id, attendance_ids, closed_before_s)]


async def attendance_procs(conn: asyncpg.Connection, other_than: str) -> list[str]:
    """Server processes (but `other_than`) with attendance rows still open."""
    return [r["proc_id"] for r in await conn.fetch(
        "SELECT DISTINCT proc_id FROM live_attendance WHERE left_at IS NULL AND proc_id <> $1", other_than)]


async def attendance_report(conn: asyncpg.Connection, session_id: int, *,
                            limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    """Per user present while the session was live, from their connections that were open while it was live:
    first join, last leave (null while still there and the session live), how many, and the seconds present while
    live (overlapping connections count once); the join and leave within the live time (one waiting in the room
    before the start joined at the start, one still there at the end left at the end). Connections only before
    the start or after the end (reading the room) do not count; who only made those is not listed. A connection
    of no length while live counts (0 seconds): one opened after its server process's last heartbeat, the
    process then killed, is closed at its join."""
    return await conn.fetch(
        """WITH s AS (SELECT started_at, coalesce(ended_at, now()) AS ended_at, ended_at IS NULL AS live
                      FROM live_sessions WHERE id = $1),
           live AS (SELECT a.user_id, a.left_at IS NULL AND s.live AS here,
                           tstzrange(greatest(a.joined_at, s.started_at),
                                     least(coalesce(a.left_at, now()), s.ended_at), '[]') AS r
                    FROM live_attendance a, s
                    WHERE a.session_id = $1 AND s.started_at IS NOT NULL
                      AND greatest(a.joined_at, s.started_at) <= least(coalesce(a.left_at, now()), s.ended_at)),
           per AS (SELECT user_id, min(lower(r)) AS first_joined_at,
                          CASE WHEN bool_or(here) THEN NULL ELSE max(upper(r)) END AS last_left_at,
                          count(*) AS connections, range_agg(r) AS ranges
                   FROM live GROUP BY user_id)
           SELECT p.user_id, u.name, p.first_joined_at, p.last_left_at, p.connections,
                  coalesce((SELECT sum(extract(epoch FROM upper(x) - lower(x))) FROM unnest(p.ranges) x),
                           0)::float AS seconds_live
           FROM per p JOIN users u ON u.id = p.user_id AND u.role <> 'bot'  -- bridges are not attendees
           ORDER BY p.first_joined_at, p.user_id
           LIMIT $2 OFFSET $3""",
        session_id, limit, offset)


# --- polls ---------------------------------------------------------------------------------------------

def poll_info(row: asyncpg.Record) -> PollInfo:
    return PollInfo(id=row["id"], session_id=row["session_id"], question=row["question"],
                    options=list(row["options"]), closed=row["closed_at"] is not None)


MAX_POLLS_PER_SESSION = 200  # an explicit bound: a session ending closes and counts its open polls at once


async def create_poll(db: asyncpg.Pool, redis: Redis, session_id: int, question: str, options: list[str],
                      by: int, client_key: str | None = None) -> tuple[asyncpg.Record, bool]:
    """Open a poll in the session's room; publishes `poll.opened`. (the poll, made now). Refused(INVALID_STATE)
    before the session starts and once it ended. With `client_key` (an Idempotency-Key as stored) the poll that key
    opened, when there is one (made: False); Refused(REUSED) when it opened another question."""
    async with sequenced(db, redis) as box:
        await _lock_room(box.conn, session_id)  # (creations in a session one at a time: a twin waits, then finds it)
        if client_key is not None:
            done = await box.conn.fetchrow(
                """SELECT id, session_id, question, options, created_at, closed_at FROM polls
                   WHERE session_id = $1 AND client_key = $2""", session_id, client_key)
            if done is not None:
                if done["question"] != question or list(done["options"]) != options:
                    raise Refused(REUSED, "this Idempotency-Key opened another poll; use a new key for a new poll")
                return done, False
        s = await box.conn.fetchrow("SELECT started_at, ended_at FROM live_sessions WHERE id = $1 FOR UPDATE",
                                    session_id)
        if s is None:
            raise Refused("not_found", f"live session {session_id} not found")
        if s["ended_at"] is not None:
            raise Refused(INVALID_STATE, "the session has ended")
        if s["started_at"] is None:  # votes before it began; a session never started
            raise Refused(INVALID_STATE, "polls open once the session has started")  # cannot end to close them
        if await box.conn.fetchval("SELECT count(*) FROM polls WHERE session_id = $1",
                                   session_id) >= MAX_POLLS_PER_SESSION:
            raise Refused(INVALID_STATE, f"a session holds at most {MAX_POLLS_PER_SESSION} polls")
        row = await box.conn.fetchrow(
            """INSERT INTO polls (session_id, question, options, created_by, client_key) VALUES ($1, $2, $3, $4, $5)
               RETURNING id, session_id, question, options, created_at, closed_at""",
            session_id, question, options, by, client_key)
        room = room_of(session_id)
        await box.append(room, lambda seq: PollOpened(seq=seq, room=room, poll=poll_info(row)))
    return row, True


async def poll_in_tenant(conn: asyncpg.Connection, poll_id: int, tenant_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        """SELECT p.id, p.session_id, p.question, p.options, p.created_at, p.closed_at, s.course_id
           FROM polls p JOIN live_sessions s ON s.id = p.session_id JOIN courses c ON c.id = s.course_id
           WHERE p.id = $1 AND c.tenant_id = $2""", poll_id, tenant_id)


async def list_polls(conn: asyncpg.Connection, session_id: int, *,
                     limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT id, session_id, question, options, created_at, closed_at FROM polls WHERE session_id = $1
           ORDER BY id LIMIT $2 OFFSET $3""", session_id, limit, offset)


# A poll's votes per option (of `polls p`), as published and as the sweep for unpublished votes compares them
_COUNTS = """ARRAY(SELECT count(v.user_id)::int FROM generate_series(0, jsonb_array_length(p.options) - 1) AS o(i)
                   LEFT JOIN poll_votes v ON v.poll_id = p.id AND v.option = o.i GROUP BY o.i ORDER BY o.i)"""


async def counts(conn: asyncpg.Connection, poll_id: int) -> list[int]:
    return list(await conn.fetchval(f"SELECT {_COUNTS} FROM polls p WHERE p.id = $1", poll_id) or [])


async def my_vote(conn: asyncpg.Connection, poll_id: int, user_id: int) -> int | None:
    return await conn.fetchval("SELECT option FROM poll_votes WHERE poll_id = $1 AND user_id = $2", poll_id, user_id)


def check_voter(role: str) -> None:
    """Bots do not vote (see `vote`); checked before a vote spends its sender's budget too."""
    if role == "bot":
        raise Refused("forbidden", "bots do not vote in polls: each person votes for themselves")


async def vote(conn: asyncpg.Connection, poll_id: int, session_id: int | None, user_id: int, option: int,
               role: str) -> None:
    """One vote per user, changeable until the poll closes, while the voter may use the session's room (not
    removed from the course, not kicked; a mute does not stop a vote). `session_id`, when given, must be the
    poll's session (votes arrive through that session's room). Bots do not vote: a bridge's one vote would stand
    for everyone it relays (and any bot of the tenant could tip every poll)."""
    check_voter(role)
    async with conn.transaction():
        poll = await conn.fetchrow("SELECT session_id, options, closed_at FROM polls WHERE id = $1 FOR SHARE",
                                   poll_id)
        if poll is None or (session_id is not None and poll["session_id"] != session_id):
            raise Refused("not_found", f"poll {poll_id} not found in this session")
        # as for a post: a socket whose close on a removal or kick was lost (or a REST vote racing one) is refused
        room = room_of(poll["session_id"])
        if not await rooms.allowed(conn, rooms.RoomRef("live", poll["session_id"]), user_id):
            raise Refused(ACCESS_REVOKED, "you no longer have access to this room")
        if await moderation.kicked_until(conn, room, user_id) is not None:
            raise Refused("kicked", "you are barred from this room")
        if poll["closed_at"] is not None:
            raise Refused("poll_closed", "the poll is closed")
        if option >= len(poll["options"]):
            raise Refused("bad_option", f"option must be between 0 and {len(poll['options']) - 1}")
        # (stamped when written, the transaction's last statement: its commit follows at once; now() is when the
        # transaction began, which a slow one left well before)
        await conn.execute(
            """INSERT INTO poll_votes (poll_id, user_id, option, updated_at) VALUES ($1, $2, $3, clock_timestamp())
               ON CONFLICT (poll_id, user_id) DO UPDATE SET option = EXCLUDED.option, updated_at = clock_timestamp()""",
            poll_id, user_id, option)


UNPUBLISHED_AFTER_S = 2.0  # a vote this old whose counts never went out is published by whoever sweeps
# How long before the last published counts a vote may be stamped and still have missed them: it committed after
# that publisher counted (votes are stamped as written, and commit at once)
COUNTED_MARGIN_S = 5.0


async def stale_polls(conn: asyncpg.Connection, limit: int = 20) -> list[int]:
    """Open polls whose counts now differ from the last ones published, with a vote since (less COUNTED_MARGIN_S)
    at least UNPUBLISHED_AFTER_S old: the process that took the vote died within its coalescing window."""
    rows = await conn.fetch(
        f"""SELECT p.id FROM polls p LEFT JOIN poll_published r ON r.poll_id = p.id
           WHERE p.closed_at IS NULL
             AND EXISTS (SELECT 1 FROM poll_votes v WHERE v.poll_id = p.id
                             AND v.updated_at > coalesce(r.at, '-infinity') - make_interval(secs => $3)
                             AND v.updated_at < now() - make_interval(secs => $2))
             AND r.counts IS DISTINCT FROM {_COUNTS}
           ORDER BY p.id LIMIT $1""", limit, UNPUBLISHED_AFTER_S, COUNTED_MARGIN_S)
    return [r["id"] for r in rows]


async def publish_results(db: asyncpg.Pool, redis: Redis, poll_id: int) -> None:
    """Store and publish the current counts as `poll.results`; skipped once the poll is closed, and when they are
    the counts last published (a vote changed to the option it had; another process, or survivors sweeping at
    once, published them already)."""
    async with sequenced(db, redis) as box:
        session_id = await box.conn.fetchval("SELECT session_id FROM polls WHERE id = $1", poll_id)
        if session_id is None:
            return
        # The room's sequence lock first (see `_lock_room`), and before counting: a publisher that counts later
        # also gets a later seq, so results never go back in seq order (a stalled publisher cannot land old
        # counts last).
        try:
            await _lock_room(box.conn, session_id)
        except Refused:
            return
        # FOR SHARE: a close under way commits first and is seen, so results never follow `poll.closed`
        poll = await box.conn.fetchrow("SELECT session_id, options, closed_at FROM polls WHERE id = $1 FOR SHARE",
                                       poll_id)
        if poll is None or poll["closed_at"] is not None:
            return
        room = room_of(session_id)
        c = await counts(box.conn, poll_id)
        if await box.conn.fetchval("SELECT counts FROM poll_published WHERE poll_id = $1", poll_id) == c:
            return
        await box.append(room, lambda seq: PollResults(seq=seq, room=room, poll_id=poll_id, counts=c, total=sum(c)))
        await box.conn.execute(
            """INSERT INTO poll_published AS r (poll_id, at, counts) VALUES ($1, now(), $2)
               ON CONFLICT (poll_id) DO UPDATE SET at = greatest(r.at, EXCLUDED.at), counts = EXCLUDED.counts""",
            poll_id, c)


async def close_poll(db: asyncpg.Pool, redis: Redis, poll_id: int) -> list[int]:
    """Close the poll and publish the final counts (`poll.closed`). Refused(INVALID_STATE) when already closed."""
    async with sequenced(db, redis) as box:
        session_id = await box.conn.fetchval("SELECT session_id FROM polls WHERE id = $1", poll_id)
        if session_id is None:
            raise Refused("not_found", f"poll {poll_id} not found")
        await _lock_room(box.conn, session_id)
        session_id = await box.conn.fetchval(
            "UPDATE polls SET closed_at = now() WHERE id = $1 AND closed_at IS NULL RETURNING session_id", poll_id)
        if session_id is None:
            await _gone(box.conn, "polls", poll_id, "poll")
            raise Refused(INVALID_STATE, "the poll is already closed")
        final = await _append_closed(box, room_of(session_id), poll_id)
    return final


async def _append_closed(box, room: str, poll_id: int) -> list[int]:  # type: ignore[no-untyped-def]
    c = await counts(box.conn, poll_id)
    await box.append(room, lambda seq: PollClosed(seq=seq, room=room, poll_id=poll_id, counts=c, total=sum(c)))
    return c
