"""Progress over REST: validation (nothing stored on a bad report), completion and the XP it earns (seen live
over the websocket), course progress, bookmarks, rate limit, stats, helpful answers."""
from __future__ import annotations

from tests.conftest import Factory, fetch
from tests.progress_helpers import make_course, xp_store  # noqa: F401 - fixture
from tests.server.conftest import Client


def report(client, user, video_id: int, position: float, watched: list) -> dict:  # type: ignore[no-untyped-def]
    r = client.post(f"/api/v1/videos/{video_id}/progress", json={"position": position, "watched": watched},
                    headers=user.h)
    return {"status": r.status_code, **r.json()}


def later(settings, user, video_id: int, seconds: int = 3600) -> None:  # type: ignore[no-untyped-def]
    """Let time pass since the learner's last report of the video (time spent is bounded by it, and by the
    learner's allowance)."""
    fetch(settings, "UPDATE video_progress SET updated_at = updated_at - make_interval(secs => $3) "
                    "WHERE user_id = $1 AND video_id = $2", user.id, video_id, seconds)
    fetch(settings, "UPDATE watch_budget SET time_at = time_at - make_interval(secs => $2) WHERE user_id = $1",
          user.id, seconds)


def test_bad_reports_are_400_and_store_nothing(client, make: Factory, settings):
    course = make_course(client, make, learners=1, videos=1, duration=100)
    (a,), (vid,) = course.learners, course.videos
    cases = [
        ({"position": 150, "watched": []}, "position"),
        ({"position": -1, "watched": []}, "position"),
        ({"position": 10, "watched": [[20, 10]]}, "watched[0]"),  # inverted
        ({"position": 10, "watched": [[0, 10], [5, 5]]}, "watched[1]"),  # empty
        ({"position": 10, "watched": [[90, 130]]}, "watched[0]"),  # past the end
        ({"position": 10, "watched": [[-5, 10]]}, "watched[0]"),
        ({"position": 10, "watched": [[1, 2, 3]]}, "watched[0]"),
        ({"position": "ten", "watched": []}, "position"),
        ({"position": 10, "watched": [], "extra": 1}, "extra"),
        ({"position": 10, "player": "tab-1"}, "seq"),  # the two go together
        ({"position": 10, "seq": 3}, "player"),
        ({"position": 10, "player": "tab 1", "seq": 1}, "player"),
        ({"position": 10, "player": "tab-1\n", "seq": 1}, "player"),  # (a pattern's `$` let a final break in)
        ({"position": 10, "player": "x" * 65, "seq": 1}, "player"),
        ({"position": 10, "player": "tab-1", "seq": -1}, "seq"),
    ]
    for body, field in cases:
        r = client.post(f"/api/v1/videos/{vid}/progress", json=body, headers=a.h)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["field"] == field, (body, r.json())
    assert client.post(f"/api/v1/videos/{vid}/progress", content=b"{", headers=a.h).status_code == 400
    assert fetch(settings, "SELECT * FROM video_progress WHERE user_id = $1", a.id) == []
    assert fetch(settings, "SELECT * FROM xp_events WHERE user_id = $1", a.id) == []
    got = client.get(f"/api/v1/videos/{vid}/progress", headers=a.h).json()
    assert got["position"] == 0 and got["watched"] == [] and got["completed"] is False
    # someone else's video: 404, not 400
    stranger = Factory(make.settings).user("learner")
    assert client.post(f"/api/v1/videos/{vid}/progress", json={"position": 1, "watched": []},
                       headers=stranger.h).status_code == 404
    # the words say what is taken (a captions-made video takes 10% past its last caption, as its end), an empty
    # range is not called backwards, and a -0.0 sent comes back (and is stored) as 0.0
    past = client.post(f"/api/v1/videos/{vid}/progress", json={"position": 150, "watched": []}, headers=a.h).json()
    assert "or up to 110 s, taken as the end" in past["message"], past
    empty = client.post(f"/api/v1/videos/{vid}/progress", json={"position": 1, "watched": [[5, 5]]},
                        headers=a.h).json()
    assert "is empty" in empty["message"] and "before" not in empty["message"], empty
    zero = client.post(f"/api/v1/videos/{vid}/progress", json={"position": -0.0, "watched": [[-0.0, 5]]},
                       headers=a.h)
    assert zero.status_code == 200 and '"position":0.0' in zero.text and "-0.0" not in zero.text, zero.text
    assert "-0.0" not in client.get(f"/api/v1/videos/{vid}/progress", headers=a.h).text


