"""Asking the tutor on behalf of a user: limits, cache, sessions, the graph, accounting, room replies.

The REST API, the websocket handler and the CLI all come through `ask`; room replies through `answer_in_room`.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

import asyncpg

from agents.config import embedder_for
from agents.judge import candidates
from agents.llm import get_llm
from agents.tutor import REFUSED_PREFIX, Delta, Tutor
from ingest.replies import queue_check
from server.decode import person_name
from server.errors import UNREACHABLE, ApiError
from store import tutor as repo
from store.events import Error, TutorDelta, publish, room_topic, user_topic
from store.ratelimit import free_answer_slot, take_answer_slot
from store.frames import Relay, blank, relay_key
from store.messages import Posted, Refused, original, post_message
from store.rooms import RoomGone

logger = logging.getLogger(__name__)

ROOM_CONTEXT_MESSAGES = 10
# Tutor answers one learner may have under way at once, over all server processes (REST and rooms); more are
# refused with `tutor_busy`. A slot lapses on its own (`take_slot`) even if its process died holding it.
MAX_RUNNING_PER_USER = 2
SLOT_SPARE_S = 30  # a slot outlives the longest answer (the tutor's budget) by this much
MAX_QUESTION_CHARS = 2000  # over REST and in rooms
BUSY = f"the tutor is still answering your last {MAX_RUNNING_PER_USER} questions; ask again when they are done"
BUSY_RETRY_S = 5.0  # told with `tutor_busy`: an answer usually takes seconds
# "@tutor" as a word of its own: not in an address (bob@tutor.com), a link (…/@tutor/1), code (`@tutor`) or a
# longer name (@tutor-bot, @tutors)
TUTOR_MENTION = re.compile(r"(?<![\w@/`.-])@tutor(?![\w`/-])", re.IGNORECASE)


def answer_budget_s(settings: Any) -> float:
    """How long one answer may take with a model: condensing and the streamed reply, each request of which may
    take STUDYHALL_LLM_TIMEOUT_S (a reply arriving token by token may take longer than one request's timeout)."""
    return 2.5 * settings.llm_timeout_s


async def tutor_for(state: Any) -> Tutor:
    """One Tutor per process (it holds the compiled graph). The embedding model loads in a thread: loading it on
    the event loop stalled the process (sockets, presence heartbeats) for seconds at its first question."""
    tutor = getattr(state, "tutor", None)
    if tutor is None:
        embedder = await asyncio.to_thread(embedder_for, state.settings)
        tutor = getattr(state, "tutor", None) or Tutor(state.pool, embedder, get_llm(state.settings),
                                                       budget_s=answer_budget_s(state.settings))
        state.tutor = tutor
    return tutor


async def _room_history(conn, room_id: str, before_id: int | None,  # type: ignore[no-untyped-def]
                        asker_id: int) -> list[dict]:
    """The room's latest messages before the question, oldest first, each with its author's name; `mine` marks
    the asker's own (a follow-up continues the asker's thread, not whoever spoke last). A question the tutor
    answered carries the question as it was condensed (its turn is linked to the tutor's reply, which replies to
    it), with whether the answer was grounded (None: the tutor did not answer it): a second follow-up in a row keeps
    the topic, and chat in between is passed over. Messages a bot relayed are each their person's (named so):
    a bridge's people do not continue one another's threads."""
    rows = await conn.fetch(
        # (the last messages first, then their answers: a lateral join before the LIMIT looked up the answer of
        # every message of the room, 200 ms in a busy one)
        """SELECT m.body, m.author_role, m.author_id, coalesce(m.meta -> 'relay' ->> 'name', u.name, '') AS name,
                  m.meta -> 'relay' ->> 'id' IS NOT DISTINCT FROM
                      (SELECT q.meta -> 'relay' ->> 'id' FROM messages q WHERE q.id = $2) AS same_relay,
                  a.standalone, a.grounded
           FROM (SELECT id, room_id, seq, body, author_role, author_id, meta FROM messages
                 WHERE room_id = $1 AND deleted_at IS NULL AND ($2::bigint IS NULL OR id < $2)
                 ORDER BY seq DESC LIMIT $3) AS m
           LEFT JOIN users u ON u.id = m.author_id
           LEFT JOIN LATERAL (SELECT t.standalone, t.grounded FROM messages r JOIN tutor_turns t ON t.message_id = r.id
                              WHERE r.reply_to = m.id AND r.room_id = m.room_id AND r.author_role = 'tutor'
                              ORDER BY t.id DESC LIMIT 1) AS a ON true
           ORDER BY m.seq DESC""",
        room_id, before_id, ROOM_CONTEXT_MESSAGES)
    return [{"role": "assistant" if r["author_role"] == "tutor" else "user", "content": r["body"], "name": r["name"],
             "mine": r["author_id"] == asker_id and r["same_relay"], "standalone": r["standalone"] or None,
             "grounded": r["grounded"]} for r in reversed(rows)]


# Part of the answer cache's key: raised when stored answers would differ from new ones for the same content
# (2: Socratic citations without their quote; 3: follow-ups from the lecture's own questions and topic words;
# 4: a model's reply that cites nothing is not stored: it was, with its text; 5: a decline says when the question
# has no topic or is in another language; 6: one with no topic is declined whatever the search finds, and the
# question is searched without invisible marks and with full-width or styled letters folded; 7: an offline answer
# names when its quote is said, and citations carry `quote_at`; 8: a thank-you, a goodbye and the time get their own
# replies, what a question says about the asker holds no name it is declined for, and a question about a moment
# quotes what is said then).
ANSWER_FORMAT = 8


@dataclass(slots=True)
class Prepared:
    """An ask that passed its checks: its quota is taken and its context read; `complete` answers it."""

    question: str
    session_id: int | None  # None for a private ask without one: its session is made with its first turn
    room_id: str | None
    mode: str
    history: list[dict]
    version: str
    qhash: str
    cache_key: str
    cached: Any  # the stored turn for the same question on the same content, or None
    reserved: date | None  # the day a learner's question counts on (None: staff, unlimited)
    t0: float  # when the ask arrived (latency is measured from here)
    pending: int | None = None  # this answer's hold (tutor_pending), for survivors if this process dies


def _to_midnight_utc() -> float:
    """Seconds until the daily tutor quota resets (midnight UTC)."""
    now = datetime.now(timezone.utc)
    return (datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), timezone.utc) - now).total_seconds()


