"""python manage.py demo — the whole stack on one machine: FastChat's controller, the demo
worker and the gateway, with a fresh key and a curl line to try it, and a login for the admin
(user "demo", a superuser whose password is made anew and printed at each start)."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.models import APIKey


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise CommandError(f"Nothing listens on 127.0.0.1:{port} after {timeout:.0f} s.")


DEMO_ADMIN = "demo"


def demo_admin() -> str:
    """Create or reset the demo superuser with a fresh random password, returned to be printed."""
    password = secrets.token_urlsafe(12)
    user, _ = get_user_model().objects.get_or_create(username=DEMO_ADMIN)
    user.is_staff = user.is_superuser = user.is_active = True
    user.set_password(password)
    user.save()
    return password


class Command(BaseCommand):
    help = "Run FastChat's controller, a demo worker and the gateway, and print a working key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--controller-port", type=int, default=21001)
        parser.add_argument("--worker-port", type=int, default=21002)
        parser.add_argument("--models", default="demo-chat,demo-embed")

    def handle(self, *args, **options) -> None:
        # SIGTERM (kill, systemctl stop) must stop the controller and worker too: the server
        # restores this handler after draining and raises the signal again, so the finally
        # clause below runs instead of the process dying with its children orphaned.
        # Ctrl-C (SIGINT) likewise ends the demo cleanly, without a KeyboardInterrupt traceback.
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, lambda signum, frame: sys.exit(0))
        call_command("migrate", interactive=False, verbosity=0)
        controller = f"http://127.0.0.1:{options['controller_port']}"
        logdir = tempfile.mkdtemp(prefix="gateway-demo-")
        processes = []
        try:
            processes.append(self.spawn(
                [sys.executable, "-m", "fastchat.serve.controller", "--host", "127.0.0.1",
                 "--port", str(options["controller_port"])], logdir, "controller"))
            wait_for_port(options["controller_port"], 30)
            worker_port = options["worker_port"]
            processes.append(self.spawn(
                [sys.executable, "-m", "upstreams.fastchat.demo_worker", "--host", "127.0.0.1", "--port", str(worker_port),
                 "--worker-address", f"http://127.0.0.1:{worker_port}", "--controller-address", controller,
                 "--model-names", options["models"]], logdir, "worker"))
            self.wait_for_models(controller, options["models"].split(","))
            key, plaintext = APIKey.objects.create_key("demo", owner="manage.py demo")
            self.announce(options["port"], plaintext, options["models"].split(",")[0], logdir, demo_admin())
            settings.CONTROLLER_ADDRESS = controller
            os.environ["CONTROLLER_ADDRESS"] = controller
            call_command("openai_api_server", host="127.0.0.1", port=options["port"],
                         controller_address=controller, no_migrate=True)
        finally:
            for process in reversed(processes):
                process.terminate()
            for process in processes:
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()

    def spawn(self, args: list[str], logdir: str, name: str) -> subprocess.Popen:
        log = open(os.path.join(logdir, f"{name}.log"), "ab")  # noqa: SIM115
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LOGDIR": logdir})

    def wait_for_models(self, controller: str, names: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                listed = httpx.post(f"{controller}/list_models", timeout=2).json()["models"]
                if set(names) <= set(listed):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise CommandError(f"The demo worker did not register with {controller}.")

    def announce(self, port: int, plaintext: str, model: str, logdir: str, password: str) -> None:
        base = f"http://127.0.0.1:{port}"
        self.stdout.write(
            "\nThe gateway is starting in front of FastChat's controller and a demo worker.\n"
            f"Logs of the controller and worker: {logdir}\n"
            f"API key (shown once): {plaintext}\n\nTry it:\n"
            f"  curl {base}/v1/chat/completions -H 'Authorization: Bearer {plaintext}' "
            f"-H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
            f"  export OPENAI_BASE_URL={base}/v1 OPENAI_API_KEY={plaintext}\n"
            f"\nThe admin (keys, usage dashboard, live view, upstreams): {base}/admin/\n"
            f"  user: {DEMO_ADMIN}  password (shown once): {password}\n"
        )
        self.stdout.flush()
