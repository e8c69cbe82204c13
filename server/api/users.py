"""The caller, users of a tenant, and bot tokens: /api/v1/users, /api/v1/bots, /api/v1/tokens."""
from __future__ import annotations

import logging

import asyncpg
from litestar import Controller, Request, Response, delete, get, post
from litestar.exceptions import PermissionDeniedException

from server.api.paging import ListLimit, Offset
from server.api.schemas import BotIn, BotToken, Me, TokenInfo, UserCreated, UserIn, UserToken
from server.auth import AuthUser, issue_token, staff_only
from server.decode import callers_key, idempotency_key, person_name, read_json
from server.errors import ApiError
from store import users as repo
from store.events import SignedOut, TokenRevoked, publish, user_topic

logger = logging.getLogger(__name__)


async def _managed(request: Request, user_id: int) -> asyncpg.Record:
    """The person of the caller's tenant whose login tokens the caller manages: instructors learners', admins
    every person's; bots have tokens of their own (/bots)."""
    staff: AuthUser = request.user
    async with request.app.state.pool.acquire() as conn:
        row = await repo.get_user(conn, user_id)
    if row is None or row["tenant_id"] != staff.tenant_id:
        raise ApiError(404, f"user {user_id} not found")
    if row["role"] == "bot":
        raise ApiError(400, "a bot's tokens are made with POST /bots and ended with DELETE /tokens/{id}")
    if staff.role != "admin" and row["role"] != "learner":
        raise ApiError(403, "instructors manage learners' tokens; admins anyone's")
    return row


