"""Routing and failover through the production request path, with two registered
OpenAI-compatible upstreams served by in-process fakes: which failures move a request to the
other upstream, which are passed on, that a stream is never a 200 left without an error event,
credentials marks, cooldowns, /v1/models and /health/ready's upstream details."""
from __future__ import annotations

import json
import time

import httpx

from gateway_project import state
from tests.base import GatewayTestCase
from tests.fake_openai_server import FakeOpenAI
from tests.sse import parse_sse, read_stream
from upstreams import registry
from upstreams.health import get_health
from upstreams.models import Upstream, UpstreamModel

PUBLIC = "pub"
CHAT = "/v1/chat/completions"
BODY = {"model": PUBLIC, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def register(name: str, base_url: str, served: str, priority: int = 0, weight: int = 1, **fields) -> Upstream:
    row = Upstream(name=name, kind="openai", base_url=base_url, priority=priority, weight=weight, **fields)
    row.set_api_key(f"sk-{name}-upstream-key-1234")
    row.save_by()
    UpstreamModel.objects.create(upstream=row, public_name=PUBLIC, upstream_name=served,
                                 capabilities=["tools", "json_schema"])
    return row


class FailoverThroughTheAPITests(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.a = FakeOpenAI(base_url="http://a.test/v1", models=["served-a"], words=["from", " a"])
        self.b = FakeOpenAI(base_url="http://b.test/v1", models=["served-b"], words=["from", " b"])
        fakes = {"a.test": self.a, "b.test": self.b}
        self.refused: set[str] = set()

        async def handle(request: httpx.Request) -> httpx.Response:
            if request.url.host in self.refused:
                raise httpx.ConnectError("Connection refused", request=request)
            return await fakes[request.url.host].handle(request)

        state.reset(transport=httpx.MockTransport(handle))
        register("a", self.a.base_url, "served-a", priority=1)
        register("b", self.b.base_url, "served-b", priority=0)
        registry.invalidate()

    def calls(self, fake: FakeOpenAI) -> int:
        return len(fake.bodies(CHAT))

    async def test_the_preferred_tier_serves_and_the_answer_has_the_public_name(self):
        response = await self.post(CHAT, BODY)
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response.json()["model"], PUBLIC)
        self.assertEqual((self.calls(self.a), self.calls(self.b)), (1, 0))
        self.assertEqual(self.a.bodies(CHAT)[0]["model"], "served-a")

    async def test_retryable_failures_fail_over_before_the_first_byte(self):
        for status in (500, 502, 503, 429):
            self.a.status = status
            get_health().breakers.close("a")
            for stream in (False, True):
                response = await self.post(CHAT, {**BODY, "stream": stream})
                self.assertEqual(response.status_code, 200, status)
                if stream:
                    events = parse_sse(await read_stream(response))
                    self.assertEqual(events[-1], "[DONE]")
                    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
                    self.assertEqual(text, "from b")
                else:
                    self.assertEqual(response.json()["choices"][0]["message"]["content"], "from b")

    async def test_a_refused_connection_fails_over(self):
        self.refused.add("a.test")
        for stream in (False, True):
            response = await self.post(CHAT, {**BODY, "stream": stream})
            self.assertEqual(response.status_code, 200)
        self.assertEqual(self.calls(self.b), 2)

    async def test_no_first_byte_in_time_fails_over(self):
        await Upstream.objects.filter(name="a").aupdate(first_byte_timeout=0.2)
        registry.invalidate()
        self.a.first_delay = 2.0
        started = time.monotonic()
        response = await self.post(CHAT, {**BODY, "stream": True})
        self.assertEqual(response.status_code, 200)
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertEqual(self.calls(self.b), 1)

    async def test_a_client_error_is_passed_on_and_never_retried(self):
        self.a.status = 422
        self.a.error_body = json.dumps({"error": {"message": "temperature is odd", "type": "invalid_request_error"}}).encode()
        response = await self.post(CHAT, BODY)
        body = self.assertError(response, 422)
        self.assertIn("temperature is odd", body["error"]["message"])
        self.assertEqual(self.calls(self.b), 0)

    async def test_rejected_credentials_fail_over_and_take_the_upstream_out_of_rotation(self):
        self.a.status = 401
        response = await self.post(CHAT, BODY)
        self.assertEqual(response.status_code, 200)
        self.assertEqual(get_health().state_of("a").state, "credentials_rejected")
        before = self.calls(self.a)
        for _ in range(3):
            self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        self.assertEqual(self.calls(self.a), before)  # no more traffic
        self.assertEqual(self.calls(self.b), 4)

    async def test_a_mid_stream_failure_is_one_error_event_and_done_with_no_retry(self):
        self.a.error_after = 2
        response = await self.post(CHAT, {**BODY, "stream": True})
        self.assertEqual(response.status_code, 200)
        events = parse_sse(await read_stream(response))
        self.assertEqual(events[-1], "[DONE]")
        self.assertIn("error", events[-2])
        self.assertEqual(sum("error" in e for e in events if isinstance(e, dict)), 1)
        self.assertEqual(self.calls(self.b), 0)

    async def test_when_every_route_fails_the_client_gets_an_error_never_a_bare_200(self):
        self.a.status = self.b.status = 503
        for stream in (False, True):
            response = await self.post(CHAT, {**BODY, "stream": stream})
            self.assertError(response, 502)
        # Both have failed twice in a row; the third time opens them: then 503 with Retry-After.
        await self.post(CHAT, BODY)
        response = await self.post(CHAT, BODY)
        self.assertError(response, 503)
        self.assertIn("Retry-After", response)

    async def test_models_lists_public_models_of_upstreams_in_rotation(self):
        response = await self.get("/v1/models")
        self.assertEqual([m["id"] for m in response.json()["data"]], [PUBLIC])
        get_health().breakers.reject("a", "401")
        get_health().breakers.open("b", "refused")
        response = await self.get("/v1/models")
        self.assertEqual(response.json()["data"], [])

    async def test_ready_reports_upstream_states_to_insiders_only(self):
        get_health().breakers.reject("a", "401 from upstream")
        response = await self.async_client.get("/health/ready")
        self.assertEqual(response.status_code, 200)
        body = response.json()
        self.assertEqual(body["checks"]["upstreams"], "ok")
        self.assertEqual(body["upstreams"]["a"]["state"], "credentials_rejected")
        self.assertEqual(body["upstreams"]["b"]["state"], "healthy")
        self.assertNotIn("sk-a-upstream-key-1234", response.content.decode())
        remote = await self.async_client.get("/health/ready", headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(remote.json(), {"status": "ok"})
        get_health().breakers.open("b", "refused")
        response = await self.async_client.get("/health/ready")
        self.assertEqual(response.status_code, 503)
        self.assertEqual(response.json()["checks"]["upstreams"], "error: no upstream in rotation")

    async def test_a_capability_only_one_route_has_chooses_it(self):
        await UpstreamModel.objects.filter(upstream__name="a").aupdate(capabilities=[])
        registry.invalidate()
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
        response = await self.post(CHAT, {**BODY, "tools": [tool]})
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual((self.calls(self.a), self.calls(self.b)), (0, 1))

    async def test_redis_down_keeps_routing_on_per_process_state(self):
        from upstreams.shared_state import RedisTables

        dead = RedisTables("redis://127.0.0.1:1/0", ("marks", "probes"), timeout=0.2, refresh_seconds=0.1)
        try:
            state.put("upstream_tables", dead)
            state.put("upstream_health", None)  # rebuilt on the dead Redis's tables
            state.put("upstream_router", None)
            self.a.status = 401
            for _ in range(3):
                response = await self.post(CHAT, BODY)
                self.assertEqual(response.status_code, 200)
            self.assertEqual(get_health().state_of("a").state, "credentials_rejected")
            self.assertEqual(self.calls(self.a), 1)  # marked in this process, skipped after
            self.assertEqual((await self.async_client.get("/health/ready")).status_code, 200)
        finally:
            dead.stop()
            state.put("upstream_tables", None)
            state.put("upstream_health", None)
