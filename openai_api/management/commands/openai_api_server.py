"""python manage.py openai_api_server — a drop-in for FastChat's openai_api_server CLI."""
from __future__ import annotations

import asyncio
import json
import os

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser


class DrainingServer:
    """uvicorn's Server, telling the gateway when a shutdown starts so that streams still
    running after GATEWAY_DRAIN_SECONDS end with an error event and [DONE] (lifecycle.py)."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            async def _serve(self, sockets=None):
                self.loop = asyncio.get_running_loop()
                await super()._serve(sockets)
                # uvicorn re-raises SIGTERM after serving, so atexit hooks would not run.
                from keys.usage import usage_writer

                await asyncio.to_thread(usage_writer.stop)

            def handle_exit(self, sig, frame):
                from openai_api.lifecycle import begin_shutdown

                if getattr(self, "loop", None) is not None:
                    begin_shutdown(self.loop, settings.GATEWAY_DRAIN_SECONDS)
                super().handle_exit(sig, frame)

        return Server(config)


class Command(BaseCommand):
    help = "Serve the OpenAI API (FastChat's openai_api_server flags) with uvicorn or daphne."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="localhost")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--controller-address", default=settings.CONTROLLER_ADDRESS)
        parser.add_argument("--allow-credentials", action="store_true")
        parser.add_argument("--allowed-origins", type=json.loads, default=["*"])
        parser.add_argument("--allowed-methods", type=json.loads, default=["*"])
        parser.add_argument("--allowed-headers", type=json.loads, default=["*"])
        parser.add_argument("--api-keys", type=lambda s: s.split(","), default=None,
                            help="Plaintext keys to import (stored hashed), as FastChat's flag.")
        parser.add_argument("--ssl", action="store_true", help="Use SSL_KEYFILE and SSL_CERTFILE.")
        parser.add_argument("--server", choices=["uvicorn", "daphne"], default="uvicorn")
        parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes.")
        parser.add_argument("--no-migrate", action="store_true", help="Do not apply migrations first.")

    def handle(self, *args, **options) -> None:
        self.export_settings(options)
        if not options["no_migrate"]:
            call_command("migrate", interactive=False, verbosity=0)
        if options["api_keys"] is not None:
            self.sync_flag_keys(options["api_keys"])
        ssl = self.ssl_files() if options["ssl"] else {}
        if options["server"] == "daphne":
            self.run_daphne(options, ssl)
        else:
            self.run_uvicorn(options, ssl)

    def sync_flag_keys(self, plaintexts: list[str]) -> None:
        """As in FastChat, the flag's list is the set of keys that work: its keys are imported
        (stored hashed), and keys of an earlier list missing from it are revoked."""
        from keys import audit
        from keys.models import APIKey

        with audit.context(origin="command", where="manage.py openai_api_server --api-keys"):
            result = APIKey.objects.sync_flag_keys(k for k in plaintexts if k)
        self.stderr.write(f"--api-keys: {result.created} key(s) imported (stored hashed), {result.present} already "
                          f"present, {result.revoked} no longer listed and revoked.")
        if result.still_revoked:
            self.stderr.write(f"--api-keys: {result.still_revoked} listed key(s) were revoked in the admin and stay "
                              "revoked; list new keys instead.")

    def export_settings(self, options: dict) -> None:
        """Settings for this process and, through the environment, for worker processes."""
        values = {
            "CONTROLLER_ADDRESS": options["controller_address"].rstrip("/"),
            "CORS_ALLOWED_ORIGINS": options["allowed_origins"],
            "CORS_ALLOWED_METHODS": options["allowed_methods"],
            "CORS_ALLOWED_HEADERS": options["allowed_headers"],
            "CORS_ALLOW_CREDENTIALS": options["allow_credentials"],
        }
        for name, value in values.items():
            setattr(settings, name, value)
            os.environ[name] = json.dumps(value) if isinstance(value, list) else str(value)

    def ssl_files(self) -> dict[str, str]:
        try:
            return {"keyfile": os.environ["SSL_KEYFILE"], "certfile": os.environ["SSL_CERTFILE"]}
        except KeyError as exc:
            raise CommandError(f"--ssl needs the {exc.args[0]} environment variable.") from None

    def run_uvicorn(self, options: dict, ssl: dict[str, str]) -> None:
        import uvicorn

        config = uvicorn.Config(
            "gateway_project.asgi:application",
            host=options["host"], port=options["port"], workers=options["workers"],
            loop="uvloop", http="httptools", lifespan="on", log_level="info",
            access_log=False, timeout_graceful_shutdown=settings.GATEWAY_DRAIN_SECONDS + 10,
            ssl_keyfile=ssl.get("keyfile"), ssl_certfile=ssl.get("certfile"),
        )
        if options["workers"] > 1:
            # uvicorn's own supervisor: each worker drains until timeout_graceful_shutdown.
            uvicorn.run(**{name: getattr(config, name) for name in ("app", "host", "port", "workers", "loop", "http",
                                                                     "lifespan", "log_level", "access_log",
                                                                     "timeout_graceful_shutdown", "ssl_keyfile",
                                                                     "ssl_certfile")})
        else:
            DrainingServer(config).run()

    def run_daphne(self, options: dict, ssl: dict[str, str]) -> None:
        from daphne.cli import CommandLineInterface

        endpoint = f"tcp:port={options['port']}:interface={options['host']}"
        if ssl:
            endpoint = f"ssl:{options['port']}:interface={options['host']}:privateKey={ssl['keyfile']}:certKey={ssl['certfile']}"
        CommandLineInterface().run(["-e", endpoint, "gateway_project.asgi:application"])
