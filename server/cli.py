"""`studyhall` command line: up, serve, worker, migrate, token, ingest, reembed, leaderboards, ask."""
from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import asyncpg
from redis.exceptions import RedisError

from agents.embedder import EmbedderError
from agents.evidence import mmss
from agents.llm import LLMError
from store.embedded import EmbeddedError, Services, ensure_services
from store.migrate import MigrationError
from store.keys import INGEST_QUEUE
from store.settings import Settings, load_settings

logger = logging.getLogger("studyhall")


def citation_line(i: int, c: dict) -> str:
    """`[1] Title 0:10 (quoted at 0:20) url`: the moment's start, and when its quote is said when that is later (the
    offline answer names the quote's time; the line named only the start, up to 20 s earlier)."""
    # a second or more after the start, and something quoted (a Socratic hint quotes nothing)
    later = c.get("quote") and c.get("quote_at") is not None and c["quote_at"] - c.get("start", 0) >= 1
    when = f"{c['label']} (quoted at {mmss(c['quote_at'])})" if later else c["label"]
    return f"[{i}] {c['video_title']} {when} {c['url'] or ''}".rstrip()


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(getattr(args, "data_dir", None))
    if getattr(args, "host", None):
        settings = replace(settings, host=args.host)
    if getattr(args, "port", None) is not None:
        settings = replace(settings, port=args.port)
    return settings


def _start(args: argparse.Namespace, *, one_shot: bool = False) -> tuple[Settings, Services]:
    """Settings and running services. A `one_shot` command (a token, an answer, an ingest) logs warnings and
    errors only unless STUDYHALL_LOG_LEVEL says otherwise: its output is what was asked for, and a mistake one
    line on stderr, not after the embedded servers' start and stop notes."""
    from server.observability import setup_logging

    settings = _settings(args)
    setup_logging("WARNING" if one_shot and not os.environ.get("STUDYHALL_LOG_LEVEL") else settings.log_level)
    services = ensure_services(settings, announce=not one_shot)  # a one-off command is joined by nobody
    return settings.with_urls(services.database_url, services.redis_url), services


def _check_listen(args: argparse.Namespace) -> None:
    """The server's address can be listened on, checked before any embedded server starts: a host name nothing
    resolves, an address that is not this machine's, or a port in use is one line naming it (exit 2). uvicorn said
    "[Errno -2] Name or service not known" after the migrations, naming neither the setting nor the host."""
    settings = _settings(args)
    where = f"{settings.host}:{settings.port} (STUDYHALL_HOST / --host, STUDYHALL_PORT / --port)"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise CliError(f"cannot listen on {where}: no such address ({getattr(exc, 'strerror', None) or exc})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds)
        try:
            probe.bind(addr)
        except OSError as exc:
            raise CliError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    from store import embedded

    embedded.RESERVED_PORTS.add(settings.port)  # (an embedded server started next must not take it: tester)


def _migrate(settings: Settings) -> list[str]:
    from store.migrate import migrate

    return asyncio.run(migrate(settings.database_url))


# How long a start waits for a Redis that is still loading its data (an append-only file of a few GB takes minutes).
REDIS_LOAD_WAIT_S = 600.0


def _check_redis(settings: Settings) -> None:
    """Redis answers (a RedisError or OSError otherwise: one line and exit 2, as for Postgres; inside the server's
    startup it was a traceback and exit 3). A Redis still loading its data (just restarted: the embedded one counts
    as started once it answers at all) is waited for, up to REDIS_LOAD_WAIT_S."""
    from redis.asyncio import Redis
    from redis.exceptions import BusyLoadingError

    async def ping() -> None:
        redis = Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=5)
        deadline, told = time.monotonic() + REDIS_LOAD_WAIT_S, False
        try:
            while True:
                try:
                    await redis.ping()
                    return
                except BusyLoadingError:
                    if time.monotonic() > deadline:
                        raise
                    if not told:
                        logger.info("Redis is loading its data; waiting for it")
                        told = True
                    await asyncio.sleep(0.1)
        finally:
            await redis.aclose()

    asyncio.run(ping())


# Seconds a stopping server gives tutor answers under way before it stops them (inside uvicorn's 10 s wait for
# open connections, so an SSE stream it must abandon still ends with its `interrupted` event).
ANSWER_GRACE_S = 7.0


def _serve(settings: Settings) -> None:
    server, _config = _server(settings)
    server.run()


