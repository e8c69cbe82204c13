"""Room messages: post (idempotent by client_msg_id), edit, delete, history pages.

Each change is a sequenced event stored in `room_events` in the same transaction as the row, and published
after commit. Non-human authors (the tutor, the grader) post with `author_id=None` from any process.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from store import moderation, rooms
from store.events import MessageDeleted, MessageEdited, MessageNew, UserRef, encode
from store.rooms import next_seq, sequenced

logger = logging.getLogger(__name__)

_new_decoder = msgspec.json.Decoder(MessageNew)
_edited_decoder = msgspec.json.Decoder(MessageEdited)


ACCESS_REVOKED = "access_revoked"  # a Refused code: the author left the course or pod (the socket then closes)


async def _allowed(conn: asyncpg.Connection, room_id: str, user_id: int) -> bool:
    ref = rooms.parse_room(room_id)
    return ref is not None and await rooms.allowed(conn, ref, user_id)


class Refused(Exception):
    """A change the caller may not make; `code` is the websocket error code / REST error code."""

    def __init__(self, code: str, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.retry_after = retry_after  # seconds, for a rate limit


@dataclass(frozen=True, slots=True)
class Posted:
    event: MessageNew
    payload: bytes
    created: bool  # False: the client_msg_id was seen before and this is the original message
    check_reply: bool = False  # a learner's reply to another person's message: the tutor checks it (reply_checks)


async def _muted(conn: asyncpg.Connection, room_id: str, user_id: int) -> bool:
    return await moderation.muted_until(conn, room_id, user_id) is not None


async def _existing(conn: asyncpg.Connection, room_id: str, author_id: int | None,
                    client_msg_id: str, text: str | None = None, reply_to: int | None = None,
                    relay: str | None = None) -> Posted | None:
    row = await conn.fetchrow(
        """SELECT e.payload, m.body, m.text_sha FROM messages m
           JOIN room_events e ON e.room_id = m.room_id AND e.seq = m.seq
           WHERE m.room_id = $1 AND m.author_id IS NOT DISTINCT FROM $2 AND m.client_msg_id = $3""",
        room_id, author_id, client_msg_id)
    return None if row is None else _as_now(row["payload"], row["body"], text, row["text_sha"], reply_to, relay)


REUSED = "idempotency_key_reused"  # a Refused code: a client_msg_id sent again with another text (or reply_to)
# a Refused code: what is asked is not possible in the object's present state (a session not live, a poll closed);
# the detail says why, and sending the same again does not help (`conflict` is for a concurrent change: retry)
INVALID_STATE = "invalid_state"
NO_REPLY_TARGET = "reply_to_not_found"  # a Refused code: `reply_to` names no message (not deleted) of this room


def _sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def relay_of(meta: dict | None) -> str | None:
    """The id of the person a bot posted a message for (`meta.relay.id`), if any."""
    relay = (meta or {}).get("relay")
    return relay.get("id") if isinstance(relay, dict) else None


def _as_now(payload: str, body: str, text: str | None = None, text_sha: bytes | None = None,
            reply_to: int | None = None, relay: str | None = None) -> Posted:
    """A repeat's original `message.new` as the message is now: its stored event carries the text as last edited
    (a deletion blanks it there too; one stored before edits rewrote it, the text first posted), so the message's
    text is laid over it, as REST's repeat shows. With `text` (the repeat's), Refused(REUSED) when it is not the text
    first posted: a client reusing its ids (a counter reset by a reload) would otherwise have its new message dropped
    without a word. So, with `text`, when the repeat answers another message than the original did (`reply_to`), or
    a bot's repeat is for another person (`relay`: a bridge keeping ids per channel had Ben's message answered with
    Ann's)."""
    event = _new_decoder.decode(payload.encode())
    # (the text first posted is gone after an edit or a deletion: its digest stands in for it; a message stored
    # before digests were kept has its event's text, or nothing once deleted)
    if text_sha is not None:
        other_text = bytes(text_sha) != _sha(text) if text is not None else False
    else:
        other_text = text is not None and not event.deleted and event.text != text
    if text is not None and (event.reply_to != reply_to or relay_of(event.meta) != relay or other_text):
        raise Refused(REUSED, f"client_msg_id {event.client_msg_id!r} was already used for another message in this "
                              "room; send a new message with a new client_msg_id")
    if not event.deleted and event.text != body:
        event = msgspec.structs.replace(event, text=body)
        return Posted(event, encode(event), False)
    return Posted(event, payload.encode(), False)


