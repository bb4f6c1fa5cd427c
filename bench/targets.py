"""The processes a benchmark run starts: the shared backend and each gateway under test ("targets").

A target is started by a function ``start(backend, workdir) -> Target`` listed in TARGETS. Add a
function (for example two gateway processes behind nginx) and every scenario runs against it.
"""

from __future__ import annotations

import json
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
    """What every target sends its requests on to: the FastChat controller and one fake worker,
    or (``upstream_url``) one fake OpenAI-compatible server."""

    controller_url: str | None
    procs: dict[str, subprocess.Popen[bytes]]
    upstream_url: str | None = None  # the OpenAI-compatible upstream's base URL (ending in /v1)

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
    # Paths this target does not serve, each with why: its cells of those scenarios are skipped.
    unsupported: dict[str, str] = field(default_factory=dict)

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


def start_openai_backend(workdir: Path) -> Backend:
    """Start one bench/fast_openai.py serving both models (64-word replies)."""
    port = free_port()
    proc = start_process(
        [sys.executable, str(REPO_ROOT / "bench" / "fast_openai.py"), "--port", str(port),
         "--models", ",".join(MODELS), "--reply-words", str(REPLY_WORDS)],
        log_path=workdir / "fast_openai.log",
    )  # fmt: skip
    backend = Backend(None, {"upstream": proc}, f"http://{HOST}:{port}/v1")
    try:
        wait_for_port(port, timeout=20)
    except BaseException:
        stop_backend(backend)
        raise
    return backend


BACKENDS: dict[str, Callable[..., Backend]] = {"fastchat": start_backend, "openai": start_openai_backend}


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
    target = Target("fastchat", f"http://{HOST}:{port}", key, [proc], "fschat 0.2.36, 1 process",
                    unsupported={"/v1/responses": "FastChat's openai_api_server has no Responses API"})
    wait_listening(target, port)
    return target


def start_gateway(backend: Backend, workdir: Path, name: str = "gateway", tree: Path = REPO_ROOT) -> Target:
    """Our gateway: one uvicorn process (uvloop, httptools), a fresh SQLite database, one key.

    With an OpenAI-compatible backend, that server is registered as the one upstream (through
    `manage.py upstreams apply`, as an operator would), serving both models under their names.
    ``tree`` is the checkout whose code runs (another commit's work tree for `gateway-base`).
    """
    port = free_port()
    env = {
        "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
        "DATABASE_URL": f"sqlite:///{workdir / (name + '.sqlite3')}",
    }
    if backend.controller_url:
        env["CONTROLLER_ADDRESS"] = backend.controller_url
    manage(env, "migrate", "--noinput", tree=tree)
    key = manage(env, "create_api_key", "bench", tree=tree).strip().splitlines()[-1]
    if backend.upstream_url:
        registry = workdir / "upstreams.json"
        registry.write_text(json.dumps(openai_registry(backend.upstream_url), indent=1))
        manage(env, "upstreams", "apply", str(registry), tree=tree)
    proc = start_in(tree, tree_uvicorn_command(tree, port), env, workdir / f"{name}.log")
    target = Target(name, f"http://{HOST}:{port}", key, [proc], "uvicorn, 1 process")
    wait_listening(target, port)
    return target


