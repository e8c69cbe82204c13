"""Joining rooms, sending, idempotency, edits and deletes, resume, history pages."""
from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import httpx

from tests.conftest import Factory, fetch
from tests.server.conftest import Client, make_course


async def test_send_receive_and_welcome(server, make: Factory):
    course = make_course(server, make, learners=2)
    a, b = course.learners
    ca = await Client.connect(server, course.room, a)
    assert ca.welcome["room"] == course.room and ca.welcome["last_seq"] == 0
    assert [u["id"] for u in ca.welcome["online"]] == [a.id]
    cb = await Client.connect(server, course.room, b)
    assert {u["id"] for u in cb.welcome["online"]} == {a.id, b.id} and cb.welcome["online_count"] == 2
    joined = await ca.expect("presence", action="joined")
    assert joined["user"] == {"id": b.id, "name": b.name, "role": "learner"}

    await ca.send({"type": "message.send", "text": "hello", "client_msg_id": "m1"})
    for c in (ca, cb):
        m = await c.expect("message.new")
        assert m["text"] == "hello" and m["seq"] == 1 and m["client_msg_id"] == "m1"
        assert m["author"] == {"id": a.id, "name": a.name, "role": "learner"} and m["room"] == course.room
        assert "meta" not in m
    await ca.close()
    left = await cb.expect("presence", action="left")
    assert left["user"]["id"] == a.id and left["online_count"] == 1
    await cb.close()


async def test_a_reconnect_within_the_grace_is_neither_a_leave_nor_a_join(server, make: Factory, settings):
    """A reload or a network blip: the last socket closes and the user is back within
    STUDYHALL_PRESENCE_GRACE_S, so the room sees nothing; staying away, they leave once the grace is over."""
    grace = settings.presence_grace_s
    course = make_course(server, make, learners=2)
    a, b = course.learners
    watcher = await Client.connect(server, course.room, b)
    ca = await Client.connect(server, course.room, a)
    await watcher.expect("presence", action="joined")
    await ca.close()
    await asyncio.sleep(0.5)  # the page loading again
    ca = await Client.connect(server, course.room, a)
    assert {u["id"] for u in ca.welcome["online"]} == {a.id, b.id}
    assert [f for f in await watcher.quiet(grace + 0.5) if f["type"] == "presence"] == []
    await ca.close()
    t0 = time.monotonic()
    assert [f for f in await watcher.quiet(grace - 1) if f["type"] == "presence"] == []
    left = await watcher.expect("presence", action="left", timeout=grace + 5)
    assert left["user"]["id"] == a.id and left["online_count"] == 1 and time.monotonic() - t0 >= grace - 0.5
    await watcher.close()


async def test_idempotent_send(server, make: Factory, settings):
    from tests.conftest import fetch

    course = make_course(server, make, learners=1)
    (a,) = course.learners
    c = await Client.connect(server, course.room, a)
    for _ in range(3):
        await c.send({"type": "message.send", "text": "once", "client_msg_id": "dup-1"})
    first = await c.expect("message.new")
    assert [f for f in await c.quiet(0.5) if f["type"] == "message.new"] == []
    await c.close()
    # after a reconnect from before it, the retry is answered by the replay, once
    c = await Client.connect(server, course.room, a, after=0)
    await c.send({"type": "message.send", "text": "once", "client_msg_id": "dup-1"})
    again = await c.expect("message.new")
    assert again == first
    assert [f for f in await c.quiet(0.5) if f["type"] == "message.new"] == []
    await c.close()
    # live-only reconnect: the retry returns the original (it was never sent on this connection)
    c = await Client.connect(server, course.room, a)
    await c.send({"type": "message.send", "text": "once", "client_msg_id": "dup-1"})
    assert await c.expect("message.new") == first
    for _ in range(2):  # and only once on that connection (each retry delivered it again)
        await c.send({"type": "message.send", "text": "once", "client_msg_id": "dup-1"})
    assert [f for f in await c.quiet(0.5) if f["type"] == "message.new"] == []
    await c.close()
    rows = fetch(settings, "SELECT count(*) AS n FROM messages WHERE room_id = $1", course.room)
    assert rows[0]["n"] == 1
    # the id again with another text (a client whose counter restarted): refused, never silently dropped; on
    # the socket where the original was delivered too (it got no reply at all), and over REST (409)
    c = await Client.connect(server, course.room, a)
    await c.send({"type": "message.send", "text": "once", "client_msg_id": "dup-1"})
    await c.expect("message.new")
    for kind in ("message.send", "tutor.ask"):
        await c.send({"type": kind, "text": "something new", "client_msg_id": "dup-1"})
        err = await c.expect("error")
        assert err["code"] == "idempotency_key_reused" and err["ref"] == "dup-1", err
    await c.close()
    r = httpx.post(f"{server}/api/v1/rooms/{course.room}/messages", json={"text": "another", "client_msg_id": "dup-1"},
                   headers=a.h)
    assert r.status_code == 409 and r.json()["code"] == "idempotency_key_reused", r.text
    assert fetch(settings, "SELECT count(*) AS n FROM messages WHERE room_id = $1", course.room)[0]["n"] == 1


