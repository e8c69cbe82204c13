"""Rooms over REST: history pages, posting (bots, integrations), presence, and moderation."""
from __future__ import annotations

import logging

import asyncpg
from litestar import Controller, Request, delete, get, post
from litestar.params import Parameter
from litestar.response import Response

from server.api.paging import ListLimit, Offset, PageLimit
from server.api.room_schemas import (Kicked, KickIn, MessagePage, Mute, MuteIn, OnlineList, PostedMessage, PostIn,
                                     RoomMessage, TutorTaken)
from server.auth import STAFF_ROLES, AuthUser
from server.decode import read_json
from server.errors import ApiError
from server.tutoring import TUTOR_MENTION, post_mentioning, relay_meta
from store import messages as messages_repo
from store import moderation
from store import rooms as rooms_repo
from store.events import UserRef
from store.frames import relay_key, text_problem

logger = logging.getLogger(__name__)

Seq = Parameter(ge=0, le=2**62, default=None)

# Refused codes of the store layer -> HTTP status
_STATUS = {"not_found": 404, "forbidden": 403, "muted": 403, "kicked": 403, "access_revoked": 403, "conflict": 409,
           messages_repo.REUSED: 409, messages_repo.INVALID_STATE: 409,
           "poll_closed": 409,
           "bad_option": 400, "bad_frame": 400, "too_long": 400, messages_repo.NO_REPLY_TARGET: 404}


_FIELD = {"bad_option": "option", "too_long": "text", messages_repo.NO_REPLY_TARGET: "reply_to"}  # the body field a refusal is about


def refused(exc: messages_repo.Refused) -> ApiError:
    return ApiError(_STATUS.get(exc.code, 400), exc.detail, code=exc.code, field=_FIELD.get(exc.code))


async def room_or_404(conn: asyncpg.Connection, room_id: str, user: AuthUser) -> rooms_repo.RoomAccess:
    """The caller's access to the room (creating the row if needed); 404 when unknown or not allowed."""
    acc = await rooms_repo.access(conn, room_id, user.id, user.tenant_id, user.role)
    if acc is None:
        raise ApiError(404, f"room {room_id} not found")
    await not_kicked(conn, acc.room_id, user)
    await rooms_repo.ensure_room(conn, acc.room_id)
    return acc


async def not_kicked(conn: asyncpg.Connection, room_id: str, user: AuthUser) -> None:
    """A user kicked from a room is kept out of it over REST too (403 `kicked`), as on the websocket."""
    until = await moderation.kicked_until(conn, room_id, user.id)
    if until is not None:
        raise ApiError(403, f"kicked from this room until {until.isoformat()}", code="kicked")


async def take_send(state, user: AuthUser) -> None:  # type: ignore[no-untyped-def]
    """One action from the caller's send budget, shared over processes with websocket sends, edits, deletes
    and votes; 429 with `retry_after` when it is spent."""
    ok, wait = await state.hub.send_limiter(user.role).take(user.id)
    if not ok:
        raise ApiError(429, f"too many actions; retry in {wait:g}s", retry_after=wait)


def to_message(row: asyncpg.Record, room_id: str) -> RoomMessage:
    return RoomMessage(id=row["id"], seq=row["seq"], room=room_id,
                       author=UserRef(id=row["author_id"], name=row["author_name"] or "", role=row["author_role"] or ""),
                       text=row["body"], created_at=row["created_at"], edited_at=row["edited_at"],
                       client_msg_id=row["client_msg_id"], meta=row["meta"] or {}, reply_to=row["reply_to"],
                       helpful=row["helpful"])


