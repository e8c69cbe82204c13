"""Settings from the environment: a bad value stops startup with a message naming the variable."""
from __future__ import annotations

import pytest

from store.settings import load_settings


@pytest.mark.parametrize("name,raw,good,want", [
    *[("STUDYHALL_VIDEO_COMPLETE_SHARE", raw, "1", 1.0) for raw in ("0", "-0.5", "1.5", "nan", "lots", "1e-300", "0.04")],
    ("STUDYHALL_VIDEO_COMPLETE_SHARE", "0.049", "0.05", 0.05),
    *[("STUDYHALL_LLM_TIMEOUT_S", raw, "300", 300.0) for raw in ("0", "601", "nan")],
    *[("STUDYHALL_GENERATE_DEADLINE_S", raw, "30", 30.0) for raw in ("0", "3601", "inf")]])
def test_a_value_outside_its_range_stops_startup_and_one_inside_is_taken(monkeypatch, tmp_path, name, raw, good, want):
    monkeypatch.setenv(name, raw)
    with pytest.raises(SystemExit, match=name):
        load_settings(tmp_path)
    monkeypatch.setenv(name, good)
    assert getattr(load_settings(tmp_path), name.removeprefix("STUDYHALL_").lower()) == want


@pytest.mark.parametrize("name,raw", [("STUDYHALL_LLM", "gpt4"), ("STUDYHALL_EMBEDDER", "minilm"),
                                      ("STUDYHALL_LOG_LEVEL", "verbose"), ("STUDYHALL_PORT", "70000"),
                                      ("STUDYHALL_PORT", "0"), ("REDIS_URL", "notaurl"),
                                      ("REDIS_URL", "postgresql://x@h/db"), ("DATABASE_URL", "localhost:5432"),
                                      ("DATABASE_URL", "postgresql://postgres@127.0.0.1:abc/studyhall"),
                                      ("REDIS_URL", "redis://127.0.0.1:99999/0"), ("REDIS_URL", "redis://h:6379/0x"),
                                      ("STUDYHALL_YOUTUBE_PROXY", "socks5://127.0.0.1:1080"),
                                      ("STUDYHALL_YOUTUBE_PROXY", "proxy.example:3128"),
                                      # a base URL without its scheme was taken, then every request failed
                                      ("OPENAI_BASE_URL", "localhost:11434/v1"),
                                      ("ANTHROPIC_BASE_URL", "ftp://gateway/v1")])
def test_a_misspelt_choice_or_a_bad_port_stops_startup(monkeypatch, tmp_path, name, raw):
    """Caught at the start, not as a 500 on every ask or a traceback once logging starts."""
    monkeypatch.setenv(name, raw)
    with pytest.raises(SystemExit, match=name):
        load_settings(tmp_path)


@pytest.mark.parametrize("name,raw", [("STUDYHALL_REVIEW_THRESHOLD", "nan"), ("STUDYHALL_REVIEW_THRESHOLD", "70"),
                                      ("STUDYHALL_REVIEW_THRESHOLD", "-1"), ("STUDYHALL_MATCH_WEEKDAY", "7"),
                                      ("STUDYHALL_MATCH_HOUR", "24"), ("STUDYHALL_WS_SEND_RATE", "0"),
                                      ("STUDYHALL_PRESENCE_TTL", "inf"), ("STUDYHALL_WS_QUEUE", "0"),
                                      ("STUDYHALL_JOB_MAX_ATTEMPTS", "0"), ("STUDYHALL_MAX_UPLOAD_MB", "-5"),
                                      ("STUDYHALL_LEADERBOARD_EVENT_S", "-1"), ("STUDYHALL_TUTOR_DAILY_LIMIT", "0"),
                                      ("STUDYHALL_JOB_HEARTBEAT_S", "1e306"), ("STUDYHALL_WS_STALL_S", "1e300"),
                                      ("STUDYHALL_PRESENCE_TTL", "1e9"), ("STUDYHALL_TOKEN_TTL", "100000000000"),
                                      # past what Postgres stores (every ask or upload was a 400) or Redis takes
                                      ("STUDYHALL_TUTOR_DAILY_LIMIT", "3000000000"),
                                      ("STUDYHALL_JOB_MAX_ATTEMPTS", "3000000000"),
                                      ("STUDYHALL_LEADERBOARD_EVENT_S", "1e20"), ("STUDYHALL_JOB_RETRY_BASE_S", "1e9"),
                                      ("STUDYHALL_MAX_UPLOAD_MB", "10000000000000"), ("STUDYHALL_WS_QUEUE", "1e7"),
                                      ("STUDYHALL_DB_POOL_MAX", "100000"), ("STUDYHALL_WS_MAX_TEXT", "100000000")])
