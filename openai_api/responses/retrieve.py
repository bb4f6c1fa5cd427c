"""GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items: the stored responses
of the request's key (store.py; docs/responses-store.md). Another key's response answers 404 as one
that never existed.

The endpoint label of these requests (usage rows, metrics, the access log) is the route's
template, never the id: ids are unbounded in number (openai_api/observability.py endpoint_label).
"""
from __future__ import annotations

import re

from django.http import HttpRequest, HttpResponse

from openai_api.accounting import admit, request_limits_only
from openai_api.endpoint import api_endpoint, json_response
from openai_api.errors import InvalidRequestError
from openai_api.responses import store

# The routes' templates, as observability.route_labels() renders them (openai_api/urls.py).
RESPONSE_ENDPOINT = "/v1/responses/{id}"
INPUT_ITEMS_ENDPOINT = "/v1/responses/{id}/input_items"

MAX_LIMIT = 100
LIMIT = re.compile(r"[0-9]{1,3}")


@api_endpoint("GET", "DELETE")
async def response_view(request: HttpRequest, id: str) -> HttpResponse:  # `id`: the route template's name
    request.ctx.endpoint = RESPONSE_ENDPOINT
    await admit_request(request)
    if request.method == "DELETE":
        await store.delete(request.ctx.key, id)
        # OpenAI's DeleteResponseResponse (openapi.py ResponseDeleted); its docs' example says "response".
        return json_response({"id": id, "object": "response.deleted", "deleted": True})
    return HttpResponse(await store.get(request.ctx.key, id), content_type="application/json")


@api_endpoint("GET")
async def input_items_view(request: HttpRequest, id: str) -> HttpResponse:
    request.ctx.endpoint = INPUT_ITEMS_ENDPOINT
    query = items_query(request)
    await admit_request(request)
    page = await store.input_items(request.ctx.key, id, query)
    return HttpResponse(page.json(), content_type="application/json")


async def admit_request(request: HttpRequest) -> None:
    """The key's (and its team's) request limits: per minute and in parallel. No token rate or
    budget: these requests use no tokens, and a key past its budget may still read and delete
    what it stored."""
    await admit(request.ctx, limits=request_limits_only(request.ctx.key.limits))


def items_query(request: HttpRequest) -> store.ItemsQuery:
    """after/before (item ids), limit (1..100, default 20), order (asc|desc, default desc); other
    parameters (include[]) are ignored."""
    params = request.GET
    limit_text = params.get("limit")
    limit = 20
    if limit_text is not None:
        limit = int(limit_text) if LIMIT.fullmatch(limit_text) else 0
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequestError(f"Invalid 'limit': expected an integer from 1 to {MAX_LIMIT}.", param="limit",
                                      code="invalid_value")
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("Invalid 'order': expected 'asc' or 'desc'.", param="order", code="invalid_value")
    cursors = {}
    for param in ("after", "before"):
        value = params.get(param)
        cursors[param] = store.check_item_id(value, param) if value is not None else None
    return store.ItemsQuery(limit=limit, order=order, **cursors)
