"""YouTube captions as cues, via youtube-transcript-api; plus video id / URL helpers."""
from __future__ import annotations

import html
import logging
import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit
from xml.etree.ElementTree import ParseError

import requests
from youtube_transcript_api import (
    AgeRestricted,
    CouldNotRetrieveTranscript,
    FailedToCreateConsentCookie,
    InvalidVideoId,
    NoTranscriptFound,
    PoTokenRequired,
    RequestBlocked,
    Transcript,
    TranscriptList,
    TranscriptsDisabled,
    VideoUnavailable,
    VideoUnplayable,
    YouTubeDataUnparsable,
    YouTubeRequestFailed,
    YouTubeTranscriptApi,
)
from youtube_transcript_api.proxies import GenericProxyConfig, ProxyConfig

from ingest.cues import Cue
from ingest.errors import IngestError, PermanentIngestError, TransientIngestError
from ingest.subtitles import MAX_CUES, MAX_TIMESTAMP_SECONDS

logger = logging.getLogger(__name__)

# The library never passes a timeout to requests; without one a stalled socket hangs a worker.
REQUEST_TIMEOUT_SECONDS = 30.0

_VIDEO_ID = re.compile(r"[A-Za-z0-9_-]{11}")
_PATH_PREFIXES = {"embed", "shorts", "live", "v", "e"}
_TRANSIENT_HTTP = {408, 429}
# 11 characters, so shaped like an id, but /embed/videoseries?list=... is a playlist player.
_NOT_IDS = {"videoseries"}


@dataclass(slots=True)
class YouTubeTranscript:
    """Captions of one video, as cues, and which track they came from."""

    cues: list[Cue]
    language_code: str
    is_generated: bool
    video_id: str


def parse_youtube_id(value: str) -> str:
    """Return the 11-character video id from an id or a YouTube URL; ValueError otherwise."""
    text = (value or "").strip()
    if _VIDEO_ID.fullmatch(text):
        return text
    # an iframe's protocol-relative src ("//www.youtube.com/embed/ID") has its host after the two slashes
    url = text if "://" in text else f"https:{text}" if text.startswith("//") else f"https://{text}"
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:
        parts, host = None, ""
    candidate = None
    if parts is not None and parts.scheme in ("http", "https"):
        segments = [s for s in parts.path.split("/") if s]
        if host in ("youtu.be", "www.youtu.be"):
            candidate = segments[0] if segments else None
        elif _is_youtube_host(host):
            if segments[:1] == ["watch"]:
                candidate = (parse_qs(parts.query).get("v") or [None])[0]
            elif len(segments) >= 2 and segments[0] in _PATH_PREFIXES:
                candidate = segments[1]
    if candidate and candidate not in _NOT_IDS and _VIDEO_ID.fullmatch(candidate):
        return candidate
    raise ValueError(
        f"not a YouTube video id or URL: {value!r} (expected an 11-character id or a link "
        "like https://www.youtube.com/watch?v=ID or https://youtu.be/ID)"
    )


def _is_youtube_host(host: str) -> bool:
    return host in ("youtube.com", "youtube-nocookie.com", "www.youtube-nocookie.com") or (
        host.endswith(".youtube.com")
    )


def watch_url(video_id: str, t: float | None = None) -> str:
    """Link to the video, optionally starting at `t` seconds (rounded down)."""
    url = f"https://www.youtube.com/watch?v={parse_youtube_id(video_id)}"
    if t is None:
        return url
    if not math.isfinite(t):
        raise ValueError(f"timestamp must be a finite number of seconds, got {t!r}")
    return f"{url}&t={max(0, math.floor(t))}"


def proxy_config(url: str | None) -> ProxyConfig | None:
    """Requests through this http(s) proxy (STUDYHALL_YOUTUBE_PROXY: YouTube blocks most cloud hosts); None: direct."""
    return GenericProxyConfig(http_url=url, https_url=url) if url else None


def fetch_youtube_transcript(
    video_id: str,
    languages: list[str] = ["en"],  # noqa: B006 - never mutated
    *,
    http_client: requests.Session | None = None,
    proxy_config: ProxyConfig | None = None,
) -> YouTubeTranscript:
    """Fetch a video's captions: a manual track in any listed language beats a generated one.

    Blocking (requests); call it from a thread in async code. Raises PermanentIngestError or
    TransientIngestError with a human-readable reason.
    """
    try:
        video_id = parse_youtube_id(video_id)
    except ValueError as exc:
        raise PermanentIngestError(str(exc)) from exc
    languages = [languages] if isinstance(languages, str) else list(languages) or ["en"]
    api = YouTubeTranscriptApi(
        proxy_config=proxy_config,
        http_client=http_client if http_client is not None else _TimeoutSession(),
    )
    try:
        transcripts = api.list(video_id)
        track = _choose_track(transcripts, languages)
        # preserve_formatting: without it the library drops everything between a '<' and a '>' ("if i < n and j > 0"
        # lost its middle); it keeps a few formatting tags then, which _clean_text takes out
        fetched = track.fetch(preserve_formatting=True)
    except IngestError:
        raise
    except (CouldNotRetrieveTranscript, requests.RequestException, ParseError) as exc:
        error = _ingest_error(exc)
        logger.info("youtube %s: %s (%s)", video_id, error.reason, type(exc).__name__)
        raise error from exc
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        # the library reads YouTube's page without checks (a caption name in another form: KeyError 'runs'; no
        # playability status: AttributeError), and defusedxml refuses entities with a ValueError
        logger.warning("youtube %s: unreadable page (%s: %s)", video_id, type(exc).__name__, exc)
        raise PermanentIngestError(_UNPARSABLE) from exc

    # the limits an uploaded transcript has: a caption track is its video owner's to write
    if len(fetched.snippets) > MAX_CUES:
        raise PermanentIngestError(f"the captions have too many cues: more than {MAX_CUES}")
    cues, outside = [], 0
    for snippet in fetched.snippets:
        start, end = snippet.start, snippet.start + snippet.duration
        if not (math.isfinite(start) and math.isfinite(end) and 0 <= start <= end <= MAX_TIMESTAMP_SECONDS):
            outside += 1  # no moment of the video: left out (the rest of the track is good)
            continue
        text = _clean_text(snippet.text)
        if text:
            cues.append(Cue(start=start, end=end, text=text))
    if outside:
        logger.warning("youtube %s: %d captions with times outside 0-48 h left out", video_id, outside)
    logger.info(
        "youtube %s: %d cues (%s, generated=%s)",
        video_id, len(cues), fetched.language_code, fetched.is_generated,
    )
    return YouTubeTranscript(
        cues=cues,
        language_code=fetched.language_code,
        is_generated=fetched.is_generated,
        video_id=video_id,
    )


