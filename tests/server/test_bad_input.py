"""Malformed input gets a 4xx naming the problem, never a 500: NUL characters, invalid UTF-8, numbers past 64
bits, moments without an offset or out of range, oversized bodies."""
from __future__ import annotations

import json
import time

from tests.conftest import Factory, fetch
from tests.server.conftest import Client, make_course


def test_rest_refuses_what_postgres_cannot_store(client, make: Factory):
    inst = make.user("instructor")
    h = inst.h
    r = client.post("/api/v1/courses", content=b'{"title": "a\\u0000b"}', headers=h)
    assert r.status_code == 400 and "NUL" in r.json()["message"]
    # an escaped backslash before u0000 is plain text, not a NUL
    r = client.post("/api/v1/courses", content=b'{"title": "path C:\\\\u0000"}', headers=h)
    assert r.status_code == 201
    cid = r.json()["id"]
    r = client.post("/api/v1/courses", content=b'{"title": "\xff\xfe"}', headers=h)
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    for url in ("/api/v1/courses/9223372036854775808", f"/api/v1/courses/{cid}/search?q=x&video_id=99999999999999999999"):
        r = client.get(url, headers=h)
        assert r.status_code in (400, 404) and r.status_code != 500, (url, r.text)
    r = client.get("/api/v1/courses/99999999999999999999", headers=h)
    assert r.status_code == 400 and r.json()["code"] == "bad_request"
    for scope in ("tenant", "course", "pod"):  # the same answer whatever the board's scope
        r = client.get(f"/api/v1/leaderboards/{scope}/9223372036854775808", headers=h)
        assert r.status_code == 400, (scope, r.text)
    r = client.get("/api/v1/courses/9223372036854775808/live", headers=h)  # (a room name, not a query: was 404)
    assert r.status_code == 400, r.text
    # big enrollment bodies are cut at the API's body limit, not the upload limit
    r = client.post(f"/api/v1/courses/{cid}/enrollments", content=b" " * (2 * 1024 * 1024) + b"{}", headers=h)
    assert r.status_code == 413


def test_moments_need_an_offset_and_a_sane_year(client, make: Factory):
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "When"}, headers=inst.h).json()["id"]
    base = {"type": "short_answer", "title": "Q", "prompt": "Why?", "reference_answer": "Because."}
    for extra, field in (({"opens_at": "2030-01-01T00:00:00", "closes_at": "2031-01-01T00:00:00Z"}, "opens_at"),
                         ({"closes_at": "0001-01-01T00:00:00+01:00"}, None)):
        r = client.post(f"/api/v1/courses/{cid}/assignments", json={**base, **extra}, headers=inst.h)
        assert r.status_code == 400, (extra, r.text)
        if field:
            assert r.json()["field"] == field
    r = client.post(f"/api/v1/courses/{cid}/assignments",
                    json={**base, "opens_at": "2030-01-01T00:00:00Z", "closes_at": "2031-01-01T00:00:00+02:00"},
                    headers=inst.h)
    assert r.status_code == 201, r.text
    r = client.post(f"/api/v1/courses/{cid}/live", json={"title": "L", "scheduled_at": "0001-01-01T00:00:00Z"},
                    headers=inst.h)
    assert r.status_code == 400
    # the years are UTC's, as stored: these were taken (and stored in 2201 and 1969)
    for when in ("2200-12-31T23:00:00-05:00", "1970-01-01T00:30:00+01:00", "0001-01-01T00:00:00+01:00",
                 "9999-12-31T23:00:00-05:00"):
        r = client.post(f"/api/v1/courses/{cid}/live", json={"title": "L", "scheduled_at": when}, headers=inst.h)
        assert r.status_code == 400 and r.json()["field"] == "scheduled_at", (when, r.text)
    r = client.post(f"/api/v1/courses/{cid}/live", json={"title": "L", "scheduled_at": "2200-12-31T23:00:00+01:00"},
                    headers=inst.h)
    assert r.status_code == 201, r.text


async def test_a_nul_in_a_frame_is_a_bad_frame(server, make: Factory):
    course = make_course(server, make, learners=1)
    c = await Client.connect(server, course.room, course.learners[0])
    await c.send(json.dumps({"type": "message.send", "text": "a\u0000b"}))
    err = await c.expect("error")
    assert err["code"] == "bad_frame" and "NUL" in err["detail"]
    await c.close()