def _server(settings: Settings):  # type: ignore[no-untyped-def]
    """The uvicorn server for the app and its config (`config.bind_socket()` binds before `run(sockets=)`)."""
    import uvicorn

    from server import tutoring
    from server.app import create_app
    from server.observability import access_log_middleware
    from server.http_transport import HttpProtocol
    from server.realtime.transport import WsProtocol
    from server.uploads import stop_uploads

    app = create_app(settings)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list | None = None) -> None:  # type: ignore[override]
            # Tutor answers get their grace from the moment the stop begins, not after uvicorn's wait for open
            # connections (which would cut their SSE streams first); the app's own drain then finds them done.
            early = asyncio.ensure_future(tutoring.drain(app.state, timeout=ANSWER_GRACE_S))
            stop_uploads(app.state)  # (an upload cut off by uvicorn's wait got its plain-text 500)
            try:
                await super().shutdown(sockets)
            finally:
                await early

    # the access log outermost, so it sees every status
    # per-message deflate off: room frames are small JSON, and compressing each one for each socket cost ~5x the
    # send CPU and ~35 KB a socket
    config = uvicorn.Config(access_log_middleware(app), host=settings.host, port=settings.port, log_config=None,
                            access_log=False, lifespan="on", http=HttpProtocol, ws=WsProtocol, ws_max_size=64 * 1024,
                            ws_per_message_deflate=False, timeout_graceful_shutdown=10)
    return Server(config), config


def cmd_migrate(args: argparse.Namespace) -> int:
    settings, services = _start(args, one_shot=True)
    try:
        applied = _migrate(settings)
        print("applied: " + ", ".join(applied) if applied else "database is up to date")
    finally:
        services.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _check_listen(args)
    settings, services = _start(args)
    try:
        _migrate(settings)
        _check_redis(settings)
        _serve(settings)
    finally:
        services.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from ingest.jobs import mark_stopping
    from ingest.worker import ResilientWorker, run_workers, worker_settings

    settings, services = _start(args)
    up_pid = int(os.environ.get("STUDYHALL_UP_PID") or 0)
    orphaned = []
    if up_pid and up_pid == os.getppid():  # started by `up`: it dying (even by kill -9) stops this worker

        def parent_died(_signum: int, _frame: object) -> None:
            orphaned.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # arq's own graceful stop

        signal.signal(signal.SIGUSR1, parent_died)
    try:
        _migrate(settings)
        _check_redis(settings)  # (arq's own connect gives up after 5 s: a Redis loading its data after a restart)
        # arq binds each worker to the current event loop at construction; run_workers handles SIGTERM/SIGINT.
        asyncio.set_event_loop(asyncio.new_event_loop())
        run_workers([ResilientWorker(**worker_settings(settings, q)) for q in args.queues],
                    on_stop=mark_stopping)  # jobs cancelled by the stop give their attempt back
    finally:
        if orphaned:  # `up` is still exiting (and holds the servers) until this process is handed to another
            deadline = time.monotonic() + 5
            while os.getppid() == up_pid and time.monotonic() < deadline:
                time.sleep(0.02)
        services.close()
    return 0


async def _make_token(settings: Settings, user: str, role: str, tenant: str, ttl_s: int | None, *,
                      any_staff: bool = False) -> str:
    from server.auth import issue_token
    from store.db import create_pool
    from store import users as repo

    pool = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn, conn.transaction():
            # a name an older studyhall stored as typed (untrimmed, invisible characters) is still found, before the
            # name as stored now is looked up or made (which made a second, look-alike user beside it)
            typed_tenant, typed_user = getattr(tenant, "typed", tenant), getattr(user, "typed", user)
            tenant_id = (await conn.fetchval("SELECT id FROM tenants WHERE name = $1", typed_tenant)
                         if typed_tenant != tenant else None) or await repo.ensure_tenant(conn, tenant)
            row = (await conn.fetchrow("SELECT id, tenant_id, name, role FROM users WHERE tenant_id = $1 AND name = $2",
                                       tenant_id, typed_user) if typed_user != user else None) \
                or await repo.ensure_user(conn, tenant_id, user, role)
            if any_staff and row["role"] in ("instructor", "admin"):
                role = row["role"]
            if row["role"] != role:  # roles are read from the database: changing it would break their tokens
                raise CliError(f"{user!r} of tenant {tenant!r} has the role {row['role']}, not {role}; "
                               "use that role or another name")
            if role == "bot":
                token_id = (await repo.create_api_token(conn, row["id"], "cli"))["id"]
                return issue_token(settings.secret, row["id"], tenant_id, role, ttl_s=None, token_id=token_id)
            gen = await conn.fetchval("SELECT token_gen FROM users WHERE id = $1", row["id"])
        return issue_token(settings.secret, row["id"], tenant_id, role, ttl_s=ttl_s or settings.token_ttl_s, gen=gen)
    finally:
        await pool.close()


def cmd_token(args: argparse.Namespace) -> int:
    settings, services = _start(args, one_shot=True)
    try:
        _migrate(settings)
        token = asyncio.run(_make_token(settings, args.user, args.role, args.tenant, args.ttl))
    finally:
        services.close()
    print(token)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    settings, services = _start(args, one_shot=True)
    try:
        _migrate(settings)
        return asyncio.run(_ingest(settings, args))
    finally:
        services.close()