async def test_completion_earns_xp_once_and_live(server, client, make: Factory, settings):
    course = make_course(client, make, learners=2, videos=2, duration=100)
    a, b = course.learners
    v1, v2 = course.videos
    ws = await Client.connect(server, f"course:{course.id}", a)
    ws_b = await Client.connect(server, f"course:{course.id}", b)  # a classmate in the same room
    try:
        r = report(client, a, v1, 40, [[0, 40]])
        assert r["status"] == 200 and r["position"] == 40 and r["completed"] is False
        assert r["xp_awarded"] == ["daily_streak"]
        assert (await ws.expect("xp.awarded", kind="daily_streak"))["points"] == 20
        # overlapping and repeated ranges merge; 89% is not complete at the default 90%
        later(settings, a, v1)
        r = report(client, a, v1, 89, [[30, 60], [60, 89]])
        assert r["watched"] == [[0.0, 89.0]] and r["completed"] is False and r["xp_awarded"] == []
        later(settings, a, v1)
        r = report(client, a, v1, 95, [[85, 95]])
        assert r["completed"] is True and sorted(r["xp_awarded"]) == ["first_lesson", "lesson_completed"]
        ev = await ws.expect("xp.awarded", kind="lesson_completed")
        assert ev["points"] == 50 and ev["course_id"] == course.id
        unlocked = await ws.expect("achievement.unlocked")
        assert unlocked["achievement"]["id"] == "first-lesson" and unlocked["user"]["id"] == a.id
        assert unlocked.get("room") is None  # a hears it on their personal topic, once
        seen = await ws_b.expect("achievement.unlocked")  # the room hears it too
        assert seen["room"] == f"course:{course.id}" and seen["user"]["id"] == a.id
        assert seen["achievement"]["id"] == "first-lesson"
        board = await ws.expect("leaderboard.changed")
        assert board["room"] == f"course:{course.id}" and board["top"][0]["user_id"] == a.id
        # a heard of it once, on the personal topic: the room's copy is for the others
        assert [f for f in await ws.quiet(0.5) if f["type"] == "achievement.unlocked"] == []
        # watching it again earns nothing more; the resume position follows
        later(settings, a, v1)
        r = report(client, a, v1, 12, [[0, 100]])
        assert r["xp_awarded"] == [] and r["position"] == 12 and r["completed"] is True
        assert r["time_spent_s"] == 40 + 59 + 10 + 100
        # the last video completes the course
        r = report(client, a, v2, 100, [[0, 100]])
        assert sorted(r["xp_awarded"]) == ["course_completed", "lesson_completed"]
        assert (await ws.expect("achievement.unlocked"))["achievement"]["id"] == "course-1"
        assert (await ws_b.expect("achievement.unlocked"))["achievement"]["id"] == "course-1"
    finally:
        await ws.close()
        await ws_b.close()
    kinds = [r["kind"] for r in fetch(settings, "SELECT kind FROM xp_events WHERE user_id = $1 ORDER BY id", a.id)]
    assert sorted(kinds) == ["course_completed", "daily_streak", "first_lesson", "lesson_completed",
                             "lesson_completed"]
    cp = client.get(f"/api/v1/courses/{course.id}/progress", headers=a.h).json()
    assert cp["completion"] == 1.0 and cp["completed_videos"] == 2 and cp["total_videos"] == 2
    assert cp["last_activity_at"] is not None and [v["video_id"] for v in cp["videos"]] == [v1, v2]
    # a page of the videos; the totals still cover the whole course
    page = client.get(f"/api/v1/courses/{course.id}/progress?limit=1&offset=1", headers=a.h).json()
    assert [v["video_id"] for v in page["videos"]] == [v2] and page["total_videos"] == 2 and page["completion"] == 1.0
    r = client.get(f"/api/v1/courses/{course.id}/progress?limit=1001", headers=a.h)
    assert r.status_code == 400 and r.json()["field"] == "limit"
    # staff see a learner's progress; learners only their own
    assert client.get(f"/api/v1/courses/{course.id}/progress?user_id={a.id}",
                      headers=course.instructor.h).json()["completion"] == 1.0
    assert client.get(f"/api/v1/courses/{course.id}/progress?user_id={a.id}", headers=b.h).status_code == 403
    assert client.get(f"/api/v1/courses/{course.id}/progress", headers=b.h).json()["completion"] == 0.0
    stats = client.get("/api/v1/me/stats", headers=a.h).json()
    assert stats["xp"] == 20 + 50 + 10 + 50 + 500 and stats["level"] == 2
    assert (stats["level_xp"], stats["next_level_xp"]) == (400, 900)
    assert stats["streak"]["current"] == 1 and stats["streak"]["active_today"] is True
    assert stats["counts"]["lesson_completed"] == 2
    ach = {x["achievement"]["id"]: x for x in client.get("/api/v1/me/achievements", headers=a.h).json()}
    assert ach["first-lesson"]["unlocked_at"] and ach["course-1"]["unlocked_at"] and not ach["lessons-10"]["unlocked_at"]
    assert ach["lessons-10"]["progress"] == 2 and ach["lessons-10"]["target"] == 10
    ledger = client.get("/api/v1/me/xp?limit=2", headers=a.h).json()
    assert [e["kind"] for e in ledger] == ["course_completed", "lesson_completed"]
    # ids past 64 bits are refused naming the parameter, not with the database's generic 400
    r = client.get(f"/api/v1/me/xp?before={2**63}", headers=a.h)
    assert r.status_code == 400 and r.json()["field"] == "before", r.text
    r = client.get(f"/api/v1/courses/{course.id}/progress?user_id={2**63}", headers=course.instructor.h)
    assert r.status_code == 400 and r.json()["field"] == "user_id", r.text