async def test_a_resent_message_is_answered_again_after_a_resume(server, make: Factory):
    """A re-send answered just before a `resume`'s welcome (which clients are told to ignore) was never answered
    again on that socket: the client's message stayed unacknowledged until it reconnected."""
    course = make_course(server, make, learners=1)
    (a,) = course.learners
    c = await Client.connect(server, course.room, a)
    await c.send({"type": "message.send", "text": "hi", "client_msg_id": "r-1"})
    await c.expect("message.new")
    await c.send({"type": "message.send", "text": "later", "client_msg_id": "r-2"})
    last = (await c.expect("message.new"))["seq"]
    await c.close()
    c = await Client.connect(server, course.room, a)  # live only: the stream starts past both
    await c.send({"type": "message.send", "text": "hi", "client_msg_id": "r-1"})
    await c.send({"type": "resume", "after_seq": last})
    while (await c.recv())["type"] != "welcome":
        pass  # (what came before the welcome is ignored, as the README says)
    await c.send({"type": "message.send", "text": "hi", "client_msg_id": "r-1"})
    assert (await c.expect("message.new"))["client_msg_id"] == "r-1"
    await c.close()


async def test_a_resent_message_comes_back_as_it_is_now_and_past_the_send_budget(server, make: Factory):
    """A re-send of a stored message (after a reconnect) answers with the message as it is now (an edit since
    included, as over REST), and it is answered even when the send budget is spent: it stores nothing new.
    C1 control characters (an 8-bit terminal escape) are refused like C0 ones."""
    course = make_course(server, make, learners=1)
    (a,) = course.learners
    c = await Client.connect(server, course.room, a)
    await c.send({"type": "message.send", "text": "draft", "client_msg_id": "k1"})
    m = await c.expect("message.new")
    await c.send({"type": "message.edit", "id": m["id"], "text": "final"})
    await c.expect("message.edited")
    for i in range(12):  # past the budget (3/s, bursts of 10)
        await c.send({"type": "message.send", "text": f"more {i}", "client_msg_id": f"n{i}"})
    await c.quiet(0.3)
    await c.close()
    c = await Client.connect(server, course.room, a)
    await c.send({"type": "message.send", "text": "draft", "client_msg_id": "k1"})
    again = await c.expect("message.new")
    assert (again["id"], again["text"]) == (m["id"], "final")
    await c.send({"type": "message.send", "text": "red\u009b31mALERT", "client_msg_id": "c1", "ref": "c1"})
    err = await c.expect("error", ref="c1")
    assert err["code"] == "bad_frame", err
    await c.close()


async def test_edit_delete_and_resume_redacts(server, make: Factory):
    course = make_course(server, make, learners=2)
    a, b = course.learners
    ca = await Client.connect(server, course.room, a)
    cb = await Client.connect(server, course.room, b)
    await ca.send({"type": "message.send", "text": "draft", "client_msg_id": "x"})
    m = await cb.expect("message.new")
    await ca.send({"type": "message.edit", "id": m["id"], "text": "final"})
    e = await cb.expect("message.edited")
    assert e["id"] == m["id"] and e["text"] == "final" and e["seq"] == m["seq"] + 1
    # (tester) a client resuming from before the post reads the message as it is now, never the text edited out
    early = await Client.connect(server, course.room, b, after=0)
    replay = [await early.recv() for _ in range(2)]
    assert [(f["type"], f["text"]) for f in replay] == [("message.new", "final"), ("message.edited", "final")]
    await early.close()
    # others may not edit or delete it
    await cb.send({"type": "message.edit", "id": m["id"], "text": "hijack", "ref": "r1"})
    err = await cb.expect("error")
    assert err["code"] == "forbidden" and err["ref"] == "r1"
    await cb.send({"type": "message.delete", "id": m["id"]})
    assert (await cb.expect("error"))["code"] == "forbidden"
    # the instructor deletes any message
    ci = await Client.connect(server, course.room, course.instructor)
    await ci.send({"type": "message.delete", "id": m["id"]})
    d = await cb.expect("message.deleted")
    assert d["id"] == m["id"] and d["seq"] == m["seq"] + 2 and d["deleted_by"] == course.instructor.id
    # a client resuming from before sees the message as deleted, never its text
    r = await Client.connect(server, course.room, b, after=0)
    replay = [await r.recv() for _ in range(3)]
    assert [f["type"] for f in replay] == ["message.new", "message.edited", "message.deleted"]
    assert [f["seq"] for f in replay] == [1, 2, 3]
    assert replay[0]["text"] == "" and replay[0]["deleted"] is True and replay[1]["text"] == ""
    for c in (ca, cb, ci, r):
        await c.close()


