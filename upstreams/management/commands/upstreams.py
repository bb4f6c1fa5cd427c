"""python manage.py upstreams apply|list|test|discover|rotate-key — the registry from the command line.

  apply FILE [--dry-run] [--prune] [--discover]
                                     make the registry match a YAML/JSON file (upstreams/config.py)
  list                               each upstream: kind, address, enabled, priority, weight, models, health
  test NAME                          probe one upstream now (exit status 1 when it fails)
  discover [NAME ...]                ask upstreams (all with discover_models, or those named) for their models
  rotate-key                         re-encrypt every stored upstream API key with the newest GATEWAY_ENCRYPTION_KEY
"""
from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from upstreams import config, crypto, discovery
from upstreams.models import Upstream
from upstreams.registry import readable_key
from upstreams.status import status_of, test_now


class Command(BaseCommand):
    help = "Manage the upstream registry: apply a configuration file, list, test, discover models, rotate the key."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        apply = actions.add_parser("apply", help="Make the registry match a YAML or JSON file.")
        apply.add_argument("file")
        apply.add_argument("--dry-run", action="store_true", help="Print what would change, change nothing.")
        apply.add_argument("--prune", action="store_true",
                           help="Delete upstreams the file does not list (default: disable them).")
        apply.add_argument("--discover", action="store_true",
                           help="Then ask the file's enabled upstreams with discover_models for their models.")
        actions.add_parser("list", help="Each upstream's settings and health.")
        test = actions.add_parser("test", help="Probe one upstream now.")
        test.add_argument("name")
        discover = actions.add_parser("discover", help="Ask upstreams for their models.")
        discover.add_argument("names", nargs="*")
        actions.add_parser("rotate-key", help="Re-encrypt stored upstream API keys with the newest key.")

    def handle(self, *args, **options) -> None:
        try:
            getattr(self, "do_" + options["action"].replace("-", "_"))(options)
        except (config.ConfigError, crypto.EncryptionKeyMissing, crypto.EncryptionKeyInvalid,
                crypto.UndecryptableSecret) as exc:
            raise CommandError(str(exc)) from None

    def do_apply(self, options) -> None:
        data = config.read(options["file"])
        lines = config.apply(data, prune=options["prune"], dry_run=options["dry_run"])
        prefix = "would have " if options["dry_run"] else ""
        for line in lines:
            self.stdout.write(prefix + line)
        if not lines:
            self.stdout.write("no changes")
        if options["discover"] and not options["dry_run"]:
            names = [entry["name"] for entry in data["upstreams"]]
            self.discover(list(Upstream.objects.filter(name__in=names, enabled=True, discover_models=True)
                               .order_by("name")), strict=False)

    def do_list(self, options) -> None:
        upstreams = list(Upstream.objects.prefetch_related("models").order_by("-priority", "name"))
        if not upstreams:
            self.stdout.write("No upstream is registered: CONTROLLER_ADDRESS is the one FastChat upstream.")
            return
        self.stdout.write(f"{'name':20} {'kind':8} {'on':3} {'prio':>4} {'weight':>6} {'key':6} {'models':>6} "
                          f"{'state':20} {'latency':>8}  base URL / last error")
        for upstream in upstreams:
            status = status_of(upstream.name, enabled=upstream.enabled, api_key=readable_key(upstream))
            latency = f"{status.latency_ms:.0f} ms" if status.latency_ms is not None else "-"
            models = sum(1 for model in upstream.models.all() if model.enabled)
            self.stdout.write(
                f"{upstream.name:20} {upstream.kind:8} {'yes' if upstream.enabled else 'no':3} {upstream.priority:>4} "
                f"{upstream.weight:>6} {upstream.api_key_hint or '-':6} {models:>6} {status.label:20} {latency:>8}  "
                f"{upstream.base_url}" + (f"  ({status.last_error})" if status.last_error else "")
            )

    def do_test(self, options) -> None:
        upstream = self.find(options["name"])
        result = test_now(upstream)
        latency = f" in {result.latency_ms:.0f} ms" if result.latency_ms is not None else ""
        if result.ok:
            self.stdout.write(f"{upstream.name}: ok{latency}")
            return
        raise CommandError(f"{upstream.name}: {result.failure or 'failed'}{latency}: {result.message}")

    def do_discover(self, options) -> None:
        if options["names"]:
            upstreams = [self.find(name) for name in options["names"]]
        else:
            upstreams = list(Upstream.objects.filter(enabled=True, discover_models=True).order_by("name"))
        self.discover(upstreams, strict=True)

    def discover(self, upstreams: list[Upstream], *, strict: bool) -> None:
        """Discover each upstream's models; one that cannot answer is reported (an error when strict)."""
        failed = []
        for upstream in upstreams:
            try:
                lines = discovery.discover(upstream)
            except Exception as exc:  # one upstream down does not stop the others
                failed.append(upstream.name)
                self.stderr.write(f"{upstream.name}: cannot list its models ({type(exc).__name__})")
                continue
            for line in lines or [f"{upstream.name}: no changes"]:
                self.stdout.write(line)
        if failed and strict:
            raise CommandError(f"discovery failed for {', '.join(failed)}")

    def do_rotate_key(self, options) -> None:
        count = Upstream.objects.rotate_api_keys()
        self.stdout.write(f"re-encrypted {count} upstream API key(s) with the first GATEWAY_ENCRYPTION_KEY")

    def find(self, name: str) -> Upstream:
        upstream = Upstream.objects.filter(name=name).first()
        if upstream is None:
            raise CommandError(f"No upstream is named {name[:64]!r}.")
        return upstream