def start_in(tree: Path, args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """tests.procs.start_process, but from the work tree ``tree`` (whose code the process imports)."""
    if tree == REPO_ROOT:
        return start_process(args, env=env, log_path=log_path)
    with open(log_path, "ab") as output:
        return subprocess.Popen(args, cwd=tree, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT)


def tree_uvicorn_command(tree: Path, port: int) -> list[str]:
    """The uvicorn command of ``tree``'s own tests/gateway_process.py (older commits served no
    ASGI lifespan: `--lifespan off`), so each commit runs as its own benchmark ran it."""
    command = uvicorn_command(port)
    if tree != REPO_ROOT and '"--lifespan", "off"' in (tree / "tests" / "gateway_process.py").read_text():
        command[command.index("--lifespan") + 1] = "off"
    return command


def openai_registry(base_url: str) -> dict:
    """The registry file for the fake OpenAI-compatible server: both models, listed by hand."""
    return {"upstreams": [{
        "name": "fast-openai", "kind": "openai", "base_url": base_url, "discover_models": False,
        "max_concurrency": 1024,
        "models": [{"public_name": "demo-chat", "upstream_name": "demo-chat"},
                   {"public_name": "demo-embed", "upstream_name": "demo-embed", "capabilities": ["embeddings"]}],
    }]}  # fmt: skip


def start_gateway_base(backend: Backend, workdir: Path) -> Target:
    """The gateway of another commit (the work tree in BENCH_BASE_TREE, e.g. made with `git
    worktree add /tmp/bench-base COMMIT`), run by the same Python: a before/after in one run."""
    tree = os.environ.get("BENCH_BASE_TREE")
    if not tree or not (Path(tree) / "manage.py").exists():
        raise RuntimeError("gateway-base needs --base-tree PATH (a work tree of the commit to compare with)")
    return start_gateway(backend, workdir, name="gateway-base", tree=Path(tree))


LITELLM_VENV = REPO_ROOT / "bench" / ".venv-litellm"
# The newest release whose proxy extra installs from PyPI: from 1.108.8 on it requires a
# `litellm-proxy` distribution that PyPI does not have. httptools gives its uvicorn the same HTTP
# parser as ours (its proxy extra brings uvloop, not httptools).
LITELLM_REQUIREMENTS = ["litellm[proxy]==1.108.7", "httptools==0.9.0"]


def start_litellm(backend: Backend, workdir: Path) -> Target:
    """LiteLLM's proxy (`litellm --config`, one process, no database, one master key) with both
    models pointing at the same OpenAI-compatible upstream through its `openai/` provider."""
    if not backend.upstream_url:
        raise RuntimeError("litellm needs an OpenAI-compatible upstream: use --preset openai")
    ensure_litellm_venv()
    port, key = free_port(), "sk-bench-litellm"
    config = workdir / "litellm.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model_list": [
            {"model_name": name, "litellm_params": {"model": f"openai/{name}", "api_base": backend.upstream_url,
                                                    "api_key": "sk-upstream-unused"}}
            for name in MODELS
        ],
        "general_settings": {"master_key": key},
        "litellm_settings": {"telemetry": False, "set_verbose": False},
    }, indent=1))  # fmt: skip
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # never fetch the price list from the internet
        "LITELLM_LOG": "ERROR",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    args = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config), "--host", HOST, "--port", str(port),
            "--num_workers", "1"]
    proc = start_process(args, env=env, log_path=workdir / "litellm.log")
    target = Target("litellm", f"http://{HOST}:{port}", key, [proc], "litellm proxy, 1 process", unsupported={
        "/v1/responses": "LiteLLM would forward it to bench/fast_openai.py, which does not serve /v1/responses"})
    wait_listening(target, port, timeout=120)
    return target


def ensure_litellm_venv() -> None:
    """Create bench/.venv-litellm with LiteLLM's proxy if missing (its pins clash with ours)."""
    if (LITELLM_VENV / "bin" / "litellm").exists():
        return
    print(f"Creating {LITELLM_VENV} (about a minute) ...", file=sys.stderr, flush=True)
    subprocess.run(["python3", "-m", "venv", str(LITELLM_VENV)], check=True)
    pip = [str(LITELLM_VENV / "bin" / "pip"), "install", "--quiet", *LITELLM_REQUIREMENTS]
    if subprocess.run(pip).returncode != 0:
        raise RuntimeError(f"could not install LiteLLM; run by hand: {' '.join(pip)}")


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
    "gateway-base": start_gateway_base,
    "litellm": start_litellm,
}


def manage(env: dict[str, str], *args: str, tree: Path = REPO_ROOT) -> str:
    """Run a Django management command of ``tree`` with ``env`` added; return its stdout."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=tree, env={**os.environ, **env},
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
