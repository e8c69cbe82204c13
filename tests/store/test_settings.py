"""Settings from the environment: a bad value stops startup with a message naming the variable."""
from __future__ import annotations

import pytest

from store.settings import load_settings


@pytest.mark.parametrize("raw", ["0", "-0.5", "1.5", "nan", "lots"])
def test_a_completion_share_outside_0_to_1_stops_startup(monkeypatch, tmp_path, raw):
    monkeypatch.setenv("STUDYHALL_VIDEO_COMPLETE_SHARE", raw)
    with pytest.raises(SystemExit, match="STUDYHALL_VIDEO_COMPLETE_SHARE"):
        load_settings(tmp_path)
    monkeypatch.setenv("STUDYHALL_VIDEO_COMPLETE_SHARE", "1")
    assert load_settings(tmp_path).video_complete_share == 1.0


@pytest.mark.parametrize("name,raw", [("STUDYHALL_LLM", "gpt4"), ("STUDYHALL_EMBEDDER", "minilm"),
                                      ("STUDYHALL_LOG_LEVEL", "verbose"), ("STUDYHALL_PORT", "70000"),
                                      ("STUDYHALL_PORT", "0")])
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
                                      ("STUDYHALL_LEADERBOARD_EVENT_S", "-1")])
def test_a_number_outside_its_range_stops_startup(monkeypatch, tmp_path, name, raw):
    """A threshold of nan never holds a grade, 70 (meant as a percent) holds every one; weekday 7 or hour 24
    schedule the weekly match for a time that never comes; a rate of 0 refuses every send."""
    monkeypatch.setenv(name, raw)
    with pytest.raises(SystemExit, match=name):
        load_settings(tmp_path)


def test_choices_take_any_case(monkeypatch, tmp_path):
    for name, raw in (("STUDYHALL_LLM", "Anthropic"), ("STUDYHALL_EMBEDDER", "Local"), ("STUDYHALL_LOG_LEVEL", "debug")):
        monkeypatch.setenv(name, raw)
    s = load_settings(tmp_path)
    assert (s.llm_provider, s.embedder, s.log_level) == ("anthropic", "local", "DEBUG")
