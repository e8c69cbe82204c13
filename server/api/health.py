"""Liveness, readiness and Prometheus metrics."""
from __future__ import annotations

import asyncio
import hmac

import asyncpg
from litestar import Request, Response, get, head
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import ApiError


@get("/health", exclude_from_auth=True, include_in_schema=False)
async def health() -> dict:
    return {"status": "ok"}


# HEAD as well (uptime checkers and `curl -I` use it): the status alone
@head("/health", exclude_from_auth=True, include_in_schema=False)
async def health_head() -> None:
    return None


@head("/ready", exclude_from_auth=True, include_in_schema=False)
async def ready_head(request: Request) -> Response[None]:
    status = (await _readiness(request))[1]
    return Response(None, status_code=status, headers=_retry(status))


@get("/ready", exclude_from_auth=True, include_in_schema=False)
async def ready(request: Request) -> Response:
    """Ready: Postgres and Redis answer, and this process receives the realtime events. Postgres is probed on a
    connection of its own: a pool busy with requests is load, not a reason to be taken out of rotation."""
    body, status = await _readiness(request)
    return Response(body, status_code=status, headers=_retry(status))


def _retry(status: int) -> dict[str, str]:
    """A 503 says when to look again, as every other 503 of the API does."""
    return {"Retry-After": "5"} if status == HTTP_503_SERVICE_UNAVAILABLE else {}


async def _readiness(request: Request) -> tuple[dict, int]:
    state = request.app.state
    checks: dict[str, str] = {}

    async def pg() -> None:
        lock = getattr(state, "ready_lock", None)
        if lock is None:
            lock = state.ready_lock = asyncio.Lock()
        async with lock:
            conn = getattr(state, "ready_conn", None)
            try:
                if conn is None or conn.is_closed():
                    conn = state.ready_conn = await asyncpg.connect(state.settings.database_url)
                await conn.fetchval("SELECT 1")
            except BaseException:
                state.ready_conn = None
                if conn is not None:
                    conn.terminate()
                raise

    async def rd() -> None:
        await state.redis.ping()

    async def realtime() -> None:
        hub = getattr(state, "hub", None)
        if hub is not None and not hub.receiving():
            raise ConnectionError("not receiving realtime events")

    for name, probe in (("postgres", pg), ("redis", rd), ("realtime", realtime)):
        try:
            await asyncio.wait_for(probe(), timeout=2)
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks[name] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return {"status": "ok" if ok else "unavailable", **checks}, 200 if ok else HTTP_503_SERVICE_UNAVAILABLE


@get("/metrics", exclude_from_auth=True, include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics. With STUDYHALL_METRICS_TOKEN set, only for `Authorization: Bearer <that token>` (a
    scraper's `authorization: {credentials: ...}`), not for anyone who can reach the API."""
    want = request.app.state.settings.metrics_token
    if want is not None:
        scheme, _, got = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(got.strip().encode(), want.encode()):
            raise ApiError(401, "metrics need the token set in STUDYHALL_METRICS_TOKEN", code="unauthorized")
    return Response(generate_latest(), media_type=_METRICS_TYPE)


# (the server adds the charset to a text type itself: given it too, the header said it twice)
_METRICS_TYPE = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")