class RoomController(Controller):
    path = "/api/v1/rooms"
    tags = ["rooms"]

    @get("/{room_id:str}/messages")
    async def messages(self, request: Request, room_id: str, limit: int = PageLimit,
                       after: int | None = Seq, before: int | None = Seq) -> MessagePage:
        """Messages in seq order. `after`: the first `limit` after that seq; else the last `limit` before
        `before` (default: the newest). Deleted messages are left out."""
        async with request.app.state.pool.acquire() as conn:
            await room_or_404(conn, room_id, request.user)
            rows, more = await messages_repo.history(conn, room_id, after=after, before=before, limit=limit)
        return MessagePage(items=[to_message(r, room_id) for r in rows], has_more=more)

    @post("/{room_id:str}/messages", status_code=201)
    async def post_message(self, request: Request, room_id: str) -> Response[PostedMessage]:
        """Post as the caller (bots, integrations); same rules and limits as a websocket `message.send`,
        including `@tutor`: the tutor answers in the room, and `tutor` says whether it took the question."""
        data = await read_json(request, PostIn)
        user: AuthUser = request.user
        state = request.app.state
        if (problem := text_problem(data.text, state.settings.ws_max_text)) is not None:
            code, detail = problem
            raise ApiError(400, detail, code=None if code == "bad_frame" else code, field="text")
        try:  # (said here with the field; the post checks the same)
            relay_meta(user, data.relay)
        except messages_repo.Refused as exc:
            raise (ApiError(403, "only bots relay messages for others", field="relay") if exc.code == "forbidden"
                   else ApiError(400, exc.detail, field="relay.name")) from exc
        async with state.pool.acquire() as conn:
            acc = await room_or_404(conn, room_id, user)
        try:
            await take_send(state, user)
        except ApiError:  # a repeat of a message already stored gets the original, budget or not
            try:
                if await messages_repo.original(state.pool, room_id, user.id, data.client_msg_id, data.text,
                                                data.reply_to, relay_key(data.relay)) is None:
                    raise
            except messages_repo.Refused as exc:
                raise refused(exc) from exc
        try:
            posted, not_taken = await post_mentioning(state, user, room_id, acc.course_id, data.text,
                                                      data.client_msg_id, data.reply_to, data.relay)
        except messages_repo.Refused as exc:
            raise refused(exc) from exc
        except rooms_repo.RoomGone as exc:  # deleted since the check above
            raise ApiError(404, f"room {room_id} not found") from exc
        ev = posted.event
        tutor = None
        text, edited_at, deleted = ev.text, None, False
        if posted.created and TUTOR_MENTION.search(ev.text):
            tutor = (TutorTaken(answering=True) if not_taken is None
                     else TutorTaken(answering=False, code=not_taken.code, detail=not_taken.detail))
        elif not posted.created:  # a repeat: the original as it is now (edited or deleted since)
            now = await state.pool.fetchrow("SELECT body, edited_at, deleted_at FROM messages WHERE id = $1", ev.id)
            if now is not None:
                text, edited_at, deleted = now["body"], now["edited_at"], now["deleted_at"] is not None
        return Response(PostedMessage(id=ev.id, seq=ev.seq, room=room_id, author=ev.author, text=text,
                                      created_at=ev.created_at, edited_at=edited_at, client_msg_id=ev.client_msg_id,
                                      meta=ev.meta, reply_to=ev.reply_to, tutor=tutor, deleted=deleted),
                        status_code=201 if posted.created else 200)

    @delete("/{room_id:str}/messages/{message_id:int}", status_code=204)
    async def delete_message(self, request: Request, room_id: str, message_id: int) -> None:
        """Authors delete their own messages; instructors and admins delete any."""
        state = request.app.state
        async with state.pool.acquire() as conn:
            acc = await room_or_404(conn, room_id, request.user)
        await take_send(state, request.user)
        try:
            await messages_repo.delete_message(state.pool, state.redis, room_id, message_id, request.user.id,
                                               acc.moderator)
        except messages_repo.Refused as exc:
            raise refused(exc) from exc

    @get("/{room_id:str}/presence")
    async def presence(self, request: Request, room_id: str,
                       limit: int = Parameter(ge=1, le=5000, default=1000)) -> OnlineList:
        state = request.app.state
        async with state.pool.acquire() as conn:
            await room_or_404(conn, room_id, request.user)
        count, online = await state.hub.presence.online(room_id, limit)
        return OnlineList(room=room_id, online_count=count, online=online)

    # --- moderation (instructors and admins of the course's tenant) ----------------------------------

    async def _moderate(self, request: Request, room_id: str, target: int | None, *, lifting: bool = False) -> None:
        async with request.app.state.pool.acquire() as conn:
            acc = await room_or_404(conn, room_id, request.user)
            if not acc.moderator:
                raise ApiError(403, "instructors and admins only")
            if target is not None:
                row = await conn.fetchrow("SELECT tenant_id, role FROM users WHERE id = $1", target)
                if row is None or row["tenant_id"] != acc.tenant_id:
                    raise ApiError(404, f"user {target} not found", field="user_id")
                if not lifting and (target == request.user.id or row["role"] in STAFF_ROLES):
                    # a moderator muted or barred by another (or by mistake, by themselves) could not undo it
                    raise ApiError(403, "instructors and admins cannot be muted or kicked", code="staff",
                                   field="user_id")

    @post("/{room_id:str}/mutes", status_code=201)
    async def mute(self, request: Request, room_id: str) -> Mute:
        """Mute a user in the room for `seconds`: their sends get `error {code: "muted"}`."""
        data = await read_json(request, MuteIn)
        await self._moderate(request, room_id, data.user_id)
        async with request.app.state.pool.acquire() as conn:
            until = await moderation.mute(conn, room_id, data.user_id, data.seconds, request.user.id)
        logger.info("muted", extra={"fields": {"room": room_id, "user_id": data.user_id, "by": request.user.id}})
        return Mute(room=room_id, user_id=data.user_id, until=until)

    @get("/{room_id:str}/mutes")
    async def mutes(self, request: Request, room_id: str, limit: int = ListLimit, offset: int = Offset) -> list[Mute]:
        """Users muted in the room now, with the room the mute was set in (a live session's room lists its
        course room's mutes too: they apply there)."""
        await self._moderate(request, room_id, None)
        async with request.app.state.pool.acquire() as conn:
            rows = await moderation.list_mutes(conn, room_id, limit=limit, offset=offset)
        return [Mute(room=r["room_id"], user_id=r["user_id"], until=r["until"]) for r in rows]

    @delete("/{room_id:str}/mutes/{user_id:int}", status_code=204)
    async def unmute(self, request: Request, room_id: str, user_id: int) -> None:
        await self._moderate(request, room_id, user_id, lifting=True)
        async with request.app.state.pool.acquire() as conn:
            if not await moderation.unmute(conn, room_id, user_id):
                muted = await moderation.muted_until(conn, room_id, user_id)
                raise ApiError(404, f"user {user_id} is not muted here" + (
                    " (the mute is the course room's: lift it there)" if muted else ""))

    @post("/{room_id:str}/kicks", status_code=204)
    async def kick(self, request: Request, room_id: str) -> None:
        """Close the user's sockets in the room on every server process (optionally barring them for
        `seconds`)."""
        data = await read_json(request, KickIn)
        await self._moderate(request, room_id, data.user_id)
        state = request.app.state
        async with state.pool.acquire() as conn:
            await moderation.kick(conn, state.redis, room_id, data.user_id, data.seconds, request.user.id)
        logger.info("kicked", extra={"fields": {"room": room_id, "user_id": data.user_id, "by": request.user.id}})

    @get("/{room_id:str}/kicks")
    async def kicks(self, request: Request, room_id: str, limit: int = ListLimit, offset: int = Offset) -> list[Kicked]:
        """Users barred from the room now, with the end of their bar and the room it was set in (a live
        session's room lists its course room's bars too)."""
        await self._moderate(request, room_id, None)
        async with request.app.state.pool.acquire() as conn:
            rows = await moderation.list_kicks(conn, room_id, limit=limit, offset=offset)
        return [Kicked(room=r["room_id"], user_id=r["user_id"], until=r["until"]) for r in rows]

    @delete("/{room_id:str}/kicks/{user_id:int}", status_code=204)
    async def unkick(self, request: Request, room_id: str, user_id: int) -> None:
        """Lift a bar: the user may rejoin now."""
        await self._moderate(request, room_id, user_id, lifting=True)
        async with request.app.state.pool.acquire() as conn:
            if not await moderation.unkick(conn, room_id, user_id):
                barred = await moderation.kicked_until(conn, room_id, user_id)
                raise ApiError(404, f"user {user_id} is not barred from this room" + (
                    " (the bar is the course room's: lift it there)" if barred else ""))
