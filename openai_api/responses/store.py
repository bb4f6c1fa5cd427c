"""The Responses API's store: responses saved with `store` on, read back, chained, listed and
deleted, only ever by the key that created them (openai_api/models.py; docs/responses-store.md).

Every function here is async and reaches the database through sync_to_async on the thread the
gateway's other database reads use (auth.py, pricing.py), recycling its connection first (the API
handler runs no request signals that would). A database that fails answers 503 in OpenAI's shape
(StoreUnavailableError), never 500.

Another key's response is absent: every read filters on (response id, key) in one query, so an id
that never existed and another key's id take the same path and get the same 404.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import Error as DatabaseError
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from openai_api.errors import (
    ContextLengthError,
    InvalidRequestError,
    NotFoundError,
    PreviousResponseNotFoundError,
    StoreUnavailableError,
)
from openai_api.models import (
    MAX_ID_LENGTH,
    MAX_ITEM_ID_LENGTH,
    MAX_MODEL_LENGTH,
    MAX_STATUS_LENGTH,
    StoredInputItem,
    StoredResponse,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

RESPONSE_ID = re.compile(rf"resp_[A-Za-z0-9_-]{{1,{MAX_ID_LENGTH - 5}}}")
# Rows per query where a list of ids is sent (SQLite caps a statement's parameters).
IDS_PER_QUERY = 500
PRUNE_BATCH = 1000


# Ids ---------------------------------------------------------------------------------------------

def is_response_id(value: Any) -> bool:
    return isinstance(value, str) and RESPONSE_ID.fullmatch(value) is not None


def check_response_id(value: Any, param: str) -> str:
    """`value` if it has a response id's form, else 400 naming `param`: junk never reaches the
    database (and is not echoed back)."""
    if not is_response_id(value):
        raise InvalidRequestError(
            f"Invalid '{param}': expected an ID that begins with 'resp_' followed by at most "
            f"{MAX_ID_LENGTH - 5} letters, digits, '_' or '-'.", param=param, code="invalid_value")
    return value


def is_item_id(value: Any) -> bool:
    """An input item's id the store can keep as a cursor: a client may choose it (any text up
    to the request's bound), so only a NUL (which PostgreSQL refuses in text) or excess length
    disqualifies it."""
    return isinstance(value, str) and 0 < len(value) <= MAX_ITEM_ID_LENGTH and "\x00" not in value


def check_item_id(value: Any, param: str) -> str:
    if not is_item_id(value):
        raise InvalidRequestError(f"Invalid '{param}': expected an item ID of at most {MAX_ITEM_ID_LENGTH} "
                                  "characters.", param=param, code="invalid_value")
    return value


def not_found(response_id: str) -> NotFoundError:
    return NotFoundError(f"Response with id '{response_id}' not found.")


# Running on the database thread -------------------------------------------------------------------

# A database that hangs (a stopped server, a lock) answers 503 after this long; the query stays
# with its thread (as the key look-ups' do, openai_api/auth.py) and its result is dropped.
STORE_TIMEOUT = 10.0


async def in_database(function: Callable[..., T], *args: Any) -> T:
    """Run `function(*args)` on the database thread; a database failure is a 503."""
    def run() -> T:
        close_old_connections()  # this thread has no request cycle to recycle broken connections
        return function(*args)

    query = asyncio.ensure_future(sync_to_async(run, thread_sensitive=True)())
    try:
        # Shielded: a client that leaves does not cut a save short (the thread would finish it anyway).
        return await asyncio.wait_for(asyncio.shield(query), STORE_TIMEOUT)
    except (DatabaseError, TimeoutError) as exc:
        query.add_done_callback(lambda done: done.cancelled() or done.exception())
        logger.warning("Responses store: the database failed (%s: %s)", type(exc).__name__,
                       (str(exc).splitlines() or [""])[0][:200])
        raise StoreUnavailableError(headers={"Retry-After": "1"}) from None


def key_id(key: Any) -> int:
    """The key's id: a KeyInfo (request.ctx.key) or an APIKey."""
    return key.id


