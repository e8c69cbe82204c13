"""The one shape every transcript source produces: timed cues."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Cue:
    """One timed piece of transcript text; seconds from the start of the video."""

    start: float
    end: float
    text: str