async def _ingest(settings: Settings, args: argparse.Namespace) -> int:
    import uuid
    from pathlib import Path

    from agents.config import embedder_for
    from ingest.errors import IngestError
    from ingest.jobs import connect_arq, ingest_job
    from ingest.submit import DuplicateVideo, inspect_file, submit_video, title_from_filename
    from ingest.youtube import parse_youtube_id
    from server.uploads import make_durable
    from store.db import create_pool

    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    arq = await connect_arq(settings.redis_url)
    try:
        owner = await pool.fetchval("SELECT owner_id FROM courses WHERE id = $1", args.course_id)
        if owner is None:
            raise CliError(f"course {args.course_id} not found")
        if args.youtube:
            try:
                yt = parse_youtube_id(args.youtube)
            except ValueError as exc:
                print(exc, file=sys.stderr)
                return 2
            kw: dict = dict(title=args.title or yt, youtube_id=yt)
        else:
            src = Path(args.file)
            if not src.is_file():
                print(f"studyhall: {src} is a directory, not a file" if src.is_dir()
                      else f"studyhall: no such file: {src}", file=sys.stderr)
                return 2
            if src.stat().st_size > settings.max_upload_bytes:  # the limit an upload has over REST (413)
                print(f"cannot ingest {src}: larger than the upload limit of {settings.max_upload_bytes // 2**20} MB "
                      "(STUDYHALL_MAX_UPLOAD_MB)", file=sys.stderr)
                return 2
            # a name that is not UTF-8 (bytes the file system allows) is stored as the upload's name would be
            name = os.fsencode(src.name).decode("utf-8", errors="replace")
            dest = settings.data_dir / "uploads" / str(args.course_id) / f"{uuid.uuid4().hex}.upload"
            dest.parent.mkdir(parents=True, exist_ok=True)
            kept = False
            try:
                shutil.copyfile(src, dest)
                await asyncio.to_thread(make_durable, dest)  # on disk before its video row commits, as uploads
                source, kind = inspect_file(dest, name)
                kw = dict(title=args.title or title_from_filename(name), file_path=dest, filename=name,
                          source=source, kind=kind)
                kept = True
            except IngestError as exc:
                print(f"cannot ingest {src}: {exc.reason}", file=sys.stderr)
                return 2
            finally:
                if not kept:  # nothing refers to the copy
                    dest.unlink(missing_ok=True)
        worker_alive = bool(await arq.exists(INGEST_QUEUE + ":health-check"))
        try:
            video_id, job_id = await submit_video(pool, arq if worker_alive else None, settings, args.course_id,
                                                  owner, **kw)
        except BaseException as exc:
            if "file_path" in kw:  # the copy goes unless its video committed (a stop can land after the commit)
                await _drop_unclaimed(pool, kw["file_path"])
            if isinstance(exc, DuplicateVideo):
                raise CliError(str(exc)) from None
            raise
        print(f"video {video_id}, job {job_id}" + ("" if worker_alive else " (no worker running: ingesting here)"),
              file=sys.stderr)
        runner = None
        if not worker_alive:
            ctx = {"pool": pool, "settings": settings, "redis": arq, "job_id": f"cli-{job_id}",
                   "embedder": lambda: embedder_for(settings)}
            runner = asyncio.create_task(_run_inline(ingest_job, ctx, job_id))
        job = await _progress(pool, job_id, arq if worker_alive else None, gone_after=args.worker_wait)
        if job is None:
            print(f"\njob {job_id}: no worker has been consuming jobs for {args.worker_wait:.0f} s "
                  "(the worker stopped); the job stays queued for the next worker (`studyhall worker`, or `make run`)",
                  file=sys.stderr)
            now = await pool.fetchrow("SELECT state, error FROM jobs WHERE id = $1", job_id)  # (it may be mid-way)
            _ingest_result(args, video_id, job_id, now["state"] if now else "deleted", now["error"] if now else None)
            return 1
        if runner is not None:
            await runner
        print(f"job {job_id}: {job['state']}" + (f" ({job['error']})" if job["error"] else ""), file=sys.stderr)
        _ingest_result(args, video_id, job_id, job["state"], job["error"])
        return 0 if job["state"] == "done" else 1
    finally:
        await arq.aclose()
        await pool.close()


def _ingest_result(args: argparse.Namespace, video_id: int, job_id: int, state: str, error: str | None) -> None:
    """With --json, the outcome on stdout for scripts (the progress and messages stay on stderr)."""
    if args.json:
        print(json.dumps({"video_id": video_id, "job_id": job_id, "state": state, "error": error}), flush=True)


async def _drop_unclaimed(pool, path) -> None:  # type: ignore[no-untyped-def]
    """Delete an uploaded copy no video refers to; when that cannot be told (the database away), leave it to the
    worker's hourly sweep of unclaimed uploads."""
    try:
        claimed = await pool.fetchval("SELECT EXISTS (SELECT 1 FROM videos WHERE file_path = $1)", str(path))
    except Exception:  # noqa: BLE001
        return
    if not claimed:
        path.unlink(missing_ok=True)