def _proc(state: Any) -> str | None:
    """The server process's id (its realtime hub's), which holds its answers under way; None outside a server."""
    hub = getattr(state, "hub", None)
    return getattr(hub, "proc", None)


async def prepare(state: Any, user: Any, course_id: int, question: str, *, session_id: int | None = None,
                  room_id: str | None = None, message_id: int | None = None, pending: int | None = None,
                  slot: str | None = None) -> Prepared:
    """Check and reserve: an unknown session is 404, a learner past today's limit 429 (the question is taken
    from the quota atomically, so concurrent asks cannot pass it together). Nothing is stored on an error.

    `pending` is a room question's hold (made with its message). A learner's REST ask gets a hold of its own
    here, with its answer `slot`, so the question goes back to the quota (and the slot is freed) even if this
    process dies before answering."""
    t0 = time.perf_counter()
    settings, pool = state.settings, state.pool
    own_hold = False
    # (a process's first ask loads the embedding model, for seconds: not while holding a connection, which a
    # burst of first asks after a deploy would take from everyone)
    tutor = await tutor_for(state)
    async with pool.acquire() as conn:
        history: list[dict] = []
        if session_id is not None:
            sess = await repo.get_session(conn, session_id, user.id)
            if sess is None or sess["course_id"] != course_id:
                raise ApiError(404, f"tutor session {session_id} not found", field="session_id")
            for t in await repo.session_turns(conn, session_id, limit=6):  # the latest six turns
                history += [{"role": "user", "content": t["question"], "standalone": t["standalone"],
                             "grounded": t["grounded"]},
                            {"role": "assistant", "content": t["answer"]}]
        elif room_id is not None:
            history = await _room_history(conn, room_id, message_id, user.id)
        reserved = None
        if user.role == "learner":
            proc = _proc(state)
            if pending is None and room_id is None and proc is not None:
                pending, own_hold = await repo.hold(conn, proc, user.id, course_id, slot=slot), True
            reserved = await repo.reserve_turn(conn, user.id, settings.tutor_daily_limit, pending)
            if reserved is None:
                # (a hold gone with its course, deleted meanwhile: nothing was taken, and no limit was reached)
                gone = pending is not None and not await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM tutor_pending WHERE id = $1)", pending)
                if own_hold:
                    await repo.drop_hold(conn, pending)
                if gone:
                    raise ApiError(404, f"course {course_id} not found")
                raise ApiError(429, f"daily tutor limit reached ({settings.tutor_daily_limit} questions); "
                                    "it resets at midnight UTC", code="daily_limit", retry_after=_to_midnight_utc())
        try:
            mode = await repo.tutor_mode(conn, course_id, room_id)
            version = await repo.content_version(conn, course_id)
            qhash = repo.question_hash(question, candidates(question)[0])
            # answers differ by mode and by model: both are part of the cache key
            # (ANSWER_FORMAT: answers stored before a change in what an answer carries are not served again)
            cache_key = f"{ANSWER_FORMAT}|{mode}|{tutor.llm.name + ':' + tutor.llm.model if tutor.llm else 'extractive'}"
            cached = None if history else await repo.cached_turn(conn, course_id, version, cache_key, qhash)
        except BaseException:
            if reserved is not None:
                await repo.release_turn(conn, user.id, reserved, pending)
            if own_hold:
                await repo.drop_hold(conn, pending)
            raise
    return Prepared(question, session_id, room_id, mode, history, version, qhash, cache_key, cached, reserved, t0,
                    pending)