async def test_an_achievement_caught_up_on_read_is_announced(server, client, make: Factory, settings):
    """An achievement defined after its threshold was crossed is unlocked when the learner reads theirs, and
    announced like any unlock (here: the row is removed to stand for a definition added later)."""
    course = make_course(client, make, learners=1, videos=1, duration=60)
    (a,) = course.learners
    assert "first_lesson" in report(client, a, course.videos[0], 60, [[0, 60]])["xp_awarded"]
    fetch(settings, "DELETE FROM user_achievements WHERE user_id = $1 AND achievement_id = 'first-lesson'", a.id)
    ws = await Client.connect(server, f"course:{course.id}", a)
    try:
        ach = {x["achievement"]["id"]: x for x in client.get("/api/v1/me/achievements", headers=a.h).json()}
        assert ach["first-lesson"]["unlocked_at"]
        told = await ws.expect("achievement.unlocked", timeout=10)
        assert told["achievement"]["id"] == "first-lesson"
        assert told["user"] == {"id": a.id, "name": a.name, "role": "learner"}  # it went out unnamed
        client.get("/api/v1/me/achievements", headers=a.h)  # once
        assert [f for f in await ws.quiet(0.5) if f["type"] == "achievement.unlocked"] == []
    finally:
        await ws.close()


def test_a_late_report_of_the_same_player_does_not_move_the_position_back(client, make: Factory, settings):
    """A player's report sent earlier but arriving later (a retry) set the resume position back; with `player`
    and `seq` it counts its ranges and leaves the position. Another player, or a report without them, moves it:
    the last to arrive."""
    course = make_course(client, make, learners=1, videos=1, duration=100)
    (a,), (vid,) = course.learners, course.videos
    url = f"/api/v1/videos/{vid}/progress"

    def send(position: float, watched: list, **extra: object) -> dict:
        r = client.post(url, json={"position": position, "watched": watched, **extra}, headers=a.h)
        assert r.status_code == 200, r.text
        return r.json()

    assert send(50, [[40, 50]], player="tab-1", seq=2)["position"] == 50
    late = send(40, [[30, 40]], player="tab-1", seq=1)
    assert late["position"] == 50 and late["watched"] == [[30, 50]]  # its range counts, its position does not
    assert client.get(url, headers=a.h).json()["position"] == 50
    assert send(52, [[50, 52]], player="tab-1", seq=2)["position"] == 52  # the same number again: a retry, taken
    assert send(10, [], player="phone", seq=0)["position"] == 10  # another device
    assert send(20, [])["position"] == 20  # no player: the last to arrive
    assert send(15, [], player="phone", seq=1)["position"] == 15


def test_deleting_the_last_unfinished_video_completes_the_course(client, make: Factory, settings):
    """A learner finished every video but one; staff delete that one: the course is complete for them, with
    its XP, although no report of theirs completes anything any more."""
    course = make_course(client, make, learners=3, videos=2, duration=60)
    a, b, gone = course.learners
    v1, v2 = course.videos
    assert "lesson_completed" in report(client, a, v1, 60, [[0, 60]])["xp_awarded"]
    report(client, b, v1, 10, [[0, 10]])  # b has not finished v1: the deletion completes nothing for b
    # `gone` finished v1 too, then was taken out of the (unpublished) course: it earned them 500 XP all the same
    assert "lesson_completed" in report(client, gone, v1, 60, [[0, 60]])["xp_awarded"]
    assert client.delete(f"/api/v1/courses/{course.id}/enrollments/{gone.id}",
                         headers=course.instructor.h).status_code == 204
    assert client.delete(f"/api/v1/courses/{course.id}/videos/{v2}", headers=course.instructor.h).status_code == 204
    kinds = {u: [r["kind"] for r in fetch(settings, "SELECT kind FROM xp_events WHERE user_id = $1", u.id)]
             for u in (a, b, gone)}
    assert kinds[a].count("course_completed") == 1 and "course_completed" not in kinds[b]
    assert "course_completed" not in kinds[gone]
    assert client.get(f"/api/v1/courses/{course.id}/progress", headers=a.h).json()["completion"] == 1.0


def test_a_report_counts_earlier_ranges_only_inside_the_video_as_it_is_now(client, make: Factory, settings):
    """The video got shorter after an earlier report (a re-ingest committing while this report ran): the seconds
    past the new end do not complete it."""
    course = make_course(client, make, learners=1, videos=1, duration=1000)
    (learner,), (vid,) = course.learners, course.videos
    assert report(client, learner, vid, 1000, [[300, 1000]])["fraction"] == 0.7
    fetch(settings, "UPDATE videos SET duration_s = 600 WHERE id = $1", vid)
    got = report(client, learner, vid, 10, [])
    assert not got["completed"] and got["xp_awarded"] == [] and got["watched"] == [[300, 600]], got
    assert got["fraction"] == 0.5


