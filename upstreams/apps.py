from django.apps import AppConfig

from gateway_project import state


class UpstreamsConfig(AppConfig):
    name = "upstreams"
    verbose_name = "Upstreams"

    def ready(self) -> None:
        from upstreams import checks  # noqa: F401  (registers the encryption key check)
        from upstreams.registry import Registry

        state.provide("upstream_registry", Registry)
        from upstreams.health import register_process_state

        register_process_state()  # breakers, probe results and the probe loop
