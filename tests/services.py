"""Throwaway PostgreSQL and Redis servers for the tests.

Two ways to use them:

* As a command wrapper, for the whole suite on PostgreSQL + Redis (Django reads DATABASE_URL and
  REDIS_URL at import, so the servers must exist before pytest starts)::

      python -m tests.services -- python -m pytest -q

  starts both, runs the command with DATABASE_URL, REDIS_URL and GATEWAY_TEST_BACKENDS set,
  stops both and exits with the command's exit code.

* From Python, for tests that need servers of their own (several gateway processes sharing
  them)::

      with postgres() as pg, redis_server() as redis:
          pg.url, redis.url

PostgreSQL runs from a fresh ``initdb`` in a temporary directory (socket there too, TCP on a
free 127.0.0.1 port, trust authentication, fsync off); as root it runs as the ``postgres``
user, since PostgreSQL refuses to run as root. Redis runs without persistence.
"""
from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.procs import HOST, free_port, wait_for_port

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")
DATABASE = "gateway"
BACKENDS_ENV = "GATEWAY_TEST_BACKENDS"


class ServiceUnavailable(RuntimeError):
    """The server binary is missing or cannot run here (tests skip on it, or fail with CI=true)."""


def pg_bin_dir() -> Path:
    configured = os.environ.get("PG_BIN")
    for candidate in ([configured] if configured else []) + list(PG_BIN_CANDIDATES):
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise ServiceUnavailable("PostgreSQL's initdb was not found (set PG_BIN)")


@dataclass
class Postgres:
    """A PostgreSQL cluster in its own temporary directory."""

    port: int
    directory: Path
    bin_dir: Path
    user: str | None  # the OS user the server runs as, when we are root
    database: str = DATABASE

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    def url_for(self, database: str | None = None, port: int | None = None) -> str:
        return f"postgres://postgres@{HOST}:{port or self.port}/{database or self.database}"

    @property
    def url(self) -> str:
        return self.url_for()

    def run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / program), *args]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, cwd=self.directory)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over TCP; returns psql's unaligned output."""
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", HOST, "-p", str(self.port), "-U", "postgres", "-d", database, "-c", sql],
            capture_output=True, text=True,
        )
        if result.returncode:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def start(self) -> None:
        initdb = self.run("initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
                          "-E", "UTF8", "--locale=C", "--no-sync", check=False)
        if initdb.returncode:
            raise RuntimeError(f"initdb failed: {initdb.stderr.strip()}")
        options = " ".join([
            "-F", f"-p {self.port}", f"-k {self.directory}", f"-c listen_addresses={HOST}",
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            "-c max_connections=300", "-c shared_buffers=64MB",
        ])
        started = self.run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "-t", "60",
                           "-o", options, "start", check=False)
        if started.returncode:
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()}\n{log[-2000:]}")
        self.psql(f"CREATE DATABASE {self.database}")

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", check=False)


@contextmanager
def postgres(keep: bool = False) -> Iterator[Postgres]:
    """A running throwaway PostgreSQL with an empty database ``gateway``; removed afterwards."""
    bin_dir = pg_bin_dir()
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            raise ServiceUnavailable("running as root and there is no 'postgres' user to run PostgreSQL") from None
        if not shutil.which("runuser"):
            raise ServiceUnavailable("running as root without runuser")
    # Not under pytest's tmp_path: its parents are private to root, the server's user must enter.
    directory = Path(tempfile.mkdtemp(prefix="gw-pg-"))
    if user:
        entry = pwd.getpwnam(user)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    server = Postgres(port=free_port(), directory=directory, bin_dir=bin_dir, user=user)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Redis:
    port: int
    directory: Path
    proc: subprocess.Popen | None = None
    db: int = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/{self.db}"

    def client(self):
        import redis

        return redis.Redis(host=HOST, port=self.port, db=self.db)


@contextmanager
def redis_server() -> Iterator[Redis]:
    """A running throwaway Redis (no persistence) on a free port."""
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if not binary:
        raise ServiceUnavailable("redis-server was not found")
    directory = Path(tempfile.mkdtemp(prefix="gw-redis-"))
    server = Redis(port=free_port(), directory=directory)
    log = open(directory / "redis.log", "ab")
    try:
        server.proc = subprocess.Popen(
            [binary, "--port", str(server.port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(directory), "--daemonize", "no", "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        wait_for_port(server.port, 20, proc=server.proc, what="redis-server")
        yield server
    finally:
        log.close()
        if server.proc is not None and server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Services:
    pg: Postgres
    redis: Redis
    extra: dict = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {"DATABASE_URL": self.pg.url, "REDIS_URL": self.redis.url, BACKENDS_ENV: "postgres+redis"}


@contextmanager
def services() -> Iterator[Services]:
    """PostgreSQL and Redis together."""
    with ExitStack() as stack:
        pg = stack.enter_context(postgres())
        redis = stack.enter_context(redis_server())
        yield Services(pg, redis)


def running_in_ci() -> bool:
    """CI=true (as CI systems set it): every service the tests use must be there."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_service(name: str, available: bool, reason: str = "") -> None:
    """Skip the running test when the service `name` is missing; with CI=true, fail it
    instead, so a machine that lacks a service cannot pass by skipping what needs it."""
    if available:
        return
    import pytest

    message = f"{name} is not available" + (f" ({reason})" if reason else "")
    if running_in_ci():
        pytest.fail(f"{message}; CI=true, so the tests that need it fail rather than skip", pytrace=False)
    pytest.skip(message)


def requires_service(name: str, available: bool, reason: str = ""):
    """A mark for tests or modules: require_service() runs before each test it marks
    (tests/conftest.py), not at import, so deselected tests never look."""
    import pytest

    return pytest.mark.requires_service(name, available, reason)


def under_services_wrapper() -> bool:
    """True when the suite runs under ``python -m tests.services`` (PostgreSQL + Redis)."""
    return os.environ.get(BACKENDS_ENV) == "postgres+redis"


def run_command(command: list[str], env: dict[str, str], grace: float = 30.0) -> int:
    """Run the command to its end and return its exit status (128 + N if killed by signal N).
    SIGTERM and SIGINT are passed on to it, so that CI cancelling the job or Ctrl-C still
    lets the caller stop the servers; a command still running `grace` s later is killed."""
    child = subprocess.Popen(command, env=env)
    signalled_at: list[float] = []

    def forward(signum, frame):
        signalled_at.append(time.monotonic())
        if child.poll() is None:
            child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = child.wait(timeout=1)
                return code if code >= 0 else 128 - code
            except subprocess.TimeoutExpired:
                if signalled_at and time.monotonic() - signalled_at[0] > grace:
                    child.kill()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.services",
        description="Run a command with a throwaway PostgreSQL and Redis "
                    "(DATABASE_URL, REDIS_URL and GATEWAY_TEST_BACKENDS exported to it).",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- command [args...]")
    options = parser.parse_args(argv)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command:
        parser.error("no command given (python -m tests.services -- COMMAND ...)")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # while starting or stopping: unwind, stop the servers
    started = time.monotonic()
    try:
        with services() as running:
            print(f"tests.services: PostgreSQL {running.pg.url} and Redis {running.redis.url} "
                  f"up in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
            return run_command(command, {**os.environ, **running.env})
    except ServiceUnavailable as exc:
        print(f"tests.services: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
