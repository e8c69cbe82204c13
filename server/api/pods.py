"""Pods: /api/v1/courses/{id}/pods, /api/v1/pods/{id}[/members], /api/v1/me/pods."""
from __future__ import annotations

import asyncpg
from litestar import Controller, Request, delete, get, post
from litestar.response import Response

from agents import matcher
from server.api.paging import ListLimit, Offset
from server.api.room_schemas import Member, MemberIn, Pod, PodIn
from server.auth import AuthUser, staff_only
from server.decode import person_name, read_json
from server.errors import ApiError
from store import courses as courses_repo
from store import leaderboard_rebuild, leaderboards, moderation
from store import pods as repo


def to_pod(row: asyncpg.Record) -> Pod:
    return Pod(id=row["id"], course_id=row["course_id"], name=row["name"], room=f"pod:{row['id']}",
               created_at=row["created_at"], members=row.get("members"), places_taken=row.get("places_taken"),
               course_title=row.get("course_title"))


async def _pod_or_404(conn: asyncpg.Connection, pod_id: int, user: AuthUser) -> asyncpg.Record:
    """Staff of the tenant see every pod; learners only the pods they are in."""
    pod = await repo.pod_in_tenant(conn, pod_id, user.tenant_id)
    if pod is None or (not user.is_staff and not await repo.is_member(conn, pod_id, user.id)):
        raise ApiError(404, f"pod {pod_id} not found")
    return pod


