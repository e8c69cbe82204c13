"""The one shape every transcript source produces: timed cues."""
from __future__ import annotations

from dataclasses import dataclass

# The slowest speech we take a cue's words to be said at (~2.5 words/s is usual): a cue shown longer than its
# words take was held on screen after they were said.
SLOWEST_SECONDS_PER_WORD = 1.5


@dataclass(slots=True)
class Cue:
    """One timed piece of transcript text; seconds from the start of the video."""

    start: float
    end: float
    text: str
