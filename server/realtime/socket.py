"""GET /ws/rooms/{room_id}: authenticate, authorize, stream the room, and handle client frames.

Refusals accept the handshake and close at once, so the client sees the code: 4401 (no or bad token),
4403 (not allowed, unknown room, kicked), 4400 (bad `after`), 1013 (Postgres or Redis out of reach: try again).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg
from litestar import WebSocket, websocket
from litestar.exceptions import NotAuthorizedException
from redis.exceptions import LockError, RedisError

from server.auth import AuthUser, authenticate, bearer_token
from server.errors import ROLLED_BACK, UNAVAILABLE, UNREACHABLE
from server.realtime.conn import Conn
from server.realtime.hub import Hub
from server.realtime.standing import standing, still_allowed
from server.tutoring import (BUSY, BUSY_RETRY_S, EMPTY_QUESTION, MAX_QUESTION_CHARS, asked, free_slot,
                             over_daily_limit, post_asking, post_mentioning, question_of, relay_meta, take_slot)
from store import frames
from store import live as live_repo
from store import moderation
from store import messages as messages_repo
from store import rooms as rooms_repo
from store import keys
from store.keys import typing_window
from store.events import (CLOSE_FORBIDDEN, CLOSE_TOO_MANY, CLOSE_UNAUTHENTICATED, Error, Pong, Typing, UserRef,
                          publish, room_topic)

logger = logging.getLogger(__name__)

CLOSE_BAD_REQUEST = 4400
CLOSE_TRY_AGAIN = 1013  # RFC 6455 "try again later": a service the checks need is unreachable
TYPING_EVERY_S = 2.0
TWIN_MARK_S = 10  # how long a tutor.ask being taken is marked for its twins (store.keys.asking)
TWIN_WAIT_S = 3.0  # how long a twin of a marked ask waits for its first copy to be posted (or refused)
TYPING_EXPIRES_S = 3 * TYPING_EVERY_S  # a start's `expires_in`: clients clear it then unless another start came
RESUME_EVERY_S = 1.0  # a resume replays from Postgres: at most one a second per connection
# Frames of any type one connection may send per second, and at once (at least twice the send budget). Beyond,
# frames are dropped unread (with one `rate_limited` error a second); a connection that keeps on past another
# burst's worth is closed (4429).
FRAME_RATE = 20.0
FRAME_BURST = 60.0


async def _refuse(socket: WebSocket, code: int, reason: str) -> None:
    await socket.accept()
    await socket.close(code, reason)


MAX_SEQ = 2**62  # a seq as REST takes it (`after`, `before`), and the resume frame's `after_seq`


def _after(socket: WebSocket) -> int | None | str:
    given = socket.query_params.getall("after", [])
    if len(given) > 1:  # (a client appending its own `after` to a URL that had one resumed from the old point)
        return "bad"
    if not given:
        return None
    raw = given[0]  # (empty is no integer: a client writing `after=${lastSeq ?? ""}` lost its point without a word)
    # (digits as typed: a 19-digit seq under the bound was refused by a length check; one past it is "bad" too)
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 20 and int(raw) <= MAX_SEQ else "bad"


class RoomWebSocket(WebSocket):
    """Frames go straight to the server's send. The base class re-checks its connection state on every send;
    the connection's own state (Conn.broken / closing) already covers that, and fan-out sends a lot."""

    def send_wrapper(self, send):  # type: ignore[no-untyped-def]
        return send


CONNECT_CHECK_S = 3.0  # how long opening a socket waits for the connect budget (Redis) before 1013
CONNECT_DB_S = 8.0  # and for its checks (the token, the room, the user's standing in it): under a client's usual
# 10 s handshake timeout, so it hears why


_LEFT: set[asyncio.Future] = set()  # socket checks left to end in the background (held: the loop keeps no reference)


def _settled(task: asyncio.Future) -> None:
    """A socket's checks left to end in the background: their outcome is nobody's now (read, so it is not logged as
    never retrieved)."""
    _LEFT.discard(task)
    if not task.cancelled():
        task.exception()


