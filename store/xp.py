"""The XP ledger (Postgres, the truth): award XP once per idempotency key, then update Redis after commit.

Hook for other features (the grader, the tutor): award XP when something final happens.

    # outside a transaction: its own transaction, then leaderboards and events
    await xp.award_xp(pool, redis, learner_id, "assignment_passed", f"assignment:{assignment_id}",
                      course_id=course_id)

    # inside your own transaction (a grade becoming final together with its XP):
    async with xp.transaction(pool, redis) as tx:      # tx.conn is in a transaction
        await save_final_grade(tx.conn, ...)
        await tx.award(learner_id, "assignment_passed", f"assignment:{assignment_id}", course_id=course_id)
        if perfect:
            await tx.award(learner_id, "perfect_score", f"perfect:{assignment_id}", course_id=course_id)
    # committed: boards bumped, `xp.awarded` / `achievement.unlocked` / `leaderboard.changed` published

The same (learner, key) twice counts once, also when both calls race (INSERT … ON CONFLICT DO NOTHING). Only
learners earn XP; for anyone else (and for a duplicate) the award returns None. Points come from POINTS
unless given. The XP counts on the tenant board, the course board (with `course_id`) and the boards of the
learner's pods (those of the course, or all of them without a course; `pod_ids` overrides). A course or pod
board shows only who belongs there now (enrolled; a member with access): XP given with the course of a learner who left it stays in the ledger and counts there again when
they come back (`leaderboard_rebuild.resync_member`, on every enrolment or pod membership change).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from store import achievements, leaderboard_rebuild, leaderboards
from store.aio import cancel_and_wait
from store.achievements import Unlocked, level_for
from store.events import AchievementUnlocked, UserRef, XpAwarded, XpRevoked, encode, room_topic, user_topic
from store.keys import events_channel

logger = logging.getLogger(__name__)

# The one table of XP values.
POINTS: dict[str, int] = {
    "lesson_completed": 50,
    "first_lesson": 10,
    "assignment_passed": 100,
    "perfect_score": 50,  # on top of assignment_passed
    "course_completed": 500,
    "daily_streak": 20,
    "helpful_answer": 25,
}


# STUDYHALL_XP_ASYNC_COMMIT (set at startup): standalone awards commit without waiting for the WAL flush. A
# Postgres crash can then lose the last fraction of a second of standalone awards (never half of one); the
# boards may briefly be ahead of the ledger until the hourly check rebuilds them. Off by default.
ASYNC_COMMIT = False


def xp_for_level(level: int) -> int:
    """The XP at which `level` starts (level = floor(sqrt(xp / 100)))."""
    return 100 * level * level


@dataclass(frozen=True, slots=True)
class Award:
    id: int
    tenant_id: int
    user_id: int
    name: str
    kind: str
    points: int
    idempotency_key: str
    course_id: int | None
    pod_ids: list[int]
    at: datetime
    xp: int  # the learner's total after this award
    level: int
    previous_level: int
    unlocked: list[Unlocked] = field(default_factory=list)
    xid: int = 0  # the ledger transaction's id
    began_ms: int = 0  # when that transaction began (Postgres clock, ms since the epoch)
    on_course: bool = True  # the learner is enrolled in `course_id` (stands on its boards)
    board_pod_ids: list[int] | None = None  # of `pod_ids`, the pods the learner stands on (None: all of them)
    revokes: str | None = None  # a take-back (kind REVOKED, points negative): the kind of the award it cancels

    def entry(self) -> leaderboards.Entry:
        """The award as the boards see it: only the course and pod boards the learner stands on now."""
        return leaderboards.Entry(self.id, self.tenant_id, self.user_id, self.name, self.points,
                                  self.course_id if self.on_course else None,
                                  self.pod_ids if self.board_pod_ids is None else self.board_pod_ids, self.at, self.xid,
                                  self.began_ms)


# Insert the ledger row (learners only; a duplicate key inserts nothing), bump the running totals and record
# the achievements the award crossed, in one statement (one round trip, one commit). The pods default to the
# learner's pods in the course (all of them without a course), enrolled in their course now or not: XP earned while
# away from a course (a late grade, a helpful mark) counts there again when they are back, on the course board and
# on its pods' alike (a pod membership outlives the enrolment). $9-$11: achievements.award_thresholds(kind).
# Also which of the award's course and pod boards the learner stands on now (`on_course`, `board_pods`: enrolled
# in the course, a member of the pod with access), as a rebuild counts them.
_AWARD = f"""
WITH ins AS (
    INSERT INTO xp_events (tenant_id, user_id, kind, points, idempotency_key, course_id, pod_ids, at, meta)
    SELECT u.tenant_id, u.id, $2, $3, $4, $5,
           coalesce($6::bigint[], ARRAY(SELECT m.pod_id FROM pod_members m JOIN pods p ON p.id = m.pod_id
                                         WHERE m.user_id = u.id AND ($5::bigint IS NULL OR p.course_id = $5)
                                         ORDER BY m.pod_id)),
           coalesce($7::timestamptz, now()), $8
    FROM users u WHERE u.id = $1 AND u.role = 'learner'
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING id, tenant_id, user_id, points, course_id, pod_ids, at
), tot AS (
    INSERT INTO xp_totals AS t (user_id, xp, counts)
    SELECT user_id, points, jsonb_build_object($2::text, 1) FROM ins
    ON CONFLICT (user_id) DO UPDATE
        SET xp = t.xp + EXCLUDED.xp,
            counts = t.counts || jsonb_build_object($2::text, coalesce((t.counts ->> $2)::int, 0) + 1),
            updated_at = now()
    RETURNING xp, counts
), unl AS (
    INSERT INTO user_achievements (user_id, achievement_id, unlocked_at)
    SELECT ins.user_id, d.id, now()
    FROM ins, tot, unnest($9::text[], $10::bigint[], $11::bool[]) AS d(id, need, on_xp)
    WHERE CASE WHEN d.on_xp THEN tot.xp - ins.points < d.need AND d.need <= tot.xp
               ELSE (tot.counts ->> $2)::bigint - 1 < d.need AND d.need <= (tot.counts ->> $2)::bigint END
    ON CONFLICT DO NOTHING
    RETURNING achievement_id, unlocked_at
)
SELECT ins.id, ins.tenant_id, ins.user_id, ins.points, ins.course_id, ins.pod_ids, ins.at, tot.xp AS total,
       (SELECT name FROM users WHERE id = $1) AS name, pg_current_xact_id()::text AS xid,
       (extract(epoch FROM now()) * 1000)::bigint AS began_ms,
       {leaderboards.ON_COURSE_SQL.format(course="ins.course_id", user="$1")} AS on_course,
       {leaderboards.ON_PODS_SQL.format(user="$1", pods="ins.pod_ids")} AS board_pods,
       ARRAY(SELECT achievement_id FROM unl) AS unlocked, now() AS unlocked_at,
       CASE WHEN EXISTS (SELECT 1 FROM unl) THEN {achievements.ROOMS_SQL} END AS rooms
