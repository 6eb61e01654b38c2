"""Hypothesis: whatever a Kong file holds, loading it returns a Config or raises a ConfigError whose
every issue reads `FILE:LINE: key: message` — never any other exception."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pyproxy.config import ConfigError, load_config
from tests.unit.test_config_fuzz import FUZZ_SETTINGS, ISSUE, _at, _slots, no_dns, values
from tests.unit.test_kong import DATA, with_certificate

__all__ = ["no_dns"]       # the fixture that keeps mutated host names off the network

KONG_KEYS = ["services", "routes", "upstreams", "targets", "certificates", "snis", "plugins", "service",
             "upstream", "certificate", "url", "protocol", "protocols", "destinations", "sources", "port",
             "healthchecks", "active", "passive", "healthy", "unhealthy", "interval", "id", "name",
             "enabled", "config", "ca_certificates", "consumer", "target", "weight", "tags"]


@pytest.fixture(scope="module")
def kong_document(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("kong-fuzz")
    document = yaml.safe_load(with_certificate((DATA / "seed-stream.yml").read_text(), folder))
    document["ca_certificates"] = [{"id": "2e4b7e0c-4d2f-4d55-9a2f-4f6c1b3b6a11",
                                    "cert": document["certificates"][0]["cert"]}]
    document["services"].append({"url": "tls://echo-upstream:443", "ca_certificates": [
        "2e4b7e0c-4d2f-4d55-9a2f-4f6c1b3b6a11"], "plugins": [{"name": "file-log", "config": {"path": "x"}}]})
    return document


@given(data=st.data())
@FUZZ_SETTINGS
def test_a_mutated_kong_file_is_loaded_or_refused_cleanly(kong_document: dict, tmp_path_factory, data):
    document = copy.deepcopy(kong_document)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        slots = list(_slots(document))
        if not slots:
            break
        path, key = data.draw(st.sampled_from(slots))
        container = _at(document, path)
        operation = data.draw(st.sampled_from(["delete", "replace", "rename"]))
        if operation == "delete":
            del container[key]
        elif operation == "replace":
            container[key] = data.draw(values)
        elif isinstance(container, dict):
            container[data.draw(st.sampled_from(KONG_KEYS))] = container.pop(key)
    path = tmp_path_factory.mktemp("kong") / "kong.yml"
    path.write_text(yaml.safe_dump(document) if isinstance(document, dict) else "")
    try:
        load_config(str(path))
    except ConfigError as error:
        assert error.errors
        for issue in error.errors:
            assert ISSUE.match(str(issue)), str(issue)
