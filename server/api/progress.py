"""Progress, XP and achievements: /api/v1/videos/{id}/progress, /courses/{id}/progress, bookmarks,
/me/stats, /me/xp, /me/achievements, /achievements, and marking a room message helpful."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone

import asyncpg
from litestar import Controller, Litestar, Request, delete, get, patch, post
from litestar.params import Parameter
from litestar.response import Response
from msgspec import UNSET

from server.api.paging import ListLimit, Offset
from server.api.progress_schemas import (AchievementOut, Bookmark, BookmarkIn, BookmarkPatch, CourseProgress,
                                         CourseVideoProgress, HelpfulMark, ProgressIn, ReplyCheck, Stats, StreakOut,
                                         VideoProgress, XpEvent)
from server.api.rooms import room_or_404
from server.auth import AuthUser
from server.decode import read_json
from server.errors import ApiError
from store import achievements, leaderboard_rebuild, leaderboards, streaks, xp
from store import courses as courses_repo
from store import progress as repo
from store.aio import cancel_and_wait
from store import replies as replies_repo
from store.xp import xp_for_level

logger = logging.getLogger(__name__)


@asynccontextmanager
async def progress_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Leaderboard startup check (rebuild from the ledger when Redis has none) and the progress rate limiter."""
    state = app.state
    leaderboards.EVENT_WINDOW_S = state.settings.leaderboard_event_s
    xp.ASYNC_COMMIT = state.settings.xp_async_commit
    state.progress_limiter = repo.progress_limiter(state.redis, state.settings.progress_rate,
                                                   state.settings.progress_burst)
    state.lb_rebuild = None
    try:
        done = await leaderboard_rebuild.ensure_built(state.pool, state.redis)
        if done is not None:
            logger.info("leaderboards rebuilt at startup: %d boards in %.2f s", done.boards, done.seconds)
    except Exception:  # noqa: BLE001 - serve anyway; reads will ask for a rebuild again
        logger.exception("leaderboard startup check failed")
    yield
    state.lb_rebuild_stopped = True  # none started after this (a hub tick before the hub stops)
    task = state.lb_rebuild
    if task is not None and not task.done():  # ended before the pool closes (which waits for its connection)
        await cancel_and_wait(task, timeout=REBUILD_STOP_S, every=1.0)  # (its cleanup: a few Redis calls)


REBUILD_STOP_S = 5.0  # how long a stopping server waits for a rebuild under way to end


async def video_or_404(conn: asyncpg.Connection, video_id: int, user: AuthUser) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT id, course_id, title, duration_s, status, source FROM videos WHERE id = $1",
                              video_id)
    if row is None or await courses_repo.visible_course(conn, row["course_id"], user.id, user.tenant_id,
                                                        user.role) is None:
        raise ApiError(404, f"video {video_id} not found")
    return row


def _video_progress(video: asyncpg.Record | dict, row: asyncpg.Record | None,
                    awarded: list[str] = ()) -> VideoProgress:  # type: ignore[assignment]
    duration = float(video["duration_s"] or 0.0)
    if row is None:
        return VideoProgress(video_id=video["id"], course_id=video["course_id"], duration=duration, position=0.0,
                             watched=[], watched_s=0.0, fraction=0.0, completed=False, completed_at=None,
                             time_spent_s=0.0, updated_at=None, xp_awarded=list(awarded))
    return VideoProgress(video_id=video["id"], course_id=video["course_id"], duration=duration,
                         position=row["position_s"], watched=row["watched"], watched_s=row["watched_s"],
                         fraction=min(1.0, row["watched_s"] / duration) if duration else 0.0,
                         completed=row["completed_at"] is not None, completed_at=row["completed_at"],
                         time_spent_s=row["time_spent_s"], updated_at=row["updated_at"], xp_awarded=list(awarded))


def _bookmark(row: asyncpg.Record) -> Bookmark:
    return Bookmark(id=row["id"], video_id=row["video_id"], at=row["at_s"], note=row["note"],
                    created_at=row["created_at"])


def _bookmark_at(video: asyncpg.Record, at: float) -> float:
    """A bookmark's time on the video (409 while it is not ready; 400 past its end and slack, taken as the end
    within the slack)."""
    if video["status"] != "ready" or not video["duration_s"]:  # nothing to watch, nor a length to check
        raise ApiError(409, f"video {video['id']} is not ready yet", code="not_ready")
    slack = repo.past_end_slack(video["duration_s"], video["source"])
    if at > video["duration_s"] + slack:
        limit = video["duration_s"] + slack  # (what is taken, as for a progress report's position)
        past = f", or up to {limit:g} s, taken as the end" if slack >= 1 else ""
        raise ApiError(400, f"at must be inside the video (0 to {video['duration_s']:g} s{past})", field="at")
    return min(at, video["duration_s"])


