"""Tenants, users and revocable API tokens."""
from __future__ import annotations

import secrets

import asyncpg

ROLES = ("learner", "instructor", "admin", "bot")


async def ensure_tenant(conn: asyncpg.Connection, name: str) -> int:
    """Id of the tenant named `name`, created if missing."""
    row = await conn.fetchrow(
        """INSERT INTO tenants (name) VALUES ($1)
           ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id""",
        name,
    )
    return row["id"]


async def ensure_user(conn: asyncpg.Connection, tenant_id: int, name: str, role: str) -> asyncpg.Record:
    """The user `name` of the tenant, created with `role` if missing; an existing user keeps their role (the
    caller compares)."""
    return await conn.fetchrow(
        """INSERT INTO users AS u (tenant_id, name, role) VALUES ($1, $2, $3)
           ON CONFLICT (tenant_id, name) DO UPDATE SET role = u.role
           RETURNING id, tenant_id, name, role""",
        tenant_id, name, role,
    )


async def create_user(conn: asyncpg.Connection, tenant_id: int, name: str, role: str) -> asyncpg.Record | None:
    """A new user; None when the name is taken in the tenant."""
    return await conn.fetchrow(
        """INSERT INTO users (tenant_id, name, role) VALUES ($1, $2, $3)
           ON CONFLICT (tenant_id, name) DO NOTHING RETURNING id, tenant_id, name, role""",
        tenant_id, name, role,
    )


async def by_name(conn: asyncpg.Connection, tenant_id: int, name: str) -> asyncpg.Record | None:
    """The tenant's user of that name: (id, role), or None."""
    return await conn.fetchrow("SELECT id, role FROM users WHERE tenant_id = $1 AND name = $2", tenant_id, name)


async def get_user(conn: asyncpg.Connection, user_id: int) -> asyncpg.Record | None:
    """The user with their tenant's name and `token_gen` (their login tokens of earlier generations are ended)."""
    return await conn.fetchrow(
        """SELECT u.id, u.tenant_id, u.name, u.role, t.name AS tenant_name, u.token_gen
           FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE u.id = $1""",
        user_id,
    )


async def end_tokens(conn: asyncpg.Connection, user_id: int, tenant_id: int) -> asyncpg.Record | None:
    """End the person's login tokens issued until now: they move to the next token generation. The user with
    the new `token_gen`, or None when not a person of the tenant."""
    return await conn.fetchrow(
        """UPDATE users SET token_gen = token_gen + 1 WHERE id = $1 AND tenant_id = $2 AND role <> 'bot'
           RETURNING id, role, token_gen""",
        user_id, tenant_id)


async def get_user_with_token(conn: asyncpg.Connection, user_id: int, token_id: str) -> asyncpg.Record | None:
    """The user, only while the API token `token_id` of that user is not revoked."""
    return await conn.fetchrow(
        """SELECT u.id, u.tenant_id, u.name, u.role, t.name AS tenant_name
           FROM api_tokens k JOIN users u ON u.id = k.user_id JOIN tenants t ON t.id = u.tenant_id
           WHERE k.id = $1 AND k.user_id = $2 AND k.revoked_at IS NULL""",
        token_id, user_id,
    )


async def create_api_token(conn: asyncpg.Connection, user_id: int, label: str = "",
                           client_key: str | None = None) -> asyncpg.Record:
    """A new token (id, user_id, label, revoked_at, made: true); with `client_key` (an Idempotency-Key as stored),
    the token that key already made instead (made: false), whoever it was for: the caller compares."""
    made = await conn.fetchrow(
        """INSERT INTO api_tokens (id, user_id, label, client_key) VALUES ($1, $2, $3, $4)
           ON CONFLICT (client_key) DO NOTHING RETURNING id, user_id, label, revoked_at, true AS made""",
        secrets.token_hex(12), user_id, label, client_key)
    # (a twin request holding the key made it, and committed: this statement sees it)
    return made or await conn.fetchrow(
        "SELECT id, user_id, label, revoked_at, false AS made FROM api_tokens WHERE client_key = $1", client_key)


async def list_api_tokens(conn: asyncpg.Connection, tenant_id: int, *,
                          limit: int | None = None, offset: int = 0) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT k.id, k.user_id, u.name AS user_name, k.label, k.created_at, k.revoked_at
           FROM api_tokens k JOIN users u ON u.id = k.user_id WHERE u.tenant_id = $1 ORDER BY k.created_at, k.id
           LIMIT $2 OFFSET $3""", tenant_id, limit, offset)


async def revoke_api_token(conn: asyncpg.Connection, token_id: str, tenant_id: int | None,
                           user_id: int | None = None) -> int | None:
    """Revoke a token (of the tenant, and of the user, when given); the id of the user it belonged to, or None when
    there is no such token."""
    return await conn.fetchval(
        """UPDATE api_tokens k SET revoked_at = coalesce(k.revoked_at, now())
           FROM users u WHERE u.id = k.user_id AND k.id = $1 AND ($2::bigint IS NULL OR u.tenant_id = $2)
             AND ($3::bigint IS NULL OR k.user_id = $3)
           RETURNING k.user_id""",
        token_id, tenant_id, user_id,
    )
