"""Every realtime event as a msgspec tagged-union Struct, and the one publisher.

Publish only after the transaction that stored the change has committed (Zulip's rule). Workers and agents
publish too; the server only subscribes and forwards.
"""
from __future__ import annotations

import logging

import msgspec
from redis.asyncio import Redis

from store.keys import events_channel

logger = logging.getLogger(__name__)


class Event(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Base of every server → client event."""


class JobProgress(Event, tag="job.progress"):
    """An ingest job moved: sent to the instructor who started it (topic `user:<id>`)."""

    job_id: int
    video_id: int | None
    course_id: int | None
    state: str
    progress: float
    error: str | None = None


_encoder = msgspec.json.Encoder()


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def user_topic(user_id: int) -> str:
    return f"user:{user_id}"


def room_topic(room_id: str) -> str:
    return f"room:{room_id}"


async def publish(redis: Redis, topic: str, event: Event) -> None:
    """Fan an event out to every server process; call after commit. Failures are logged, not raised:
    the stored change is the truth and clients recover it on resume."""
    try:
        await redis.publish(events_channel(topic), encode(event))
    except Exception:  # noqa: BLE001
        logger.warning("could not publish %s to %s", type(event).__name__, topic, exc_info=True)