class PodController(Controller):
    path = "/api/v1"
    tags = ["pods"]

    @post("/courses/{course_id:int}/pods", guards=[staff_only], status_code=201)
    async def create(self, request: Request, course_id: int) -> Pod:
        data = await read_json(request, PodIn)
        user: AuthUser = request.user
        name = person_name(data.name, "name")  # (as user names: no bidi override or zero-width look-alikes)
        async with request.app.state.pool.acquire() as conn:
            course = await courses_repo.visible_course(conn, course_id, user.id, user.tenant_id, user.role)
            if course is None:
                raise ApiError(404, f"course {course_id} not found")
            return to_pod({**dict(await repo.create_pod(conn, course_id, name, user.id)),
                           "course_title": course["title"]})

    @get("/courses/{course_id:int}/pods")
    async def list_for_course(self, request: Request, course_id: int,
                              limit: int = ListLimit, offset: int = Offset) -> list[Pod]:
        """Staff: every pod of the course; learners: their own pods in it."""
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            if await courses_repo.visible_course(conn, course_id, user.id, user.tenant_id, user.role) is None:
                raise ApiError(404, f"course {course_id} not found")
            if user.is_staff:
                return [to_pod(r) for r in await repo.list_course_pods(conn, course_id, limit=limit, offset=offset)]
            return [to_pod(r) for r in await repo.pods_of_user(conn, user.id, course_id=course_id, limit=limit,
                                                               offset=offset)]

    @get("/pods/{pod_id:int}")
    async def read(self, request: Request, pod_id: int) -> Pod:
        async with request.app.state.pool.acquire() as conn:
            return to_pod(await _pod_or_404(conn, pod_id, request.user))

    @delete("/pods/{pod_id:int}", guards=[staff_only], status_code=204)
    async def remove(self, request: Request, pod_id: int) -> None:
        async with request.app.state.pool.acquire() as conn:
            await _pod_or_404(conn, pod_id, request.user)
            await repo.delete_pod(conn, pod_id)
        await moderation.close_rooms(request.app.state.redis, [f"pod:{pod_id}"])
        await leaderboards.drop_boards(request.app.state.redis, [("pod", pod_id)])

    @post("/pods/{pod_id:int}/members", guards=[staff_only], status_code=201)
    async def add_member(self, request: Request, pod_id: int) -> Response[Member]:
        """Add an enrolled learner of the pod's course (201; 200 when already a member)."""
        data = await read_json(request, MemberIn)
        async with request.app.state.pool.acquire() as conn:
            pod = await _pod_or_404(conn, pod_id, request.user)
            target = await conn.fetchrow("SELECT id, name, role, tenant_id FROM users WHERE id = $1", data.user_id)
            if target is None or target["tenant_id"] != request.user.tenant_id:
                raise ApiError(404, f"user {data.user_id} not found", field="user_id")
            if target["role"] in ("instructor", "admin"):  # (they see every pod already; enrolling them is a 400 too)
                raise ApiError(400, f"user {data.user_id} is staff: instructors and admins see every pod already; "
                               "members are learners (and bots bridging the pod's room)", field="user_id")
            if not await courses_repo.is_enrolled(conn, pod["course_id"], data.user_id):
                await _pod_or_404(conn, pod_id, request.user)  # the course (and pod) deleted meanwhile: 404
                raise ApiError(409, f"user {data.user_id} is not enrolled in course {pod['course_id']}",
                               code="not_enrolled", field="user_id")
            try:
                created = await repo.add_member(conn, pod_id, data.user_id)
            except repo.PodFull as exc:
                raise ApiError(409, str(exc), code="pod_full", field="user_id") from exc
            row = await repo.member(conn, pod_id, data.user_id)
        if row is None:  # the pod deleted, or the user removed or gone from the course, at this very moment
            async with request.app.state.pool.acquire() as conn:
                if await repo.pod_in_tenant(conn, pod_id, request.user.tenant_id) is None:
                    raise ApiError(404, f"pod {pod_id} not found")
            raise ApiError(409, f"user {data.user_id} left the pod or the course meanwhile", code="invalid_state")
        if created:  # on the pod's boards with the XP earned in it before
            state = request.app.state
            await leaderboard_rebuild.resync_member(state.pool, state.redis, data.user_id, pod["course_id"])
            if row["role"] == "learner":  # into the pod's current round (not alone until next week)
                matcher.after_joining_soon(state.pool, state.redis, state.settings, data.user_id, pod_id=pod_id)
        return Response(Member(user_id=row["user_id"], name=row["name"], role=row["role"], created_at=row["created_at"]),
                        status_code=201 if created else 200)

    @delete("/pods/{pod_id:int}/members/{user_id:int}", status_code=204)
    async def remove_member(self, request: Request, pod_id: int, user_id: int) -> None:
        """Staff remove anyone; a member may leave."""
        user: AuthUser = request.user
        if not user.is_staff and user_id != user.id:
            raise ApiError(403, "learners can only leave a pod themselves")
        async with request.app.state.pool.acquire() as conn:
            # a learner who left the course may still leave its pod (their row would count again on re-enrolling)
            pod = await repo.pod_in_tenant(conn, pod_id, user.tenant_id)
            if pod is None:
                raise ApiError(404, f"pod {pod_id} not found")
            if not await repo.remove_member(conn, pod_id, user_id):
                raise ApiError(404, f"user {user_id} is not a member" if user.is_staff else f"pod {pod_id} not found")
            await moderation.revoke_access(conn, request.app.state.redis, user_id, pod_id=pod_id)
        state = request.app.state
        await leaderboard_rebuild.resync_member(state.pool, state.redis, user_id, pod["course_id"])
        matcher.after_leaving_soon(state.pool, state.redis, state.settings, user_id, pod_id=pod_id)

    @get("/pods/{pod_id:int}/members")
    async def members(self, request: Request, pod_id: int,
                      limit: int = ListLimit, offset: int = Offset) -> list[Member]:
        async with request.app.state.pool.acquire() as conn:
            await _pod_or_404(conn, pod_id, request.user)
            rows = await repo.list_members(conn, pod_id, departed=request.user.is_staff, limit=limit, offset=offset)
        return [Member(user_id=r["user_id"], name=r["name"], role=r["role"], created_at=r["created_at"],
                       departed=r["departed"]) for r in rows]

    @get("/me/pods")
    async def mine(self, request: Request, limit: int = ListLimit, offset: int = Offset) -> list[Pod]:
        async with request.app.state.pool.acquire() as conn:
            return [to_pod(r) for r in await repo.pods_of_user(conn, request.user.id, limit=limit, offset=offset)]
