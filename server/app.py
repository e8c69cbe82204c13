"""The app factory: build the Litestar app; one lifespan opens pools and puts them on app.state."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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


def canonical_path_ids(request: Request) -> None:
    """A path id is written as the number it is, in ASCII digits: 404 otherwise. Litestar reads `{x:int}` with
    int(), which also takes "3_5", "+35", " 35", "035" and other scripts' digits ("３５", "٣٥"): DELETE /courses/3_5
    deleted course 35, a typo away from the course meant."""
    template, params = request.scope.get("path_template") or "", request.scope.get("path_params") or {}
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
        app.state.pool = await create_pool(settings.database_url, max_size=settings.db_pool_max)
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

