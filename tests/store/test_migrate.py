"""Migrations: idempotent, and safe with two processes at once."""
from __future__ import annotations

import subprocess
import sys
import uuid

import asyncpg
import pytest

from store.migrate import NO_TRANSACTION, _statements, migrate, migration_files
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


async def _migrated_to(conn: asyncpg.Connection, last: int) -> int:
    """Apply the migrations up to `last` by hand (as an older build left the database) and add a course; its id."""
    await conn.execute("""CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                          checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())""")
    for version, name, sql in migration_files():
        if version > last:
            break
        for statement in _statements(sql) if sql.startswith(NO_TRANSACTION) else [sql]:  # CONCURRENTLY: one by one
            await conn.execute(statement)
        await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2, 'x')", version, name)
    tid = await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
    uid = await conn.fetchval("INSERT INTO users (tenant_id, name, role) VALUES ($1, 'i', 'instructor') RETURNING id",
                              tid)
    return await conn.fetchval("INSERT INTO courses (tenant_id, owner_id, title) VALUES ($1, $2, 'c') RETURNING id",
                               tid, uid)


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


def test_upgrade_from_a_database_with_stored_chunks(settings):
    """0007, 0008 and 0022 on a database that already holds chunks (hand-made postings, and a development build's
    df table with stale rows): the postings, df and the course's N and length end up derived from the chunks'
    text, accents folded; the spoken words are filled in."""
    dsn = _fresh_db(settings)

    async def go() -> tuple:
        conn = await asyncpg.connect(dsn)
        try:
            cid = await _migrated_to(conn, 6)
            await conn.execute("""CREATE TABLE course_term_df (course_id bigint NOT NULL REFERENCES courses(id)
                                  ON DELETE CASCADE, embed_model text NOT NULL, lexeme text NOT NULL,
                                  df integer NOT NULL, PRIMARY KEY (course_id, embed_model, lexeme))""")
            vid = await conn.fetchval("INSERT INTO videos (course_id, title, source) VALUES ($1, 'v', 'transcript') "
                                      "RETURNING id", cid)
            chunk = await conn.fetchval(
                """INSERT INTO chunks (video_id, course_id, position, start_s, end_s, text, embed_model)
                   VALUES ($1, $2, 0, 0, 5, 'Schrödinger’s matrices: matrix times matrix', 'm') RETURNING id""",
                vid, cid)
            await conn.execute("""INSERT INTO chunk_terms (course_id, embed_model, lexeme, chunk_id, video_id, tf, dl)
                                  VALUES ($1, 'm', 'matrix', $2, $3, 3, 4), ($1, 'm', 'schrodinger', $2, $3, 1, 4)""",
                               cid, chunk, vid)
            await conn.execute("INSERT INTO course_term_df VALUES ($1, 'm', 'matrix', 7), ($1, 'm', 'gone', 2)", cid)
        finally:
            await conn.close()
        assert [n for n in await migrate(dsn)] == [name for v, name, _ in migration_files() if v > 6]
        conn = await asyncpg.connect(dsn)
        try:
            df = {r["lexeme"]: r["df"] for r in await conn.fetch("SELECT lexeme, df FROM course_term_df")}
            tf = {r["lexeme"]: (r["tf"], r["dl"]) for r in await conn.fetch("SELECT lexeme, tf, dl FROM chunk_terms")}
            stats = tuple(await conn.fetchrow("SELECT n_chunks, total_terms FROM course_term_stats"))
            n_terms = await conn.fetchval("SELECT n_terms FROM chunks")
            words = {r["word"] for r in await conn.fetch("SELECT word FROM video_words")}
            return df, tf, stats, n_terms, words
        finally:
            await conn.close()

    df, tf, stats, n_terms, words = run_sync(go())
    assert df == {"schroding": 1, "matric": 1, "matrix": 1, "time": 1}
    assert tf == {"schroding": (1, 5), "matric": (1, 5), "matrix": (2, 5), "time": (1, 5)}
    assert stats == (1, 5) and n_terms == 5
    assert words == {"schrodinger's", "matrices", "matrix", "times"}


