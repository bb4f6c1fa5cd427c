"""The upstream registry: validation, keys encrypted at rest (and their rotation), the per-process
snapshot (refreshed within a second, kept through a database outage, zero configuration), discovery
and the audit hook."""
from __future__ import annotations

import asyncio
from io import StringIO

from cryptography.fernet import Fernet
from django.core.checks import Error
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection
from django.test import TestCase, override_settings

from gateway_project import state
from upstreams import checks, crypto, discovery, registry
from upstreams.base import DiscoveredModel
from upstreams.models import Upstream, UpstreamModel
from upstreams.registry import Registry, RegistryUnavailable, Snapshot, load_snapshot
from upstreams.signals import registry_changed

KEY_A, KEY_B = Fernet.generate_key().decode(), Fernet.generate_key().decode()
SECRET = "sk-upstream-Secret-9f8e7d6c5b4a"


def upstream(name="vllm", **fields) -> Upstream:
    fields = {"kind": "openai", "base_url": "http://10.0.0.5:8000/v1", **fields}
    key = fields.pop("api_key", None)
    row = Upstream(name=name, **fields)
    row.set_api_key(key)
    row.save_by()
    return row


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ValidationTests(TestCase):
    def assertInvalid(self, field: str, **fields) -> None:
        with self.assertRaises(ValidationError) as caught:
            upstream(**fields)
        self.assertIn(field, caught.exception.message_dict)

    def test_bad_fields_are_refused_with_the_field_named(self):
        self.assertInvalid("base_url", base_url="ftp://10.0.0.5/v1")
        self.assertInvalid("base_url", base_url="file:///etc/passwd")
        self.assertInvalid("base_url", base_url="not a url")
        self.assertInvalid("base_url", base_url="http://user:pass@h:8000/v1")
        self.assertInvalid("base_url", base_url="http://h:99999/v1")
        self.assertInvalid("base_url", base_url="http:///v1")
        self.assertInvalid("name", name="has space")
        self.assertInvalid("name", name="a/b")
        self.assertInvalid("connect_timeout", connect_timeout=0)
        self.assertInvalid("idle_timeout", idle_timeout=3601)
        self.assertInvalid("first_byte_timeout", first_byte_timeout=-1)
        self.assertInvalid("weight", weight=1001)
        self.assertInvalid("priority", priority=-1)
        self.assertInvalid("priority", priority=1001)
        self.assertInvalid("max_concurrency", max_concurrency=0)
        self.assertInvalid("kind", kind="grpc")
        self.assertFalse(Upstream.objects.exists())

    def test_extra_headers_are_a_flat_map_without_the_gateways_own_headers(self):
        for headers in ({"Authorization": "Bearer x"}, {"host": "evil"}, {"Content-Length": "1"},
                        {"X-A": "line\r\nbreak"}, {"X-A": 1}, {"bad name": "x"}, ["X-A", "x"],
                        {f"X-{i}": "x" for i in range(33)}, {"X-A": {"nested": "x"}}):
            with self.subTest(headers=headers):
                self.assertInvalid("extra_headers", extra_headers=headers)
        row = upstream(extra_headers={"X-Team": "research", "OpenAI-Organization": "org-1"})
        self.assertEqual(row.extra_headers["X-Team"], "research")

    def test_a_trailing_slash_is_dropped_and_a_fastchat_controller_takes_no_key(self):
        self.assertEqual(upstream(base_url="http://h:8000/v1/").base_url, "http://h:8000/v1")
        self.assertInvalid("kind", name="ctl", kind="fastchat", base_url="http://h:21001", api_key=SECRET)

    def test_model_names_and_capabilities_are_checked(self):
        row = upstream()
        for fields, field in (({"public_name": "has space"}, "public_name"), ({"upstream_name": ""}, "upstream_name"),
                              ({"public_name": "x" * 201}, "public_name"), ({"capabilities": ["telepathy"]}, "capabilities"),
                              ({"capabilities": "tools"}, "capabilities")):
            model = UpstreamModel(upstream=row, **{"public_name": "m", "upstream_name": "m", **fields})
            with self.subTest(fields=fields), self.assertRaises(ValidationError) as caught:
                model.save_by()
            self.assertIn(field, caught.exception.message_dict)
        model = UpstreamModel(upstream=row, public_name="llama-3-8b", upstream_name="llama3:8b",
                              capabilities=["vision", "tools", "tools"])
        model.save_by()
        self.assertEqual(model.capabilities, ["tools", "vision"])
        with self.assertRaises(ValidationError):  # one public name per upstream
            UpstreamModel(upstream=row, public_name="llama-3-8b", upstream_name="other").save_by()