class _TooManyConnects(Exception):
    def __init__(self, wait: float) -> None:
        super().__init__(wait)
        self.wait = wait


@websocket("/ws/rooms/{room_id:str}", websocket_class=RoomWebSocket)
async def room_socket(socket: WebSocket, room_id: str) -> None:
    state = socket.app.state
    hub: Hub = state.hub
    after = _after(socket)
    if after == "bad":
        await _refuse(socket, CLOSE_BAD_REQUEST, "after must be a non-negative integer, given once")
        return
    if len(socket.query_params.getall("token", [])) > 1:
        await _refuse(socket, CLOSE_BAD_REQUEST, "token given more than once")
        return

    async def take(limiter: SendLimiter, key: int | str) -> None:
        # the handshake is still open: a Redis that does not answer is a 1013 soon, not a client's timeout
        ok, wait = await asyncio.wait_for(limiter.take(key), CONNECT_CHECK_S)
        if not ok:
            raise _TooManyConnects(wait)

    async def connect_budget(user_id: int, claims: dict) -> None:
        # sockets opened per token and second, over all processes, checked once the token's signature is verified
        # and before any database work (a client reconnecting in a loop, also with a revoked token); bots (by their
        # signed role) bridge many rooms: theirs is a larger budget (hub.BOT_CONNECTS). The user's own budget is
        # taken once the database accepted the token: a dead one spends only its own
        bot = claims.get("role") == "bot"
        # (a bot token by its id; a person's, which has none, by its generation and issue time)
        token = claims.get("jti") or f"u{user_id}:{claims.get('gen', 0)}:{claims.get('iat')}"
        await take(hub.bot_token_connect_limiter if bot else hub.token_connect_limiter, str(token))

    async def checks() -> tuple[AuthUser, Any, float, Any, Any]:
        user = await authenticate(socket, socket.query_params.get("token") or bearer_token(socket), connect_budget)
        await take(hub.bot_connect_limiter if user.role == "bot" else hub.connect_limiter, user.id)
        async with state.pool.acquire() as db:
            # the database's clock, read before the checks: a kick after this moment closes the socket (kicks carry
            # the database's time too)
            opened_at = await db.fetchval("SELECT now()")
            opened_mono = time.monotonic()
            access, kicked = await standing(db, room_id, user)
            if access is not None and kicked is None:
                await rooms_repo.ensure_room(db, room_id)
        return user, opened_at, opened_mono, access, kicked

    # the handshake is still open: a Postgres that does not answer is a 1013 soon too, not a client's timeout (the
    # pool's statement timeout and rollback held it about twice STUDYHALL_DB_TIMEOUT_S, 30 s). Waited for, not
    # cancelled in place: giving a connection back waits on the cancel of its query, which a Postgres that stopped
    # answering does not answer either; the checks end in the background.
    checking = asyncio.ensure_future(checks())
    try:
        done, _ = await asyncio.wait({checking}, timeout=CONNECT_DB_S)
        if not done:
            raise TimeoutError(f"the socket's checks took over {CONNECT_DB_S:g} s")
        user, opened_at, opened_mono, access, kicked = checking.result()
    except _TooManyConnects as exc:
        await _refuse(socket, CLOSE_TOO_MANY, f"too many connects: retry in {exc.wait:g} s")
        return
    except NotAuthorizedException as exc:
        await _refuse(socket, CLOSE_UNAUTHENTICATED, str(exc.detail))
        return
    except UNREACHABLE as exc:  # Postgres or Redis out of reach: "come back", not a 403 nor silence
        logger.warning("websocket refused, a service is unreachable: %s: %s", type(exc).__name__, exc,
                       extra={"fields": {"room": room_id}})
        await _refuse(socket, CLOSE_TRY_AGAIN, "try again later")
        return
    except Exception:  # noqa: BLE001 - never let a bug end the handshake without a close code
        logger.exception("websocket handshake failed", extra={"fields": {"room": room_id}})
        await _refuse(socket, 1011, "internal error")
        return
    finally:
        if not checking.done():  # (timed out, or the handler cancelled: the client went away)
            checking.cancel()
            _LEFT.add(checking)
            checking.add_done_callback(_settled)
    if access is None:
        await _refuse(socket, CLOSE_FORBIDDEN, "no such room, or you may not join it")
        return
    if kicked is not None:
        await _refuse(socket, CLOSE_FORBIDDEN, f"kicked until {kicked.isoformat()}")
        return

    if user.role != "bot" and hub.sockets_of(user.id) >= state.settings.ws_max_per_user:  # bots bridge many rooms
        await _refuse(socket, CLOSE_TOO_MANY, f"too many open sockets (at most {state.settings.ws_max_per_user} "
                                              "per user on one server)")
        return
    await socket.accept()
    conn = Conn(hub, access, UserRef(id=user.id, name=user.name, role=user.role), socket.send,
                state.settings.ws_queue_max)
    conn.auth, conn.opened_at, conn.opened_mono = user, opened_at, opened_mono
    conn.main_task = asyncio.current_task()
    expiry = None
    if user.expires_at is not None:  # a token is checked when the socket opens; it also ends when the token does
        expiry = asyncio.get_running_loop().call_later(max(0.0, user.expires_at - time.time()), conn.close_soon,
                                                       CLOSE_UNAUTHENTICATED, "token expired")
    try:
        await hub.attach(conn)
        async with state.pool.acquire() as db:
            refused = await still_allowed(db, room_id, user, opened_at)
        if refused is not None:
            # a kick, a removal or a token revoked between the checks above and the attach never reached it
            conn.close_soon(*refused)
        else:
            await hub.welcome(conn, after)  # type: ignore[arg-type]
            if access.kind == "live" and user.role != "bot":  # attendance is of people, not of bridges
                try:
                    async with state.pool.acquire() as db:
                        conn.attendance_id = await live_repo.attendance_join(db, int(room_id.split(":")[1]),
                                                                             user.id, hub.proc)
                except asyncpg.ForeignKeyViolationError:  # the session was cancelled (or its course deleted)
                    conn.close_soon(CLOSE_FORBIDDEN, "room deleted")
        await _serve(socket, conn, user, hub)
    except asyncio.CancelledError:
        if conn.closing is None:
            raise
    except UNREACHABLE as exc:  # Redis (subscribing, presence) or Postgres out of reach: come back later
        logger.warning("websocket closed, a service is unreachable: %s: %s", type(exc).__name__, exc,
                       extra={"fields": {"room": room_id, "user_id": user.id}})
        conn.close_soon(CLOSE_TRY_AGAIN, "try again later")
    except Exception:  # noqa: BLE001 - never let a bug end the handler without a close code
        logger.exception("websocket handler failed", extra={"fields": {"room": room_id, "user_id": user.id}})
        conn.close_soon(1011, "internal error")
    finally:
        if expiry is not None:
            expiry.cancel()
        try:
            await asyncio.shield(_cleanup(state, hub, conn))
        except asyncio.CancelledError:
            pass


