"""Rooms: ids, who may join, and the per-room sequenced event log (`room_events`).

Room ids are `course:<course_id>`, `pod:<pod_id>` and `live:<session_id>`; rows are created lazily. Every
sequenced event gets the next `rooms.last_seq` inside the transaction that stores it; the row lock makes
commits happen in seq order, so once seq N is visible every seq below N is too (resume and gap-fill rely on
it). Events are published only after commit, through `Outbox`.
"""
from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from store.events import Event, encode, publish_raw, room_topic

logger = logging.getLogger(__name__)

STAFF = ("instructor", "admin")
_ROOM = re.compile(r"(course|pod|live):([1-9][0-9]{0,17})")  # the whole id (fullmatch: no trailing newline)


class RoomGone(LookupError):
    """The room's course, pod or live session does not exist (any more)."""


@dataclass(frozen=True, slots=True)
class RoomRef:
    kind: str
    target_id: int

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.target_id}"


def parse_room(room_id: str) -> RoomRef | None:
    m = _ROOM.fullmatch(room_id)
    return RoomRef(m.group(1), int(m.group(2))) if m else None


@dataclass(frozen=True, slots=True)
class RoomAccess:
    """A caller's standing in a room they may join."""

    room_id: str
    kind: str
    course_id: int
    tenant_id: int
    moderator: bool  # instructors and admins of the course's tenant: delete any message, mute, kick


# Course of the room's target and its tenant, whatever the kind.
_TARGET = {
    "course": "SELECT c.id AS course_id, c.tenant_id FROM courses c WHERE c.id = $1",
    "pod": "SELECT c.id AS course_id, c.tenant_id FROM pods p JOIN courses c ON c.id = p.course_id WHERE p.id = $1",
    "live": """SELECT c.id AS course_id, c.tenant_id FROM live_sessions s JOIN courses c ON c.id = s.course_id
               WHERE s.id = $1""",
}


async def room_target(conn: asyncpg.Connection, ref: RoomRef) -> asyncpg.Record | None:
    """(course_id, tenant_id) of the room's course, or None when the pod/session/course does not exist."""
    return await conn.fetchrow(_TARGET[ref.kind], ref.target_id)


# Whether a user (its `users` row as {u}) may use a room of kind {kind} and target id {target} now: the one rule,
# asked at join (`access`, which also checks the tenant: that does not change), post and edit (`allowed`, or inside
# another statement).
ACCESS_SQL = """(CASE WHEN {u}.role IN ('instructor', 'admin') THEN true
      WHEN {kind} = 'pod' THEN EXISTS (
          SELECT 1 FROM pod_members acc_m JOIN pods acc_p ON acc_p.id = acc_m.pod_id
          JOIN enrollments acc_e ON acc_e.course_id = acc_p.course_id AND acc_e.user_id = acc_m.user_id
          WHERE acc_m.pod_id = {target} AND acc_m.user_id = {u}.id)
      WHEN {u}.role = 'bot' THEN true
      WHEN {kind} = 'course' THEN EXISTS (
          SELECT 1 FROM enrollments acc_e WHERE acc_e.course_id = {target} AND acc_e.user_id = {u}.id)
      ELSE EXISTS (SELECT 1 FROM live_sessions acc_s JOIN enrollments acc_e ON acc_e.course_id = acc_s.course_id
                   WHERE acc_s.id = {target} AND acc_e.user_id = {u}.id) END)"""


async def allowed(conn: asyncpg.Connection, ref: RoomRef, user_id: int) -> bool:
    """Whether the user may use the room now (ACCESS_SQL: the rule at join, post and edit)."""
    return bool(await conn.fetchval(
        f"SELECT {ACCESS_SQL.format(u='u', kind='$2::text', target='$3::bigint')} FROM users u WHERE u.id = $1",
        user_id, ref.kind, ref.target_id))


async def access(conn: asyncpg.Connection, room_id: str, user_id: int, tenant_id: int,
                 role: str) -> RoomAccess | None:
    """The caller's access to a room, or None (unknown room or not allowed: callers do not say which).

    Course and live rooms: enrolled learners, and instructors, admins and bots of the course's tenant.
    Pod rooms: members (while enrolled) and instructors and admins of the course's tenant."""
    ref = parse_room(room_id)
    if ref is None:
        return None
    target = await room_target(conn, ref)
    if target is None or target["tenant_id"] != tenant_id:
        return None
    if not await allowed(conn, ref, user_id):
        return None
    staff = role in STAFF
    course_id = target["course_id"]
    return RoomAccess(room_id=ref.id, kind=ref.kind, course_id=course_id, tenant_id=target["tenant_id"],
                      moderator=staff)


