"""Room moderation: mutes (no posting until a time) and kicks (sockets closed now, kept out until a time)."""
from __future__ import annotations

import logging
from datetime import datetime

import asyncpg
from redis.asyncio import Redis

from store.events import AccessRevoked, Kick, RoomClosed, encode, publish, room_topic, user_topic
from store.keys import events_channel
from store.rooms import STAFF, parse_room

logger = logging.getLogger(__name__)


async def _bar(conn: asyncpg.Connection, table: str, room_id: str, user_id: int, seconds: int,
               by: int) -> datetime:
    """Bar the user in the room (a mute or a kick, by `table`) for `seconds` from now, replacing an earlier bar;
    `created_at` is the moment of the latest. 0 seconds (a kick that only closes sockets) records that moment and
    leaves a bar in force as it is."""
    return await conn.fetchval(
        f"""INSERT INTO {table} AS k (room_id, user_id, until, created_by)
            VALUES ($1, $2, now() + make_interval(secs => $3), $4)
            ON CONFLICT (room_id, user_id) DO UPDATE
                SET until = CASE WHEN $3 > 0 THEN EXCLUDED.until ELSE greatest(k.until, EXCLUDED.until) END,
                    created_by = CASE WHEN $3 > 0 OR k.until <= now() THEN EXCLUDED.created_by ELSE k.created_by END,
                    created_at = now()
            RETURNING until""", room_id, user_id, float(seconds), by)


async def _lift(conn: asyncpg.Connection, table: str, room_id: str, user_id: int) -> bool:
    """End the user's mute or kick bar (`table`) in the room now; False when none was in force."""
    row = await conn.fetchrow(
        f"DELETE FROM {table} WHERE room_id = $1 AND user_id = $2 AND until > now() RETURNING user_id",
        room_id, user_id)
    return row is not None


async def mute(conn: asyncpg.Connection, room_id: str, user_id: int, seconds: int, by: int) -> datetime:
    """Mute `user_id` in the room for `seconds` from now (replacing any earlier mute); returns the end."""
    return await _bar(conn, "room_mutes", room_id, user_id, seconds, by)


async def unmute(conn: asyncpg.Connection, room_id: str, user_id: int) -> bool:
    return await _lift(conn, "room_mutes", room_id, user_id)


