"""Migrations: idempotent, and safe with two processes at once."""
from __future__ import annotations

import subprocess
import sys
import uuid

import asyncpg

from store.migrate import migrate, migration_files
from tests.conftest import ROOT, clean_env, run_sync


def _fresh_db(settings) -> str:
    name = f"m_{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    run_sync(go())
    return settings.database_url.rsplit("/", 1)[0] + "/" + name


async def _state(dsn: str) -> tuple[list, list]:
    conn = await asyncpg.connect(dsn)
    try:
        applied = [tuple(r) for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations ORDER BY 1")]
        tables = [r["t"] for r in await conn.fetch(
            "SELECT table_name AS t FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1")]
        return applied, tables
    finally:
        await conn.close()


def test_migrate_twice_changes_nothing(settings):
    dsn = _fresh_db(settings)
    first = run_sync(migrate(dsn))
    assert first == [name for _, name, _ in migration_files()]
    before = run_sync(_state(dsn))
    assert run_sync(migrate(dsn)) == []
    assert run_sync(_state(dsn)) == before
    assert {"tenants", "users", "courses", "videos", "transcript_segments", "chunks", "chapters", "enrollments",
            "rooms", "messages", "jobs"} <= set(before[1])


def test_pgvector_works(settings):
    async def go() -> float:
        conn = await asyncpg.connect(settings.database_url)
        try:
            return await conn.fetchval("SELECT '[1,0,0]'::vector <=> '[0,1,0]'::vector")
        finally:
            await conn.close()

    assert run_sync(go()) == 1.0


def test_concurrent_migrate_processes(settings, data_dir):
    dsn = _fresh_db(settings)
    env = clean_env(data_dir, DATABASE_URL=dsn, REDIS_URL=settings.redis_url)
    procs = [subprocess.Popen([sys.executable, "-m", "server.cli", "migrate"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = sorted(o[0].strip() for o in outs)
    assert said[0].startswith("applied:") and said[1] == "database is up to date", said
    applied, _ = run_sync(_state(dsn))
    assert [a[0] for a in applied] == [v for v, _, _ in migration_files()]
