# make test   set up (system packages, .venv, the project) and run ruff + the test suite
# make demo   the local P2P cluster demo (arrives with the P2P core)
# make bench  the benchmarks

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages whose programs the tests start for real, as program:package
# (nginx as the origin, curl as a client, openssl for test certificates).
# Checked by program, not package name: Debian 12 and 13 package nginx differently.
NEEDS := nginx:nginx curl:curl openssl:openssl update-ca-certificates:ca-certificates

.PHONY: test setup deps lint demo bench clean

deps:
	@export PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	for need in $(NEEDS); do \
		command -v "$${need%%:*}" >/dev/null 2>&1 || missing="$$missing $${need##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: deps $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(VENV)/bin/pytest

demo: setup
	@echo "make demo: the local P2P cluster demo is built by the P2P core issue; not yet available." >&2
	@exit 3

bench: setup
	$(PY) -m benchmarks http_serve

clean:
	rm -rf $(VENV) benchmarks/results .pytest_cache .ruff_cache .hypothesis
