"""YouTube source: URL parsing, and the real youtube-transcript-api client over recorded HTTP."""
from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.response import HTTPResponse

from ingest.cues import Cue
from ingest.errors import PermanentIngestError, TransientIngestError
from ingest.youtube import (
    REQUEST_TIMEOUT_SECONDS,
    YouTubeTranscript,
    _TimeoutSession,
    fetch_youtube_transcript,
    parse_youtube_id,
    watch_url,
)

FIXTURES = Path(__file__).parent / "fixtures" / "youtube"
VIDEO_ID = "r6sGWTCMz2k"
API_KEY = "AIzaSyRecordedKey_0123456789-abcdefghij"

HTML = "text/html; charset=utf-8"
JSON = "application/json; charset=UTF-8"
XML = "text/xml; charset=UTF-8"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


class RecordedAdapter(HTTPAdapter):
    """Serves recorded responses keyed by "METHOD /path" (timedtext also by ?lang=).

    A route value is (status, body, content type) or an exception to raise. `fail_first`
    exceptions are raised, one per request, before any route is served.
    """

    def __init__(self, routes: dict, fail_first: list[Exception] | None = None) -> None:
        super().__init__()
        self.routes = routes
        self.fail_first = list(fail_first or [])
        self.sent: list[requests.PreparedRequest] = []
        self.timeouts: list[object] = []
        self.proxies: list[object] = []

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        self.sent.append(request)
        self.timeouts.append(timeout)
        self.proxies.append(proxies)
        if self.fail_first:
            raise self.fail_first.pop(0)
        url = urlsplit(request.url)
        key = f"{request.method} {url.path}"
        lang = parse_qs(url.query).get("lang", [None])[0]
        route = self.routes.get(f"{key}?lang={lang}", self.routes.get(key))
        if route is None:
            raise AssertionError(f"unrecorded request: {request.method} {request.url}")
        if isinstance(route, Exception):
            raise route
        status, body, content_type = route
        raw = HTTPResponse(
            body=io.BytesIO(body),
            headers={"Content-Type": content_type, "Content-Length": str(len(body))},
            status=status,
            reason={200: "OK", 404: "Not Found", 429: "Too Many Requests"}.get(status, "Error"),
            preload_content=False,
            decode_content=False,
        )
        return self.build_response(request, raw)


def recorded_session(**overrides) -> tuple[requests.Session, RecordedAdapter]:
    """A Session answering the library's four requests from fixtures; overrides replace routes."""
    routes = {
        "GET /watch": (200, fixture("watch.html"), HTML),
        "POST /youtubei/v1/player": (200, fixture("player.json"), JSON),
        "GET /api/timedtext?lang=en": (200, fixture("timedtext_en.xml"), XML),
        "GET /api/timedtext?lang=de": (200, fixture("timedtext_de.xml"), XML),
    }
    fail_first = overrides.pop("fail_first", None)
    routes.update(overrides)
    adapter = RecordedAdapter(routes, fail_first)
    session = requests.Session()
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session, adapter


def player(name: str) -> tuple[int, bytes, str]:
    return (200, fixture(name), JSON)


# --- URL parsing ---------------------------------------------------------------------------