def test_the_end_of_a_video_made_from_captions_is_reportable(client, make: Factory, settings):
    """A video from captions is as long as its last caption; the player knows its real length (an outro without
    words), so its last seconds were refused (400) and the whole report with them. A little past the end counts
    as the end; a media file's length is measured, so there it does not."""
    course = make_course(client, make, learners=1, videos=2, duration=119)
    (a,), (captions, media) = course.learners, course.videos
    fetch(settings, "UPDATE videos SET source = 'media' WHERE id = $1", media)
    got = report(client, a, captions, 125, [[110, 125]])
    assert got["status"] == 200 and got["position"] == 119 and got["watched"] == [[110, 119]], got
    assert client.post(f"/api/v1/videos/{captions}/bookmarks", json={"at": 124, "note": "end"},
                       headers=a.h).json()["at"] == 119
    r = client.post(f"/api/v1/videos/{captions}/progress", json={"position": 200, "watched": []}, headers=a.h)
    assert r.status_code == 400 and r.json()["field"] == "position"  # not any number at all
    r = client.post(f"/api/v1/videos/{media}/progress", json={"position": 125, "watched": []}, headers=a.h)
    assert r.status_code == 400 and r.json()["field"] == "position"


def test_staff_progress_is_stored_without_xp(client, make: Factory, settings):
    course = make_course(client, make, learners=0, videos=1, duration=60)
    r = report(client, course.instructor, course.videos[0], 60, [[0, 60]])
    assert r["status"] == 200 and r["completed"] is True and r["xp_awarded"] == []
    assert fetch(settings, "SELECT * FROM xp_events WHERE user_id = $1", course.instructor.id) == []
    stored = client.get(f"/api/v1/videos/{course.videos[0]}/progress", headers=course.instructor.h).json()
    assert stored["watched"] == [[0.0, 60.0]] and stored["position"] == 60 and stored["completed"] is True


def test_not_ready_video_is_409(client, make: Factory, settings):
    course = make_course(client, make, learners=1, videos=0)
    vid = fetch(settings, "INSERT INTO videos (course_id, title, source) VALUES ($1, 'x', 'youtube') RETURNING id",
                course.id)[0]["id"]
    r = client.post(f"/api/v1/videos/{vid}/progress", json={"position": 0, "watched": []}, headers=course.learners[0].h)
    assert r.status_code == 409 and r.json()["code"] == "not_ready"


def test_progress_rate_limit(client, make: Factory, settings):
    course = make_course(client, make, learners=1, videos=1, duration=100)
    (a,), (vid,) = course.learners, course.videos
    got = [client.post(f"/api/v1/videos/{vid}/progress", json={"position": i % 100, "watched": []}, headers=a.h)
           for i in range(60)]
    codes = [r.status_code for r in got]
    assert codes[0] == 200 and 429 in codes
    assert codes.index(429) >= 25  # the burst (30 by default) passes, minus what refills meanwhile
    refused = got[codes.index(429)]  # says when to come back: header in whole seconds, body exact
    assert refused.headers["retry-after"] == "1" and 0 < refused.json()["retry_after"] <= 1
    other = make.user("learner")  # buckets are per user
    client.post(f"/api/v1/courses/{course.id}/enrollments", json={"user_id": other.id}, headers=course.instructor.h)
    assert client.post(f"/api/v1/videos/{vid}/progress", json={"position": 1, "watched": []},
                       headers=other.h).status_code == 200
    # refused reports count too (each still cost lookups): bad ones in a loop are limited as well
    codes = [client.post(f"/api/v1/videos/{vid}/progress", json={"position": 1, "watched": [[5, 1]]},
                         headers=other.h).status_code for _ in range(60)]
    assert codes[0] == 400 and 429 in codes, codes
    # and so do bodies that do not parse at all (they were never limited)
    third = make.user("learner")
    client.post(f"/api/v1/courses/{course.id}/enrollments", json={"user_id": third.id}, headers=course.instructor.h)
    codes = [client.post(f"/api/v1/videos/{vid}/progress", json={"position": "x"}, headers=third.h).status_code
             for _ in range(60)]
    assert codes[0] == 400 and 429 in codes, codes


