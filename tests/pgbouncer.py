"""A real PgBouncer in transaction pooling mode in front of the test PostgreSQL.

``REPROQ_TEST_VIA_PGBOUNCER=1 ./dev test tests/test_runtime.py`` runs a suite through it: the
pytest plugin (`tests.embedded_db`) calls `start_for_session()` once the test server is known;
that installs Debian's ``pgbouncer`` package when it is missing (like the browser tests install
Chromium), starts one pgbouncer process on a free loopback port with its own ini in a temporary
directory, and exports `URL_ENV` (the pooler's ``postgresql://`` URL) for child processes.
Migrations and the test database's creation and removal still go to PostgreSQL directly
(`tests.conftest` points Django's connection at the pooler only after ``django_db_setup``).

The pooler forwards every database name (``*``) to the server of ``DATABASE_URL``, unix socket
or TCP. Clients are not authenticated (``auth_type = trust``, loopback only); the user and
password of ``DATABASE_URL`` go into an ``auth_file`` readable by pgbouncer alone, from which
pgbouncer logs in to PostgreSQL. Nothing here prints the password.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

SWITCH_ENV = "REPROQ_TEST_VIA_PGBOUNCER"
URL_ENV = "REPROQ_TEST_PGBOUNCER_URL"
DIRECT_URL_ENV = "REPROQ_TEST_DIRECT_URL"
SKIP_ENV = "REPROQ_TEST_PGBOUNCER_SKIP"
# 1: PgBouncer drops the ``options`` startup parameter instead of refusing the connection
# (what many deployments configure; the beat then runs without its session timeouts).
IGNORE_OPTIONS_ENV = "REPROQ_TEST_PGBOUNCER_IGNORE_OPTIONS"
# Children started by the tests poll for work at least this often (there is no LISTEN).
CANDIDATES = ("pgbouncer", "/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
DEBIAN_UNIT = "pgbouncer"


def enabled() -> bool:
    """True when this test session runs through PgBouncer (`SWITCH_ENV` set to 1/true/yes)."""
    return os.environ.get(SWITCH_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class Unavailable(RuntimeError):
    """PgBouncer cannot be installed or started here (the reason is the message)."""


def _binary() -> str | None:
    for candidate in CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _stop_debian_service() -> None:
    """The Debian package starts its own pgbouncer on a fixed port (6432) when it can: stop it
    and keep it from starting at boot; ours runs on a free port with its own ini."""
    if shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
        _run(["systemctl", "disable", "--now", DEBIAN_UNIT], timeout=60)
        return
    if Path(f"/etc/init.d/{DEBIAN_UNIT}").exists():
        _run([f"/etc/init.d/{DEBIAN_UNIT}", "stop"], timeout=60)
    if shutil.which("update-rc.d"):
        _run(["update-rc.d", DEBIAN_UNIT, "disable"], timeout=60)


def ensure_installed() -> str:
    """The pgbouncer binary; Debian's package is installed with apt-get when it is missing."""
    found = _binary()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable("pgbouncer is not installed and cannot be installed here "
                          "(needs root and apt-get): apt-get install pgbouncer")
    for step in (["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", "pgbouncer"]):
        done = _run(step)
        if done.returncode != 0:
            raise Unavailable(f"`{' '.join(step)}` failed ({done.returncode}): "
                              f"{done.stderr[-2000:]}")
    _stop_debian_service()
    found = _binary()
    if not found:
        raise Unavailable("apt-get installed pgbouncer but no pgbouncer binary is on PATH")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Upstream:
    """Where PostgreSQL is, from a ``postgresql://`` URL (host may be a unix socket dir)."""

    host: str
    port: int
    user: str
    password: str
    dbname: str
    query: dict[str, str]

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        host = unquote(parts.hostname or "") or query.pop("host", "") or "/var/run/postgresql"
        query.pop("host", None)
        query.pop("port", None)
        return cls(host=host, port=int(parts.port or 5432),
                   user=unquote(parts.username or "") or "postgres",
                   password=unquote(parts.password or ""),
                   dbname=unquote(parts.path.lstrip("/")) or "postgres", query=query)