@override_settings(GATEWAY_ENCRYPTION_KEY=KEY_A)
class EncryptionTests(TestCase):
    def test_the_key_is_stored_encrypted_and_only_its_last_four_characters_in_clear(self):
        row = upstream(api_key=SECRET)
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM upstreams_upstream")
            stored = repr(cursor.fetchall())
        self.assertNotIn(SECRET, stored)
        self.assertNotIn(SECRET[3:-4], stored)
        self.assertIn(row.api_key_encrypted, stored)
        self.assertEqual(row.api_key_hint, "…5b4a")
        self.assertEqual(Upstream.objects.get().api_key(), SECRET)
        self.assertEqual(Fernet(KEY_A).decrypt(row.api_key_encrypted.encode()).decode(), SECRET)

    def test_rotation_re_encrypts_every_key_with_the_newest_one(self):
        upstream("a", api_key=SECRET)
        upstream("b", api_key=SECRET + "2")
        upstream("c")
        with override_settings(GATEWAY_ENCRYPTION_KEY=f"{KEY_B},\n{KEY_A}"):
            self.assertEqual(Upstream.objects.get(name="a").api_key(), SECRET)  # the old key still reads
            out = StringIO()
            call_command("upstreams", "rotate-key", stdout=out)
            self.assertIn("re-encrypted 2 upstream API key(s)", out.getvalue())
        with override_settings(GATEWAY_ENCRYPTION_KEY=KEY_B):  # the old key dropped
            self.assertEqual(Upstream.objects.get(name="a").api_key(), SECRET)
            self.assertEqual(Upstream.objects.get(name="b").api_key(), SECRET + "2")
            self.assertEqual(load_snapshot().unreadable_keys, frozenset())
        with self.assertRaises(crypto.UndecryptableSecret):  # the old key alone no longer reads them
            Upstream.objects.get(name="a").api_key()
        self.assertEqual(load_snapshot().unreadable_keys, {"a", "b"})

    def test_rotation_without_the_old_key_changes_nothing(self):
        row = upstream("a", api_key=SECRET)
        with override_settings(GATEWAY_ENCRYPTION_KEY=KEY_B), self.assertRaises(CommandError):
            call_command("upstreams", "rotate-key", stdout=StringIO())
        self.assertEqual(Upstream.objects.get().api_key_encrypted, row.api_key_encrypted)

    @override_settings(GATEWAY_ENCRYPTION_KEY="", DEBUG=False, RUNNING_DEMO=False)
    def test_production_without_a_key_fails_its_start_up_check_once_keys_are_stored(self):
        self.assertEqual(checks.encryption_key(), [])  # nothing stored: zero configuration starts
        with self.assertRaises(crypto.EncryptionKeyMissing):
            upstream(api_key=SECRET)
        with override_settings(GATEWAY_ENCRYPTION_KEY=KEY_A):
            upstream(api_key=SECRET)
        problems = checks.encryption_key()
        self.assertEqual([problem.id for problem in problems], ["upstreams.E001"])
        self.assertIsInstance(problems[0], Error)
        self.assertIn("GATEWAY_ENCRYPTION_KEY", problems[0].msg)

    def test_a_malformed_key_is_reported_without_its_value(self):
        with override_settings(GATEWAY_ENCRYPTION_KEY="not-a-fernet-key-but-secret"):
            problems = checks.encryption_key()
        self.assertEqual([problem.id for problem in problems], ["upstreams.E002"])
        self.assertNotIn("not-a-fernet-key-but-secret", problems[0].msg)

    @override_settings(GATEWAY_ENCRYPTION_KEY="", DEBUG=True)
    def test_development_derives_a_key_from_the_secret_key(self):
        row = upstream(api_key=SECRET)
        self.assertEqual(Upstream.objects.get().api_key(), SECRET)
        with override_settings(SECRET_KEY="another"), self.assertRaises(crypto.UndecryptableSecret):
            row.api_key()