async def _run_inline(job_fn, ctx: dict, job_id: int) -> None:  # type: ignore[no-untyped-def]
    from arq import Retry

    while True:
        try:
            await job_fn(ctx, job_id)
            return
        except Retry as retry:
            await asyncio.sleep((retry.defer_score or 0) / 1000)


def _queues(text: str) -> tuple[str, ...]:
    from ingest.worker import WORKER_QUEUES

    got = tuple(dict.fromkeys(q.strip() for q in text.split(",") if q.strip()))
    bad = [q for q in got if q not in WORKER_QUEUES]
    if not got or bad:
        raise argparse.ArgumentTypeError(f"queues are a comma-separated list of {', '.join(WORKER_QUEUES)}"
                                         + (f"; not {', '.join(bad)}" if bad else ""))
    return got


WORKER_GONE_S = 20.0  # `ingest` gives up waiting when no worker has reported healthy for this long (--worker-wait)


async def _progress(pool, job_id: int, arq=None, gone_after: float = WORKER_GONE_S):  # type: ignore[no-untyped-def]
    """Draw a progress bar until the job is done or failed; None when `arq` is given and no worker has been
    alive (arq's health-check key) for `gone_after` seconds."""
    from store.db import UNREACHABLE

    width, shown = 30, None
    seen_worker, checked, away = time.monotonic(), 0.0, None
    while True:
        try:
            if arq is not None and time.monotonic() - checked >= 2:
                checked = time.monotonic()
                if await arq.exists(INGEST_QUEUE + ":health-check"):
                    seen_worker = checked
                elif checked - seen_worker >= gone_after:
                    return None
            job = await pool.fetchrow("SELECT state, progress, error FROM jobs WHERE id = $1", job_id)
        except UNREACHABLE as exc:
            # (tester) Postgres or Redis restarting under `up`: the job goes on in the worker; this watch waits for
            # them as long as for a worker, rather than failing a job that then succeeded (run here, with no worker,
            # the job itself failed with them: no waiting then, review)
            if arq is None:
                raise
            if away is None:
                away, shown = time.monotonic(), None
                print(f"\n(the database or Redis cannot be reached: {type(exc).__name__}; waiting for it)",
                      file=sys.stderr, flush=True)
            elif time.monotonic() - away > gone_after:
                raise
            await asyncio.sleep(1.0)
            continue
        if away is not None:  # back: the worker's health mark returns with its next beat (review)
            away, seen_worker = None, time.monotonic()
        if job is None:
            raise CliError(f"job {job_id} is gone: its video or course was deleted")
        line = f"[{'#' * int(job['progress'] * width):<{width}}] {job['progress'] * 100:5.1f}% {job['state']}"
        if job["state"] == "queued" and job["error"]:  # an attempt failed: why, and when it goes again
            line += f" ({job['error']})"
        if line != shown and sys.stderr.isatty():
            # one row of the terminal (a long retry reason wrapped, and \r rewrote only its last row), blanking what
            # a longer line before it left
            cols = max(20, shutil.get_terminal_size().columns - 1)
            print("\r" + line[:cols].ljust(min(cols, max(60, len(shown or "")))), end="", file=sys.stderr, flush=True)
        elif line != shown:
            print(line, file=sys.stderr, flush=True)
        shown = line
        if job["state"] in ("done", "failed"):
            if sys.stderr.isatty():
                print(file=sys.stderr)
            return job
        await asyncio.sleep(0.2)


def cmd_reembed(args: argparse.Namespace) -> int:
    settings, services = _start(args, one_shot=True)
    try:
        _migrate(settings)
        jobs, worker_alive = asyncio.run(_reembed(settings, args.course))
        print(f"queued {len(jobs)} re-embed jobs" + (f": {jobs}" if jobs else ""))
        if jobs and not worker_alive:
            print("studyhall: no worker is running: the jobs wait for one (studyhall worker, or studyhall up), which "
                  "must embed with the model set here (STUDYHALL_EMBEDDER)", file=sys.stderr)
    finally:
        services.close()
    return 0


async def _reembed(settings: Settings, course_id: int | None) -> tuple[list[int], bool]:
    """The re-embed jobs queued (CliError when `course_id` names no course), and whether a worker is alive."""
    from agents.config import embedder_for
    from ingest.jobs import connect_arq
    from ingest.submit import submit_reembed
    from store.db import create_pool

    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    arq = await connect_arq(settings.redis_url)
    try:
        if course_id is not None and not await pool.fetchval("SELECT EXISTS (SELECT 1 FROM courses WHERE id = $1)",
                                                             course_id):
            raise CliError(f"course {course_id} not found")
        jobs = await submit_reembed(pool, arq, settings, embedder_for(settings).name, course_id) or []
        return jobs, bool(await arq.exists(INGEST_QUEUE + ":health-check"))
    finally:
        await arq.aclose()
        await pool.close()