class PgBouncer:
    """One pgbouncer process in transaction pooling mode on 127.0.0.1:`port`."""

    def __init__(self, upstream: Upstream, *, pool_size: int = 40) -> None:
        self.upstream = upstream
        self.pool_size = pool_size
        self.port = 0
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, dbname: str | None = None) -> str:
        """The pooler's URL (no password: clients are trusted on loopback)."""
        query = "&".join(f"{quote(k)}={quote(v)}" for k, v in self.upstream.query.items()
                         if k not in {"sslmode", "sslrootcert", "sslcert", "sslkey"})
        return (f"postgresql://{quote(self.upstream.user)}@127.0.0.1:{self.port}/"
                f"{quote(dbname or self.upstream.dbname)}" + (f"?{query}" if query else ""))

    def _write_config(self) -> Path:
        self.dir = Path(tempfile.mkdtemp(prefix="reproq-pgbouncer-"))
        up = self.upstream
        server = f"host={up.host} port={up.port}"
        if up.query.get("sslmode"):
            server += f" sslmode={up.query['sslmode']}"
        auth = self.dir / "users.txt"
        auth.write_text(f'"{up.user}" "{up.password}"\n')
        auth.chmod(0o600)
        ini = self.dir / "pgbouncer.ini"
        ini.write_text("\n".join([
            "[databases]",
            f"* = {server}",
            "",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "pool_mode = transaction",
            "auth_type = trust",
            f"auth_file = {auth}",
            f"admin_users = {up.user}",
            f"default_pool_size = {self.pool_size}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            "max_client_conn = 2000",
            "max_db_connections = 0",
            "server_lifetime = 3600",
            "server_idle_timeout = 60",
            "query_wait_timeout = 60",
            "log_connections = 0",
            "log_disconnections = 0",
            "log_pooler_errors = 1",
            *(["ignore_startup_parameters = options"]
              if os.environ.get(IGNORE_OPTIONS_ENV, "") == "1" else []),
            "",
        ]))
        ini.chmod(0o600)
        return ini

    def start(self, timeout: float = 20.0) -> None:
        binary = ensure_installed()
        self.port = _free_port()
        ini = self._write_config()
        assert self.dir is not None
        user = None
        if os.geteuid() == 0:
            # pgbouncer refuses to run as root: run it as an unprivileged user of the machine.
            # The owner of a unix socket directory can reach the socket; else a plain user.
            host = Path(self.upstream.host)
            owner = pwd.getpwuid(host.stat().st_uid).pw_name if host.is_dir() else None
            user = next((name for name in (owner, "postgres", "nobody")
                         if name and name != "root" and _has_user(name)), None)
            if user is None:
                raise Unavailable("running as root and no unprivileged user for pgbouncer")
            entry = pwd.getpwnam(user)
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        out = open(self.dir / "stdout.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, str(ini)], stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     user=user, preexec_fn=_die_with_parent)
        self._out = out
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"pgbouncer exited with code {self.proc.returncode}:\n"
                                  f"{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        self.stop()
        raise Unavailable(f"pgbouncer did not listen on port {self.port} within {timeout:g}s")

    def log_tail(self, lines: int = 40) -> str:
        """The end of pgbouncer's output (its stderr)."""
        if self.dir is None:
            return "(pgbouncer stopped)"
        try:
            text = (self.dir / "stdout.log").read_text(errors="replace")
        except OSError as exc:
            return f"(no pgbouncer log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT (safe shutdown: closes every server connection), SIGKILL after `timeout`."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if getattr(self, "_out", None) is not None:
            self._out.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _die_with_parent() -> None:
    """In the child, after its user change: SIGTERM when the test process dies, even by
    SIGKILL (Linux PR_SET_PDEATHSIG; elsewhere `stop` and atexit are all there is)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


_session: PgBouncer | None = None


def start_for_session(direct_url: str) -> PgBouncer | None:
    """Start the session's PgBouncer in front of `direct_url` and export its URL; None (with
    the reason in `SKIP_ENV`) when it cannot run here."""
    global _session
    if _session is not None:
        return _session
    bouncer = PgBouncer(Upstream.from_url(direct_url))
    try:
        bouncer.start()
    except Unavailable as exc:
        os.environ[SKIP_ENV] = f"!!! PGBOUNCER TESTS SKIPPED: {exc}"
        print(os.environ[SKIP_ENV])
        return None
    _session = bouncer
    atexit.register(bouncer.stop)
    os.environ[DIRECT_URL_ENV] = direct_url
    os.environ[URL_ENV] = bouncer.url()
    return bouncer


def session() -> PgBouncer | None:
    """The session's PgBouncer (None when it is not enabled or could not start)."""
    return _session


def skip_reason() -> str:
    return os.environ.get(SKIP_ENV) or f"!!! PGBOUNCER TESTS SKIPPED: {SWITCH_ENV} is not set"
