"""Asking the tutor on behalf of a user: limits, cache, sessions, the graph, accounting, room replies.

The REST API, the websocket handler and the CLI all come through `ask`; room replies through `answer_in_room`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from agents.config import embedder_for
from agents.llm import get_llm
from agents.tutor import Delta, Tutor
from server.errors import ApiError
from store import tutor as repo
from store.events import Error, TutorDelta, publish, room_topic
from store.messages import post_message

logger = logging.getLogger(__name__)

ROOM_CONTEXT_MESSAGES = 10


def tutor_for(state: Any) -> Tutor:
    """One Tutor per process (it holds the compiled graph)."""
    tutor = getattr(state, "tutor", None)
    if tutor is None:
        tutor = Tutor(state.pool, embedder_for(state.settings), get_llm(state.settings))
        state.tutor = tutor
    return tutor


async def _room_history(conn, room_id: str, before_id: int | None) -> list[dict]:  # type: ignore[no-untyped-def]
    rows = await conn.fetch(
        """SELECT body, author_role FROM messages WHERE room_id = $1 AND deleted_at IS NULL
           AND ($2::bigint IS NULL OR id < $2) ORDER BY seq DESC LIMIT $3""",
        room_id, before_id, ROOM_CONTEXT_MESSAGES)
    return [{"role": "assistant" if r["author_role"] == "tutor" else "user", "content": r["body"]}
            for r in reversed(rows)]


async def ask(state: Any, user: Any, course_id: int, question: str, *, session_id: int | None = None,
              room_id: str | None = None, message_id: int | None = None, on_delta: Delta | None = None) -> dict:
    """Answer `question` for `user` in `course_id`. Raises ApiError for limits and unknown sessions."""
    t0 = time.perf_counter()
    settings, pool = state.settings, state.pool
    async with pool.acquire() as conn:
        if user.role == "learner" and await repo.turns_today(conn, user.id) >= settings.tutor_daily_limit:
            raise ApiError(429, f"daily tutor limit reached ({settings.tutor_daily_limit} questions); "
                                "it resets at midnight UTC", code="daily_limit")
        mode = await repo.tutor_mode(conn, course_id, room_id)
        history: list[dict] = []
        if session_id is not None:
            sess = await repo.get_session(conn, session_id, user.id)
            if sess is None or sess["course_id"] != course_id:
                raise ApiError(404, f"tutor session {session_id} not found", field="session_id")
            for t in (await repo.session_turns(conn, session_id))[-6:]:
                history += [{"role": "user", "content": t["question"]}, {"role": "assistant", "content": t["answer"]}]
        elif room_id is not None:
            history = await _room_history(conn, room_id, message_id)
        else:
            sess = await repo.create_session(conn, course_id, user.id, question)
            session_id = sess["id"]
        version = await repo.content_version(conn, course_id)
        qhash = repo.question_hash(question)
        tutor = tutor_for(state)
        # answers differ by mode and by model: both are part of the cache key
        cache_key = f"{mode}|{tutor.llm.name + ':' + tutor.llm.model if tutor.llm else 'extractive'}"
        cached = None if history else await repo.cached_turn(conn, course_id, version, cache_key, qhash)
    if cached is not None:
        result = {"answer": cached["answer"], "grounded": cached["grounded"], "citations": cached["citations"],
                  "follow_ups": cached["follow_ups"], "standalone": cached["standalone"], "nearest": [],
                  "usage": {"provider": cached["provider"], "model": cached["model"], "input_tokens": 0,
                            "output_tokens": 0, "cost_usd": 0.0}, "error": None}
        if on_delta:
            await on_delta(cached["answer"])
    else:
        result = await tutor.run(course_id, question, history=history, mode=mode, on_delta=on_delta)
    usage = result.get("usage") or {}
    latency = (time.perf_counter() - t0) * 1000
    async with pool.acquire() as conn, conn.transaction():
        turn = await repo.record_turn(
            conn, course_id=course_id, user_id=user.id, session_id=session_id, room_id=room_id,
            question=question, standalone=result.get("standalone") or question, answer=result.get("answer") or "",
            grounded=bool(result.get("grounded")), citations=result.get("citations") or [],
            follow_ups=result.get("follow_ups") or [], mode=mode, provider=usage.get("provider", "extractive"),
            model=usage.get("model", "extractive"), input_tokens=usage.get("input_tokens", 0),
            output_tokens=usage.get("output_tokens", 0), latency_ms=latency, cost_usd=usage.get("cost_usd"),
            cache_hit=cached is not None, error=result.get("error"))
        if cached is None and not history and not result.get("error"):
            await repo.remember(conn, course_id, version, cache_key, qhash, turn["id"])
    return {"answer": turn["answer"], "grounded": turn["grounded"], "citations": turn["citations"],
            "follow_ups": turn["follow_ups"], "nearest": result.get("nearest") or [], "session_id": session_id,
            "turn_id": turn["id"], "mode": mode, "cached": cached is not None, "error": result.get("error")}


async def answer_in_room(state: Any, user: Any, course_id: int, room_id: str, message_id: int, question: str) -> None:
    """Stream the tutor's reply into a room, then post it as a stored, resumable `message.new`."""
    redis = state.redis

    async def on_delta(text: str) -> None:
        if text:
            await publish(redis, room_topic(room_id), TutorDelta(room=room_id, reply_to=message_id, text=text))

    try:
        result = await ask(state, user, course_id, question, room_id=room_id, message_id=message_id,
                           on_delta=on_delta)
    except ApiError as exc:
        await publish(redis, room_topic(room_id), Error(code=exc.code, detail=exc.detail, ref=str(message_id)))
        return
    except Exception:  # noqa: BLE001 - the asker must hear something, never silence
        logger.exception("tutor failed in %s", room_id)
        result = {"answer": "Sorry, I could not answer that just now. Please ask again.", "grounded": False,
                  "citations": [], "follow_ups": [], "nearest": [], "turn_id": None, "error": "internal error"}
    if result.get("error"):
        await publish(redis, room_topic(room_id), Error(code="tutor_failed", detail=result["error"],
                                                        ref=str(message_id)))
    meta = {"citations": result["citations"], "grounded": result["grounded"], "follow_ups": result["follow_ups"],
            "nearest": result["nearest"], "reply_to": message_id, "turn_id": result["turn_id"]}
    posted = await post_message(state.pool, redis, room_id, None, result["answer"] or "…", meta,
                                client_msg_id=f"tutor:{message_id}", author_name="Tutor", author_role="tutor")
    if result.get("turn_id"):
        async with state.pool.acquire() as conn:
            await conn.execute("UPDATE tutor_turns SET message_id = $2 WHERE id = $1", result["turn_id"],
                               posted.event.id)


def schedule_room_answer(state: Any, user: Any, course_id: int, room_id: str, message_id: int, question: str) -> None:
    """Run `answer_in_room` in the background; the server waits for running answers on shutdown."""
    tasks: set | None = getattr(state, "tutor_tasks", None)
    if tasks is None:
        tasks = state.tutor_tasks = set()
    task = asyncio.create_task(answer_in_room(state, user, course_id, room_id, message_id, question))
    tasks.add(task)
    task.add_done_callback(tasks.discard)
