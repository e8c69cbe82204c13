"""Apply numbered SQL files from store/migrations in order, once each, under an advisory lock."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from pathlib import Path

import asyncpg

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; every studyhall process migrating the same database contends on it.
_LOCK_KEY = 0x5747_4841_4C4C

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# A migration waits at most this long for a table's lock (behind a long transaction) before it lets go and tries
# again: a statement queued for a lock makes every later query of that table queue behind it, stalling the service.
LOCK_TIMEOUT_S = 5.0
LOCK_RETRY_FOR_S = 300.0  # and gives up, saying why, after trying this long


def migration_files() -> list[tuple[int, str, str]]:
    """(version, filename, sql) for each migration, in order."""
    out = []
    for path in sorted(MIGRATIONS_DIR.iterdir()):
        m = _NAME.match(path.name)
        if m:
            out.append((int(m.group(1)), path.name, path.read_text()))
        elif path.suffix == ".sql":  # skipped quietly, it would never be applied
            raise RuntimeError(f"migration file {path.name} is not named NNNN_lowercase_words.sql")
    versions = [v for v, _, _ in out]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers in {MIGRATIONS_DIR}")
    return out


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations; returns the names applied by this call (empty when up to date)."""
    conn = await asyncpg.connect(dsn)
    applied_now: list[str] = []
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            logger.info("waiting for another process to finish migrating the database")
            await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")}
            files = migration_files()
            newer = sorted(set(done) - {v for v, _, _ in files})
            if newer:
                logger.warning("the database has migrations this studyhall does not know (%s): a newer version "
                               "migrated it, and this one may fail where the schema changed",
                               ", ".join(done[v]["name"] for v in newer))
            for version, name, sql in files:
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if version in done:
                    if done[version]["checksum"] != checksum:
                        logger.warning("migration %s changed after it was applied", name)
                    continue
                logger.info("applying migration %s", name)
                await _apply(conn, version, name, sql, checksum)
                applied_now.append(name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()
    return applied_now


async def _apply(conn: asyncpg.Connection, version: int, name: str, sql: str, checksum: str) -> None:
    """One migration in one transaction, waiting at most LOCK_TIMEOUT_S for each lock; tried again while a long
    transaction holds a table it changes (up to LOCK_RETRY_FOR_S)."""
    give_up = time.monotonic() + LOCK_RETRY_FOR_S
    pause = min(1.0, LOCK_TIMEOUT_S)
    while True:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{int(LOCK_TIMEOUT_S * 1000)}ms'")
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                                   version, name, checksum)
            return
        except asyncpg.LockNotAvailableError as exc:
            if time.monotonic() + pause > give_up:
                raise RuntimeError(f"migration {name} could not take its locks for {LOCK_RETRY_FOR_S:g} s: a long "
                                   f"transaction holds a table it changes ({exc})") from exc
            logger.warning("migration %s waits for a table a transaction holds; trying again in %g s", name, pause)
            await asyncio.sleep(pause)
            pause = min(30.0, pause * 2)
