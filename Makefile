# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test install-llama install-agents system-deps lint

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

install-test: install system-deps install-llama install-agents
	$(BIN)/pip install --quiet -r requirements-realworker.txt

# llama.cpp's OpenAI-compatible server (llama-cpp-python) for tests/test_llama_cpp.py. PyPI has only
# its source, which compiles in about 5 minutes on 2 cores: the wheel built once is kept in
# LLAMA_WHEELS (outside the work tree, so fresh clones on the same machine reuse it) and later runs
# install it in seconds. The source package is kept beside it: tests/gguf_model.py takes llama.cpp's
# convert_hf_to_gguf.py from it.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_WHEELS ?= $(HOME)/.cache/gateway-wheels
install-llama: install
	@mkdir -p $(LLAMA_WHEELS)
	@test -f $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz || \
	  $(BIN)/pip download --quiet --no-deps --no-binary :all: -d $(LLAMA_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "Building llama-cpp-python $(LLAMA_CPP_VERSION) (about 5 minutes, once)"; \
	  CMAKE_ARGS=-DGGML_NATIVE=OFF $(BIN)/pip wheel --quiet --no-deps -w $(LLAMA_WHEELS) \
	    $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz; }
	$(BIN)/pip install --quiet --find-links $(LLAMA_WHEELS) -r requirements-llama.txt

# The OpenAI Agents SDK for tests/test_responses_e2e.py, in a venv of its own: openai-agents 0.24.0
# needs websockets<17, the gateway pins 17.4. The test runs tests/agents_script.py with its python.
AGENTS_VENV ?= .venv-agents
install-agents:
	@test -x $(AGENTS_VENV)/bin/python || $(PYTHON) -m venv $(AGENTS_VENV)
	$(AGENTS_VENV)/bin/pip install --quiet -r requirements-agents.txt

demo: install
	$(BIN)/python manage.py demo

# The test commands run with a secret key of their own (tests/settings.py sets one for pytest).
test: export DJANGO_SECRET_KEY ?= tests-only-secret-key-never-used-in-production
test: install-test
	$(BIN)/ruff check .
	$(BIN)/python manage.py check
	$(BIN)/python manage.py makemigrations --check --dry-run
	@echo "== The in-process tests on the embedded defaults (SQLite, in-memory limits) =="
	$(BIN)/python -m pytest -m "not e2e"
	@echo "== The whole suite on PostgreSQL + Redis (throwaway servers from tests/services.py) =="
	$(BIN)/python -m tests.services -- $(BIN)/python -m pytest
