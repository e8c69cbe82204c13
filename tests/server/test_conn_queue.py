"""A connection's outbound queue, without a server: a replay leaves room for live frames, and a `resume`
drops only the room events it will send again."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from server.realtime.conn import Conn, text_frame
from store.rooms import RoomAccess

ACCESS = RoomAccess(room_id="course:1", kind="course", course_id=1, tenant_id=1, moderator=False)


def _event(seq: int) -> str:
    return json.dumps({"type": "message.new", "id": seq, "seq": seq, "room": "course:1", "text": f"m{seq}"},
                      separators=(",", ":"))


def _paused() -> tuple[Conn, list]:
    """A connection whose peer reads nothing (every send waits), over a room log of 5,000 events."""
    stalled = asyncio.get_running_loop().create_future()
    sent: list = []

    async def send(msg: dict) -> None:
        sent.append(msg)
        await stalled

    async def events_after(room: str, after: int, limit: int) -> list[tuple[int, str]]:
        return [(s, _event(s)) for s in range(after + 1, min(after + limit, 5000) + 1)]

    hub = SimpleNamespace(events_after=events_after)
    conn = Conn(hub, ACCESS, SimpleNamespace(id=7, name="u", role="learner"), send, 8)  # type: ignore[arg-type]
    return conn, sent


async def test_a_slow_replay_leaves_room_for_live_frames():
    conn, _ = _paused()
    conn.ready, conn.filling = True, False
    conn.start_fill()
    await asyncio.sleep(0.05)
    assert len(conn.out) == 6  # three quarters of the queue: the replay waits there
    for i in range(2):  # a pong, typing: they fit, and do not cut a reader that is only slow to replay
        conn.push(text_frame(json.dumps({"type": "pong", "ref": str(i)})))
    assert conn.closing is None and len(conn.out) == 8
    conn.push(text_frame(json.dumps({"type": "pong", "ref": "over"})))  # past the whole queue: a slow consumer
    assert conn.closing is not None and conn.closing[0] == 4008
    conn.fill_task.cancel()


async def test_resume_keeps_queued_errors_and_personal_events():
    conn, sent = _paused()
    conn.ready, conn.filling = True, False
    conn.push(text_frame(json.dumps({"type": "pong", "ref": "first"})))  # waits for the transport (in flight)
    conn.offer(1, text_frame(_event(1)))
    error = text_frame(json.dumps({"type": "error", "code": "rate_limited", "detail": "slow down", "ref": "x"}))
    conn.push(error)
    conn.offer(2, text_frame(_event(2)))
    assert len(conn.out) == 3
    conn.restart(0)
    assert list(conn.out) == [error]  # the room events come again with the new stream; the error is kept
    assert len(sent) == 1


async def test_resume_keeps_the_reply_to_a_re_sent_message():
    """A message re-sent on a connection opened after its original (`?after=` past it) gets that original as its
    reply; a `resume` while it was queued dropped it with the room events, and the new stream (after a seq past
    it) never sent it: the client's re-send went unanswered. A resume from before it leaves it to the stream."""
    for after, kept in ((100, True), (50, False)):
        conn, sent = _paused()
        conn.ready, conn.filling = True, False
        conn.last_seq = conn.start_seq = 100
        conn.push(text_frame(json.dumps({"type": "pong", "ref": "first"})))  # in flight
        conn.own(90, _event(90))  # the original of the re-sent message
        conn.offer(101, text_frame(_event(101)))
        conn.restart(after)
        assert [json.loads(m["text"]).get("seq") for m in conn.out] == ([90] if kept else []), after
        if conn.fill_task is not None:
            conn.fill_task.cancel()


async def test_the_queue_is_bounded_by_its_text_too(monkeypatch):
    """A count of frames alone let a replay of the largest messages (4,000 emoji: 16 KB each) hold 750 of them,
    ~12 MB, per socket of a reader that reads nothing. The replay also waits at three quarters of
    QUEUE_MAX_CHARS of text, and a live frame past the whole of it closes the connection (4008)."""
    from server.realtime import conn as conn_module

    monkeypatch.setattr(conn_module, "QUEUE_MAX_CHARS", 5_000, raising=False)
    big = lambda s: json.dumps({"type": "message.new", "id": s, "seq": s, "room": "course:1",  # noqa: E731
                                "text": "x" * 900}, separators=(",", ":"))
    stalled = asyncio.get_running_loop().create_future()

    async def send(msg: dict) -> None:
        await stalled

    async def events_after(room: str, after: int, limit: int) -> list[tuple[int, str]]:
        return [(s, big(s)) for s in range(after + 1, min(after + limit, 5000) + 1)]

    conn = Conn(SimpleNamespace(events_after=events_after), ACCESS, SimpleNamespace(id=7, name="u", role="learner"),
                send, 1000)  # type: ignore[arg-type]
    conn.ready, conn.filling = True, False
    conn.start_fill()
    await asyncio.sleep(0.05)
    assert len(conn.out) == 4 and 3_750 <= conn.out_chars < 5_000  # the replay waits at three quarters of the text
    conn.push(text_frame(big(10_000)))  # a live frame still fits
    assert conn.closing is None and conn.out_chars == sum(len(m["text"]) for m in conn.out)
    conn.push(text_frame(big(10_001)))  # past the whole budget: a slow consumer, as with too many frames
    assert conn.closing is not None and conn.closing[0] == 4008
    conn.fill_task.cancel()


async def test_a_replay_postgres_cannot_serve_closes_1013_not_1011():
    """A fill whose read found Postgres out of reach closed 1011 ("reconnect at once"): in a failover every socket
    in a fill came back at the same moment. It is 1013 (try again later, with backoff); a bug stays 1011."""
    import asyncpg

    for error, code in ((ConnectionRefusedError(111, "refused"), 1013),
                        (asyncpg.exceptions.CannotConnectNowError("starting up"), 1013),
                        (TimeoutError(), 1013), (KeyError("bug"), 1011)):
        sent: list = []

        async def send(msg: dict) -> None:
            sent.append(msg)

        async def events_after(room: str, after: int, limit: int, error: Exception = error) -> list:
            raise error

        conn = Conn(SimpleNamespace(events_after=events_after), ACCESS,  # type: ignore[arg-type]
                    SimpleNamespace(id=7, name="u", role="learner"), send, 8)
        conn.ready, conn.filling = True, False
        conn.start_fill()
        await asyncio.sleep(0.05)
        assert conn.closing is not None and conn.closing[0] == code, (error, conn.closing)
        if conn.closer is not None:
            conn.closer.cancel()