def cmd_leaderboards(args: argparse.Namespace) -> int:
    """`leaderboards rebuild`: rebuild every board from the XP ledger; `leaderboards check`: compare them."""
    settings, services = _start(args, one_shot=True)
    try:
        _migrate(settings)
        return asyncio.run(_leaderboards(settings, args.action))
    finally:
        services.close()


async def _leaderboards(settings: Settings, action: str) -> int:
    from redis.asyncio import Redis

    from store import keys, leaderboard_rebuild
    from store.db import create_pool

    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    redis = Redis.from_url(settings.redis_url)
    try:
        if action == "check":
            bad = await leaderboard_rebuild.check(pool, redis)
            built = bool(await redis.exists(keys.LEADERBOARD_BUILT))
            said = f"{len(bad)} boards differ from the XP ledger: {', '.join(bad[:10])}" if bad else ""
            if not built:  # (Redis lost them: what differs is only what was never built)
                said = (f"{said}; " if said else "") + (
                    "the boards are not built (a fresh install, Redis lost them, or a rebuild is finishing): "
                    "`studyhall leaderboards rebuild`, a server start or a read builds them")
            print(said or "boards match the XP ledger")
            return 0 if not bad and built else 1
        done = await leaderboard_rebuild.rebuild(pool, redis)
        if done is None:
            print("another process is rebuilding the leaderboards", file=sys.stderr)
            return 1
        print(f"rebuilt {done.boards} boards ({done.entries} entries, {done.replayed} replayed) in {done.seconds:.2f} s")
        return 0
    finally:
        await redis.aclose()
        await pool.close()


def cmd_ask(args: argparse.Namespace) -> int:
    settings, services = _start(args, one_shot=True)
    try:
        _migrate(settings)
        return asyncio.run(_ask(settings, args))
    finally:
        services.close()


async def _ask(settings: Settings, args: argparse.Namespace) -> int:
    from types import SimpleNamespace

    from redis.asyncio import Redis

    from server.auth import AuthUser
    from server.errors import ApiError
    from server.tutoring import ask
    from store.db import create_pool

    pool = await create_pool(settings.database_url, min_size=1, max_size=4)
    redis = Redis.from_url(settings.redis_url)
    try:
        if args.as_user is None:  # the course's owner
            row = await pool.fetchrow("""SELECT u.id, u.tenant_id, u.name, u.role, t.name AS tenant FROM courses c
                                         JOIN users u ON u.id = c.owner_id JOIN tenants t ON t.id = u.tenant_id
                                         WHERE c.id = $1""", args.course_id)
            if row is None:
                raise CliError(f"course {args.course_id} not found")
        else:
            row = await pool.fetchrow("""SELECT u.id, u.tenant_id, u.name, u.role, t.name AS tenant FROM users u
                                         JOIN tenants t ON t.id = u.tenant_id WHERE u.id = $1""", args.as_user)
            if row is None:
                raise CliError(f"user {args.as_user} not found")
        user = AuthUser(id=row["id"], tenant_id=row["tenant_id"], tenant=row["tenant"], name=row["name"],
                        role=row["role"])
        if args.as_user is not None:  # asks as that user would over REST: a course they may see
            from server.api.courses import course_or_404

            async with pool.acquire() as conn:
                try:
                    await course_or_404(conn, args.course_id, user)
                except ApiError as exc:
                    raise CliError(f"user {user.id}: {exc.detail}") from None
        state = SimpleNamespace(settings=settings, pool=pool, redis=redis)

        streamed: list[str] = []

        async def on_delta(text: str) -> None:
            if not args.json:
                streamed.append(text)
                print(text, end="", flush=True)

        try:
            result = await ask(state, user, args.course_id, args.question, session_id=args.session,
                               on_delta=on_delta)
        except ApiError as exc:  # what the REST ask would refuse (an unknown session, the daily limit): a mistake
            raise CliError(exc.detail) from None
        if args.json:
            from server.api.tutor import _public

            print(json.dumps(_public(result), default=str))
        else:
            shown, final = "".join(streamed).strip(), (result.get("answer") or "").strip()
            if not shown:  # a decline, or an answer from the cache: nothing was streamed
                print(final)
            elif shown != final:  # markers renumbered, or a note that the model failed
                print(f"\n\nas stored, with its citations numbered:\n{final}")
            else:
                print()
            for i, c in enumerate(result["citations"], 1):
                print(citation_line(i, c))
            for q in result["follow_ups"]:
                print(f"? {q}")
        if result.get("error"):  # stored and printed as the rooms see it; the status says it failed
            print(f"studyhall: {result['error']}", file=sys.stderr)  # (failed, or would not answer: its public words)
            return 1
        return 0
    finally:
        await redis.aclose()
        await pool.close()