def test_upgrade_keeps_youtube_videos_added_twice_before_the_rule(settings):
    """0016 on a database where a course holds the same YouTube video twice (allowed until then): the upgrade
    succeeds, both rows stay, and a third add is refused by the new index."""
    dsn = _fresh_db(settings)

    async def go() -> list[bool]:
        conn = await asyncpg.connect(dsn)
        try:
            cid = await _migrated_to(conn, 15)
            for _ in range(2):
                await conn.execute("INSERT INTO videos (course_id, title, source, youtube_id) "
                                   "VALUES ($1, 'v', 'youtube', 'dQw4w9WgXcQ')", cid)
        finally:
            await conn.close()
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute("INSERT INTO videos (course_id, title, source, youtube_id) "
                                   "VALUES ($1, 'v', 'youtube', 'dQw4w9WgXcQ')", cid)
            return [r["youtube_duplicate"] for r in await conn.fetch(
                "SELECT youtube_duplicate FROM videos WHERE course_id = $1 ORDER BY id", cid)]
        finally:
            await conn.close()

    assert run_sync(go()) == [False, True]


# Foreign keys to users go without: the product never deletes a user.
_UNINDEXED_FKS = """
SELECT c.conrelid::regclass::text AS child, c.confrelid::regclass::text AS parent, c.conname FROM pg_constraint c
WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace AND c.confrelid <> 'users'::regclass
  AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.conrelid
                  AND (i.indkey::int2[])[0:array_length(c.conkey, 1) - 1] @> c.conkey
                  AND c.conkey @> (i.indkey::int2[])[0:array_length(c.conkey, 1) - 1])
ORDER BY 1, 3
"""


def test_every_foreign_key_to_a_deleted_parent_has_an_index(settings):
    """Deleting a parent row scans a child table without an index under its foreign key, once per row: deleting a
    course with thousands of tutor questions scanned the whole answer cache for each (20 s at 50,000 answers)."""
    async def check() -> list:  # type: ignore[type-arg]
        conn = await asyncpg.connect(settings.database_url)
        try:
            return [tuple(r) for r in await conn.fetch(_UNINDEXED_FKS)]
        finally:
            await conn.close()

    assert run_sync(check()) == []


def test_a_migration_behind_a_long_transaction_lets_go_and_tries_again(settings, tmp_path, monkeypatch):
    """A migration's ALTER waiting for a table a long transaction reads queued every later query of that table behind
    it (the service stalled until that transaction ended). It waits LOCK_TIMEOUT_S at most, lets go (the queries
    go on), and tries again. A misnamed file is an error, not quietly never applied."""
    import asyncio
    import time

    import store.migrate as m

    dsn = _fresh_db(settings)
    monkeypatch.setattr(m, "MIGRATIONS_DIR", tmp_path)
    (tmp_path / "0001_table.sql").write_text("CREATE TABLE t (id int); INSERT INTO t VALUES (1);")
    assert run_sync(m.migrate(dsn)) == ["0001_table.sql"]
    (tmp_path / "0002_column.sql").write_text("ALTER TABLE t ADD COLUMN x int;")
    monkeypatch.setattr(m, "LOCK_TIMEOUT_S", 0.3)

    async def go() -> tuple[list[str], float]:
        holder, reader = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.fetch("SELECT * FROM t")  # a long transaction holding the table
            migrating = asyncio.create_task(m.migrate(dsn))
            await asyncio.sleep(1.0)
            assert not migrating.done()
            t0 = time.monotonic()
            assert await asyncio.wait_for(reader.fetchval("SELECT count(*) FROM t"), 3) == 1  # not queued for good
            waited = time.monotonic() - t0
            await tx.rollback()
            return await asyncio.wait_for(migrating, 10), waited
        finally:
            await holder.close()
            await reader.close()

    applied, waited = run_sync(go())
    assert applied == ["0002_column.sql"] and waited < 1.0
    (tmp_path / "0003_bad-name.sql").write_text("SELECT 1;")
    with pytest.raises(RuntimeError, match="0003_bad-name.sql"):
        m.migration_files()