@override_settings(GATEWAY_ENCRYPTION_KEY=KEY_A)
class SnapshotTests(TestCase):
    def setUp(self) -> None:
        state.reset()
        self.addCleanup(state.reset)

    def test_no_upstream_means_zero_configuration_on_controller_address(self):
        snapshot = registry.snapshot()
        self.assertFalse(snapshot.configured)
        self.assertEqual(snapshot.upstreams, ())
        with override_settings(CONTROLLER_ADDRESS="http://ctl:21001"):
            spec = registry.zero_config_upstream()
        self.assertEqual((spec.kind, spec.base_url), ("fastchat", "http://ctl:21001"))

    def test_enabled_upstreams_and_models_become_routes_highest_priority_first(self):
        low = upstream("low", priority=1, weight=3, api_key=SECRET, extra_headers={"X-Team": "r"})
        high = upstream("high", priority=5, max_concurrency=8)
        off = upstream("off", priority=9, enabled=False)
        for row, name in ((low, "meta-llama/Meta-Llama-3-8B-Instruct"), (high, "llama3:8b"), (off, "llama3")):
            UpstreamModel(upstream=row, public_name="llama-3-8b", upstream_name=name,
                          capabilities=["tools"] if row is low else []).save_by()
        UpstreamModel(upstream=high, public_name="hidden", upstream_name="hidden", enabled=False).save_by()
        snapshot = registry.snapshot()
        self.assertTrue(snapshot.configured)
        self.assertEqual([spec.name for spec in snapshot.upstreams], ["high", "low"])
        self.assertEqual(snapshot.public_models(), ["llama-3-8b"])
        routes = snapshot.routes["llama-3-8b"]
        self.assertEqual([(r.upstream, r.upstream_model, r.priority, r.weight) for r in routes],
                         [("high", "llama3:8b", 5, 1), ("low", "meta-llama/Meta-Llama-3-8B-Instruct", 1, 3)])
        self.assertEqual(routes[1].capabilities, {"tools"})
        self.assertEqual(routes[0].max_concurrency, 8)
        self.assertEqual([spec.name for spec, _ in snapshot.serving("llama-3-8b")], ["high", "low"])
        spec = snapshot.upstream("low")
        self.assertEqual(spec.headers(), {"X-Team": "r", "Authorization": f"Bearer {SECRET}"})
        self.assertNotIn(SECRET, repr(spec) + repr(snapshot) + str(snapshot))
        self.assertEqual(snapshot.upstream("high").headers(), {})

    def test_only_disabled_upstreams_is_still_configured(self):
        upstream("off", enabled=False)
        snapshot = registry.snapshot()
        self.assertTrue(snapshot.configured)
        self.assertEqual(snapshot.routes, {})

    def test_a_snapshot_is_reused_for_a_second_then_read_again(self):
        clock, reads = Clock(), []

        def loader() -> Snapshot:
            reads.append(clock.now)
            return load_snapshot()

        cache = Registry(loader, clock=clock)
        self.assertFalse(cache.snapshot().configured)
        upstream("new")
        clock.now += 0.9
        self.assertFalse(cache.snapshot().configured)  # within the second: no read
        self.assertEqual(len(reads), 1)
        clock.now += 0.1
        self.assertTrue(cache.snapshot().configured)
        self.assertEqual(len(reads), 2)

    def test_a_change_made_here_is_seen_by_the_next_call(self):
        self.assertFalse(registry.snapshot().configured)
        row = upstream("new")
        self.assertEqual([spec.name for spec in registry.snapshot().upstreams], ["new"])
        row.enabled = False
        row.save_by()
        self.assertEqual(registry.snapshot().upstreams, ())

    def test_the_last_snapshot_stays_while_the_database_cannot_be_read(self):
        clock, failing = Clock(), [False]

        def loader() -> Snapshot:
            if failing[0]:
                raise DatabaseError("connection refused")
            return load_snapshot()

        upstream("a")
        cache = Registry(loader, clock=clock)
        first = cache.snapshot()
        failing[0] = True
        clock.now += 5
        with self.assertLogs("upstreams.registry", "WARNING") as logs:
            self.assertIs(cache.snapshot(), first)
            clock.now += 5
            self.assertIs(cache.snapshot(), first)
        self.assertEqual(len(logs.records), 1)  # the outage is logged once
        failing[0] = False
        clock.now += 1
        self.assertIsNot(cache.snapshot(), first)

    def test_a_process_that_never_read_the_registry_answers_unavailable(self):
        def loader() -> Snapshot:
            raise DatabaseError("down")

        with self.assertLogs("upstreams.registry", "WARNING"), self.assertRaises(RegistryUnavailable):
            Registry(loader, clock=Clock()).snapshot()

    def test_in_an_event_loop_a_stale_snapshot_is_served_at_once_and_refreshed_behind(self):
        clock, reads = Clock(), []
        snapshots = [Snapshot(configured=False), Snapshot(configured=True)]

        def loader() -> Snapshot:
            reads.append(clock.now)
            return snapshots[len(reads) - 1]

        cache = Registry(loader, clock=clock)

        async def scenario():
            first = await cache.asnapshot()  # the first read is waited for
            clock.now += 2
            stale = await cache.asnapshot()  # served at once, the read starts behind it
            again = cache.snapshot()  # sync callers in the loop too
            await asyncio.sleep(0.05)
            await cache._refreshing
            return first, stale, again, await cache.asnapshot()

        first, stale, again, fresh = asyncio.run(scenario())
        self.assertFalse(first.configured)
        self.assertIs(stale, first)
        self.assertIs(again, first)
        self.assertTrue(fresh.configured)
        self.assertEqual(len(reads), 2)  # one background read for both stale calls

    def test_state_reset_forgets_the_snapshot(self):
        registry.snapshot()
        before = state.get("upstream_registry")
        state.reset()
        self.assertIsNot(state.get("upstream_registry"), before)


