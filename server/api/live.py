"""Live sessions and polls: /api/v1/courses/{id}/live, /api/v1/live/{id}[/start|/end|/attendance|/polls],
/api/v1/polls/{id}[/votes|/close]."""
from __future__ import annotations

import asyncpg
from litestar import Controller, Request, Response, delete, get, post

from server.api.paging import ListLimit, Offset
from server.api.room_schemas import Attendee, Poll, PollIn, Session, SessionIn, VoteIn
from server.api.rooms import not_kicked, refused, take_send
from server.auth import AuthUser, staff_only
from server.decode import callers_key, idempotency_key, read_json
from server.errors import ApiError
from store import courses as courses_repo
from store import live as repo
from store import moderation
from store import rooms as rooms_repo
from store.messages import REUSED, Refused


def to_session(row: asyncpg.Record) -> Session:
    return Session(id=row["id"], course_id=row["course_id"], title=row["title"], state=repo.state_of(row),
                   room=repo.room_of(row["id"]), scheduled_at=row["scheduled_at"], started_at=row["started_at"],
                   ended_at=row["ended_at"], created_at=row["created_at"])


async def _session_or_404(conn: asyncpg.Connection, session_id: int, user: AuthUser) -> asyncpg.Record:
    """The session if the caller may join its room (as the course room); 404 otherwise."""
    row = await repo.session_in_tenant(conn, session_id, user.tenant_id)
    if row is None or await rooms_repo.access(conn, repo.room_of(session_id), user.id, user.tenant_id,
                                              user.role) is None:
        raise ApiError(404, f"live session {session_id} not found")
    await not_kicked(conn, repo.room_of(session_id), user)
    return row


async def _to_poll(conn: asyncpg.Connection, row: asyncpg.Record, user_id: int) -> Poll:
    options = list(row["options"])
    counts = await repo.counts(conn, row["id"])
    return Poll(id=row["id"], session_id=row["session_id"], question=row["question"], options=options,
                closed=row["closed_at"] is not None, counts=counts, total=sum(counts),
                my_vote=await repo.my_vote(conn, row["id"], user_id), created_at=row["created_at"],
                closed_at=row["closed_at"])


