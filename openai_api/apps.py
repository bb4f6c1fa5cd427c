"""App config and startup checks for the OpenAI API settings."""
from __future__ import annotations

from urllib.parse import urlparse

from django.apps import AppConfig
from django.conf import settings
from django.core import checks

from gateway_project import state


class OpenAIAPIConfig(AppConfig):
    name = "openai_api"
    verbose_name = "OpenAI API"

    def ready(self) -> None:
        checks.register(settings_check)
        register_process_state()
        register_retention()


def register_process_state() -> None:
    """The API's process-wide parts (gateway_project/state.py): the router and adapters it talks
    to, their pooled transport, the key cache."""
    from openai_api.auth import key_cache
    from upstreams.router import register_process_state as register_router

    register_router()
    # Held by name in auth.py: emptied in place.
    state.provide("key_cache", lambda: key_cache, clear=lambda cache: cache.clear())


def register_retention() -> None:
    """Stored responses are pruned after RESPONSES_RETENTION_DAYS with the usage rows, by the
    usage writer's daily pruning (keys/usage.py prune_steps)."""
    from keys.usage import register_prune_step
    from openai_api.responses.store import prune_step

    register_prune_step("stored response", prune_step)


def settings_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    errors = []
    if urlparse(settings.CONTROLLER_ADDRESS).scheme not in ("http", "https"):
        errors.append(checks.Error("CONTROLLER_ADDRESS must be an http(s) URL.", id="openai_api.E001"))
    if settings.FASTCHAT_WORKER_API_TIMEOUT <= 0:
        errors.append(checks.Error("FASTCHAT_WORKER_API_TIMEOUT must be positive.", id="openai_api.E002"))
    if settings.FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE < 1:
        errors.append(checks.Error("FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE must be at least 1.", id="openai_api.E003"))
    return errors