def _worker_preexec():  # type: ignore[no-untyped-def]
    """The worker's preexec_fn, resolved here, in the parent (between fork and exec the child imports nothing):
    - SIGUSR1 it when the thread that started it dies (Linux prctl PR_SET_PDEATHSIG); the worker then stops like on
      SIGTERM, and stops the embedded servers once the parent's hold on them is gone. (Not Linux: a killed `up` may
      leave its worker behind.)
    - Ctrl-C ignored until the worker's `main` takes it (SIGINT reaches the whole process group: a Ctrl-C in the
      second or so the worker spends importing printed a KeyboardInterrupt traceback from it; `up`, stopping on the
      same Ctrl-C, stops the worker with SIGTERM). libc's `signal`, not Python's: the child of a worker started
      again is forked from `up`'s watching thread, not its main thread.
    None where there is no libc.so.6 (not Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        prctl, ignore = libc.prctl, libc.signal
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        ignore(signal.SIGINT, 1)  # 1 = SIG_IGN
        prctl(1, signal.SIGUSR1)  # 1 = PR_SET_PDEATHSIG

    return preexec


class _Revive:
    """`up`'s watch on the embedded servers it uses: one that stopped (killed, out of memory) is started again on
    its port every REVIVE_S, where the server and workers find it again (they answered 503 until restarted)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="embedded-watch", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        from store.embedded import revive

        while not self.stopping.wait(REVIVE_S):
            try:
                revive(self.services)
            except Exception:  # noqa: BLE001 - tried again on the next look
                logger.warning("could not start an embedded server again", exc_info=True)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=120)  # (a start under way finishes before `up` stops the servers)


REVIVE_S = 5.0


