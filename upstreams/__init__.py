"""Upstreams: the servers that generate (FastChat controllers and workers, OpenAI-compatible
servers), their registry, the router that picks one per request, and their health."""
