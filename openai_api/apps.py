"""App config and startup checks for the OpenAI API settings."""
from __future__ import annotations

from urllib.parse import urlparse

from django.apps import AppConfig
from django.conf import settings
from django.core import checks


class OpenAIAPIConfig(AppConfig):
    name = "openai_api"
    verbose_name = "OpenAI API"

    def ready(self) -> None:
        checks.register(settings_check)


def settings_check(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    errors = []
    if urlparse(settings.CONTROLLER_ADDRESS).scheme not in ("http", "https"):
        errors.append(checks.Error("CONTROLLER_ADDRESS must be an http(s) URL.", id="openai_api.E001"))
    if settings.FASTCHAT_WORKER_API_TIMEOUT <= 0:
        errors.append(checks.Error("FASTCHAT_WORKER_API_TIMEOUT must be positive.", id="openai_api.E002"))
    if settings.FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE < 1:
        errors.append(checks.Error("FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE must be at least 1.", id="openai_api.E003"))
    return errors
