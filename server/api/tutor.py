"""The tutor over REST: ask (JSON or server-sent events), private sessions, feedback, modes, accounting."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from msgspec import Meta

from agents.embedder import EmbedderError
from server.api.courses import course_or_404
from server.api.paging import ListLimit, Offset
from server.api.rooms import not_kicked, room_or_404
from server.api.schemas import LINES, Id, Strict
from server.auth import staff_only
from server.decode import read_json
from server.errors import (BAD_VALUE, CONFLICT, GONE, ROLLED_BACK, UNAVAILABLE, UNREACHABLE, ApiError,
                           embedder_api_error)
from server.tutoring import (BUSY, BUSY_RETRY_S, EMPTY_QUESTION, MAX_QUESTION_CHARS, ask, asked, complete, free_slot,
                             prepare, take_slot, track)
from store import tutor as repo
from store.frames import blank, text_problem
from store.rooms import access as rooms_access

logger = logging.getLogger(__name__)

Question = Annotated[str, Meta(min_length=1, max_length=MAX_QUESTION_CHARS)]


def wants_stream(accept: str) -> bool:
    """Whether an Accept header asks for server-sent events: the media type in any case, unless its `q` is 0."""
    for part in accept.split(","):
        media, *params = (x.strip() for x in part.split(";"))
        if media.lower() == "text/event-stream":
            q = next((p.split("=", 1)[1].strip() for p in params if p.replace(" ", "").lower().startswith("q=")), "1")
            try:
                return float(q) > 0
            except ValueError:
                return True
    return False


def _error_event(err: ApiError) -> dict:
    """An `error` event carrying what the JSON ask's error body would."""
    return {"status": err.status_code, "code": err.code, "message": err.detail,
            **({"retry_after": err.retry_after} if err.retry_after is not None else {})}


def stream_error(exc: Exception) -> dict | None:
    """The `error` event of a streamed ask for what the JSON ask answers with a status of its own (the
    exception handlers of server.errors): a transaction rolled back for a concurrent one, something deleted
    meanwhile, a value the database cannot take. None: a 500."""
    if isinstance(exc, ROLLED_BACK):
        return {"status": 409, "code": "conflict", "retry_after": 1, "message": CONFLICT}
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return {"status": 404, "code": "not_found", "message": GONE}
    if isinstance(exc, asyncpg.DataError):
        return {"status": 400, "code": "bad_request", "message": BAD_VALUE}
    return None


class AskIn(Strict):
    question: Question
    session_id: Id | None = None


class FeedbackIn(Strict):
    vote: Literal[1, -1]
    comment: Annotated[str, Meta(max_length=2000, pattern=LINES)] = ""


class ModeIn(Strict):
    mode: Literal["answer", "socratic"]


class CourseModeIn(Strict):
    mode: Literal["auto", "answer", "socratic"]  # auto: Socratic while the course has an open assignment


class Session(msgspec.Struct, omit_defaults=True):  # (a listing leaves out `turns`, `has_more`)
    id: int
    course_id: int
    title: str
    created_at: datetime
    updated_at: datetime
    turns: list[dict] | None = None
    has_more: bool | None = None  # with `turns`: older turns exist


def _session(r: Any, turns: list | None = None, has_more: bool | None = None) -> Session:
    return Session(id=r["id"], course_id=r["course_id"], title=r["title"], created_at=r["created_at"],
                   updated_at=r["updated_at"], turns=turns, has_more=has_more)


