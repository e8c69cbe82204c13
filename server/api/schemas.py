"""Request and response bodies of the REST API (msgspec Structs; unknown fields are rejected)."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

import msgspec
from msgspec import UNSET, Meta, UnsetType

from store import frames

# Text a person must have written something in: not blank (msgspec searches the pattern: one visible character)
NOT_BLANK = r"\S"
# `(?![\s\S])` is the very end (Python's `$` also matches before a final line break, which would let one
# through); unlike `\Z` it means the same in the JSON Schema (ECMA) dialect the OpenAPI document uses.
NO_CONTROL = frames.NO_CONTROL
ONE_LINE = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*(?![\s\S])"  # NO_CONTROL, or nothing
LINES = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x84\x86-\x9f]*(?![\s\S])"  # free text: tabs and line breaks, no other control characters
# One line someone wrote: something other than spaces, no control characters and no line or paragraph separator
# (U+2028/U+2029) (titles, poll questions and options).
# Invisible-only text (zero-width, fillers) is refused where it is trimmed (`decode.trimmed`, `frames.blank`).
LINE_TEXT = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f\u2028\u2029]*(?![\s\S])"
Title = Annotated[str, Meta(min_length=1, max_length=200, pattern=LINE_TEXT)]
Description = Annotated[str, Meta(max_length=10_000, pattern=LINES)]
Price = Annotated[int, Meta(ge=0, le=100_000_000)]
Name = Annotated[str, Meta(min_length=1, max_length=100, pattern=NO_CONTROL)]
Id = Annotated[int, Meta(ge=1, le=2**62)]


# A moment with its UTC offset ("2030-01-01T09:00:00Z"); its year is checked by `check_when` (Postgres and
# Python date arithmetic both end somewhere).
When = Annotated[datetime, Meta(tz=True)]


def check_when(obj: object, *names: str) -> None:
    """For a Struct's __post_init__: each named moment, when set, lies in the years 1970-2200 (in UTC, as stored:
    "2200-12-31T23:00:00-05:00" is in 2201)."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, datetime) and not 1970 <= _utc_year(value) <= 2200:
            raise ValueError(f"`{name}` must lie between the years 1970 and 2200")

def _utc_year(value: datetime) -> int:
    try:
        return value.astimezone(timezone.utc).year
    except OverflowError:  # (year 1 or 9999 moved past Python's range: out of bounds either way)
        return value.year


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    pass


class CourseIn(Strict):
    title: Title
    description: Description = ""
    published: bool = False
    price_cents: Price = 0


class CoursePatch(Strict):
    title: Title | UnsetType = UNSET
    description: Description | UnsetType = UNSET
    published: bool | UnsetType = UNSET
    price_cents: Price | UnsetType = UNSET


class Course(msgspec.Struct):
    id: int
    title: str
    description: str
    published: bool
    price_cents: int
    owner_id: int
    created_at: datetime
    updated_at: datetime
    enrolled: bool = False  # the caller is
    # the caller (a learner) finds it in the catalog but cannot enroll themselves before paying (no access yet)
    payment_required: bool = False


class CourseList(msgspec.Struct):
    items: list[Course]
    limit: int
    offset: int


class EnrollIn(Strict):
    user_id: Id | None = None


class Enrollment(msgspec.Struct):
    user_id: int
    name: str
    role: str
    created_at: datetime


class EnrollmentList(msgspec.Struct):
    items: list[Enrollment]
    limit: int
    offset: int


class Me(msgspec.Struct):
    id: int
    name: str
    role: str
    tenant: str
    tenant_id: int


class UserIn(Strict):
    name: Name
    role: str = "learner"


class UserCreated(msgspec.Struct):
    id: int
    name: str
    role: str
    tenant: str
    token: str


class UserToken(msgspec.Struct):
    user_id: int
    name: str
    role: str
    token: str


class BotIn(Strict):
    name: Name
    label: Annotated[str, Meta(max_length=200, pattern=ONE_LINE)] = ""


class BotToken(msgspec.Struct):
    user_id: int
    name: str
    token_id: str
    token: str


class TokenInfo(msgspec.Struct):
    id: str
    user_id: int
    user_name: str
    label: str
    created_at: datetime
    revoked_at: datetime | None