async def complete(state: Any, user: Any, course_id: int, prep: Prepared, on_delta: Delta | None = None) -> dict:
    """Answer a prepared ask and store the turn (accounting, cache). An internal failure gives the reserved
    question back and raises."""
    pool, cached = state.pool, prep.cached
    recorded = False
    try:
        if cached is not None:
            result = {"answer": cached["answer"], "grounded": cached["grounded"], "citations": cached["citations"],
                      "follow_ups": cached["follow_ups"], "standalone": cached["standalone"],
                      "nearest": cached["nearest"],
                      "usage": {"provider": cached["provider"], "model": cached["model"], "input_tokens": 0,
                                "output_tokens": 0, "cost_usd": 0.0}, "error": None}
            if on_delta:
                await on_delta(cached["answer"])
        else:
            result = await (await tutor_for(state)).run(course_id, prep.question, history=prep.history, mode=prep.mode,
                                                on_delta=on_delta)
        usage = result.get("usage") or {}
        fields = dict(
            course_id=course_id, user_id=user.id, session_id=prep.session_id, room_id=prep.room_id,
            question=prep.question, standalone=result.get("standalone") or prep.question,
            answer=result.get("answer") or "", grounded=bool(result.get("grounded")),
            citations=result.get("citations") or [], follow_ups=result.get("follow_ups") or [],
            nearest=result.get("nearest") or [], mode=prep.mode,
            provider=usage.get("provider", "extractive"), model=usage.get("model", "extractive"),
            input_tokens=usage.get("input_tokens", 0), output_tokens=usage.get("output_tokens", 0),
            latency_ms=(time.perf_counter() - prep.t0) * 1000, cost_usd=usage.get("cost_usd"),
            cache_hit=cached is not None, error=result.get("error"))
        failed = bool(result.get("error"))

        async def record(conn: asyncpg.Connection, fields: dict, *, in_session: bool = True) -> asyncpg.Record:
            """The turn (with the session it opens, for a private ask without one), the cache entry and the
            hold's end, together: an ask that fails before this leaves no empty session behind."""
            nonlocal recorded
            async with conn.transaction():
                if in_session and prep.session_id is None and prep.room_id is None:
                    fields = {**fields, "session_id": (await repo.create_session(conn, course_id, user.id,
                                                                                  prep.question))["id"]}
                withdrawn = prep.pending is not None and await repo.question_withdrawn(conn, course_id, prep.pending)
                if withdrawn:  # the room question was deleted while it was being answered: its text goes too
                    fields = {**fields, "question": "", "standalone": ""}
                turn = await repo.record_turn(conn, **fields)
                if (cached is None and not prep.history and not failed and in_session and not withdrawn
                        and result.get("cacheable", True)):
                    await repo.remember(conn, course_id, prep.version, prep.cache_key, prep.qhash, turn["id"])
                if failed and prep.reserved is not None:
                    # the model failed mid-answer: the learner is told to ask again, so it is not counted
                    await repo.release_turn(conn, user.id, prep.reserved, prep.pending)
                if prep.pending is not None:  # a room reply is still to post; a REST answer is delivered now
                    if prep.room_id is not None:
                        await repo.hold_answered(conn, prep.pending, turn["id"])
                    else:
                        await repo.drop_hold(conn, prep.pending)
            recorded = True
            return turn

        async with pool.acquire() as conn:
            try:
                turn = await record(conn, fields)
            except asyncpg.ForeignKeyViolationError:
                # the session was deleted while its answer was being written: keep the turn's accounting (it
                # was asked and paid for), outside any session and without its text, as the delete erased the
                # session's other turns; the asker still gets the answer they were reading
                blank = {"question": "", "standalone": "", "answer": "", "citations": [], "follow_ups": [],
                         "nearest": []}
                kept = await record(conn, {**fields, **blank, "session_id": None}, in_session=False)
                turn = {**dict(kept), **{k: fields[k] for k in ("answer", "citations", "follow_ups")}}
    except BaseException:
        if not recorded:  # (a cancel can land after the commit, while the connection goes back to the pool)
            await _give_back(pool, user.id, prep.reserved, prep.pending)
            if prep.pending is not None and prep.room_id is None:
                await _drop_hold(pool, prep.pending)
        raise
    return {"answer": turn["answer"], "grounded": turn["grounded"], "citations": turn["citations"],
            "follow_ups": turn["follow_ups"], "nearest": result.get("nearest") or [], "session_id": turn["session_id"],
            "turn_id": turn["id"], "mode": prep.mode, "cached": cached is not None,
            "error": public_error(result.get("error"))}


