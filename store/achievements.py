"""Achievements: defined as data below, unlocked once per learner (`user_achievements`).

A requirement names one statistic and a threshold. Statistics come from the XP totals (per-kind counts and
level) and the streak (longest run). An award checks only the thresholds it crossed, so the common case
costs no query; `sync` evaluates every definition (new definitions reach learners who already qualify).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import datetime
from math import isqrt

import asyncpg

from store.events import AchievementInfo

logger = logging.getLogger(__name__)

TIERS = ("common", "rare", "epic", "legendary")

# statistic -> where it comes from (an XP kind's count, the level, the longest streak)
STATS = {
    "lessons": "count of lesson_completed",
    "courses": "count of course_completed",
    "assignments": "count of assignment_passed",
    "perfect_scores": "count of perfect_score",
    "helpful_answers": "count of helpful_answer",
    "level": "level reached",
    "streak": "longest daily streak (days)",
}
_COUNT_OF = {"lessons": "lesson_completed", "courses": "course_completed", "assignments": "assignment_passed",
             "perfect_scores": "perfect_score", "helpful_answers": "helpful_answer"}

DEFINITIONS: tuple[dict, ...] = (
    {"id": "first-lesson", "title": "First steps", "description": "Complete your first lesson.",
     "tier": "common", "stat": "lessons", "at_least": 1},
    {"id": "lessons-10", "title": "Getting serious", "description": "Complete 10 lessons.",
     "tier": "common", "stat": "lessons", "at_least": 10},
    {"id": "lessons-100", "title": "Binge learner", "description": "Complete 100 lessons.",
     "tier": "epic", "stat": "lessons", "at_least": 100},
    {"id": "streak-3", "title": "On a roll", "description": "Learn 3 days in a row.",
     "tier": "common", "stat": "streak", "at_least": 3},
    {"id": "streak-7", "title": "Week warrior", "description": "Learn 7 days in a row.",
     "tier": "rare", "stat": "streak", "at_least": 7},
    {"id": "streak-30", "title": "Unstoppable", "description": "Learn 30 days in a row.",
     "tier": "epic", "stat": "streak", "at_least": 30},
    {"id": "streak-100", "title": "Centurion", "description": "Learn 100 days in a row.",
     "tier": "legendary", "stat": "streak", "at_least": 100},
    {"id": "assignments-5", "title": "Homework hero", "description": "Pass 5 assignments.",
     "tier": "common", "stat": "assignments", "at_least": 5},
    {"id": "perfect-1", "title": "Flawless", "description": "Get a perfect score on an assignment.",
     "tier": "rare", "stat": "perfect_scores", "at_least": 1},
    {"id": "perfect-10", "title": "Perfectionist", "description": "Get 10 perfect scores.",
     "tier": "epic", "stat": "perfect_scores", "at_least": 10},
    {"id": "course-1", "title": "Graduate", "description": "Complete a whole course.",
     "tier": "rare", "stat": "courses", "at_least": 1},
    {"id": "courses-5", "title": "Scholar", "description": "Complete 5 courses.",
     "tier": "legendary", "stat": "courses", "at_least": 5},
    {"id": "helpful-1", "title": "Helping hand", "description": "Have an answer marked helpful.",
     "tier": "common", "stat": "helpful_answers", "at_least": 1},
    {"id": "helpful-10", "title": "Mentor", "description": "Have 10 answers marked helpful.",
     "tier": "epic", "stat": "helpful_answers", "at_least": 10},
    {"id": "level-5", "title": "Rising star", "description": "Reach level 5.",
     "tier": "rare", "stat": "level", "at_least": 5},
    {"id": "level-10", "title": "Veteran", "description": "Reach level 10.",
     "tier": "epic", "stat": "level", "at_least": 10},
    {"id": "level-25", "title": "Legend", "description": "Reach level 25.",
     "tier": "legendary", "stat": "level", "at_least": 25},
)


@dataclass(frozen=True, slots=True)
class Achievement:
    id: str
    title: str
    description: str
    tier: str
    stat: str
    at_least: int

    def info(self) -> AchievementInfo:
        return AchievementInfo(id=self.id, title=self.title, description=self.description, tier=self.tier)


def _load() -> dict[str, Achievement]:
    out: dict[str, Achievement] = {}
    for d in DEFINITIONS:
        a = Achievement(**d)
        if a.tier not in TIERS or a.stat not in STATS or a.at_least < 1 or a.id in out:
            raise ValueError(f"bad achievement definition {d}")
        out[a.id] = a
    return out


BY_ID = _load()


def level_for(xp: int) -> int:
    """floor(sqrt(xp / 100)), exactly (integer arithmetic)."""
    return isqrt(max(xp, 0) // 100)


@functools.lru_cache(maxsize=256)
def award_thresholds(kind: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[bool, ...]]:
    """What an award of `kind` can cross, as (ids, thresholds, on_xp) for the award statement: a threshold on
    the count of `kind`, or (on_xp) the XP at which a level threshold starts. Awards never move the streak."""
    ids: list[str] = []
    need: list[int] = []
    on_xp: list[bool] = []
    for a in BY_ID.values():
        if a.stat == "level":
            ids.append(a.id), need.append(100 * a.at_least * a.at_least), on_xp.append(True)
        elif _COUNT_OF.get(a.stat) == kind:
            ids.append(a.id), need.append(a.at_least), on_xp.append(False)
    return tuple(ids), tuple(need), tuple(on_xp)


# The rooms (course and pod rooms of the user $1) an unlock is announced in, as one text[] expression.
ROOMS_SQL = """(ARRAY(SELECT 'course:' || course_id FROM enrollments WHERE user_id = $1 ORDER BY course_id)
               || ARRAY(SELECT 'pod:' || m.pod_id FROM pod_members m JOIN pods p ON p.id = m.pod_id
                        JOIN enrollments e ON e.course_id = p.course_id AND e.user_id = m.user_id
                        WHERE m.user_id = $1 ORDER BY m.pod_id))"""


def stats(xp: int, counts: dict[str, int], longest_streak: int) -> dict[str, int]:
    out = {stat: int(counts.get(kind, 0)) for stat, kind in _COUNT_OF.items()}
    out["level"] = level_for(xp)
    out["streak"] = longest_streak
    return out


def crossed(before: dict[str, int], after: dict[str, int]) -> list[Achievement]:
    """Definitions whose threshold lies in (before, after] of their statistic."""
    return [a for a in BY_ID.values() if a.stat in after and before.get(a.stat, 0) < a.at_least <= after[a.stat]]


def satisfied(current: dict[str, int]) -> list[Achievement]:
    return [a for a in BY_ID.values() if current.get(a.stat, 0) >= a.at_least]


@dataclass(frozen=True, slots=True)
class Unlocked:
    user_id: int
    achievement: Achievement
    unlocked_at: datetime
    name: str = ""  # the learner's display name, for the event
    rooms: tuple[str, ...] = ()  # the learner's course and pod rooms, where the unlock is announced


async def unlock(conn: asyncpg.Connection, user_id: int, candidates: list[Achievement],
                 at: datetime | None = None) -> list[Unlocked]:
    """Record these achievements for the user; returns the ones unlocked now (not before), each with the
    learner's rooms (enrolled courses, pods) to announce it in."""
    if not candidates:
        return []
    rows = await conn.fetch(
        """INSERT INTO user_achievements (user_id, achievement_id, unlocked_at)
           SELECT $1, x, coalesce($3, now()) FROM unnest($2::text[]) AS x
           ON CONFLICT DO NOTHING RETURNING achievement_id, unlocked_at""",
        user_id, [a.id for a in candidates], at)
    if not rows:
        return []
    who = await conn.fetchrow(f"SELECT {ROOMS_SQL} AS rooms, (SELECT name FROM users WHERE id = $1) AS name", user_id)
    rooms = tuple(who["rooms"] or ())
    return [Unlocked(user_id, BY_ID[r["achievement_id"]], r["unlocked_at"], name=who["name"] or "", rooms=rooms)
            for r in rows]


async def current_stats(conn: asyncpg.Connection, user_id: int) -> dict[str, int]:
    row = await conn.fetchrow(
        """SELECT coalesce(t.xp, 0) AS xp, coalesce(t.counts, '{}'::jsonb) AS counts, coalesce(s.longest, 0) AS longest
           FROM users u LEFT JOIN xp_totals t ON t.user_id = u.id LEFT JOIN streaks s ON s.user_id = u.id
           WHERE u.id = $1""", user_id)
    if row is None:
        return stats(0, {}, 0)
    return stats(row["xp"], row["counts"], row["longest"])


async def sync(conn: asyncpg.Connection, user_id: int) -> list[Unlocked]:
    """Unlock every achievement the user qualifies for and does not hold yet."""
    return await unlock(conn, user_id, satisfied(await current_stats(conn, user_id)))


async def unlocked_of(conn: asyncpg.Connection, user_id: int) -> dict[str, datetime]:
    rows = await conn.fetch("SELECT achievement_id, unlocked_at FROM user_achievements WHERE user_id = $1", user_id)
    return {r["achievement_id"]: r["unlocked_at"] for r in rows}
