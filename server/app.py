"""The app factory: build the Litestar app; one lifespan opens pools and puts them on app.state."""
from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import get_args, get_origin

import asyncpg
from litestar import Litestar, Request
from litestar.exceptions import HTTPException, NotFoundException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from redis.asyncio import BlockingConnectionPool, Redis

from server.api.assignments import AssignmentController  # assignments and grading
from server.api.courses import CourseController
from server.api.submissions import SubmissionController
from server.api.tutor import TutorController
from server.api.health import health, health_head, metrics, ready, ready_head
from server.api.users import UserController
from server.api.videos import JobController, VideoController
from server.auth import JWTAuthMiddleware
from server import tutoring
from agents import matcher
from agents.embedder import EmbedderError
from ingest.jobs import connect_arq
from server.errors import (ROLLED_BACK, UNREACHABLE, ApiError, contention_handler, data_error_handler,
                           embedder_error_handler, gone_parent_handler, http_exception_handler, internal_error_handler,
                           unavailable_handler)
from server.uploads import FRAMING
from server.api.live import LiveController
from server.api.pods import PodController
from server.api.rooms import RoomController
from server.api.leaderboards import LeaderboardController  # progress, XP, leaderboards, matcher
from server.api.matcher import MatcherController
from server.api.progress import ProgressController, progress_lifespan
from server.realtime.lifespan import realtime_lifespan
from server.realtime.socket import room_socket
from store import leaderboard_rebuild, leaderboards
from store.aio import CancelSafeConnection
from store.db import create_pool
from store.settings import Settings

logger = logging.getLogger(__name__)

PUBLIC_PATHS = ["^/health$", "^/ready$", "^/metrics$", "^/schema", "^/ws/"]


REDIS_TIMEOUT_S = 10.0
REDIS_MAX_CONNECTIONS = 200  # per server process; a request past them waits up to REDIS_TIMEOUT_S for one


def command_redis(url: str) -> Redis:
    """The server's Redis client for commands. Each gives up after REDIS_TIMEOUT_S, and so does waiting for a
    connection: redis-py's default pool connects while holding a lock over the whole pool, so during an outage
    the n-th call waited n connect timeouts (minutes) instead of failing as a 503 in REDIS_TIMEOUT_S. The
    blocking pool connects outside its lock."""
    return Redis(connection_pool=BlockingConnectionPool.from_url(
        url, max_connections=REDIS_MAX_CONNECTIONS, timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S, connection_class=CancelSafeConnection))


# Per route handler: its query parameters, each with whether it is a whole number.
_QUERY: dict[int, tuple[tuple[str, bool], ...]] = {}
_RESERVED = {"request", "socket", "state", "headers", "cookies", "query", "scope", "data", "body"}
_WHOLE = re.compile(r"-?[0-9]+(?![\s\S])")


def _query_params(request: Request) -> tuple[tuple[str, bool], ...]:
    handler = request.scope.get("route_handler")
    if handler is None:
        return ()
    found = _QUERY.get(id(handler))
    if found is None:
        out = []
        for name, fd in handler.parsed_fn_signature.parameters.items():
            kw = fd.kwarg_definition
            if name in _RESERVED or getattr(kw, "header", None) or getattr(kw, "cookie", None):
                continue
            types = get_args(fd.annotation) or (fd.annotation,)
            if any(get_origin(t) in (list, tuple, set) or t in (list, tuple, set) for t in types):
                continue  # (none today: a list may be repeated)
            out.append((getattr(kw, "query", None) or name, int in types and bool not in types))
        found = _QUERY[id(handler)] = tuple(out)
    return found