class LiveController(Controller):
    path = "/api/v1"
    tags = ["live"]

    @post("/courses/{course_id:int}/live", guards=[staff_only], status_code=201)
    async def schedule(self, request: Request, course_id: int) -> Session:
        data = await read_json(request, SessionIn)
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            if await courses_repo.visible_course(conn, course_id, user.id, user.tenant_id, user.role) is None:
                raise ApiError(404, f"course {course_id} not found")
            return to_session(await repo.create_session(conn, course_id, data.title.strip() or data.title,
                                                        data.scheduled_at, user.id))

    @get("/courses/{course_id:int}/live")
    async def list_sessions(self, request: Request, course_id: int,
                            limit: int = ListLimit, offset: int = Offset) -> list[Session]:
        user: AuthUser = request.user
        if course_id >= 2**63:  # as for every id (the room name would not take it: an unknown room, a 404)
            raise ApiError(400, f"id {course_id} is out of range", field="course_id")
        async with request.app.state.pool.acquire() as conn:
            if await rooms_repo.access(conn, f"course:{course_id}", user.id, user.tenant_id, user.role) is None:
                listed = await courses_repo.listed_course(conn, course_id, user.id, user.tenant_id, user.role)
                if listed is not None and listed["may_join"]:
                    # a catalog course they may read and join but are not in: said so, not "not found" (they just
                    # saw it; also a paid course they have access to, who left it)
                    raise ApiError(403, f"live sessions are for the learners of course {course_id}: enroll first",
                                   code="not_enrolled")
                raise ApiError(404, f"course {course_id} not found")
            await not_kicked(conn, f"course:{course_id}", user)
            return [to_session(r) for r in await repo.list_sessions(conn, course_id, limit=limit, offset=offset)]

    @get("/live/{session_id:int}")
    async def read(self, request: Request, session_id: int) -> Session:
        async with request.app.state.pool.acquire() as conn:
            return to_session(await _session_or_404(conn, session_id, request.user))

    @post("/live/{session_id:int}/start", guards=[staff_only], status_code=200)
    async def start(self, request: Request, session_id: int) -> Session:
        state = request.app.state
        async with state.pool.acquire() as conn:
            await _session_or_404(conn, session_id, request.user)
        try:
            return to_session(await repo.start_session(state.pool, state.redis, session_id))
        except Refused as exc:
            raise refused(exc) from exc

    @post("/live/{session_id:int}/end", guards=[staff_only], status_code=200)
    async def end(self, request: Request, session_id: int) -> Session:
        """End the session; open polls close with their final counts."""
        state = request.app.state
        async with state.pool.acquire() as conn:
            await _session_or_404(conn, session_id, request.user)
        try:
            return to_session(await repo.end_session(state.pool, state.redis, session_id))
        except Refused as exc:
            raise refused(exc) from exc

    @delete("/live/{session_id:int}", guards=[staff_only], status_code=204)
    async def cancel(self, request: Request, session_id: int) -> None:
        """Cancel a session that has not started (409 once it has: end it instead); sockets open in its room
        close (4403 `room deleted`)."""
        state = request.app.state
        async with state.pool.acquire() as conn:
            await _session_or_404(conn, session_id, request.user)
            try:
                await repo.cancel_session(conn, session_id)
            except Refused as exc:
                raise refused(exc) from exc
        await moderation.close_rooms(state.redis, [repo.room_of(session_id)])

    @get("/live/{session_id:int}/attendance", guards=[staff_only])
    async def attendance(self, request: Request, session_id: int,
                         limit: int = ListLimit, offset: int = Offset) -> list[Attendee]:
        async with request.app.state.pool.acquire() as conn:
            await _session_or_404(conn, session_id, request.user)
            rows = await repo.attendance_report(conn, session_id, limit=limit, offset=offset)
        return [Attendee(**dict(r)) for r in rows]

    @post("/live/{session_id:int}/polls", guards=[staff_only], status_code=201)
    async def create_poll(self, request: Request, session_id: int) -> Poll | Response[Poll]:
        """Open a poll. With an `Idempotency-Key` header, a repeat (a double click, a retry after a lost reply)
        gets the poll that key opened (200), not a second one splitting the votes; the key with another question
        or options is 409 `idempotency_key_reused`."""
        key = callers_key(request.user.id, idempotency_key(request))
        data = await read_json(request, PollIn)
        state = request.app.state
        async with state.pool.acquire() as conn:
            await _session_or_404(conn, session_id, request.user)
        try:
            row, made = await repo.create_poll(state.pool, state.redis, session_id, data.question, data.options,
                                               request.user.id, key)
        except Refused as exc:
            if exc.code == REUSED:
                raise ApiError(409, exc.detail, code=exc.code, field="Idempotency-Key") from exc
            raise refused(exc) from exc
        async with state.pool.acquire() as conn:
            out = await _to_poll(conn, row, request.user.id)
        return out if made else Response(out, status_code=200)

    @get("/live/{session_id:int}/polls")
    async def polls(self, request: Request, session_id: int,
                    limit: int = ListLimit, offset: int = Offset) -> list[Poll]:
        async with request.app.state.pool.acquire() as conn:
            await _session_or_404(conn, session_id, request.user)
            rows = await repo.list_polls(conn, session_id, limit=limit, offset=offset)
            return [await _to_poll(conn, r, request.user.id) for r in rows]

    async def _poll(self, conn: asyncpg.Connection, poll_id: int, user: AuthUser) -> asyncpg.Record:
        row = await repo.poll_in_tenant(conn, poll_id, user.tenant_id)
        if row is None:
            raise ApiError(404, f"poll {poll_id} not found")
        try:
            await _session_or_404(conn, row["session_id"], user)
        except ApiError as exc:  # as for no such poll: one outside the course does not name its session
            if exc.status_code == 404:
                raise ApiError(404, f"poll {poll_id} not found") from None
            raise
        return row

    @post("/polls/{poll_id:int}/votes", status_code=200)
    async def vote(self, request: Request, poll_id: int) -> Poll:
        """One vote per user, changeable until the poll closes (same as the websocket `poll.vote`)."""
        data = await read_json(request, VoteIn)
        state = request.app.state
        user: AuthUser = request.user
        async with state.pool.acquire() as conn:
            row = await self._poll(conn, poll_id, user)
        try:
            repo.check_voter(user.role)  # (before the budget: a bot's refused vote spends none)
        except Refused as exc:
            raise refused(exc) from exc
        await take_send(state, user)  # a Redis call: no pooled connection held while it waits
        async with state.pool.acquire() as conn:
            try:
                await repo.vote(conn, poll_id, None, user.id, data.option, user.role)
            except Refused as exc:
                raise refused(exc) from exc
            state.hub.poll_voted(poll_id)
            return await _to_poll(conn, await repo.poll_in_tenant(conn, poll_id, user.tenant_id) or row, user.id)

    @post("/polls/{poll_id:int}/close", guards=[staff_only], status_code=200)
    async def close(self, request: Request, poll_id: int) -> Poll:
        state = request.app.state
        async with state.pool.acquire() as conn:
            await self._poll(conn, poll_id, request.user)
        try:
            await repo.close_poll(state.pool, state.redis, poll_id)
        except Refused as exc:
            raise refused(exc) from exc
        async with state.pool.acquire() as conn:
            row = await repo.poll_in_tenant(conn, poll_id, request.user.tenant_id)
            if row is None:  # closed, then deleted with its course before this read
                raise ApiError(404, f"poll {poll_id} not found")
            return await _to_poll(conn, row, request.user.id)
