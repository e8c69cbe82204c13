"""The learner's profile: timezone (streak days), weekly availability and goals (the matcher's pod profile).

Availability is a list of weekly slots in the learner's own timezone, stored as [day, start_min, end_min]
with day 0 = Monday and minutes from local midnight (end may be 1440).
"""
from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import asyncpg

from store.frames import as_read, text_problem, without_format

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_SLOTS = 28
MAX_GOALS = 8
WEEK_MIN = 7 * 24 * 60


class ProfileError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_timezone(name: str) -> str:
    """An IANA timezone name ("Europe/Berlin", "UTC"); ProfileError otherwise."""
    name = name.strip()
    if not name or len(name) > 64 or name.startswith("/") or ".." in name:
        raise ProfileError("timezone", f"unknown timezone {name!r}")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ProfileError("timezone", f"unknown timezone {name!r}; use an IANA name such as Europe/Berlin") from exc
    if name not in _zones():  # "localtime", "posixrules", "right/…": files, not zones a learner lives in
        raise ProfileError("timezone", f"unknown timezone {name!r}; use an IANA name such as Europe/Berlin")
    return name


@functools.lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(available_timezones()) - {"localtime", "posixrules", "Factory"}


def _minutes(hhmm: str, field: str) -> int:
    try:
        h, m = hhmm.split(":")
        hours, mins = int(h), int(m)
    except ValueError as exc:
        raise ProfileError(field, f"expected HH:MM, got {hhmm!r}") from exc
    if not (0 <= hours <= 24 and 0 <= mins < 60) or (hours == 24 and mins):
        raise ProfileError(field, f"expected HH:MM between 00:00 and 24:00, got {hhmm!r}")
    return hours * 60 + mins


def check_availability(slots: list[tuple[str, str, str]]) -> list[list[int]]:
    """(day, "HH:MM", "HH:MM") slots -> stored [day, start_min, end_min]; ProfileError when one is bad."""
    if len(slots) > MAX_SLOTS:
        raise ProfileError("availability", f"at most {MAX_SLOTS} slots")
    out = []
    for i, (day, start, end) in enumerate(slots):
        if day not in DAYS:
            raise ProfileError(f"availability[{i}].day", f"day must be one of {', '.join(DAYS)}")
        a, b = _minutes(start, f"availability[{i}].start"), _minutes(end, f"availability[{i}].end")
        if b <= a:
            raise ProfileError(f"availability[{i}].end", "a slot must end after it starts")
        out.append([DAYS.index(day), a, b])
    merged: list[list[int]] = []
    for d, a, b in sorted(out):  # the same or overlapping slots of a day are one
        if merged and merged[-1][0] == d and a <= merged[-1][2]:
            merged[-1][2] = max(merged[-1][2], b)
        else:
            merged.append([d, a, b])
    return merged


# What a body may hold before its goals are cleaned and deduplicated (the limits are on what is stored: nine goals
# that are five once case is set aside, or 80 characters and a zero-width space, were refused as too many, too long)
RAW_GOALS = 4 * MAX_GOALS
RAW_GOAL_CHARS = 400


def check_goals(goals: list[str]) -> list[str]:
    """The goals as stored: composed, without invisible format characters, spacing collapsed, each once (as a reader
    sees them); at most MAX_GOALS of at most 80 characters each, counted on that."""
    out: list[str] = []
    for i, g in enumerate(goals):
        # invisible format characters (a BOM, bidi overrides, a soft hyphen, tags) dropped: "\ufeffabc" and "ca\u00adlc"
        # are "abc" and "calc", and an override does not reach the pod room quoting shared goals. The zero-width
        # (non-)joiners stay: emoji and Persian or Indic words need them.
        g = unicodedata.normalize("NFC", " ".join(without_format(g).split()))  # (stored composed)
        problem = text_problem(g, 80, "a goal")
        if problem is not None:
            raise ProfileError(f"goals[{i}]",
                               problem[1] if problem[0] != "too_long" else "a goal is 1 to 80 characters")
        if as_read(g) not in (as_read(x) for x in out):  # (case, width and variation selectors aside)
            out.append(g)
    if len(out) > MAX_GOALS:
        raise ProfileError("goals", f"at most {MAX_GOALS} goals (different ones: case and spacing aside)")
    return out


