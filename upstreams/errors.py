"""Upstream failures: what adapters and the router raise, never HTTP errors.

Each failure says whether another route may be tried (`retryable`: only before the first byte
reached the client, which the router and the Stream contract guarantee), the HTTP status the face
answers with, and a client-facing message that never names an internal address (`log_detail`
carries that, for the access log only). The face maps them to OpenAI errors in one place
(openai_api/upstream_errors.py). `fastchat_code` and `param` keep the answers of the FastChat
path exactly as they were (FastChat's numeric codes, the parameter a context overflow names).
"""
from __future__ import annotations


class UpstreamFailure(Exception):
    status = 502
    code = "upstream_error"
    retryable = False
    default_message = "The upstream failed."

    def __init__(self, message: str | None = None, *, status: int | None = None, code: str | None = None,
                 retryable: bool | None = None, log_detail: str = "", param: str | None = None,
                 fastchat_code: int | None = None, retry_after: float | None = None) -> None:
        self.message = message if message is not None else self.default_message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        self.log_detail = log_detail  # an upstream URL or address: logs only
        self.param = param
        self.fastchat_code = fastchat_code
        self.retry_after = retry_after
        super().__init__(self.message)


class Unreachable(UpstreamFailure):
    """Connection refused or reset before any answer: another route may take the call."""

    status = 503
    code = "upstream_unreachable"
    retryable = True
    default_message = "The upstream cannot be reached. Please retry later."


class UpstreamTimeout(UpstreamFailure):
    """No answer in time: connecting or waiting for the first byte (retryable), or silence or the
    overall deadline mid-stream (not retryable: pass retryable=False)."""

    status = 504
    code = "timeout"
    retryable = True
    default_message = "The upstream did not answer in time."


class RateLimited(UpstreamFailure):
    status = 429
    code = "upstream_rate_limited"
    retryable = True
    default_message = "The upstream is rate limiting requests. Please retry later."


class ServerFailure(UpstreamFailure):
    """The upstream answered 5xx (or an equivalent error it reported)."""

    status = 502
    code = "upstream_error"
    retryable = True


class CredentialsRejected(UpstreamFailure):
    """The upstream refused the gateway's credentials (401/403): another route may serve the call;
    this one stays out of rotation until a probe passes."""

    status = 502
    code = "upstream_credentials_rejected"
    retryable = True
    default_message = "The upstream refused the gateway's credentials."


class ClientFailure(UpstreamFailure):
    """The upstream refused the request itself (a 4xx other than 401/403/429): never retried,
    passed on with the upstream's status and message."""

    status = 400
    code = "invalid_request"
    retryable = False
    default_message = "The upstream refused the request."


class BadAnswer(UpstreamFailure):
    """The upstream answered something the gateway cannot use (garbage, a size cap passed)."""

    status = 502
    code = "upstream_error"
    retryable = False
    default_message = "The upstream sent an invalid answer."


class NoRoute(UpstreamFailure):
    """No route can take the call now (none configured, all cooling down, at their caps)."""

    status = 503
    code = "service_unavailable"
    retryable = False
    default_message = "No upstream is available for this model. Please retry later."


class ModelUnknown(UpstreamFailure):
    """No upstream serves the model (the face checks this before routing; 404)."""

    status = 404
    code = "model_not_found"
    retryable = False


class CapabilityMissing(UpstreamFailure):
    """The call needs a capability none of the model's routes have (400 naming the parameter)."""

    status = 400
    code = "unsupported_parameter"
    retryable = False

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param=param)


# What the FastChat path needs to keep its answers.


class InvalidPrompt(UpstreamFailure):
    """The request cannot be turned into the worker's prompt (a bad role order, an image for a
    text-only template): a 400 naming the parameter."""

    status = 400
    code = "invalid_value"
    retryable = False


class ContextOverflow(UpstreamFailure):
    status = 400
    code = "context_length_exceeded"
    retryable = False


class OutOfMemory(UpstreamFailure):
    """The worker ran out of GPU memory (FastChat's 50002)."""

    status = 503
    code = "worker_out_of_memory"
    retryable = False