async def _cleanup(state, hub: Hub, conn: Conn) -> None:  # type: ignore[no-untyped-def]
    """Close the attendance row first (Postgres), then leave the room (memory, Redis presence): a failure of one
    must not skip the other, or the row would stay open for the rest of the session."""
    try:
        attendance_id, conn.attendance_id = conn.attendance_id, None  # (the hub reopens only rows still held)
        if attendance_id is not None:
            left_at = conn.db_now()
            try:
                async with state.pool.acquire() as db:
                    await live_repo.attendance_leave(db, attendance_id, left_at)
            except Exception:  # noqa: BLE001 - a blip must not leave the learner present for the whole session
                logger.warning("could not close attendance %s now; retrying", attendance_id, exc_info=True)
                hub.close_attendance_later(attendance_id, left_at)
    finally:
        if conn.typing_active and conn.user is not None:  # a tab closed mid-sentence: nobody is left typing
            try:
                await publish(hub.redis, room_topic(conn.room), Typing(room=conn.room, user=conn.user, active=False))
            except Exception:  # noqa: BLE001 - only the indicator is left behind
                logger.warning("could not clear a typing indicator", exc_info=True)
        await hub.detach(conn)


async def _serve(socket: WebSocket, conn: Conn, user: AuthUser, hub: Hub) -> None:
    receive = socket.receive
    sends = hub.send_limiter(user.role)  # (a bot's: BOT_SENDS times a person's; a bridge within it lost frames)
    rate = max(FRAME_RATE, 2 * sends.rate)
    burst = max(FRAME_BURST, 2 * sends.burst)
    tokens, last, told = burst, time.monotonic(), float("-inf")
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            return
        if conn.closing is not None:  # kicked, removed, revoked or cut off: nothing more is taken from it
            continue
        now = time.monotonic()
        tokens = min(burst, tokens + (now - last) * rate) - 1
        last = now
        if tokens < 0:  # a flood: not handled
            if tokens < -burst:
                conn.close_soon(CLOSE_TOO_MANY, "too many frames")
                continue
            # a post, edit or vote dropped is named (its ref or client_msg_id), so it can be sent again; the rest
            # (typing, pings, frames without a ref) get one unnamed notice a second
            ref = frames.ref_of(msg["text"], changing=True) if msg.get("text") is not None else None
            if ref is None:
                if now - told < 1.0:
                    continue
                told = now
            conn.push_event(Error(code="rate_limited", detail=f"more than {rate:g} frames a second; frames are "
                                  "being dropped" + (": this one was not handled" if ref else ""),
                                  # (when the frame sent then finds its token: the drop took one too)
                                  ref=ref, retry_after=round((1 - tokens) / rate, 3)))
            continue
        text = msg.get("text")
        if text is None:
            conn.push_event(Error(code="bad_frame", detail="send JSON text frames, not binary"))
            continue
        try:
            frame = frames.decode_frame(text)
        except frames.BadFrame as exc:
            conn.push_event(Error(code="bad_frame", detail=str(exc), ref=frames.ref_of(text)))
            continue
        try:
            await _handle(frame, conn, user, hub)
        except messages_repo.Refused as exc:
            conn.push_event(Error(code=exc.code, detail=exc.detail, ref=_ref(frame), retry_after=exc.retry_after))
            if exc.code == "kicked":  # the kick's own event never reached this socket: it goes now
                conn.close_soon(CLOSE_FORBIDDEN, "kicked")
            elif exc.code == messages_repo.ACCESS_REVOKED:  # so did the revocation's
                conn.close_soon(CLOSE_FORBIDDEN, "access revoked")
        except rooms_repo.RoomGone as exc:  # its course, pod or session was deleted (the socket is closing)
            conn.push_event(Error(code="not_found", detail=str(exc), ref=_ref(frame)))
        except ROLLED_BACK as exc:  # a deadlock, a serialization failure, a table migrated: nothing stored
            logger.warning("frame rolled back for a concurrent change: %s", exc,
                           extra={"fields": {"room": conn.room, "type": type(frame).__name__}})
            conn.push_event(Error(code="conflict", detail="a concurrent change got in the way; nothing was stored, "
                                                          "send it again", ref=_ref(frame), retry_after=1))
        except UNREACHABLE as exc:  # a line, not a traceback per frame for as long as the outage lasts
            logger.warning("frame failed, a service is unreachable: %s: %s", type(exc).__name__, exc,
                           extra={"fields": {"room": conn.room, "type": type(frame).__name__}})
            conn.push_event(Error(code="unavailable", detail=UNAVAILABLE, ref=_ref(frame), retry_after=5))
        except Exception:  # noqa: BLE001
            logger.exception("frame failed", extra={"fields": {"room": conn.room, "type": type(frame).__name__}})
            conn.push_event(Error(code="internal", detail="the server could not handle this frame", ref=_ref(frame)))


