"""Background jobs as durable rows: state, progress, attempts and a human-readable error."""
from __future__ import annotations

from typing import Any

import asyncpg

STATES = ("queued", "fetching", "transcribing", "chunking", "embedding", "chaptering", "grading", "done", "failed")
TERMINAL = ("done", "failed")

_COLS = """id, kind, course_id, video_id, created_by, state, progress, error, attempts, max_attempts, payload,
           created_at, updated_at, started_at, finished_at"""


async def create_job(conn: asyncpg.Connection, kind: str, *, course_id: int | None, video_id: int | None,
                     created_by: int | None, payload: dict[str, Any] | None = None,
                     max_attempts: int = 5) -> asyncpg.Record:
    return await conn.fetchrow(
        f"""INSERT INTO jobs (kind, course_id, video_id, created_by, payload, max_attempts)
            VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLS}""",
        kind, course_id, video_id, created_by, payload or {}, max_attempts,
    )


async def get_job(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"SELECT {_COLS} FROM jobs WHERE id = $1", job_id)


async def start_attempt(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    """Count an attempt and clear the last error; None if the job is gone or already finished."""
    return await conn.fetchrow(
        f"""UPDATE jobs SET attempts = attempts + 1, error = NULL, progress = 0, updated_at = now(),
                   started_at = coalesce(started_at, now())
            WHERE id = $1 AND state NOT IN ('done', 'failed') RETURNING {_COLS}""",
        job_id,
    )


async def give_back_attempt(conn: asyncpg.Connection, job_id: int) -> None:
    """An attempt cut short by its worker stopping (a deploy, Ctrl-C) does not count: the job runs again
    elsewhere, and enough stops would otherwise fail it for `max_attempts`."""
    await conn.execute("UPDATE jobs SET attempts = greatest(attempts - 1, 0), updated_at = now() "
                       "WHERE id = $1 AND state NOT IN ('done', 'failed')", job_id)


async def set_state(conn: asyncpg.Connection, job_id: int, state: str, progress: float,
                    error: str | None = None) -> asyncpg.Record | None:
    """Move an unfinished job; None when it is done or failed already (a late duplicate run must not write
    over another run's outcome)."""
    if state not in STATES:
        raise ValueError(f"unknown job state {state!r}")
    progress = min(1.0, max(0.0, progress))
    return await conn.fetchrow(
        f"""UPDATE jobs SET state = $2, progress = $3, error = $4, updated_at = now(),
                   finished_at = CASE WHEN $2 IN ('done', 'failed') THEN now() ELSE finished_at END
            WHERE id = $1 AND state NOT IN ('done', 'failed') RETURNING {_COLS}""",
        job_id, state, progress, error,
    )


async def note_error(conn: asyncpg.Connection, job_id: int, error: str) -> asyncpg.Record | None:
    """Record why the last attempt failed while the job waits for its retry (back to `queued`); None when the
    job is gone or finished."""
    return await conn.fetchrow(f"UPDATE jobs SET error = $2, state = 'queued', progress = 0, updated_at = now() "
                               f"WHERE id = $1 AND state NOT IN ('done', 'failed') RETURNING {_COLS}", job_id, error)


# Jobs the ingest worker function runs (a `grade` job is a grade-all batch, run by the grading functions).
INGEST_KINDS = ("ingest", "reembed")


async def requeue(conn: asyncpg.Connection, job_id: int) -> asyncpg.Record | None:
    """Put a failed ingest job back in the queue for a fresh set of attempts; None when it is not (or no
    longer) failed, so two concurrent retries start one run."""
    return await conn.fetchrow(
        f"""UPDATE jobs SET state = 'queued', progress = 0, error = NULL, attempts = 0, finished_at = NULL,
                   updated_at = now() WHERE id = $1 AND state = 'failed' AND kind = ANY($2::text[])
            RETURNING {_COLS}""",
        job_id, list(INGEST_KINDS),
    )


async def unfinished_jobs(conn: asyncpg.Connection, older_than_s: float) -> list[asyncpg.Record]:
    """Ingest jobs not done/failed whose row has not moved for a while (their worker may be gone)."""
    return await conn.fetch(
        f"""SELECT {_COLS} FROM jobs WHERE state NOT IN ('done', 'failed') AND kind = ANY($2::text[])
            AND updated_at < now() - make_interval(secs => $1) ORDER BY id""",
        older_than_s, list(INGEST_KINDS),
    )
