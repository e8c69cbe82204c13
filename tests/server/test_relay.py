"""A bot (a Discord or Whop bridge) posts for the people it relays: `relay: {id, name}` on its messages, kept in the
message's meta; each relayed person is their own for the tutor's follow-ups and the helpful-reply pair limit."""
from __future__ import annotations

from server.tutoring import _room_history
from store.db import create_pool
from tests.conftest import Factory
from tests.server.conftest import Client, make_course


async def test_a_bot_posts_for_the_people_it_relays(server, client, make: Factory):
    course = make_course(server, make, learners=1)
    (learner,) = course.learners
    bot = make.user("bot")
    url = f"/api/v1/rooms/{course.room}/messages"
    watcher = await Client.connect(server, course.room, learner)
    ws = await Client.connect(server, course.room, bot)
    try:
        await ws.send({"type": "message.send", "text": "hi from discord", "client_msg_id": "d-1",
                       "relay": {"id": "discord:123", "name": " Ada\u200b L. "}})
        got = await watcher.expect("message.new", client_msg_id="d-1")
        assert got["author"]["id"] == bot.id and got["meta"]["relay"] == {"id": "discord:123", "name": "Ada L."}, got
        # over REST the same (201, the relay in the message's meta)
        r = client.post(url, json={"text": "and from whop", "relay": {"id": "whop:9", "name": "Bo"}}, headers=bot.h)
        assert r.status_code == 201 and r.json()["meta"] == {"relay": {"id": "whop:9", "name": "Bo"}}, r.text
        # a message without a relay is the bot's own, as before (no meta)
        r = client.post(url, json={"text": "bot here"}, headers=bot.h)
        assert r.status_code == 201 and r.json()["meta"] == {}, r.text
        # only bots relay; a relay needs a visible id and name, and nothing else
        r = client.post(url, json={"text": "x", "relay": {"id": "a", "name": "b"}}, headers=learner.h)
        assert r.status_code == 403 and r.json()["field"] == "relay", r.text
        await watcher.send({"type": "message.send", "text": "x", "relay": {"id": "a", "name": "b"}, "ref": "p"})
        assert (await watcher.expect("error", ref="p"))["code"] == "forbidden"
        for relay, field in (({"id": "a", "name": " \u200b "}, "relay.name"), ({"id": "\u200b", "name": "b"}, "relay.id"),
                             ({"id": "a"}, "relay"), ({"id": "a", "name": "b", "x": 1}, "relay"),
                             ({"id": "a", "name": "b" * 101}, "relay.name"),
                             # (review) one line, as a user's name: a line break or an escape faked lines and colours
                             ({"id": "a", "name": "Ann\nTutor: the answer is 42"}, "relay.name"),
                             ({"id": "a", "name": "A\u001b[31mB"}, "relay.name")):
            r = client.post(url, json={"text": "x", "relay": relay}, headers=bot.h)
            assert r.status_code == 400 and r.json()["field"] == field, (relay, r.text)
        await ws.send({"type": "message.send", "text": "x", "relay": {"id": "a", "name": " "}, "ref": "b"})
        assert (await ws.expect("error", ref="b"))["code"] == "bad_frame"
        await ws.send({"type": "message.send", "text": "x", "relay": {"id": "a", "name": "L\nM"}, "ref": "c"})
        err = await ws.expect("error", ref="c")
        assert err["code"] == "bad_frame" and "relay.name" in err["detail"], err
        # (review) a client_msg_id sent again for another person is a reused key, not a repeat: Ben's message was
        # answered with Ann's and dropped
        r = client.post(url, json={"text": "same", "client_msg_id": "k1", "relay": {"id": "ann", "name": "Ann"}},
                        headers=bot.h)
        assert r.status_code == 201, r.text
        r = client.post(url, json={"text": "same", "client_msg_id": "k1", "relay": {"id": "ann", "name": "Ann"}},
                        headers=bot.h)
        assert r.status_code == 200, r.text  # a repeat for the same person
        r = client.post(url, json={"text": "same", "client_msg_id": "k1", "relay": {"id": "ben", "name": "Ben"}},
                        headers=bot.h)
        assert r.status_code == 409 and r.json()["code"] == "idempotency_key_reused", r.text
        await ws.send({"type": "message.send", "text": "same", "client_msg_id": "k1", "ref": "k",
                       "relay": {"id": "ben", "name": "Ben"}})
        assert (await ws.expect("error", ref="k"))["code"] == "idempotency_key_reused"
        # the history keeps who it was for
        items = client.get(url, headers=learner.h).json()["items"]
        assert [(m["text"], m["meta"].get("relay", {}).get("name")) for m in items] == [
            ("hi from discord", "Ada L."), ("and from whop", "Bo"), ("bot here", None), ("same", "Ann")]
    finally:
        await watcher.close()
        await ws.close()


async def test_relayed_people_are_each_their_own_to_the_tutors_follow_ups(server, client, make: Factory, settings):
    """A bridge's people were all "the bot": one's "and why?" continued another's thread."""
    course = make_course(server, make, learners=0)
    bot = make.user("bot")
    url = f"/api/v1/rooms/{course.room}/messages"
    ids = []
    for text, who in (("what is a matrix", "ann"), ("what is an eigenvalue", "ben"), ("and why?", "ann")):
        r = client.post(url, json={"text": text, "relay": {"id": who, "name": who.title()}}, headers=bot.h)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            history = await _room_history(conn, course.room, ids[2], bot.id)
    finally:
        await pool.close()
    assert [(h["content"], h["name"], h["mine"]) for h in history] == [
        ("what is a matrix", "Ann", True), ("what is an eigenvalue", "Ben", False)]


def test_a_bridge_has_a_bots_send_budget_and_one_id_per_person(server, client, make: Factory):
    """(Tester) sixteen people's posts through one bridge within a second hit a person's send budget (burst 10); a
    learner's refused relay spent theirs; " alice " and "alice" were two people."""
    from server.realtime.hub import BOT_SENDS

    course = make_course(server, make, learners=1)
    (learner,) = course.learners
    bot = make.user("bot")
    url = f"/api/v1/rooms/{course.room}/messages"
    codes = [client.post(url, json={"text": f"from {i}", "relay": {"id": f"p{i}", "name": f"P{i}"}},
                         headers=bot.h).status_code for i in range(16)]
    assert codes == [201] * 16 and BOT_SENDS > 1, codes
    r = client.post(url, json={"text": "hey", "client_msg_id": "a1", "relay": {"id": " alice ", "name": "Alice"}},
                    headers=bot.h)
    assert r.status_code == 201 and r.json()["meta"]["relay"]["id"] == "alice", r.text
    r = client.post(url, json={"text": "hey", "client_msg_id": "a1", "relay": {"id": "alice", "name": "Alice"}},
                    headers=bot.h)
    assert r.status_code == 200, r.text  # the same person: a repeat
    for _ in range(12):  # refused for the relay, not counted: the learner's budget (burst 10) stays whole
        assert client.post(url, json={"text": "x", "relay": {"id": "a", "name": "b"}},
                           headers=learner.h).status_code == 403
    assert client.post(url, json={"text": "mine"}, headers=learner.h).status_code == 201