# Saving ------------------------------------------------------------------------------------------

async def save(key: Any, response: dict, input_items: list[dict]) -> None:
    """Store a finished response (the full object as answered; its "previous_response_id" links
    the chain) and its request's input items (each with an "id"), atomically: a reader sees all
    of it or nothing. The model and status are cut to their columns; an item id the column
    cannot hold (over MAX_ITEM_ID_LENGTH, or with a NUL) is kept in the item but is no
    input_items cursor. ValueError if the response's own "id" is no response id (a bug of the
    caller); 503 (StoreUnavailableError) if the database fails: then nothing is stored."""
    if not is_response_id(response.get("id")):
        raise ValueError("A stored response needs an id of the form resp_…")
    await in_database(save_now, key_id(key), response, input_items)


def save_now(key_id: int, response: dict, input_items: list[dict]) -> None:
    output = response.get("output") or []
    item_json = [orjson.dumps(item) for item in input_items]
    previous = response.get("previous_response_id")
    with transaction.atomic():
        stored = StoredResponse.objects.create(
            key_id=key_id, response_id=response["id"],
            previous_response_id=previous if is_response_id(previous) else "",
            model=bounded(response.get("model"), MAX_MODEL_LENGTH),
            status=bounded(response.get("status"), MAX_STATUS_LENGTH),
            body=orjson.dumps(response).decode(),
            size_bytes=sum(map(len, item_json)) + len(orjson.dumps(output)),
            item_count=len(input_items) + len(output),
        )
        StoredInputItem.objects.bulk_create(
            [StoredInputItem(response=stored, position=position, item_id=item_id_of(item), body=text.decode())
             for position, (item, text) in enumerate(zip(input_items, item_json, strict=True))],
            batch_size=IDS_PER_QUERY)


def bounded(value: Any, length: int) -> str:
    """Text for a bounded column: PostgreSQL refuses a longer value, and any NUL character."""
    return value.replace("\x00", "")[:length] if isinstance(value, str) else ""


def item_id_of(item: Any) -> str:
    value = item.get("id") if isinstance(item, dict) else None
    return value if is_item_id(value) else ""


# Chaining ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChainBounds:
    """The most a conversation read from the store may hold: no more responses or items than a
    chat request may have messages (GATEWAY_MAX_MESSAGES; items may merge, so twice that), and no
    more JSON than a request body may have (GATEWAY_MAX_BODY_BYTES)."""

    responses: int
    items: int
    bytes: int

    @classmethod
    def from_settings(cls) -> ChainBounds:
        return cls(responses=settings.GATEWAY_MAX_MESSAGES, items=2 * settings.GATEWAY_MAX_MESSAGES,
                   bytes=settings.DATA_UPLOAD_MAX_MEMORY_SIZE)


async def conversation_before(key: Any, previous_response_id: str, *, truncate: bool = False) -> list[dict]:
    """Items of the stored chain ending at that response, oldest first: for each response of the
    chain, its input items then its output items. NotFoundError (404, param
    "previous_response_id") if missing, deleted, pruned or another key's; 400 if it is no id.

    The chain ends early where a response it follows is gone (deleted or pruned): what is left
    of the conversation is used. A chain beyond ChainBounds is refused (400
    context_length_exceeded), or with `truncate` (truncation "auto") cut to its newest whole
    responses within them. One query walks the chain (a recursive CTE along the unique index),
    then two per IDS_PER_QUERY responses read their items."""
    check_response_id(previous_response_id, "previous_response_id")
    return await in_database(read_conversation, key_id(key), previous_response_id, truncate,
                             ChainBounds.from_settings())