def _choose_track(transcripts: TranscriptList, languages: list[str]) -> Transcript:
    """The first listed language with a manual track, else with a generated one; a language matches its
    regional tracks ("en" takes "en-GB") and a regional one its base ("en-US" takes "en"). Failing those, a
    manual track YouTube translates into a listed language (counted as generated: a machine wrote it)."""
    tracks = list(transcripts)

    def matching(code: str, generated: bool) -> Transcript | None:
        code = code.lower()
        base = code.split("-")[0]
        ranked = [t for t in tracks if t.is_generated == generated and t.language_code.lower() == code]
        ranked += [t for t in tracks if t.is_generated == generated
                   and t.language_code.lower().split("-")[0] == base and t not in ranked]
        return ranked[0] if ranked else None

    for generated in (False, True):
        for code in languages:
            if (found := matching(code, generated)) is not None:
                return found
    for code in languages:
        for t in tracks:
            if not t.is_generated and t.is_translatable:
                offered = {x.language_code.lower(): x.language_code for x in t.translation_languages}
                if code.lower() in offered:
                    return t.translate(offered[code.lower()])
    available = ", ".join(
        t.language_code + (" (auto-generated)" if t.is_generated else "") for t in tracks
    )
    raise PermanentIngestError(
        f"no captions in {', '.join(languages)}; available: {available or 'none'}"
    )


_UNPARSABLE = "YouTube's page could not be read (the captions library may need an update)"


# The formatting tags the library keeps with preserve_formatting (a whole tag, with its attributes)
_FORMAT_TAG = re.compile(r"</?(?:strong|em|b|i|mark|small|del|ins|sub|sup)(?:\s[^<>]*)?>", re.I)


def _clean_text(text: str) -> str:
    # The library unescapes once, but YouTube sometimes double-escapes (&amp;#39;).
    return " ".join(html.unescape(_FORMAT_TAG.sub("", text)).split())


def _ingest_error(exc: Exception) -> IngestError:
    if isinstance(exc, requests.Timeout):
        return TransientIngestError("YouTube did not respond in time")
    if isinstance(exc, requests.ConnectionError):
        return TransientIngestError("could not connect to YouTube")
    if isinstance(exc, requests.RequestException):
        return TransientIngestError(f"request to YouTube failed: {exc}")
    if isinstance(exc, ParseError):
        return TransientIngestError("YouTube returned an unreadable caption file")
    if isinstance(exc, RequestBlocked):  # includes IpBlocked (HTTP 429, captcha page)
        return TransientIngestError("YouTube is rate-limiting or blocking our requests")
    if isinstance(exc, YouTubeRequestFailed):
        status = _http_status(exc)
        reason = f"YouTube request failed (HTTP {status or 'error'})"
        if status is None or status in _TRANSIENT_HTTP or status >= 500:
            return TransientIngestError(reason)
        return PermanentIngestError(reason)
    if isinstance(exc, TranscriptsDisabled):
        return PermanentIngestError("captions are disabled for this video")
    if isinstance(exc, InvalidVideoId):
        return PermanentIngestError("not a valid YouTube video id")
    if isinstance(exc, VideoUnavailable):
        return PermanentIngestError("video unavailable")
    if isinstance(exc, AgeRestricted):
        return PermanentIngestError("video is age-restricted; captions need a signed-in account")
    if isinstance(exc, VideoUnplayable):
        details = "; ".join([exc.reason or "no reason given", *filter(None, exc.sub_reasons)])
        return PermanentIngestError(f"video cannot be played: {details}")
    if isinstance(exc, NoTranscriptFound):
        return PermanentIngestError("no captions in the requested languages")
    if isinstance(exc, PoTokenRequired):
        return PermanentIngestError("YouTube requires a proof-of-origin token for these captions")
    if isinstance(exc, FailedToCreateConsentCookie):
        return PermanentIngestError("YouTube asked for cookie consent that could not be given")
    if isinstance(exc, YouTubeDataUnparsable):
        return PermanentIngestError(_UNPARSABLE)
    return PermanentIngestError(f"could not fetch captions ({type(exc).__name__})")


def _http_status(exc: YouTubeRequestFailed) -> int | None:
    # The library raises YouTubeRequestFailed inside `except HTTPError`, keeping only its text.
    cause = exc.__cause__ or exc.__context__
    response = getattr(cause, "response", None)
    return getattr(response, "status_code", None)


class _TimeoutSession(requests.Session):
    """A Session that applies REQUEST_TIMEOUT_SECONDS when the caller gives no timeout."""

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", REQUEST_TIMEOUT_SECONDS)
        return super().request(method, url, *args, **kwargs)
