"""One settings object, read from the environment (and `<data-dir>/connection.env` for joiners)."""
from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from exc


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be a number, got {raw!r}") from exc


def _str(name: str, default: str | None = None) -> str | None:
    raw = os.environ.get(name)
    return raw if raw not in (None, "") else default


def _metrics_token() -> str | None:
    """STUDYHALL_METRICS_TOKEN; one of only white space is refused (it left /metrics public, as no token does)."""
    if _str("STUDYHALL_METRICS_TOKEN") is not None and _key("STUDYHALL_METRICS_TOKEN") is None:
        raise SystemExit("STUDYHALL_METRICS_TOKEN is only white space: set a token, or unset it for a public /metrics")
    token = _key("STUDYHALL_METRICS_TOKEN")
    if token is not None and not (token.isascii() and token.isprintable()):
        # (tester) an HTTP header carries bytes, read as Latin-1: "pässwört" could never be sent so as to match
        raise SystemExit("STUDYHALL_METRICS_TOKEN must be printable ASCII (it is sent in an HTTP header)")
    return token


def _key(name: str) -> str | None:
    """An API key without the white space a secret file ends with (a trailing newline in a header is refused,
    and the HTTP library's refusal quotes the header, key and all)."""
    raw = (_str(name) or "").strip()
    return raw or None


