"""Start the gateway itself as a real server process (daphne or uvicorn) for end-to-end tests,
alone or as part of a whole stack: FastChat's controller, demo workers and gateway processes
(running_stack, behind the `gateway_stack` fixture of tests/conftest.py)."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.procs import (
    REPO_ROOT,
    free_port,
    start_controller,
    start_demo_worker,
    start_process,
    stop_process,
    wait_for_models,
    wait_for_port,
)
from tests.services import Services, services

HOST = "127.0.0.1"


@dataclass
class Gateway:
    """A running gateway: its URL, its environment (database, controller) and its process."""

    port: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def manage(self, *args: str) -> str:
        """Run a management command against this gateway's database; return its stdout."""
        result = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=self.env,
            capture_output=True, text=True, check=True,
        )
        return result.stdout

    def create_key(self, name: str = "e2e", *args: str) -> str:
        """A new key's plaintext: the last line create_api_key prints."""
        return self.manage("create_api_key", name, *args).strip().splitlines()[-1]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def gateway_env(tmp_path: Path, controller_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    import os

    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.sqlite3'}",
        "CONTROLLER_ADDRESS": controller_url,
        **(extra or {}),
    }


def uvicorn_command(port: int) -> list[str]:
    """One gateway process as the tests and bench/ run it: uvicorn with uvloop and httptools, no uvicorn access log."""
    return [
        sys.executable, "-m", "uvicorn", "--host", HOST, "--port", str(port),
        "--loop", "uvloop", "--http", "httptools", "--lifespan", "on", "--no-access-log",
        "gateway_project.asgi:application",
    ]  # fmt: skip


def start_gateway(tmp_path: Path, controller_url: str, server: str = "daphne",
                  extra_env: Mapping[str, str] | None = None) -> Gateway:
    """Migrate a fresh SQLite database, then serve the gateway on a free port."""
    gateway = Gateway(port=free_port(), env=gateway_env(tmp_path, controller_url, extra_env),
                      log_path=tmp_path / f"gateway-{server}.log")
    gateway.manage("migrate", "--noinput")
    if server == "daphne":
        args = [sys.executable, "-m", "daphne", "-b", HOST, "-p", str(gateway.port), "gateway_project.asgi:application"]
    else:
        args = uvicorn_command(gateway.port)
    gateway.proc = start_process(args, env=gateway.env, log_path=gateway.log_path)
    try:
        wait_for_port(gateway.port, timeout=20)
    except TimeoutError:
        gateway.stop()
        raise
    return gateway


@dataclass(frozen=True)
class WorkerSpec:
    """One demo worker: the models it serves and its extra flags (upstreams/fastchat/demo_worker.py)."""

    models: tuple[str, ...]
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class StackSpec:
    """What a test module needs running (its module-level STACK, read by the fixture)."""

    workers: tuple[WorkerSpec, ...] = (WorkerSpec(("demo-chat",)),)
    gateways: int = 1
    server: str = "daphne"
    env: Mapping[str, str] = field(default_factory=dict)
    # Throwaway PostgreSQL and Redis shared by the gateways (else each has its own SQLite file).
    backends: bool = False


@dataclass
class Stack:
    """A running stack: the controller, the workers (in StackSpec order) and the gateways."""

    tmp: Path
    controller_url: str
    worker_urls: list[str]
    gateways: list[Gateway]
    backends: Services | None = None

    @property
    def gateway(self) -> Gateway:
        return self.gateways[0]


@contextmanager
def running_stack(tmp: Path, spec: StackSpec) -> Iterator[Stack]:
    """Start everything `spec` asks for, each process logging into `tmp`; stop it all, in the
    reverse order, when the block ends. Raises ServiceUnavailable if the backends cannot run."""
    with ExitStack() as cleanup:
        backends = cleanup.enter_context(services()) if spec.backends else None
        controller_port = free_port()
        controller_url = f"http://127.0.0.1:{controller_port}"
        controller = start_controller(controller_port, log_path=tmp / "controller.log")
        cleanup.callback(stop_process, controller)
        worker_urls = []
        for i, worker in enumerate(spec.workers):
            port = free_port()
            process = start_demo_worker(port, controller_url, worker.models, extra_args=worker.extra_args,
                                        log_path=tmp / f"worker{i}.log")
            cleanup.callback(stop_process, process)
            worker_urls.append(f"http://127.0.0.1:{port}")
        wait_for_models(controller_url, [model for worker in spec.workers for model in worker.models], timeout=20)
        env = {**(backends.env if backends else {}), **spec.env}
        gateways = []
        for i in range(spec.gateways):
            directory = tmp / f"gateway{i}"
            directory.mkdir()
            gateway = start_gateway(directory, controller_url, server=spec.server, extra_env=env)
            cleanup.callback(gateway.stop)
            gateways.append(gateway)
        yield Stack(tmp, controller_url, worker_urls, gateways, backends)
