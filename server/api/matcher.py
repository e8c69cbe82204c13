"""Study-buddy matching and the learner's pod profile: /api/v1/pods/{id}/match[/decline],
/api/v1/pods/{id}/profiles, /api/v1/me/profile."""
from __future__ import annotations

import logging

import asyncpg
import msgspec
from litestar import Controller, Request, get, patch, post
from litestar.response import Response

from agents import matcher
from server.api.paging import ListLimit, Offset
from server.api.progress_schemas import DeclineIn, GroupOut, MatchOut, ProfileIn, ProfileOut, Slot
from server.auth import AuthUser, staff_only
from server.decode import decode_json, idempotency_key, read_body, read_json
from server.errors import ApiError
from store import matching
from store import pods as pods_repo
from store import profiles

logger = logging.getLogger(__name__)

# A manual match repeated this soon (by any staff) for the same learners, without Idempotency-Key, is a repeat
DOUBLE_CLICK_S = 10.0
BUSY_RETRY_S = 5  # Retry-After when the pod's round is being computed by someone else


def to_profile(p: profiles.Profile) -> ProfileOut:
    return ProfileOut(user_id=p.user_id, timezone=p.timezone,
                      availability=[Slot(day=d, start=a, end=b) for d, a, b in p.slots()],  # type: ignore[arg-type]
                      goals=p.goals, updated_at=p.updated_at)


def to_match(r: matcher.MatchResult) -> MatchOut:
    return MatchOut(match_id=r.match_id, pod_id=r.pod_id, groups=[GroupOut(members=g.members, reason=g.reason)
                                                                  for g in r.groups],
                    declined=r.declined, created_at=r.created_at, message_id=r.message_id,
                    superseded_at=r.superseded_at)


async def _pod(conn: asyncpg.Connection, pod_id: int, user: AuthUser) -> asyncpg.Record:
    """Staff of the tenant see every pod; learners the pods they are in. 404 otherwise."""
    pod = await pods_repo.pod_in_tenant(conn, pod_id, user.tenant_id)
    if pod is None or (not user.is_staff and not await pods_repo.is_member(conn, pod_id, user.id)):
        raise ApiError(404, f"pod {pod_id} not found")
    return pod