async def test_resume_frame_restarts_stream(server, make: Factory):
    course = make_course(server, make, learners=1)
    (a,) = course.learners
    c = await Client.connect(server, course.room, a)
    for i in range(5):
        await c.send({"type": "message.send", "text": f"m{i}", "client_msg_id": f"r{i}"})
    for i in range(5):
        await c.expect("message.new", text=f"m{i}")
    await c.send({"type": "resume", "after_seq": 2})
    w = await c.expect("welcome")
    assert w["last_seq"] == 5
    got = [await c.recv() for _ in range(3)]
    assert [f["seq"] for f in got] == [3, 4, 5]
    assert await c.quiet(0.3) == []
    await c.close()


async def test_history_pages(server, client, make: Factory):
    course = make_course(server, make, learners=1)
    (a,) = course.learners
    c = await Client.connect(server, course.room, a)
    for i in range(7):
        await c.send({"type": "message.send", "text": f"h{i}", "client_msg_id": f"h{i}"})
    for i in range(7):
        await c.expect("message.new", text=f"h{i}")
    await c.close()
    url = f"/api/v1/rooms/{course.room}/messages"
    newest = client.get(url, params={"limit": 3}, headers=a.h).json()
    assert [m["text"] for m in newest["items"]] == ["h4", "h5", "h6"] and newest["has_more"] is True
    older = client.get(url, params={"limit": 3, "before": newest["items"][0]["seq"]}, headers=a.h).json()
    assert [m["text"] for m in older["items"]] == ["h1", "h2", "h3"]
    first = client.get(url, params={"limit": 3, "after": 0}, headers=a.h).json()
    assert [m["seq"] for m in first["items"]] == [1, 2, 3] and first["has_more"] is True
    tail = client.get(url, params={"limit": 10, "after": 5}, headers=a.h).json()
    assert [m["text"] for m in tail["items"]] == ["h5", "h6"] and tail["has_more"] is False
    m = tail["items"][0]
    assert m["author"] == {"id": a.id, "name": a.name, "role": "learner"} and m["client_msg_id"] == "h5"
    outsider = make.user("learner")
    assert client.get(url, headers=outsider.h).status_code == 404
    assert client.get(url, params={"limit": 0}, headers=a.h).status_code == 400


async def test_ping_pong(server, make: Factory):
    course = make_course(server, make, learners=1)
    c = await Client.connect(server, course.room, course.learners[0])
    await c.send({"type": "ping", "ref": "p1"})
    assert (await c.expect("pong")) == {"type": "pong", "ref": "p1"}
    await c.close()
    await asyncio.sleep(0)


