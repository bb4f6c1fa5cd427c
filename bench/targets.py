"""The processes a benchmark run starts: the shared backend and each gateway under test ("targets").

A target is started by a function ``start(backend, workdir) -> Target`` listed in TARGETS. Add a
function (for example two gateway processes behind nginx) and every scenario runs against it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
# The gateways and management commands started here refuse to run without a secret key.
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret-key-never-used-in-production")

from tests.gateway_process import uvicorn_command  # noqa: E402 - needs the repository root on sys.path
from tests.procs import (  # noqa: E402 - needs the repository root on sys.path
    HOST,
    free_port,
    start_controller,
    start_demo_worker,
    start_process,
    stop_process,
    wait_for_models,
    wait_for_port,
)

FASTCHAT_VENV = REPO_ROOT / "bench" / ".venv-fastchat"
FASTCHAT_PYTHON = FASTCHAT_VENV / "bin" / "python"
# FastChat's server streams only under pydantic 1, and FastAPI 0.109 is the last to import with it.
# uvloop and httptools give FastChat's uvicorn the same event loop and HTTP parser as ours.
FASTCHAT_REQUIREMENTS = [
    "fschat==0.2.36", "pydantic==1.10.14", "fastapi==0.109.2",
    "uvicorn==0.54.0", "uvloop==0.23.0", "httptools==0.9.0",
]  # fmt: skip
MODELS = ("demo-chat", "demo-embed")
REPLY_WORDS = 64  # the streaming scenario asks for 64 tokens and must get all of them
# The fake worker must never be the queue: FastChat's default limit (5) would cap every target.
WORKER_CONCURRENCY = 1024


@dataclass
class Backend:
    """The FastChat controller and one demo worker, shared by every target."""

    controller_url: str
    procs: dict[str, subprocess.Popen[bytes]]

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs.values()]


@dataclass
class Target:
    """A gateway under test: where to send requests, and the processes whose CPU and memory count."""

    name: str
    base_url: str
    api_key: str | None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    notes: str = ""
    services: ExitStack | None = None  # servers the target needs (PostgreSQL, Redis), stopped last
    service_pids: list[int] = field(default_factory=list)  # their main processes, for the CPU count

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc)
        if self.services is not None:
            self.services.close()


WORKER_PROGRAMS = {
    # bench/fast_worker.py: the demo worker's answers, remembered, on a raw uvloop server (~0.05 ms)
    "fast": (str(REPO_ROOT / "bench" / "fast_worker.py"),),
    # the demo worker itself (aiohttp; ~0.3 ms of CPU per chat request)
    "demo": ("-m", "upstreams.fastchat.demo_worker"),
}


def start_backend(workdir: Path, worker: str = "fast") -> Backend:
    """Start the real FastChat controller and one fake worker serving both models."""
    controller_port, worker_port = free_port(), free_port()
    controller_url = f"http://{HOST}:{controller_port}"
    procs = {"controller": start_controller(controller_port, workdir / "controller.log")}
    backend = Backend(controller_url, procs)
    try:
        procs["worker"] = start_demo_worker(
            worker_port, controller_url, MODELS,
            extra_args=[
                "--reply-words", str(REPLY_WORDS),
                "--limit-worker-concurrency", str(WORKER_CONCURRENCY),
            ],
            log_path=workdir / "worker.log", program=WORKER_PROGRAMS[worker],
        )  # fmt: skip
        wait_for_models(controller_url, MODELS, timeout=20)
    except BaseException:
        stop_backend(backend)
        raise
    return backend


def stop_backend(backend: Backend) -> None:
    for proc in reversed(list(backend.procs.values())):
        stop_process(proc)


def start_fastchat(backend: Backend, workdir: Path) -> Target:
    """FastChat's own openai_api_server, as shipped (uvicorn, access log on), with one API key."""
    ensure_fastchat_venv()
    port, key = free_port(), "sk-bench-fastchat"
    logdir = workdir / "fastchat-logs"
    logdir.mkdir(exist_ok=True)
    args = [
        str(FASTCHAT_PYTHON), "-m", "fastchat.serve.openai_api_server",
        "--host", HOST, "--port", str(port),
        "--controller-address", backend.controller_url,
        "--api-keys", key,
    ]  # fmt: skip
    proc = start_process(args, env={"LOGDIR": str(logdir)}, log_path=workdir / "fastchat.log")
    target = Target("fastchat", f"http://{HOST}:{port}", key, [proc], "fschat 0.2.36, 1 process")
    wait_listening(target, port)
    return target


