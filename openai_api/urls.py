"""The OpenAI API's routes. Also the whole URLconf of the API handler (settings.API_URLCONF),
so a process that serves only the API never imports the admin's or DRF's views."""
from django.urls import path, register_converter

from openai_api import openapi, views
from openai_api.observability import metrics_view
from openai_api.responses.create import create_response
from openai_api.responses.retrieve import input_items_view, response_view


class AnyTextConverter:
    """Any non-empty text, newlines included (`path` stops at one): a model id the URL
    resolver cannot match would get its 404 without a key check, an access line or a usage
    row; this way the view answers it, as every other unknown model."""

    regex = r"[\s\S]+"

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(AnyTextConverter, "anytext")

urlpatterns = [
    path("v1/openapi.json", openapi.openapi_json),
    path("v1/models", views.models),
    path("v1/models/<anytext:model_id>", views.model_detail),
    path("v1/chat/completions", views.chat_completions),
    path("v1/completions", views.completions_view),
    path("v1/responses", create_response),
    path("v1/responses/<str:id>", response_view),
    path("v1/responses/<str:id>/input_items", input_items_view),
    path("v1/embeddings", views.embeddings),
    path("v1/engines/<anytext:model_name>/embeddings", views.embeddings),
    path("api/v1/token_check", views.token_check),
    path("api/v1/chat/completions", views.fastchat_chat_completions),
    path("health", views.health),
    path("health/ready", views.ready),
    path("metrics", metrics_view),
]

handler404 = "openai_api.views.not_found"
handler500 = "openai_api.views.server_error"
