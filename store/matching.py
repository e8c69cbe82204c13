"""Study-buddy rounds of a pod (`pod_matches`): who is matched with whom this week, and declines.

The newest round not superseded is the pod's current one. A decline supersedes it with a round of the rest
(the decliners of the chain are left out until the next weekly round).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import asyncpg

logger = logging.getLogger(__name__)

# Columns by name, never `*`: a statement asyncpg cached before a migration added a column would change its row
# type, which inside a transaction fails (InvalidCachedStatementError) on every process still running old code.
_MATCH_COLS = "id, pod_id, trigger, round_key, created_by, groups, declined, message_id, created_at, superseded_at"


def week_key(at: datetime | None = None) -> str:
    """'cron:2026-W05': the weekly round of the ISO week (UTC) holding `at`."""
    year, week, _ = (at or datetime.now(timezone.utc)).astimezone(timezone.utc).isocalendar()
    return f"cron:{year}-W{week:02d}"


async def eligible_members(conn: asyncpg.Connection, pod_id: int, *,
                           limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    """Learners in the pod who are still enrolled in its course: (user_id, name)."""
    return await conn.fetch(
        """SELECT m.user_id, u.name FROM pod_members m JOIN pods p ON p.id = m.pod_id
           JOIN users u ON u.id = m.user_id AND u.role = 'learner'
           JOIN enrollments e ON e.course_id = p.course_id AND e.user_id = m.user_id
           WHERE m.pod_id = $1 ORDER BY m.user_id LIMIT $2 OFFSET $3""", pod_id, limit, offset)


async def current(conn: asyncpg.Connection, pod_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {_MATCH_COLS} FROM pod_matches WHERE pod_id = $1 AND superseded_at IS NULL ORDER BY id DESC LIMIT 1",
        pod_id)


async def declines_only_since(conn: asyncpg.Connection, pod_id: int, match_id: int) -> bool | None:
    """Whether every round of the pod after its round `match_id` is a re-match after declines (so the current round
    is it, or derives from it); None when `match_id` never was a round of the pod."""
    return await conn.fetchval(
        """SELECT NOT EXISTS (SELECT 1 FROM pod_matches WHERE pod_id = $1 AND id > $2 AND trigger <> 'decline')
           FROM pod_matches WHERE id = $2 AND pod_id = $1""",
        pod_id, match_id)


async def round_exists(conn: asyncpg.Connection, pod_id: int, round_key: str) -> bool:
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pod_matches WHERE pod_id = $1 AND round_key = $2)", pod_id, round_key))


async def round_by_key(conn: asyncpg.Connection, pod_id: int, round_key: str) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_MATCH_COLS} FROM pod_matches WHERE pod_id = $1 AND round_key = $2",
                               pod_id, round_key)


class StaleRound(Exception):
    """The round a re-match was computed from is no longer the current one (another decline or round landed
    meanwhile): compute again from the current round."""


class PodGone(LookupError):
    """The pod was deleted while a round of it was being made."""


async def save_round(conn: asyncpg.Connection, pod_id: int, trigger: str, groups: list[dict[str, Any]], *,
                     round_key: str | None, created_by: int | None, declined: list[int],
                     based_on: int | None = None, unless_since: datetime | None = None) -> asyncpg.Record | None:
    """Store a new current round (superseding the previous one); None when `round_key` already has one, or when
    `unless_since` is given and the pod got a round other than by a decline since then (the weekly round must not
    replace an instructor's, made while it was computed).
    `based_on`: the round this one re-matches; StaleRound when it is no longer current. PodGone when the pod was
    deleted meanwhile."""
    try:
        return await _save_round(conn, pod_id, trigger, groups, round_key=round_key, created_by=created_by,
                                 declined=declined, based_on=based_on, unless_since=unless_since)
    except asyncpg.ForeignKeyViolationError:
        raise PodGone(f"pod {pod_id} not found") from None


async def _save_round(conn: asyncpg.Connection, pod_id: int, trigger: str, groups: list[dict[str, Any]], *,
                      round_key: str | None, created_by: int | None, declined: list[int],
                      based_on: int | None, unless_since: datetime | None) -> asyncpg.Record | None:
    async with conn.transaction():
        # one writer per pod at a time, so exactly one round is current
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('pod_match'), $1::int)", pod_id % 2**31)
        if based_on is not None:
            cur = await conn.fetchval("SELECT id FROM pod_matches WHERE pod_id = $1 AND superseded_at IS NULL "
                                      "ORDER BY id DESC LIMIT 1", pod_id)
            if cur != based_on:
                raise StaleRound(f"round {based_on} of pod {pod_id} was superseded by round {cur}")
        if unless_since is not None and await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pod_matches WHERE pod_id = $1 AND created_at >= $2 "
                "AND trigger <> 'decline')", pod_id, unless_since):
            return None
        row = await conn.fetchrow(
            f"""INSERT INTO pod_matches (pod_id, trigger, round_key, created_by, groups, declined)
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (pod_id, round_key) DO NOTHING RETURNING {_MATCH_COLS}""",
            pod_id, trigger, round_key, created_by, groups, declined)
        if row is None:
            return None
        await conn.execute(
            "UPDATE pod_matches SET superseded_at = now() WHERE pod_id = $1 AND id <> $2 AND superseded_at IS NULL",
            pod_id, row["id"])
    return row


async def set_message(conn: asyncpg.Connection, match_id: int, message_id: int) -> None:
    await conn.execute("UPDATE pod_matches SET message_id = $2 WHERE id = $1", match_id, message_id)


UNANNOUNCED_WITHIN = "7 days"  # older rounds are not announced late any more


async def unannounced(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Current rounds (weekly, manual, after a decline) of the last week saved without their pod-room message:
    the post failed, or the process stopped between the two."""
    return await conn.fetch(f"""SELECT {_MATCH_COLS} FROM pod_matches WHERE message_id IS NULL AND superseded_at IS NULL
                                AND created_at > now() - interval '{UNANNOUNCED_WITHIN}' ORDER BY id""")


async def pods_to_match(conn: asyncpg.Connection, round_key: str, since: datetime) -> list[int]:
    """Pods with at least two eligible learners, without the round `round_key` yet and without a round made
    since `since` (the week's moment) other than by a decline: a round an instructor asked for after it, and the
    rounds its declines made, are the pod's round for the week; the weekly run must not replace them (and undo a
    decline). A decline of an older round (last week's, declined after the moment, before this run) does not
    stand for the week: its decliners are back in the weekly round."""
    rows = await conn.fetch(
        """SELECT m.pod_id FROM pod_members m JOIN pods p ON p.id = m.pod_id
           JOIN users u ON u.id = m.user_id AND u.role = 'learner'
           JOIN enrollments e ON e.course_id = p.course_id AND e.user_id = m.user_id
           WHERE NOT EXISTS (
               SELECT 1 FROM pod_matches pm WHERE pm.pod_id = m.pod_id
               AND (pm.round_key = $1 OR (pm.created_at >= $2 AND pm.trigger <> 'decline')))
           GROUP BY m.pod_id HAVING count(*) >= 2 ORDER BY m.pod_id""", round_key, since)
    return [r["pod_id"] for r in rows]
