"""GET /metrics: Prometheus text whose numbers match the requests sent; access-log lines."""
from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from unittest import mock

from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

from keys.models import APIKey
from openai_api import observability
from openai_api.auth import key_cache
from openai_api.observability import endpoint_label, error_codes
from tests.base import GatewayTestCase
from tests.sse import read_stream

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def samples(text: str) -> dict[tuple, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


class MetricsTests(GatewayTestCase):
    async def scrape(self) -> dict[tuple, float]:
        response = await self.async_client.get("/metrics")
        self.assertEqual(response.status_code, 200)
        self.assertTrue(response["Content-Type"].startswith("text/plain"))
        return samples(response.content.decode())

    def delta(self, before, after, name, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    async def test_counters_match_the_requests_sent(self):
        before = await self.scrape()
        bodies = [(await self.post(CHAT, BODY)).json() for _ in range(3)]
        await self.post(CHAT, {**BODY, "temperature": 5})
        await read_stream(await self.post(CHAT, {**BODY, "stream": True}))
        after = await self.scrape()
        self.assertEqual(self.delta(before, after, "gateway_requests_total", endpoint=CHAT, model="m1", status="200"), 4)
        self.assertEqual(self.delta(before, after, "gateway_requests_total", endpoint=CHAT, model="m1", status="400"), 1)
        self.assertEqual(self.delta(before, after, "gateway_errors_total", endpoint=CHAT, code="invalid_value"), 1)
        completion = sum(b["usage"]["completion_tokens"] for b in bodies)
        self.assertGreaterEqual(self.delta(before, after, "gateway_tokens_total", model="m1", direction="completion"), completion)
        self.assertEqual(self.delta(before, after, "gateway_request_duration_seconds_count", endpoint=CHAT, model="m1"), 5)
        self.assertEqual(self.delta(before, after, "gateway_time_to_first_token_seconds_count", model="m1"), 4)
        self.assertEqual(after[("gateway_streams_in_flight", ())], 0)

    async def test_upstream_errors_are_counted(self):
        self.fake.no_worker = True
        before = await self.scrape()
        await self.post(CHAT, BODY)
        after = await self.scrape()
        self.assertEqual(self.delta(before, after, "gateway_upstream_errors_total", model="m1", code="service_unavailable"), 1)

    @override_settings(GATEWAY_METRICS_TOKEN="s3cret")
    async def test_a_metrics_token_protects_the_endpoint(self):
        self.assertEqual((await self.async_client.get("/metrics")).status_code, 401)
        response = await self.async_client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        self.assertEqual(response.status_code, 200)

    async def test_each_request_writes_one_access_line_without_the_key(self):
        with self.assertLogs("gateway.access", level="INFO") as logs:
            response = await self.post(CHAT, BODY)
        line = json.loads(logs.records[-1].getMessage())
        self.assertEqual(line["request_id"], response["X-Request-ID"])
        self.assertEqual((line["status"], line["model"], line["key"]), (200, "m1", self.key.prefix))
        self.assertGreater(line["completion_tokens"], 0)
        self.assertNotIn(self.plaintext, "\n".join(logs.output))


class LabelTests(GatewayTestCase):
    """Label values come from closed sets, whatever clients send."""

    async def series(self) -> set[tuple]:
        response = await self.async_client.get("/metrics")
        self.assertEqual(response.status_code, 200)
        return set(samples(response.content.decode()))

    async def test_300_random_model_names_add_a_handful_of_series(self):
        async def random_models(count: int) -> None:
            for _ in range(count):
                response = await self.post(CHAT, {**BODY, "model": f"nope-{secrets.token_hex(8)}"})
                self.assertError(response, 404, code="model_not_found")
                # and a path under a parametrised route
                self.assertEqual((await self.get(f"/v1/models/nope-{secrets.token_hex(8)}")).status_code, 404)

        chat_404 = ("gateway_requests_total", (("endpoint", CHAT), ("model", "other"), ("status", "404")))
        await self.post(CHAT, BODY)
        start = samples((await self.async_client.get("/metrics")).content.decode())
        await random_models(1)
        first = await self.series()
        await random_models(299)
        after = samples((await self.async_client.get("/metrics")).content.decode())
        added = set(after) - first
        # (Earlier tests in this process may have made the "other" series already.)
        print(f"the first request with a random model added {len(first - set(start))} samples "
              f"(buckets included), the next 299 added {len(added)}")
        self.assertEqual(added, set())
        self.assertLessEqual(len({(name, labels) for name, labels in first - set(start)
                                  if not name.endswith(("_bucket", "_created"))}), 20)
        models = {dict(labels).get("model") for _, labels in first - set(start)} - {None}
        self.assertLessEqual(models, {"other", ""})
        self.assertEqual(after[chat_404] - start.get(chat_404, 0), 300)

    async def test_endpoints_are_route_templates(self):
        series = ("gateway_requests_total",
                  (("endpoint", "/v1/engines/{model}/embeddings"), ("model", "embed"), ("status", "200")))
        before = samples((await self.async_client.get("/metrics")).content.decode())
        response = await self.post("/v1/engines/embed/embeddings", {"input": ["a"]})
        self.assertEqual(response.status_code, 200, response.content)
        after = samples((await self.async_client.get("/metrics")).content.decode())
        self.assertEqual(after[series] - before.get(series, 0), 1)
        self.assertFalse([labels for _, labels in after if "embed/" in dict(labels).get("endpoint", "")])

    async def test_models_a_key_names_keep_their_name(self):
        await APIKey.objects.filter(pk=self.key.pk).aupdate(allowed_models=["m1", "retired"])
        key_cache.clear()
        await self.post(CHAT, {**BODY, "model": "retired"})  # named by the key, served by no worker
        labels = samples((await self.async_client.get("/metrics")).content.decode())
        self.assertIn(("gateway_requests_total", (("endpoint", CHAT), ("model", "retired"), ("status", "404"))), labels)

    def test_label_decisions_are_cached(self):
        self.assertEqual(endpoint_label("/v1/engines/x/embeddings"), "/v1/engines/{model}/embeddings")
        self.assertEqual(endpoint_label("/v1/models/a/b"), "/v1/models/{model}")
        self.assertEqual(endpoint_label("/v1/no-such-route"), "other")
        with mock.patch.object(observability, "route_label", side_effect=AssertionError("decided again")):
            self.assertEqual(endpoint_label("/v1/engines/x/embeddings"), "/v1/engines/{model}/embeddings")

    def test_every_error_code_the_gateway_sets_is_a_known_label(self):
        """Codes given as literals in the code (code="...", ctx.finish(status, "...")) must be in
        the closed set, or their requests would be counted as "other"."""
        found = set()
        root = Path(__file__).resolve().parent.parent
        for path in [*(root / "openai_api").glob("*.py"), *(root / "upstreams").rglob("*.py")]:
            text = path.read_text()
            found |= set(re.findall(r'\bcode="([a-z_]+)"', text))
            found |= set(re.findall(r'finish\(\d+, "([a-z_]+)"\)', text))
            found |= set(re.findall(r'error_code = "([a-z_]+)"', text))
        self.assertGreater(len(found), 5)
        self.assertEqual(found - error_codes(), set())
