"""`manage.py upstreams apply|list|test|discover`: the registry as code (YAML or JSON), idempotent,
keys only from environment variables; list with health; test one upstream now."""
from __future__ import annotations

import json
import tempfile
from io import StringIO
from pathlib import Path
from unittest import mock

import yaml
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import TestCase

from upstreams.base import DiscoveredModel
from upstreams.models import Upstream, UpstreamModel
from upstreams.status import ProbeResult

EXAMPLE = Path(settings.BASE_DIR) / "deploy" / "upstreams.example.yaml"
KEYS = {"VLLM_A_API_KEY": "sk-vllm-a-Secret-0001aaaa", "VLLM_B_API_KEY": "sk-vllm-b-Secret-0002bbbb"}


class ApplyTests(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        env = mock.patch.dict("os.environ", KEYS)
        env.start()
        self.addCleanup(env.stop)

    def write(self, data, suffix=".yaml") -> str:
        path = Path(self.dir.name) / f"upstreams{suffix}"
        path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
        return str(path)

    def apply(self, path: str, *args: str) -> list[str]:
        out = StringIO()
        call_command("upstreams", "apply", path, *args, stdout=out)
        return out.getvalue().splitlines()

    def registry(self) -> dict:
        return {
            row.name: (row.kind, row.base_url, row.enabled, row.priority, row.weight, row.api_key(),
                       sorted((m.public_name, m.upstream_name, tuple(m.capabilities)) for m in row.models.all()))
            for row in Upstream.objects.all()
        }

    def test_the_example_file_applies_then_a_second_apply_changes_nothing(self):
        lines = self.apply(str(EXAMPLE))
        self.assertIn("created upstream vllm-a", lines)
        self.assertIn("created model vllm-a/llama-3-8b", lines)
        registry = self.registry()
        self.assertEqual(registry["vllm-a"][:6], ("openai", "http://10.0.0.5:8000/v1", True, 10, 3, KEYS["VLLM_A_API_KEY"]))
        self.assertEqual(registry["ollama"][6], [("llama-3-8b", "llama3:8b", ()),
                                                  ("nomic-embed-text", "nomic-embed-text", ())])
        self.assertEqual(registry["vllm-b"][6], [("llama-3-8b", "meta-llama/Meta-Llama-3-8B-Instruct",
                                                   ("json_mode", "json_schema", "tools"))])
        self.assertEqual(self.apply(str(EXAMPLE)), ["no changes"])
        self.assertEqual(self.registry(), registry)

    def test_lines_of_the_file_that_change_are_printed_and_a_key_is_never_printed(self):
        self.apply(str(EXAMPLE))
        data = yaml.safe_load(EXAMPLE.read_text())
        data["upstreams"][1]["weight"] = 5
        del data["upstreams"][1]["idle_timeout"]
        data["upstreams"][1]["models"][0]["capabilities"] = ["tools"]
        path = self.write(data)
        with mock.patch.dict("os.environ", {"VLLM_A_API_KEY": "sk-rotated-upstream-key-9999"}):
            lines = self.apply(path)
        self.assertEqual(lines[0], "updated upstream vllm-a: weight 3 → 5, idle_timeout 30.0 → 100.0, "
                                   "api_key '…aaaa' → '…9999'")
        self.assertEqual(lines[1:], ["updated model vllm-a/llama-3-8b: capabilities ['json_mode', 'json_schema', "
                                     "'tools'] → ['tools']"])
        self.assertNotIn("sk-rotated", "\n".join(lines))
        self.assertEqual(Upstream.objects.get(name="vllm-a").api_key(), "sk-rotated-upstream-key-9999")

    def test_a_json_file_works_too(self):
        path = self.write({"upstreams": [{"name": "j", "kind": "openai", "base_url": "http://j:1/v1",
                                          "models": ["m"]}]}, ".json")
        self.assertEqual(self.apply(path), ["created upstream j", "created model j/m"])
        self.assertEqual(self.apply(path), ["no changes"])

    def test_an_inline_key_is_refused_and_nothing_is_applied(self):
        for field in ("api_key", "key", "token"):
            path = self.write({"upstreams": [
                {"name": "ok", "kind": "openai", "base_url": "http://ok:1/v1"},
                {"name": "bad", "kind": "openai", "base_url": "http://bad:1/v1", field: "sk-inline-secret-key"},
            ]})
            with self.subTest(field=field), self.assertRaises(CommandError) as caught:
                self.apply(path)
            self.assertIn("api_key_env", str(caught.exception))
            self.assertNotIn("sk-inline-secret-key", str(caught.exception))
        self.assertFalse(Upstream.objects.exists())

    def test_errors_name_the_upstream_and_field_and_roll_everything_back(self):
        cases = [
            ({"name": "a", "kind": "openai", "base_url": "http://a:1/v1", "api_key_env": "NOT_SET_ANYWHERE"},
             "upstream a: the environment variable NOT_SET_ANYWHERE is not set"),
            ({"name": "a", "kind": "openai", "base_url": "ftp://a/v1"}, "upstream a: base_url"),
            ({"name": "a", "kind": "openai", "base_url": "http://a:1/v1", "weight": "heavy"}, "upstream a: weight"),
            ({"name": "a", "kind": "openai", "base_url": "http://a:1/v1", "wieght": 2}, "unknown keys wieght"),
            ({"name": "a", "kind": "openai"}, "base_url is required"),
            ({"name": "a", "kind": "openai", "base_url": "http://a:1/v1", "models": [{"public_name": "x y"}]},
             "upstream a: model x y: public_name"),
            ({"name": "a", "kind": "openai", "base_url": "http://a:1/v1",
              "models": [{"public_name": "m", "capabilities": ["telepathy"]}]}, "capabilities"),
            ({"name": "a", "kind": "fastchat", "base_url": "http://a:1", "api_key_env": "VLLM_A_API_KEY"},
             "takes no API key"),
        ]
        for entry, message in cases:
            path = self.write({"upstreams": [{"name": "first", "kind": "openai", "base_url": "http://f:1/v1"}, entry]})
            with self.subTest(message=message), self.assertRaises(CommandError) as caught:
                self.apply(path)
            self.assertIn(message, str(caught.exception))
        self.assertFalse(Upstream.objects.exists())
        for text, message in (("upstreams: 3", 'list "upstreams"'), ("{bad", "not valid YAML"), ("[]", "upstreams")):
            path = Path(self.dir.name) / "bad.yaml"
            path.write_text(text)
            with self.subTest(text=text), self.assertRaises(CommandError) as caught:
                self.apply(str(path))
            self.assertIn(message, str(caught.exception))
        with self.assertRaises(CommandError):
            self.apply(str(Path(self.dir.name) / "missing.yaml"))

    def test_upstreams_left_out_are_disabled_or_with_prune_deleted(self):
        self.apply(str(EXAMPLE))
        data = yaml.safe_load(EXAMPLE.read_text())
        path = self.write({"upstreams": [entry for entry in data["upstreams"] if entry["name"] != "ollama"]})
        self.assertEqual(self.apply(path), ["disabled upstream ollama (not in the file)"])
        self.assertFalse(Upstream.objects.get(name="ollama").enabled)
        self.assertEqual(self.apply(path), ["no changes"])
        self.assertEqual(self.apply(path, "--prune"), ["deleted upstream ollama (not in the file)"])
        self.assertFalse(Upstream.objects.filter(name="ollama").exists())
        self.assertFalse(UpstreamModel.objects.filter(upstream_name="llama3:8b").exists())

    def test_models_left_out_are_deleted_but_discovered_ones_stay(self):
        path = self.write({"upstreams": [{"name": "a", "kind": "openai", "base_url": "http://a:1/v1",
                                          "models": ["m1", "m2"]}]})
        self.apply(path)
        from upstreams import discovery

        discovery.record(Upstream.objects.get(), [DiscoveredModel("found")])
        path = self.write({"upstreams": [{"name": "a", "kind": "openai", "base_url": "http://a:1/v1",
                                          "models": ["m1"]}]})
        self.assertEqual(self.apply(path), ["deleted model a/m2 (not in the file)"])
        self.assertEqual(sorted(UpstreamModel.objects.values_list("public_name", flat=True)), ["found", "m1"])
        self.assertEqual(self.apply(path), ["no changes"])

    def test_discover_after_apply_asks_the_files_discovering_upstreams_and_reports_failures(self):
        asked = []

        def list_models(upstream, adapter=None):
            asked.append(upstream.name)
            if upstream.name == "fastchat":
                raise ConnectionError("refused")
            return [DiscoveredModel("found")]

        out = StringIO()
        with mock.patch("upstreams.discovery.list_models", side_effect=list_models):
            call_command("upstreams", "apply", str(EXAMPLE), "--discover", stdout=out, stderr=out)
        self.assertEqual(asked, ["fastchat", "ollama"])  # vllm-a and vllm-b list their models by hand
        self.assertIn("fastchat: cannot list its models (ConnectionError)", out.getvalue())
        self.assertIn("discovered model ollama/found", out.getvalue())

    def test_dry_run_prints_and_changes_nothing(self):
        lines = self.apply(str(EXAMPLE), "--dry-run")
        self.assertIn("would have created upstream vllm-a", lines)
        self.assertFalse(Upstream.objects.exists())

    def test_keys_from_the_file_are_stored_encrypted(self):
        self.apply(str(EXAMPLE))
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM upstreams_upstream")
            stored = repr(cursor.fetchall())
        for secret in KEYS.values():
            self.assertNotIn(secret, stored)


class ListTestDiscoverTests(TestCase):
    def setUp(self) -> None:
        with mock.patch.dict("os.environ", KEYS):
            call_command("upstreams", "apply", str(EXAMPLE), stdout=StringIO())

    def run_command(self, *args: str) -> str:
        out = StringIO()
        call_command("upstreams", *args, stdout=out, stderr=out)
        return out.getvalue()

    def test_list_shows_each_upstream_with_its_key_hint_and_state(self):
        Upstream.objects.filter(name="ollama").update(enabled=False)
        lines = self.run_command("list").splitlines()
        self.assertIn("state", lines[0])
        rows = {line.split()[0]: line for line in lines[1:]}
        self.assertEqual(set(rows), {"fastchat", "vllm-a", "vllm-b", "ollama"})
        self.assertIn("…aaaa", rows["vllm-a"])
        self.assertIn("disabled", rows["ollama"])
        self.assertIn("http://10.0.0.5:8000/v1", rows["vllm-a"])
        self.assertNotIn("Secret", "\n".join(lines))

    def test_list_without_upstreams_names_the_zero_configuration(self):
        Upstream.objects.all().delete()
        self.assertIn("CONTROLLER_ADDRESS is the one FastChat upstream", self.run_command("list"))

    def test_test_probes_one_upstream_now(self):
        with mock.patch("upstreams.management.commands.upstreams.test_now",
                        return_value=ProbeResult(True, 12.3, None, "")) as probe:
            self.assertEqual(self.run_command("test", "vllm-a").strip(), "vllm-a: ok in 12 ms")
        self.assertEqual(probe.call_args.args[0].name, "vllm-a")
        failing = ProbeResult(False, 3.0, "credentials_rejected", "401 from the upstream")
        with mock.patch("upstreams.management.commands.upstreams.test_now", return_value=failing), \
                self.assertRaises(CommandError) as caught:
            self.run_command("test", "vllm-b")
        self.assertEqual(str(caught.exception), "vllm-b: credentials_rejected in 3 ms: 401 from the upstream")
        with self.assertRaises(CommandError):
            self.run_command("test", "nope")

    def test_discover_records_models_and_goes_on_past_a_failing_upstream(self):
        def list_models(upstream, adapter=None):
            if upstream.name == "fastchat":
                raise ConnectionError("refused")
            return [DiscoveredModel("qwen2.5:7b", frozenset({"tools"}))]

        with mock.patch("upstreams.discovery.list_models", side_effect=list_models), \
                self.assertRaises(CommandError) as caught:
            self.run_command("discover")
        self.assertIn("fastchat", str(caught.exception))
        self.assertEqual(list(UpstreamModel.objects.filter(upstream__name="ollama", discovered=True)
                              .values_list("public_name", "capabilities")), [("qwen2.5:7b", ["tools"])])
        # vllm-a and vllm-b do not discover; naming one asks it anyway
        with mock.patch("upstreams.discovery.list_models", side_effect=list_models):
            self.assertIn("discovered model vllm-a/qwen2.5:7b", self.run_command("discover", "vllm-a"))