def _ref(frame: frames.ClientFrame) -> str | None:
    if frame.ref is not None:
        return frame.ref
    if isinstance(frame, frames.Resume):  # (named all the same: its client ignores events until a welcome)
        return "resume"
    return getattr(frame, "client_msg_id", None)


def _check_text(text: str, limit: int) -> str:
    if (problem := frames.text_problem(text, limit)) is not None:
        raise messages_repo.Refused(*problem)
    return text


async def _rate(hub: Hub, user: AuthUser, what: str = "messages") -> None:
    ok, wait = await hub.send_limiter(user.role).take(user.id)
    if not ok:
        raise messages_repo.Refused("rate_limited", f"too many {what}; retry in {wait:g}s",
                                    retry_after=round(wait, 3))




async def _handle(frame: frames.ClientFrame, conn: Conn, user: AuthUser, hub: Hub) -> None:
    settings = hub.settings
    if isinstance(frame, frames.MessageSend):
        text = _check_text(frame.text, settings.ws_max_text)
        relay_meta(user, frame.relay)  # a relay only a bot may send is refused before the budget is spent
        try:
            await _rate(hub, user)
        except messages_repo.Refused:
            # a re-send of a message already stored (after a reconnect) gets the original, budget or not
            original = await messages_repo.original(hub.pool, conn.room, user.id, frame.client_msg_id, text,
                                                    frame.reply_to, frames.relay_key(frame.relay))
            if original is None:
                raise
            conn.own(original.event.seq, original.payload.decode())
            return
        posted, refused = await post_mentioning(hub.app_state, user, conn.room, conn.access.course_id, text,
                                                frame.client_msg_id, frame.reply_to, frame.relay)
        if not posted.created:
            conn.own(posted.event.seq, posted.payload.decode())
        if refused is not None:  # the message stands; the tutor does not take it
            raise refused
    elif isinstance(frame, frames.TutorAsk):
        # the question is posted like any message, then the tutor replies to it
        text = _check_text(frame.text, min(settings.ws_max_text, MAX_QUESTION_CHARS))
        if frames.blank(question_of(text)):  # "@tutor" alone asks nothing: refused before anything is posted
            raise messages_repo.Refused("empty_question", EMPTY_QUESTION)
        meta = {"tutor_ask": True, **(relay_meta(user, frame.relay) or {})}
        await _tutor_ask(hub, conn, user, frame, text, meta)
    elif isinstance(frame, frames.MessageEdit):
        text = _check_text(frame.text, settings.ws_max_text)
        await _rate(hub, user)
        await messages_repo.edit_message(hub.pool, hub.redis, conn.room, frame.id, user.id, text)
    elif isinstance(frame, frames.MessageDelete):
        await _rate(hub, user)
        await messages_repo.delete_message(hub.pool, hub.redis, conn.room, frame.id, user.id,
                                           conn.access.moderator)
    elif isinstance(frame, frames.Typing):
        now = time.monotonic()
        # Throttled: a start at most every 2 s per connection (also when it alternates with stops, so a client
        # cannot flood the room), and per user and room across their sockets and processes (a Redis window); a
        # stop once after a start. Nobody sees a muted user typing.
        if frame.active:
            if now - conn.typing_at < TYPING_EVERY_S:
                return
            conn.typing_at = now
            if not await hub.redis.set(typing_window(conn.room, user.id), b"1", px=int(TYPING_EVERY_S * 1000),
                                       nx=True):
                return
            async with hub.pool.acquire() as db:
                if await moderation.muted_until(db, conn.room, user.id) is not None:
                    return
        elif not conn.typing_active:
            return
        conn.typing_active = frame.active
        await publish(hub.redis, room_topic(conn.room), Typing(room=conn.room, user=conn.user, active=frame.active,
                                                               expires_in=TYPING_EXPIRES_S if frame.active else 0.0))
    elif isinstance(frame, frames.Resume):
        wait = conn.resumed_at + RESUME_EVERY_S - time.monotonic()
        if wait > 0:
            raise messages_repo.Refused("rate_limited", f"one resume a second; retry in {wait:.2g}s",
                                        retry_after=round(wait, 3))
        # each re-reads up to a batch of events from Postgres: from the user's send budget too, shared by their
        # sockets on every process (one a second per socket let 50 sockets re-read 50 batches a second)
        await _rate(hub, user, "resumes")
        conn.resumed_at = time.monotonic()
        async with hub.pool.acquire() as db:  # a replay of the room's history is for who may still read it (a
            refused = await still_allowed(db, conn.room, user, conn.opened_at)  # removal's close may be lost)
        if refused is not None:
            conn.close_soon(*refused)
            return
        await hub.welcome(conn, frame.after_seq)
    elif isinstance(frame, frames.Ping):
        conn.push_event(Pong(ref=frame.ref))
    elif isinstance(frame, frames.PollVote):
        if conn.access.kind != "live":
            raise messages_repo.Refused("bad_frame", "poll.vote is for live session rooms")
        live_repo.check_voter(user.role)  # (before the budget: a bot's refused vote spends none)
        await _rate(hub, user)
        async with hub.pool.acquire() as db:
            await live_repo.vote(db, frame.poll_id, int(conn.room.split(":")[1]), user.id, frame.option,
                                 user.role)
        hub.poll_voted(frame.poll_id)


