"""arq worker settings: jobs are plain async functions; shared clients live in ctx."""
from __future__ import annotations

import logging
from typing import Any

from arq.connections import RedisSettings

from store.db import create_pool
from store.settings import Settings

logger = logging.getLogger(__name__)


async def ping(ctx: dict[str, Any]) -> str:
    """A no-op job, used to check that a worker is consuming."""
    return "pong"


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for arq.Worker bound to these settings."""

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["settings"] = settings
        ctx["pool"] = await create_pool(settings.database_url, min_size=1, max_size=8)

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        pool = ctx.get("pool")
        if pool is not None:
            await pool.close()

    return dict(
        functions=[ping],
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        max_jobs=2,
        job_timeout=3600,
        keep_result=3600,
        max_tries=5,
        handle_signals=True,
    )
