# pyproxy: `make run` starts the demo, `make test` runs the suite, `make bench` measures against nginx/HAProxy.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test unit integration bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The seed's demo: an echo upstream on 127.0.0.1:1025 behind pyproxy on :9000 (and :9443 with TLS).
run: $(STAMP)
	$(PY) -m pyproxy.demo -c conf/pyproxy.conf

test: $(STAMP)
	$(PY) -m pytest -q tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