def start_gateway(backend: Backend, workdir: Path) -> Target:
    """Our gateway: one uvicorn process (uvloop, httptools), a fresh SQLite database, one key."""
    port = free_port()
    env = {
        "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
        "CONTROLLER_ADDRESS": backend.controller_url,
        "DATABASE_URL": f"sqlite:///{workdir / 'gateway.sqlite3'}",
    }
    manage(env, "migrate", "--noinput")
    key = manage(env, "create_api_key", "bench").strip().splitlines()[-1]
    proc = start_process(uvicorn_command(port), env=env, log_path=workdir / "gateway.log")
    target = Target("gateway", f"http://{HOST}:{port}", key, [proc], "uvicorn, 1 process")
    wait_listening(target, port)
    return target


def start_gateway_nginx(backend: Backend, workdir: Path, processes: int = 2) -> Target:
    """The production shape: `processes` gateway processes (uvicorn) behind nginx, rendered
    from deploy/nginx/gateway.conf, sharing a throwaway PostgreSQL and Redis."""
    from tests.services import postgres, redis_server
    from tests.test_nginx import render_nginx

    services = ExitStack()
    try:
        pg, redis = services.enter_context(postgres()), services.enter_context(redis_server())
        env = {"DJANGO_SETTINGS_MODULE": "gateway_project.settings", "CONTROLLER_ADDRESS": backend.controller_url,
               "DATABASE_URL": pg.url, "REDIS_URL": redis.url}
        manage(env, "migrate", "--noinput")
        key = manage(env, "create_api_key", "bench").strip().splitlines()[-1]
        ports, procs = [free_port() for _ in range(processes)], []
        for i, port in enumerate(ports):
            procs.append(start_process(uvicorn_command(port), env=env, log_path=workdir / f"gateway-nginx{processes}-{i}.log"))
        nginx_dir = workdir / f"nginx{processes}"
        nginx_dir.mkdir(exist_ok=True)
        nginx_port = free_port()
        procs.append(start_process(["nginx", "-c", str(render_nginx(nginx_dir, nginx_port, ports)), "-p", str(nginx_dir)],
                                   log_path=workdir / f"nginx{processes}.log"))
        noun = "process" if processes == 1 else "processes"
        target = Target(f"gateway-nginx{processes}", f"http://{HOST}:{nginx_port}", key, procs,
                        f"{processes} uvicorn {noun} behind nginx, PostgreSQL + Redis", services,
                        [postmaster_pid(pg), redis.proc.pid])
        for port in [*ports, nginx_port]:
            wait_listening(target, port)
        return target
    except BaseException:
        services.close()
        raise


def postmaster_pid(pg) -> int:
    return int((pg.data_dir / "postmaster.pid").read_text().split()[0])


TARGETS: dict[str, Callable[[Backend, Path], Target]] = {
    "fastchat": start_fastchat,
    "gateway": start_gateway,
    "gateway-nginx1": partial(start_gateway_nginx, processes=1),
    "gateway-nginx2": partial(start_gateway_nginx, processes=2),
}


def manage(env: dict[str, str], *args: str) -> str:
    """Run a Django management command with ``env`` added; return its stdout."""
    import os

    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO_ROOT, env={**os.environ, **env},
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def wait_listening(target: Target, port: int, timeout: float = 30.0) -> None:
    """Wait until the target's port accepts connections; stop it and raise if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in target.procs):
            target.stop()
            raise RuntimeError(f"{target.name} exited during startup; see its log")
        try:
            wait_for_port(port, timeout=0.2)
            return
        except TimeoutError:
            continue
    target.stop()
    raise TimeoutError(f"{target.name} did not listen on port {port} within {timeout} s")


def ensure_fastchat_venv() -> None:
    """Create bench/.venv-fastchat with FastChat's server and its pydantic 1 stack if missing."""
    if FASTCHAT_PYTHON.exists():
        return
    print(f"Creating {FASTCHAT_VENV} (about 30 s) ...", file=sys.stderr, flush=True)
    subprocess.run(["python3", "-m", "venv", str(FASTCHAT_VENV)], check=True)
    pip = [str(FASTCHAT_VENV / "bin" / "pip"), "install", "--quiet", *FASTCHAT_REQUIREMENTS]
    if subprocess.run(pip).returncode != 0:
        raise RuntimeError(f"could not install FastChat; run by hand: {' '.join(pip)}")


def peak_memory_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak resident set) and VmRSS of a process, in MiB, from /proc/PID/status."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                values[name] = round(int(rest.split()[0]) / 1024, 1)
    return values