FROM ins, tot
"""
# The same, committing asynchronously (the setting is local to the statement's own transaction).
_AWARD_ASYNC = _AWARD.replace("FROM users u WHERE u.id = $1 AND u.role = 'learner'",
                              "FROM users u, (SELECT set_config('synchronous_commit', 'off', true)) AS cfg "
                              "WHERE u.id = $1 AND u.role = 'learner'")
assert _AWARD_ASYNC != _AWARD


async def insert_award(conn: asyncpg.Connection, user_id: int, kind: str, idempotency_key: str, *,
                       points: int | None = None, course_id: int | None = None, pod_ids: list[int] | None = None,
                       at: datetime | None = None, meta: dict[str, Any] | None = None,
                       async_commit: bool = False) -> Award | None:
    """Write one award in the caller's transaction (no Redis, no events: see `transaction`). `async_commit`
    (only for a statement that is its own transaction) commits without waiting for the WAL flush."""
    if points is None:
        if kind not in POINTS:
            raise ValueError(f"unknown XP kind {kind!r}; known: {sorted(POINTS)}")
        points = POINTS[kind]
    if points < 0:
        raise ValueError("points must not be negative")
    if pod_ids is not None:  # once each (a rebuild unnests the list; the live boards counted a pod once)
        pod_ids = sorted(set(pod_ids))
    row = await conn.fetchrow(_AWARD_ASYNC if async_commit else _AWARD, user_id, kind, points, idempotency_key,
                              course_id, pod_ids, at, meta or {}, *achievements.award_thresholds(kind))
    if row is None:
        return None
    total = int(row["total"])
    rooms = tuple(row["rooms"] or ())
    unlocked = [Unlocked(user_id, achievements.BY_ID[i], row["unlocked_at"], rooms=rooms)
                for i in sorted(row["unlocked"])]
    return Award(id=row["id"], tenant_id=row["tenant_id"], user_id=user_id, name=row["name"], kind=kind,
                 points=points, idempotency_key=idempotency_key, course_id=row["course_id"],
                 pod_ids=list(row["pod_ids"]), at=row["at"], xp=total, level=level_for(total),
                 previous_level=level_for(total - points), unlocked=unlocked, xid=int(row["xid"]),
                 began_ms=row["began_ms"], on_course=row["on_course"], board_pod_ids=list(row["board_pods"]))


# Take back an award (its ledger row stays; this one cancels it): a `revoked` row of minus its points with the key
# `revoke:<its key>` (once: a second take-back inserts nothing), on the same course, pods and moment as the award
# (so every board and period it counted on, live or rebuilt, loses it again), the totals and the award kind's count
# lowered. Achievements unlocked stay unlocked. $1 learner, $2 the award's key, $3 meta.
_REVOKE = f"""
WITH orig AS (
    SELECT id, kind, points FROM xp_events
    WHERE user_id = $1 AND idempotency_key = $2 AND kind <> 'revoked' AND points > 0
), ins AS (
    INSERT INTO xp_events (tenant_id, user_id, kind, points, idempotency_key, course_id, pod_ids, at, meta)
    SELECT x.tenant_id, x.user_id, 'revoked', -x.points, 'revoke:' || $2, x.course_id, x.pod_ids, x.at,
           jsonb_build_object('revokes', x.id, 'kind', x.kind, 'revoked_at', now()) || $3
    FROM xp_events x JOIN orig ON orig.id = x.id
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING id, tenant_id, user_id, points, course_id, pod_ids, at
), tot AS (
    UPDATE xp_totals t SET xp = t.xp + ins.points,
        counts = t.counts || jsonb_build_object(orig.kind, greatest(coalesce((t.counts ->> orig.kind)::int, 0) - 1, 0)),
        updated_at = now()
    FROM ins, orig WHERE t.user_id = ins.user_id
    RETURNING t.xp
)
SELECT ins.id, ins.tenant_id, ins.user_id, ins.points, ins.course_id, ins.pod_ids, ins.at, tot.xp AS total,
       orig.kind AS of_kind, (SELECT name FROM users WHERE id = $1) AS name, pg_current_xact_id()::text AS xid,
       (extract(epoch FROM now()) * 1000)::bigint AS began_ms,
       {leaderboards.ON_COURSE_SQL.format(course="ins.course_id", user="$1")} AS on_course,
       {leaderboards.ON_PODS_SQL.format(user="$1", pods="ins.pod_ids")} AS board_pods