class UserController(Controller):
    path = "/api/v1"
    tags = ["users"]

    @get("/users/me")
    async def me(self, request: Request) -> Me:
        u: AuthUser = request.user
        return Me(id=u.id, name=u.name, role=u.role, tenant=u.tenant, tenant_id=u.tenant_id)

    @post("/users", guards=[staff_only], status_code=201)
    async def create_user(self, request: Request) -> UserCreated:
        """Staff add learners to their tenant (admins may add any human role); the reply holds a login token."""
        data = await read_json(request, UserIn)
        u: AuthUser = request.user
        allowed = ("learner", "instructor", "admin") if u.role == "admin" else ("learner",)
        if data.role not in allowed:
            raise ApiError(403 if data.role in ("instructor", "admin") else 400,
                           f"role must be one of {', '.join(allowed)}", field="role")
        settings = request.app.state.settings
        name = person_name(data.name)
        async with request.app.state.pool.acquire() as conn:
            row = await repo.create_user(conn, u.tenant_id, name, data.role)
            taken = None if row is not None else await repo.by_name(conn, u.tenant_id, name)
        if row is None:
            # the one the caller manages is named (`user_id`): a retry whose first reply was lost finds the user it
            # made, and gets them a token with POST /users/{user_id}/tokens
            manages = taken is not None and taken["role"] != "bot" and (u.role == "admin" or taken["role"] == "learner")
            raise ApiError(409, f"a user named {name!r} already exists", field="name",
                           extra={"user_id": taken["id"], "role": taken["role"]} if manages else None)
        token = issue_token(settings.secret, row["id"], u.tenant_id, row["role"], ttl_s=settings.token_ttl_s)
        return UserCreated(id=row["id"], name=row["name"], role=row["role"], tenant=u.tenant, token=token)

    @post("/users/{user_id:int}/tokens", guards=[staff_only], status_code=201)
    async def new_token(self, request: Request, user_id: int) -> UserToken:
        """A new login token for a person of the tenant (an expired one, a new device): instructors for learners,
        admins for anyone but bots (their tokens come from POST /bots)."""
        u: AuthUser = request.user
        row = await _managed(request, user_id)
        settings = request.app.state.settings
        token = issue_token(settings.secret, row["id"], u.tenant_id, row["role"], ttl_s=settings.token_ttl_s,
                            gen=row["token_gen"])
        logger.info("user %s (%s) issued a login token for user %s (%s)", u.id, u.role, row["id"], row["role"])
        return UserToken(user_id=row["id"], name=row["name"], role=row["role"], token=token)

    @delete("/users/{user_id:int}/tokens", status_code=204)
    async def sign_out_everywhere(self, request: Request, user_id: int) -> None:
        """End every login token of a person issued until now (a leaked token, a lost device); their open
        sockets close with 4401. Staff for the people they manage, and anyone for themselves."""
        u: AuthUser = request.user
        if user_id != u.id and not u.is_staff:
            raise ApiError(403, "only staff sign others out; learners and bots only themselves")
        if u.role == "bot":
            raise ApiError(400, "a bot's tokens are ended one by one: DELETE /tokens/{id} (a bot may end its own)")
        if user_id != u.id:
            await _managed(request, user_id)
        async with request.app.state.pool.acquire() as conn:
            done = await repo.end_tokens(conn, user_id, u.tenant_id)
        if done is None:  # a bot (its tokens are revoked one by one) or gone meanwhile
            raise ApiError(404, f"user {user_id} not found")
        logger.info("user %s signed user %s out everywhere", u.id, user_id)
        await publish(request.app.state.redis, user_topic(user_id), SignedOut(gen=done["token_gen"]))

    @post("/bots", guards=[staff_only], status_code=201)
    async def create_bot(self, request: Request) -> BotToken | Response[BotToken]:
        """Create (or reuse) a bot user and give it a new long-lived, revocable token. With an `Idempotency-Key`
        header, a repeat (a retry after the reply was lost) gets the token that key made (200), not another live
        token nobody holds; the key used for another bot or label is 409 `idempotency_key_reused`, and once its
        token was revoked, 409 `token_revoked`."""
        key = callers_key(request.user.id, idempotency_key(request))
        data = await read_json(request, BotIn)
        u: AuthUser = request.user
        name = person_name(data.name)
        async with request.app.state.pool.acquire() as conn, conn.transaction():
            # the bot of that name: there already, made now, or made by a concurrent request a moment ago (it
            # committed: a new statement sees it)
            row = (await repo.by_name(conn, u.tenant_id, name) or await repo.create_user(conn, u.tenant_id, name, "bot")
                   or await repo.by_name(conn, u.tenant_id, name))
            if row is None or row["role"] != "bot":
                raise ApiError(409, f"{name!r} is a human user's name", field="name")
            made = await repo.create_api_token(conn, row["id"], data.label, key)
            if made["user_id"] != row["id"] or made["label"] != data.label:
                raise ApiError(409, "this Idempotency-Key was used for another bot or label; use a new key for a "
                               "new token", code="idempotency_key_reused", field="Idempotency-Key")
            if made["revoked_at"] is not None:
                raise ApiError(409, f"the token this Idempotency-Key made ({made['id']}) has been revoked; use a new "
                               "key for a new token", code="token_revoked", field="Idempotency-Key")
        token = issue_token(request.app.state.settings.secret, row["id"], u.tenant_id, "bot", ttl_s=None,
                            token_id=made["id"])
        out = BotToken(user_id=row["id"], name=name, token_id=made["id"], token=token)
        return out if made["made"] else Response(out, status_code=200)

    @get("/tokens", guards=[staff_only])
    async def tokens(self, request: Request, limit: int = ListLimit, offset: int = Offset) -> list[TokenInfo]:
        async with request.app.state.pool.acquire() as conn:
            rows = await repo.list_api_tokens(conn, request.user.tenant_id, limit=limit, offset=offset)
        return [TokenInfo(**dict(r)) for r in rows]

    @delete("/tokens/{token_id:str}", status_code=204)
    async def revoke(self, request: Request, token_id: str) -> None:
        """Staff revoke any of the tenant's bot tokens; a bot its own (a bridge that finds its token leaked)."""
        u: AuthUser = request.user
        if not u.is_staff and u.role != "bot":
            raise PermissionDeniedException("instructors and admins revoke bot tokens; a bot its own")
        async with request.app.state.pool.acquire() as conn:
            owner = await repo.revoke_api_token(conn, token_id, u.tenant_id, None if u.is_staff else u.id)
        if owner is None:
            raise ApiError(404, f"token {token_id} not found")
        # sockets opened with it close too (tokens are checked when a socket opens, not on every frame)
        await publish(request.app.state.redis, user_topic(owner), TokenRevoked(token_id=token_id))
