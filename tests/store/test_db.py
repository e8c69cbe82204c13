"""The pool releases connections without a reset round trip, which is safe only while pooled connections keep
no session state: an open transaction is still rolled back, and the code never sets session state."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from store.db import create_pool

ROOT = Path(__file__).resolve().parents[2]
# session-level state a pooled connection would carry to its next user
_SESSION_STATE = re.compile(r"(?i:pg_advisory_lock\(|pg_try_advisory_lock\(|set_config\([^)]*false\)|"
                            r"['\"]\s*SET\s+(?!LOCAL)(?!TRANSACTION)\w|WITH HOLD|['\"]\s*LISTEN\s|"
                            r"\.add_listener\(|\.add_log_listener\()")
# A guard, not a proof: a SET on a later line of a multi-line SQL string looks like UPDATE's SET and is not caught.


def test_no_session_state_in_pooled_code():
    offenders = []
    for d in ("store", "server", "ingest", "agents"):
        for path in (ROOT / d).rglob("*.py"):
            if path.name == "migrate.py":  # its own connection, not the pool's
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if _SESSION_STATE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "pooled connections must not keep session state (see store/db.py _release)"


async def test_release_rolls_back_an_open_transaction(settings):
    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS pool_release_probe (x int)")
            await conn.execute("TRUNCATE pool_release_probe")
        with pytest.raises(RuntimeError):
            async with pool.acquire() as conn:
                tx = conn.transaction()
                await tx.start()
                await conn.execute("INSERT INTO pool_release_probe VALUES (1)")
                raise RuntimeError("the handler failed mid-transaction")
        async with pool.acquire() as conn:  # the same (only) connection, back in a clean state
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM pool_release_probe") == 0
            assert await conn.fetchval("SHOW hnsw.ef_search") == "200"
            await conn.execute("DROP TABLE pool_release_probe")
    finally:
        await pool.close()


async def test_ready_is_not_fooled_by_a_busy_pool(settings):
    """/ready probes Postgres on a connection of its own: a pool with every connection busy is load, not an
    outage (a load balancer would otherwise drop the busiest servers one after another)."""
    import json
    from types import SimpleNamespace

    from redis.asyncio import Redis

    from server.api.health import ready

    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    redis = Redis.from_url(settings.redis_url)
    state = SimpleNamespace(settings=settings, pool=pool, redis=redis)
    try:
        async with pool.acquire():  # the only connection is taken
            resp = await ready.fn(SimpleNamespace(app=SimpleNamespace(state=state)))
        assert resp.status_code == 200, resp.content
        body = resp.content if isinstance(resp.content, dict) else json.loads(resp.content)
        assert body["postgres"] == "ok"
    finally:
        if getattr(state, "ready_conn", None) is not None:
            await state.ready_conn.close()
        await redis.aclose()
        await pool.close()


# `SELECT *`, `RETURNING *`, `alias.*` (not count(*), not `SELECT 1`)
_STAR = re.compile(r"(?i:\bSELECT\s+(?:DISTINCT\s+(?:ON\s*\([^)]*\)\s*)?)?\*|\bRETURNING\s+\*|\b[a-z_][a-z_0-9]*\.\*(?!\*))")


def test_queries_name_their_columns():
    """A statement asyncpg cached returns the row type it was prepared with: after a migration adds a column, a
    `*` statement run inside a transaction fails (InvalidCachedStatementError) on every process still running
    (a rolling deploy). Named columns keep their row type (next test)."""
    offenders = []
    for d in ("store", "server", "ingest", "agents"):
        for path in (ROOT / d).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if _STAR.search(code) and not re.search(r"\b(?:re|fnmatch|glob)\b", code):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "name the columns: " + "; ".join(offenders)


async def test_a_migration_adding_a_column_breaks_star_statements_only(settings):
    """Why the columns are named: inside a transaction, a cached `SELECT *` fails once a column is added (and a
    server answers that failure as a 409 to try again, like a deadlock); the same query naming its columns goes on."""
    import asyncpg

    from server.api.tutor import stream_error

    conn = await asyncpg.connect(settings.database_url)
    other = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("DROP TABLE IF EXISTS cached_stmt_probe; CREATE TABLE cached_stmt_probe (id int, a text)")
        await conn.execute("INSERT INTO cached_stmt_probe VALUES (1, 'x')")
        star, named = "SELECT * FROM cached_stmt_probe WHERE id = $1", "SELECT id, a FROM cached_stmt_probe WHERE id = $1"
        for q in (star, named):  # prepared and cached
            async with conn.transaction():
                assert (await conn.fetchrow(q, 1))["a"] == "x"
        await other.execute("ALTER TABLE cached_stmt_probe ADD COLUMN b int")  # another process migrates
        with pytest.raises(asyncpg.InvalidCachedStatementError) as err:
            async with conn.transaction():
                await conn.fetchrow(star, 1)
        assert stream_error(err.value) == {"status": 409, "code": "conflict", "retry_after": 1,
                                           "message": "a concurrent change got in the way; nothing was stored, try again"}
        async with conn.transaction():
            assert (await conn.fetchrow(named, 1))["a"] == "x"
            assert "b" in await conn.fetchrow(star, 1)  # tried again, it is prepared afresh
    finally:
        await conn.execute("DROP TABLE IF EXISTS cached_stmt_probe")
        await conn.close()
        await other.close()


async def test_a_course_recount_behind_an_ingest_waits_no_longer_than_the_pools_timeout(settings):
    """(Review) a video's deletion recounts its course's terms behind the course's term lock (an ingest of the
    course holds it until it commits) while it holds the course row, which every progress report of the course
    waits for: that wait keeps the pool's own timeout (a server's STUDYHALL_DB_TIMEOUT_S: a 503 to retry), not
    the long one of the recount itself, or the reports queued behind it for up to 10 minutes. Here 0.5 s."""
    import asyncio
    import time

    from store.videos import _TERMS_LOCK, refresh_term_stats

    pool = await create_pool(settings.database_url, min_size=1, max_size=2, command_timeout=0.5)
    try:
        async with pool.acquire() as holder, pool.acquire() as conn:
            tx = holder.transaction()
            await tx.start()
            await holder.execute(_TERMS_LOCK, 987654)
            t0 = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                async with conn.transaction():
                    await refresh_term_stats(conn, 987654)
            assert time.monotonic() - t0 < 5
            await tx.rollback()
    finally:
        await pool.close()
