"""End-to-end stacks of real processes, built part by part: FastChat's controller, its real
model_worker (tests/tiny_model.py) and the demo worker, llama.cpp's server (tests/llama_server.py),
recording proxies, throwaway PostgreSQL and Redis, and gateway processes. A test module's fixture
says which parts its stack has::

    with StackBuilder(tmp) as build:
        controller_url = build.controller()
        worker = build.real_worker("vicuna_v1.1", "tiny-vicuna", proxied=True)
        build.wait_for_workers(worker)
        gateway = build.gateway("uvicorn")
        yield ...

Every part is stopped when the block ends (after the module's last test, or as soon as a part
fails to start), in the reverse order. running_stack builds the `gateway_stack` fixture's stacks
(tests/conftest.py) from a module's StackSpec (tests/gateway_process.py).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiohttp import ClientSession, ClientTimeout, web

from tests.gateway_process import Gateway, StackSpec, start_gateway
from tests.gguf_model import build_gguf
from tests.llama_server import LlamaServer, start_llama_server
from tests.procs import (
    HOST,
    free_port,
    start_controller,
    start_demo_worker,
    start_real_worker,
    stop_process,
    stop_real_worker,
    wait_for_models,
    wait_for_port,
)
from tests.services import Services, services
from tests.tiny_model import MODELS_DIR, build_tiny_model

WORKER_START_TIMEOUT = 60.0


# A recording proxy between the gateway and an upstream


@dataclass
class Record:
    path: str
    body: Any


@dataclass
class RecordingProxy:
    """Forwards every request to an upstream (a worker, llama.cpp's server) and keeps each
    request's path and JSON body.

    Runs an aiohttp server on its own event loop in a daemon thread; responses (the worker's
    NUL-delimited streams included) are passed through chunk by chunk as they arrive.
    """

    upstream_port: int
    port: int = field(default_factory=free_port)
    records: list[Record] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"proxy:{self.port}", daemon=True)

    @property
    def address(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> RecordingProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the recording proxy did not start")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(10)

    def mark(self) -> int:
        """A position in the record list, for since()."""
        with self._lock:
            return len(self.records)

    def since(self, mark: int, *paths: str) -> list[Record]:
        with self._lock:
            records = self.records[mark:]
        return [record for record in records if not paths or record.path in paths]

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self._session = ClientSession(timeout=ClientTimeout(total=None), auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, self.port).start()
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        with self._lock:
            self.records.append(Record(request.path, body))
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        url = f"http://{HOST}:{self.upstream_port}{request.path_qs}"
        async with self._session.request(request.method, url, data=raw, headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status)
            if "content-type" in upstream.headers:
                response.headers["content-type"] = upstream.headers["content-type"]
            await response.prepare(request)
            async for data in upstream.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response


# The builder


@dataclass
class Worker:
    """A FastChat worker process (the real model_worker or the demo worker); `proxy` is set when
    the controller knows it by a RecordingProxy's address."""

    names: tuple[str, ...]
    port: int
    proc: subprocess.Popen
    log_path: Path
    proxy: RecordingProxy | None = None

    @property
    def url(self) -> str:
        """The worker's own address, bypassing any proxy."""
        return f"http://{HOST}:{self.port}"


class StackBuilder:
    """Starts the parts of one stack, each logging into `tmp`; a context manager that stops them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.controller_url: str | None = None
        self._cleanup = ExitStack()

    def __enter__(self) -> StackBuilder:
        return self

    def __exit__(self, *exc_info) -> None:
        self._cleanup.__exit__(*exc_info)

    def backends(self) -> Services:
        """Throwaway PostgreSQL and Redis (raises ServiceUnavailable if they cannot run here)."""
        return self._cleanup.enter_context(services())

    def controller(self) -> str:
        """FastChat's real controller; its URL (also kept as `controller_url` for the workers)."""
        port = free_port()
        proc = start_controller(port, log_path=self.tmp / "controller.log")
        self._cleanup.callback(stop_process, proc)
        self.controller_url = f"http://{HOST}:{port}"
        return self.controller_url

    def proxy(self, upstream_port: int) -> RecordingProxy:
        """A RecordingProxy in front of 127.0.0.1:`upstream_port`."""
        proxy = RecordingProxy(upstream_port).start()
        self._cleanup.callback(proxy.stop)
        return proxy

    def real_worker(self, template: str, *names: str, proxied: bool = False) -> Worker:
        """FastChat's real model_worker serving the tiny model for `template` (tests/tiny_model.py)
        as `names`, registered through a RecordingProxy if `proxied`. Not waited for
        (wait_for_workers): it loads torch while the next parts start."""
        model_dir = build_tiny_model(MODELS_DIR, template)
        port = free_port()
        proxy = self.proxy(port) if proxied else None
        proc = start_real_worker(port, self.controller_url, model_dir, names, self.tmp,
                                 address=proxy.address if proxy else None)
        self._cleanup.callback(stop_real_worker, proc)
        return Worker(names, port, proc, self.tmp / f"{','.join(names)}.log", proxy)

    def demo_worker(self, names: Iterable[str], extra_args: Iterable[str] = (),
                    log_name: str = "demo-worker.log") -> Worker:
        """The demo worker (upstreams/fastchat/demo_worker.py), listening when this returns."""
        port, names = free_port(), tuple(names)
        proc = start_demo_worker(port, self.controller_url, names, extra_args=extra_args,
                                 log_path=self.tmp / log_name)
        self._cleanup.callback(stop_process, proc)
        return Worker(names, port, proc, self.tmp / log_name)

    def llama_server(self, *, alias: str, chat_format: str, n_ctx: int = 512) -> LlamaServer:
        """llama.cpp's server on the tiny vicuna model's GGUF (tests/gguf_model.py), answering when this returns."""
        gguf = build_gguf(MODELS_DIR, "vicuna_v1.1")
        server = start_llama_server(gguf, self.tmp, alias=alias, chat_format=chat_format, n_ctx=n_ctx)
        self._cleanup.callback(server.stop)
        return server

    def wait_for_workers(self, *workers: Worker) -> None:
        """Until the controller lists every worker's models and every worker's own port accepts
        connections (a worker registers about 0.1 s before it listens). Fails at once if a worker exits."""
        wanted = {name for worker in workers for name in worker.names}
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while True:
            for worker in workers:
                if worker.proc.poll() is not None:
                    log = worker.log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"worker {','.join(worker.names)} exited with {worker.proc.returncode}:\n{log}")
            try:
                listed = set(httpx.post(f"{self.controller_url}/list_models", timeout=2).json()["models"])
            except httpx.HTTPError:
                listed = set()
            if wanted <= listed:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the controller lists {sorted(listed)}, not all of {sorted(wanted)}")
            time.sleep(0.1)
        for worker in workers:
            wait_for_port(worker.port, timeout=max(1.0, deadline - time.monotonic()))

    def gateway(self, server: str = "daphne", env: Mapping[str, str] | None = None,
                directory: str | None = None) -> Gateway:
        """A gateway process (a fresh SQLite database unless `env` names another) in `tmp`, or in
        its new subdirectory `directory`, in front of the controller."""
        where = self.tmp
        if directory is not None:
            where = self.tmp / directory
            where.mkdir()
        gateway = start_gateway(where, self.controller_url, server=server, extra_env=env)
        self._cleanup.callback(gateway.stop)
        return gateway


# The `gateway_stack` fixture's stacks


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
    with StackBuilder(tmp) as build:
        backends = build.backends() if spec.backends else None
        controller_url = build.controller()
        workers = [build.demo_worker(worker.models, worker.extra_args, log_name=f"worker{i}.log")
                   for i, worker in enumerate(spec.workers)]
        wait_for_models(controller_url, [model for worker in spec.workers for model in worker.models], timeout=20)
        env = {**(backends.env if backends else {}), **spec.env}
        gateways = [build.gateway(spec.server, env, directory=f"gateway{i}") for i in range(spec.gateways)]
        yield Stack(tmp, controller_url, [worker.url for worker in workers], gateways, backends)