def test_a_number_outside_its_range_stops_startup(monkeypatch, tmp_path, name, raw):
    """A threshold of nan never holds a grade, 70 (meant as a percent) holds every one; weekday 7 or hour 24
    schedule the weekly match for a time that never comes; a rate of 0 refuses every send."""
    monkeypatch.setenv(name, raw)
    with pytest.raises(SystemExit, match=name):
        load_settings(tmp_path)


def test_choices_take_any_case(monkeypatch, tmp_path):
    for name, raw in (("STUDYHALL_LLM", "Anthropic"), ("STUDYHALL_EMBEDDER", "Local"), ("STUDYHALL_LOG_LEVEL", "debug"),
                      ("ANTHROPIC_API_KEY", "sk-ant-test")):
        monkeypatch.setenv(name, raw)
    s = load_settings(tmp_path)
    assert (s.llm_provider, s.embedder, s.log_level) == ("anthropic", "local", "DEBUG")


@pytest.mark.parametrize("name,raw", [("STUDYHALL_MATCH_WEEKLY", "flase"), ("STUDYHALL_XP_ASYNC_COMMIT", "ture"),
                                      ("STUDYHALL_MATCH_WEEKLY", "2")])
def test_a_misspelt_on_off_value_stops_startup(monkeypatch, tmp_path, name, raw):
    """`flase` left weekly rounds on: the opposite of what was meant, silently."""
    monkeypatch.setenv(name, raw)
    with pytest.raises(SystemExit, match=name):
        load_settings(tmp_path)
    for raw, want in (("Off", False), ("yes", True), ("0", False), ("TRUE", True)):
        monkeypatch.setenv(name, raw)
        assert getattr(load_settings(tmp_path), name.removeprefix("STUDYHALL_").lower()) is want


@pytest.mark.parametrize("env", [{"STUDYHALL_LLM": "openai"}, {"STUDYHALL_LLM": "anthropic"},
                                 {"STUDYHALL_EMBEDDER": "openai"}, {"STUDYHALL_LLM": "anthropic",
                                                                    "OPENAI_API_KEY": "sk-test"}])
def test_a_provider_named_without_its_key_stops_startup(monkeypatch, tmp_path, env):
    """The server started, then answered every tutor question with a 500 (and the CLI with a traceback)."""
    for key in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    for name, raw in env.items():
        monkeypatch.setenv(name, raw)
    which = next(n for n in env if n.startswith("STUDYHALL_"))
    with pytest.raises(SystemExit, match=f"{which}={env[which]} needs"):
        load_settings(tmp_path)
    monkeypatch.setenv("OPENAI_BASE_URL" if env[which] == "openai" else "ANTHROPIC_API_KEY", "http://127.0.0.1:9/v1")
    load_settings(tmp_path)


def test_urls_that_connect_are_taken(monkeypatch, tmp_path):
    for name, raw in (("DATABASE_URL", "postgresql://a@h1:5432,h2:5433/db"), ("REDIS_URL", "unix:///tmp/r.sock?db=1"),
                      ("REDIS_URL", "redis://h:6379"), ("REDIS_URL", "rediss://u:p@h:6380/3"),
                      ("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1"), ("ANTHROPIC_BASE_URL", "https://gw.example/")):
        monkeypatch.setenv(name, raw)
        assert getattr(load_settings(tmp_path), name.lower()) == raw


