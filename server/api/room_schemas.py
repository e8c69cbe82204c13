"""Request and response bodies of the rooms, pods and live-session REST API (msgspec Structs)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from server.api.schemas import LINE_TEXT, Id, Name, Strict, Title, When, check_when
from store.events import UserRef
from store.frames import ClientMsgId, Relay, as_read, blank

Seconds = Annotated[int, Meta(ge=1, le=366 * 24 * 3600)]
OptionalSeconds = Annotated[int, Meta(ge=0, le=366 * 24 * 3600)]


class RoomMessage(msgspec.Struct):
    id: int
    seq: int
    room: str
    author: UserRef
    text: str
    created_at: datetime
    edited_at: datetime | None
    client_msg_id: str | None
    meta: dict[str, Any]
    reply_to: int | None = None  # the message of this room it answers
    helpful: bool = False  # marked helpful (by an instructor, an admin or the tutor)


class TutorTaken(msgspec.Struct):
    """For a posted message that mentions @tutor: whether the tutor answers it in the room (`tutor.delta`
    events, then its message), and if not, why (`too_long`, `tutor_busy`); the message stands either way."""
    answering: bool
    code: str | None = None
    detail: str | None = None


class PostedMessage(RoomMessage):
    tutor: TutorTaken | None = None  # only for a message that mentions @tutor
    deleted: bool = False  # a repeated client_msg_id whose original was deleted since (its text is gone)


class MessagePage(msgspec.Struct):
    items: list[RoomMessage]
    has_more: bool


class PostIn(Strict):
    text: str
    client_msg_id: ClientMsgId | None = None
    reply_to: Id | None = None  # an earlier message of this room that this one answers
    relay: Relay | None = None  # bots: the person the message is from


class OnlineList(msgspec.Struct):
    room: str
    online_count: int
    online: list[UserRef]


class MuteIn(Strict):
    user_id: Id
    seconds: Seconds


class Mute(msgspec.Struct):
    room: str
    user_id: int
    until: datetime


class Kicked(Mute):
    """A user barred from a room until `until`."""


class KickIn(Strict):
    user_id: Id
    seconds: OptionalSeconds = 0  # > 0: cannot rejoin for that long


class PodIn(Strict):
    name: Name


class Pod(msgspec.Struct):
    id: int
    course_id: int
    name: str
    room: str
    created_at: datetime
    members: int | None = None  # (staff's course list) members with access
    places_taken: int | None = None  # (staff's course list) of the 50, with those who left the course
    course_title: str | None = None


class MemberIn(Strict):
    user_id: Id


class Member(msgspec.Struct):
    user_id: int
    name: str
    role: str
    created_at: datetime
    departed: bool = False  # (listed to staff only) left the course: not in the pod's room, still holds a place


class SessionIn(Strict):
    title: Title
    scheduled_at: When | None = None

    def __post_init__(self) -> None:
        if blank(self.title):
            raise ValueError("`title` must not be blank")
        check_when(self, "scheduled_at")


class Session(msgspec.Struct):
    id: int
    course_id: int
    title: str
    state: str  # scheduled | live | ended
    room: str
    scheduled_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    created_at: datetime


class Attendee(msgspec.Struct):
    user_id: int
    name: str
    first_joined_at: datetime
    last_left_at: datetime | None
    connections: int
    seconds_live: float


class PollIn(Strict):
    question: Annotated[str, Meta(min_length=1, max_length=500, pattern=LINE_TEXT)]
    options: Annotated[list[Annotated[str, Meta(min_length=1, max_length=200, pattern=LINE_TEXT)]],
                       Meta(min_length=2, max_length=20)]

    def __post_init__(self) -> None:
        if blank(self.question):
            raise ValueError("`question` must have something visible in it")
        if any(blank(o) for o in self.options):
            raise ValueError("`options` must each have something visible in them")
        self.question = self.question.strip()
        self.options = [o.strip() for o in self.options]
        seen = [as_read(o) for o in self.options]
        if len(set(seen)) != len(seen):
            raise ValueError("`options` must differ from each other")




class VoteIn(Strict):
    option: Annotated[int, Meta(ge=0, le=1000)]


class Poll(msgspec.Struct):
    id: int
    session_id: int
    question: str
    options: list[str]
    closed: bool
    counts: list[int]
    total: int
    my_vote: int | None
    created_at: datetime
    closed_at: datetime | None