class MatcherController(Controller):
    path = "/api/v1"
    tags = ["matcher"]

    @get("/me/profile")
    async def my_profile(self, request: Request) -> ProfileOut:
        async with request.app.state.pool.acquire() as conn:
            return to_profile(await profiles.get_profile(conn, request.user.id))

    @patch("/me/profile")
    async def update_profile(self, request: Request) -> ProfileOut:
        """Change any of `timezone` (IANA name; streak days follow it), `availability` (weekly slots
        `{day: mon..sun, start: "HH:MM", end: "HH:MM"}` in that timezone) and `goals` (up to 8 short texts)."""
        data = await read_json(request, ProfileIn)
        try:
            tz = None if data.timezone is msgspec.UNSET else profiles.check_timezone(data.timezone)
            slots = None if data.availability is msgspec.UNSET else profiles.check_availability(
                [(s.day, s.start, s.end) for s in data.availability])
            goals = None if data.goals is msgspec.UNSET else profiles.check_goals(data.goals)
        except profiles.ProfileError as exc:
            raise ApiError(400, str(exc), field=exc.field) from exc
        async with request.app.state.pool.acquire() as conn:
            return to_profile(await profiles.update_profile(conn, request.user.id, timezone_name=tz,
                                                            availability=slots, goals=goals))

    @get("/pods/{pod_id:int}/profiles")
    async def pod_profiles(self, request: Request, pod_id: int,
                           limit: int = ListLimit, offset: int = Offset) -> list[ProfileOut]:
        """The pod profiles of the pod's learners (for its members and staff)."""
        async with request.app.state.pool.acquire() as conn:
            await _pod(conn, pod_id, request.user)
            ids = [r["user_id"] for r in await matching.eligible_members(conn, pod_id, limit=limit, offset=offset)]
            got = await profiles.profiles_of(conn, ids)
        return [to_profile(got[i]) for i in ids]

    @post("/pods/{pod_id:int}/match", guards=[staff_only], status_code=201)
    async def match(self, request: Request, pod_id: int) -> Response[MatchOut]:
        """Pair the pod's learners now (a trio when odd) and post the pairs to the pod room. With an
        `Idempotency-Key` header, a repeat of the same request (a double click, a retry) runs and posts once and
        returns that round (200); without one, a repeat within DOUBLE_CLICK_S of a manual round (anyone's), for the
        same learners, returns it."""
        state = request.app.state
        key = idempotency_key(request)
        async with state.pool.acquire() as conn:
            await _pod(conn, pod_id, request.user)
            if key is not None:
                round_key = f"manual:{request.user.id}:{key}"
            else:
                # Without a key, a double click is still one round: a manual round of a moment ago (this caller's,
                # or a colleague's whose click came first and finished before this one looked) is returned, and two
                # requests racing on the same current round share one key (one runs).
                cur = await matching.current(conn, pod_id)
                if cur is not None and cur["trigger"] == "manual" and \
                        await conn.fetchval("SELECT $1::timestamptz > now() - make_interval(secs => $2)",
                                            cur["created_at"], DOUBLE_CLICK_S) and \
                        {m for g in cur["groups"] for m in g["members"]} | set(cur["declined"]) == \
                        {r["user_id"] for r in await matching.eligible_members(conn, pod_id)}:
                    return Response(to_match(matcher.result_of(cur)), status_code=200)  # same pod, same people
                # not the caller's id: two staff clicking at once on the same round get one new round
                round_key = f"manual:after:{cur['id'] if cur is not None else 0}"
            if (done := await matching.round_by_key(conn, pod_id, round_key)) is not None:
                return Response(to_match(matcher.result_of(done)), status_code=200)
            if len(await matching.eligible_members(conn, pod_id)) < 2:
                raise ApiError(409, "the pod needs at least two enrolled learners to match", code="too_few")
        try:
            async with matcher.pod_turn(state.redis, pod_id):
                result = await matcher.run_match(state.pool, state.redis, state.settings, pod_id, trigger="manual",
                                                 created_by=request.user.id, round_key=round_key)
        except matching.PodGone:  # deleted while it was being matched
            raise ApiError(404, f"pod {pod_id} not found") from None
        except matcher.PodBusy as exc:
            raise ApiError(409, str(exc), code="conflict", retry_after=BUSY_RETRY_S) from exc
        if result is None:  # the same key ran meanwhile: its round
            async with state.pool.acquire() as conn:
                done = await matching.round_by_key(conn, pod_id, round_key)
            if done is None:
                raise ApiError(409, "the pod's learners changed while matching; try again", code="conflict",
                               retry_after=1)
            return Response(to_match(matcher.result_of(done)), status_code=200)
        return Response(to_match(result), status_code=201)

    @get("/pods/{pod_id:int}/match")
    async def current(self, request: Request, pod_id: int) -> MatchOut:
        async with request.app.state.pool.acquire() as conn:
            await _pod(conn, pod_id, request.user)
            row = await matching.current(conn, pod_id)
        if row is None:
            raise ApiError(404, f"pod {pod_id} has no study-buddy round yet", code="no_round")  # (not: no such pod)
        return to_match(matcher.result_of(row))

    @post("/pods/{pod_id:int}/match/decline", status_code=200)
    async def decline(self, request: Request, pod_id: int) -> MatchOut:
        """Sit this round out: the rest of the pod is matched again without you. With `{match_id}` (the round
        you saw), a newer round that is not a re-match of it after declines is 409 `stale_round`: read it first."""
        raw = await read_body(request)
        seen = (decode_json(raw, DeclineIn) if raw.strip() else DeclineIn()).match_id
        state = request.app.state
        async with state.pool.acquire() as conn:
            await _pod(conn, pod_id, request.user)
        try:
            result = await matcher.decline(state.pool, state.redis, state.settings, pod_id, request.user.id,
                                           seen=seen)
        except matcher.UnknownRound as exc:
            raise ApiError(404, str(exc), field="match_id") from exc
        except matcher.StaleDecline as exc:
            raise ApiError(409, str(exc), code="stale_round") from exc
        except matcher.NotMatched as exc:
            raise ApiError(409, str(exc), code="not_matched") from exc
        except (matcher.DeclineError, matcher.PodBusy) as exc:  # contention: trying again works
            raise ApiError(409, str(exc), code="conflict", retry_after=BUSY_RETRY_S) from exc
        except matching.PodGone:  # deleted while it was being matched again
            raise ApiError(404, f"pod {pod_id} not found") from None
        return to_match(result)
