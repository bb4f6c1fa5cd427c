"""Subprocess helpers for end-to-end tests: free ports, the FastChat controller, the demo worker,
FastChat's real model_worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(
    port: int, timeout: float = 10.0, host: str = HOST, proc: subprocess.Popen | None = None, what: str = "server"
) -> None:
    """Block until ``host:port`` accepts TCP connections; raise TimeoutError after ``timeout``,
    or RuntimeError as soon as ``proc`` (the server that should listen) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


def start_process(
    args: list[str], env: Mapping[str, str] | None = None, log_path: str | Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``args`` from the repository root with ``env`` added to os.environ.

    Output goes to ``log_path`` (stdout and stderr together) or is discarded. Stop the process
    with stop_process().
    """
    full_env = {**os.environ, **(env or {})}
    output = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(args, cwd=REPO_ROOT, env=full_env, stdout=output, stderr=subprocess.STDOUT)
    finally:
        if log_path:
            output.close()  # the child holds its own descriptor


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Stop a process started by start_process(): SIGTERM, then SIGKILL after ``timeout``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def start_controller(port: int, log_path: str | Path | None = None) -> subprocess.Popen[bytes]:
    """Start the real FastChat controller on 127.0.0.1:``port`` and wait until it listens.

    FastChat writes ``controller.log`` into ``$LOGDIR``; it is pointed at the temp directory.
    """
    args = [sys.executable, "-m", "fastchat.serve.controller", "--host", HOST, "--port", str(port)]
    env = {"LOGDIR": tempfile.gettempdir()}
    return _start_listening(args, port, env, log_path)


def start_demo_worker(
    port: int,
    controller_url: str | None,
    model_names: Iterable[str],
    conv_template: str = "vicuna_v1.1",
    extra_args: Iterable[str] = (),
    log_path: str | Path | None = None,
    program: Iterable[str] = ("-m", "upstreams.fastchat.demo_worker"),
) -> subprocess.Popen[bytes]:
    """Start ``upstreams.fastchat.demo_worker`` (or ``program``, which takes its flags, such as
    bench/fast_worker.py) on 127.0.0.1:``port`` and wait until it listens.

    With ``controller_url`` None the worker does not register (``--no-register``).
    """
    args = [
        sys.executable, *program,
        "--host", HOST,
        "--port", str(port),
        "--worker-address", f"http://{HOST}:{port}",
        "--controller-address", controller_url or "http://127.0.0.1:9",
        "--model-names", ",".join(model_names),
        "--conv-template", conv_template,
        *extra_args,
    ]  # fmt: skip
    if controller_url is None:
        args.append("--no-register")
    return _start_listening(args, port, None, log_path)


def start_real_worker(
    port: int, controller_url: str, model_dir: Path, model_names: Iterable[str], log_dir: Path,
    address: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start FastChat's own fastchat.serve.model_worker on the CPU, serving ``model_dir`` (a tiny
    model of tests/tiny_model.py) on 127.0.0.1:``port``; it registers ``address`` (a proxy's, or
    by default its own) with the controller. Not waited for: it loads torch for a while.

    It logs into ``log_dir``: ``<model names>.log``, and FastChat's model_worker_*.log (LOGDIR).
    """
    names = ",".join(model_names)
    args = [
        sys.executable, "-m", "fastchat.serve.model_worker",
        "--model-path", str(model_dir),
        "--model-names", names,
        "--device", "cpu",
        "--host", HOST,
        "--port", str(port),
        "--worker-address", address or f"http://{HOST}:{port}",
        "--controller-address", controller_url,
        "--seed", "42",
    ]  # fmt: skip
    env = {
        "LOGDIR": str(log_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # three workers share two cores
        "PYTHONUNBUFFERED": "1",
    }
    return start_process(args, env=env, log_path=Path(log_dir) / f"{names}.log")


def stop_real_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGINT, then SIGKILL: a plain SIGTERM may not stop a busy model_worker."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGINT, 3), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_models(controller_url: str, names: Iterable[str], timeout: float = 10.0) -> list[str]:
    """Poll the controller's /list_models until every name is listed; return the listed models."""
    wanted, deadline = set(names), time.monotonic() + timeout
    while True:
        try:
            models = httpx.post(f"{controller_url}/list_models", timeout=2).json()["models"]
            if wanted <= set(models):
                return models
        except httpx.HTTPError:
            models = []
        if time.monotonic() > deadline:
            raise TimeoutError(f"controller lists {models}, not all of {sorted(wanted)}")
        time.sleep(0.1)


def _start_listening(
    args: list[str],
    port: int,
    env: Mapping[str, str] | None,
    log_path: str | Path | None,
    timeout: float = 20.0,
) -> subprocess.Popen[bytes]:
    """Start a server process and wait for its port; kill it if it never listens."""
    proc = start_process(args, env=env, log_path=log_path)
    try:
        wait_for_port(port, timeout, proc=proc, what=args[2])
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; see {log_path}") from None
    except TimeoutError:
        stop_process(proc)
        raise TimeoutError(f"{args[2]} did not listen on port {port} within {timeout} s") from None
    return proc
