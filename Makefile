# make test   set up (system packages, .venv, the project) and run ruff, mypy and the test suite
# make demo   set up, distribute a file through a local P2P cluster, print where bytes went
# make bench  the standard benchmarks (under 15 minutes); make bench-full: all of them

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
DEMO_SIZE ?= 512MiB
PY := $(VENV)/bin/python
# Debian packages whose programs the tests start for real, as program:package
# (nginx as the origin, curl and aria2c as clients, openssl for test certificates,
# opentracker for the BitTorrent reference swarm, ip/tc for the swarm's network namespaces;
# for the registry mirror: docker-registry as the registry, skopeo, containerd's ctr and
# podman as the clients, htpasswd for the registry's bcrypt auth file; PostgreSQL for the
# manager's several-managers tests, whose initdb is not on PATH: checked by its path;
# chromium for the console's browser test, driven by Playwright).
# Checked by program, not package name: Debian 12 and 13 package nginx differently.
NEEDS := nginx:nginx curl:curl openssl:openssl update-ca-certificates:ca-certificates \
	aria2c:aria2 opentracker:opentracker ip:iproute2 tc:iproute2 \
	docker-registry:docker-registry skopeo:skopeo containerd:containerd ctr:containerd \
	podman:podman htpasswd:apache2-utils /usr/lib/postgresql/*/bin/initdb:postgresql \
	chromium:chromium

.PHONY: test setup deps bench-deps lint demo bench bench-full clean

# Programs only the benchmarks start (wrk: small_requests' load generator), as above.
BENCH_NEEDS := wrk:wrk

# $(call install_missing,PAIRS): apt-get install the package of every program:package pair
# whose program is missing.
define install_missing
	@export PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	for need in $(1); do \
		command -v "$${need%%:*}" >/dev/null 2>&1 || compgen -G "$${need%%:*}" >/dev/null || \
			missing="$$missing $${need##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
endef

deps:
	$(call install_missing,$(NEEDS))

bench-deps:
	$(call install_missing,$(BENCH_NEEDS))

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: deps $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup lint
	$(VENV)/bin/pytest

demo: setup
	$(PY) -m dragonfly.demo --size $(DEMO_SIZE)

# (make bench's swarm uses a 128 MiB file so that the whole set fits in 15 minutes:
# the direct reference alone takes N x F / U_o; bench-full runs the 256 MiB default.)
bench: setup bench-deps
	$(PY) -m benchmarks throughput
	$(PY) -m benchmarks swarm --peers 8 --size 128MiB
	$(PY) -m benchmarks swarm --mode lo-shaped --peers 8,16 --size 128MiB
	$(PY) -m benchmarks scheduler --duration 30s
	$(PY) -m benchmarks simulation --peers 1000
	$(PY) -m benchmarks load
	$(PY) -m benchmarks small_requests

bench-full: setup bench-deps
	$(PY) -m benchmarks http_serve
	$(PY) -m benchmarks proxy_throughput
	$(PY) -m benchmarks throughput
	$(PY) -m benchmarks swarm --peers 8,16
	$(PY) -m benchmarks swarm --mode lo-shaped --peers 8,16
	$(PY) -m benchmarks swarm --mode lo-shaped --peers 32 --origin-up 5MB/s --peer-up 5MB/s --only dragonfly,bittorrent
	$(PY) -m benchmarks scheduler --duration 60s
	$(PY) -m benchmarks simulation --peers 1000,10000
	$(PY) -m benchmarks image_pull

clean:
	rm -rf $(VENV) benchmarks/results .pytest_cache .ruff_cache .hypothesis
