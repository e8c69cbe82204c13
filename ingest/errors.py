"""Ingest failures carry a human-readable reason and whether retrying can help."""
from __future__ import annotations


class IngestError(Exception):
    """Base ingest failure. `reason` is shown to the instructor as-is."""

    permanent: bool = True

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PermanentIngestError(IngestError):
    """Retrying will not help (corrupt file, transcripts disabled, video unavailable)."""

    permanent = True


class TransientIngestError(IngestError):
    """Retrying later may help (network error, rate limit, upstream 5xx)."""

    permanent = False