async def original(db: asyncpg.Pool | asyncpg.Connection, room_id: str, author_id: int,
                   client_msg_id: str | None, text: str | None = None, reply_to: int | None = None,
                   relay: str | None = None) -> Posted | None:
    """The message `author_id` already posted in the room with `client_msg_id`, if any (a repeat); Refused(REUSED)
    when `text` is given and the original's was another, answered another message than `reply_to`, or was posted for
    another person (`relay`: the id a bot relayed it for)."""
    if client_msg_id is None:
        return None
    return await _with_conn(db, lambda c: _existing(c, room_id, author_id, client_msg_id, text, reply_to, relay))


# The author, whether they are muted in the room (for a live session's room $4, in its course room too), whether
# they may still use it (room kind $5, target $6), and the stored event of an earlier post with this client_msg_id.
_AUTHOR = f"""
SELECT u.id, u.name, u.role,
       EXISTS (SELECT 1 FROM room_mutes k WHERE k.user_id = u.id AND {moderation.BARRING.format(sid="$4")}) AS muted,
       EXISTS (SELECT 1 FROM room_kicks k WHERE k.user_id = u.id AND {moderation.BARRING.format(sid="$4")}) AS kicked,
       {rooms.ACCESS_SQL.format(u="u", kind="$5::text", target="$6::bigint")} AS allowed,
       o.payload AS original, o.body AS original_body, o.text_sha AS original_sha
FROM users u LEFT JOIN LATERAL (
    SELECT e.payload, m.body, m.text_sha FROM messages m JOIN room_events e ON e.room_id = m.room_id AND e.seq = m.seq
    WHERE m.room_id = $1 AND m.author_id = u.id AND m.client_msg_id = $3) AS o ON true
WHERE u.id = $2"""


