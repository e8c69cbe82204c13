"""JWT auth: tokens carry user id, tenant and role; bots hold long-lived revocable tokens."""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware.authentication import AbstractAuthenticationMiddleware, AuthenticationResult

from store import users as users_repo

logger = logging.getLogger(__name__)

ALGORITHM = "HS256"
STAFF_ROLES = frozenset({"instructor", "admin"})
# Seconds a token's issue time (`iat`) may lie ahead of this server's clock: a token issued by a host whose clock
# is ahead works at once here.
CLOCK_SKEW_S = 60


class AuthUser(msgspec.Struct, frozen=True):
    id: int
    tenant_id: int
    tenant: str
    name: str
    role: str
    token_id: str | None = None
    expires_at: float | None = None  # the token's `exp` (unix time); None for long-lived bot tokens
    token_gen: int = 0  # a person's token generation (`gen`): tokens of an earlier one than theirs are ended

    @property
    def is_staff(self) -> bool:
        return self.role in STAFF_ROLES


def issue_token(secret: str, user_id: int, tenant_id: int, role: str, *, ttl_s: int | None,
                token_id: str | None = None, gen: int = 0) -> str:
    """Sign a token. `ttl_s=None` makes a long-lived token, which must carry a revocable `token_id`. `gen`: the
    person's current token generation (`users.token_gen`; signing them out everywhere moves it on)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": str(user_id), "tenant": tenant_id, "role": role, "iat": now}
    if ttl_s is not None:
        claims["exp"] = now + ttl_s
    if token_id is not None:
        claims["jti"] = token_id
    if gen:
        claims["gen"] = gen
    if ttl_s is None and token_id is None:
        raise ValueError("a token without expiry must be revocable (token_id)")
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def decode_token(secret: str, token: str) -> dict[str, Any]:
    """Verified claims, or NotAuthorizedException with the reason."""
    try:  # `iat` is checked below, with the clock difference allowed (`exp` is not stretched)
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM],
                            options={"require": ["sub", "iat"], "verify_iat": False})
    except jwt.ExpiredSignatureError as exc:
        raise NotAuthorizedException("token expired") from exc
    except jwt.InvalidTokenError as exc:
        raise NotAuthorizedException("invalid token") from exc
    iat, gen = claims["iat"], claims.get("gen", 0)
    if (not isinstance(iat, (int, float)) or isinstance(iat, bool) or not isinstance(gen, int)
            or isinstance(gen, bool) or ("exp" not in claims and "jti" not in claims)):
        raise NotAuthorizedException("invalid token")
    if iat > time.time() + CLOCK_SKEW_S:
        raise NotAuthorizedException("token not valid yet: it was issued by a server whose clock is ahead of "
                                     f"this one's by over {CLOCK_SKEW_S} s")
    return claims


def ended(row: Any, token_id: str | None, gen: int) -> bool:
    """A person's login token of a generation before their current one: they were signed out everywhere since.
    (Bot tokens, with a `token_id`, are revoked one by one.)"""
    return token_id is None and gen < row["token_gen"]


def bearer_token(connection: ASGIConnection) -> str | None:
    header = connection.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


async def authenticate(connection: ASGIConnection, token: str | None,
                       before_lookup: Callable[[int, dict[str, Any]], Awaitable[None]] | None = None) -> AuthUser:
    """Resolve a token to a live user (deleted users and revoked tokens fail). `before_lookup(user_id, claims)`
    runs once the signature is verified and before the database is asked (a rate limit, say); it may raise."""
    if not token:
        raise NotAuthorizedException("missing bearer token")
    state = connection.app.state
    claims = decode_token(state.settings.secret, token)
    try:
        user_id = int(claims["sub"])
    except (TypeError, ValueError) as exc:
        raise NotAuthorizedException("invalid token") from exc
    if before_lookup is not None:
        await before_lookup(user_id, claims)
    jti = claims.get("jti")
    async with state.pool.acquire() as conn:
        if jti is not None:
            row = await users_repo.get_user_with_token(conn, user_id, str(jti))
        else:
            row = await users_repo.get_user(conn, user_id)
    if row is None:
        raise NotAuthorizedException("token revoked or user unknown")
    gen = int(claims.get("gen", 0))
    if ended(row, jti, gen):
        raise NotAuthorizedException("token ended: the user was signed out everywhere since it was issued")
    exp = claims.get("exp")
    return AuthUser(id=row["id"], tenant_id=row["tenant_id"], tenant=row["tenant_name"], name=row["name"],
                    role=row["role"], token_id=jti, expires_at=float(exp) if exp is not None else None,
                    token_gen=gen)


class JWTAuthMiddleware(AbstractAuthenticationMiddleware):
    """Bearer auth for REST; websocket handlers authenticate themselves to close with 4401."""

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        user = await authenticate(connection, bearer_token(connection))
        return AuthenticationResult(user=user, auth=user.token_id)


def staff_only(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: instructors and admins only."""
    if not connection.user.is_staff:
        raise PermissionDeniedException("instructors and admins only")


def admin_only(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    if connection.user.role != "admin":
        raise PermissionDeniedException("admins only")
