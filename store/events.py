"""Every realtime event as a msgspec tagged-union Struct, and the one publisher.

Publish only after the transaction that stored the change has committed (Zulip's rule). Workers and agents
publish too; the server only subscribes and forwards.

Sequenced events (they carry `seq`) are stored in `room_events` before they are published, so a client that
resumes gets exactly the events it missed. The others (presence, typing, welcome, error, pong) are ephemeral.
Client → server frames live beside this module, in store/frames.py.
"""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Literal, Union

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


class GradeReady(Event, tag="grade.ready"):
    """A learner's grade is final (graded at once, released by the grader, or set by an instructor's review):
    sent to that learner (topic `user:<id>`). Held grades are never announced before the review."""

    submission_id: int
    assignment_id: int
    course_id: int
    title: str
    score: float
    passed: bool
    reviewed: bool
    attempt: int
    graded_at: datetime | None = None  # when this grade was set: of two events for one submission, the later counts


# --- shared pieces -------------------------------------------------------------------------------------

class UserRef(msgspec.Struct, kw_only=True):
    """Who did something. `id` is null for non-human authors (role `tutor`, `grader`, `system`)."""

    id: int | None
    name: str
    role: str


# --- room lifecycle (ephemeral) ------------------------------------------------------------------------

class Welcome(Event, tag="welcome"):
    """First frame on every connection, and again in reply to `resume` (it marks the restart point).
    `online` lists at most STUDYHALL_PRESENCE_MAX users; `online_count` is the full count."""

    room: str
    last_seq: int
    online: list[UserRef]
    online_count: int


class Presence(Event, tag="presence"):
    """A user's first connection to the room opened (`joined`) or their last one closed or died (`left`).
    Sent only while the room has at most STUDYHALL_PRESENCE_MAX users online."""

    room: str
    action: Literal["joined", "left"]
    user: UserRef
    online_count: int


class Typing(Event, tag="typing"):
    """Ephemeral, never stored; not echoed to the typist. A start carries `expires_in`: show it that long unless
    another start comes (a server process that dies with the typist's socket sends no stop)."""

    room: str
    user: UserRef
    active: bool
    expires_in: float = 0.0


class Error(Event, tag="error"):
    """A frame was refused; the connection stays open. `ref` echoes the frame's `ref` (or client_msg_id)."""

    code: str
    detail: str
    ref: str | None = None
    retry_after: float | None = None  # seconds until a rate-limited frame may be sent again


class Pong(Event, tag="pong"):
    ref: str | None = None


# --- messages (sequenced) ------------------------------------------------------------------------------

class MessageNew(Event, tag="message.new"):
    """A message was posted. `meta` carries extras from non-human authors (e.g. the tutor's citations,
    grounded, follow_ups); it is omitted when empty. A deleted message is replayed with `deleted: true`
    and empty text."""

    id: int
    seq: int
    room: str
    author: UserRef
    text: str
    created_at: datetime
    client_msg_id: str | None
    meta: dict[str, Any] = {}
    deleted: bool = False
    reply_to: int | None = None  # the message of this room it answers (omitted when none)


class MessageEdited(Event, tag="message.edited"):
    id: int
    seq: int
    room: str
    text: str
    edited_at: datetime


class MessageDeleted(Event, tag="message.deleted"):
    id: int
    seq: int
    room: str
    deleted_by: int | None


# --- live sessions and polls (sequenced) ---------------------------------------------------------------

class LiveStarted(Event, tag="live.started"):
    seq: int
    room: str
    session_id: int
    at: datetime


class LiveEnded(Event, tag="live.ended"):
    seq: int
    room: str
    session_id: int
    at: datetime
    # None: ended by staff; "idle": nobody present and nothing said for a while; "max_length": running too long
    reason: str | None = None


class PollInfo(msgspec.Struct, kw_only=True):
    id: int
    session_id: int
    question: str
    options: list[str]
    closed: bool


class PollOpened(Event, tag="poll.opened"):
    seq: int
    room: str
    poll: PollInfo


class PollResults(Event, tag="poll.results"):
    """Vote counts per option (index-aligned with the poll's options); coalesced, a few per second at most."""

    seq: int
    room: str
    poll_id: int
    counts: list[int]
    total: int


class PollClosed(Event, tag="poll.closed"):
    """Final counts; no votes are accepted after this."""

    seq: int
    room: str
    poll_id: int
    counts: list[int]
    total: int


# --- progress, XP and leaderboards (ephemeral; store/xp.py, store/leaderboards.py) ----------------------

class XpAwarded(Event, tag="xp.awarded"):
    """XP entered the learner's ledger: sent to that learner (topic `user:<id>`). `xp` is their new total;
    `level_up` says this award crossed a level."""

    user_id: int
    kind: str
    points: int
    xp: int
    level: int
    level_up: bool = False
    course_id: int | None = None


class XpRevoked(Event, tag="xp.revoked"):
    """XP the learner had earned was taken back (staff removed the helpful mark that earned it, or their best grade
    on an assignment fell below what earned it): sent to that learner (topic `user:<id>`). `kind` is the award's
    kind, `points` how many were taken back, `xp` the new total and `level` the level now (it may be lower).
    Achievements unlocked stay."""

    user_id: int
    kind: str
    points: int
    xp: int
    level: int
    course_id: int | None = None


class AchievementInfo(msgspec.Struct, kw_only=True):
    id: str
    title: str
    description: str
    tier: str  # common | rare | epic | legendary


