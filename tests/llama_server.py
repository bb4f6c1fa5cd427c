"""llama.cpp's OpenAI-compatible server (llama-cpp-python's `python -m llama_cpp.server`) for the
end-to-end tests, serving the tests' tiny model as GGUF (tests/gguf_model.py) on the CPU.

The server reads its settings from unprefixed environment variables as well as from its flags
(MODEL, API_KEY, CHAT_FORMAT, PORT... would change what it serves), so it is started with a clean
environment: only PATH, HOME and what the tests set.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import httpx

from tests.procs import HOST, free_port, stop_process, wait_for_port

START_TIMEOUT = 60.0


def missing() -> list[str]:
    """What the llama.cpp tests lack here (empty: they can run)."""
    from tests.gguf_model import ConverterMissing, source_package

    lacking = [name for name in ("llama_cpp", "torch", "transformers") if find_spec(name) is None]
    try:
        source_package()
    except ConverterMissing:
        lacking.append("the llama-cpp-python source package (make install-llama)")
    return lacking


@dataclass
class LlamaServer:
    port: int
    alias: str
    chat_format: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def stop(self) -> None:
        stop_process(self.proc, timeout=3)  # an idle server may sit on SIGTERM: SIGKILL then


def start_llama_server(model: Path, log_dir: Path, *, alias: str, chat_format: str = "vicuna",
                       n_ctx: int = 512, api_key: str | None = None) -> LlamaServer:
    """Start the server on a free port and wait until it answers GET /v1/models."""
    port = free_port()
    args = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model), "--model_alias", alias, "--chat_format", chat_format,
        "--host", HOST, "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "1",
        "--verbose", "False",
        # Otherwise any request (the gateway's health probe) cuts a stream in flight: docs/openai-upstreams.md.
        "--interrupt_requests", "False",
    ]  # fmt: skip
    if api_key:
        args += ["--api_key", api_key]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(log_dir), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    log_path = log_dir / f"llama-{alias}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log_dir)
    server = LlamaServer(port, alias, chat_format, proc, log_path)
    try:
        wait_for_port(port, START_TIMEOUT, proc=proc, what="llama_cpp.server")
        deadline = time.monotonic() + START_TIMEOUT
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        while httpx.get(server.base_url + "/models", headers=headers, timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("llama_cpp.server does not list its model")
            time.sleep(0.1)
    except BaseException as exc:
        server.stop()
        log = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"llama_cpp.server did not start: {exc}\n{log}") from exc
    return server
