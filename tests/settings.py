"""The test run's settings: the gateway's, with a secret key of its own.

The gateway refuses to start without DJANGO_SECRET_KEY (gateway_project/settings.py). Setting it
in the environment here, before the settings load, also gives it to every process the tests start
(gateways, management commands), since they inherit the environment.
"""
import os

os.environ.setdefault("DJANGO_SECRET_KEY", "tests-only-secret-key-never-used-in-production")
# Upstream API keys are encrypted with it (upstreams/crypto.py); a fixed Fernet key, tests only.
os.environ.setdefault("GATEWAY_ENCRYPTION_KEY", "dGVzdHMtb25seS1mZXJuZXQta2V5LTMyLWJ5dGVzISE=")

from gateway_project.settings import *  # noqa: E402, F403

# Django's test client calls itself "testserver"; the WebSocket origin check (gateway_project/asgi.py)
# reads ALLOWED_HOSTS when the application is built, before Django's test set-up adds that name.
ALLOWED_HOSTS = [*ALLOWED_HOSTS, "testserver"]  # noqa: F405