async def _tutor_ask(hub: Hub, conn: Conn, user: AuthUser, frame: frames.TutorAsk, text: str, meta: dict) -> None:
    """Post the question and start the tutor's answer, once per client_msg_id. A repeat of a question already asked
    (a re-send after a reconnect) gets the original back, whatever the slots, the send budget or the daily limit say
    now; so does a twin sent at once (a re-send on another server, a second tab): the first copy marks the ask as
    being taken (store.keys.asking) before it looks for an original, and its twins wait (up to TWIN_WAIT_S, this
    socket's other frames with them) for it to be posted rather than race it for a slot (the loser was told
    `tutor_busy` for a question that was posted and answered)."""
    async def repeat_of() -> messages_repo.Posted | None:
        return await messages_repo.original(hub.pool, conn.room, user.id, frame.client_msg_id, text,
                                            relay=frames.relay_key(frame.relay))

    # the mark: a lock of redis-py's (its token: released only by this copy, not once it lapsed and a twin took it)
    mark = (hub.redis.lock(keys.asking(conn.room, user.id, frame.client_msg_id), timeout=TWIN_MARK_S)
            if frame.client_msg_id is not None and user.role == "learner" else None)  # (others have no slots)
    posting = False
    try:
        first = mark is None or await mark.acquire(blocking=False)
    except (RedisError, OSError):  # (Redis out of reach: a repeat is still answered from Postgres, as before)
        first, mark = True, None
    if not first:
        deadline = asyncio.get_running_loop().time() + TWIN_WAIT_S
        while asyncio.get_running_loop().time() < deadline and await hub.redis.exists(mark.name):
            await asyncio.sleep(0.05)
        mark = None  # (the first copy posted it, or was refused: then this is taken as any ask)
    try:
        original = await repeat_of()
        if original is not None:
            conn.own(original.event.seq, original.payload.decode())
            return
        slot = await take_slot(hub.redis, user.id, user.role, hub.settings)  # refused before anything is posted
        if slot is None:
            raise messages_repo.Refused("tutor_busy", BUSY, retry_after=BUSY_RETRY_S)
        try:
            await _rate(hub, user)
            refused = await over_daily_limit(hub.app_state, user)  # refused before anything is posted
            if refused is not None:
                raise refused
        except BaseException:
            await free_slot(hub.redis, user.id, slot)
            raise
        # the question without its @tutor mentions, as for a message.send ("@tutor why?" searched "tutor" too);
        # one without a mention as written (its line breaks kept: a code snippet), as a REST ask
        posting = True
        posted = await post_asking(hub.app_state, user, conn.room, conn.access.course_id, text, meta,
                                   frame.client_msg_id, asked(text), slot)
    except asyncio.CancelledError:
        if posting:  # the post may go on, shielded: the mark lapses on its own (before it, a resend would wait)
            mark = None
        raise
    finally:
        if mark is not None:
            try:
                await mark.release()
            except LockError:  # it lapsed (a twin may hold it now): not this copy's to free
                pass
            except (RedisError, OSError):  # it lapses on its own
                logger.warning("could not unmark a tutor ask being taken", exc_info=True)
    if not posted.created:  # a repeat of a question already asked: it is answered (or being answered) once
        conn.own(posted.event.seq, posted.payload.decode())