def test_bookmarks(client, make: Factory):
    course = make_course(client, make, learners=2, videos=1, duration=100)
    (a, b), (vid,) = course.learners, course.videos
    url = f"/api/v1/videos/{vid}/bookmarks"
    assert client.post(url, json={"at": 150, "note": "x"}, headers=a.h).json()["field"] == "at"
    assert client.post(url, json={"at": -1}, headers=a.h).status_code == 400
    first = client.post(url, json={"at": 42.5, "note": "the key formula"}, headers=a.h)
    assert first.status_code == 201
    client.post(url, json={"at": 10}, headers=a.h)
    got = client.get(url, headers=a.h).json()
    assert [(x["at"], x["note"]) for x in got] == [(10, ""), (42.5, "the key formula")]
    assert client.get(url, headers=b.h).json() == []
    assert client.delete(f"/api/v1/bookmarks/{first.json()['id']}", headers=b.h).status_code == 404
    assert client.delete(f"/api/v1/bookmarks/{first.json()['id']}", headers=a.h).status_code == 204
    assert len(client.get(url, headers=a.h).json()) == 1
    # a note keeps its line breaks but takes no other control characters; a moment in the end's slack is the end
    r = client.post(url, json={"at": 100.4, "note": "two\nlines\tand a tab"}, headers=a.h)
    assert r.status_code == 201 and r.json()["at"] == 100 and r.json()["note"] == "two\nlines\tand a tab"
    r = client.post(url, json={"at": 1, "note": "bell\u0007"}, headers=a.h)
    assert r.status_code == 400 and r.json()["field"] == "note" and "control" in r.json()["message"]

    # changed: its time, its note, or both (what is left out stays); another's is 404, bad input 400
    bid = client.post(url, json={"at": 5, "note": "old"}, headers=a.h).json()["id"]
    r = client.patch(f"/api/v1/bookmarks/{bid}", json={"note": "new"}, headers=a.h)
    assert r.status_code == 200 and (r.json()["at"], r.json()["note"], r.json()["video_id"]) == (5, "new", vid), r.text
    r = client.patch(f"/api/v1/bookmarks/{bid}", json={"at": 100.4}, headers=a.h)  # (the end's slack: the end)
    assert r.status_code == 200 and (r.json()["at"], r.json()["note"]) == (100, "new"), r.text
    assert client.patch(f"/api/v1/bookmarks/{bid}", json={"at": 150}, headers=a.h).json()["field"] == "at"
    assert client.patch(f"/api/v1/bookmarks/{bid}", json={"note": "x\u0000"}, headers=a.h).status_code == 400
    assert client.patch(f"/api/v1/bookmarks/{bid}", json={"what": 1}, headers=a.h).status_code == 400
    assert client.patch(f"/api/v1/bookmarks/{bid}", json={"note": "mine"}, headers=b.h).status_code == 404
    assert [x["note"] for x in client.get(url, headers=a.h).json() if x["id"] == bid] == ["new"]
    # a learner removed from the course no longer sees its bookmarks: not to list, change or delete either (a
    # delete was 204)
    client.delete(f"/api/v1/courses/{course.id}/enrollments/{a.id}", headers=course.instructor.h)
    assert client.get(url, headers=a.h).status_code == 404
    assert client.patch(f"/api/v1/bookmarks/{bid}", json={"note": "gone"}, headers=a.h).status_code == 404
    assert client.delete(f"/api/v1/bookmarks/{bid}", headers=a.h).status_code == 404
    client.post(f"/api/v1/courses/{course.id}/enrollments", json={"user_id": a.id}, headers=course.instructor.h)
    assert [x["note"] for x in client.get(url, headers=a.h).json() if x["id"] == bid] == ["new"]


def test_bookmark_writes_are_rate_limited(client, make: Factory):
    course = make_course(client, make, learners=2, videos=1, duration=100)
    (a, b), (vid,) = course.learners, course.videos
    url = f"/api/v1/videos/{vid}/bookmarks"
    codes = [client.post(url, json={"at": i % 100}, headers=a.h).status_code for i in range(45)]
    assert codes[0] == 201 and 429 in codes and codes.index(429) >= 25, codes
    refused = client.post(url, json={"at": 1}, headers=a.h)
    assert refused.status_code == 429 and refused.headers["retry-after"] and refused.json()["retry_after"] > 0
    assert client.post(url, json={"at": 1}, headers=b.h).status_code == 201  # per user
    assert len(client.get(url, headers=a.h, params={"limit": 100}).json()) == codes.count(201)


def test_bookmarks_need_a_ready_video_and_are_bounded(client, make: Factory, settings):
    from store.progress import MAX_BOOKMARKS

    course = make_course(client, make, learners=1, videos=2, duration=100)
    (a,), (vid, queued) = course.learners, course.videos
    fetch(settings, "UPDATE videos SET status = 'queued', duration_s = NULL WHERE id = $1", queued)
    r = client.post(f"/api/v1/videos/{queued}/bookmarks", json={"at": 5000}, headers=a.h)
    assert r.status_code == 409 and r.json()["code"] == "not_ready"
    fetch(settings, "INSERT INTO bookmarks (user_id, video_id, at_s, note) "
                    "SELECT $1, $2, i % 100, '' FROM generate_series(1, $3) i", a.id, vid, MAX_BOOKMARKS - 1)
    url = f"/api/v1/videos/{vid}/bookmarks"
    # a video made from captions takes 10 % past its end (as the end): the error says so (it said "0 to 100 s")
    r = client.post(url, json={"at": 110.5}, headers=a.h)
    assert r.status_code == 400 and "or up to 110 s, taken as the end" in r.json()["message"], r.text
    assert client.post(url, json={"at": 1}, headers=a.h).status_code == 201
    r = client.post(url, json={"at": 2}, headers=a.h)
    assert r.status_code == 409 and r.json()["code"] == "too_many"
    assert fetch(settings, "SELECT count(*) AS n FROM bookmarks WHERE user_id = $1", a.id)[0]["n"] == MAX_BOOKMARKS


async def test_helpful_answer(server, client, make: Factory, settings):
    course = make_course(client, make, learners=2, videos=0)
    a, b = course.learners
    inst = course.instructor
    room = f"course:{course.id}"
    msg = client.post(f"/api/v1/rooms/{room}/messages", json={"text": "use a hash map"}, headers=a.h).json()
    own = client.post(f"/api/v1/rooms/{room}/messages", json={"text": "thanks"}, headers=inst.h).json()
    url = f"/api/v1/rooms/{room}/messages/{msg['id']}/helpful"
    ws = await Client.connect(server, room, a)
    try:
        assert client.post(url, headers=b.h).status_code == 403
        r = client.post(url, headers=inst.h)
        assert r.status_code == 201 and r.json()["author_id"] == a.id
        ev = await ws.expect("xp.awarded", kind="helpful_answer")
        assert ev["points"] == 25
        assert (await ws.expect("achievement.unlocked"))["achievement"]["id"] == "helpful-1"
    finally:
        await ws.close()
    assert client.post(url, headers=inst.h).status_code == 200  # once
    assert [r["points"] for r in fetch(settings, "SELECT points FROM xp_events WHERE user_id = $1", a.id)] == [25]
    r = client.post(f"/api/v1/rooms/{room}/messages/{own['id']}/helpful", headers=inst.h)
    assert r.status_code == 409 and r.json()["code"] == "not_a_learner"
    assert client.post(f"/api/v1/rooms/{room}/messages/999999999/helpful", headers=inst.h).status_code == 404
    foreign = Factory(make.settings).user("instructor")
    assert client.post(url, headers=foreign.h).status_code == 404