async def post_message(db: asyncpg.Pool | asyncpg.Connection, redis: Redis, room_id: str, author_id: int | None,
                       text: str, meta: dict[str, Any] | None = None, client_msg_id: str | None = None, *,
                       author_name: str = "Tutor", author_role: str = "tutor",
                       also: Callable[[asyncpg.Connection, int], Awaitable[Any]] | None = None,
                       reply_to: int | None = None) -> Posted:
    """Post a message and publish `message.new` after commit.

    `author_id=None` posts as a non-human author named `author_name` with role `author_role` (the tutor,
    the grader). With a `client_msg_id` seen before from the same author in the room, nothing is stored and
    the original message is returned (`created=False`). Raises Refused("kicked") for an author barred from the
    room, Refused("muted") for a muted one, Refused(ACCESS_REVOKED) for one who may no longer use the room and
    LookupError for a room whose course, pod or session does not exist. `also(conn, message_id)` runs in the
    message's own transaction, only when a message is created (the tutor records the question it will answer,
    so the two exist together or not at all). `reply_to` is an earlier message of the room this one answers
    (Refused(NO_REPLY_TARGET) when there is none, or, for a person's post, it was deleted); a learner's reply to
    someone else's message is queued for the tutor's check in the same transaction (`check_reply` on the result:
    see store.replies)."""
    meta = meta or {}
    try:
        async with sequenced(db, redis) as box:
            conn = box.conn
            if also is not None:  # it writes a row of the course's (the tutor's hold): the course's row goes first
                await rooms.lock_room(conn, room_id)
            if author_id is not None:
                # One round trip for the questions asked before every human post.
                where = rooms.parse_room(room_id)
                author = await conn.fetchrow(_AUTHOR, room_id, author_id, client_msg_id,
                                             moderation.session_of(room_id), where.kind if where else "",
                                             where.target_id if where else 0)
                if author is None:
                    raise LookupError(f"user {author_id} does not exist")
                if author["original"] is not None:
                    return _as_now(author["original"], author["original_body"], text, author["original_sha"],
                                   reply_to, relay_of(meta))
                if not author["allowed"]:  # left the course or pod: the socket's close may have been lost
                    raise Refused(ACCESS_REVOKED, "you no longer have access to this room")
                if author["kicked"]:  # (an open socket closes on the kick's event; should that be lost, not this)
                    raise Refused("kicked", "you are barred from this room")
                if author["muted"]:
                    raise Refused("muted", "you are muted in this room")
                ref = UserRef(id=author["id"], name=author["name"], role=author["role"])
            else:
                if client_msg_id is not None:
                    found = await _existing(conn, room_id, None, client_msg_id)
                    if found is not None:
                        return found
                ref = UserRef(id=None, name=author_name, role=author_role)
            # The event needs the row's id and the row needs the seq: allocate, insert, then store the event.
            seq = await next_seq(conn, room_id)
            target = None
            if reply_to is not None:  # (after next_seq: the room's row is ours, so no delete of it slips in between)
                target = await conn.fetchrow(
                    "SELECT author_id, deleted_at FROM messages WHERE id = $1 AND room_id = $2", reply_to, room_id)
                if author_id is None:  # the tutor's answer is posted whatever became of its question (deleted
                    reply_to = reply_to if target is not None else None  # while it wrote, or gone with the room)
                elif target is None or target["deleted_at"] is not None:
                    raise Refused(NO_REPLY_TARGET, f"reply_to: message {reply_to} is not in this room"
                                  + (" (it was deleted)" if target is not None else ""))
            row = await conn.fetchrow(
                # the time of the insert, under the room's lock (not the transaction's start, `now()`): times rise
                # with seq (concurrent senders' times went backwards down the history by up to 34 ms)
                """INSERT INTO messages (room_id, seq, author_id, body, client_msg_id, meta, author_name, author_role,
                                        text_sha, reply_to, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, clock_timestamp())
                   ON CONFLICT DO NOTHING RETURNING id, created_at""",
                room_id, seq, author_id, text, client_msg_id, meta, ref.name, ref.role,
                _sha(text) if client_msg_id is not None else None, reply_to)
            if row is None:  # a concurrent send with the same client_msg_id committed first
                raise _Duplicate()
            event = MessageNew(id=row["id"], seq=seq, room=room_id, author=ref, text=text,
                               created_at=row["created_at"], client_msg_id=client_msg_id, meta=meta,
                               reply_to=reply_to)
            payload = encode(event)
            await conn.execute(
                """INSERT INTO room_events (room_id, seq, type, message_id, payload)
                   VALUES ($1, $2, 'message.new', $3, $4)""", room_id, seq, row["id"], payload.decode())
            if also is not None:
                await also(conn, row["id"])
            check = (target is not None and ref.role == "learner" and target["author_id"] is not None
                     and target["author_id"] != author_id)
            if check:  # (with the reply: a crash before the check is queued loses nothing; see store.replies)
                await conn.execute("INSERT INTO reply_checks (message_id, room_id, question_id, author_id) "
                                   "VALUES ($1, $2, $3, $4)", row["id"], room_id, reply_to, author_id)
            box.later(room_id, payload, "MessageNew")
    except _Duplicate:
        found = await _with_conn(db, lambda c: _existing(c, room_id, author_id, client_msg_id,
                                                         None if author_id is None else text, reply_to,
                                                         relay_of(meta)))
        if found is None:
            raise
        return found
    return Posted(event, payload, True, check_reply=check)


class _Duplicate(Exception):
    pass


