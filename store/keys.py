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

# --- realtime rooms (store/presence.py, store/ratelimit.py, server/realtime) ---------------------------

# ZSET of the users online in a room: member "<user_id>|<role>|<name>", score = expiry (ms since epoch) of
# that user's freshest server process. Key TTL: 2 x STUDYHALL_PRESENCE_TTL, refreshed by every heartbeat.
PRESENCE_ROOM = "sh:pres:{room}"
# ZSET of the server processes holding a user's connections in a room: member proc id, score = expiry (ms).
# Key TTL as PRESENCE_ROOM. A user is online while any process's entry is unexpired.
PRESENCE_USER = "sh:pres:{room}:u:{user_id}"
# ZSET of live server processes: member proc id, score = expiry (ms) of its last heartbeat. No TTL; dead
# entries are removed by the survivor that closes their live-session attendance rows.
PROCS = "sh:procs"
# HASH token bucket {t: tokens, ts: last refill ms} limiting one user's sends (messages, edits, deletes,
# votes). TTL: time to refill the bucket completely, plus a second.
RATE_SEND = "sh:rl:send:{user_id}"


def presence_room(room: str) -> str:
    return PRESENCE_ROOM.format(room=room)


def presence_user(room: str, user_id: int) -> str:
    return PRESENCE_USER.format(room=room, user_id=user_id)


def rate_send(user_id: int) -> str:
    return RATE_SEND.format(user_id=user_id)
