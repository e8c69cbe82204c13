"""Courses and enrollments: /api/v1/courses."""
from __future__ import annotations

import logging

import asyncpg
import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.response import Response

from agents import matcher
from server.api.paging import Offset, PageLimit
from server.api.schemas import Course, CourseIn, CourseList, CoursePatch, EnrollIn, Enrollment, EnrollmentList
from server.auth import AuthUser, staff_only
from server.decode import decode_json, read_body, read_json, trimmed
from server.errors import ApiError
from store import courses as repo
from store import leaderboard_rebuild, leaderboards, moderation
from store.videos import upload_path

logger = logging.getLogger(__name__)


def to_course(row: asyncpg.Record) -> Course:
    standing = "enrolled" in row.keys()  # a catalog read: the caller's standing with it
    enrolled = bool(row["enrolled"]) if standing else False
    return Course(id=row["id"], title=row["title"], description=row["description"], published=row["published"],
                  price_cents=row["price_cents"], owner_id=row["owner_id"], created_at=row["created_at"],
                  updated_at=row["updated_at"], enrolled=enrolled,
                  payment_required=standing and not enrolled and row["price_cents"] > 0 and not row["may_join"])


async def listed_or_404(conn: asyncpg.Connection, course_id: int, user: AuthUser) -> asyncpg.Record:
    """The course as the catalog shows it to `user` (a paid published course too, whose content they cannot see
    before they have access); 404 otherwise."""
    row = await repo.listed_course(conn, course_id, user.id, user.tenant_id, user.role)
    if row is None:
        raise ApiError(404, f"course {course_id} not found")
    return row


async def course_or_404(conn: asyncpg.Connection, course_id: int, user: AuthUser, *,
                        missing: str | None = None) -> asyncpg.Record:
    """The course if `user` may see it; 404 otherwise, so other tenants learn nothing. `missing`: the 404's
    message when the course is that of an object the caller asked for (it must not name the course)."""
    row = await repo.visible_course(conn, course_id, user.id, user.tenant_id, user.role)
    if row is None:
        raise ApiError(404, missing or f"course {course_id} not found")
    return row


