"""Postgres pool: pgvector and JSON codecs registered on every pooled connection."""
from __future__ import annotations

import json
import logging

import asyncpg
from pgvector.asyncpg import register_vector
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

# Postgres or Redis down, restarting or out of reach (a connection refused, reset or timed out): a request answers
# 503 to retry, a job goes again shortly.
UNREACHABLE: tuple[type[Exception], ...] = (
    ConnectionError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError,
    RedisConnectionError, RedisTimeoutError)


# Statements known to take long (a rebuild's sums over a whole ledger, a course's or video's deletion and recount):
# their own timeout, past a server pool's STUDYHALL_DB_TIMEOUT_S (which is for a Postgres that stopped answering)
LONG_S = 600.0


# HNSW candidate list: higher than pgvector's default 40 so course-filtered searches still fill k.
HNSW_EF_SEARCH = 200


async def _init_connection(conn: asyncpg.Connection) -> None:
    await register_vector(conn)
    await conn.set_type_codec("json", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    # binary jsonb (a version byte, then the text) so COPY ... FROM works with jsonb columns too
    await conn.set_type_codec("jsonb", encoder=_jsonb_encode, decoder=_jsonb_decode, schema="pg_catalog",
                              format="binary")


async def _release(conn: asyncpg.Connection) -> None:
    """Release hook instead of asyncpg's default `RESET ALL; UNLISTEN *; pg_advisory_unlock_all()…`, a round trip
    on every release (about a third of a small request's database time). asyncpg still rolls back an open
    transaction first. Safe because pooled connections keep no session state: settings are `SET LOCAL` /
    `set_config(…, true)` or startup parameters, advisory locks are `pg_advisory_xact_lock`, nothing LISTENs
    (tests/store/test_db.py checks the code for it)."""


def _jsonb_encode(value: object) -> bytes:
    return b"\x01" + json.dumps(value).encode()


def _jsonb_decode(data: bytes) -> object:
    return json.loads(data[1:])


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 20,
                      command_timeout: float = 60.0) -> asyncpg.Pool:
    """Open a pool; the vector extension must already exist (migrations create it). `command_timeout`: a statement
    gives up after this many seconds (TimeoutError, one of UNREACHABLE: a Postgres that stopped answering held a
    request until it answered again), and so does the rollback of its connection when it is released."""
    # A startup parameter, not SET: pooled connections keep no session state (see _release).
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=_init_connection,
                                     reset=_release, command_timeout=command_timeout,
                                     server_settings={"hnsw.ef_search": str(HNSW_EF_SEARCH)})