VALID = [
    "r6sGWTCMz2k",
    "  r6sGWTCMz2k\n",
    "https://www.youtube.com/watch?v=r6sGWTCMz2k",
    "http://www.youtube.com/watch?v=r6sGWTCMz2k",
    "https://youtube.com/watch?v=r6sGWTCMz2k",
    "www.youtube.com/watch?v=r6sGWTCMz2k",
    "youtube.com/watch?v=r6sGWTCMz2k",
    "https://m.youtube.com/watch?v=r6sGWTCMz2k",
    "https://music.youtube.com/watch?v=r6sGWTCMz2k&feature=share",
    "https://www.youtube.com/watch?v=r6sGWTCMz2k&t=42s",
    "https://www.youtube.com/watch?v=r6sGWTCMz2k&list=PLZHQObOWTQDNPOjrT6KVlfJuKtYTftqH6&index=3",
    "https://www.youtube.com/watch?feature=youtu.be&v=r6sGWTCMz2k",
    "https://www.youtube.com/watch?v=r6sGWTCMz2k#t=1m2s",
    "https://WWW.YouTube.com/watch?v=r6sGWTCMz2k",
    "https://youtu.be/r6sGWTCMz2k",
    "youtu.be/r6sGWTCMz2k",
    "https://youtu.be/r6sGWTCMz2k?t=42",
    "https://youtu.be/r6sGWTCMz2k?si=Ab12Cd34Ef56Gh78",
    "https://www.youtube.com/embed/r6sGWTCMz2k",
    "https://www.youtube.com/embed/r6sGWTCMz2k?start=42&autoplay=1",
    "//www.youtube.com/embed/r6sGWTCMz2k",  # an iframe's src, protocol-relative
    "https://www.youtube-nocookie.com/embed/r6sGWTCMz2k",
    "https://youtube-nocookie.com/embed/r6sGWTCMz2k?rel=0",
    "https://www.youtube.com/shorts/r6sGWTCMz2k",
    "https://youtube.com/shorts/r6sGWTCMz2k?feature=share",
    "https://www.youtube.com/live/r6sGWTCMz2k",
    "https://www.youtube.com/live/r6sGWTCMz2k?si=abc",
    "https://www.youtube.com/v/r6sGWTCMz2k",
    "https://www.youtube.com/v/r6sGWTCMz2k?version=3",
    "https://www.youtube.com/shorts/r6sGWTCMz2k/",
]

INVALID = [
    "",
    "   ",
    "r6sGWTCMz2",  # 10 characters
    "r6sGWTCMz2kk",  # 12 characters
    "r6sGWTC!z2k",
    "youtube.com",
    "https://www.youtube.com/",
    "https://www.youtube.com/watch",
    "https://www.youtube.com/watch?v=",
    "https://www.youtube.com/watch?v=short",
    "https://www.youtube.com/watch?list=PLZHQObOWTQDNPOjrT6KVlfJuKtYTftqH6",
    "https://www.youtube.com/playlist?list=PLZHQObOWTQDNPOjrT6KVlfJuKtYTftqH6",
    "https://www.youtube.com/embed/videoseries?list=PLZHQObOWTQDNPOjrT6KVlfJuKtYTftqH6",
    "https://www.youtube.com/@3blue1brown",
    "https://www.youtube.com/channel/UCYO_jab_esuFRV4b17AJtAw",
    "https://youtu.be/",
    "https://vimeo.com/watch?v=r6sGWTCMz2k",
    "https://notyoutube.com/watch?v=r6sGWTCMz2k",
    "https://youtube.com.evil.example/watch?v=r6sGWTCMz2k",
    "ftp://www.youtube.com/watch?v=r6sGWTCMz2k",
    "https://www.youtube.com/results?search_query=fourier",
    "https://[broken/watch?v=r6sGWTCMz2k",
]


@pytest.mark.parametrize("value", VALID)
def test_parse_youtube_id_accepts_ids_and_urls(value):
    assert parse_youtube_id(value) == VIDEO_ID


@pytest.mark.parametrize("value", INVALID)
def test_parse_youtube_id_rejects_everything_else(value):
    with pytest.raises(ValueError, match="not a YouTube video id or URL"):
        parse_youtube_id(value)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (None, "https://www.youtube.com/watch?v=r6sGWTCMz2k"),
        (0, "https://www.youtube.com/watch?v=r6sGWTCMz2k&t=0"),
        (42, "https://www.youtube.com/watch?v=r6sGWTCMz2k&t=42"),
        (42.9, "https://www.youtube.com/watch?v=r6sGWTCMz2k&t=42"),
        (-3.0, "https://www.youtube.com/watch?v=r6sGWTCMz2k&t=0"),
    ],
)
def test_watch_url(t, expected):
    assert watch_url(VIDEO_ID, t) == expected


