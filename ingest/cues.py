"""The one shape every transcript source produces: timed cues."""
from __future__ import annotations

import re
from dataclasses import dataclass

# The slowest speech we take a cue's words to be said at (~2.5 words/s is usual): a cue shown longer than its
# words take was held on screen after they were said.
SLOWEST_SECONDS_PER_WORD = 1.5
# Chinese, Japanese and Korean characters (no spaces between words): each counts as a word when timing speech.
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f]")


def slowest_speaking_s(text: str) -> float:
    """The longest `text` may plausibly take to say: its words (and CJK characters, which no space separates)
    at the slowest speech."""
    return (len(text.split()) + len(CJK.findall(text))) * SLOWEST_SECONDS_PER_WORD


@dataclass(slots=True)
class Cue:
    """One timed piece of transcript text; seconds from the start of the video."""

    start: float
    end: float
    text: str
