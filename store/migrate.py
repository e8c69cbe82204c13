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
# A file starting with this line runs statement by statement outside a transaction: for CREATE INDEX CONCURRENTLY
# (an index built without blocking the table's writes), which cannot run inside one. Its statements must be safe to
# run again (IF NOT EXISTS): a failure part way leaves the file to be applied again whole.
NO_TRANSACTION = "-- studyhall: no transaction"
_CONCURRENT_INDEX = re.compile(r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+(?:\w+\.)?(\w+)\s",
                               re.I)
# Checksums a file had before an edit after which a database that applied either version ends up the same (taken
# as its own: no warning). The first texts of 0020 and 0022 stay out, their warnings true: under 0020's, who was
# signed out under 0019 came back signed in; 0022's folded no decomposed accents ("Schrödinger" written as o and a
# combining mark is not found by "schrodinger"), which 0034 kept as sh_fold_accents (0037 drops the stored tsv
# column it also left).
_EARLIER = {
    27: {"1515e88b4b5e404b7bec136d91c7b6bf8a8a24084d94dbb1547400dad1900467"},  # before CONCURRENTLY
    32: {"b5651c9e984a3b355f7f9293d0fb491f1f97c0ced23655bc3801e91d861d7205"},  # built the index 0033 now builds
}
WAIT_LOG_S = 30.0  # while waiting for another process's migration, say who holds it this often


class MigrationError(RuntimeError):
    """A migration that could not be applied, naming it (the CLI says it in one line)."""


def migration_files() -> list[tuple[int, str, str]]:
    """(version, filename, sql) for each migration, in order."""
    out = []
    for path in sorted(MIGRATIONS_DIR.iterdir()):
        m = _NAME.match(path.name)
        if m:
            out.append((int(m.group(1)), path.name, path.read_text(encoding="utf-8")))  # not the locale's
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
        # asked for again and again, not waited for in a statement: a statement waiting holds a snapshot, which a
        # CREATE INDEX CONCURRENTLY of the process migrating waits to end (a deadlock)
        said = 0.0
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            if time.monotonic() - said >= WAIT_LOG_S:
                holder = await conn.fetchrow(
                    """SELECT a.pid, a.state, left(a.query, 200) AS query, a.client_addr::text AS client
                       FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                       WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                         AND l.classid = ($1::bigint >> 32)::oid AND l.objid = ($1::bigint & 4294967295)::oid
                       LIMIT 1""", _LOCK_KEY)
                (logger.warning if said else logger.info)(
                    "waiting for another process to finish migrating the database (%s)",
                    dict(holder) if holder else "holder not visible")
                said = time.monotonic()
            await asyncio.sleep(0.2)
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
            # indexes a failed concurrent build left invalid (one look at start, not one per index)
            invalid = {r["relname"] for r in await conn.fetch(_INVALID)}
            for version, name, sql in files:
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if version in done:
                    if done[version]["checksum"] != checksum and done[version]["checksum"] not in _EARLIER.get(
                            version, ()):
                        logger.warning("migration %s changed after it was applied", name)
                    if invalid and sql.startswith(NO_TRANSACTION):  # an index a failed build left invalid,
                        await _repair_indexes(conn, name, sql, invalid)  # recorded by an older runner: built again
                    continue
                logger.info("applying migration %s", name)
                try:
                    if sql.startswith(NO_TRANSACTION):
                        await _apply_outside(conn, version, name, sql, checksum)
                    else:
                        await _apply(conn, version, name, sql, checksum)
                except asyncpg.PostgresError as exc:  # (nothing of it is recorded: it is applied again next start)
                    raise MigrationError(f"migration {name} failed: {type(exc).__name__}: {exc}") from exc
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
                raise MigrationError(f"migration {name} could not take its locks for {LOCK_RETRY_FOR_S:g} s: a long "
                                   f"transaction holds a table it changes ({exc})") from exc
            logger.warning("migration %s waits for a table a transaction holds; trying again in %g s", name, pause)
            await asyncio.sleep(pause)
            pause = min(30.0, pause * 2)


def _statements(sql: str) -> list[str]:
    """A NO_TRANSACTION file's statements: each ends with `;` at the end of its line (a comment may follow); `--`
    lines are comments. Anything else (two on a line, a `;` inside a statement) is refused rather than run in part."""
    out, current = [], []
    for line in sql.splitlines():
        if line.lstrip().startswith("--"):
            continue
        code = line.partition("--")[0]
        current.append(code)
        if code.rstrip().endswith(";"):
            statement = "\n".join(current).strip()[:-1].strip()
            current = []
            if any(c in statement for c in (";", "$", "/*", "'", '"')):
                raise RuntimeError(f"a no-transaction migration takes plain statements (no quotes, dollar quotes or "
                                   f"block comments), each ended by ';' at its line's end: {statement[:80]!r}")
            if statement:
                out.append(statement)
    if "\n".join(current).strip():
        raise RuntimeError("a no-transaction migration's last statement does not end with ';'")
    return out


_INVALID = """SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
              WHERE NOT i.indisvalid AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"""


async def _invalid(conn: asyncpg.Connection, index: str) -> bool:
    return bool(await conn.fetchval(f"SELECT EXISTS ({_INVALID} AND c.relname = $1)", index.lower()))


async def _build(conn: asyncpg.Connection, name: str, statement: str) -> None:
    """One statement; a concurrent index build that failed (a deadlock with a process of an older version waiting
    for the migration lock inside a statement, say) leaves its index invalid: dropped and built again, a few times."""
    index = _CONCURRENT_INDEX.search(statement + " ")
    for attempt in range(4):
        if index and await _invalid(conn, index.group(1)):
            logger.warning("migration %s: index %s was left invalid by a failed build; building it again", name,
                           index.group(1))
            await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index.group(1)}")
        try:
            await conn.execute(statement)
            return
        except asyncpg.DeadlockDetectedError:
            if not index or attempt == 3:
                raise
            await asyncio.sleep(1.0)


async def _repair_indexes(conn: asyncpg.Connection, name: str, sql: str, invalid: set[str]) -> None:
    """Build again the indexes of an applied file that a failed build left invalid (best effort: whatever goes
    wrong is logged, not raised: every process migrates at start, and this must not stop one). An index being built
    right now (by hand, say) is left to its build."""
    try:
        for statement in _statements(sql):
            index = _CONCURRENT_INDEX.search(statement + " ")
            if not index or index.group(1).lower() not in invalid:
                continue
            if await conn.fetchval(
                    """SELECT EXISTS (SELECT 1 FROM pg_stat_progress_create_index p JOIN pg_class c
                                      ON c.oid = p.index_relid WHERE c.relname = $1)""", index.group(1).lower()):
                continue
            await _build(conn, name, statement)
    except Exception as exc:  # noqa: BLE001
        logger.warning("migration %s: could not rebuild an invalid index (%s: %s); it is tried again at the next "
                       "start", name, type(exc).__name__, exc)


async def _apply_outside(conn: asyncpg.Connection, version: int, name: str, sql: str, checksum: str) -> None:
    """A NO_TRANSACTION file: each statement on its own (see `_statements`). An index a failed CREATE INDEX
    CONCURRENTLY left behind invalid is dropped first (IF NOT EXISTS would keep it, unused for good). No lock
    timeout: a concurrent build waits for older transactions without holding up the table's reads and writes."""
    for statement in _statements(sql):
        await _build(conn, name, statement)
    await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                       version, name, checksum)