async def test_staff_remove_a_helpful_mark_and_its_xp(server, client, make: Factory, settings, xp_store):
    """A mark given by mistake (or the tutor's on a wrong answer) could not be taken back, nor the XP it earned.
    Staff remove it: the ledger cancels the award (it stays append-only), the learner hears `xp.revoked`, the room
    `message.helpful_removed`, the boards lose it live and rebuilt alike; marked again, it earns again."""
    from store import leaderboard_rebuild
    from store import progress as repo

    pool, redis = xp_store
    course = make_course(client, make, learners=2, videos=0)
    (a, b), inst = course.learners, course.instructor
    room = f"course:{course.id}"
    msg, other = (client.post(f"/api/v1/rooms/{room}/messages", json={"text": t}, headers=a.h).json()
                  for t in ("use a hash map", "or a trie"))
    url = f"/api/v1/rooms/{room}/messages/{msg['id']}/helpful"

    def xp_of(u) -> int:  # type: ignore[no-untyped-def]
        return client.get("/api/v1/me/stats", headers=u.h).json()["xp"]

    def on_board() -> int | None:
        entries = client.get(f"/api/v1/leaderboards/course/{course.id}", headers=inst.h).json()["entries"]
        return next((e["xp"] for e in entries if e["user_id"] == a.id), None)

    assert client.post(url, headers=inst.h).status_code == 201
    assert xp_of(a) == 25 and on_board() == 25
    ws = await Client.connect(server, room, a)
    try:
        assert client.delete(url, headers=b.h).status_code == 403
        assert client.delete(url, headers=a.h).status_code == 403  # not even the author
        assert client.delete(url, headers=inst.h).status_code == 204
        gone = await ws.expect("message.helpful_removed")
        assert gone["message_id"] == msg["id"] and gone["author_id"] == a.id
        revoked = await ws.expect("xp.revoked")
        assert (revoked["kind"], revoked["points"], revoked["xp"]) == ("helpful_answer", 25, 0), revoked
    finally:
        await ws.close()
    r = client.delete(url, headers=inst.h)
    assert r.status_code == 404 and r.json()["code"] == "not_marked"
    assert xp_of(a) == 0 and on_board() is None  # all taken back: off the board (not listed at 0)
    stats = client.get("/api/v1/me/stats", headers=a.h).json()
    assert stats["counts"].get("helpful_answer", 0) == 0
    assert [x["points"] for x in client.get("/api/v1/me/xp", headers=a.h).json()] == [-25, 25]
    hist = client.get(f"/api/v1/rooms/{room}/messages", headers=a.h).json()["items"]
    assert not next(m for m in hist if m["id"] == msg["id"]).get("helpful")
    # marked again: earns again (under a key of its own), and once
    assert client.post(url, headers=inst.h).status_code == 201
    assert client.post(url, headers=inst.h).status_code == 200
    assert xp_of(a) == 25 and on_board() == 25
    keys = [r["idempotency_key"] for r in fetch(settings, "SELECT idempotency_key FROM xp_events WHERE user_id = $1 "
                                                        "ORDER BY id", a.id)]
    assert keys == [f"helpful:{msg['id']}", f"revoke:helpful:{msg['id']}", f"helpful:{msg['id']}#2"]
    # the tutor's mark: removed the same way, and its verdict says staff overruled it
    await repo.mark_helpful(pool, redis, room, other["id"], None, reason="agrees with the video")
    fetch(settings, "INSERT INTO reply_checks (message_id, room_id, question_id, author_id, status) "
                    "VALUES ($1, $2, $3, $4, 'helpful')", other["id"], room, msg["id"], a.id)
    assert xp_of(a) == 50
    assert client.delete(f"/api/v1/rooms/{room}/messages/{other['id']}/helpful", headers=inst.h).status_code == 204
    assert xp_of(a) == 25
    (check,) = fetch(settings, "SELECT status, reason FROM reply_checks WHERE message_id = $1", other["id"])
    assert check["status"] == "not_helpful" and "staff" in check["reason"]
    from store import replies

    async with pool.acquire() as conn:  # a removed tutor mark still counts towards the tutor's limits
        assert await replies.tutor_marks_since(conn, a.id) == 1
        assert await replies.tutor_marks_since(conn, a.id, asker_id=a.id) == 1
        assert await replies.tutor_marks_since(conn, a.id, asker_id=b.id) == 0
    # a staff mark removed while the tutor's check of the reply is pending: the tutor does not mark it after all
    third = client.post(f"/api/v1/rooms/{room}/messages", json={"text": "a radix tree"}, headers=a.h).json()
    fetch(settings, "INSERT INTO reply_checks (message_id, room_id, question_id, author_id) VALUES ($1, $2, $3, $4)",
          third["id"], room, msg["id"], a.id)
    third_url = f"/api/v1/rooms/{room}/messages/{third['id']}/helpful"
    assert client.post(third_url, headers=inst.h).status_code == 201
    assert client.delete(third_url, headers=inst.h).status_code == 204
    (check,) = fetch(settings, "SELECT status, reason FROM reply_checks WHERE message_id = $1", third["id"])
    assert check["status"] == "skipped" and "removed the mark" in check["reason"], dict(check)
    # the live boards equal the ledger's sums (what a rebuild gives)
    assert await leaderboard_rebuild.check(pool, redis, settle_s=0.05, tenant_ids=[a.tenant_id]) == []