async def _give_back(pool: Any, user_id: int, day: date | None, pending: int | None) -> None:
    """Return a reserved question to the learner's daily quota (None: staff, nothing was taken). If this fails,
    the hold still has it, for a survivor to give back should this process die."""
    if day is None:
        return
    try:
        async with pool.acquire() as conn:
            await repo.release_turn(conn, user_id, day, pending)
    except Exception:  # noqa: BLE001
        logger.warning("could not give back a tutor question", exc_info=True)


async def _drop_hold(pool: Any, pending: int) -> None:
    """The answer is delivered (or the asker told why not): nothing is left for a survivor to do. If this fails,
    the hold stays until this process's own sweep or its end (`recover` then finds nothing left to do but delete
    it, and the reply, posted once, is not posted again)."""
    try:
        async with pool.acquire() as conn:
            await repo.drop_hold(conn, pending)
    except Exception:  # noqa: BLE001
        logger.warning("could not drop a tutor hold", exc_info=True)


async def ask(state: Any, user: Any, course_id: int, question: str, *, session_id: int | None = None,
              room_id: str | None = None, message_id: int | None = None, on_delta: Delta | None = None,
              pending: int | None = None, slot: str | None = None) -> dict:
    """Answer `question` for `user` in `course_id`. Raises ApiError for limits and unknown sessions."""
    prep = await prepare(state, user, course_id, question, session_id=session_id, room_id=room_id,
                         message_id=message_id, pending=pending, slot=slot)
    return await complete(state, user, course_id, prep, on_delta)


class RoomQuestion:
    """Passed to `post_message` as `also`: records the hold of the answer to come in the question's own
    transaction, so no room question can be left without either an answer under way or a hold for survivors."""

    def __init__(self, proc: str, user_id: int, course_id: int, room_id: str, slot: str | None = None) -> None:
        self.proc, self.user_id, self.course_id, self.room_id, self.slot = proc, user_id, course_id, room_id, slot
        self.pending: int | None = None

    async def __call__(self, conn: asyncpg.Connection, message_id: int) -> None:
        self.pending = await repo.hold(conn, self.proc, self.user_id, self.course_id, self.room_id, message_id,
                                       slot=self.slot)


INTERRUPTED = "I was interrupted by a server restart before I could answer. Please ask again."


async def answer_in_room(state: Any, user: Any, course_id: int, room_id: str, message_id: int, question: str,
                         pending: int | None = None) -> None:
    """Stream the tutor's reply into a room, then post it as a stored, resumable `message.new`; then drop the
    answer's hold (`pending`). A hold whose reply was never posted (a failure, or a cancel while posting) stays
    for `recover`: at this process's stop, or by a survivor if it dies."""
    told = [False]  # set once the reply (or the asker's own error) is out
    try:
        await _answer_in_room(state, user, course_id, room_id, message_id, question, pending, told)
    finally:
        if told[0] and pending is not None:
            await _drop_hold(state.pool, pending)