def test_an_index_migration_builds_concurrently_and_rebuilds_what_a_failed_build_left(settings, tmp_path, monkeypatch):
    """Indexes on busy tables are built CONCURRENTLY (writes go on), which cannot run in a transaction: such a file
    runs statement by statement. A failed concurrent build leaves an invalid index that IF NOT EXISTS would keep for
    good: the next run drops it and builds it again."""
    import store.migrate as m

    dsn = _fresh_db(settings)
    monkeypatch.setattr(m, "MIGRATIONS_DIR", tmp_path)
    (tmp_path / "0001_table.sql").write_text("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (1);")
    (tmp_path / "0002_index.sql").write_text(
        m.NO_TRANSACTION + "\n-- one index\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_x ON t (x);\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_x2 ON t ((x * 2));\n")
    with pytest.raises(m.MigrationError, match="migration 0002_index.sql failed: UniqueViolationError") as failed:
        run_sync(m.migrate(dsn))
    assert isinstance(failed.value.__cause__, asyncpg.UniqueViolationError)

    async def fix_and_look() -> list:  # type: ignore[type-arg]
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = 't_x'::regclass")
            await conn.execute("DELETE FROM t WHERE ctid = (SELECT max(ctid) FROM t)")
            return []
        finally:
            await conn.close()

    async def indexes() -> list:  # type: ignore[type-arg]
        conn = await asyncpg.connect(dsn)
        try:
            return [tuple(r) for r in await conn.fetch(
                """SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                   WHERE i.indrelid = 't'::regclass ORDER BY 1""")]
        finally:
            await conn.close()

    run_sync(fix_and_look())
    assert run_sync(m.migrate(dsn)) == ["0002_index.sql"]
    assert run_sync(indexes()) == [("t_x", True), ("t_x2", True)]
    assert run_sync(m.migrate(dsn)) == []

    # an older runner recorded the file over an index left invalid (it waited for the lock inside a statement, which
    # deadlocked the concurrent build): every run builds such an index again
    async def invalidate() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = 't_x2'::regclass")
        finally:
            await conn.close()

    run_sync(invalidate())
    assert run_sync(m.migrate(dsn)) == [] and run_sync(indexes()) == [("t_x", True), ("t_x2", True)]
    # statements it cannot tell apart are refused, not run in part; a comment after the ';' is fine
    assert m._statements("-- c\nCREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x); -- by x\nSELECT 1;\n") == [
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x)", "SELECT 1"]
    for bad in ("SELECT 1; SELECT 2;\n", "DO $$ BEGIN\nPERFORM 1;\nEND $$;\n", "SELECT 1\n",
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS a ON t (x) WHERE y <> '--';\n"):
        with pytest.raises(RuntimeError):
            m._statements(bad)


def test_upgrade_pads_stored_embeddings_to_the_wider_column(settings):
    """0032: vectors stored 384 wide (MiniLM alone, OpenAI asked for 384) come out zero-padded to 768, their model
    name and cosines unchanged; 0033: the HNSW index is there again (built concurrently) and valid."""
    import numpy as np

    dsn = _fresh_db(settings)
    rng = np.random.default_rng(3)
    old = rng.normal(size=(2, 384)).astype(np.float32)

    async def go() -> tuple:
        conn = await asyncpg.connect(dsn)
        try:
            cid = await _migrated_to(conn, 31)
            vid = await conn.fetchval("INSERT INTO videos (course_id, title, source) VALUES ($1, 'v', 'transcript') "
                                      "RETURNING id", cid)
            for i, v in enumerate([*old, None]):
                await conn.execute(
                    """INSERT INTO chunks (video_id, course_id, position, start_s, end_s, text, embed_model, embedding)
                       VALUES ($1, $2, $3, 0, 5, 'graphs', 'openai:text-embedding-3-small@384', $4::text::vector)""",
                    vid, cid, i, None if v is None else "[" + ",".join(map(str, v.tolist())) + "]")
        finally:
            await conn.close()
        assert await migrate(dsn) == [name for v, name, _ in migration_files() if v > 31]
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT embed_model, embedding::text AS e FROM chunks ORDER BY position")
            cos = await conn.fetchval("SELECT 1 - (a.embedding <=> b.embedding) FROM chunks a, chunks b "
                                      "WHERE a.position = 0 AND b.position = 1")
            valid = await conn.fetchval("SELECT indisvalid FROM pg_index WHERE indexrelid = "
                                        "'chunks_embedding_hnsw'::regclass")
            width = await conn.fetchval("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                                        "WHERE attrelid = 'chunks'::regclass AND attname = 'embedding'")
            return rows, cos, valid, width
        finally:
            await conn.close()

    rows, cos, valid, width = run_sync(go())
    assert width == "vector(768)" and valid
    vecs = [np.array([float(x) for x in r["e"].strip("[]").split(",")]) for r in rows[:2]]
    assert all(v.shape == (768,) and not v[384:].any() for v in vecs)
    assert np.allclose([v[:384] for v in vecs], old, atol=1e-5)
    assert rows[2]["e"] is None and {r["embed_model"] for r in rows} == {"openai:text-embedding-3-small@384"}
    a, b = old
    assert cos == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-5)


def test_a_migration_that_fails_is_named_in_one_line(settings, tmp_path):
    """A migration's SQL error reached the CLI as "DuplicateTableError: …" with no word of which file, and one that
    could not take its locks as a traceback: both now name the migration, in one line, exit status 2."""
    from store.migrate import MigrationError

    dsn = _fresh_db(settings)

    async def squat() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE tenants (id int)")  # in the way of 0001
        finally:
            await conn.close()

    run_sync(squat())
    with pytest.raises(MigrationError, match="migration 0001_init.sql failed: DuplicateTableError"):
        run_sync(migrate(dsn))
    out = subprocess.run([sys.executable, "-m", "server.cli", "migrate"], cwd=ROOT, capture_output=True, text=True,
                         env=clean_env(tmp_path / "d", DATABASE_URL=dsn, REDIS_URL=settings.redis_url), timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "migration 0001_init.sql failed: DuplicateTableError" in out.stderr, out.stderr


def test_a_database_migrated_by_earlier_texts_of_0022_and_0032_ends_up_the_same_and_quietly(settings, caplog):
    """Every start warned "migration 0032 changed after it was applied" on databases that ran its first text (same
    end state), and those that ran 0022's first text kept a stored tsvector column no one reads on chunks (0022's
    warning stays: its first text's folding differed, see store/migrate.py)."""
    import logging

    from store.migrate import _EARLIER

    dsn = _fresh_db(settings)
    run_sync(migrate(dsn))

    async def as_first_written() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("ALTER TABLE chunks ADD COLUMN tsv tsvector "
                               "GENERATED ALWAYS AS (to_tsvector('english', sh_fold(text))) STORED")
            await conn.execute("UPDATE schema_migrations SET checksum = $1 WHERE version = 32",
                               next(iter(_EARLIER[32])))
            await conn.execute("DELETE FROM schema_migrations WHERE version >= 37")
        finally:
            await conn.close()

    async def columns() -> set[str]:
        conn = await asyncpg.connect(dsn)
        try:
            return {r["c"] for r in await conn.fetch("SELECT column_name AS c FROM information_schema.columns "
                                                     "WHERE table_name = 'chunks'")}
        finally:
            await conn.close()

    run_sync(as_first_written())
    with caplog.at_level(logging.WARNING, logger="store.migrate"):
        applied = run_sync(migrate(dsn))
    assert applied[0] == "0037_drop_stale_tsv.sql", applied
    assert "tsv" not in run_sync(columns()) and "text" in run_sync(columns())
    assert not [r for r in caplog.records if "changed after it was applied" in r.getMessage()], caplog.text


def test_upgrade_drops_the_choice_rewatch_advice_without_a_moment(settings):
    """0054: grades stored before a wrong multiple-choice answer was advised to rewatch only a moment its question
    has (hand-written questions have none; a deleted video's link went, its sentence stayed) lose the sentence; one
    with its moment keeps it, and so does the shown grade (`released`) that has its moment."""
    import json

    dsn = _fresh_db(settings)
    advice = "Rewatch the moment this question is based on, then try again."

    async def go() -> list:  # type: ignore[type-arg]
        conn = await asyncpg.connect(dsn)
        try:
            cid = await _migrated_to(conn, 53)
            uid = await conn.fetchval("SELECT owner_id FROM courses WHERE id = $1", cid)
            aid = await conn.fetchval(
                """INSERT INTO assignments (course_id, type, title, prompt, options, correct, created_by)
                   VALUES ($1, 'multiple_choice', 'q', 'p', '["a", "b"]', '[1]', $2) RETURNING id""", cid, uid)
            moment = {"video_id": 1, "start": 5.0, "end": 9.0}
            for attempt, feedback, released in (
                    (1, {"right": "Not correct.", "improve": advice}, None),
                    (2, {"right": "Not correct.", "improve": advice, "rewatch": moment},
                     {"feedback": {"right": "Not correct.", "improve": advice}}),
                    (3, {"right": "Not correct.", "improve": "Explain why."},
                     {"feedback": {"right": "x", "improve": advice, "rewatch": moment}})):
                await conn.execute(
                    """INSERT INTO submissions (assignment_id, course_id, user_id, attempt, answer, status, feedback,
                                                released) VALUES ($1, $2, $3, $4, '[0]', 'graded', $5, $6)""",
                    aid, cid, uid, attempt, json.dumps(feedback), json.dumps(released) if released else None)
        finally:
            await conn.close()
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            return [(json.loads(r["feedback"]), json.loads(r["released"]) if r["released"] else None)
                    for r in await conn.fetch("SELECT feedback::text, released::text FROM submissions ORDER BY attempt")]
        finally:
            await conn.close()

    (f1, r1), (f2, r2), (f3, r3) = run_sync(go())
    assert f1 == {"right": "Not correct."} and r1 is None
    assert f2["improve"] == advice and r2 == {"feedback": {"right": "Not correct."}}
    assert f3["improve"] == "Explain why." and r3["feedback"]["improve"] == advice