FROM ins, tot, orig
"""
REVOKED = "revoked"  # the ledger kind of a take-back


async def insert_revocation(conn: asyncpg.Connection, user_id: int, idempotency_key: str, *,
                            meta: dict[str, Any] | None = None) -> Award | None:
    """Take back the award with this key in the caller's transaction (no Redis, no events: see `transaction`);
    None when there is none, or it was taken back already. The Award has the negative points, `kind` REVOKED and
    `revokes` the award's kind."""
    row = await conn.fetchrow(_REVOKE, user_id, idempotency_key, meta or {})
    if row is None:
        return None
    total = int(row["total"])
    return Award(id=row["id"], tenant_id=row["tenant_id"], user_id=user_id, name=row["name"] or "", kind=REVOKED,
                 points=row["points"], idempotency_key=f"revoke:{idempotency_key}", course_id=row["course_id"],
                 pod_ids=list(row["pod_ids"]), at=row["at"], xp=total, level=level_for(total),
                 previous_level=level_for(total - row["points"]), xid=int(row["xid"]), began_ms=row["began_ms"],
                 on_course=row["on_course"], board_pod_ids=list(row["board_pods"]), revokes=row["of_kind"])


class XpTransaction:
    """A transaction collecting awards and unlocks; `settle` runs for them after it commits."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.awards: list[Award] = []
        self.unlocked: list[Unlocked] = []

    async def award(self, user_id: int, kind: str, idempotency_key: str, **kw: Any) -> Award | None:
        a = await insert_award(self.conn, user_id, kind, idempotency_key, **kw)
        if a is not None:
            self.awards.append(a)
        return a

    async def revoke(self, user_id: int, idempotency_key: str, **kw: Any) -> Award | None:
        """Take back the award with this key (see `insert_revocation`); the boards and the learner hear of it after
        the commit."""
        a = await insert_revocation(self.conn, user_id, idempotency_key, **kw)
        if a is not None:
            self.awards.append(a)
        return a


@asynccontextmanager
async def transaction(db: asyncpg.Pool | asyncpg.Connection, redis: Redis) -> AsyncIterator[XpTransaction]:
    """A transaction whose awards reach Redis and the rooms only once it has committed (nothing on error).

    `db` is a pool or a connection that is not inside a transaction (the commit must be ours to see)."""
    if isinstance(db, asyncpg.Pool):  # the connection goes back before Redis is called (a stalled Redis holds none)
        async with db.acquire() as conn:
            tx = XpTransaction(conn)
            async with conn.transaction():
                yield tx
    else:
        if db.is_in_transaction():
            raise RuntimeError("pass a pool or a connection outside a transaction: XP reaches Redis after commit")
        tx = XpTransaction(db)
        async with db.transaction():
            yield tx
    await settle(redis, tx.awards, tx.unlocked)


async def award_xp(db: asyncpg.Pool | asyncpg.Connection, redis: Redis, user_id: int, kind: str,
                   idempotency_key: str, *, course_id: int | None = None, pod_ids: list[int] | None = None,
                   at: datetime | None = None, points: int | None = None,
                   meta: dict[str, Any] | None = None) -> Award | None:
    """Award XP on its own, then update the boards and publish. None: duplicate or not a learner.

    The ledger row, the totals and the achievements it unlocks are one statement (its own transaction: one
    round trip)."""
    kw: dict[str, Any] = dict(course_id=course_id, pod_ids=pod_ids, at=at, points=points, meta=meta,
                              async_commit=ASYNC_COMMIT)
    if isinstance(db, asyncpg.Pool):  # the connection goes back before Redis is called (a stalled Redis holds none)
        async with db.acquire() as conn:
            award = await insert_award(conn, user_id, kind, idempotency_key, **kw)
    else:
        if db.is_in_transaction():
            raise RuntimeError("inside a transaction use xp.transaction(): XP reaches Redis only after the commit")
        award = await insert_award(db, user_id, kind, idempotency_key, **kw)
    if award is not None:
        await settle(redis, [award])
    return award


# Tenants whose boards missed an award of this process (Redis did not answer, or failed the update: a restart under
# running servers, which no startup check sees): checked against the ledger, and rebuilt where they differ, as soon as
# Redis answers again (`repair_missed_soon`: each server's hub tick, each worker's loop), not at the hourly check.
MISSED_TENANTS: set[int] = set()
_repairing: asyncio.Task | None = None


def repair_missed_soon(pool: asyncpg.Pool, redis: Redis) -> None:
    """Start `repair_missed` in the background unless nothing was missed or a repair is running."""
    global _repairing
    if MISSED_TENANTS and (_repairing is None or _repairing.done()):
        _repairing = asyncio.create_task(repair_missed(pool, redis))


async def stop_repair(timeout: float = 5.0) -> None:
    """At a stop, before the pool closes: end a repair in flight (a rebuild it started takes its building flag and
    temporary boards down as it ends). The tenants stay listed; the hourly check sees them if no repair follows."""
    if _repairing is not None and not _repairing.done():
        await cancel_and_wait(_repairing, timeout=timeout, every=1.0)


async def repair_missed(pool: asyncpg.Pool, redis: Redis) -> bool:
    """Check the boards of the tenants whose updates this process missed, and rebuild them if they differ from the
    ledger; True when done (the tenants are forgotten), False when Redis or Postgres still fail (kept for later)."""
    if not MISSED_TENANTS:
        return False
    tenants = sorted(MISSED_TENANTS)
    try:
        await redis.ping()
        await leaderboard_rebuild.check_and_repair(pool, redis, tenant_ids=tenants)
    except Exception as exc:  # noqa: BLE001 - still out of reach: the next tick tries again (a line, not a traceback
        # every second of an outage)
        logger.info("leaderboards that missed updates are not repaired yet: %s", type(exc).__name__)
        return False
    MISSED_TENANTS.difference_update(tenants)
    logger.info("leaderboards of tenants %s that missed updates were checked against the ledger", tenants)
    return True


async def settle(redis: Redis, awards: list[Award], unlocked: list[Unlocked] = ()) -> None:  # type: ignore[assignment]
    """After commit: bump the boards, tell the learner (`xp.awarded`) and announce what each award unlocked
    (one Redis round trip per batch); announce changed boards; publish achievements unlocked on their own.
    Failures are logged: the ledger is the truth and a rebuild (startup check, hourly check, CLI) restores the
    boards."""
    if not awards and not unlocked:
        return
    names = {a.user_id: a.name for a in awards}
    if awards:
        try:
            await leaderboards.apply(redis, [a.entry() for a in awards], [
                [(events_channel(user_topic(a.user_id)), _note(a))] + _unlock_notes(a.unlocked, names) for a in awards])
        except Exception:  # noqa: BLE001
            MISSED_TENANTS.update(a.tenant_id for a in awards)
            logger.warning("could not update leaderboards; they are checked against the ledger once Redis answers",
                           exc_info=True)
    notes = _unlock_notes(list(unlocked), names)
    if notes:  # the learner and each of their rooms, in one round trip
        try:
            async with redis.pipeline(transaction=False) as pipe:
                for channel, payload in notes:
                    pipe.publish(channel, payload)
                await pipe.execute()
        except Exception:  # noqa: BLE001 - the unlock is stored; only the nudge is lost
            logger.warning("could not announce unlocked achievements", exc_info=True)


def _note(a: Award) -> bytes:
    """What the learner hears of an award (`xp.awarded`) or of a take-back (`xp.revoked`)."""
    if a.revokes is not None:
        return encode(XpRevoked(user_id=a.user_id, kind=a.revokes, points=-a.points, xp=a.xp, level=a.level,
                                course_id=a.course_id))
    return encode(XpAwarded(user_id=a.user_id, kind=a.kind, points=a.points, xp=a.xp, level=a.level,
                            level_up=a.level > a.previous_level, course_id=a.course_id))


def _unlock_notes(unlocked: list[Unlocked], names: dict[int, str]) -> list[tuple[str, bytes]]:
    """`achievement.unlocked` for the learner and for each of their rooms: (channel, payload) pairs."""
    notes = []
    for u in unlocked:
        who = UserRef(id=u.user_id, name=u.name or names.get(u.user_id, ""), role="learner")
        for topic, room in [(user_topic(u.user_id), None)] + [(room_topic(r), r) for r in u.rooms]:
            notes.append((events_channel(topic), encode(AchievementUnlocked(
                user=who, achievement=u.achievement.info(), unlocked_at=u.unlocked_at, room=room))))
    return notes


async def totals(conn: asyncpg.Connection, user_id: int) -> tuple[int, dict[str, int]]:
    row = await conn.fetchrow("SELECT xp, counts FROM xp_totals WHERE user_id = $1", user_id)
    return (int(row["xp"]), dict(row["counts"])) if row else (0, {})


async def history(conn: asyncpg.Connection, user_id: int, limit: int, before_id: int | None) -> list[asyncpg.Record]:
    """The learner's ledger, newest first."""
    return await conn.fetch(
        """SELECT id, kind, points, idempotency_key, course_id, at FROM xp_events
           WHERE user_id = $1 AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3""",
        user_id, before_id, limit)
