"""The contract between the face and the upstreams: calls record what they need, failures map to
the OpenAI errors they always were, usage is checked, and upstreams/ never imports the face."""
from __future__ import annotations

import ast
from pathlib import Path

from django.test import SimpleTestCase

from openai_api import protocol
from openai_api.errors import ContextLengthError, ErrorCode, InvalidRequestError, OpenAIError
from openai_api.upstream_errors import to_openai
from upstreams import errors
from upstreams.calls import JSON_MODE, JSON_SCHEMA, TOOLS, VISION, first_unmet
from upstreams.fastchat.client import worker_error
from upstreams.usage import MAX_TOKEN_COUNT, Usage, token_count

ROOT = Path(__file__).resolve().parent.parent
USER = {"role": "user", "content": "hi"}


class NeedsTests(SimpleTestCase):
    def chat(self, **fields):
        return protocol.parse_chat({"model": "m", "messages": fields.pop("messages", [USER]), **fields})

    def test_a_plain_chat_needs_nothing(self):
        call = self.chat()
        self.assertEqual((call.needs, call.asked), (frozenset(), ()))
        self.assertIsNone(first_unmet(call, frozenset()))

    def test_each_feature_records_its_capability_and_the_parameter_that_asked(self):
        cases = [
            ({"tools": [{"type": "function", "function": {"name": "f"}}]}, TOOLS, "tools"),
            ({"tool_choice": "required"}, TOOLS, "tool_choice"),
            ({"functions": [{"name": "f"}]}, TOOLS, "functions"),
            ({"function_call": "auto"}, TOOLS, "function_call"),
            ({"response_format": {"type": "json_object"}}, JSON_MODE, "response_format"),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, JSON_SCHEMA,
             "response_format"),
            ({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                           {"role": "tool", "content": "42", "tool_call_id": "1"}]}, TOOLS, "messages[1].tool_calls"),
            ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
             VISION, "messages[0].content"),
        ]
        for fields, capability, param in cases:
            with self.subTest(param=param, capability=capability):
                call = self.chat(**fields)
                self.assertIn(capability, call.needs)
                self.assertEqual(first_unmet(call, frozenset()).param, param)
                self.assertIsNone(first_unmet(call, call.needs))

    def test_text_response_format_and_tool_choice_none_need_nothing(self):
        call = self.chat(response_format={"type": "text"}, tool_choice="none")
        self.assertEqual(call.needs, frozenset())

    def test_the_client_body_is_kept_for_pass_through(self):
        body = {"model": "m", "messages": [USER], "seed": 3, "unknown_field": {"x": 1}}
        self.assertIs(protocol.parse_chat(body).body, body)
        self.assertEqual(protocol.parse_embeddings({"model": "e", "input": "x"}).needs, frozenset({"embeddings"}))


class FailureMappingTests(SimpleTestCase):
    """Every failure keeps the status, code and FastChat code the FastChat path always answered."""

    def check(self, failure, status, code, fastchat_code, cls=OpenAIError):
        error = to_openai(failure)
        self.assertIsInstance(error, cls)
        self.assertEqual((error.status_code, error.code, int(error.fastchat_code)), (status, code, fastchat_code))
        self.assertEqual(error.message, failure.message)
        return error

    def test_each_kind_of_failure(self):
        self.check(errors.Unreachable("x", code="worker_unreachable", fastchat_code=50005), 503, "worker_unreachable",
                   ErrorCode.CONTROLLER_NO_WORKER)
        self.check(errors.UpstreamTimeout("x"), 504, "timeout", ErrorCode.CONTROLLER_WORKER_TIMEOUT)
        self.check(errors.BadAnswer("x"), 502, "upstream_error", ErrorCode.INTERNAL_ERROR)
        self.check(errors.ServerFailure("x"), 502, "upstream_error", ErrorCode.INTERNAL_ERROR)
        self.check(errors.NoRoute(), 503, "service_unavailable", ErrorCode.CONTROLLER_NO_WORKER)
        self.check(errors.ModelUnknown("x", param="model"), 404, "model_not_found", ErrorCode.INVALID_MODEL)
        missing = self.check(errors.CapabilityMissing("tools", "no tools"), 400, "unsupported_parameter",
                             ErrorCode.PARAM_OUT_OF_RANGE, InvalidRequestError)
        self.assertEqual(missing.param, "tools")
        overflow = self.check(errors.ContextOverflow("long", param="messages"), 400, "context_length_exceeded",
                              ErrorCode.CONTEXT_OVERFLOW, ContextLengthError)
        self.assertEqual(overflow.param, "messages")

    def test_worker_error_codes(self):
        self.check(worker_error("oom", 50002), 503, "worker_out_of_memory", 50002)
        self.check(worker_error("too long", 40303), 400, "context_length_exceeded", 40303, ContextLengthError)
        self.check(worker_error("boom", 50001), 502, "upstream_error", 50001)
        self.check(worker_error(None, "nonsense"), 502, "upstream_error", 50001)

    def test_a_passed_on_status_and_retry_after(self):
        error = self.check(errors.ClientFailure("unprocessable", status=422), 422, "invalid_request",
                           ErrorCode.PARAM_OUT_OF_RANGE, InvalidRequestError)
        self.assertEqual(error.error_type, "invalid_request_error")
        limited = self.check(errors.RateLimited(retry_after=2.4), 429, "upstream_rate_limited", ErrorCode.RATE_LIMIT)
        self.assertEqual(limited.headers["Retry-After"], "2")

    def test_the_address_stays_in_the_log_detail(self):
        error = to_openai(errors.Unreachable("Could not reach the worker.", log_detail="http://10.0.0.7:21002"))
        self.assertEqual(error.upstream_url, "http://10.0.0.7:21002")
        self.assertNotIn("10.0.0.7", error.message)


class UsageTests(SimpleTestCase):
    def test_counts_are_checked(self):
        self.assertEqual(Usage.checked(3, 4).block(), {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        for bad in (-1, 1.5, True, "3", None, MAX_TOKEN_COUNT + 1):
            with self.subTest(bad=bad):
                self.assertIsNone(Usage.checked(bad, 0))
                self.assertIsNone(token_count(bad))
        self.assertTrue(Usage.checked(1, 2, estimated=True).estimated)


class LayeringTests(SimpleTestCase):
    def test_upstreams_never_imports_the_face(self):
        """upstreams/ raises its own failures; the face maps them (comments may name openai_api)."""
        offenders = []
        for path in (ROOT / "upstreams").rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(ROOT)}: {name}" for name in names if name.split(".")[0] == "openai_api"]
        self.assertEqual(offenders, [])