@dataclass(frozen=True, slots=True)
class Profile:
    user_id: int
    timezone: str
    availability: list[list[int]]
    goals: list[str]
    updated_at: datetime | None
    timezone_set: bool = False  # the learner gave it (else `timezone` is the default, UTC)

    def slots(self) -> list[tuple[str, str, str]]:
        return [(DAYS[d], f"{a // 60:02d}:{a % 60:02d}", f"{b // 60:02d}:{b % 60:02d}") for d, a, b in self.availability]


def _profile(user_id: int, row: asyncpg.Record | None) -> Profile:
    if row is None:
        return Profile(user_id, "UTC", [], [], None)
    return Profile(user_id, row["timezone"], [list(s) for s in row["availability"]], list(row["goals"]),
                   row["updated_at"], row["timezone_set"] or row["timezone"] != "UTC")


async def get_profile(conn: asyncpg.Connection, user_id: int) -> Profile:
    row = await conn.fetchrow("SELECT timezone, availability, goals, updated_at, timezone_set FROM learner_profiles "
                              "WHERE user_id = $1", user_id)
    return _profile(user_id, row)


async def profiles_of(conn: asyncpg.Connection, user_ids: list[int]) -> dict[int, Profile]:
    rows = await conn.fetch(
        "SELECT user_id, timezone, availability, goals, updated_at, timezone_set FROM learner_profiles "
        "WHERE user_id = ANY($1::bigint[])",
        user_ids)
    got = {r["user_id"]: _profile(r["user_id"], r) for r in rows}
    return {u: got.get(u) or _profile(u, None) for u in user_ids}


async def update_profile(conn: asyncpg.Connection, user_id: int, *, timezone_name: str | None = None,
                         availability: list[list[int]] | None = None, goals: list[str] | None = None) -> Profile:
    """Change the given parts (validated by the check_* functions); the rest stays."""
    row = await conn.fetchrow(
        """INSERT INTO learner_profiles AS p (user_id, timezone, availability, goals, timezone_set, timezone_changed_at)
           VALUES ($1, coalesce($2, 'UTC'), coalesce($3::jsonb, '[]'::jsonb), coalesce($4::text[], '{}'),
                   $2 IS NOT NULL, CASE WHEN $2 <> 'UTC' THEN now() END)
           ON CONFLICT (user_id) DO UPDATE SET timezone = coalesce($2, p.timezone),
               availability = coalesce($3::jsonb, p.availability), goals = coalesce($4::text[], p.goals),
               timezone_set = p.timezone_set OR $2 IS NOT NULL, updated_at = now(),
               timezone_changed_at = CASE WHEN $2 <> p.timezone THEN now() ELSE p.timezone_changed_at END
           RETURNING timezone, availability, goals, updated_at, timezone_set""",
        user_id, timezone_name, availability, goals)
    return _profile(user_id, row)


def utc_week_minutes(profile: Profile, at: datetime | None = None) -> list[tuple[int, int]]:
    """The availability as merged [start, end) minutes of the UTC week (Monday 00:00 UTC = 0), split at the
    week's wrap; the timezone's offset at `at` (default now) is used for every slot."""
    off_min = round(utc_offset_hours(profile.timezone, at) * 60)
    out: list[tuple[int, int]] = []
    for d, a, b in profile.availability:
        start = (d * 1440 + a - off_min) % WEEK_MIN
        length = b - a
        end = start + length
        if end <= WEEK_MIN:
            out.append((start, end))
        else:
            out += [(start, WEEK_MIN), (0, end - WEEK_MIN)]
    merged: list[tuple[int, int]] = []  # overlapping slots must not count twice
    for a, b in sorted(out):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def zone(tz: str | None) -> ZoneInfo:
    """The named zone; UTC for none, or for a stored name that is not a zone (any more): tzdata dropped it, or a
    value written past `check_timezone` names a folder or is too long."""
    try:
        return ZoneInfo(tz or "UTC")
    except (ValueError, KeyError, OSError):  # ZoneInfoNotFoundError is a KeyError
        return ZoneInfo("UTC")


def utc_offset_hours(tz: str, at: datetime | None = None) -> float:
    at = at or datetime.now(timezone.utc)
    offset = at.astimezone(zone(tz)).utcoffset()
    return offset.total_seconds() / 3600 if offset else 0.0