class TutorController(Controller):
    path = "/api/v1"
    tags = ["tutor"]

    @post("/courses/{course_id:int}/ask", status_code=200)
    async def ask(self, request: Request, course_id: int) -> Response:
        """Ask the tutor. `Accept: text/event-stream` streams `delta` events, then one `answer` event."""
        data = await read_json(request, AskIn)
        if (problem := text_problem(data.question, MAX_QUESTION_CHARS, "question")) is not None:
            raise ApiError(400, problem[1], field="question")
        question = asked(data.question)
        if blank(question):  # "@tutor" alone asks nothing (and must not cost a question)
            raise ApiError(400, EMPTY_QUESTION, code="empty_question", field="question")
        state, user = request.app.state, request.user
        async with state.pool.acquire() as conn:
            await course_or_404(conn, course_id, user)
        slot = await take_slot(state.redis, user.id, user.role, state.settings)
        if slot is None:
            raise ApiError(429, BUSY, code="tutor_busy", retry_after=BUSY_RETRY_S)
        if not wants_stream(request.headers.get("accept", "")):
            try:
                result = await ask(state, user, course_id, question, session_id=data.session_id, slot=slot)
            finally:
                await free_slot(state.redis, user.id, slot)
            return Response(_public(result))
        # limits and the session are checked before the stream opens: they answer with their HTTP status
        try:
            prep = await prepare(state, user, course_id, question, session_id=data.session_id, slot=slot)
        except BaseException:
            await free_slot(state.redis, user.id, slot)
            raise
        queue: asyncio.Queue = asyncio.Queue()

        async def on_delta(text: str) -> None:
            await queue.put(("delta", {"text": text}))

        async def run() -> None:
            try:
                result = await complete(state, user, course_id, prep, on_delta)
                await queue.put(("answer", _public(result)))
            except ApiError as exc:
                await queue.put(("error", _error_event(exc)))
            except EmbedderError as exc:  # as the JSON ask answers it (server.errors.embedder_error_handler)
                logger.warning("embedder failed on a streamed ask on course %s: %s", course_id, exc)
                await queue.put(("error", _error_event(embedder_api_error(exc))))
            except asyncio.CancelledError:  # the server is stopping: say so, then stop
                queue.put_nowait(("error", {"status": 503, "code": "interrupted",
                                            "message": "the server restarted before the answer was done; ask again"}))
                raise
            except UNREACHABLE as exc:  # as the JSON ask answers it (server.errors.unavailable_handler)
                logger.warning("a service is unreachable on a streamed ask on course %s: %s: %s", course_id,
                               type(exc).__name__, exc)
                await queue.put(("error", {"status": 503, "code": "unavailable", "retry_after": 5,
                                           "message": UNAVAILABLE}))
            except Exception as exc:  # noqa: BLE001 - the stream must end with something the client can read
                known = stream_error(exc)
                if known is None:
                    logger.exception("tutor failed on course %s", course_id)
                else:
                    logger.warning("streamed ask on course %s: %s", course_id, exc)
                await queue.put(("error", known or {"status": 500, "code": "internal", "message": "tutor failed"}))
            finally:
                queue.put_nowait(None)
                await free_slot(state.redis, user.id, slot)

        # A client that goes away mid-answer does not stop it: the answer is still stored (and counted), and
        # the server waits for it on shutdown.
        track(state, run())

        async def events() -> AsyncIterator[ServerSentEventMessage]:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), state.settings.sse_keepalive_s)
                except asyncio.TimeoutError:  # a condense call or a slow first token: a proxy must not idle it out
                    yield ServerSentEventMessage(comment="keep-alive", data=None)  # (no `data:`: no empty event)
                    continue
                if item is None:
                    return
                yield ServerSentEventMessage(event=item[0], data=json.dumps(item[1]))

        return ServerSentEvent(events())

    @get("/courses/{course_id:int}/tutor/sessions")
    async def sessions(self, request: Request, course_id: int,
                       limit: int = ListLimit, offset: int = Offset) -> list[Session]:
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            return [_session(r) for r in await repo.list_sessions(conn, request.user.id, course_id, limit=limit,
                                                                    offset=offset)]

    @get("/tutor/sessions/{session_id:int}")
    async def session(self, request: Request, session_id: int,
                      limit: int = Parameter(ge=1, le=200, default=200),
                      before: int | None = Parameter(ge=1, le=2**62, default=None)) -> Session:
        """The session with its latest `limit` turns, oldest first; `has_more`: older turns exist (page back with
        `before` = the first turn id of this page)."""
        async with request.app.state.pool.acquire() as conn:
            sess = await repo.get_session(conn, session_id, request.user.id)
            if sess is None:
                raise ApiError(404, f"tutor session {session_id} not found")
            # a learner taken out of the course (a paid one, a refund) no longer reads its transcripts' quotes here
            await course_or_404(conn, sess["course_id"], request.user, missing=f"tutor session {session_id} not found")
            rows = await repo.session_turns(conn, session_id, limit + 1, before)
        more, rows = len(rows) > limit, rows[-limit:]
        turns = [{"id": t["id"], "question": t["question"], "answer": t["answer"], "grounded": t["grounded"],
                  "citations": t["citations"], "follow_ups": t["follow_ups"], "created_at": t["created_at"]}
                 for t in rows]
        return _session(sess, turns, more)

    @delete("/tutor/sessions/{session_id:int}", status_code=204)
    async def delete_session(self, request: Request, session_id: int) -> None:
        async with request.app.state.pool.acquire() as conn:
            if not await repo.delete_session(conn, session_id, request.user.id):
                raise ApiError(404, f"tutor session {session_id} not found")

    @post("/tutor/answers/{turn_id:int}/feedback", status_code=204)
    async def feedback(self, request: Request, turn_id: int) -> None:
        """Thumbs up (1) or down (-1) on a tutor answer (REST or room: the room message's meta.turn_id)."""
        data = await read_json(request, FeedbackIn)
        async with request.app.state.pool.acquire() as conn:
            turn = await repo.get_turn(conn, turn_id)
            # a private session's answer is its learner's to rate; a room answer, theirs who may join the room
            # (a private answer whose session the learner deleted is gone: its text was erased)
            if turn is None or (turn["room_id"] is None and (turn["user_id"] != request.user.id
                                                              or turn["session_id"] is None)):
                raise ApiError(404, f"answer {turn_id} not found")
            await course_or_404(conn, turn["course_id"], request.user, missing=f"answer {turn_id} not found")
            if turn["room_id"] is not None:
                if await rooms_access(conn, turn["room_id"], request.user.id, request.user.tenant_id,
                                      request.user.role) is None:
                    raise ApiError(404, f"answer {turn_id} not found")  # a pod's answers are its members'
                await not_kicked(conn, turn["room_id"], request.user)  # as every other room call over REST
            await repo.set_feedback(conn, turn_id, request.user.id, data.vote, data.comment)

    @patch("/courses/{course_id:int}/tutor", guards=[staff_only])
    async def course_mode(self, request: Request, course_id: int) -> dict:
        """The course's tutor mode, and the mode it puts in effect now (`in_effect`: what an ask outside a room
        with a mode of its own gets)."""
        data = await read_json(request, CourseModeIn)
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            await conn.execute("UPDATE courses SET tutor_mode = $2 WHERE id = $1", course_id, data.mode)
            return await _course_mode(conn, course_id)

    @get("/courses/{course_id:int}/tutor", guards=[staff_only])
    async def course_mode_read(self, request: Request, course_id: int) -> dict:
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            return await _course_mode(conn, course_id)

    @put("/rooms/{room_id:str}/tutor", guards=[staff_only])
    async def room_mode(self, request: Request, room_id: str) -> dict:
        data = await read_json(request, ModeIn)
        async with request.app.state.pool.acquire() as conn:
            acc = await room_or_404(conn, room_id, request.user)
            await conn.execute("""INSERT INTO room_tutor_settings (room_id, mode) VALUES ($1, $2)
                                  ON CONFLICT (room_id) DO UPDATE SET mode = EXCLUDED.mode""", acc.room_id, data.mode)
        return {"room_id": room_id, "mode": data.mode}

    @delete("/rooms/{room_id:str}/tutor", guards=[staff_only], status_code=204)
    async def room_mode_cleared(self, request: Request, room_id: str) -> None:
        """The room follows its course's mode again (and Socratic mode while an assignment is open)."""
        async with request.app.state.pool.acquire() as conn:
            acc = await room_or_404(conn, room_id, request.user)
            await conn.execute("DELETE FROM room_tutor_settings WHERE room_id = $1", acc.room_id)

    @get("/courses/{course_id:int}/tutor/stats", guards=[staff_only])
    async def stats(self, request: Request, course_id: int) -> dict:
        """Questions, grounding, cache hits, tokens, cost and feedback for the course's tutor."""
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            row = await conn.fetchrow(
                """SELECT count(*) AS questions, count(*) FILTER (WHERE grounded) AS grounded,
                          count(*) FILTER (WHERE cache_hit) AS cache_hits,
                          coalesce(sum(input_tokens), 0) AS input_tokens,
                          coalesce(sum(output_tokens), 0) AS output_tokens,
                          coalesce(sum(cost_usd::numeric), 0)::float8 AS cost_usd,  -- (as real it adds in float4)
                          percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_latency_ms,
                          (SELECT count(*) FROM tutor_feedback f JOIN tutor_turns t ON t.id = f.turn_id
                           WHERE t.course_id = $1 AND f.vote = 1) AS thumbs_up,
                          (SELECT count(*) FROM tutor_feedback f JOIN tutor_turns t ON t.id = f.turn_id
                           WHERE t.course_id = $1 AND f.vote = -1) AS thumbs_down
                   FROM tutor_turns WHERE course_id = $1""", course_id)
        return dict(row)

    @get("/courses/{course_id:int}/tutor/feedback", guards=[staff_only])
    async def feedback_list(self, request: Request, course_id: int, vote: Literal[1, -1] | None = None,
                            limit: int = ListLimit, offset: int = Offset) -> list[dict]:
        """What learners said about the tutor's answers, newest first: the vote, the comment and the answer it
        was about (without who gave it or what they asked: a private session stays private)."""
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            rows = await conn.fetch(
                """SELECT f.turn_id, f.vote, f.comment, f.created_at AS at, t.answer, t.citations, t.grounded,
                          t.room_id
                   FROM tutor_feedback f JOIN tutor_turns t ON t.id = f.turn_id
                   WHERE t.course_id = $1 AND ($2::int IS NULL OR f.vote = $2)
                   ORDER BY f.created_at DESC, f.turn_id DESC, f.user_id LIMIT $3 OFFSET $4""",
                course_id, vote, limit, offset)
        return [dict(r) for r in rows]


def _public(result: dict) -> dict:
    """The answer as the asker gets it; `error` (null, or what went wrong, in our words) tells a model failure
    ("ask again") from a decline."""
    return {k: result.get(k) for k in ("answer", "grounded", "citations", "follow_ups", "nearest", "session_id",
                                        "turn_id", "mode", "cached", "error")}


async def _course_mode(conn: asyncpg.Connection, course_id: int) -> dict:
    """The course's tutor mode as set, and the mode in effect now."""
    mode = await conn.fetchval("SELECT tutor_mode FROM courses WHERE id = $1", course_id)
    return {"course_id": course_id, "mode": mode, "in_effect": await repo.tutor_mode(conn, course_id)}
