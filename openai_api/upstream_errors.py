"""Upstream failures (upstreams/errors.py) as OpenAI errors: the one place the face maps them.

The status comes from the failure; the OpenAI type and FastChat's numeric code from the error
class of that status (errors.py), unless the failure carries FastChat's own code. The message
is the failure's (never an internal address: that is `log_detail`, kept for the access log).
"""
from __future__ import annotations

from openai_api.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    OpenAIError,
    RateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from upstreams import errors as upstream

BY_STATUS: dict[int, type[OpenAIError]] = {
    400: InvalidRequestError,
    404: NotFoundError,
    429: RateLimitError,
    502: UpstreamError,
    503: UpstreamUnavailableError,
    504: UpstreamTimeoutError,
}
BY_CLASS: dict[type[upstream.UpstreamFailure], type[OpenAIError]] = {
    upstream.ContextOverflow: ContextLengthError,
    upstream.ModelUnknown: ModelNotFoundError,
}


def to_openai(failure: upstream.UpstreamFailure) -> OpenAIError:
    cls = BY_CLASS.get(type(failure)) or BY_STATUS.get(failure.status)
    headers = {"Retry-After": str(max(1, round(failure.retry_after)))} if failure.retry_after else None
    if cls is None:  # another status an upstream answered (a 422 passed on, say)
        cls = InvalidRequestError if 400 <= failure.status < 500 else UpstreamError
        error = cls(failure.message, param=failure.param, code=failure.code, fastchat_code=failure.fastchat_code,
                    headers=headers, upstream_url=failure.log_detail)
        error.status_code = failure.status if 400 <= failure.status < 600 else 502
        return error
    return cls(failure.message, param=failure.param, code=failure.code, fastchat_code=failure.fastchat_code,
               headers=headers, upstream_url=failure.log_detail)


def as_openai(exc: BaseException) -> BaseException:
    """`exc` as an OpenAI error if it is an upstream failure, else unchanged."""
    return to_openai(exc) if isinstance(exc, upstream.UpstreamFailure) else exc