async def test_a_deeply_nested_frame_is_a_bad_frame_and_the_socket_stays_open(server, make: Factory):
    """msgspec refuses deep nesting with a RecursionError: that is a bad frame too, not a 1011 close."""
    course = make_course(server, make, learners=1)
    c = await Client.connect(server, course.room, course.learners[0])
    deep = "[" * 2000 + "]" * 2000
    for frame in ('{"type": "message.send", "text": 5, "ref": %s}' % deep, '{"x": %s, "type": "ping"}' % deep):
        await c.send(frame)
        err = await c.expect("error")
        assert err["code"] == "bad_frame", err
    await c.send(json.dumps({"type": "ping", "ref": "still-here"}))
    assert (await c.expect("pong"))["ref"] == "still-here"
    await c.close()


async def test_an_error_does_not_echo_a_huge_field_name(server, client, make: Factory):
    """The decoder's message names the unknown field or bad value it met: a 64 KiB key made each error frame
    (queued per socket, 1,000 a socket) and each 400 body that large. They are cut to 200 characters."""
    course = make_course(server, make, learners=1)
    key = "k" * 65_000
    c = await Client.connect(server, course.room, course.learners[0])
    try:
        for frame in ({"type": "ping", key: 1}, {"type": key}):
            await c.send(json.dumps(frame))
            err = await c.expect("error")
            assert err["code"] == "bad_frame" and len(err["detail"]) <= 200, len(err["detail"])
    finally:
        await c.close()
    r = client.post("/api/v1/courses", json={"title": "x", key: 1}, headers=course.instructor.h)
    assert r.status_code == 400 and len(r.content) < 1000, len(r.content)


async def test_invisible_or_control_character_messages_are_refused_alike_over_socket_and_rest(server, client,
                                                                                            make: Factory, settings):
    course = make_course(server, make, learners=1)
    learner = course.learners[0]
    c = await Client.connect(server, course.room, learner)
    for i, text in enumerate(["\u200b\u200b", "\u3164\u3164", "\u2800", "\u0301\u0301", "ring \x07 bell",
                              "\x1b[31mred\x1b[0m", "del\x7f"]):
        await c.send(json.dumps({"type": "message.send", "text": text, "client_msg_id": f"bad{i}"}))
        err = await c.expect("error")
        assert err["code"] == "bad_frame" and err["ref"] == f"bad{i}", (text, err)
        r = client.post(f"/api/v1/rooms/{course.room}/messages", json={"text": text}, headers=learner.h)
        assert r.status_code == 400 and r.json()["field"] == "text", (text, r.text)
    assert fetch(settings, "SELECT count(*) AS n FROM messages WHERE room_id = $1", course.room)[0]["n"] == 0
    await c.send(json.dumps({"type": "message.send", "text": "tabs\tand\nlines, e\u0301 and \U0001f600 are fine",
                             "client_msg_id": "ok"}))
    await c.expect("message.new", client_msg_id="ok")
    # a client's message id is one line of visible characters (" " and "a\nb" were ids); a NUL is named for what it is
    for i, cid in enumerate([" ", "a\nb", "\u00a0", "\u200b", "\u200b\ufeff "]):  # (tester: a zero-width space was one)
        await c.send(json.dumps({"type": "message.send", "text": "hi", "client_msg_id": cid, "ref": f"id{i}"}))
        err = await c.expect("error", ref=f"id{i}")
        assert err["code"] == "bad_frame" and "client_msg_id must be one line" in err["detail"], err
        r = client.post(f"/api/v1/rooms/{course.room}/messages", json={"text": "hi", "client_msg_id": cid},
                        headers=learner.h)
        assert r.status_code == 400 and r.json()["field"] == "client_msg_id", r.text
        assert "one line of visible characters" in r.json()["message"], r.text
    await c.send(json.dumps({"type": "message.send", "text": "hi", "client_msg_id": "n\u0000l", "ref": "nul"}))
    assert "NUL" in (await c.expect("error", ref="nul"))["detail"]
    await c.close()


