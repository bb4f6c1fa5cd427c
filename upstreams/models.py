"""The registry of upstreams and the models they serve."""
