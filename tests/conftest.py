"""Fixtures: real upstream servers and a real pyproxy process, all on loopback, all stopped after."""

from __future__ import annotations

import pytest

from tests.support import Proxy, Upstream


@pytest.fixture
def upstreams():
    """Factory for real upstream servers: `upstreams(handler, name=...)`; all stopped at teardown."""
    started: list[Upstream] = []

    def make(handler, **kwargs) -> Upstream:
        up = Upstream(handler, **kwargs)
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()


@pytest.fixture
def proxy(tmp_path):
    """Factory for a pyproxy process: `proxy(config_yaml)` starts it and waits until it is ready."""
    started: list[Proxy] = []

    def make(config: str, start: bool = True, **kwargs) -> Proxy:
        p = Proxy(tmp_path, config, **kwargs)
        started.append(p)
        return p.start() if start else p

    yield make
    for p in started:
        p.stop()
    for p in started:
        # A bug caught by the worker costs one session and is logged, not raised: no test passes
        # with one in the log.
        assert "internal error" not in p.log_text(), p.log_text()