async def ensure_room(conn: asyncpg.Connection, room_id: str) -> int | None:
    """Create the room row if missing; its last_seq, or None when the room's target does not exist."""
    seq = await conn.fetchval("SELECT last_seq FROM rooms WHERE id = $1", room_id)
    if seq is not None:
        return seq
    ref = parse_room(room_id)
    target = await room_target(conn, ref) if ref else None
    if target is None:
        return None
    made = await conn.fetchval("INSERT INTO rooms (id, kind, course_id) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING "
                               "RETURNING last_seq", room_id, ref.kind, target["course_id"])
    if made is not None and await room_target(conn, ref) is None:
        # the insert waited for a deletion's transaction that had made the row too (cancelling a session nobody
        # had joined takes its room first) and then deleted it with its session: the row is not made again
        await conn.execute("DELETE FROM rooms WHERE id = $1", room_id)
        return None
    return await conn.fetchval("SELECT last_seq FROM rooms WHERE id = $1", room_id)


async def lock_room(conn: asyncpg.Connection, room_id: str) -> None:
    """Take the room's course row (to share its key) and then the room's row (creating it if need be) before
    changing rows inside the room whose change is then sequenced (a message, a session, a poll). A course's
    deletion takes its row, then deletes the room's row, then the rows inside it; a pod's or session's deletion
    the room's row, then the rest. Taken the other way round (a row inside, then the room: or the room, then the
    course, which a second update of a room row made in the same transaction checks), the two deadlocked and one
    failed. RoomGone when the room's course, pod or session is gone (also once a deletion this waited for
    commits)."""
    course_id = await conn.fetchval("SELECT course_id FROM rooms WHERE id = $1", room_id)
    missing = course_id is None  # (nobody has joined or posted yet: the row is made below)
    if missing:
        ref = parse_room(room_id)
        target = await room_target(conn, ref) if ref else None
        course_id = target["course_id"] if target else None
    if course_id is None or await conn.fetchval("SELECT 1 FROM courses WHERE id = $1 FOR KEY SHARE",
                                                course_id) is None:
        raise RoomGone(f"room {room_id} does not exist")
    if (missing and await ensure_room(conn, room_id) is None) or await conn.fetchval(
            "SELECT 1 FROM rooms WHERE id = $1 FOR NO KEY UPDATE", room_id) is None:
        raise RoomGone(f"room {room_id} does not exist")


async def last_seqs(conn: asyncpg.Connection, room_ids: list[str]) -> dict[str, int]:
    rows = await conn.fetch("SELECT id, last_seq FROM rooms WHERE id = ANY($1::text[])", room_ids)
    return {r["id"]: r["last_seq"] for r in rows}


async def next_seq(conn: asyncpg.Connection, room_id: str) -> int:
    """Allocate the room's next seq; must run inside the transaction that stores the event."""
    seq = await conn.fetchval("UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq", room_id)
    if seq is None:
        if await ensure_room(conn, room_id) is None:
            raise RoomGone(f"room {room_id} does not exist")
        seq = await conn.fetchval("UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq",
                                  room_id)
    return seq


async def events_after(conn: asyncpg.Connection, room_id: str, after: int, limit: int,
                       upto: int | None = None) -> list[tuple[int, str]]:
    """(seq, payload) of the room's events with seq > after (and <= upto), in order."""
    rows = await conn.fetch(
        """SELECT seq, payload FROM room_events WHERE room_id = $1 AND seq > $2 AND ($3::bigint IS NULL OR seq <= $3)
           ORDER BY seq LIMIT $4""", room_id, after, upto, limit)
    return [(r["seq"], r["payload"]) for r in rows]


class Outbox:
    """Sequenced events stored in a transaction, published once it has committed."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.pending: list[tuple[str, bytes, str]] = []

    async def append(self, room_id: str, build: Callable[[int], Event], *, message_id: int | None = None) -> Event:
        """Give the event built by `build(seq)` the room's next seq, store it, and queue it for publishing."""
        seq = await next_seq(self.conn, room_id)
        event = build(seq)
        payload = encode(event)
        await self.conn.execute(
            "INSERT INTO room_events (room_id, seq, type, message_id, payload) VALUES ($1, $2, $3, $4, $5)",
            room_id, seq, event.__struct_config__.tag, message_id, payload.decode())
        self.pending.append((room_id, payload, type(event).__name__))
        return event

    def later(self, room_id: str, payload: bytes, what: str = "event") -> None:
        """Publish an already stored (or ephemeral) payload after commit too."""
        self.pending.append((room_id, payload, what))


@asynccontextmanager
async def sequenced(db: asyncpg.Pool | asyncpg.Connection, redis: Redis) -> AsyncIterator[Outbox]:
    """A transaction whose sequenced events are published after it commits (nothing is published on error).

    `db` is a pool, or a connection that is not inside a transaction: publishing must follow the commit."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            async with sequenced(conn, redis) as box:
                yield box
        return
    if db.is_in_transaction():
        raise RuntimeError("pass a pool or a connection outside a transaction: events are published after commit")
    box = Outbox(db)
    async with db.transaction():
        yield box
    for room_id, payload, what in box.pending:
        await publish_raw(redis, room_topic(room_id), payload, what)