CHAIN_SQL = """
WITH RECURSIVE chain(id, previous_response_id, depth, total_bytes, total_items) AS (
    SELECT id, previous_response_id, 1, size_bytes, item_count
    FROM {table} WHERE response_id = %s AND key_id = %s
  UNION ALL
    SELECT r.id, r.previous_response_id, chain.depth + 1, chain.total_bytes + r.size_bytes,
           chain.total_items + r.item_count
    FROM {table} r JOIN chain ON r.response_id = chain.previous_response_id
    WHERE r.key_id = %s AND chain.depth <= %s AND chain.total_bytes <= %s AND chain.total_items <= %s
)
SELECT id, depth, total_bytes, total_items FROM chain ORDER BY depth
"""


def read_conversation(key_id: int, response_id: str, truncate: bool, bounds: ChainBounds) -> list[dict]:
    table = connection.ops.quote_name(StoredResponse._meta.db_table)
    with connection.cursor() as cursor:
        # The walk stops one response past a bound, so that a chain beyond it is seen.
        cursor.execute(CHAIN_SQL.format(table=table),
                       [response_id, key_id, key_id, bounds.responses, bounds.bytes, bounds.items])
        rows = cursor.fetchall()
    if not rows:
        raise PreviousResponseNotFoundError(f"Previous response with id '{response_id}' not found.",
                                            param="previous_response_id")
    within = [pk for pk, depth, size, items in rows
              if depth <= bounds.responses and size <= bounds.bytes and items <= bounds.items]
    if len(within) < len(rows) and not truncate:
        raise ContextLengthError(
            f"The conversation before response '{response_id}' is longer than the gateway reads "
            f"(at most {bounds.responses} responses, {bounds.items} items and {bounds.bytes} bytes). "
            "Use truncation 'auto' to drop its oldest responses.", param="previous_response_id")
    items: list[dict] = []
    chain = within[::-1]  # oldest first
    for start in range(0, len(chain), IDS_PER_QUERY):
        part = chain[start : start + IDS_PER_QUERY]
        inputs: dict[int, list[dict]] = {pk: [] for pk in part}
        for pk, body in (StoredInputItem.objects.filter(response_id__in=part)
                         .order_by("response_id", "position").values_list("response_id", "body")):
            inputs[pk].append(orjson.loads(body))
        outputs = dict(StoredResponse.objects.filter(pk__in=part).values_list("pk", "body"))
        for pk in part:
            # Read after its items: a response deleted meanwhile (both go in one transaction) is
            # left out whole, never half.
            if pk in outputs:
                output = orjson.loads(outputs[pk]).get("output")
                items += inputs[pk] + (output if isinstance(output, list) else [])
    return items


# Reading, listing, deleting ----------------------------------------------------------------------

async def get(key: Any, response_id: str) -> str:
    """The stored response's JSON text, as answered; 404 if absent or another key's."""
    check_response_id(response_id, "response_id")
    body = await in_database(read_body, key_id(key), response_id)
    if body is None:
        raise not_found(response_id)
    return body


def read_body(key_id: int, response_id: str) -> str | None:
    return (StoredResponse.objects.filter(response_id=response_id, key_id=key_id)
            .values_list("body", flat=True).first())


async def delete(key: Any, response_id: str) -> None:
    """Delete the response and its input items; 404 if absent or another key's (or deleted
    meanwhile by another request: exactly one DELETE succeeds)."""
    check_response_id(response_id, "response_id")
    if not await in_database(delete_now, key_id(key), response_id):
        raise not_found(response_id)


def delete_now(key_id: int, response_id: str) -> bool:
    with transaction.atomic():
        # only("pk"): the collector reads the rows it deletes, and the body may be megabytes.
        _, deleted = (StoredResponse.objects.filter(response_id=response_id, key_id=key_id)
                      .only("pk").delete())
    return deleted.get(StoredResponse._meta.label, 0) > 0


@dataclass(frozen=True)
class ItemsQuery:
    """input_items' pagination, as OpenAI's: `after`/`before` are item ids (cursors), `limit`
    1..100, `order` "asc" (first input item first) or "desc"."""

    after: str | None = None
    before: str | None = None
    limit: int = 20
    order: str = "desc"