async def test_titles_polls_and_goals_refuse_invisible_or_control_character_text(server, client, make: Factory):
    """The room messages' rule for text, on the other things people name or write: course, pod, session and video
    titles, poll questions and options, profile goals (terminal escapes and bells were stored and broadcast)."""
    course = make_course(server, make, learners=1)
    inst, (learner,) = course.instructor, course.learners
    sid = client.post(f"/api/v1/courses/{course.id}/live", json={"title": "Lab"}, headers=inst.h).json()["id"]
    assert client.post(f"/api/v1/live/{sid}/start", headers=inst.h).status_code == 200
    bad = ["\u200b\u200b", "\u3164", "x\x1b[2Jy\x07", "p\x7f", "one\u2028two", "one\u2029two"]
    for text in bad:
        for method, url, body, field in [
                ("POST", "/api/v1/courses", {"title": text}, "title"),
                ("PATCH", f"/api/v1/courses/{course.id}", {"title": text}, "title"),
                ("POST", f"/api/v1/courses/{course.id}/pods", {"name": text}, "name"),
                ("POST", f"/api/v1/courses/{course.id}/live", {"title": text}, None),
                ("POST", f"/api/v1/live/{sid}/polls", {"question": text, "options": ["a", "b"]}, None),
                ("POST", f"/api/v1/live/{sid}/polls", {"question": "?", "options": ["a", text]}, None),
                ("POST", f"/api/v1/courses/{course.id}/videos", {"title": text, "youtube": "dQw4w9WgXcQ"}, "title")]:
            r = client.request(method, url, json=body, headers=inst.h)
            assert r.status_code == 400, (url, repr(text), r.text)
            assert field is None or r.json().get("field") == field, (url, r.text)
        r = client.post(f"/api/v1/courses/{course.id}/videos", data={"title": text}, headers=inst.h,
                        files={"file": ("talk.vtt", b"WEBVTT\n\n00:00.000 --> 00:02.000\nHello\n")})
        assert r.status_code == 400 and r.json()["field"] == "title", (repr(text), r.text)
        r = client.patch("/api/v1/me/profile", json={"goals": [text]}, headers=learner.h)
        if text.startswith("one"):  # a goal's white space runs, line and paragraph separators too, are one space
            assert r.status_code == 200 and r.json()["goals"] == ["one two"], r.text
        else:
            assert r.status_code == 400 and r.json()["field"] == "goals[0]", (repr(text), r.text)
    # free text (a course description) keeps line breaks and tabs, not other control characters; a bot's label is
    # one line
    for method, url, body, field in [
            ("PATCH", f"/api/v1/courses/{course.id}", {"description": "a\x01\x1bb"}, "description"),
            ("POST", "/api/v1/courses", {"title": "T", "description": "x\x07"}, "description"),
            ("POST", "/api/v1/bots", {"name": "bridge", "label": "disc\nord"}, "label")]:
        r = client.request(method, url, json=body, headers=inst.h)
        assert r.status_code == 400 and r.json().get("field") == field, (url, r.text)
        assert "must not contain control characters" in r.json()["message"], r.text  # said, not a regex
    r = client.patch(f"/api/v1/courses/{course.id}", json={"description": "Week 1:\n\tvectors"}, headers=inst.h)
    assert r.status_code == 200 and r.json()["description"] == "Week 1:\n\tvectors", r.text
    # without a title, one from a file name with nothing visible in it is "untitled"
    r = client.post(f"/api/v1/courses/{course.id}/videos", headers=inst.h,
                    files={"file": ("\u200b\u3164.vtt", b"WEBVTT\n\n00:00.000 --> 00:02.000\nHello\n")})
    assert r.status_code == 202, r.text
    assert client.get(f"/api/v1/courses/{course.id}/videos/{r.json()['video_id']}",
                      headers=inst.h).json()["title"] == "untitled"


def test_an_embedding_service_that_fails_is_a_503_with_the_reason(settings, data_dir, make: Factory):
    """With the OpenAI embedder and its service down, search answered a bare 500 after the SDK's retries."""
    from tests.conftest import dead_port, free_port
    from tests.server.conftest import spawn_ready

    with dead_port() as dead:  # (held: a port merely free at first was taken by another test's server, whose 404
        # read as a misconfigured service)
        ((proc, url),) = spawn_ready(data_dir, [f"dead-embedder-{free_port()}"], {
            "STUDYHALL_EMBEDDER": "openai", "OPENAI_BASE_URL": f"http://127.0.0.1:{dead}/v1",
            "OPENAI_API_KEY": "sk-test"})
        _dead_embedder_asks(proc, url, make)


