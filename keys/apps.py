"""The keys app: its process-wide parts (limit store, usage writer, live presence) are
registered in gateway_project/state.py, and the live view listens to the usage writer."""
from django.apps import AppConfig

from gateway_project import state


class KeysConfig(AppConfig):
    name = "keys"
    verbose_name = "API keys and usage"

    def ready(self) -> None:
        from keys.limits import build_limit_store
        from keys.live import presence, push_usage_event
        from keys.pricing import build_price_book
        from keys.usage import usage_writer

        if push_usage_event not in usage_writer.listeners:
            usage_writer.listeners.append(push_usage_event)
        state.provide("limit_store", build_limit_store)
        state.provide("price_book", build_price_book)
        # Held by name in their modules: emptied in place, never rebuilt.
        state.provide("usage_writer", lambda: usage_writer, clear=lambda writer: writer.pending.clear())
        state.provide("presence", lambda: presence, clear=lambda watchers: watchers.__init__())
        from keys.audit import trail

        trail.connect()  # after every app's models are loaded: upstreams' are tracked too
