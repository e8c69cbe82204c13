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
