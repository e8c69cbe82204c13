"""Pods: small groups inside a course with their own room (`pod:<id>`). Members must be enrolled."""
from __future__ import annotations

import asyncpg

_COLS = "p.id, p.course_id, p.name, p.created_by, p.created_at"


async def create_pod(conn: asyncpg.Connection, course_id: int, name: str, by: int) -> asyncpg.Record:
    return await conn.fetchrow(
        f"INSERT INTO pods AS p (course_id, name, created_by) VALUES ($1, $2, $3) RETURNING {_COLS}",
        course_id, name, by)


async def pod_in_tenant(conn: asyncpg.Connection, pod_id: int, tenant_id: int) -> asyncpg.Record | None:
    """The pod if its course belongs to the tenant (else None: other tenants learn nothing)."""
    return await conn.fetchrow(
        f"SELECT {_COLS}, c.title AS course_title FROM pods p JOIN courses c ON c.id = p.course_id "
        "WHERE p.id = $1 AND c.tenant_id = $2",
        pod_id, tenant_id)


async def list_course_pods(conn: asyncpg.Connection, course_id: int, *,
                           limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"""SELECT {_COLS}, (SELECT count(*) FROM pod_members m JOIN enrollments e ON e.user_id = m.user_id
                             AND e.course_id = p.course_id WHERE m.pod_id = p.id) AS members,
                   (SELECT count(*) FROM pod_members m JOIN users u ON u.id = m.user_id AND u.role = 'learner'
                    WHERE m.pod_id = p.id) AS places_taken,
                   (SELECT title FROM courses WHERE id = p.course_id) AS course_title
            FROM pods p WHERE p.course_id = $1 ORDER BY p.id LIMIT $2 OFFSET $3""", course_id, limit, offset)


async def delete_pod(conn: asyncpg.Connection, pod_id: int) -> None:
    async with conn.transaction():
        await conn.execute("DELETE FROM rooms WHERE id = $1", f"pod:{pod_id}")
        await conn.execute("DELETE FROM pods WHERE id = $1", pod_id)


# A pod is a small cohort: the matcher weighs every pair of its members.
MAX_MEMBERS = 50


class PodFull(Exception):
    pass


async def add_member(conn: asyncpg.Connection, pod_id: int, user_id: int) -> bool:
    """Add a member; False when already a member; PodFull when it has MAX_MEMBERS learners (rows of learners who
    left the course count: they come back with their enrolment; a bot bridging the pod's room takes no place: the
    matcher, the reason for the bound, never pairs it)."""
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM pods WHERE id = $1 FOR UPDATE", pod_id)  # one add at a time per pod
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pod_members WHERE pod_id = $1 AND user_id = $2)",
                               pod_id, user_id):
            return False
        taken = await conn.fetchrow(
            """SELECT count(*) AS n, count(*) FILTER (WHERE e.user_id IS NULL) AS departed
               FROM pod_members m JOIN pods p ON p.id = m.pod_id
               JOIN users u ON u.id = m.user_id AND u.role = 'learner'
               LEFT JOIN enrollments e ON e.course_id = p.course_id AND e.user_id = m.user_id
               WHERE m.pod_id = $1""", pod_id)
        if taken["n"] >= MAX_MEMBERS and await conn.fetchval("SELECT role = 'learner' FROM users WHERE id = $1",
                                                             user_id):
            held = (f"; {taken['departed']} of the places are held by learners who left the course (listed to staff "
                    "with `departed`): remove them to free their places" if taken["departed"] else "")
            raise PodFull(f"pod {pod_id} is full ({MAX_MEMBERS} members{held})")
        row = await conn.fetchrow(
            "INSERT INTO pod_members (pod_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING user_id",
            pod_id, user_id)
    return row is not None


async def remove_member(conn: asyncpg.Connection, pod_id: int, user_id: int) -> bool:
    row = await conn.fetchrow(
        "DELETE FROM pod_members WHERE pod_id = $1 AND user_id = $2 RETURNING user_id", pod_id, user_id)
    return row is not None


# Members with access: a learner who left the course keeps their row (it counts again once they re-enrol)
# but is not listed or counted meanwhile, as for the pod's room.
_MEMBERS = """SELECT m.user_id, u.name, u.role, m.created_at FROM pod_members m JOIN users u ON u.id = m.user_id
              JOIN pods p ON p.id = m.pod_id JOIN enrollments e ON e.course_id = p.course_id AND e.user_id = m.user_id
              WHERE m.pod_id = $1"""


async def is_member(conn: asyncpg.Connection, pod_id: int, user_id: int) -> bool:
    """A member with access: in the pod and still enrolled in its course (as for the pod's room)."""
    return await member(conn, pod_id, user_id) is not None


async def list_members(conn: asyncpg.Connection, pod_id: int, *, departed: bool = False,
                       limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    """Members with access; with `departed` (for staff) also those who left the course, flagged `departed`: their
    places stay taken, and staff can only free a place they can see."""
    return await conn.fetch(
        """SELECT m.user_id, u.name, u.role, m.created_at, e.user_id IS NULL AS departed
           FROM pod_members m JOIN users u ON u.id = m.user_id JOIN pods p ON p.id = m.pod_id
           LEFT JOIN enrollments e ON e.course_id = p.course_id AND e.user_id = m.user_id
           WHERE m.pod_id = $1 AND ($4 OR e.user_id IS NOT NULL)
           ORDER BY m.created_at, m.user_id LIMIT $2 OFFSET $3""", pod_id, limit, offset, departed)


async def member(conn: asyncpg.Connection, pod_id: int, user_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"{_MEMBERS} AND m.user_id = $2", pod_id, user_id)


async def pods_of_user(conn: asyncpg.Connection, user_id: int, *, course_id: int | None = None,
                       limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    """The pods a user belongs to (in courses they are still enrolled in; in one course with `course_id`)."""
    return await conn.fetch(
        f"""SELECT {_COLS}, c.title AS course_title FROM pod_members m JOIN pods p ON p.id = m.pod_id
            JOIN courses c ON c.id = p.course_id
            JOIN enrollments e ON e.course_id = p.course_id AND e.user_id = m.user_id
            WHERE m.user_id = $1 AND ($2::bigint IS NULL OR p.course_id = $2)
            ORDER BY p.id LIMIT $3 OFFSET $4""", user_id, course_id, limit, offset)