class AchievementUnlocked(Event, tag="achievement.unlocked"):
    """The learner unlocked an achievement (once ever). The learner gets it on every socket they have open
    (topic `user:<id>`, `room` null); the other members of the learner's course and pod rooms get it with
    `room` set (not stored: a celebration, not history)."""

    user: UserRef
    achievement: AchievementInfo
    unlocked_at: datetime
    room: str | None = None


class LeaderboardEntry(msgspec.Struct, kw_only=True):
    user_id: int
    name: str
    xp: int
    rank: int


class LeaderboardChanged(Event, tag="leaderboard.changed"):
    """A course's or pod's board changed: sent to its room (`course:<id>`, `pod:<id>`), at most once per
    STUDYHALL_LEADERBOARD_EVENT_S per board, as three events: `period` all, month and week (the current UTC
    month and ISO week); the last change of a burst is always announced. `top` holds the first ten entries."""

    room: str
    scope: str
    scope_id: int
    top: list[LeaderboardEntry]
    period: str  # all | month | week


# --- tutor (agents/tutor.py via server/tutoring.py) ---------------------------------------------------------

class TutorDelta(Event, tag="tutor.delta"):
    """A piece of the tutor's answer while it streams (ephemeral, not stored). The answer itself then arrives
    as a normal `message.new` with author role `tutor` and `meta` {citations, grounded, follow_ups, reply_to}."""

    room: str
    reply_to: int  # id of the message that asked
    text: str


class MessageHelpful(Event, tag="message.helpful"):
    """A learner's message was marked helpful (ephemeral; history's `helpful` keeps it): by staff (an instructor
    or admin) or by the tutor, which checks learners' replies to questions against the course videos; its
    `reason` then says what in the videos the reply agrees with."""

    room: str
    message_id: int
    author_id: int
    by: str  # "staff" | "tutor"
    reason: str | None = None


class MessageHelpfulRemoved(Event, tag="message.helpful_removed"):
    """Staff removed a message's helpful mark (theirs, another staff member's, or the tutor's): the XP it earned its
    author is taken back (they hear `xp.revoked`)."""

    room: str
    message_id: int
    author_id: int
    by: str  # "staff"


# --- internal control (never forwarded to clients) -----------------------------------------------------

class Kick(Event, tag="internal.kick"):
    """Close `user_id`'s sockets in `room` on every server process (close code 4403 with `reason`)."""

    room: str
    user_id: int
    reason: str = "kicked"


ServerEvent = Union[
    Welcome, Presence, Typing, Error, Pong, MessageNew, MessageEdited, MessageDeleted, LiveStarted, LiveEnded,
    PollOpened, PollResults, PollClosed, JobProgress,
    GradeReady,  # assignments and grading
    XpAwarded, XpRevoked, AchievementUnlocked, LeaderboardChanged,  # progress, XP, leaderboards
    TutorDelta, MessageHelpful, MessageHelpfulRemoved,
]
SEQUENCED = frozenset({"message.new", "message.edited", "message.deleted", "live.started", "live.ended",
                       "poll.opened", "poll.results", "poll.closed"})
class TokenRevoked(Event, tag="internal.revoke"):
    """Close the sockets opened with API token `token_id` (on the owner's personal topic, every process)."""

    token_id: str


class SignedOut(Event, tag="internal.signout"):
    """Close the user's sockets opened with a login token of a generation before `gen` (on the user's personal
    topic, every process)."""

    gen: int


class AccessRevoked(Event, tag="internal.leave"):
    """Close the owner's sockets (on their personal topic, every process) in every room of course `course_id`
    (course, pod and live rooms, ended sessions' too), or with `pod_id` in that pod's room: they left it."""

    course_id: int | None = None
    pod_id: int | None = None


class RoomClosed(Event, tag="internal.close"):
    """The room is gone (its course, pod or live session was deleted): every process closes the sockets in it
    (4403 `room deleted`)."""

    room: str


INTERNAL = frozenset({"internal.kick", "internal.revoke", "internal.leave", "internal.close"})

# Websocket close codes.
CLOSE_TOO_BIG = 1009        # a frame over 64 KiB (uvicorn's websocket implementation sends it)
CLOSE_SLOW_CONSUMER = 4008  # the outbound queue overflowed: reconnect with ?after=<last seq you have>
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403      # not allowed in the room, unknown room, or kicked (reason says which)
CLOSE_TOO_MANY = 4429       # too many sockets of one user on this server, or a connection that floods frames

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ServerEvent)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(raw: bytes | str) -> Event:
    """Decode a server → client frame (tests and clients written in Python use this)."""
    return _decoder.decode(raw)


def user_topic(user_id: int) -> str:
    return f"user:{user_id}"


def room_topic(room_id: str) -> str:
    return f"room:{room_id}"


async def publish(redis: Redis, topic: str, event: Event) -> bool:
    """Fan an event out to every server process; call after commit. Failures are logged, not raised:
    the stored change is the truth and clients recover it on resume. False: it was not published."""
    return await publish_raw(redis, topic, encode(event), type(event).__name__)


async def publish_raw(redis: Redis, topic: str, payload: bytes, what: str = "event") -> bool:
    """`publish` for an event already encoded (sequenced events are encoded once, stored, then published)."""
    try:
        await redis.publish(events_channel(topic), payload)
        return True
    except Exception:  # noqa: BLE001
        logger.warning("could not publish %s to %s", what, topic, exc_info=True)
        return False