async def test_rest_post_is_idempotent_and_delete_follows_the_rules(server, client, make: Factory, settings):
    """REST posting (bots, integrations) keeps the websocket's rules: a repeated client_msg_id returns the original
    (200, one stored message, one event), authors delete their own, moderators anyone's, others get 403, and a
    deleted message leaves the history and reaches sockets as `message.deleted`."""
    course = make_course(server, make, learners=2)
    (a, b), inst = course.learners, course.instructor
    watcher = await Client.connect(server, course.room, b)
    url = f"/api/v1/rooms/{course.room}/messages"
    first = client.post(url, json={"text": "from a bot", "client_msg_id": "rest-1"}, headers=a.h)
    again = client.post(url, json={"text": "from a bot", "client_msg_id": "rest-1"}, headers=a.h)
    assert first.status_code == 201 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert len(fetch(settings, "SELECT id FROM messages WHERE room_id = $1 AND client_msg_id = 'rest-1'",
                     course.room)) == 1
    assert (await watcher.expect("message.new"))["id"] == first.json()["id"]
    assert not [f for f in await watcher.quiet(0.5) if f["type"] == "message.new"]  # the repeat made no event
    other = client.post(url, json={"text": "second"}, headers=a.h).json()
    await watcher.expect("message.new")
    mid = first.json()["id"]
    assert client.delete(f"{url}/{mid}", headers=b.h).status_code == 403  # not b's
    assert client.delete(f"{url}/{mid}", headers=a.h).status_code == 204  # the author's own
    assert (await watcher.expect("message.deleted"))["id"] == mid
    assert client.delete(f"{url}/{other['id']}", headers=inst.h).status_code == 204  # a moderator's
    assert client.delete(f"{url}/999999999", headers=inst.h).status_code == 404
    assert [m["id"] for m in client.get(url, headers=b.h).json()["items"] if m["id"] in (mid, other["id"])] == []
    # a repeat of a deleted original says so (a bot retrying learns its message was removed)
    late = client.post(url, json={"text": "from a bot", "client_msg_id": "rest-1"}, headers=a.h)
    assert late.status_code == 200 and late.json()["deleted"] is True and late.json()["text"] == ""
    # its id with another text is refused, deleted original or not (its text is gone; its digest is kept)
    reused = client.post(url, json={"text": "a new message", "client_msg_id": "rest-1"}, headers=a.h)
    assert reused.status_code == 409 and reused.json()["code"] == "idempotency_key_reused", reused.text
    # and a repeat of an edited one returns it as edited
    posted = client.post(url, json={"text": "draft", "client_msg_id": "rest-2"}, headers=b.h).json()
    assert posted["deleted"] is False and posted["edited_at"] is None
    await watcher.send({"type": "message.edit", "id": posted["id"], "text": "final"})
    await watcher.expect("message.edited")
    again = client.post(url, json={"text": "draft", "client_msg_id": "rest-2"}, headers=b.h).json()
    assert again["text"] == "final" and again["edited_at"] is not None and again["deleted"] is False
    await watcher.close()


def test_messages_edited_before_the_rewrite_are_rewritten_by_the_migration(server, make: Factory, settings):
    """(Review) an edit rewrites the stored events from this release on; those edited before still replayed the text
    edited out. The migration rewrites them, keeping each payload as msgspec wrote it (type first)."""
    import json
    from pathlib import Path

    import msgspec

    from store.events import MessageEdited, MessageNew
    from tests.conftest import fetch

    course = make_course(server, make, learners=1)
    (a,) = course.learners
    with httpx.Client(base_url=server, timeout=30) as c:
        posted = c.post(f"/api/v1/rooms/{course.room}/messages", json={"text": 'call me: +1 555 "0100" \\ ok'},
                        headers=a.h).json()
    new = 'edited: "quoted" \\ back\nslash ünïcode'
    # as an edit before this release left it: the message edited, its events still with the first text
    fetch(settings, "UPDATE messages SET body = $2, edited_at = now() WHERE id = $1", posted["id"], new)
    seq = fetch(settings, "SELECT max(seq) AS s FROM room_events WHERE room_id = $1", course.room)[0]["s"] + 1
    old_edit = msgspec.json.encode(MessageEdited(id=posted["id"], seq=seq, room=course.room, text="a first edit",
                                                 edited_at=datetime.now(timezone.utc))).decode()
    fetch(settings, "INSERT INTO room_events (room_id, seq, type, message_id, payload) "
                    "VALUES ($1, $2, 'message.edited', $3, $4)", course.room, seq, posted["id"], old_edit)
    sql = (Path(__file__).resolve().parents[2] / "store" / "migrations" / "0053_edited_events.sql").read_text()
    fetch(settings, sql)
    rows = fetch(settings, "SELECT type, payload FROM room_events WHERE message_id = $1 ORDER BY seq", posted["id"])
    assert [r["type"] for r in rows] == ["message.new", "message.edited"]
    for r in rows:
        assert r["payload"].startswith(f'{{"type":"{r["type"]}"'), r["payload"]
        got = msgspec.json.decode(r["payload"], type=MessageNew if r["type"] == "message.new" else MessageEdited)
        assert got.text == new and json.loads(r["payload"])["text"] == new, r["payload"]
    assert "555" not in rows[0]["payload"] and "first edit" not in rows[1]["payload"]
