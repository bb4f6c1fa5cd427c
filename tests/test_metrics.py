"""GET /metrics: Prometheus text whose numbers match the requests sent; access-log lines."""
from __future__ import annotations

import json

from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

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