class CourseController(Controller):
    path = "/api/v1/courses"
    tags = ["courses"]

    @post("/", guards=[staff_only], status_code=201)
    async def create(self, request: Request) -> Course:
        data = await read_json(request, CourseIn)
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            row = await repo.create_course(conn, user.tenant_id, user.id, trimmed(data.title, "title"),
                                           data.description, data.published, data.price_cents)
        logger.info("course created", extra={"fields": {"course_id": row["id"], "user_id": user.id}})
        return to_course(row)

    @get("/")
    async def list_courses(self, request: Request, limit: int = PageLimit, offset: int = Offset) -> CourseList:
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            rows = await repo.list_catalog(conn, user.id, user.tenant_id, user.role, limit, offset)
        return CourseList(items=[to_course(r) for r in rows], limit=limit, offset=offset)

    @get("/{course_id:int}")
    async def read(self, request: Request, course_id: int) -> Course:
        async with request.app.state.pool.acquire() as conn:
            return to_course(await listed_or_404(conn, course_id, request.user))

    @patch("/{course_id:int}", guards=[staff_only])
    async def update(self, request: Request, course_id: int) -> Course:
        data = await read_json(request, CoursePatch)
        changes = {k: v for k, v in msgspec.structs.asdict(data).items() if v is not msgspec.UNSET}
        if "title" in changes:
            changes["title"] = trimmed(changes["title"], "title")
        async with request.app.state.pool.acquire() as conn:
            row = await repo.update_course(conn, course_id, request.user.tenant_id, changes)
        if row is None:
            raise ApiError(404, f"course {course_id} not found")
        return to_course(row)

    @delete("/{course_id:int}", guards=[staff_only], status_code=204)
    async def remove(self, request: Request, course_id: int) -> None:
        async with request.app.state.pool.acquire() as conn:
            gone = await repo.delete_course(conn, course_id, request.user.tenant_id)
        if gone is None:
            raise ApiError(404, f"course {course_id} not found")
        await moderation.close_rooms(request.app.state.redis, gone.rooms)
        await leaderboards.drop_boards(request.app.state.redis, [("course", course_id)] + [
            ("pod", int(r.split(":")[1])) for r in gone.rooms if r.startswith("pod:")])
        for ref in gone.files:  # committed: the uploads go too (a crash here leaves files, never a dangling row)
            upload_path(request.app.state.settings.data_dir, ref).unlink(missing_ok=True)

    @post("/{course_id:int}/enrollments", status_code=201)
    async def enroll(self, request: Request, course_id: int) -> Response[Enrollment]:
        raw = await read_body(request)  # the API's body limit, not the upload limit
        data = decode_json(raw, EnrollIn) if raw.strip() else EnrollIn()
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            await listed_or_404(conn, course_id, user)  # a paid course a learner has no access to yet: 402 below
            if user.is_staff:
                if data.user_id is None:
                    raise ApiError(400, "user_id is required", field="user_id")
                target = await conn.fetchrow("SELECT id, tenant_id, role FROM users WHERE id = $1", data.user_id)
                if target is None or target["tenant_id"] != user.tenant_id:
                    raise ApiError(404, f"user {data.user_id} not found", field="user_id")
                if target["role"] in ("instructor", "admin"):  # (enrolled, they counted as pod members and voters)
                    raise ApiError(400, f"an {target['role']} of the tenant sees every course already; only learners "
                                        "(and bots bridging a pod's room) are enrolled", field="user_id")
            elif user.role == "learner":
                if data.user_id not in (None, user.id):
                    raise ApiError(403, "learners can only enroll themselves", field="user_id")
            else:
                raise ApiError(403, "bots cannot enroll")
            target_id = data.user_id or user.id
            async with conn.transaction():
                if user.role == "learner":
                    # the course as it is now, kept so until the enrollment commits: a change making it paid or a
                    # draft (read as free and published above) waits for it, or is seen here
                    now = await conn.fetchrow(
                        """SELECT c.published, c.price_cents, EXISTS (SELECT 1 FROM course_access a
                               WHERE a.course_id = c.id AND a.user_id = $2) AS has_access
                           FROM courses c WHERE c.id = $1 FOR SHARE""", course_id, user.id)
                    enrolled = now is not None and await repo.is_enrolled(conn, course_id, user.id)
                    if now is None or (not now["published"] and not enrolled):
                        raise ApiError(404, f"course {course_id} not found")
                    if now["price_cents"] > 0 and not enrolled and not now["has_access"]:
                        raise ApiError(402, "this course is paid; purchase it to enroll", code="payment_required")
                row, created = await repo.enroll(conn, course_id, target_id)
            name_role = await conn.fetchrow("SELECT name, role FROM users WHERE id = $1", target_id)
        if created and name_role["role"] == "learner":  # back on the course's boards with XP earned there before
            state = request.app.state
            await leaderboard_rebuild.resync_member(state.pool, state.redis, target_id, course_id)
            # back in the course of pods they are still in: into their current rounds (not alone until next week)
            matcher.after_joining_soon(state.pool, state.redis, state.settings, target_id, course_id=course_id)
        return Response(
            Enrollment(user_id=target_id, name=name_role["name"], role=name_role["role"], created_at=row["created_at"]),
            status_code=201 if created else 200,
        )

    @get("/{course_id:int}/enrollments", guards=[staff_only])
    async def enrollments(self, request: Request, course_id: int, limit: int = PageLimit,
                          offset: int = Offset) -> EnrollmentList:
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, request.user)
            rows = await repo.list_enrollments(conn, course_id, limit, offset)
        return EnrollmentList(items=[Enrollment(user_id=r["user_id"], name=r["name"], role=r["role"],
                                                created_at=r["created_at"]) for r in rows], limit=limit, offset=offset)

    @delete("/{course_id:int}/enrollments/{user_id:int}", status_code=204)
    async def unenroll(self, request: Request, course_id: int, user_id: int) -> None:
        user: AuthUser = request.user
        if not user.is_staff and user_id != user.id:
            raise ApiError(403, "learners can only remove their own enrollment")
        async with request.app.state.pool.acquire() as conn:
            await course_or_404(conn, course_id, user)
            if not await repo.unenroll(conn, course_id, user_id, revoke=user_id != user.id):
                raise ApiError(404, f"user {user_id} is not enrolled")
            await moderation.revoke_access(conn, request.app.state.redis, user_id, course_id=course_id)
        state = request.app.state
        await leaderboard_rebuild.resync_member(state.pool, state.redis, user_id, course_id)
        matcher.after_leaving_soon(state.pool, state.redis, state.settings, user_id, course_id=course_id)