def _dead_embedder_asks(proc, url: str, make: Factory) -> None:  # type: ignore[no-untyped-def]
    """Search and a streamed ask against a server whose embedding service does not answer: 503s saying so."""
    import httpx

    from tests.conftest import stop_process

    try:
        inst = make.user("instructor")
        with httpx.Client(base_url=url, timeout=60) as c:
            cid = c.post("/api/v1/courses", json={"title": "Search"}, headers=inst.h).json()["id"]
            r = c.get(f"/api/v1/courses/{cid}/search", params={"q": "hash"}, headers=inst.h)
            # a streamed ask ends with the same 503 (it was a 500 "tutor failed")
            with c.stream("POST", f"/api/v1/courses/{cid}/ask", json={"question": "what is a hash?"},
                          headers={**inst.h, "Accept": "text/event-stream"}) as sse:
                lines = [ln for ln in sse.iter_lines() if ln.startswith(("event:", "data:"))]
        assert r.status_code == 503 and r.json()["code"] == "embedder_unavailable", r.text
        # said in general: the service's own words (an OpenAI error can quote the key) stay in the log
        assert r.json()["message"] == "the embedding model is unavailable; try again shortly", r.text
        assert r.headers["Retry-After"] == "5"
        assert lines[-2] == "event: error", lines
        err = json.loads(lines[-1].split(":", 1)[1])
        assert (err["status"], err["code"], err["retry_after"]) == (503, "embedder_unavailable", 5), err
        assert err["message"] == r.json()["message"], err
    finally:
        stop_process(proc)


def test_every_response_carries_a_request_id(client, make: Factory):
    """A 500 could not be matched with its log line: each response now says its request id (the caller's own
    X-Request-ID when it is a plain token), as do its access line and a 500's message."""
    r = client.get("/health")
    assert len(r.headers["X-Request-ID"]) == 16
    assert client.get("/health", headers={"X-Request-ID": "lb-7f3a.42"}).headers["X-Request-ID"] == "lb-7f3a.42"
    odd = client.get("/health", headers={"X-Request-ID": "a b\tc" + "x" * 200}).headers["X-Request-ID"]
    assert len(odd) == 16 and " " not in odd
    inst = make.user("instructor")
    r = client.get("/api/v1/courses/999999999", headers={**inst.h, "X-Request-ID": "trace-1"})
    assert r.status_code == 404 and r.headers["X-Request-ID"] == "trace-1"


async def test_a_500_names_the_request_id_of_its_log_line(caplog):
    """In process (a handler that fails on purpose): the 500's message, its header and its log line carry one id."""
    import logging

    import httpx
    from litestar import Litestar, get

    from server.errors import internal_error_handler
    from server.observability import access_log_middleware

    @get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    app = access_log_middleware(Litestar([boom], exception_handlers={Exception: internal_error_handler},
                                         logging_config=None))
    caplog.set_level(logging.ERROR, logger="server.errors")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for sent in ("abc-1", None):
            r = await c.get("/boom", headers={"X-Request-ID": sent} if sent else {})
            rid = r.headers["X-Request-ID"]
            assert r.status_code == 500 and (sent is None or rid == sent)
            assert r.json()["message"] == f"internal server error (request {rid})"
            assert caplog.records[-1].fields["request_id"] == rid  # type: ignore[attr-defined]


async def test_a_client_hanging_up_mid_body_is_a_499_not_a_500(caplog):
    """A client that closed the connection halfway through its body was logged and counted as a 500 (nothing
    failed, and no answer was sent), so 5xx alerts fired on flaky mobile networks."""
    import logging

    from server.observability import access_log_middleware

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        while (await receive())["type"] != "http.disconnect":  # reading the body when the client goes
            pass
        raise OSError("client went away")

    async def boom(scope, receive, send):  # type: ignore[no-untyped-def]
        await receive()
        raise RuntimeError("a bug")

    events = iter([{"type": "http.request", "body": b"x" * 10, "more_body": True}, {"type": "http.disconnect"}])

    async def receive():  # type: ignore[no-untyped-def]
        return next(events)

    async def send(message):  # type: ignore[no-untyped-def]
        pass

    caplog.set_level(logging.INFO, logger="studyhall.access")
    scope = {"type": "http", "method": "POST", "path": "/api/v1/courses", "headers": []}
    try:
        await access_log_middleware(app)(scope, receive, send)
    except OSError:
        pass
    assert caplog.records[-1].fields["status"] == 499  # type: ignore[attr-defined]
    try:  # a failure of ours with the client still there stays a 500
        await access_log_middleware(boom)(dict(scope), lambda: _request(), send)
    except RuntimeError:
        pass
    assert caplog.records[-1].fields["status"] == 500  # type: ignore[attr-defined]


async def _request() -> dict:
    return {"type": "http.request", "body": b"", "more_body": False}