def test_time_spent_is_bounded_by_the_time_that_passed(client, make: Factory, settings):
    """A report adds to time spent at most what could have played since the video's previous report: a retried
    report (its response lost) does not count the video twice; ranges a player's ticks leave a hair apart join."""
    from store.progress import MAX_PLAYBACK_RATE, SLACK_S

    course = make_course(client, make, learners=1, videos=1, duration=3000)
    (a,), (vid,) = course.learners, course.videos
    assert report(client, a, vid, 3000, [[0, 3000]])["time_spent_s"] == 3000  # a first report: the duration
    other = make_course(client, make, learners=1, videos=1, duration=3000)  # a range repeated in one report: once
    assert report(client, other.learners[0], other.videos[0], 10, [[0, 10]] * 100)["time_spent_s"] == 10
    r = report(client, a, vid, 3000, [[0, 3000]] * 200)  # the same again at once, and repeated within it
    assert 3000 < r["time_spent_s"] <= 3000 + (5 + SLACK_S) * MAX_PLAYBACK_RATE, r
    later(settings, a, vid, 600)  # ten minutes on: ten minutes' worth (at up to the fastest playback)
    r = report(client, a, vid, 3000, [[0, 1000], [1000, 3000]])
    assert r["time_spent_s"] - 3000 >= 600 * MAX_PLAYBACK_RATE
    # gaps under half a second between reported ranges join
    r = report(client, a, vid, 10, [[0, 10], [10.3, 20]])
    assert r["watched"] == [[0.0, 3000.0]]
    course = make_course(client, make, learners=1, videos=1, duration=100)
    (b,), (vid,) = course.learners, course.videos
    assert report(client, b, vid, 20, [[0, 10], [10.000001, 20], [30, 40]])["watched"] == [[0.0, 20.0], [30.0, 40.0]]


def test_time_spent_over_many_videos_is_bounded_by_the_time_that_passed(client, make: Factory, settings):
    """Each video bounds what a report adds by the time since that video's previous report; re-sending watched
    ranges of many videos at once multiplied it. Over all of a learner's videos time spent now comes from an
    allowance of an hour refilling at the fastest playback: the ranges count, the time beyond it does not."""
    from store.progress import MAX_PLAYBACK_RATE, TIME_BUDGET_S

    course = make_course(client, make, learners=1, videos=8, duration=600)
    (a,), vids = course.learners, course.videos
    for v in vids:  # 80 minutes watched, as played
        assert report(client, a, v, 600, [[0, 600]])["time_spent_s"] == 600
        fetch(settings, "UPDATE watch_budget SET at = at - interval '200 seconds', "
                        "time_at = time_at - interval '200 seconds' WHERE user_id = $1", a.id)
    for v in vids:
        later(settings, a, v, 3600)  # an hour on: each video alone would take its whole length again
    again = [report(client, a, v, 600, [[0, 600]]) for v in vids]  # all eight re-sent at once
    added = sum(r["time_spent_s"] for r in again) - 8 * 600
    assert TIME_BUDGET_S <= added <= TIME_BUDGET_S + 10 * MAX_PLAYBACK_RATE, added  # not 4,800 s
    assert all(r["watched"] == [[0.0, 600.0]] and r["completed"] for r in again)


def test_stored_ranges_are_bounded(client, make: Factory, settings):
    """Many tiny disjoint ranges cannot grow a learner's row without end: past 1,000 separate ranges the smallest
    gaps between them are joined (counted as watched). Refusing the report instead locked the video for good: every
    later report of a part not yet watched was a 400."""
    course = make_course(client, make, learners=1, videos=1, duration=3600)
    (a,), (vid,) = course.learners, course.videos
    ranges = [[2.0 * i, 2.0 * i + 1] for i in range(1000)]  # gaps of 1 s
    ranges[700][0] = 1399.6  # one gap of 0.6 s: the smallest
    for k in range(5):  # 5 x 200 = 1,000 separate ranges: the most that is kept
        assert report(client, a, vid, 1, ranges[k * 200:(k + 1) * 200])["status"] == 200
    r = report(client, a, vid, 2, [[2500.0, 2501.0]])  # one more, apart from all
    assert r["status"] == 200, r
    assert len(r["watched"]) == 1000 and [1398.0, 1401.0] in r["watched"] and [2500.0, 2501.0] in r["watched"], r
    assert abs(r["watched_s"] - (1000 + 0.4 + 1 + 0.6)) < 1e-6, r["watched_s"]
    row = fetch(settings, "SELECT jsonb_array_length(watched) AS n, position_s FROM video_progress WHERE user_id = $1",
                a.id)[0]
    assert row["n"] == 1000 and row["position_s"] == 2