def canonical_path_ids(request: Request) -> None:
    """A path id is written as the number it is, in ASCII digits: 404 otherwise. Litestar reads `{x:int}` with
    int(), which also takes "3_5", "+35", " 35", "035" and other scripts' digits ("３５", "٣٥"): DELETE /courses/3_5
    deleted course 35, a typo away from the course meant. A whole-number query parameter likewise (400 naming it):
    `?after=1e3` read as 1000 and `?after=1.0` as 1, where the websocket's `after` refuses them; and a query
    parameter given twice is a 400 (one of the two was taken)."""
    template, params = request.scope.get("path_template") or "", request.scope.get("path_params") or {}
    query = request.query_params
    for name, whole in _query_params(request):
        if name in params:
            continue
        given = query.getall(name, ())
        if len(given) > 1:  # (`?q=a&q=b` searched "b")
            raise ApiError(400, f"{name} is given {len(given)} times; give it once", field=name)
        if whole and given and not _WHOLE.match(given[0]):
            raise ApiError(400, f"{name} must be a whole number in ASCII digits, got {given[0][:40]!r}", field=name)
    if not any(isinstance(v, int) for v in params.values()):
        return
    for tmpl, raw in zip(template.split("/"), request.scope["path"].split("/")):
        if tmpl.startswith("{") and isinstance(value := params.get(tmpl[1:-1]), int):
            if raw != str(value):
                raise NotFoundException(f"no such path: {request.scope['path']!r} (ids are written in ASCII digits)")
            if not 1 <= value <= 2**62:  # (past 64 bits was a 400 naming no field)
                raise ApiError(400, f"{tmpl[1:-1]} must be an id from 1 to {2**62}", field=tmpl[1:-1])


def create_app(settings: Settings) -> Litestar:
    """Build the app for `settings`, whose database and Redis URLs must be resolved."""
    assert settings.database_url and settings.redis_url, "resolve services before building the app"

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.upload_stops = set()  # uploads being read (server.uploads.stop_uploads)
        app.state.upload_stop_at = None
        # statements give up after STUDYHALL_DB_TIMEOUT_S: a stalled Postgres is a 503, as a stalled Redis is
        app.state.pool = await create_pool(settings.database_url, max_size=settings.db_pool_max,
                                           command_timeout=settings.db_timeout_s)
        # Commands give up after REDIS_TIMEOUT_S: a stalled or partitioned Redis is a 503, not a request hanging
        # until TCP gives up. The hub's subscription waits for messages as long as it takes: a client of its own.
        app.state.redis = command_redis(settings.redis_url)
        app.state.pubsub_redis = Redis.from_url(settings.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S,
                                                socket_keepalive=True)
        app.state.arq = await connect_arq(settings.redis_url)  # enqueues: see
        # ingest.jobs.ENQUEUE_TIMEOUT_S (arq sets no read timeout of its own)
        app.state.tutor_tasks = set()  # running tutor answers (server.tutoring.track)
        logger.info("studyhall app ready")
        try:
            yield
        finally:
            await tutoring.drain(app.state, timeout=10)  # let answers being written reach the room
            await leaderboard_rebuild.drain()  # second looks at boards after enrolment changes, taken now
            await leaderboards.drain()  # leaderboard.changed under way, and the end of a burst
            await matcher.drain_leaving()  # re-matches after someone left a pod or a course
            await app.state.arq.aclose()
            await app.state.redis.aclose()
            await app.state.pubsub_redis.aclose()
            await app.state.pool.close()
            if getattr(app.state, "ready_conn", None) is not None:
                await app.state.ready_conn.close()

    return Litestar(
        route_handlers=[health, health_head, ready, ready_head, metrics,
                        CourseController, UserController, VideoController, JobController,
                        AssignmentController, SubmissionController,  # assignments and grading
                        room_socket, RoomController, PodController, LiveController,  # realtime rooms
                        ProgressController, LeaderboardController, MatcherController,  # progress, XP, matcher
                        TutorController],
        lifespan=[lifespan, realtime_lifespan, progress_lifespan],  # the others use the pools opened by lifespan
        middleware=[DefineMiddleware(JWTAuthMiddleware, exclude=PUBLIC_PATHS)],
        exception_handlers={HTTPException: http_exception_handler, asyncpg.DataError: data_error_handler,
                            asyncpg.ForeignKeyViolationError: gone_parent_handler, EmbedderError: embedder_error_handler,
                            **dict.fromkeys(ROLLED_BACK, contention_handler),
                            **dict.fromkeys(UNREACHABLE, unavailable_handler), Exception: internal_error_handler},
        before_request=canonical_path_ids,
        openapi_config=OpenAPIConfig(title="studyhall", version="0.1.0", path="/schema"),
        request_max_body_size=settings.max_upload_bytes + FRAMING,  # an upload's file may be the whole limit
        logging_config=None,
    )

