"""Ingest failures carry a human-readable reason and whether retrying can help."""
from __future__ import annotations


# How a re-embed that reached a worker of another model fails (the pipeline raises it; ingest.submit's
# re-embed pass reads it off failed jobs)
OTHER_MODEL = "this worker embeds with"


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