async def _with_conn(db: asyncpg.Pool | asyncpg.Connection, fn):  # type: ignore[no-untyped-def]
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await fn(conn)
    return await fn(db)


async def _lock_room(conn: asyncpg.Connection, room_id: str, message_id: int) -> None:
    """The room's row before the message's (see `rooms.lock_room`): a message in a room being deleted is gone."""
    try:
        await rooms.lock_room(conn, room_id)
    except rooms.RoomGone:
        raise Refused("not_found", f"message {message_id} not found in this room") from None


async def edit_message(db: asyncpg.Pool | asyncpg.Connection, redis: Redis, room_id: str, message_id: int,
                       user_id: int, text: str) -> MessageEdited:
    """The author changes their message; publishes `message.edited` (its own seq) after commit."""
    async with sequenced(db, redis) as box:
        conn = box.conn
        await _lock_room(conn, room_id, message_id)
        msg = await conn.fetchrow(
            "SELECT author_id, deleted_at FROM messages WHERE id = $1 AND room_id = $2 FOR UPDATE",
            message_id, room_id)
        if msg is None or msg["deleted_at"] is not None:
            raise Refused("not_found", f"message {message_id} not found in this room")
        if msg["author_id"] != user_id:
            raise Refused("forbidden", "only the author can edit a message")
        if not await _allowed(conn, room_id, user_id):
            raise Refused(ACCESS_REVOKED, "you no longer have access to this room")
        if await moderation.kicked_until(conn, room_id, user_id) is not None:
            raise Refused("kicked", "you are barred from this room")
        if await _muted(conn, room_id, user_id):
            raise Refused("muted", "you are muted in this room")
        edited_at = await conn.fetchval(
            # (under the row's lock: two racing edits' times in the order they are applied)
            "UPDATE messages SET body = $2, edited_at = clock_timestamp() WHERE id = $1 RETURNING edited_at",
            message_id, text)
        # the text it replaces leaves the stored events too: a client resuming from before the post (a member
        # joining later) read the first version, then the edit (a phone number edited out stayed readable)
        await _rewrite_events(conn, room_id, message_id, text)
        event = await box.append(
            room_id, lambda seq: MessageEdited(id=message_id, seq=seq, room=room_id, text=text, edited_at=edited_at),
            message_id=message_id)
    return event  # type: ignore[return-value]


async def delete_message(db: asyncpg.Pool | asyncpg.Connection, redis: Redis, room_id: str, message_id: int,
                         user_id: int, moderator: bool) -> MessageDeleted:
    """Delete (authors: their own; moderators: any). The text is erased, also from the stored events that
    carried it, so a client resuming from before sees the message as deleted, never its text."""
    async with sequenced(db, redis) as box:
        conn = box.conn
        await _lock_room(conn, room_id, message_id)
        msg = await conn.fetchrow(
            "SELECT author_id, deleted_at FROM messages WHERE id = $1 AND room_id = $2 FOR UPDATE",
            message_id, room_id)
        if msg is None or msg["deleted_at"] is not None:
            raise Refused("not_found", f"message {message_id} not found in this room")
        if not moderator and msg["author_id"] != user_id:
            raise Refused("forbidden", "only the author or a moderator can delete a message")
        if not moderator:  # as for an edit (and over REST): an author removed or barred since cannot erase it
            if not await _allowed(conn, room_id, user_id):
                raise Refused(ACCESS_REVOKED, "you no longer have access to this room")
            if await moderation.kicked_until(conn, room_id, user_id) is not None:
                raise Refused("kicked", "you are barred from this room")
        await conn.execute("UPDATE messages SET body = '', deleted_at = clock_timestamp() WHERE id = $1", message_id)
        await _rewrite_events(conn, room_id, message_id, "", deleted=True)
        await _forget_in_tutor(conn, room_id, message_id)
        event = await box.append(
            room_id, lambda seq: MessageDeleted(id=message_id, seq=seq, room=room_id, deleted_by=user_id),
            message_id=message_id)
    return event  # type: ignore[return-value]


