"""Whether a user may be in a room now: checked at join, once the socket is attached, and again for every
socket of a process whose subscription was down (kicks, removals and revocations are pub/sub messages)."""
from __future__ import annotations

from datetime import datetime

import asyncpg

from server.auth import AuthUser
from store import moderation
from store import rooms as rooms_repo
from store import users as users_repo
from store.events import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED
from store.rooms import RoomAccess


async def standing(db: asyncpg.Connection, room_id: str,
                   user: AuthUser) -> tuple[RoomAccess | None, datetime | None]:
    """(the user's access to the room or None, until when they are kicked from it or None)."""
    access = await rooms_repo.access(db, room_id, user.id, user.tenant_id, user.role)
    return access, (await moderation.kicked_until(db, room_id, user.id) if access is not None else None)


async def still_allowed(db: asyncpg.Connection, room_id: str, user: AuthUser) -> tuple[int, str] | None:
    """The join checks again: None, or the (code, reason) to close the user's socket with."""
    if user.token_id is not None and await users_repo.get_user_with_token(db, user.id, user.token_id) is None:
        return CLOSE_UNAUTHENTICATED, "token revoked"
    access, kicked = await standing(db, room_id, user)
    return (CLOSE_FORBIDDEN, "access revoked") if access is None or kicked is not None else None
