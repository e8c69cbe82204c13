"""Whether a user may be in a room now: checked at join, once the socket is attached, and again for every
socket of a process whose subscription was down (kicks, removals and revocations are pub/sub messages)."""
from __future__ import annotations

from datetime import datetime

import asyncpg

from server.auth import AuthUser, ended
from store import moderation
from store import rooms as rooms_repo
from store import users as users_repo
from store.events import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED
from store.rooms import RoomAccess, parse_room


async def standing(db: asyncpg.Connection, room_id: str,
                   user: AuthUser) -> tuple[RoomAccess | None, datetime | None]:
    """(the user's access to the room or None, until when they are kicked from it or None)."""
    access = await rooms_repo.access(db, room_id, user.id, user.tenant_id, user.role)
    return access, (await moderation.kicked_until(db, room_id, user.id) if access is not None else None)


async def still_allowed(db: asyncpg.Connection, room_id: str, user: AuthUser,
                        opened_at: datetime | None = None) -> tuple[int, str] | None:
    """The join checks again: None, or the (code, reason) to close the user's socket with (the reasons the live
    events give). With `opened_at`, a kick since the socket opened counts too, even one that bars nobody."""
    if user.token_id is not None and await users_repo.get_user_with_token(db, user.id, user.token_id) is None:
        return CLOSE_UNAUTHENTICATED, "token revoked"
    if user.token_id is None and ended(await users_repo.get_user(db, user.id) or {"token_gen": 0}, None,
                                       user.token_gen):
        return CLOSE_UNAUTHENTICATED, "token ended"
    access, kicked = await standing(db, room_id, user)
    if access is None:
        ref = parse_room(room_id)
        gone = ref is None or await rooms_repo.room_target(db, ref) is None
        return CLOSE_FORBIDDEN, "room deleted" if gone else "access revoked"
    if kicked is not None or (opened_at is not None and await moderation.kicked_since(db, room_id, user.id,
                                                                                     opened_at)):
        return CLOSE_FORBIDDEN, "kicked"
    return None
