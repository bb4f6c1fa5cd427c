"""OpenAI-style errors: the one place that knows statuses, types and FastChat error codes.

Every error the gateway returns has OpenAI's shape (what openai-python parses) plus FastChat's
top-level fields, so clients written for either keep working (docs/decisions.md, "Errors and statuses"):

    {"error": {"message", "type", "param", "code"}, "object": "error", "message", "code": 40301}
"""
from __future__ import annotations

from enum import IntEnum
from typing import Any


class ErrorCode(IntEnum):
    """FastChat's error codes (fastchat/constants.py), sent as the top-level "code"."""

    VALIDATION_TYPE_ERROR = 40001
    INVALID_AUTH_KEY = 40101
    INCORRECT_AUTH_KEY = 40102
    NO_PERMISSION = 40103
    INVALID_MODEL = 40301
    PARAM_OUT_OF_RANGE = 40302
    CONTEXT_OVERFLOW = 40303
    RATE_LIMIT = 42901
    QUOTA_EXCEEDED = 42902
    ENGINE_OVERLOADED = 42903
    INTERNAL_ERROR = 50001
    CUDA_OUT_OF_MEMORY = 50002
    CONTROLLER_NO_WORKER = 50005
    CONTROLLER_WORKER_TIMEOUT = 50006


class OpenAIError(Exception):
    """Base class: subclasses fix the status, the OpenAI type and the default codes."""

    status_code = 500
    error_type = "server_error"
    code: str | None = "internal_error"
    fastchat_code = ErrorCode.INTERNAL_ERROR
    default_message = "The gateway failed to handle the request."

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
        fastchat_code: int | None = None,
        headers: dict[str, str] | None = None,
        upstream_url: str = "",
    ) -> None:
        self.message = message if message is not None else self.default_message
        self.param = param
        # The controller or worker address involved, for logs only: never in a client's answer.
        self.upstream_url = upstream_url
        if code is not None:
            self.code = code
        if fastchat_code is not None:
            self.fastchat_code = fastchat_code
        self.headers = headers or {}
        super().__init__(self.message)


class InvalidRequestError(OpenAIError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_value"
    fastchat_code = ErrorCode.PARAM_OUT_OF_RANGE
    default_message = "The request is invalid."


class InvalidJSONError(InvalidRequestError):
    code = "invalid_json"
    fastchat_code = ErrorCode.VALIDATION_TYPE_ERROR
    default_message = (
        "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
    )


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"
    fastchat_code = ErrorCode.CONTEXT_OVERFLOW


class AuthenticationError(OpenAIError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"
    fastchat_code = ErrorCode.INVALID_AUTH_KEY
    default_message = "Incorrect API key provided."


class PermissionDeniedError(OpenAIError):
    status_code = 403
    error_type = "invalid_request_error"
    code = "model_not_allowed"
    fastchat_code = ErrorCode.NO_PERMISSION
    default_message = "This API key may not use this model."


class NotFoundError(OpenAIError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"
    fastchat_code = ErrorCode.INVALID_MODEL
    default_message = "Not found."


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class PreviousResponseNotFoundError(NotFoundError):
    """A `previous_response_id` the key has no stored response for (openai_api/responses/store.py)."""

    code = "previous_response_not_found"


class MethodNotAllowedError(OpenAIError):
    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"
    fastchat_code = ErrorCode.VALIDATION_TYPE_ERROR
    default_message = "Method not allowed."


class PayloadTooLargeError(OpenAIError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"
    fastchat_code = ErrorCode.VALIDATION_TYPE_ERROR
    default_message = "The request body is too large."


class RateLimitError(OpenAIError):
    status_code = 429
    error_type = "requests"
    code = "rate_limit_exceeded"
    fastchat_code = ErrorCode.RATE_LIMIT
    default_message = "Rate limit reached. Please retry later."


class TokenRateLimitError(RateLimitError):
    error_type = "tokens"


class QuotaExceededError(RateLimitError):
    error_type = "insufficient_quota"
    code = "insufficient_quota"
    fastchat_code = ErrorCode.QUOTA_EXCEEDED
    default_message = "You exceeded your current quota."


class ServiceUnavailableError(OpenAIError):
    """A service the gateway itself relies on (its database, Redis) cannot answer: the request
    is refused rather than served unchecked. Retry-After says when to try again."""

    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"
    fastchat_code = ErrorCode.INTERNAL_ERROR
    default_message = "The gateway cannot serve this request right now. Please retry later."


class KeyLookupUnavailableError(ServiceUnavailableError):
    code = "key_lookup_unavailable"
    default_message = "The gateway cannot check API keys right now. Please retry later."


class LimitsUnavailableError(ServiceUnavailableError):
    code = "limits_unavailable"
    default_message = "The gateway cannot check this key's rate limits right now. Please retry later."


class StoreUnavailableError(ServiceUnavailableError):
    code = "store_unavailable"
    default_message = "The gateway cannot reach its store of responses right now. Please retry later."


class UpstreamError(OpenAIError):
    """The worker answered with an error (a bad status or an error_code chunk)."""

    status_code = 502
    error_type = "server_error"
    code = "upstream_error"
    fastchat_code = ErrorCode.INTERNAL_ERROR
    default_message = "The model worker failed."


class InvalidWorkerAddressError(UpstreamError):
    """The controller handed out a worker address the gateway will not call (its scheme is not
    http/https, or its host is not in GATEWAY_WORKER_ALLOWED_HOSTS)."""

    code = "invalid_worker_address"
    default_message = "The controller handed out a worker address the gateway does not accept."


class UpstreamUnavailableError(OpenAIError):
    """No worker serves the model, or the controller or worker cannot be reached."""

    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"
    fastchat_code = ErrorCode.CONTROLLER_NO_WORKER
    default_message = "No worker is available for this model. Please retry later."


class UpstreamTimeoutError(OpenAIError):
    status_code = 504
    error_type = "server_error"
    code = "timeout"
    fastchat_code = ErrorCode.CONTROLLER_WORKER_TIMEOUT
    default_message = "The model worker did not answer in time."


def error_body(exc: OpenAIError) -> dict[str, Any]:
    """The JSON body of an error, for responses and for mid-stream error events."""
    return {
        "error": {
            "message": exc.message,
            "type": exc.error_type,
            "param": exc.param,
            "code": exc.code,
        },
        "object": "error",
        "message": exc.message,
        "code": int(exc.fastchat_code),
    }


# A worker's error text is passed on to the client, up to this length.
MAX_WORKER_ERROR_TEXT = 2000


def worker_error(text: Any, error_code: Any) -> OpenAIError:
    """Map an error a worker reported ({"text", "error_code"}) to a gateway error. Whatever the
    worker put there, the result is a well-formed error (a 502 unless the code says otherwise)."""
    text = text[:MAX_WORKER_ERROR_TEXT] if isinstance(text, str) and text else UpstreamError.default_message
    if type(error_code) is not int or not 10000 <= error_code <= 99999:
        error_code = ErrorCode.INTERNAL_ERROR
    if error_code == ErrorCode.CUDA_OUT_OF_MEMORY:
        return UpstreamUnavailableError(text, code="worker_out_of_memory", fastchat_code=error_code)
    if error_code == ErrorCode.CONTEXT_OVERFLOW:
        return ContextLengthError(text)
    return UpstreamError(text, fastchat_code=error_code)
