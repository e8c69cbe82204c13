"""Every event type of store/events.py and every frame type of store/frames.py, driven over a real socket.
Each frame received is decoded into its Struct; the test fails if a type is added and not exercised here."""
from __future__ import annotations

import typing
from datetime import datetime, timezone

import msgspec

from store import events, frames
from store.events import GradeReady, JobProgress, publish, user_topic
from tests.conftest import Factory
from tests.server.conftest import Client, make_course


def _tags(union) -> set[str]:  # type: ignore[no-untyped-def]
    return {t.__struct_config__.tag for t in typing.get_args(union)}


async def test_every_event_and_frame_type(server, client, make: Factory, worker_db):
    pool, redis = worker_db
    course = make_course(server, make, learners=2)
    inst, (a, b) = course.instructor, course.learners
    sid = client.post(f"/api/v1/courses/{course.id}/live", json={"title": "All of it"}, headers=inst.h).json()["id"]
    room = f"live:{sid}"
    seen: dict[str, events.Event] = {}
    sent: set[str] = set()

    def keep(frame: dict) -> dict:
        ev = events.decode(msgspec.json.encode(frame))
        assert type(ev).__struct_config__.tag == frame["type"]
        seen[frame["type"]] = ev
        return frame

    async def send(c: Client, frame: dict) -> None:
        frames.decode_frame(msgspec.json.encode(frame))  # what we send is a valid client frame
        sent.add(frame["type"])
        await c.send(frame)

    ca = await Client.connect(server, room, a)
    keep(ca.welcome)
    assert isinstance(seen["welcome"], events.Welcome)
    cb = await Client.connect(server, room, b)
    keep(await ca.expect("presence", action="joined"))

    client.post(f"/api/v1/live/{sid}/start", headers=inst.h)
    keep(await ca.expect("live.started"))

    await send(cb, {"type": "typing", "active": True})
    t = keep(await ca.expect("typing"))
    assert t["user"]["id"] == b.id and t["active"] is True
    await send(ca, {"type": "ping", "ref": "p"})
    keep(await ca.expect("pong"))

    await send(ca, {"type": "message.send", "text": "question?", "client_msg_id": "q"})
    m = keep(await cb.expect("message.new"))
    await send(ca, {"type": "message.edit", "id": m["id"], "text": "question!"})
    keep(await cb.expect("message.edited"))
    await send(ca, {"type": "message.delete", "id": m["id"]})
    keep(await cb.expect("message.deleted"))
    await send(ca, {"type": "message.edit", "id": m["id"], "text": "gone"})
    assert keep(await ca.expect("error"))["code"] == "not_found"
    # a reply names the message it answers; staff marking it helpful tells the room
    await send(ca, {"type": "message.send", "text": "what is a pivot?", "client_msg_id": "q2"})
    q2 = await cb.expect("message.new", client_msg_id="q2")
    await send(cb, {"type": "message.send", "text": "the first nonzero entry of a row", "reply_to": q2["id"]})
    reply = await ca.expect("message.new", reply_to=q2["id"])
    assert client.post(f"/api/v1/rooms/{room}/messages/{reply['id']}/helpful", headers=inst.h).status_code == 201
    h = keep(await ca.expect("message.helpful"))
    assert (h["message_id"], h["author_id"], h["by"]) == (reply["id"], b.id, "staff") and "reason" not in h
    # staff removing the mark tells the room, and its author hears the XP taken back
    assert client.delete(f"/api/v1/rooms/{room}/messages/{reply['id']}/helpful", headers=inst.h).status_code == 204
    assert keep(await ca.expect("message.helpful_removed"))["message_id"] == reply["id"]
    assert keep(await cb.expect("xp.revoked"))["points"] == 25

    poll = client.post(f"/api/v1/live/{sid}/polls", json={"question": "?", "options": ["a", "b"]},
                       headers=inst.h).json()
    keep(await ca.expect("poll.opened"))
    await send(cb, {"type": "poll.vote", "poll_id": poll["id"], "option": 0})
    keep(await ca.expect("poll.results"))
    client.post(f"/api/v1/polls/{poll['id']}/close", headers=inst.h)
    keep(await ca.expect("poll.closed"))
    client.post(f"/api/v1/live/{sid}/end", headers=inst.h)
    keep(await ca.expect("live.ended"))

    # a worker's job progress reaches every open socket of the user it is for
    await publish(redis, user_topic(a.id), JobProgress(job_id=1, video_id=2, course_id=course.id, state="running",
                                                       progress=0.5))
    jp = keep(await ca.expect("job.progress"))
    assert jp["progress"] == 0.5 and "error" not in jp
    # a final grade reaches the learner in whatever room they are in (tests/server/test_grading.py drives it for real)
    await publish(redis, user_topic(a.id), GradeReady(submission_id=1, assignment_id=2, course_id=course.id,
                                                      title="Quiz", score=80.0, passed=True, reviewed=False, attempt=1))
    assert keep(await ca.expect("grade.ready"))["score"] == 80.0

    # XP, achievements and boards (tests/server/test_progress.py and test_leaderboards.py drive them for real)
    await publish(redis, user_topic(a.id), events.XpAwarded(user_id=a.id, kind="lesson_completed", points=50, xp=50,
                                                            level=0))
    assert keep(await ca.expect("xp.awarded"))["points"] == 50
    await publish(redis, user_topic(a.id), events.AchievementUnlocked(
        user=events.UserRef(id=a.id, name=a.name, role="learner"), unlocked_at=datetime.now(timezone.utc),
        achievement=events.AchievementInfo(id="first-lesson", title="First steps", description="", tier="common")))
    assert keep(await ca.expect("achievement.unlocked"))["achievement"]["tier"] == "common"
    await publish(redis, events.room_topic(room), events.LeaderboardChanged(
        room=room, scope="course", scope_id=course.id, period="all", top=[events.LeaderboardEntry(user_id=a.id, name=a.name, xp=50,
                                                                                    rank=1)]))
    assert keep(await ca.expect("leaderboard.changed"))["top"][0]["rank"] == 1
    # the tutor's answer streaming into the room (tests/server/test_tutor_rooms.py drives it for real)
    await publish(redis, events.room_topic(room), events.TutorDelta(room=room, reply_to=m["id"], text="An eigen"))
    assert keep(await ca.expect("tutor.delta"))["text"] == "An eigen"

    # asking the tutor posts the question as a message (the answer is tests/server/test_tutor_rooms.py's business)
    await send(ca, {"type": "tutor.ask", "text": "what is an eigenvector?", "client_msg_id": "t1"})
    assert (await ca.expect("message.new", client_msg_id="t1"))["meta"] == {"tutor_ask": True}

    await send(ca, {"type": "resume", "after_seq": 0})
    keep(await ca.expect("welcome"))
    await cb.close()
    keep(await ca.expect("presence", action="left"))
    await ca.close()

    assert set(seen) == _tags(events.ServerEvent), f"not exercised: {_tags(events.ServerEvent) - set(seen)}"
    assert sent == _tags(frames.ClientFrame), f"not exercised: {_tags(frames.ClientFrame) - sent}"
