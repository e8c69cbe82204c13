"""Courses and enrollments. Visibility rules live here, as SQL, so every caller applies the same ones."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from store.db import LONG_S

_COLS = "c.id, c.tenant_id, c.owner_id, c.title, c.description, c.published, c.price_cents, c.created_at, c.updated_at"

# Who sees a course: staff (instructor/admin/bot) of its tenant; learners enrolled in it, or of its
# tenant when it is published and free.
_VISIBLE = """
  c.tenant_id = $2 AND (
    $3 IN ('instructor', 'admin', 'bot')
    OR EXISTS (SELECT 1 FROM enrollments e WHERE e.course_id = c.id AND e.user_id = $1)
    OR (c.published AND c.price_cents = 0))
"""
# SQL: whether learner {user} may see course {course} (as `_VISIBLE` has it for a learner: enrolled, or the course is
# published and free), for queries about learners other than the caller.
LEARNER_SEES_SQL = ("(EXISTS (SELECT 1 FROM enrollments see_e WHERE see_e.course_id = {course} "
                    "AND see_e.user_id = {user}) OR EXISTS (SELECT 1 FROM courses see_c WHERE see_c.id = {course} "
                    "AND see_c.published AND see_c.price_cents = 0))")


async def create_course(conn: asyncpg.Connection, tenant_id: int, owner_id: int, title: str,
                        description: str, published: bool, price_cents: int) -> asyncpg.Record:
    return await conn.fetchrow(
        f"""INSERT INTO courses AS c (tenant_id, owner_id, title, description, published, price_cents)
            VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLS}""",
        tenant_id, owner_id, title, description, published, price_cents,
    )


# Who finds a course in the catalog (its title, description and price; not its content): who sees it, and the
# tenant's learners when it is published, paid or not (a paid one answers 402 to their enrollment until they have
# access: `course_access`).
_LISTED = """
  c.tenant_id = $2 AND (
    $3 IN ('instructor', 'admin', 'bot')
    OR c.published
    OR EXISTS (SELECT 1 FROM enrollments e WHERE e.course_id = c.id AND e.user_id = $1))
