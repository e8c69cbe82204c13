"""Request and response bodies of the progress, XP, leaderboard and matcher REST API (msgspec Structs)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from server.api.schemas import LINES, Id, Strict
from store.events import AchievementInfo, LeaderboardEntry
from store.profiles import RAW_GOAL_CHARS, RAW_GOALS

Seconds = Annotated[float, Meta(ge=0, le=10 * 24 * 3600)]
# Ranges are validated against the video's duration by the store; here only their shape.
Range = Annotated[list[float], Meta(min_length=2, max_length=2)]


class DeclineIn(Strict):
    match_id: Id | None = None  # the round the learner saw; a newer round (not one of its declines) is 409


class ProgressIn(Strict):
    position: float
    watched: Annotated[list[Range], Meta(max_length=200)] = []
    # optional, together: an id the player makes up for its playback session and the number of the report in it
    # (rising); a report of the same player with a lower number than the one that set the position (sent
    # earlier, arriving late) does not move the position back
    # (`(?![\s\S])`, not `$`: that passes a final line break)
    player: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+(?![\s\S])")] | None = None
    seq: Annotated[int, Meta(ge=0, le=2**53)] | None = None


class VideoProgress(msgspec.Struct):
    video_id: int
    course_id: int
    duration: float
    position: float
    watched: list[list[float]]
    watched_s: float
    fraction: float
    completed: bool
    completed_at: datetime | None
    time_spent_s: float
    updated_at: datetime | None
    xp_awarded: list[str] = []  # kinds of XP this report earned


class CourseVideoProgress(msgspec.Struct):
    video_id: int
    title: str
    duration: float | None
    position: float
    fraction: float
    completed: bool
    time_spent_s: float
    updated_at: datetime | None


class CourseProgress(msgspec.Struct):
    course_id: int
    user_id: int
    completion: float
    completed_videos: int
    total_videos: int
    time_spent_s: float
    last_activity_at: datetime | None
    videos: list[CourseVideoProgress]


Note = Annotated[str, Meta(max_length=2000, pattern=LINES)]


class BookmarkIn(Strict):
    at: Seconds
    note: Note = ""


class BookmarkPatch(Strict):
    """A bookmark's new time and/or note (what is left out stays)."""
    at: Seconds | UnsetType = UNSET
    note: Note | UnsetType = UNSET


class Bookmark(msgspec.Struct):
    id: int
    video_id: int
    at: float
    note: str
    created_at: datetime


class StreakOut(msgspec.Struct):
    current: int
    longest: int
    last_day: str | None
    today: str
    active_today: bool
    freeze_available: bool
    timezone: str


class Stats(msgspec.Struct):
    user_id: int
    xp: int
    level: int
    level_xp: int  # where the current level starts
    next_level_xp: int
    counts: dict[str, int]
    streak: StreakOut


class XpEvent(msgspec.Struct):
    id: int
    kind: str
    points: int
    key: str
    course_id: int | None
    at: datetime


class AchievementOut(msgspec.Struct):
    achievement: AchievementInfo
    requirement: str
    progress: int
    target: int
    unlocked_at: datetime | None


class HelpfulMark(msgspec.Struct):
    message_id: int
    room: str
    author_id: int
    marked_by: int | None
    marked_at: datetime
    by_tutor: bool = False  # the tutor marked it (marked_by is then null)


class ReplyCheck(msgspec.Struct):
    """The tutor's check of a learner's reply (README: Helpful replies)."""
    message_id: int
    room: str
    question_id: int
    status: str  # pending | helpful | not_helpful | skipped | failed
    reason: str | None
    checker: str | None  # "offline", or "llm:<provider>:<model>"
    created_at: datetime
    checked_at: datetime | None


class Me(msgspec.Struct):
    rank: int | None
    xp: int


class LeaderboardOut(msgspec.Struct):
    scope: str
    id: int
    period: str
    count: int
    entries: list[LeaderboardEntry]
    me: Me
    neighbours: list[LeaderboardEntry]


Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
HHMM = Annotated[str, Meta(pattern=r"^[0-9]{2}:[0-9]{2}(?![\s\S])")]  # ASCII digits (\d takes ٠٩ and ０９)


class Slot(msgspec.Struct, forbid_unknown_fields=True):
    day: Day
    start: HHMM
    end: HHMM


class ProfileIn(Strict):
    timezone: Annotated[str, Meta(min_length=1, max_length=64)] | UnsetType = UNSET
    availability: Annotated[list[Slot], Meta(max_length=28)] | UnsetType = UNSET
    # (bounds on the body; store.profiles.check_goals holds what is stored to 8 goals of 80 characters)
    goals: Annotated[list[Annotated[str, Meta(max_length=RAW_GOAL_CHARS)]], Meta(max_length=RAW_GOALS)] | UnsetType = UNSET


class ProfileOut(msgspec.Struct):
    user_id: int
    timezone: str
    availability: list[Slot]
    goals: list[str]
    updated_at: datetime | None


class GroupOut(msgspec.Struct):
    members: list[int]
    reason: str


class MatchOut(msgspec.Struct):
    match_id: int
    pod_id: int
    groups: list[GroupOut]
    declined: list[int]
    created_at: datetime
    message_id: int | None
    # a round an Idempotency-Key made, asked for again once a newer round replaced it: when (null: the pod's round)
    superseded_at: datetime | None = None