class DiscoveryTests(TestCase):
    def setUp(self) -> None:
        self.row = upstream("vllm")

    def models(self) -> dict[str, tuple]:
        return {m.upstream_name: (m.public_name, m.capabilities, m.discovered, m.context_length)
                for m in UpstreamModel.objects.filter(upstream=self.row)}

    def test_discovered_models_are_recorded_and_hand_edits_survive(self):
        UpstreamModel(upstream=self.row, public_name="llama-3-8b", upstream_name="llama3:8b").save_by()
        lines = discovery.record(self.row, [
            DiscoveredModel("llama3:8b", frozenset({"tools"})),
            DiscoveredModel("qwen", frozenset({"json_schema", "made-up"}), context_length=32768),
            DiscoveredModel("bad name"),
        ])
        self.assertEqual(self.models(), {
            "llama3:8b": ("llama-3-8b", ["tools"], False, None),  # the alias row stays, capabilities learned
            "qwen": ("qwen", ["json_schema"], True, 32768),
        })
        self.assertIn("discovered model vllm/qwen", lines)
        self.assertTrue(any("no valid model name" in line for line in lines))
        qwen = UpstreamModel.objects.get(upstream_name="qwen")
        qwen.capabilities, qwen.capabilities_by_hand = ["vision"], True
        qwen.save_by()
        self.assertEqual(discovery.record(self.row, [DiscoveredModel("llama3:8b", frozenset({"tools"})),
                                                     DiscoveredModel("qwen", frozenset({"json_schema"}), 32768)]), [])
        self.assertEqual(UpstreamModel.objects.get(upstream_name="qwen").capabilities, ["vision"])

    def test_a_model_no_longer_listed_is_removed_unless_edited_by_hand(self):
        discovery.record(self.row, [DiscoveredModel("a"), DiscoveredModel("b"), DiscoveredModel("c")])
        b = UpstreamModel.objects.get(upstream_name="b")
        b.public_name = "b-alias"
        b.save_by()
        lines = discovery.record(self.row, [])
        self.assertEqual(set(self.models()), {"b"})
        self.assertEqual(len([line for line in lines if line.startswith("removed")]), 2)

    def test_discover_asks_the_adapter(self):
        class Adapter:
            async def list_models(self):
                return [DiscoveredModel("m1"), DiscoveredModel("m2", frozenset({"embeddings"}))]

        self.assertEqual(len(discovery.discover(self.row, adapter=Adapter())), 2)
        self.assertEqual(self.models()["m2"], ("m2", ["embeddings"], True, None))


class AuditHookTests(TestCase):
    def test_every_change_is_announced_with_its_actor_and_source_and_no_key(self):
        seen = []

        def receiver(sender, instance, action, changes, actor, source, **kwargs):
            seen.append((sender.__name__, instance.name if sender is Upstream else instance.public_name, action,
                         changes, actor, source))

        registry_changed.connect(receiver)
        self.addCleanup(registry_changed.disconnect, receiver)
        with self.captureOnCommitCallbacks(execute=True), override_settings(GATEWAY_ENCRYPTION_KEY=KEY_A):
            row = upstream("a", api_key=SECRET)
            row.weight = 5
            row.set_api_key(SECRET + "x")
            row.save_by("ops", "admin")
            self.assertEqual(row.save_by("ops", "admin"), {})  # nothing changed: nothing announced
            model = UpstreamModel(upstream=row, public_name="m", upstream_name="m")
            model.save_by("ops", "api")
            model.delete_by("ops", "api")
            row.delete_by(None, "config")
        self.assertEqual([(s[0], s[1], s[2], s[5]) for s in seen], [
            ("Upstream", "a", "created", "code"), ("Upstream", "a", "updated", "admin"),
            ("UpstreamModel", "m", "created", "api"), ("UpstreamModel", "m", "deleted", "api"),
            ("Upstream", "a", "deleted", "config"),
        ])
        self.assertEqual(seen[1][3], {"weight": (1, 5), "api_key": ("…5b4a", "…b4ax")})
        self.assertEqual(seen[1][4], "ops")
        self.assertNotIn(SECRET, repr(seen))