def test_a_client_hanging_up_mid_body_is_counted_as_499_by_the_running_server(server, client, make: Factory):
    """Through the whole stack: the framework answers a body cut off with a 500 of its own, which was what the log
    and the metrics said."""
    import re
    import socket
    from urllib.parse import urlsplit

    inst = make.user("instructor")

    def count() -> float:
        text = client.get("/metrics").text
        m = re.search(r'studyhall_http_requests_total\{method="POST",route="/api/v1/courses",status="499"\} (\S+)', text)
        return float(m.group(1)) if m else 0.0

    before = count()
    url = urlsplit(server)
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(b"POST /api/v1/courses HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + inst.token.encode() + b"\r\nContent-Length: 100000\r\n\r\n"
                     b'{"title": "cut')
    deadline = time.monotonic() + 10
    while count() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count() == before + 1


def test_head_checks_401_challenge_and_a_missing_query_parameter_named(client, make: Factory):
    """Uptime checkers' HEAD /health was a 405; a 401 named no scheme (RFC 9110's WWW-Authenticate); a missing
    required query parameter was a 400 without the `field` every other bad input names."""
    for path in ("/health", "/ready"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)
    r = client.get("/api/v1/me/pods")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.get("/api/v1/me/pods", headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    inst = make.user("instructor")
    cid = client.post("/api/v1/courses", json={"title": "Params"}, headers=inst.h).json()["id"]
    r = client.get(f"/api/v1/courses/{cid}/search", headers=inst.h)
    assert r.status_code == 400 and r.json()["field"] == "q", r.text


def test_a_pattern_a_value_breaks_is_said_in_words_not_as_its_regex():
    """A `player` id with a space came back as "Expected `str` matching regex '^[A-Za-z0-9_.:-]+(?![\\s\\S])'"."""
    import pytest

    from server.api.progress_schemas import ProgressIn, Slot
    from server.decode import decode_json
    from server.errors import ApiError

    for raw, typ, words in ((b'{"position": 1, "player": "a b", "seq": 1}', ProgressIn, "letters, digits"),
                            (b'{"day": "mon", "start": "9am", "end": "10:00"}', Slot, "HH:MM")):
        with pytest.raises(ApiError) as err:
            decode_json(raw, typ)
        assert words in err.value.detail and "regex" not in err.value.detail, err.value.detail


def test_a_value_outside_a_fields_choices_is_told_the_choices():
    """"Invalid enum value 'impossible'" named no allowed value: the client had to guess them."""
    import pytest

    from server.api.assignment_schemas import GenerateIn
    from server.api.progress_schemas import ProfileIn
    from server.decode import decode_json
    from server.errors import ApiError

    for raw, field, choices in ((b'{"video_id": 1, "difficulty": "impossible"}', "difficulty", "easy, hard, medium"),
                                (b'{"video_id": 1, "types": ["essay"]}', "types[0]", "multiple_choice, short_answer")):
        with pytest.raises(ApiError) as err:
            decode_json(raw, GenerateIn)
        assert err.value.field == field and f"(one of: {choices})" in err.value.detail, err.value.detail
    # nested in a list of objects (they were told only at the top level)
    with pytest.raises(ApiError) as err:
        decode_json(b'{"availability": [{"day": "xyz", "start": "09:00", "end": "10:00"}]}', ProfileIn)
    assert err.value.field == "availability[0].day" and "(one of: fri, mon, sat, sun" in err.value.detail, err.value.detail


def test_a_query_value_outside_its_choices_is_told_the_choices(server, client, make: Factory):
    """`?period=year` got "Invalid enum value 'year'" and no word of the allowed periods."""
    course = make_course(server, make, learners=1)
    for url, choices in ((f"/api/v1/leaderboards/course/{course.id}?period=year", "all, month, week"),
                         (f"/api/v1/courses/{course.id}/tutor/feedback?vote=5", "1, -1")):
        r = client.get(url, headers=course.instructor.h)
        assert r.status_code == 400 and f"(one of: {choices})" in r.json()["message"], r.text


def test_a_path_id_is_its_number_in_ascii_digits(server, client, make: Factory, settings):
    """Path ids were read with int(): /courses/3_5, /+35, /035, /%2035 and other scripts' digits (full-width,
    Arabic-Indic) all named course 35, and DELETE /courses/3_5 deleted it."""
    course = make_course(server, make, learners=1)
    inst, cid = course.instructor, course.id
    spelled = [f"{str(cid)[:1]}_{str(cid)[1:]}" if cid >= 10 else f"0_{cid}", f"+{cid}", f"0{cid}", f"%20{cid}",
               str(cid).translate(str.maketrans("0123456789", "０１２３４５６７８９")),
               str(cid).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))]
    for s in spelled:
        assert client.get(f"/api/v1/courses/{s}", headers=inst.h).status_code == 404, s
        assert client.delete(f"/api/v1/courses/{s}", headers=inst.h).status_code == 404, s
        r = client.post(f"/api/v1/courses/{s}/live", json={"title": "L"}, headers=inst.h)
        assert r.status_code == 404, (s, r.text)
    assert fetch(settings, "SELECT count(*) AS n FROM courses WHERE id = $1", cid)[0]["n"] == 1
    assert client.get(f"/api/v1/courses/{cid}", headers=inst.h).status_code == 200
    learner = course.learners[0]
    r = client.post(f"/api/v1/users/{learner.id}/tokens", headers=inst.h)
    assert r.status_code == 201, r.text
    assert client.post(f"/api/v1/users/+{learner.id}/tokens", headers=inst.h).status_code == 404
    for bad in ("0", "-1", str(2**62 + 1), str(2**64), "9" * 40):  # not an id: 400 naming the path's field
        r = client.get(f"/api/v1/courses/{bad}", headers=inst.h)
        assert r.status_code == 400 and r.json()["field"] == "course_id", (bad, r.text)
    # (tester) forms the route does not take say the same, not a bare "Not Found"
    for s in ("1.0", "1e3", "0x10"):
        r = client.get(f"/api/v1/courses/{s}", headers=inst.h)
        assert r.status_code == 404 and r.json()["message"].startswith("no such path: '/api/v1/courses/"), r.text


