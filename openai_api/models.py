"""The Responses API's store (docs/responses-store.md): a response the gateway answered with `store`
on, and the input items of its request, kept for RESPONSES_RETENTION_DAYS.

Laid out for PostgreSQL as much as for SQLite:
- JSON is kept as the text the gateway wrote (orjson), not as jsonb: jsonb refuses a string
  holding U+0000 (a user's input or a model's output may), reorders keys and costs a parse on
  every read; a GET answers the stored bytes as they are.
- Every character column is bounded and save() bounds what goes in (openai_api/responses/store.py):
  PostgreSQL refuses a longer value where SQLite would keep it.
- `response_id` is unique: the look-up of (key, id) is one probe of its index, and the same
  query answers "absent" for an id that never existed and for another key's (no second path).
- The chain link `previous_response_id` is text, not a foreign key: a response stays readable
  when its predecessor is deleted or pruned, and saving never waits on a lock of the row it
  follows (a concurrent DELETE of it).
- `created_at` is indexed for the pruning (oldest first) and the admin's list; (key, created_at)
  for a key's responses (and the key's cascade).
"""
from __future__ import annotations

from django.db import models
from django.utils import timezone

from keys.models import APIKey

# Response ids: "resp_…" (OpenAI's are about 50 characters, the gateway's 27).
MAX_ID_LENGTH = 100
# Input item ids: the gateway's ("msg_…", "fc_…") or the client's, up to the request's bound
# (openai_api/responses/request.py).
MAX_ITEM_ID_LENGTH = 256
MAX_MODEL_LENGTH = 200
MAX_STATUS_LENGTH = 16


class StoredResponse(models.Model):
    """A response as the gateway answered it, readable and chainable by the key that created it."""

    key = models.ForeignKey(APIKey, on_delete=models.CASCADE, related_name="stored_responses", db_index=False)
    response_id = models.CharField(max_length=MAX_ID_LENGTH, unique=True)
    # "" for the first response of a conversation.
    previous_response_id = models.CharField(max_length=MAX_ID_LENGTH, blank=True)
    model = models.CharField(max_length=MAX_MODEL_LENGTH, blank=True)
    status = models.CharField(max_length=MAX_STATUS_LENGTH, blank=True)
    # The response object as answered, as JSON text.
    body = models.TextField()
    # Bytes of JSON a conversation carries for it (its input items and its response), and how
    # many items: the chain walk's bounds are counted without reading the bodies.
    size_bytes = models.PositiveBigIntegerField(default=0)
    item_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "stored response"
        indexes = [
            models.Index(fields=["key", "created_at"], name="openai_resp_key_created"),
            models.Index(fields=["created_at"], name="openai_resp_created"),
        ]

    def __str__(self) -> str:
        return self.response_id


class StoredInputItem(models.Model):
    """One input item of a stored response's request, at its position (0 first)."""

    response = models.ForeignKey(StoredResponse, on_delete=models.CASCADE, related_name="input_items",
                                 db_index=False)  # the (response, position) constraint's index serves it
    position = models.PositiveIntegerField()
    # The item's "id" ("" when it has none that fits): the cursor of input_items' after/before.
    item_id = models.CharField(max_length=MAX_ITEM_ID_LENGTH, blank=True)
    # The item as JSON text (see the module's docstring).
    body = models.TextField()

    class Meta:
        verbose_name = "stored input item"
        constraints = [
            models.UniqueConstraint(fields=["response", "position"], name="openai_item_response_position"),
        ]

    def __str__(self) -> str:
        return self.item_id or f"#{self.position}"