async def _rewrite_events(conn: asyncpg.Connection, room_id: str, message_id: int, text: str, *,
                          deleted: bool = False) -> None:
    """The message's stored events (its post and edits so far) carry `text` from now on (and its post `deleted`)."""
    for ev in await conn.fetch(
            "SELECT seq, type, payload FROM room_events WHERE message_id = $1 AND room_id = $2 "
            "AND type IN ('message.new', 'message.edited')", message_id, room_id):
        raw = ev["payload"].encode()
        if ev["type"] == "message.new":
            old = _new_decoder.decode(raw)
            redacted = msgspec.structs.replace(old, text=text, deleted=deleted or old.deleted)
        else:
            redacted = msgspec.structs.replace(_edited_decoder.decode(raw), text=text)
        await conn.execute("UPDATE room_events SET payload = $3 WHERE room_id = $1 AND seq = $2",
                           room_id, ev["seq"], encode(redacted).decode())


async def _forget_in_tutor(conn: asyncpg.Connection, room_id: str, message_id: int) -> None:
    """The tutor's record of a deleted room message: a deleted answer loses its text there and is not served
    from the cache again; a deleted question loses its text (the answer's reply has client_msg_id
    `tutor:<question id>`)."""
    # the cache rows of this answer: its own turn's, and (for an answer the cache gave) those of the turn it came
    # from, found by the same answer text in the course
    await conn.execute("""DELETE FROM tutor_cache c USING tutor_turns t, tutor_turns s
                          WHERE t.message_id = $1 AND s.course_id = t.course_id AND s.answer = t.answer
                            AND c.turn_id = s.id""", message_id)
    await conn.execute("""UPDATE tutor_turns SET answer = '', citations = '[]', follow_ups = '[]', nearest = '[]'
                          WHERE message_id = $1""", message_id)
    # a question: its answer's turn, found by the reply (client_msg_id `tutor:<question id>`) or, when the reply
    # is not posted yet, by the answer's hold
    await conn.execute("""UPDATE tutor_turns t SET question = '', standalone = '' FROM messages r
                          WHERE r.room_id = $1 AND r.author_id IS NULL AND r.client_msg_id = 'tutor:' || $2::bigint
                            AND t.message_id = r.id""", room_id, message_id)
    await conn.execute("""UPDATE tutor_turns SET question = '', standalone = ''
                          WHERE id = (SELECT turn_id FROM tutor_pending WHERE message_id = $1)""", message_id)


async def history(conn: asyncpg.Connection, room_id: str, *, after: int | None, before: int | None,
                  limit: int) -> tuple[list[asyncpg.Record], bool]:
    """A page of live (not deleted) messages in seq order, and whether more exist in the paging direction.

    With `after`: the first `limit` messages after that seq. Otherwise: the last `limit` before `before`
    (or the newest)."""
    if after is not None:
        rows = await conn.fetch(
            f"""{_HISTORY} AND m.seq > $2 AND ($3::bigint IS NULL OR m.seq < $3) ORDER BY m.seq LIMIT $4""",
            room_id, after, before, limit + 1)
        return list(rows[:limit]), len(rows) > limit
    rows = await conn.fetch(
        f"""{_HISTORY} AND ($2::bigint IS NULL OR m.seq < $2) ORDER BY m.seq DESC LIMIT $3""",
        room_id, before, limit + 1)
    return list(reversed(rows[:limit])), len(rows) > limit


_HISTORY = """SELECT m.id, m.seq, m.author_id, coalesce(u.name, m.author_name) AS author_name,
                     coalesce(u.role, m.author_role) AS author_role, m.body, m.client_msg_id, m.meta,
                     m.created_at, m.edited_at, m.reply_to,
                     EXISTS (SELECT 1 FROM helpful_marks h WHERE h.message_id = m.id) AS helpful
              FROM messages m LEFT JOIN users u ON u.id = m.author_id
              WHERE m.room_id = $1 AND m.deleted_at IS NULL"""