def test_one_long_video_reported_at_its_end_counts_its_time(client, make: Factory, settings):
    """A first report of a two-hour video watched offline counts its whole time (it counted an hour: the time
    allowance's size); the allowance is empty after it."""
    course = make_course(client, make, learners=1, videos=2, duration=7200)
    (a,), (vid, other) = course.learners, course.videos
    r = report(client, a, vid, 7100, [[0, 7100]])
    assert r["status"] == 200 and r["completed"] and r["time_spent_s"] == 7100, r
    r = report(client, a, vid, 10, [[0, 10]])  # re-watched right after: what refilled meanwhile, not 10 s more
    assert r["status"] == 200 and 7100 <= r["time_spent_s"] < 7105, r
    # (review) the allowance is in debt by what the report took past it: a second long video reported whole 20
    # minutes on counts what refilled beyond the debt (3 x 1,200 - 3,500 s), not its 7,100 s (one video per
    # refill was 10x the rate at which time can pass)
    fetch(settings, "UPDATE watch_budget SET at = at - interval '1200 seconds', "
                    "time_at = time_at - interval '1200 seconds' WHERE user_id = $1", a.id)
    r = report(client, a, other, 7100, [[0, 7100]])
    assert r["status"] == 200 and r["completed"] and 90 <= r["time_spent_s"] <= 140, r


def test_whole_videos_reported_back_to_back_wait_as_if_played(client, make: Factory, settings):
    """Three hour-long videos reported fully watched within a second used to complete the course (680 XP): new
    coverage comes from a budget that refills at the playback rate, so the second waits (429, nothing stored)."""
    course = make_course(client, make, learners=1, videos=3, duration=3600)
    (a,), (v1, v2, v3) = course.learners, course.videos
    assert report(client, a, v1, 3600, [[0, 3600]])["status"] == 200  # one long video reported at its end: fine
    r = client.post(f"/api/v1/videos/{v2}/progress", json={"position": 3600, "watched": [[0, 3600]]}, headers=a.h)
    assert r.status_code == 429 and r.json()["code"] == "watch_budget", r.text
    assert 1100 < r.json()["retry_after"] <= 1200 and int(r.headers["Retry-After"]) >= 1100
    stored = fetch(settings, "SELECT video_id FROM video_progress WHERE user_id = $1", a.id)
    assert [r["video_id"] for r in stored] == [v1]
    fetch(settings, "UPDATE watch_budget SET at = at - interval '1300 seconds' WHERE user_id = $1", a.id)
    assert report(client, a, v2, 3600, [[0, 3600]])["status"] == 200  # once that much could have been played
    fetch(settings, "UPDATE watch_budget SET at = at - interval '60 seconds' WHERE user_id = $1", a.id)
    assert report(client, a, v3, 60, [[0, 60]])["status"] == 200  # a minute later, a minute played fits
    kinds = [r["kind"] for r in fetch(settings, "SELECT kind FROM xp_events WHERE user_id = $1", a.id)]
    assert "course_completed" not in kinds and kinds.count("lesson_completed") == 2


async def test_a_request_rolled_back_for_a_deadlock_is_409_to_retry(server, make: Factory, settings, client):
    """A deadlock (here made on purpose: another transaction holds the row the report needs and then wants the
    learner's lock the report holds) was a 500; it is a 409 `conflict` with Retry-After, nothing stored, and the
    same report sent again works."""
    import asyncio

    import asyncpg
    import httpx

    from store.progress import _LEARNER_LOCK

    course = make_course(client, make, learners=1, videos=1, duration=100)
    (a,), (vid,) = course.learners, course.videos
    assert report(client, a, vid, 10, [[0, 10]])["status"] == 200
    other = await asyncpg.connect(settings.database_url)
    await other.execute("SET deadlock_timeout = '30s'")  # the report's side finds the cycle and is rolled back
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM video_progress WHERE user_id = $1 AND video_id = $2 FOR UPDATE", a.id, vid)
        async with httpx.AsyncClient(base_url=server, timeout=30) as http:
            sent = asyncio.create_task(http.post(f"/api/v1/videos/{vid}/progress",
                                                 json={"position": 20, "watched": [[10, 20]]}, headers=a.h))
            await asyncio.sleep(0.4)  # the report holds the learner's lock and waits for the row
            await other.execute(_LEARNER_LOCK, a.id)  # and now this waits for the report: a cycle
            r = await sent
        await tx.rollback()
    finally:
        await other.close()
    assert r.status_code == 409 and r.json()["code"] == "conflict" and r.headers["Retry-After"] == "1", r.text
    assert client.get(f"/api/v1/videos/{vid}/progress", headers=a.h).json()["watched"] == [[0.0, 10.0]]
    assert report(client, a, vid, 20, [[10, 20]])["watched"] == [[0.0, 20.0]]
