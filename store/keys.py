"""Every Redis key and channel name studyhall uses, with what it holds and its TTL.

Redis holds only what can be rebuilt from Postgres (fan-out, presence, counters, the job queue).
"""
from __future__ import annotations

# Pub/sub channel carrying encoded events for one topic ("room:<room_id>", "user:<user_id>"). No storage.
EVENTS_CHANNEL = "sh:ev:{topic}"

# arq's own queue keys use the "arq:" prefix; job heartbeats refresh arq's in-progress key (TTL below).
ARQ_IN_PROGRESS = "arq:in-progress:{job_id}"
INGEST_HEARTBEAT_TTL_MS = 30_000


def events_channel(topic: str) -> str:
    return EVENTS_CHANNEL.format(topic=topic)
