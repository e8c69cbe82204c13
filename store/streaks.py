"""Daily streaks in the learner's own timezone, with one freeze per week.

A day counts when the learner is active on it (watching progress is reported) in their profile's timezone.
Each active day extends the streak and earns `daily_streak` XP once. Missed days are covered by freezes: at
most one per ISO week (Monday to Sunday, local), spent automatically when the learner comes back. Two missed
days in one week, or a missed day in a week whose freeze is spent, end the streak. Missed days are counted in
the calendar the last active day was counted in: a learner who moves east skips local days without missing any,
and one who moves west (or back and forth) misses the days they really missed there. After a move west, the first
day new in the old calendar (not yet in the new one) counts, recorded as the new calendar's day: from then on
days are counted where the learner now lives.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from store import achievements
from store.xp import XpTransaction

logger = logging.getLogger(__name__)

FREEZES_PER_WEEK = 1
_KEEP_WEEKS = 8  # spent-freeze weeks remembered (older ones cannot matter any more)


def monday(d: date) -> date:
    return d - timedelta(days=d.weekday())


def local_day(at: datetime, tz: str) -> date:
    at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    return at.astimezone(ZoneInfo(tz)).date()


@dataclass(frozen=True, slots=True)
class Streak:
    current: int = 0
    longest: int = 0
    last_day: date | None = None
    freeze_weeks: frozenset[date] = frozenset()
    day_tz: str | None = None  # the timezone `last_day` was counted in


def tz_shift(at: datetime, tz: str, day_tz: str | None) -> int:
    """How many days the learner's date in `tz` is ahead of their date in `day_tz` (the timezone their last active
    day was counted in) at `at`: positive after a move east, negative after a move west, 0 without a move."""
    if not day_tz or day_tz == tz:
        return 0
    try:
        return (local_day(at, tz) - local_day(at, day_tz)).days
    except (ValueError, KeyError):  # a zone no longer known: count as before
        return 0


def _missed(last_day: date, day: date, shift: int) -> list[date]:
    """The days after `last_day` with no activity up to `day` (in the current timezone), counted in the calendar
    `last_day` was counted in: up to `day - shift`. Counting in the new calendar would forgive the days a move
    east skips over, so a learner flipping between far-apart zones would never miss a day."""
    end = day - timedelta(days=shift)
    return [last_day + timedelta(days=i) for i in range(1, (end - last_day).days)]


def _coverable(missed: list[date], spent: frozenset[date]) -> bool:
    """Every missed day can take a freeze: one per week, in weeks whose freeze is not spent."""
    weeks = [monday(d) for d in missed]
    return len(set(weeks)) == len(weeks) and not (set(weeks) & spent)


def advance(s: Streak, day: date, shift: int = 0) -> tuple[Streak, bool]:
    """The streak after activity on local `day`, and whether `day` is a new streak day. `shift`: how far a change
    of timezone moved the calendar (`tz_shift`)."""
    if s.last_day is not None and day - timedelta(days=shift) <= s.last_day:
        # the same day again, or a late report for an earlier day, in the calendar the last day was counted in
        # (a move east opens no extra day: switching there and back would count each day twice)
        return s, False
    spent = s.freeze_weeks
    if s.last_day is None:
        current = 1
    else:
        missed = _missed(s.last_day, day, shift)
        if not missed:
            current = s.current + 1
        elif _coverable(missed, spent):
            current = s.current + 1
            spent = spent | {monday(d) for d in missed}
        else:
            current = 1
    horizon = monday(day) - timedelta(weeks=_KEEP_WEEKS)
    spent = frozenset(w for w in spent if w >= horizon)
    return Streak(current, max(s.longest, current), day, spent), True


def status(s: Streak, today: date, shift: int = 0) -> tuple[int, bool]:
    """(the streak as it stands today, whether this week's freeze is still free to cover a missed day). A streak
    whose missed days since the last active one can all still be frozen is alive; otherwise it is 0. A day
    already missed this week takes this week's freeze when the learner comes back, so it is no longer free
    (unless the streak is gone anyway: a new one starts with the week's freeze unspent)."""
    week = monday(today)
    unspent = week not in s.freeze_weeks
    if s.last_day is None:
        return 0, unspent
    missed = _missed(s.last_day, today, shift)
    if not _coverable(missed, s.freeze_weeks):
        return 0, unspent
    return s.current, unspent and not any(monday(d) == week for d in missed)


def _row_to_streak(row) -> Streak:  # type: ignore[no-untyped-def]
    if row is None:
        return Streak()
    return Streak(row["current"], row["longest"], row["last_day"], frozenset(row["freeze_weeks"]), row["day_tz"])


async def get(conn, user_id: int) -> tuple[Streak, str]:  # type: ignore[no-untyped-def]
    """The stored streak and the learner's timezone."""
    row = await conn.fetchrow(
        """SELECT s.current, s.longest, s.last_day, s.freeze_weeks, s.day_tz, coalesce(p.timezone, 'UTC') AS timezone
           FROM users u LEFT JOIN streaks s ON s.user_id = u.id LEFT JOIN learner_profiles p ON p.user_id = u.id
           WHERE u.id = $1""", user_id)
    if row is None or row["last_day"] is None:
        return Streak(), (row["timezone"] if row else "UTC")
    return _row_to_streak(row), row["timezone"]


async def record_activity(tx: XpTransaction, user_id: int, at: datetime | None = None) -> Streak:
    """The learner was active at `at` (default now): extend the streak for their local day, award the day's
    `daily_streak` XP and unlock streak achievements, all in `tx`."""
    conn = tx.conn
    at = at or datetime.now(timezone.utc)
    await conn.execute("INSERT INTO streaks (user_id) VALUES ($1) ON CONFLICT DO NOTHING", user_id)
    row = await conn.fetchrow(
        """SELECT s.current, s.longest, s.last_day, s.freeze_weeks, s.day_tz, coalesce(p.timezone, 'UTC') AS timezone
           FROM streaks s LEFT JOIN learner_profiles p ON p.user_id = s.user_id
           WHERE s.user_id = $1 FOR UPDATE OF s""", user_id)
    before = _row_to_streak(row)
    day, counted_tz = local_day(at, row["timezone"]), row["timezone"]
    shift = tz_shift(at, counted_tz, before.day_tz)
    here = day
    if before.last_day is not None and day <= before.last_day < day - timedelta(days=shift):
        # after a move west the new calendar has not passed the last active day yet, but the one that day was
        # counted in has: a new day there. Recorded as the new calendar's day (`here`): the learner was active
        # on it, and from then on days are counted where they now live (kept in the old calendar, a learner
        # active every evening would stay a day ahead of it for good and be charged its days as missed)
        day, shift = day - timedelta(days=shift), 0
    after, new_day = advance(before, day, shift)
    if not new_day:
        return before
    # the day's XP once: a day counted in the old calendar is named with it (its date may come again here)
    xp_key = f"streak:{day.isoformat()}" if here == day else f"streak:{day.isoformat()}@{before.day_tz}"
    after = Streak(after.current, after.longest, here, after.freeze_weeks, counted_tz)
    await conn.execute(
        """UPDATE streaks SET current = $2, longest = $3, last_day = $4, freeze_weeks = $5, day_tz = $6,
                              updated_at = now()
           WHERE user_id = $1""", user_id, after.current, after.longest, after.last_day, sorted(after.freeze_weeks),
        counted_tz)
    await tx.award(user_id, "daily_streak", xp_key, at=at)
    hit = achievements.crossed({"streak": before.longest}, {"streak": after.longest})
    if hit:
        tx.unlocked += await achievements.unlock(conn, user_id, hit)  # named, with the learner's rooms
    return after