def test_watch_url_normalises_a_link_and_rejects_garbage():
    assert watch_url("https://youtu.be/r6sGWTCMz2k?t=9", 61.5) == (
        "https://www.youtube.com/watch?v=r6sGWTCMz2k&t=61"
    )
    with pytest.raises(ValueError):
        watch_url("not a video")
    with pytest.raises(ValueError):
        watch_url(VIDEO_ID, float("nan"))


# --- fetching through the real client ------------------------------------------------------


def test_fetch_prefers_manual_captions_over_generated_in_an_earlier_language():
    session, _ = recorded_session()

    transcript = fetch_youtube_transcript(VIDEO_ID, ["de", "en"], http_client=session)

    assert transcript == YouTubeTranscript(
        cues=[
            Cue(start=0.32, end=pytest.approx(3.72), text="Today we'll build a Fourier series"),
            Cue(3.72, pytest.approx(6.6), "from sines & cosines, one circle at a time."),
            Cue(start=7.8, end=pytest.approx(11.85), text='Here "period" means 2π.'),
            Cue(start=12.45, end=pytest.approx(15.55), text="[Music]"),
        ],
        language_code="en",
        is_generated=False,
        video_id=VIDEO_ID,
    )


def test_fetch_follows_the_library_http_flow():
    session, adapter = recorded_session()

    fetch_youtube_transcript(VIDEO_ID, http_client=session)

    watch, player_call, timedtext = adapter.sent
    assert (watch.method, watch.url) == ("GET", f"https://www.youtube.com/watch?v={VIDEO_ID}")
    assert player_call.method == "POST"
    assert player_call.url == f"https://www.youtube.com/youtubei/v1/player?key={API_KEY}"
    assert json.loads(player_call.body)["videoId"] == VIDEO_ID
    query = parse_qs(urlsplit(timedtext.url).query)
    assert (timedtext.method, query["lang"], query["v"]) == ("GET", ["en"], [VIDEO_ID])
    assert "fmt" not in query  # the library drops &fmt=srv3 to get the plain XML format


def test_fetch_falls_back_to_generated_captions():
    session, _ = recorded_session()

    transcript = fetch_youtube_transcript(VIDEO_ID, ["de"], http_client=session)

    assert (transcript.language_code, transcript.is_generated) == ("de", True)
    assert transcript.cues == [
        Cue(start=0.08, end=pytest.approx(3.04), text="heute bauen wir eine Fourier-Reihe"),
        Cue(start=3.04, end=pytest.approx(6.56), text="aus Sinus und Kosinus"),
    ]


def test_fetch_without_a_matching_language_lists_what_is_available():
    session, adapter = recorded_session()

    with pytest.raises(PermanentIngestError) as caught:
        # (French or Spanish would be a translation of the English track: languages YouTube does not offer)
        fetch_youtube_transcript(VIDEO_ID, ["tlh", "qya"], http_client=session)

    assert caught.value.reason == "no captions in tlh, qya; available: en, de (auto-generated)"
    assert not any("/api/timedtext" in r.url for r in adapter.sent)


def test_fetch_accepts_a_url():
    session, adapter = recorded_session()

    transcript = fetch_youtube_transcript(
        "https://youtu.be/r6sGWTCMz2k?t=42", http_client=session
    )

    assert transcript.video_id == VIDEO_ID
    assert adapter.sent[0].url == f"https://www.youtube.com/watch?v={VIDEO_ID}"


def test_fetch_rejects_a_bad_id_without_any_request():
    session, adapter = recorded_session()

    with pytest.raises(PermanentIngestError, match="not a YouTube video id or URL"):
        fetch_youtube_transcript("https://vimeo.com/12345", http_client=session)

    assert adapter.sent == []