"""
# Whether the user ($1, role $3) is enrolled in the course (c), and whether they may enroll themselves in it now (a
# learner: published, and free or with access; staff and bots see every course without paying).
_STANDING = """EXISTS (SELECT 1 FROM enrollments e WHERE e.course_id = c.id AND e.user_id = $1) AS enrolled,
  ($3 <> 'learner' OR c.published AND (c.price_cents = 0 OR EXISTS (SELECT 1 FROM course_access a
                                          WHERE a.course_id = c.id AND a.user_id = $1))) AS may_join"""


async def listed_course(conn: asyncpg.Connection, course_id: int, user_id: int, tenant_id: int,
                        role: str) -> asyncpg.Record | None:
    """The course as the catalog shows it to this user (with `enrolled`, `may_join`), else None."""
    return await conn.fetchrow(f"SELECT {_COLS}, {_STANDING} FROM courses c WHERE c.id = $4 AND {_LISTED}",
                               user_id, tenant_id, role, course_id)


async def visible_course(conn: asyncpg.Connection, course_id: int, user_id: int, tenant_id: int,
                         role: str) -> asyncpg.Record | None:
    """The course if this user may see it, else None (callers answer 404: existence is not leaked)."""
    return await conn.fetchrow(
        f"SELECT {_COLS} FROM courses c WHERE c.id = $4 AND {_VISIBLE}", user_id, tenant_id, role, course_id
    )


async def list_catalog(conn: asyncpg.Connection, user_id: int, tenant_id: int, role: str,
                       limit: int, offset: int) -> list[asyncpg.Record]:
    """The courses the user finds in the catalog (`_LISTED`), with their standing (`enrolled`, `may_join`)."""
    return await conn.fetch(
        f"SELECT {_COLS}, {_STANDING} FROM courses c WHERE {_LISTED} ORDER BY c.id LIMIT $4 OFFSET $5",
        user_id, tenant_id, role, limit, offset,
    )


async def update_course(conn: asyncpg.Connection, course_id: int, tenant_id: int,
                        changes: dict[str, Any]) -> asyncpg.Record | None:
    allowed = ("title", "description", "published", "price_cents")
    cols = [k for k in allowed if k in changes]
    sets = ", ".join(f"{k} = ${i + 3}" for i, k in enumerate(cols))
    sets = (sets + ", " if sets else "") + "updated_at = now()"
    return await conn.fetchrow(
        f"UPDATE courses c SET {sets} WHERE c.id = $1 AND c.tenant_id = $2 RETURNING {_COLS}",
        course_id, tenant_id, *[changes[k] for k in cols],
    )


@dataclass(frozen=True, slots=True)
class Deleted:
    files: list[str]  # uploads its videos kept, for the caller to remove once the deletion has committed
    rooms: list[str]  # its rooms (course, pods, live sessions), whose open sockets the caller closes


async def delete_course(conn: asyncpg.Connection, course_id: int, tenant_id: int) -> Deleted | None:
    """Delete the course (its videos, chunks, pods, sessions, rooms… cascade); None when there is no such
    course. The course row is locked first, so no pod or session is added unseen meanwhile."""
    async with conn.transaction():
        if await conn.fetchval("SELECT id FROM courses WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
                               course_id, tenant_id) is None:
            return None
        files = await conn.fetch("SELECT file_path FROM videos WHERE course_id = $1 AND file_path IS NOT NULL",
                                 course_id)
        rooms = await conn.fetch(
            """SELECT 'pod:' || id AS room FROM pods WHERE course_id = $1
               UNION ALL SELECT 'live:' || id FROM live_sessions WHERE course_id = $1""", course_id)
        # the questions of answers under way in it go back to their askers' daily quota: the holds that record them
        # go with the course (the answer cannot be stored now), and the answering process, finding none, gave
        # nothing back (a learner lost a question of their whole day)
        await conn.execute(
            """WITH held AS (SELECT user_id, reserved FROM tutor_pending WHERE course_id = $1 FOR UPDATE),
                    n AS (SELECT user_id, reserved, count(*) AS n FROM held WHERE reserved IS NOT NULL
                          GROUP BY user_id, reserved)
               UPDATE tutor_quota q SET used = greatest(q.used - n.n, 0)
               FROM n WHERE q.user_id = n.user_id AND q.day = n.reserved""", course_id)
        await conn.execute("DELETE FROM courses WHERE id = $1", course_id, timeout=LONG_S)  # (a cascade over all of it)
    return Deleted([r["file_path"] for r in files], [f"course:{course_id}"] + [r["room"] for r in rooms])


async def is_enrolled(conn: asyncpg.Connection, course_id: int, user_id: int) -> bool:
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM enrollments WHERE course_id = $1 AND user_id = $2)", course_id, user_id))


async def enroll(conn: asyncpg.Connection, course_id: int, user_id: int) -> tuple[asyncpg.Record, bool]:
    """Enroll; returns (enrollment, created). Enrolling twice is not an error. In a paid course the learner gets
    access (`course_access`) too: leaving does not take it, so they may enroll again themselves."""
    # The course's key first (in the caller's transaction), as a deletion takes the course, then its enrollments: the
    # access row's insert after the existing enrollment's lock deadlocked with one (audit).
    await conn.execute("SELECT 1 FROM courses WHERE id = $1 FOR KEY SHARE", course_id)
    # One statement (a leave landing between an insert and a re-read cannot leave nothing to return); xmax is 0
    # on a row this statement inserted, not on one it found.
    row = await conn.fetchrow(
        """WITH access AS (
               INSERT INTO course_access (course_id, user_id)
               SELECT c.id, $2 FROM courses c WHERE c.id = $1 AND c.price_cents > 0
               ON CONFLICT DO NOTHING)
           INSERT INTO enrollments AS e (course_id, user_id) VALUES ($1, $2)
           ON CONFLICT (course_id, user_id) DO UPDATE SET course_id = e.course_id
           RETURNING course_id, user_id, created_at, xmax = 0 AS created""",
        course_id, user_id,
    )
    return row, row["created"]


async def unenroll(conn: asyncpg.Connection, course_id: int, user_id: int, *, revoke: bool = False) -> bool:
    """Remove the enrollment; `revoke` (staff removing a learner) takes their access to a paid course too, so they
    cannot enroll again themselves (a learner who leaves keeps it), also from a learner who already left (a refund
    after they left). False when there was neither to remove."""
    row = await conn.fetchrow(
        """WITH gone AS (DELETE FROM enrollments WHERE course_id = $1 AND user_id = $2 RETURNING user_id),
           access AS (DELETE FROM course_access WHERE $3 AND course_id = $1 AND user_id = $2 RETURNING user_id)
           SELECT user_id FROM gone UNION ALL SELECT user_id FROM access LIMIT 1""",
        course_id, user_id, revoke)
    return row is not None


async def list_enrollments(conn: asyncpg.Connection, course_id: int, limit: int, offset: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT e.user_id, u.name, u.role, e.created_at FROM enrollments e JOIN users u ON u.id = e.user_id
           WHERE e.course_id = $1 ORDER BY e.created_at, e.user_id LIMIT $2 OFFSET $3""",
        course_id, limit, offset,
    )
