from django.apps import AppConfig


class KeysConfig(AppConfig):
    name = "keys"
    verbose_name = "API keys and usage"

    def ready(self) -> None:
        from keys.live import push_usage_event
        from keys.usage import usage_writer

        if push_usage_event not in usage_writer.listeners:
            usage_writer.listeners.append(push_usage_event)