@pytest.mark.parametrize(
    ("player_fixture", "reason"),
    [
        ("player_captions_disabled.json", "captions are disabled for this video"),
        ("player_video_unavailable.json", "video unavailable"),
        (
            "player_private.json",
            "video cannot be played: This video is private; "
            "If the owner of this video has granted you access, please sign in.",
        ),
    ],
)
def test_fetch_permanent_failures(player_fixture, reason):
    session, _ = recorded_session(**{"POST /youtubei/v1/player": player(player_fixture)})

    with pytest.raises(PermanentIngestError) as caught:
        fetch_youtube_transcript(VIDEO_ID, http_client=session)

    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "error",
    [
        requests.ConnectionError("Connection refused"),
        requests.ReadTimeout("Read timed out. (read timeout=30)"),
    ],
)
def test_network_error_is_transient_and_the_next_attempt_succeeds(error):
    session, adapter = recorded_session(fail_first=[error])

    with pytest.raises(TransientIngestError) as caught:
        fetch_youtube_transcript(VIDEO_ID, http_client=session)
    assert not caught.value.permanent

    transcript = fetch_youtube_transcript(VIDEO_ID, http_client=session)
    assert transcript.language_code == "en"
    assert len(transcript.cues) == 4


@pytest.mark.parametrize(
    ("route", "status", "expected"),
    [
        ("GET /watch", 429, TransientIngestError),
        ("POST /youtubei/v1/player", 429, TransientIngestError),
        ("GET /api/timedtext?lang=en", 429, TransientIngestError),
        ("GET /watch", 503, TransientIngestError),
        ("GET /api/timedtext?lang=en", 500, TransientIngestError),
        ("GET /api/timedtext?lang=en", 404, PermanentIngestError),
    ],
)
def test_http_errors(route, status, expected):
    session, _ = recorded_session(**{route: (status, b"<html>error</html>", HTML)})

    with pytest.raises(expected) as caught:
        fetch_youtube_transcript(VIDEO_ID, http_client=session)

    if status == 429:
        assert caught.value.reason == "YouTube is rate-limiting or blocking our requests"
    else:
        assert caught.value.reason == f"YouTube request failed (HTTP {status})"


def test_bot_check_and_captcha_page_are_transient():
    bot_check, _ = recorded_session(**{"POST /youtubei/v1/player": player("player_bot_check.json")})
    captcha_page = b'<html><body><form><div class="g-recaptcha"></div></form></body></html>'
    captcha, _ = recorded_session(**{"GET /watch": (200, captcha_page, HTML)})

    for session in (bot_check, captcha):
        with pytest.raises(TransientIngestError, match="rate-limiting or blocking"):
            fetch_youtube_transcript(VIDEO_ID, http_client=session)


def test_empty_caption_file_is_transient():
    session, _ = recorded_session(**{"GET /api/timedtext?lang=en": (200, b"", XML)})

    with pytest.raises(TransientIngestError, match="unreadable caption file"):
        fetch_youtube_transcript(VIDEO_ID, http_client=session)


def test_default_session_sets_a_timeout():
    session = _TimeoutSession()
    adapter = RecordedAdapter({"GET /watch": (200, fixture("watch.html"), HTML)})
    session.mount("https://", adapter)

    session.get(f"https://www.youtube.com/watch?v={VIDEO_ID}")

    assert adapter.timeouts == [REQUEST_TIMEOUT_SECONDS]


def _player_with(edit) -> tuple[int, bytes, str]:  # type: ignore[no-untyped-def]
    """The recorded player reply with its caption list changed by `edit(tracks, renderer)`."""
    data = json.loads(fixture("player.json"))
    renderer = data["captions"]["playerCaptionsTracklistRenderer"]
    edit(renderer["captionTracks"], renderer)
    return (200, json.dumps(data).encode(), JSON)


