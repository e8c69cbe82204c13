"""Leaderboards: GET /api/v1/leaderboards/{scope}/{id}?period=&limit= (Redis; the ledger while Redis has lost
them)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from litestar import Controller, Request, get
from litestar.params import Parameter

from server.api.progress_schemas import LeaderboardOut, Me
from server.auth import AuthUser
from server.errors import ApiError
from store import courses as courses_repo
from store import leaderboard_rebuild, leaderboards
from store import pods as pods_repo


# Reads answered from the ledger at once per process (each sums a board's ledger rows: a big tenant's takes a
# while): more wait, up to LEDGER_WAIT_S, then 503. The pool keeps connections for everything else, the rebuild too.
LEDGER_READS = 4
LEDGER_WAIT_S = 5.0
REBUILDING_RETRY_S = 2.0


@asynccontextmanager
async def ledger_read_slot(state) -> AsyncIterator[None]:  # type: ignore[no-untyped-def]
    sem = getattr(state, "lb_ledger_reads", None)
    if sem is None:
        sem = state.lb_ledger_reads = asyncio.Semaphore(LEDGER_READS)
    try:
        await asyncio.wait_for(sem.acquire(), LEDGER_WAIT_S)
    except (TimeoutError, asyncio.TimeoutError):
        raise ApiError(503, "the leaderboards are being rebuilt and many are reading them meanwhile; try again",
                       code="rebuilding", retry_after=REBUILDING_RETRY_S) from None
    try:
        yield
    finally:
        sem.release()


class LeaderboardController(Controller):
    path = "/api/v1/leaderboards"
    tags = ["leaderboards"]

    @get("/{kind:str}/{scope_id:int}")
    async def board(self, request: Request, kind: str, scope_id: int,
                    period: Literal["all", "month", "week"] = "all",
                    limit: int = Parameter(ge=1, le=100, default=10)) -> LeaderboardOut:
        """`scope`: tenant (id = your tenant id), course (a course you can see) or pod (a pod you are in; staff:
        any pod of the tenant). Months and weeks are UTC. Equal XP shares a rank."""
        user: AuthUser = request.user
        state = request.app.state
        scope = kind  # `scope` is a reserved parameter name in Litestar
        if scope not in leaderboards.SCOPES:
            raise ApiError(404, f"unknown leaderboard scope {scope!r}; use tenant, course or pod")
        if scope_id >= 2**63:  # as for every id: past 64 bits is bad input, whatever the scope
            raise ApiError(400, f"id {scope_id} is out of range", field="id")
        if scope == "tenant":
            if scope_id != user.tenant_id:
                raise ApiError(404, f"tenant {scope_id} not found")
        else:
            async with state.pool.acquire() as conn:
                if scope == "course":
                    ok = await courses_repo.visible_course(conn, scope_id, user.id, user.tenant_id, user.role)
                else:
                    ok = await pods_repo.pod_in_tenant(conn, scope_id, user.tenant_id)
                    if ok is not None and not user.is_staff and not await pods_repo.is_member(conn, scope_id, user.id):
                        ok = None
            if ok is None:
                raise ApiError(404, f"{scope} {scope_id} not found")
        board = await leaderboards.read(state.redis, scope, scope_id, user.tenant_id, period, user.id, limit=limit)
        if not board.built:  # Redis lost the boards: rebuild them, and answer from the ledger meanwhile
            leaderboard_rebuild.rebuild_soon(state)
            async with ledger_read_slot(state), state.pool.acquire() as conn:
                board = await leaderboard_rebuild.read_ledger(conn, scope, scope_id, period, user.id, limit=limit)
        me = Me(rank=board.me.rank, xp=board.me.xp) if board.me else Me(rank=None, xp=0)
        return LeaderboardOut(scope=scope, id=scope_id, period=period, count=board.count, entries=board.entries,
                              me=me, neighbours=board.neighbours)