class _Worker:
    """`up`'s worker (both queues), started again (after 1 s, doubling to 30 s while it keeps dying) when it dies
    on its own: killed by the out-of-memory killer mid-transcription, say (uploads stayed queued). A worker that stopped
    on a signal (Ctrl-C reaches the whole process group) is not started again. The death signal is tied to the
    thread that starts a worker, so the watching thread lives until the worker it started has stopped."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.preexec = _worker_preexec()
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # no more restarts
        self.stopped = threading.Event()  # the worker is gone: the watching thread may end
        self.proc = self._spawn()
        threading.Thread(target=self._watch, name="worker-watch", daemon=True).start()

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "server.cli", "worker"], env=self.env, preexec_fn=self.preexec)

    def _watch(self) -> None:
        delay, started, left = 1.0, time.monotonic(), None
        while not self.stopped.wait(1.0):
            code = self.proc.poll()
            if code is None or self.stopping.is_set() or self.proc is left:
                continue
            if code in (0, -signal.SIGINT, -signal.SIGTERM, -signal.SIGHUP):
                logger.info("the worker stopped (status %s)", code)
                left = self.proc  # said once; it stays stopped
                continue
            if time.monotonic() - started > 60:
                delay = 1.0
            logger.warning("the worker died (status %s); starting it again in %.0f s", code, delay)
            if self.stopping.wait(delay):
                continue
            with self.lock:
                if not self.stopping.is_set():
                    self.proc, started, delay = self._spawn(), time.monotonic(), min(30.0, delay * 2)

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                logger.warning("the worker did not stop within 30 s; killing it")
                self.proc.kill()
                # gone before `up` looks whether anyone still uses the embedded servers (the dying worker held the
                # lock on them: `up` left them running with no studyhall process)
                self.proc.wait()
        self.stopped.set()


def cmd_up(args: argparse.Namespace) -> int:
    _check_listen(args)
    settings, services = _start(args)
    worker = None
    watch = _Revive(services) if services.embedded_pg or services.embedded_redis else None
    try:
        _migrate(settings)
        _check_redis(settings)
        # the dev user keeps a staff role it was given (admin, say); a learner or bot of that name is refused
        token = asyncio.run(_make_token(settings, "dev-instructor", "instructor", "default", None, any_staff=True))
        server, config = _server(settings)
        sock = config.bind_socket()  # a port in use stops here, before a worker starts or the URL is announced
        env = dict(os.environ, STUDYHALL_DATA_DIR=str(settings.data_dir), STUDYHALL_UP_PID=str(os.getpid()))
        worker = _Worker(env)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host  # an IPv6 address, as URLs write it
        url = f"http://{host}:{settings.port}"
        print(f"\nstudyhall is up at {url}  (data in {settings.data_dir})\n"
              f"dev instructor token:\n{token}\n\ntry: curl -H 'Authorization: Bearer <token>' {url}/api/v1/users/me\n",
              flush=True)
        server.run(sockets=[sock])
    finally:
        if worker is not None:
            worker.stop()
        if watch is not None:  # before the servers stop: it would start them again
            watch.stop()
        services.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studyhall", description="studyhall: realtime learning rooms")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_: str, *, net: bool = False) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
        p = sub.add_parser(name, help=help_)
        p.add_argument("--data-dir", help="data folder (default $STUDYHALL_DATA_DIR or ./.studyhall)")
        if net:
            p.add_argument("--host", help="bind address (default $STUDYHALL_HOST or 127.0.0.1)")
            p.add_argument("--port", type=_port, help="port (default $STUDYHALL_PORT or 8000)")
        p.set_defaults(func=func)
        return p

    add("up", cmd_up, "migrate, start the server and one worker (embedded services when no URLs)", net=True)
    add("serve", cmd_serve, "run an API/websocket server process", net=True)
    wk = add("worker", cmd_worker, "run a worker process (ingest, grading, matching, checks)")
    wk.add_argument("--queues", type=_queues, default=("ingest", "quick"), metavar="Q[,Q]",
                    help="the queues this process serves: ingest (transcription, embedding), quick (grading, "
                         "matching, checks); default both")
    add("migrate", cmd_migrate, "apply database migrations")
    tok = add("token", cmd_token, "create the user if needed and print a token")
    tok.add_argument("--user", required=True, type=_name)
    tok.add_argument("--role", required=True, choices=["learner", "instructor", "admin", "bot"])
    tok.add_argument("--tenant", default="default", type=_name)
    tok.add_argument("--ttl", type=_ttl, help="lifetime in seconds (ignored for bots: their tokens are revocable)")
    ing = add("ingest", cmd_ingest, "add a video to a course from the shell, with a progress bar")
    ing.add_argument("course_id", type=_id)
    src = ing.add_mutually_exclusive_group(required=True)
    src.add_argument("--youtube", help="YouTube URL or 11-character id")
    src.add_argument("--file", help="transcript (.srt/.vtt/.json, YouTube JSON or [[text, start_s, end_s], ...]) or media "
                                    "(wav, mp3, m4a, aac, mp4, mov, webm, ogg, flac, mkv)")
    ing.add_argument("--title", type=_title, help="at most 200 characters on one line (default: from the file name)")
    ing.add_argument("--worker-wait", type=_worker_wait, default=WORKER_GONE_S, metavar="S",
                     help=f"give up after S seconds without a live worker (5 to 3600, default {WORKER_GONE_S:.0f}); "
                          "the job stays queued")
    ing.add_argument("--json", action="store_true",
                     help='print {"video_id", "job_id", "state", "error"} on stdout when the job ends or is left to '
                          'the next worker')
    ask_ = add("ask", cmd_ask, "ask the tutor about a course (answer with cited moments)")
    ask_.add_argument("course_id", type=_id)
    ask_.add_argument("question", type=_question)
    ask_.add_argument("--json", action="store_true", help="print the same JSON as the REST API")
    ask_.add_argument("--as", dest="as_user", type=_id, metavar="USER_ID",
                      help="ask as this user (a course they may see; a learner's daily limit applies; "
                           "default: the course's owner)")
    ask_.add_argument("--session", type=_id, metavar="SESSION_ID",
                      help="a follow-up in this tutor session of the asking user (printed by --json)")
    re_ = add("reembed", cmd_reembed, "re-embed videos embedded by another model than the configured one")
    re_.add_argument("--course", type=_id, help="only this course")
    lb = add("leaderboards", cmd_leaderboards, "rebuild the Redis leaderboards from the XP ledger, or check them")
    lb.add_argument("action", choices=["rebuild", "check"])
    return parser


class CliError(Exception):
    """A mistake in what the command was asked to do: printed as one line, exit status 2."""


def _int_in(low: int, high: int, what: str):  # type: ignore[no-untyped-def]
    """An argparse type: an integer from `low` to `high` (else `what` in the message)."""
    def parse(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in "invalid integer value"
    return parse


_id = _int_in(1, 2**62, "not an id")
_port = _int_in(1, 65535, "a port is 1 to 65535")
_ttl = _int_in(60, 366 * 24 * 3600, "a token lives 60 to 31,622,400 seconds (a year), as STUDYHALL_TOKEN_TTL")
# at least the worker's health-check period (5 s): a live worker is never taken for gone
_worker_wait = _int_in(5, 3600, "--worker-wait is 5 to 3600 seconds")


def _as_rest_takes(raw: str, pattern: str, limit: int, rule: str) -> str:
    """`raw` if REST would take it for a field of `pattern` and at most `limit` characters with something to read
    (else argparse says `rule`)."""
    import re

    from store.frames import blank

    if not raw.strip() or blank(raw):
        raise argparse.ArgumentTypeError("must not be blank")
    _utf8(raw)
    if not re.fullmatch(pattern, raw) or len(raw) > limit:
        raise argparse.ArgumentTypeError(rule)
    return raw


def _name(raw: str) -> str:
    """A user or tenant name as REST takes one: something visible, no control characters, at most 100; and as REST
    stores one: trimmed, composed, without invisible format characters (" ann" or "ann\u200b" made a second,
    look-alike ann instead of a token for the one there is)."""
    from server.api.schemas import NO_CONTROL
    from server.decode import person_name
    from server.errors import ApiError

    try:
        name = _Typed(person_name(_as_rest_takes(raw, NO_CONTROL, 100,
                                                 "must be at most 100 characters, without control characters")))
    except ApiError as exc:
        raise argparse.ArgumentTypeError("must not be blank") from exc
    name.typed = raw
    return name


class _Typed(str):
    """A name as stored, with the name as typed (`typed`): one an older studyhall stored as typed is still found."""

    typed: str


def _title(raw: str) -> str:
    """A video title as REST takes one: one line of at most 200 characters with something to read."""
    from server.api.schemas import LINE_TEXT

    return _as_rest_takes(raw.strip(), LINE_TEXT, 200,
                          "must be at most 200 characters on one line, without control characters")


def _question(raw: str) -> str:
    """The rule a question meets over REST and in rooms (length, nothing to read, control characters)."""
    from server.tutoring import EMPTY_QUESTION, MAX_QUESTION_CHARS, asked
    from store.frames import blank, text_problem

    _utf8(raw)
    if (problem := text_problem(raw.strip(), MAX_QUESTION_CHARS, "the question")) is not None:
        raise argparse.ArgumentTypeError(problem[1])
    question = asked(raw.strip())
    if blank(question):  # "@tutor" alone, as over REST
        raise argparse.ArgumentTypeError(EMPTY_QUESTION)
    return question


def _utf8(raw: str) -> None:
    """Bytes of an argument that are not UTF-8 (in a UTF-8 locale) arrive as lone surrogates: refused here, not
    with a traceback where the text is first encoded."""
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("must be UTF-8 text") from None


class _Stop(SystemExit):
    """Raised by SIGTERM/SIGINT/SIGHUP so `finally` blocks stop what this process started. A SystemExit, not an
    Exception: the handler raises wherever the process happens to be, and an `except Exception` there (a
    library probing for something, asyncio running a callback) must not swallow the stop."""


def _on_signal(signum: int, _frame: object) -> None:
    # a job this process runs itself (`ingest` without a worker) is cut by a stop, as a worker's: its attempt is
    # given back, and a worker's recovery runs it again. (A stop while the module is still being imported finds it
    # half made, without mark_stopping: nothing runs yet; the AttributeError made a stopped worker exit 1, and `up`
    # took that for a crash and started it again.)
    mark_stopping = getattr(sys.modules.get("ingest.jobs"), "mark_stopping", None)
    if mark_stopping is not None:
        mark_stopping()
    raise _Stop(signal.Signals(signum).name)


# Commands that run until stopped: a stop is how they end (0). A one-shot command stopped did not finish: it says so
# and exits 128 + the signal's number, so `studyhall ingest ... && next` does not go on.
_RUN_UNTIL_STOPPED = ("serve", "worker", "up")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if sys.stdout is None and args.command not in _RUN_UNTIL_STOPPED:  # (started with `>&-`: tester)
        print(f"studyhall: standard output is closed: what {args.command} prints (a token, an answer) would be lost",
              file=sys.stderr)
        return 2
    # a crash in native code (a model runtime, a driver) prints every thread's Python stack to stderr instead of
    # ending the process without a word (an interrupted `studyhall ingest` was once seen to die of SIGSEGV)
    faulthandler.enable()
    # what studyhall writes (the data dir, uploads, the embedded servers' files) is its user's alone: with the
    # usual umask other local users could read uploaded course media and the Redis dump
    os.umask(0o077)
    # uvicorn re-raises the signal it caught after a graceful shutdown; with the default handler the
    # process would die before stopping the worker and the embedded servers.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # a closed terminal stops cleanly too: a server or worker as on SIGTERM, which uvicorn (while serving) and arq
    # handle gracefully; a one-shot command says SIGHUP stopped it and exits 129 (it said SIGTERM, 143)
    if args.command in _RUN_UNTIL_STOPPED:
        signal.signal(signal.SIGHUP, lambda _signum, _frame: os.kill(os.getpid(), signal.SIGTERM))
    else:
        signal.signal(signal.SIGHUP, _on_signal)
    try:
        code = args.func(args)
        if sys.stdout is not None:  # (a server started with its output closed: review)
            sys.stdout.flush()  # here, where a reader gone away is caught, not at the interpreter's exit
        return code
    except _Stop as stop:
        if args.command in _RUN_UNTIL_STOPPED:
            return 0
        print(f"studyhall: interrupted ({stop.code}) before {args.command} finished"
              + ("; a job it ran itself is left for a worker, whose recovery queues it again"
                 if args.command == "ingest" else ""), file=sys.stderr)
        return 128 + signal.Signals[str(stop.code)].value
    except CliError as exc:
        print(f"studyhall: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        # a setting that cannot be used (store.settings stops the start naming it): a mistake, as a bad flag is
        print(f"studyhall: {exc.code}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`studyhall ask ... --json | head`): as other tools, quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (the interpreter's flush at exit must not fail again)
        return 128 + signal.SIGPIPE.value
    except (EmbedderError, LLMError, EmbeddedError, MigrationError) as exc:  # a model service, an embedded server
        # or a migration that fails (named)
        print(f"studyhall: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, RedisError) as exc:
        # a database or Redis that cannot be reached (DATABASE_URL, REDIS_URL), or refuses: say so in a line
        print(f"studyhall: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
