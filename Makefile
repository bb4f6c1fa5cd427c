# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test system-deps lint

# Services the tests use: Redis, nginx, wrk, Chromium and PostgreSQL 15 (Debian packages, installed
# when missing; needs root, as on CI).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt

system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v nginx >/dev/null || missing="$$missing nginx-light"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	test -x /usr/lib/postgresql/15/bin/initdb || missing="$$missing postgresql-15"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

install-test: install system-deps
	$(BIN)/pip install --quiet -r requirements-realworker.txt

demo: install
	$(BIN)/python manage.py demo

# The test commands run with a secret key of their own (tests/settings.py sets one for pytest).
test: export DJANGO_SECRET_KEY ?= tests-only-secret-key-never-used-in-production
test: install-test
	$(BIN)/ruff check .
	$(BIN)/python manage.py check
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/python -m pytest
	@echo "== The same suite on PostgreSQL + Redis (throwaway servers from tests/services.py) =="
	$(BIN)/python -m tests.services -- $(BIN)/python -m pytest