@dataclass(frozen=True)
class ItemsPage:
    items: tuple[str, ...]  # each item's JSON text
    first_id: str | None
    last_id: str | None
    has_more: bool

    def json(self) -> bytes:
        """{"object": "list", "data", "first_id", "last_id", "has_more"}, the items as stored."""
        head = b'{"object":"list","data":[' + ",".join(self.items).encode() + b"],"
        return head + orjson.dumps({"first_id": self.first_id, "last_id": self.last_id,
                                    "has_more": self.has_more})[1:]


async def input_items(key: Any, response_id: str, query: ItemsQuery) -> ItemsPage:
    """A page of the response's input items; 404 if absent or another key's, 400 for a cursor
    that is no item of it."""
    check_response_id(response_id, "response_id")
    for param in ("after", "before"):
        if getattr(query, param) is not None:
            check_item_id(getattr(query, param), param)
    page = await in_database(read_items, key_id(key), response_id, query)
    if page is None:
        raise not_found(response_id)
    return page


def read_items(key_id: int, response_id: str, query: ItemsQuery) -> ItemsPage | None:
    """Each statement sees the database as it is then (READ COMMITTED): when a query finds no
    items, the response is looked up again, so that one deleted meanwhile is a 404, never an
    empty page (a response and its items are deleted in one transaction)."""
    responses = StoredResponse.objects.filter(response_id=response_id, key_id=key_id)
    pk = responses.values_list("pk", flat=True).first()
    if pk is None:
        return None
    items = all_items = StoredInputItem.objects.filter(response_id=pk)
    ascending = query.order == "asc"
    for param, later in (("after", ascending), ("before", not ascending)):
        cursor = getattr(query, param)
        if cursor is None:
            continue
        # Looked up among all the items: `before` may name one that `after` left out (an empty page).
        position = all_items.filter(item_id=cursor).order_by("position").values_list("position", flat=True).first()
        if position is None:
            if not responses.exists():
                return None
            raise InvalidRequestError(f"Invalid '{param}': no input item of this response has that id.",
                                      param=param, code="invalid_value")
        items = items.filter(**{"position__gt" if later else "position__lt": position})
    # With only `before`, the page is the items nearest to it: read from there, then turn around.
    backwards = query.before is not None and query.after is None
    first = "position" if ascending != backwards else "-position"
    rows = list(items.order_by(first).values_list("item_id", "body")[: query.limit + 1])
    if not rows and not responses.exists():
        return None
    has_more = len(rows) > query.limit
    rows = rows[: query.limit]
    if backwards:
        rows.reverse()
    return ItemsPage(items=tuple(body for _, body in rows), first_id=rows[0][0] or None if rows else None,
                     last_id=rows[-1][0] or None if rows else None, has_more=has_more)


# Retention ---------------------------------------------------------------------------------------

def prune(retention_days: int, batch: int = PRUNE_BATCH) -> int:
    """Delete stored responses (and their input items) older than the retention, `batch`
    responses per transaction (no long lock, no big read). Returns the responses deleted."""
    cutoff = timezone.now() - timedelta(days=retention_days)
    deleted = 0
    while True:
        with transaction.atomic():
            ids = list(StoredResponse.objects.filter(created_at__lt=cutoff).order_by()
                       .values_list("pk", flat=True)[:batch])
            if not ids:
                return deleted
            StoredInputItem.objects.filter(response_id__in=ids).delete()
            _, counts = StoredResponse.objects.filter(pk__in=ids).only("pk").delete()
        deleted += counts.get(StoredResponse._meta.label, 0)


def prune_step() -> int:
    """The retention, as the usage writer's daily pruning runs it (RESPONSES_RETENTION_DAYS;
    0 keeps every response)."""
    days = settings.RESPONSES_RETENTION_DAYS
    return prune(days) if days > 0 else 0
