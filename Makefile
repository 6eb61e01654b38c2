# pyproxy: `make run` starts the demo (`make run-gateway`: from Gateway API manifests), `make test`
# runs lint and the suite, `make bench` measures against nginx/HAProxy.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run run-gateway lint test unit integration bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The demo's self-signed certificate, which conf/pyproxy.conf names: made by `make install` so that
# `.venv/bin/pyproxy -t -c conf/pyproxy.conf` passes in a fresh clone (needs the openssl command).
DEMO_CERT := conf/certs/tls9443.kong.example.crt

install: $(STAMP) $(DEMO_CERT)

$(DEMO_CERT): | $(STAMP)
	$(PY) -m pyproxy.demo --certificate-only -c conf/pyproxy.conf

# The seed's demo: an echo upstream on 127.0.0.1:1025 behind pyproxy on :9000 (and :9443 with TLS).
run: install
	$(PY) -m pyproxy.demo -c conf/pyproxy.conf

# The same demo in Gateway API mode (issue 17): conf/pyproxy-gateway.conf reads the seed's manifests
# (examples/gateway/) and the Secret tls9443.kong.example made here from the demo certificate.
GATEWAY_SECRET := conf/gateway/tls9443.kong.example.yaml

$(GATEWAY_SECRET): $(DEMO_CERT)
	$(PY) -m pyproxy.demo --gateway-secret $@ -c conf/pyproxy.conf

run-gateway: install $(GATEWAY_SECRET)
	$(PY) -m pyproxy.demo -c conf/pyproxy-gateway.conf

# Debian packages some tests need (real peers and tools); installed only when missing. PostgreSQL's
# server is /usr/lib/postgresql/VERSION/bin/postgres, whichever VERSION Debian has.
TEST_PACKAGES := openssl:openssl haproxy:haproxy nginx:nginx \
                 /usr/lib/nginx/modules/ngx_stream_module.so:libnginx-mod-stream \
                 redis-server:redis-server \
                 /usr/sbin/dnsmasq:dnsmasq-base \
                 $(or $(firstword $(wildcard /usr/lib/postgresql/*/bin/postgres)),postgres):postgresql \
                 dig:bind9-dnsutils \
                 psql:postgresql-client

# Lint (ruff) and types (mypy, strict on pyproxy/): settings in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Lint first: a finding fails `make test`, and so CI (.ci/run).
test: lint
	bash scripts/ensure-debian-packages.sh $(TEST_PACKAGES)
	$(PY) -m pytest -q tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

# The comparison with nginx stream and HAProxy (issues 4, 21): installs what it needs, about 16 minutes.
# BENCH_ARGS passes options, e.g. `make bench BENCH_ARGS="--only keepalive --rounds 5"`.
bench: $(STAMP)
	bash bench/install.sh $(PY)
	$(PY) -m bench.run $(BENCH_ARGS)

# The same harness, one short round of everything: proves it runs end to end (not part of `make test`).
.PHONY: bench-smoke
bench-smoke: $(STAMP)
	bash bench/install.sh $(PY)
	$(PY) -m bench.run --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# Soak (issue 5): ~3000 concurrent long sessions plus a mix of short ones through a real pyproxy for
# SOAK_SECONDS (default 120), 2 reloads; reports RSS/PSS/fds/errors over time, checks for leaks.
# Results in soak/results/latest.{json,md}; SOAK_ARGS passes options (see `python -m soak.run -h`).
.PHONY: soak
soak: $(STAMP)
	$(PY) -m soak.run $(SOAK_ARGS)