def test_a_language_takes_its_regional_tracks_and_a_translation_last():
    """The library matches language codes exactly: with "en" asked, a manual "en-GB" track lost to a generated
    one, and a manual "en-US" alone failed the video for good."""
    def regional(tracks, _):  # type: ignore[no-untyped-def]
        tracks[0]["languageCode"] = "en-GB"
        tracks[0]["vssId"] = ".en-GB"

    for asked in (["en"], ["en-US"], ["fr", "en"]):
        session, _ = recorded_session(**{"POST /youtubei/v1/player": _player_with(regional)})
        got = fetch_youtube_transcript(VIDEO_ID, asked, http_client=session)
        assert (got.language_code, got.is_generated) == ("en-GB", False), asked
    # nothing in French: the manual English track, translated by YouTube (a machine's words: generated)
    session, adapter = recorded_session()
    got = fetch_youtube_transcript(VIDEO_ID, ["fr"], http_client=session)
    assert (got.language_code, got.is_generated) == ("fr", True) and got.cues
    assert "tlang=fr" in adapter.sent[-1].url


def test_a_page_the_library_cannot_read_fails_the_video_with_the_reason():
    """The library reads YouTube's data unchecked: a caption name given as `simpleText` raised KeyError 'runs',
    which the job retried as an internal error."""
    def simple_text(tracks, _):  # type: ignore[no-untyped-def]
        tracks[0]["name"] = {"simpleText": "English"}

    session, _ = recorded_session(**{"POST /youtubei/v1/player": _player_with(simple_text)})
    with pytest.raises(PermanentIngestError, match="could not be read"):
        fetch_youtube_transcript(VIDEO_ID, ["en"], http_client=session)


def test_requests_go_through_the_configured_proxy():
    """STUDYHALL_YOUTUBE_PROXY: every request of a fetch goes through it (YouTube blocks most cloud hosts)."""
    from ingest.youtube import proxy_config

    url = "http://user:pw@proxy.example:3128"
    session, adapter = recorded_session()
    assert fetch_youtube_transcript(VIDEO_ID, ["en"], http_client=session, proxy_config=proxy_config(url)).cues
    assert adapter.proxies and all(p == {"http": url, "https": url} for p in adapter.proxies)
    assert proxy_config(None) is None


def _from_captions(*texts: bytes) -> YouTubeTranscript:
    """What fetching a video whose English captions are these <text> elements gives."""
    xml = b'<?xml version="1.0" encoding="utf-8" ?><transcript>' + b"".join(texts) + b"</transcript>"
    session, _ = recorded_session(**{"GET /api/timedtext?lang=en": (200, xml, XML)})
    return fetch_youtube_transcript(VIDEO_ID, ["en"], http_client=session)


def test_captions_keep_to_the_transcript_limits(monkeypatch):
    """A caption track is its video owner's to write: times outside 0-48 h (negative, not a number, past the
    limit) are left out as no moment of the video, and a track of more cues than an upload may have fails."""
    import ingest.youtube as youtube

    texts = (b'<text start="1.0" dur="2.0">kept</text><text start="-5" dur="1">negative</text>',
             b'<text start="nan" dur="1">not a number</text><text start="200000" dur="1">past 48 hours</text>',
             b'<text start="3.0" dur="inf">forever</text><text start="4.0" dur="1.5">kept too</text>')
    got = _from_captions(*texts)
    assert [(c.start, c.end, c.text) for c in got.cues] == [(1.0, 3.0, "kept"), (4.0, 5.5, "kept too")]
    monkeypatch.setattr(youtube, "MAX_CUES", 3)
    with pytest.raises(PermanentIngestError, match="too many cues"):
        _from_captions(*texts)


def test_caption_text_between_a_less_than_and_a_greater_than_is_kept():
    """The library (without preserve_formatting) removed anything from a '<' to a '>': "if i < n and j > 0 we stop"
    was stored as "if i 0 we stop". Formatting tags still go."""
    transcript = _from_captions(
        b'<text start="0.5" dur="2.0">if i &amp;lt; n and j &amp;gt; 0 we stop</text>',
        b'<text start="3.0" dur="2.0">&amp;lt;i&amp;gt;really&amp;lt;/i&amp;gt; &amp;lt;b&amp;gt;fast&amp;lt;/b&amp;gt;</text>')
    assert [c.text for c in transcript.cues] == ["if i < n and j > 0 we stop", "really fast"]