async def list_mutes(conn: asyncpg.Connection, room_id: str, *,
                     limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    """Users muted in the room now, soonest back first; for a live session's room, the mutes of its course
    room too (`room_id` says which room a mute is lifted in)."""
    return await _list_bars(conn, "room_mutes", room_id, limit, offset)


async def muted_until(conn: asyncpg.Connection, room_id: str, user_id: int) -> datetime | None:
    """Until when the user's sends are refused in the room (a mute there or, for a live session, in its course
    room), or None."""
    return await _barred_until(conn, "room_mutes", room_id, user_id)


async def kick(conn: asyncpg.Connection, redis: Redis, room_id: str, user_id: int, seconds: int, by: int) -> None:
    """Close the user's sockets in the room on every server process; with `seconds` > 0 they cannot rejoin
    until then. Not inside a caller's transaction: the kick is published once recorded."""
    # recorded even without a bar: a process whose subscription is down misses the event and, once it is back,
    # closes the sockets opened before the latest kick (see kicked_since)
    await _bar(conn, "room_kicks", room_id, user_id, max(seconds, 0), by)
    rooms = [room_id]
    ref = parse_room(room_id)
    if ref is not None and ref.kind == "course":  # and the course's live sessions (ended ones keep their chat),
        rooms += [f"live:{r['id']}" for r in await conn.fetch(  # joined as the course room
            "SELECT id FROM live_sessions WHERE course_id = $1", ref.target_id)]
    await _to_rooms(redis, [Kick(room=room, user_id=user_id) for room in rooms],
                    f"could not close the sockets of user {user_id} in %s")


# Bars (mutes or kicks, as `k`) in force in room $1; with a live session's id (parameter {sid}), its course room's
# bars too: a live session's room is joined as its course's room.
IN_ROOM = """(k.room_id = $1 OR k.room_id = (SELECT 'course:' || s.course_id FROM live_sessions s
                                             WHERE s.id = {sid}::bigint))"""
BARRING = "k.until > now() AND " + IN_ROOM


def session_of(room_id: str) -> int | None:
    """The live session whose room this is (for BARRING's {sid}), or None."""
    ref = parse_room(room_id)
    return ref.target_id if ref is not None and ref.kind == "live" else None


async def unkick(conn: asyncpg.Connection, room_id: str, user_id: int) -> bool:
    """Lift a kick's bar (the user may rejoin now); False when they were not barred."""
    return await _lift(conn, "room_kicks", room_id, user_id)


async def list_kicks(conn: asyncpg.Connection, room_id: str, *,
                     limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    """Users barred from the room now, soonest back first; for a live session's room, the bars of its course
    room too (`room_id` says which room a bar is lifted in)."""
    return await _list_bars(conn, "room_kicks", room_id, limit, offset)


async def kicked_until(conn: asyncpg.Connection, room_id: str, user_id: int) -> datetime | None:
    """Until when the user is kept out of the room, or None. A live session's room is joined as its course's
    room, so a kick from the course room keeps them out of its live sessions too."""
    return await _barred_until(conn, "room_kicks", room_id, user_id)


async def kicked_since(conn: asyncpg.Connection, room_id: str, user_id: int, since: datetime) -> bool:
    """Whether the user was kicked from the room (or, for a live session's room, its course room) after `since`,
    with or without a bar."""
    return bool(await conn.fetchval(
        f"""SELECT EXISTS (SELECT 1 FROM room_kicks k WHERE k.user_id = $2 AND k.created_at > $4
                           AND {IN_ROOM.format(sid='$3')})""",
        room_id, user_id, session_of(room_id), since))


async def _list_bars(conn: asyncpg.Connection, table: str, room_id: str, limit: int | None,
                     offset: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""SELECT k.room_id, k.user_id, u.name, k.until, k.created_by
            FROM {table} k JOIN users u ON u.id = k.user_id WHERE {BARRING.format(sid="$4")}
            ORDER BY k.until, k.user_id, k.room_id LIMIT $2 OFFSET $3""",
        room_id, limit, offset, session_of(room_id))


async def _barred_until(conn: asyncpg.Connection, table: str, room_id: str, user_id: int) -> datetime | None:
    return await conn.fetchval(
        f"SELECT max(k.until) FROM {table} k WHERE k.user_id = $2 AND {BARRING.format(sid='$3')}",
        room_id, user_id, session_of(room_id))


async def revoke_access(conn: asyncpg.Connection, redis: Redis, user_id: int, *, course_id: int | None = None,
                        pod_id: int | None = None) -> None:
    """Close the user's open sockets in rooms they may no longer join (4403 `access revoked`): after leaving a
    course, every room of it (course, pod and live rooms, ended sessions included); after leaving a pod, that
    pod's room. Access is checked at join, so without this an open socket would keep reading and posting. One
    event on the user's personal topic reaches each process holding their sockets, whatever the rooms."""
    if await conn.fetchval("SELECT role FROM users WHERE id = $1", user_id) in STAFF:
        return  # staff join by role; learners and bots (a bridge added to a pod) by enrollment and membership
    try:
        await publish(redis, user_topic(user_id), AccessRevoked(course_id=course_id, pod_id=pod_id))
    except Exception:  # noqa: BLE001 - access is gone already; sockets left open close when they next rejoin
        logger.warning("could not close the sockets of user %s", user_id, exc_info=True)


async def close_rooms(redis: Redis, room_ids: list[str]) -> None:
    """After a deletion has committed: close every socket in these rooms, on every process (4403 `room
    deleted`); left open, they read nothing more and every send failed. One round trip."""
    await _to_rooms(redis, [RoomClosed(room=room) for room in room_ids],
                    "could not close the sockets of deleted rooms %s")


async def _to_rooms(redis: Redis, events: list[Kick | RoomClosed], failed: str) -> None:
    """Publish each event to its room's topic in one round trip. A failure is logged (`failed` % rooms): the bar
    or deletion is stored, and a socket left open is refused at its next join."""
    if not events:
        return
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for event in events:
                pipe.publish(events_channel(room_topic(event.room)), encode(event))
            await pipe.execute()
    except Exception:  # noqa: BLE001
        logger.warning(failed, [e.room for e in events][:5], exc_info=True)
