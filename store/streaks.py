"""Daily streaks in the learner's own timezone, with one freeze per week.

A day counts when the learner is active on it (watching progress is reported) in their profile's timezone.
Each active day extends the streak and earns `daily_streak` XP once. Missed days are covered by freezes: at
most one per ISO week (Monday to Sunday, local), spent automatically when the learner comes back. Two missed
days in one week, or a missed day in a week whose freeze is spent, end the streak.

Timezone moves: a day is new only if it starts (in the current timezone) no earlier than the last counted day
ended (in the timezone it was counted in). Counted days never overlap in time, so switching timezones can gain
no day (at most one per 24 hours), and the local day a move lands in, when it overlaps the day already counted,
is simply not new. Missed days are the whole local days between the end of the last counted day and the new one:
a learner who moves east or west and is active every local day misses none. A move counts from when it was made
(`learner_profiles.timezone_changed_at`): the gap before it is counted in the zone the last day was counted in, so a
learner who missed two days cannot turn them into one by moving west afterwards. Activity that was not a new day
but came after the last counted day ended (a day overlapping it, in a zone moved to) is remembered (`active_at`):
moving back, the day of the zone counted in that it fell in is not charged as missed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta, timezone

from store import achievements
from store.profiles import zone
from store.xp import XpTransaction

logger = logging.getLogger(__name__)

FREEZES_PER_WEEK = 1
_KEEP_WEEKS = 8  # spent-freeze weeks remembered (older ones cannot matter any more)


def monday(d: date) -> date:
    return d - timedelta(days=d.weekday())


def local_day(at: datetime, tz: str) -> date:
    at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    return at.astimezone(zone(tz)).date()


@dataclass(frozen=True, slots=True)
class Streak:
    current: int = 0
    longest: int = 0
    last_day: date | None = None
    freeze_weeks: frozenset[date] = frozenset()
    day_tz: str | None = None  # the timezone `last_day` was counted in
    tz_changed_at: datetime | None = None  # when the learner last changed their timezone (their profile's)
    active_at: datetime | None = None  # the latest activity after `last_day` ended that made no new day


def _midnight(day: date, tz: str | None) -> datetime:
    return datetime.combine(day, time(0), tzinfo=zone(tz))


def _ended(s: Streak, tz: str) -> datetime:
    """The instant the last counted day ended, in UTC (arithmetic on a zone's wall clock goes wrong across DST)."""
    assert s.last_day is not None
    return _midnight(s.last_day + timedelta(days=1), s.day_tz or tz).astimezone(timezone.utc)


def _new_and_missed(s: Streak, day: date, tz: str) -> tuple[bool, list[date]]:
    """Whether local `day` (in `tz`) is a new streak day after the last counted one, and the local days (in `tz`)
    missed in between: those wholly after the last counted day ended and before `day`, less the one the learner was
    active in (`active_at`) without it making a new day."""
    if s.last_day is None:
        return True, []
    ended = _ended(s, tz)
    if _midnight(day, tz) < ended:
        return False, []  # the same day again, a late report, or a day overlapping the counted one (a move)

    def idle(days: list[date], in_tz: str) -> list[date]:
        at = s.active_at
        return [d for d in days if at is None or not _midnight(d, in_tz) <= at < _midnight(d + timedelta(days=1), in_tz)]

    last_here = (ended - timedelta(microseconds=1)).astimezone(zone(tz)).date()
    missed = [last_here + timedelta(days=i) for i in range(1, (day - last_here).days)]
    old, moved = s.day_tz or tz, s.tz_changed_at
    if old == tz or moved is None or moved <= ended:
        return True, idle(missed, tz)
    # moved during the gap: until the day of the move the days were the old zone's (its whole days before that day),
    # from the start of that day on the new zone's (its days starting then or later): what a move leaves uncharged is
    # under a day (from the start of the move's old day to the next midnight of the new zone), however far it goes
    # (a move to another name for the same zone leaves nothing)
    move_day = local_day(moved, old)
    from_start = _midnight(move_day, old)
    before = [s.last_day + timedelta(days=i) for i in range(1, (move_day - s.last_day).days)]
    return True, idle(before, old) + idle([d for d in missed if _midnight(d, tz) >= from_start], tz)


def _coverable(missed: list[date], spent: frozenset[date]) -> bool:
    """Every missed day can take a freeze: one per week, in weeks whose freeze is not spent."""
    weeks = [monday(d) for d in missed]
    return len(set(weeks)) == len(weeks) and not (set(weeks) & spent)


def advance(s: Streak, day: date, tz: str = "UTC") -> tuple[Streak, bool]:
    """The streak after activity on local `day` in `tz`, and whether `day` is a new streak day."""
    new, missed = _new_and_missed(s, day, tz)
    if not new:
        return s, False
    spent = s.freeze_weeks
    if s.last_day is None:
        current = 1
    else:
        if not missed:
            current = s.current + 1
        elif _coverable(missed, spent):
            current = s.current + 1
            spent = spent | {monday(d) for d in missed}
        else:
            current = 1
    horizon = monday(day) - timedelta(weeks=_KEEP_WEEKS)
    spent = frozenset(w for w in spent if w >= horizon)
    return Streak(current, max(s.longest, current), day, spent, tz, s.tz_changed_at), True  # (no active_at: none
    # after the new day ended yet)


def status(s: Streak, today: date, tz: str = "UTC") -> tuple[int, bool]:
    """(the streak as it stands today, whether this week's freeze is still free to cover a missed day). A streak
    whose missed days since the last active one can all still be frozen is alive; otherwise it is 0. A day
    already missed this week takes this week's freeze when the learner comes back, so it is no longer free
    (unless the streak is gone anyway: a new one starts with the week's freeze unspent)."""
    week = monday(today)
    unspent = week not in s.freeze_weeks
    if s.last_day is None:
        return 0, unspent
    _, missed = _new_and_missed(s, today, tz)
    if not _coverable(missed, s.freeze_weeks):
        return 0, unspent
    return s.current, unspent and not any(monday(d) == week for d in missed)


def _row_to_streak(row) -> Streak:  # type: ignore[no-untyped-def]
    if row is None:
        return Streak()
    return Streak(row["current"], row["longest"], row["last_day"], frozenset(row["freeze_weeks"]), row["day_tz"],
                  row["timezone_changed_at"], row["active_at"])


async def get(conn, user_id: int) -> tuple[Streak, str]:  # type: ignore[no-untyped-def]
    """The stored streak and the learner's timezone."""
    row = await conn.fetchrow(
        """SELECT s.current, s.longest, s.last_day, s.freeze_weeks, s.day_tz, coalesce(p.timezone, 'UTC') AS timezone,
                  p.timezone_changed_at, s.active_at
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
    at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    await conn.execute("INSERT INTO streaks (user_id) VALUES ($1) ON CONFLICT DO NOTHING", user_id)
    row = await conn.fetchrow(
        """SELECT s.current, s.longest, s.last_day, s.freeze_weeks, s.day_tz, coalesce(p.timezone, 'UTC') AS timezone,
                  p.timezone_changed_at, s.active_at
           FROM streaks s LEFT JOIN learner_profiles p ON p.user_id = s.user_id
           WHERE s.user_id = $1 FOR UPDATE OF s""", user_id)
    before = _row_to_streak(row)
    tz = row["timezone"]
    day = local_day(at, tz)
    after, new_day = advance(before, day, tz)
    if not new_day:
        if before.last_day is not None and at >= _ended(before, tz) and (before.active_at is None or
                                                                         at > before.active_at):
            await conn.execute("UPDATE streaks SET active_at = $2 WHERE user_id = $1", user_id, at)
            return replace(before, active_at=at)
        return before
    # the day's XP once (a date in another timezone than the last one's is another day: named with its zone)
    xp_key = f"streak:{day.isoformat()}" if tz == (before.day_tz or tz) else f"streak:{day.isoformat()}@{tz}"
    await conn.execute(
        """UPDATE streaks SET current = $2, longest = $3, last_day = $4, freeze_weeks = $5, day_tz = $6,
                              active_at = NULL, updated_at = now()
           WHERE user_id = $1""", user_id, after.current, after.longest, after.last_day, sorted(after.freeze_weeks),
        tz)
    await tx.award(user_id, "daily_streak", xp_key, at=at)
    hit = achievements.crossed({"streak": before.longest}, {"streak": after.longest})
    if hit:
        tx.unlocked += await achievements.unlock(conn, user_id, hit)  # named, with the learner's rooms
    return after


def counted_today(s: Streak, today: date, tz: str) -> bool:
    """Today (local, in `tz`) needs no more activity for the streak: it is the last counted day, or overlaps it."""
    return s.last_day is not None and not _new_and_missed(s, today, tz)[0]