def test_a_secret_too_short_to_sign_with_stops_startup(monkeypatch, tmp_path):
    """An empty secret file gave a server that said it was ready and answered every signed-in request with a 500
    (and a CLI traceback); a one-character secret signed tokens anyone could forge."""
    monkeypatch.delenv("STUDYHALL_SECRET", raising=False)
    (tmp_path / "secret").write_text("\n")
    with pytest.raises(SystemExit, match="secret must hold a secret of at least 32 characters, it holds 0"):
        load_settings(tmp_path)
    (tmp_path / "secret").unlink()
    made = load_settings(tmp_path).secret  # generated: long enough, owner-only
    assert len(made) >= 32 and (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert load_settings(tmp_path).secret == made
    monkeypatch.setenv("STUDYHALL_SECRET", "x")
    with pytest.raises(SystemExit, match="STUDYHALL_SECRET must hold a secret of at least 32"):
        load_settings(tmp_path)
    monkeypatch.setenv("STUDYHALL_SECRET", "s" * 32 + "\n")  # as given (tokens signed with it stay valid)
    assert load_settings(tmp_path).secret == "s" * 32 + "\n"


def test_a_bad_url_is_named_without_its_password(monkeypatch, tmp_path):
    for name, raw in (("DATABASE_URL", "postgresql://u:TopSecretPw@db:5432x/x"),
                      ("REDIS_URL", "redis://:TopSecretPw@redis:6379/cache"), ("DATABASE_URL", "u:TopSecretPw@db/x"),
                      # characters that break the URL apart: urllib's own message quoted pieces of the password
                      ("REDIS_URL", "redis://:TopSecretPw/Qw+e3@cache.example:6379/0"),
                      ("REDIS_URL", "redis://:TopSecretPw#et@h:1/0"), ("DATABASE_URL", "postgresql://app:TopSecretPw?ss@h/db"),
                      ("REDIS_URL", "redis://:TopSecretPw@ss@cache:6379/x")):
        monkeypatch.setenv(name, raw)
        with pytest.raises(SystemExit) as info:
            load_settings(tmp_path)
        assert name in str(info.value) and "TopSecretPw" not in str(info.value) and ":***@" in str(info.value)
        monkeypatch.delenv(name)


def test_urls_that_cannot_work_stop_the_start_in_one_line(monkeypatch, tmp_path):
    """An unclosed IPv6 bracket was a 26-line traceback; "http://" and port 0 were taken, and every request failed."""
    for name, raw, said in (("OPENAI_BASE_URL", "http://[::1", "not a usable URL"),
                            ("DATABASE_URL", "postgresql://u:TopSecretPw@[::1/db", "not a usable URL"),
                            ("ANTHROPIC_BASE_URL", "http://", "names no host"),
                            ("STUDYHALL_YOUTUBE_PROXY", "https:///x", "names no host"),
                            ("REDIS_URL", "redis://h:0/0", "1 to 65535")):
        monkeypatch.setenv(name, raw)
        with pytest.raises(SystemExit) as info:
            load_settings(tmp_path)
        assert name in str(info.value) and said in str(info.value) and "TopSecretPw" not in str(info.value)
        monkeypatch.delenv(name)


def test_a_metrics_token_of_white_space_is_refused(monkeypatch, tmp_path):
    """It left /metrics public without a word, as no token does."""
    monkeypatch.setenv("STUDYHALL_METRICS_TOKEN", "  ")
    with pytest.raises(SystemExit, match="STUDYHALL_METRICS_TOKEN is only white space"):
        load_settings(tmp_path)
    monkeypatch.setenv("STUDYHALL_METRICS_TOKEN", " tok\n")
    assert load_settings(tmp_path).metrics_token == "tok"
    # (tester) one no HTTP header can carry as typed could never be matched: /metrics answered 401 for good
    for bad in ("pässwört", "tab\there"):
        monkeypatch.setenv("STUDYHALL_METRICS_TOKEN", bad)
        with pytest.raises(SystemExit, match="printable ASCII"):
            load_settings(tmp_path)
    monkeypatch.setenv("STUDYHALL_METRICS_TOKEN", "correct horse battery")  # (a passphrase is fine: review)
    assert load_settings(tmp_path).metrics_token == "correct horse battery"


def test_a_youtube_proxy_is_read(monkeypatch, tmp_path):
    """STUDYHALL_YOUTUBE_PROXY (cloud hosts' addresses are blocked by YouTube); where it leads: test_youtube."""
    monkeypatch.setenv("STUDYHALL_YOUTUBE_PROXY", "http://user:pw@proxy.example:3128")
    assert load_settings(tmp_path).youtube_proxy == "http://user:pw@proxy.example:3128"


def test_a_data_folder_that_is_a_file_says_so(tmp_path):
    """(Tester) `--data-dir <a file>` printed "FileExistsError: [Errno 17] File exists: …"."""
    f = tmp_path / "data"
    f.write_text("not a folder")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        load_settings(f)