async def _bookmark_video_or_404(conn: asyncpg.Connection, bookmark_id: int, user: AuthUser) -> asyncpg.Record:
    """The video of the caller's bookmark, while they may see it; 404 otherwise."""
    video_id = await repo.bookmark_video(conn, user.id, bookmark_id)
    if video_id is None:
        raise ApiError(404, f"bookmark {bookmark_id} not found")
    try:
        return await video_or_404(conn, video_id, user)
    except ApiError as exc:
        raise ApiError(404, f"bookmark {bookmark_id} not found") from exc


async def _bookmark_write(request: Request) -> None:
    """Bookmark writes (add, change, delete) per user: repo.BOOKMARK_RATE a second after a burst; a refused one
    counts too."""
    ok, wait = await repo.bookmark_limiter(request.app.state.redis).take(request.user.id)
    if not ok:
        raise ApiError(429, f"too many bookmark changes; retry in {wait:g}s", retry_after=wait)


class ProgressController(Controller):
    path = "/api/v1"
    tags = ["progress"]

    @post("/videos/{video_id:int}/progress", status_code=200)
    async def report(self, request: Request, video_id: int) -> VideoProgress:
        """Report watching: `position` (resume point) and the `watched` ranges since the last report, in
        seconds. Positions and ranges must lie inside the video; a range must end after it starts."""
        user: AuthUser = request.user
        state = request.app.state
        # every report counts, a refused one too, also one whose body does not parse (each costs the lookups
        # below: bad reports were unlimited)
        ok, wait = await state.progress_limiter.take(user.id)
        if not ok:
            raise ApiError(429, f"too many progress reports; retry in {wait:g}s", retry_after=wait)
        data = await read_json(request, ProgressIn)
        if (data.player is None) != (data.seq is None):
            missing = "seq" if data.seq is None else "player"
            raise ApiError(400, f"{missing} is required with {'player' if missing == 'seq' else 'seq'}",
                           field=missing)
        async with state.pool.acquire() as conn:
            video = await video_or_404(conn, video_id, user)
        if video["status"] != "ready" or not video["duration_s"]:
            raise ApiError(409, f"video {video_id} is not ready yet", code="not_ready")
        try:
            duration = float(video["duration_s"])
            position, watched = repo.check_report(duration, data.position, data.watched,
                                                  repo.past_end_slack(duration, video["source"]))
        except repo.ProgressError as exc:
            raise ApiError(400, str(exc), field=exc.field) from exc
        try:
            async with xp.transaction(state.pool, state.redis) as tx:
                done = await repo.report(tx, user.id, user.role, video, position, watched,
                                         state.settings.video_complete_share, player=data.player, seq=data.seq)
        except repo.ProgressError as exc:  # nothing stored: the transaction rolled back
            raise ApiError(400, str(exc), field=exc.field) from exc
        except repo.Gone as exc:
            raise ApiError(404, str(exc)) from exc
        except repo.OverBudget as exc:  # nothing stored either: the client keeps its ranges and sends them later
            raise ApiError(429, str(exc), code="watch_budget", field="watched", retry_after=exc.wait_s) from exc
        # the length the report was stored against (a re-ingest may have shortened the video since it was read)
        return _video_progress({**video, "duration_s": done.duration}, done.row, [a.kind for a in done.awards])

    @get("/videos/{video_id:int}/progress")
    async def read(self, request: Request, video_id: int) -> VideoProgress:
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            video = await video_or_404(conn, video_id, user)
            return _video_progress(video, await repo.video_progress(conn, user.id, video_id))

    @get("/courses/{course_id:int}/progress")
    async def course(self, request: Request, course_id: int,
                     user_id: int | None = Parameter(ge=1, le=2**62, default=None),
                     limit: int = Parameter(ge=1, le=1000, default=500), offset: int = Offset) -> CourseProgress:
        """The caller's progress through the course; staff may pass `user_id` to see a learner's. The totals
        cover the whole course; `videos` is the page `offset`, `limit` of them (in the course's order)."""
        user: AuthUser = request.user
        target = user.id
        async with request.app.state.pool.acquire() as conn:
            if await courses_repo.visible_course(conn, course_id, user.id, user.tenant_id, user.role) is None:
                raise ApiError(404, f"course {course_id} not found")
            if user_id is not None and user_id != user.id:
                if not user.is_staff:
                    raise ApiError(403, "learners can only see their own progress")
                if await conn.fetchval("SELECT tenant_id FROM users WHERE id = $1", user_id) != user.tenant_id:
                    raise ApiError(404, f"user {user_id} not found")
                target = user_id
            rows = await repo.course_progress(conn, target, course_id)
        videos = [CourseVideoProgress(
            video_id=r["video_id"], title=r["title"], duration=r["duration_s"], position=r["position_s"] or 0.0,
            fraction=min(1.0, (r["watched_s"] or 0.0) / r["duration_s"]) if r["duration_s"] else 0.0,
            completed=r["completed_at"] is not None, time_spent_s=r["time_spent_s"] or 0.0, updated_at=r["updated_at"])
            for r in rows]
        done = sum(v.completed for v in videos)
        last = max((v.updated_at for v in videos if v.updated_at), default=None)
        return CourseProgress(course_id=course_id, user_id=target, completion=done / len(videos) if videos else 0.0,
                              completed_videos=done, total_videos=len(videos),
                              time_spent_s=sum((v.time_spent_s for v in videos), 0.0), last_activity_at=last,
                              videos=videos[offset:offset + limit])

    # --- bookmarks ------------------------------------------------------------------------------------

    @post("/videos/{video_id:int}/bookmarks", status_code=201)
    async def add_bookmark(self, request: Request, video_id: int) -> Bookmark:
        user: AuthUser = request.user
        await _bookmark_write(request)
        data = await read_json(request, BookmarkIn)
        async with request.app.state.pool.acquire() as conn:
            video = await video_or_404(conn, video_id, user)
            at = _bookmark_at(video, data.at)
            row = await repo.add_bookmark(conn, user.id, video_id, at, data.note)
        if row is None:
            raise ApiError(409, f"at most {repo.MAX_BOOKMARKS} bookmarks per video; delete some first",
                           code="too_many")
        return _bookmark(row)

    @patch("/bookmarks/{bookmark_id:int}")
    async def update_bookmark(self, request: Request, bookmark_id: int) -> Bookmark:
        """Change a bookmark's `at` and/or `note`."""
        user: AuthUser = request.user
        await _bookmark_write(request)
        data = await read_json(request, BookmarkPatch)
        async with request.app.state.pool.acquire() as conn:
            video = await _bookmark_video_or_404(conn, bookmark_id, user)
            at = None if data.at is UNSET else _bookmark_at(video, data.at)
            row = await repo.update_bookmark(conn, user.id, bookmark_id, at,
                                             None if data.note is UNSET else data.note)
        if row is None:  # deleted meanwhile
            raise ApiError(404, f"bookmark {bookmark_id} not found")
        return _bookmark(row)

    @get("/videos/{video_id:int}/bookmarks")
    async def bookmarks(self, request: Request, video_id: int,
                        limit: int = ListLimit, offset: int = Offset) -> list[Bookmark]:
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            await video_or_404(conn, video_id, user)
            rows = await repo.list_bookmarks(conn, user.id, video_id, limit=limit, offset=offset)
        return [_bookmark(r) for r in rows]

    @delete("/bookmarks/{bookmark_id:int}", status_code=204)
    async def delete_bookmark(self, request: Request, bookmark_id: int) -> None:
        await _bookmark_write(request)
        async with request.app.state.pool.acquire() as conn:
            # as the list: only while the learner may see the video's course (one removed from it got 204)
            await _bookmark_video_or_404(conn, bookmark_id, request.user)
            if not await repo.delete_bookmark(conn, request.user.id, bookmark_id):
                raise ApiError(404, f"bookmark {bookmark_id} not found")

    # --- XP, streak, achievements ---------------------------------------------------------------------

    @get("/me/stats")
    async def stats(self, request: Request) -> Stats:
        """XP, level, per-kind counts and the streak (in the learner's timezone)."""
        user: AuthUser = request.user
        async with request.app.state.pool.acquire() as conn:
            total, counts = await xp.totals(conn, user.id)
            streak, tz = await streaks.get(conn, user.id)
        now = datetime.now(timezone.utc)
        today = streaks.local_day(now, tz)
        current, free = streaks.status(streak, today, tz)
        level = achievements.level_for(total)
        return Stats(user_id=user.id, xp=total, level=level, level_xp=xp_for_level(level),
                     next_level_xp=xp_for_level(level + 1), counts=counts,
                     streak=StreakOut(current=current, longest=streak.longest,
                                      last_day=streak.last_day.isoformat() if streak.last_day else None,
                                      today=today.isoformat(), active_today=streaks.counted_today(streak, today, tz),
                                      freeze_available=free, timezone=tz))

    @get("/me/xp")
    async def ledger(self, request: Request, limit: int = Parameter(ge=1, le=200, default=50),
                     before: int | None = Parameter(ge=1, le=2**62, default=None)) -> list[XpEvent]:
        """The caller's XP events, newest first (page with `before` = the last id seen)."""
        async with request.app.state.pool.acquire() as conn:
            rows = await xp.history(conn, request.user.id, limit, before)
        return [XpEvent(id=r["id"], kind=r["kind"], points=r["points"], key=r["idempotency_key"],
                        course_id=r["course_id"], at=r["at"]) for r in rows]

    @get("/me/achievements")
    async def my_achievements(self, request: Request) -> list[AchievementOut]:
        """Every achievement with the caller's progress towards it and when it was unlocked."""
        user: AuthUser = request.user
        state = request.app.state
        async with state.pool.acquire() as conn:
            new: list = []
            if user.role == "learner":
                new = await achievements.sync(conn, user.id)  # definitions added since the thresholds were crossed
            current = await achievements.current_stats(conn, user.id)
            got = await achievements.unlocked_of(conn, user.id)
        if new:  # announced like any other unlock
            await xp.settle(state.redis, [], new)
        return [AchievementOut(achievement=a.info(), requirement=achievements.STATS[a.stat],
                               progress=min(current.get(a.stat, 0), a.at_least), target=a.at_least,
                               unlocked_at=got.get(a.id)) for a in achievements.BY_ID.values()]

    @get("/achievements")
    async def definitions(self) -> list[AchievementOut]:
        return [AchievementOut(achievement=a.info(), requirement=achievements.STATS[a.stat], progress=0,
                               target=a.at_least, unlocked_at=None) for a in achievements.BY_ID.values()]

    @get("/rooms/{room_id:str}/messages/{message_id:int}/check")
    async def reply_check(self, request: Request, room_id: str, message_id: int) -> ReplyCheck:
        """The tutor's check of a reply: for its author, instructors and admins (404 for a message it did not
        check)."""
        async with request.app.state.pool.acquire() as conn:
            acc = await room_or_404(conn, room_id, request.user)
            row = await replies_repo.get(conn, message_id)
        if row is None or row["room_id"] != acc.room_id or not (acc.moderator or row["author_id"] == request.user.id):
            raise ApiError(404, f"no check of message {message_id} in this room")
        return ReplyCheck(message_id=row["message_id"], room=row["room_id"], question_id=row["question_id"],
                          status=row["status"], reason=row["reason"], checker=row["checker"],
                          created_at=row["created_at"], checked_at=row["checked_at"])

    @delete("/rooms/{room_id:str}/messages/{message_id:int}/helpful", status_code=204)
    async def unmark_helpful(self, request: Request, room_id: str, message_id: int) -> None:
        """Instructors and admins remove a helpful mark (a mistaken one, or the tutor's on a wrong answer): the XP
        it earned is taken back."""
        state = request.app.state
        async with state.pool.acquire() as conn:
            acc = await room_or_404(conn, room_id, request.user)
        if not acc.moderator:
            raise ApiError(403, "instructors and admins only")
        if await repo.unmark_helpful(state.pool, state.redis, room_id, message_id, request.user.id) is None:
            raise ApiError(404, f"message {message_id} has no helpful mark in this room", code="not_marked")

    @post("/rooms/{room_id:str}/messages/{message_id:int}/helpful", status_code=201)
    async def helpful(self, request: Request, room_id: str, message_id: int) -> Response[HelpfulMark]:
        """Instructors and admins mark a learner's answer helpful; its author earns XP once (200 when already
        marked)."""
        state = request.app.state
        async with state.pool.acquire() as conn:
            acc = await room_or_404(conn, room_id, request.user)
        if not acc.moderator:
            raise ApiError(403, "instructors and admins only")
        try:
            row, created = await repo.mark_helpful(state.pool, state.redis, room_id, message_id, request.user.id)
        except repo.HelpfulError as exc:
            raise ApiError(404 if exc.code == "not_found" else 409, str(exc), code=exc.code) from exc
        return Response(HelpfulMark(message_id=row["message_id"], room=row["room_id"], author_id=row["author_id"],
                                    marked_by=row["marked_by"], marked_at=row["marked_at"], by_tutor=row["by_tutor"]),
                        status_code=201 if created else 200)