def test_a_whole_number_query_parameter_is_ascii_digits_and_given_once(server, client, make: Factory):
    """(Tester) `?after=1e3` was read as 1000 and `?after=1.0` as 1 (the websocket's `after` refuses them), and
    `?q=a&q=b` searched "b"."""
    course = make_course(server, make, learners=1)
    inst, room = course.instructor, f"course:{course.id}"
    url = f"/api/v1/rooms/{room}/messages"
    for raw in ("1e3", "1.0", "+5", " 5", "٥", "0x10"):
        r = client.get(url, params={"after": raw}, headers=inst.h)
        assert r.status_code == 400 and r.json()["field"] == "after", (raw, r.text)
    assert client.get(url, params={"after": "5"}, headers=inst.h).status_code == 200
    r = client.get(url, params={"after": "-1"}, headers=inst.h)  # a number out of range says its range
    assert r.status_code == 400 and r.json()["field"] == "after", r.text
    r = client.get(url, params=[("after", "1"), ("after", "2")], headers=inst.h)
    assert r.status_code == 400 and r.json()["field"] == "after" and "2 times" in r.json()["message"], r.text
    r = client.get(f"/api/v1/courses/{course.id}/search", params=[("q", "a"), ("q", "b")], headers=inst.h)
    assert r.status_code == 400 and r.json()["field"] == "q", r.text
    r = client.get(f"/api/v1/courses/{course.id}/progress", params={"user_id": str(2**62 + 1)}, headers=inst.h)
    assert r.status_code == 400 and r.json()["field"] == "user_id", r.text


def test_a_lone_surrogate_escape_is_named_as_such():
    """`{"goals": ["\\ud800"]}` was refused as "Input data was truncated" (msgspec's words), which it was not."""
    import pytest

    from server.api.progress_schemas import ProfileIn
    from server.decode import decode_json
    from server.errors import ApiError

    for raw in (rb'{"goals": ["\ud800"]}', rb'{"goals": ["a\udc00b"]}', rb'{"goals": ["\uD800x"]}',
                rb'{"goals": ["\\ud800\udc00"]}'):  # (an escaped backslash, the text "ud800", then a lone low one)
        with pytest.raises(ApiError) as err:
            decode_json(raw, ProfileIn)
        assert "surrogate" in err.value.detail and "truncated" not in err.value.detail, (raw, err.value.detail)
    assert decode_json(rb'{"goals": ["\ud83d\ude00", "\\ud800"]}', ProfileIn).goals == ["\U0001f600", "\\ud800"]
    with pytest.raises(ApiError) as err:  # not an escape JSON has (\U): not called a surrogate
        decode_json(rb'{"goals": ["\UD800"]}', ProfileIn)
    assert "surrogate" not in err.value.detail
    with pytest.raises(ApiError) as err:  # truncated for real: still said so
        decode_json(b'{"goals": ["abc', ProfileIn)
    assert "truncated" in err.value.detail
