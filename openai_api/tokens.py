"""Token-id prompts: decode them to text with tiktoken, as FastChat's process_input does.

LangChain and others send embeddings and completions input as OpenAI token ids. Decoding
needs tiktoken's encoding files; offline gateways provide them through TIKTOKEN_CACHE_DIR.
A gateway that cannot load them answers 400 instead of hanging or failing with a 500.
"""
from __future__ import annotations

import functools
import logging

from asgiref.sync import sync_to_async

from openai_api.errors import InvalidRequestError

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=64)
def load_encoding(model: str):
    """tiktoken's encoding for `model` (cl100k_base for unknown names), or None if unavailable."""
    try:
        import tiktoken

        try:
            return tiktoken.encoding_for_model(model)
        except KeyError:
            return tiktoken.get_encoding("cl100k_base")
    except Exception as exc:  # tiktoken fetches its files over the network on first use
        logger.warning("tiktoken encoding unavailable for %s: %s", model, type(exc).__name__)
        return None


def decode_sync(model: str, token_lists: list[list[int]], param: str) -> list[str]:
    encoding = load_encoding(model)
    if encoding is None:
        raise InvalidRequestError(
            f"Token-id '{param}' cannot be decoded: this gateway has no tiktoken encoding files. "
            "Send text instead.",
            param=param,
            code="unsupported_parameter",
        )
    try:
        return [encoding.decode(tokens) for tokens in token_lists]
    except Exception:
        raise InvalidRequestError(f"'{param}' contains invalid token ids.", param=param) from None


async def as_texts(model: str, inputs: list[str] | list[list[int]], param: str) -> list[str]:
    """Return `inputs` as strings, decoding token-id lists."""
    if all(isinstance(item, str) for item in inputs):
        return inputs
    return await sync_to_async(decode_sync, thread_sensitive=False)(model, inputs, param)