async def _answer_in_room(state: Any, user: Any, course_id: int, room_id: str, message_id: int, question: str,
                          pending: int | None, told: list[bool]) -> None:
    redis = state.redis

    async def on_delta(text: str) -> None:
        if text:
            await publish(redis, room_topic(room_id), TutorDelta(room=room_id, reply_to=message_id, text=text))

    try:
        result = await ask(state, user, course_id, question, room_id=room_id, message_id=message_id,
                           on_delta=on_delta, pending=pending)
    except ApiError as exc:  # the asker's own limit: theirs to see, not the room's
        await publish(redis, user_topic(user.id), Error(code=exc.code, detail=exc.detail, ref=str(message_id),
                                                        retry_after=exc.retry_after))
        told[0] = True
        return
    except asyncio.CancelledError:  # the server is stopping: the question gets a reply, not silence
        # a cancel can land after the answer was recorded (and its question counted): then that answer is the reply
        turn = await _recorded_turn(state.pool, pending)
        await _reply(state.pool, redis, room_id, message_id,
                     _from_turn(turn) if turn is not None else _failed(INTERRUPTED, "interrupted"))
        told[0] = True
        raise
    except Exception as exc:  # noqa: BLE001 - the asker must hear something, never silence
        if await _course_gone(state.pool, course_id):  # deleted meanwhile: its room and asker's socket with it
            logger.info("tutor answer in %s dropped: its course was deleted meanwhile (%s)", room_id,
                        type(exc).__name__)
            told[0] = True
            return
        logger.exception("tutor failed in %s", room_id)
        result = _failed("Sorry, I could not answer that just now. Please ask again.", "internal error")
    await _reply_when_possible(state.pool, redis, room_id, message_id, result)
    told[0] = True


async def _course_gone(pool: Any, course_id: int) -> bool:
    """Whether the course was deleted (False when that cannot be told: Postgres away)."""
    try:
        async with pool.acquire() as conn:
            return not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM courses WHERE id = $1)", course_id)
    except Exception:  # noqa: BLE001
        return False


REPLY_RETRY_S = 600.0  # how long a reply that cannot be posted (Postgres away) is tried again
REPLY_BACKOFF_MAX_S = 30.0


