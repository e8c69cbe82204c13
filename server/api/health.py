"""Liveness, readiness and Prometheus metrics."""
from __future__ import annotations

import asyncio

from litestar import Request, Response, get
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


@get("/health", exclude_from_auth=True, include_in_schema=False)
async def health() -> dict:
    return {"status": "ok"}


@get("/ready", exclude_from_auth=True, include_in_schema=False)
async def ready(request: Request) -> Response:
    state = request.app.state
    checks: dict[str, str] = {}

    async def pg() -> None:
        async with state.pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def rd() -> None:
        await state.redis.ping()

    for name, probe in (("postgres", pg), ("redis", rd)):
        try:
            await asyncio.wait_for(probe(), timeout=2)
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks[name] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return Response({"status": "ok" if ok else "unavailable", **checks},
                    status_code=200 if ok else HTTP_503_SERVICE_UNAVAILABLE)


@get("/metrics", exclude_from_auth=True, include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