def _choice(name: str, default: str | None, choices: tuple[str, ...]) -> str | None:
    """One of `choices` (any case); a misspelling stops the start instead of failing each request later."""
    raw = _str(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in choices:
        raise SystemExit(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return value




@dataclass(frozen=True)
class Settings:
    """Every knob of studyhall; README lists each environment variable."""

    data_dir: Path = Path(".studyhall")
    database_url: str | None = None
    redis_url: str | None = None
    secret: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"
    # auth
    token_ttl_s: int = 7 * 24 * 3600
    # limits
    max_upload_bytes: int = 500 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    # ingest
    embedder: str = "local"
    whisper_model: str | None = None
    youtube_languages: tuple[str, ...] = ("en",)
    youtube_proxy: str | None = None  # http(s) proxy URL for YouTube requests (cloud hosts are blocked)
    tutor_daily_limit: int = 100
    tutor_helpful_per_day: int = 5  # replies the tutor may mark helpful per learner per 24 h (0: it checks none)
    job_heartbeat_ms: int = 30_000
    job_retry_base_s: float = 2.0
    job_max_attempts: int = 5
    worker_max_jobs: int = 2  # ingest jobs one worker process runs at once
    worker_quick_jobs: int = 4  # grading, matching and check jobs at once (their own queue: never behind an ingest)
    db_pool_max: int = 20  # Postgres connections per server process (a worker takes at most 8, or this if fewer)
    db_timeout_s: float = 15.0  # a server process's Postgres statement gives up after this (503 to retry)
    # providers
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    openai_embed_model: str = "text-embedding-3-small"
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None
    anthropic_model: str = "claude-sonnet-4-5"
    llm_provider: str | None = None
    # realtime rooms
    ws_max_text: int = 4000
    ws_send_rate: float = 3.0
    ws_send_burst: int = 10
    ws_queue_max: int = 1000
    ws_max_per_user: int = 50  # open sockets per user on one server process (bots are not limited)
    ws_connect_rate: float = 2.0  # sockets a user may open per second, over all processes (bots: 20 times as many)
    ws_connect_burst: int = 60
    ws_stall_s: float = 45.0  # a send waiting this long for the client to read closes the socket (4008)
    sse_keepalive_s: float = 15.0  # a streamed answer with nothing to send this long sends a comment (proxies idle out)
    metrics_token: str | None = None  # when set, GET /metrics wants `Authorization: Bearer <it>` (None: public)
    presence_ttl_s: float = 15.0
    presence_grace_s: float = 3.0  # a user's last socket in a room closing announces `left` this much later
    presence_max: int = 200
    # a live session left running ends by itself: nobody present and nothing said for this long (0: never) ...
    live_idle_end_min: int = 30
    live_max_hours: int = 12  # ... or this long after it started (0: never)
    # assignments and grading
    review_threshold: float = 0.7
    review_band: tuple[float, float] = (40.0, 60.0)
    max_answer_chars: int = 20_000
    # progress, XP, leaderboards, matcher
    video_complete_share: float = 0.9
    progress_rate: float = 1.0
    progress_burst: int = 30
    leaderboard_event_s: float = 5.0
    match_weekday: int = 0
    match_hour: int = 6
    match_weekly: bool = True  # the worker runs the weekly round (off: only instructors start rounds)
    xp_async_commit: bool = False
    llm_timeout_s: float = 60.0
    generate_deadline_s: float = 120.0

    @property
    def connection_env(self) -> Path:
        return self.data_dir / "connection.env"

    def with_urls(self, database_url: str, redis_url: str) -> "Settings":
        return replace(self, database_url=database_url, redis_url=redis_url)


def load_settings(data_dir: str | Path | None = None) -> Settings:
    """Read settings from the environment; generate and keep a secret in the data dir when unset."""
    ddir = Path(data_dir or _str("STUDYHALL_DATA_DIR", ".studyhall")).resolve()
    if ddir.exists() and not ddir.is_dir():  # (it was "FileExistsError: [Errno 17] File exists")
        raise SystemExit(f"the data folder (--data-dir or STUDYHALL_DATA_DIR) {str(ddir)!r} is a file, not a folder")
    given = _str("STUDYHALL_SECRET")
    secret = _secret(given, "STUDYHALL_SECRET") if given is not None else _load_or_create_secret(ddir)
    langs = tuple(x.strip() for x in (_str("STUDYHALL_YOUTUBE_LANGUAGES", "en") or "en").split(",") if x.strip())
    settings = Settings(
        data_dir=ddir,
        database_url=_url("DATABASE_URL", ("postgres", "postgresql")),
        redis_url=_url("REDIS_URL", ("redis", "rediss", "unix")),
        secret=secret,
        host=_str("STUDYHALL_HOST", "127.0.0.1") or "127.0.0.1",
        port=_bounded("STUDYHALL_PORT", 8000, 1, 65535),
        log_level=str(_choice("STUDYHALL_LOG_LEVEL", "info", ("debug", "info", "warning", "warn", "error", "critical",
                                                             "fatal", "notset"))).upper(),
        token_ttl_s=_bounded("STUDYHALL_TOKEN_TTL", 7 * 24 * 3600, 60, 366 * 24 * 3600),
        max_upload_bytes=_bounded("STUDYHALL_MAX_UPLOAD_MB", 500, 1, 100_000) * 1024 * 1024,
        embedder=str(_choice("STUDYHALL_EMBEDDER", "local", ("local", "openai"))),
        whisper_model=_str("STUDYHALL_WHISPER_MODEL"),
        youtube_languages=langs or ("en",),
        youtube_proxy=_url("STUDYHALL_YOUTUBE_PROXY", ("http", "https")),
        tutor_daily_limit=_bounded("STUDYHALL_TUTOR_DAILY_LIMIT", 100, 1, 1_000_000),
        tutor_helpful_per_day=_bounded("STUDYHALL_TUTOR_HELPFUL_PER_DAY", 5, 0, 1000),
        job_heartbeat_ms=int(_ranged("STUDYHALL_JOB_HEARTBEAT_S", 30.0, 1.0, 3600.0) * 1000),
        job_retry_base_s=_ranged("STUDYHALL_JOB_RETRY_BASE_S", 2.0, 0.0, 300.0),
        job_max_attempts=_bounded("STUDYHALL_JOB_MAX_ATTEMPTS", 5, 1, 1000),
        worker_max_jobs=_bounded("STUDYHALL_WORKER_CONCURRENCY", 2, 1, 1000),
        worker_quick_jobs=_bounded("STUDYHALL_WORKER_QUICK_CONCURRENCY", 4, 1, 1000),
        db_pool_max=_bounded("STUDYHALL_DB_POOL_MAX", 20, 2, 1000),
        db_timeout_s=_ranged("STUDYHALL_DB_TIMEOUT_S", 15.0, 1.0, 3600.0),
        openai_api_key=_key("OPENAI_API_KEY"),
        openai_base_url=_url("OPENAI_BASE_URL", ("http", "https")),
        openai_model=_str("OPENAI_MODEL", "gpt-4o-mini") or "gpt-4o-mini",
        openai_embed_model=_str("OPENAI_EMBED_MODEL", "text-embedding-3-small") or "text-embedding-3-small",
        anthropic_api_key=_key("ANTHROPIC_API_KEY"),
        anthropic_base_url=_url("ANTHROPIC_BASE_URL", ("http", "https")),
        anthropic_model=_str("ANTHROPIC_MODEL", "claude-sonnet-4-5") or "claude-sonnet-4-5",
        llm_provider=_choice("STUDYHALL_LLM", None, ("auto", "extractive", "openai", "anthropic")),
        ws_max_text=_bounded("STUDYHALL_WS_MAX_TEXT", 4000, 1, 10_000),
        ws_send_rate=_ranged("STUDYHALL_WS_SEND_RATE", 3.0, 0.001, 1_000_000.0),
        ws_send_burst=_bounded("STUDYHALL_WS_SEND_BURST", 10, 1, 1_000_000),
        ws_queue_max=_bounded("STUDYHALL_WS_QUEUE", 1000, 1, 1_000_000),
        ws_max_per_user=_bounded("STUDYHALL_WS_MAX_PER_USER", 50, 1, 100_000),
        ws_connect_rate=_ranged("STUDYHALL_WS_CONNECT_RATE", 2.0, 0.001, 1_000_000.0),
        ws_connect_burst=_bounded("STUDYHALL_WS_CONNECT_BURST", 60, 1, 1_000_000),
        ws_stall_s=_ranged("STUDYHALL_WS_STALL_S", 45.0, 1.0, 3600.0),
        sse_keepalive_s=_ranged("STUDYHALL_SSE_KEEPALIVE_S", 15.0, 1.0, 300.0),
        metrics_token=_metrics_token(),
        presence_ttl_s=_ranged("STUDYHALL_PRESENCE_TTL", 15.0, 1.0, 3600.0),
        presence_grace_s=_ranged("STUDYHALL_PRESENCE_GRACE_S", 3.0, 0.0, 600.0),
        presence_max=_bounded("STUDYHALL_PRESENCE_MAX", 200, 1, 1_000_000),
        live_idle_end_min=_bounded("STUDYHALL_LIVE_IDLE_END_MIN", 30, 0, 10_080),
        live_max_hours=_bounded("STUDYHALL_LIVE_MAX_HOURS", 12, 0, 720),
        review_threshold=_ranged("STUDYHALL_REVIEW_THRESHOLD", 0.7, 0.0, 1.0),
        review_band=_band(_str("STUDYHALL_REVIEW_BAND", "40,60") or "40,60"),
        max_answer_chars=_bounded("STUDYHALL_MAX_ANSWER_CHARS", 20_000, 1, 1_000_000),
        video_complete_share=_share("STUDYHALL_VIDEO_COMPLETE_SHARE", 0.9, least=0.05),
        progress_rate=_ranged("STUDYHALL_PROGRESS_RATE", 1.0, 0.001, 1_000_000.0),
        progress_burst=_bounded("STUDYHALL_PROGRESS_BURST", 30, 1, 1_000_000),
        leaderboard_event_s=_ranged("STUDYHALL_LEADERBOARD_EVENT_S", 5.0, 0.0, 3600.0),
        match_weekday=_bounded("STUDYHALL_MATCH_WEEKDAY", 0, 0, 6),
        match_hour=_bounded("STUDYHALL_MATCH_HOUR", 6, 0, 23),
        match_weekly=_flag("STUDYHALL_MATCH_WEEKLY", True),
        xp_async_commit=_flag("STUDYHALL_XP_ASYNC_COMMIT", False),
        llm_timeout_s=_ranged("STUDYHALL_LLM_TIMEOUT_S", 60.0, 1.0, 600.0),
        generate_deadline_s=_ranged("STUDYHALL_GENERATE_DEADLINE_S", 120.0, 1.0, 3600.0),
    )
    _check_providers(settings)
    return settings


def _masked(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs. The host follows the last `@` (a
    password with an unencoded `/`, `#`, `?` or `@` in it is hidden whole, with whatever follows it)."""
    scheme, sep, rest = url.rpartition("://") if "://" in url else ("", "", url)
    if "@" not in rest:
        return url
    userinfo, host = rest.rsplit("@", 1)
    if ":" not in userinfo:  # a user name, no password
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


def _url(name: str, schemes: tuple[str, ...]) -> str | None:
    """A server's URL (unset: the embedded one, or the provider's own); one of another kind (or none: "localhost:
    11434/v1" was taken, then every request failed) stops the start naming the variable."""
    raw = _str(name)
    if raw is None:
        return None
    scheme, sep, _ = raw.partition("://")
    if not sep or scheme.lower() not in schemes:
        raise SystemExit(f"{name} must be a URL starting {' or '.join(f'{x}://' for x in schemes)}, "
                         f"got {_masked(raw)!r}")
    try:
        parts = urlsplit(raw)
    except ValueError:  # "http://[::1": an unclosed IPv6 address (urllib's message can quote a piece of the password)
        raise SystemExit(f"{name} is not a usable URL (a bracket left open?), got {_masked(raw)!r}") from None
    if "," not in parts.netloc:  # a list of Postgres hosts is asyncpg's to read
        try:
            port = parts.port  # a port that is not a number from 0 to 65535 raises
        except ValueError:
            port = 0
        if port == 0:
            raise SystemExit(f"{name} has an unusable port (not a number from 1 to 65535), got {_masked(raw)!r}") \
                from None
    if scheme.lower() in ("http", "https") and not parts.hostname:  # "http://": every request would fail
        raise SystemExit(f"{name} names no host, got {_masked(raw)!r}")
    if scheme.lower() in ("redis", "rediss") and parts.path.strip("/") and not parts.path.strip("/").isdigit():
        raise SystemExit(f"{name}: the path after the host is a database number, got {_masked(raw)!r}")
    return raw


def _flag(name: str, default: bool) -> bool:
    """On or off: 1/0, true/false, yes/no, on/off (any case); anything else stops the start (a misspelt `flase`
    would otherwise mean the opposite of what was meant)."""
    raw = _str(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {raw!r}")


def _check_providers(s: Settings) -> None:
    """A provider asked for by name needs its key (or a base URL, for a local OpenAI-compatible server): without
    one, every question or search would fail later."""
    openai = bool(s.openai_api_key or s.openai_base_url)
    if s.llm_provider == "openai" and not openai:
        raise SystemExit("STUDYHALL_LLM=openai needs OPENAI_API_KEY (or OPENAI_BASE_URL for a local server)")
    if s.llm_provider == "anthropic" and not (s.anthropic_api_key or s.anthropic_base_url):
        raise SystemExit("STUDYHALL_LLM=anthropic needs ANTHROPIC_API_KEY (or ANTHROPIC_BASE_URL)")
    if s.embedder == "openai" and not openai:
        raise SystemExit("STUDYHALL_EMBEDDER=openai needs OPENAI_API_KEY (or OPENAI_BASE_URL for a local server)")


def _bounded(name: str, default: int, low: int, high: int) -> int:
    """An integer setting from `low` to `high`; else the start stops naming it."""
    value = _int(name, default)
    if not low <= value <= high:
        raise SystemExit(f"{name} must be at least {low} and at most {high}, got {value}")
    return value


def _ranged(name: str, default: float, low: float, high: float) -> float:
    """A number from `low` to `high`; else the start stops naming it."""
    value = _float(name, default)
    if not low <= value <= high:  # also refuses nan
        raise SystemExit(f"{name} must be a number of at least {low:g} and at most {high:g}, got {value!r}")
    return value


def _share(name: str, default: float, *, least: float = 0.0) -> float:
    """A share in (0, 1] (in [least, 1] with `least`)."""
    value = _float(name, default)
    if least > 0 and not least <= value <= 1:  # also refuses nan
        raise SystemExit(f"{name} must be a share of at least {least:g} and at most 1, got {value!r}")
    if not 0 < value <= 1:
        raise SystemExit(f"{name} must be a share above 0 and at most 1, got {value!r}")
    return value


def _band(raw: str) -> tuple[float, float]:
    """'40,60' -> (40.0, 60.0): totals in this range (inclusive) always go to instructor review."""
    try:
        low, high = (float(x) for x in raw.split(","))
    except ValueError as exc:
        raise SystemExit(f"STUDYHALL_REVIEW_BAND must be 'low,high' (0-100), got {raw!r}") from exc
    if not 0 <= low <= high <= 100:
        raise SystemExit(f"STUDYHALL_REVIEW_BAND must satisfy 0 <= low <= high <= 100, got {raw!r}")
    return low, high


MIN_SECRET_CHARS = 32  # HS256 wants a key at least as long as its hash (PyJWT warns below 32 bytes)


def _secret(value: str, where: str, hint: str = "") -> str:
    """The signing secret as given, if long enough to sign with; else the start stops saying where it came from.
    (Not trimmed: a secret from a file mounted into the environment often ends in a line break, and tokens
    signed with it must stay valid.)"""
    if len(value.strip()) < MIN_SECRET_CHARS:
        raise SystemExit(f"{where} must hold a secret of at least {MIN_SECRET_CHARS} characters, it holds "
                         f"{len(value.strip())}{hint}")
    return value


def write_owner_only(path: Path, text: str) -> None:
    """Write a new file readable by its owner only from the start (a secret, URLs that can hold passwords), on
    disk before this returns; a leftover file of that name is replaced."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _load_or_create_secret(ddir: Path) -> str:
    path = ddir / "secret"
    hint = " (delete the file to have one generated; tokens signed with the old one stop working)"
    if path.exists():
        return _secret(path.read_text().strip(), str(path), hint)
    ddir.mkdir(parents=True, exist_ok=True)
    tmp = ddir / f".secret.{os.getpid()}"
    write_owner_only(tmp, secrets.token_urlsafe(48))  # on disk before it is linked: never an empty secret
    # link() is atomic and fails if the file exists: when two processes race, one secret wins.
    try:
        os.link(tmp, path)
        logger.info("generated a new secret in %s", path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return _secret(path.read_text().strip(), str(path), hint)