async def _reply_when_possible(pool: Any, redis: Any, room_id: str, message_id: int, result: dict) -> None:
    """`_reply`, tried again while Postgres (or Redis) cannot be reached, backing off to REPLY_BACKOFF_MAX_S: the
    answer (or the failure the asker is owed) is posted once they are back. A reply that failed once had waited,
    unposted, until this process stopped (survivors settle only the holds of processes that are gone); one that
    fails past REPLY_RETRY_S is settled by this process's own sweep (`own_stale_after_s`). Posting
    is idempotent (the reply's client_msg_id), so a try whose commit landed is not posted twice."""
    delay, deadline = 0.5, time.monotonic() + REPLY_RETRY_S
    while True:
        try:
            await _reply(pool, redis, room_id, message_id, result)
            return
        except RoomGone:  # (its course, pod or session deleted while the answer was written: nobody to tell)
            logger.info("tutor reply in %s dropped: the room was deleted meanwhile", room_id)
            return
        except UNREACHABLE as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("could not post the tutor's reply in %s (%s: %s); trying again in %.1f s", room_id,
                           type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(REPLY_BACKOFF_MAX_S, delay * 2)


async def _recorded_turn(pool: Any, pending: int | None) -> asyncpg.Record | None:
    """The turn recorded for a room question's hold (None: not recorded yet, or no hold)."""
    if pending is None:
        return None
    async with pool.acquire() as conn:
        turn_id = await conn.fetchval("SELECT turn_id FROM tutor_pending WHERE id = $1", pending)
        return await repo.get_turn(conn, turn_id) if turn_id is not None else None


# What askers (and a room) are told when the model failed: the provider's own words can quote the API key it
# was given ("Incorrect API key provided: sk-wr***ng") and say nothing a learner can act on; they stay in the
# log and in the turn's record.
MODEL_FAILED = "the tutor's language model failed; please ask again"
MODEL_REFUSED = "the tutor's language model would not answer this; try asking it another way"
_OUR_ERRORS = frozenset({"interrupted", "internal error"})


def public_error(error: str | None) -> str | None:
    """The failure as the asker sees it (None: no failure)."""
    if not error:
        return None
    if error in _OUR_ERRORS or error in (MODEL_REFUSED, MODEL_FAILED):  # (public already: a room's reply read a
        return error                                                  # refusal's as a failure, "please ask again")
    return MODEL_REFUSED if error.startswith(REFUSED_PREFIX) else MODEL_FAILED


def _failed(text: str, error: str) -> dict:
    return {"answer": text, "grounded": False, "citations": [], "follow_ups": [], "nearest": [], "turn_id": None,
            "error": error}


async def _reply(pool: Any, redis: Any, room_id: str, message_id: int, result: dict) -> None:
    """Post the tutor's reply to a room question (once: a second reply to the same question is not stored)."""
    if result.get("error"):
        await publish(redis, room_topic(room_id), Error(code="tutor_failed", detail=public_error(result["error"]),
                                                        ref=str(message_id)))
    meta = {"citations": result["citations"], "grounded": result["grounded"], "follow_ups": result["follow_ups"],
            "nearest": result["nearest"], "reply_to": message_id, "turn_id": result["turn_id"]}
    turn_id = result.get("turn_id")

    async def link(conn: Any, reply_id: int) -> None:
        await conn.execute("UPDATE tutor_turns SET message_id = $2 WHERE id = $1", turn_id, reply_id)

    # the turn learns its reply in the reply's own transaction: linked afterwards, a moderator deleting the reply in
    # between (or a crash) left the answer's text in the tutor's record and in the cache for the next asker
    posted = await post_message(pool, redis, room_id, None, result["answer"] or "…", meta,
                                client_msg_id=f"tutor:{message_id}", author_name="Tutor", author_role="tutor",
                                also=link if turn_id else None, reply_to=message_id)
    if turn_id and not posted.created:  # the reply was there already (posted before the turn knew it)
        async with pool.acquire() as conn:
            await link(conn, posted.event.id)


async def drain(state: Any, timeout: float) -> None:
    """At shutdown: let answers under way finish for `timeout` seconds, then stop the rest (a room question
    gets an 'interrupted' reply, a learner's reserved question is given back) before the pools close."""
    tasks = [t for t in getattr(state, "tutor_tasks", ()) if not t.done()]
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        logger.warning("stopped %d tutor answers at shutdown", len(pending))
        await asyncio.wait(pending, timeout=5)


def track(state: Any, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
    """Run a tutor answer in the background: the server waits for running answers on shutdown, and a failure
    is logged."""
    tasks: set[asyncio.Task] | None = getattr(state, "tutor_tasks", None)
    if tasks is None:
        tasks = state.tutor_tasks = set()
    task = asyncio.create_task(coro)
    tasks.add(task)

    def done(t: asyncio.Task) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            logger.error("tutor answer failed", exc_info=t.exception())

    task.add_done_callback(done)
    return task


async def take_slot(redis: Any, user_id: int, role: str, settings: Any) -> str | None:
    """One of a learner's MAX_RUNNING_PER_USER answer slots, or None when all are in use (`tutor_busy`). Staff
    and bots (a Discord bot asks for many people) are not limited: their slot is "" and holds nothing. A slot
    lapses on its own (its process may die holding it), after the longest an answer may take."""
    if role != "learner":
        return ""
    ttl_ms = int((answer_budget_s(settings) + SLOT_SPARE_S) * 1000)
    return await take_answer_slot(redis, user_id, MAX_RUNNING_PER_USER, ttl_ms)


async def free_slot(redis: Any, user_id: int, slot: str) -> None:
    if not slot:
        return
    try:
        await free_answer_slot(redis, user_id, slot)
    except Exception:  # noqa: BLE001 - it lapses on its own
        logger.warning("could not free a tutor slot", exc_info=True)


def start_room_answer(state: Any, user: Any, course_id: int, room_id: str, message_id: int, question: str,
                      slot: str, pending: int | None = None) -> None:
    """Run `answer_in_room` in the background, holding `slot` (from `take_slot`) until it is done."""
    async def run() -> None:
        try:
            await answer_in_room(state, user, course_id, room_id, message_id, question, pending)
        finally:
            await free_slot(state.redis, user.id, slot)

    track(state, run())


# --- answers a dead process left -----------------------------------------------------------------------------

# A hold whose process is not listed at all (it stopped without settling it, or Redis lost the list) is taken
# over once it is this old, and older than any answer may take (`orphan_after_s`).
ORPHAN_AFTER_S = 600.0


def orphan_after_s(settings: Any) -> float:
    return max(ORPHAN_AFTER_S, answer_budget_s(settings) + SLOT_SPARE_S)


OWN_STALE_SPARE_S = 120.0


def own_stale_after_s(settings: Any) -> float:
    """A hold of a live process this old has no answer working on it: longer than an answer may take, then its
    reply's tries while Postgres is away, and a spare for a try's own wait on the pool."""
    return orphan_after_s(settings) + REPLY_RETRY_S + OWN_STALE_SPARE_S


RECOVER_BATCH = 50


def _from_turn(turn: asyncpg.Record) -> dict:
    return {"answer": turn["answer"], "grounded": turn["grounded"], "citations": turn["citations"],
            "follow_ups": turn["follow_ups"], "nearest": turn["nearest"], "turn_id": turn["id"], "error": turn["error"]}


async def recover(pool: Any, redis: Any, procs: list[str], older_than_s: float = 0.0) -> int:
    """Settle the holds (older than `older_than_s`) of server processes that no longer answer them: a room
    question gets its reply (the recorded answer when there is one, else "interrupted, ask again"), a reserved
    question goes back to the learner's quota, its answer slot is freed, and the hold goes. Safe to run from several
    processes at once (holds are locked; a reply is posted once). Returns the number of holds settled."""
    done = 0
    while True:
        async with pool.acquire() as conn:
            async with conn.transaction():
                rows = await repo.claim_holds(conn, procs, RECOVER_BATCH, older_than_s)  # (their courses first)
                for r in rows:  # the replies first: no quota row is locked while they are posted
                    if r["room_id"] is not None and r["message_id"] is not None:
                        turn = await repo.get_turn(conn, r["turn_id"]) if r["turn_id"] is not None else None
                        try:
                            await _reply(pool, redis, r["room_id"], r["message_id"],
                                         _from_turn(turn) if turn is not None else _failed(INTERRUPTED, "interrupted"))
                        except LookupError:  # the room is gone: there is no one to tell
                            pass
                for r in rows:
                    if r["reserved"] is not None:
                        await repo.release_turn(conn, r["user_id"], r["reserved"], r["id"])
                    await repo.drop_hold(conn, r["id"])
        for r in rows:  # the learner may ask again at once (the slot lapsed only after the longest answer's time)
            if r["slot"]:
                await free_slot(redis, r["user_id"], r["slot"])
        done += len(rows)
        if rows:
            logger.info("settled tutor answers left by a server process",
                        extra={"fields": {"procs": procs, "holds": len(rows)}})
        if len(rows) < RECOVER_BATCH:
            return done


async def settle_own(state: Any, proc: str, timeout: float = 15.0) -> None:
    """At this process's stop, before it leaves the list of live processes (after which survivors would take
    its answers over): wait for the answers under way (the drain that began with the stop cuts them short),
    then settle the holds they could not (a reply that failed or was cut while being posted)."""
    await drain(state, timeout)
    try:
        await recover(state.pool, state.redis, [proc])
    except Exception:  # noqa: BLE001 - they are settled by a survivor later
        logger.warning("could not settle this process's tutor answers at stop", exc_info=True)


# --- room posts that ask the tutor (websocket frames and REST share these) ----------------------------------

async def post_asking(state: Any, user: Any, room_id: str, course_id: int, text: str, meta: dict | None,
                      client_msg_id: str | None, question: str | None, slot: str | None,
                      reply_to: int | None = None) -> Posted:
    """Post a message; with a tutor `slot` (from `take_slot`) the tutor answers `question` in reply, and the
    answer's hold is stored with the message. The slot is freed when there is nothing to answer (an error, or
    a repeat of a message already posted: `created` is False and nothing is answered again). A learner's reply
    (`reply_to`) to someone else's message is queued for the tutor's check (ingest/replies.py)."""
    if slot is None:
        posted = await post_message(state.pool, state.redis, room_id, user.id, text, meta, client_msg_id,
                                    reply_to=reply_to)
        if posted.check_reply:
            await queue_check(state.arq, posted.event.id)
        return posted
    proc = _proc(state)
    asking = RoomQuestion(proc, user.id, course_id, room_id, slot) if proc is not None else None

    async def post_then_answer() -> Posted:
        try:
            posted = await post_message(state.pool, state.redis, room_id, user.id, text, meta, client_msg_id,
                                        also=asking, reply_to=reply_to)
        except BaseException:
            await free_slot(state.redis, user.id, slot)
            raise
        if posted.check_reply:
            await queue_check(state.arq, posted.event.id)
        if posted.created:
            start_room_answer(state, user, course_id, room_id, posted.event.id, question or text, slot,
                              asking.pending if asking is not None else None)
        else:
            await free_slot(state.redis, user.id, slot)
        return posted

    # shielded: a socket closed mid-post (a kick, a slow consumer) must not leave a stored question unanswered
    task = asyncio.ensure_future(post_then_answer())
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read, also when nobody awaits it any more
    return await asyncio.shield(task)


async def over_daily_limit(state: Any, user: Any) -> Refused | None:
    """`daily_limit` for a learner whose quota is already used up, said before anything is posted or started
    (so a REST caller hears it too); the answer's own reservation stays the real check."""
    if user.role != "learner":
        return None
    limit = state.settings.tutor_daily_limit
    async with state.pool.acquire() as conn:
        if await repo.used_today(conn, user.id) < limit:
            return None
    return Refused("daily_limit", f"daily tutor limit reached ({limit} questions); it resets at midnight UTC",
                   retry_after=_to_midnight_utc())


def question_of(text: str) -> str:
    """What a message or question asks the tutor: its text without the `@tutor` mentions (blank when that is all
    it holds)."""
    return " ".join(TUTOR_MENTION.sub(" ", text).split())


EMPTY_QUESTION = "write your question after @tutor"


def asked(text: str) -> str:
    """What a REST or CLI ask puts to the tutor: the question as written, or without its @tutor mentions when it has
    any, as in rooms ("@tutor why?" asks "why?"; the mention's word searched the transcripts too)."""
    return question_of(text) if TUTOR_MENTION.search(text) else text


def relay_meta(user: Any, relay: Relay | None) -> dict | None:
    """The meta of a message a bot posts for someone (`relay`: see store.frames.Relay), the name read as a person's
    name is (composed, without invisible format characters); Refused for anyone but a bot, or a blank name."""
    if relay is None:
        return None
    if user.role != "bot":
        raise Refused("forbidden", "only bots relay messages for others (relay)")
    try:
        name = person_name(relay.name, "relay.name")
    except ApiError as exc:
        raise Refused("bad_frame", exc.detail) from exc
    return {"relay": {"id": relay.key, "name": name}}


async def post_mentioning(state: Any, user: Any, room_id: str, course_id: int, text: str,
                          client_msg_id: str | None, reply_to: int | None = None,
                          relay: Relay | None = None) -> tuple[Posted, Refused | None]:
    """Post a message; one that mentions @tutor asks it (the question is the message without the mention).
    The message stands even when the tutor does not take the question (too long, `daily_limit` already reached,
    or `tutor_busy`): that refusal is returned, for the asker only (None for a repeat of a message already
    posted). A bot's `relay` names the person it posts for (in the message's meta)."""
    meta = relay_meta(user, relay)
    refused, question, slot = None, None, None
    if TUTOR_MENTION.search(text):
        repeat = await original(state.pool, room_id, user.id, client_msg_id, text, reply_to,
                                relay_key(relay))
        if repeat is not None:  # answered (or being answered) once: no slot for it, no refusal
            return repeat, None
        question = question_of(text)
        if blank(question):  # "@tutor" alone asks nothing (and costs nothing)
            question, refused = None, Refused("empty_question", EMPTY_QUESTION)
        elif len(question) > MAX_QUESTION_CHARS:
            refused = Refused("too_long", f"a question to the tutor is at most {MAX_QUESTION_CHARS} characters")
        elif (over := await over_daily_limit(state, user)) is not None:
            refused = over
        else:
            slot = await take_slot(state.redis, user.id, user.role, state.settings)
            if slot is None:
                refused = Refused("tutor_busy", BUSY, retry_after=BUSY_RETRY_S)
    posted = await post_asking(state, user, room_id, course_id, text, meta, client_msg_id, question, slot, reply_to)
    return posted, refused if posted.created else None
