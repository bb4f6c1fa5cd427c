"""Start the gateway itself as a real server process (daphne or uvicorn) for end-to-end tests,
alone or as part of a whole stack (tests/stacks.py; a module's StackSpec here describes the stack
of the `gateway_stack` fixture in tests/conftest.py)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.procs import REPO_ROOT, free_port, start_process, stop_process, wait_for_port

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

    def apply_upstreams(self, path: Path, upstreams: list[dict]) -> None:
        """Write a registry of ``upstreams`` to ``path`` and apply it (`manage.py upstreams apply`)."""
        path.write_text(json.dumps({"upstreams": upstreams}))
        self.manage("upstreams", "apply", str(path))

    def wait_for_models(self, key: str, names: Iterable[str], timeout: float = 20.0) -> None:
        """The gateway rereads its registry within a second; wait until it lists every model."""
        wanted, deadline, listed = set(names), time.monotonic() + timeout, set()
        while time.monotonic() < deadline:
            response = httpx.get(self.base_url + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
            if response.status_code == 200:
                listed = {model["id"] for model in response.json()["data"]}
                if wanted <= listed:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the gateway lists {sorted(listed)}, not all of {sorted(wanted)}")

    def client(self, key: str, timeout: float = 60):
        """The official openai client on this gateway, without retries."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout)

    def http(self, key: str, timeout: float = 60) -> httpx.Client:
        """Raw HTTP to the gateway with ``key``, for bodies the openai client will not send."""
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

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
    """What a test module needs running (its module-level STACK, read by the `gateway_stack`
    fixture, started by tests/stacks.py running_stack)."""

    workers: tuple[WorkerSpec, ...] = (WorkerSpec(("demo-chat",)),)
    gateways: int = 1
    server: str = "daphne"
    env: Mapping[str, str] = field(default_factory=dict)
    # Throwaway PostgreSQL and Redis shared by the gateways (else each has its own SQLite file).
    backends: bool = False
