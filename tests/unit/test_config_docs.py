"""docs/configuration.md is the repository's own configuration reference (issue 15, item 13): every key
the validator takes is in it, with its full path, and its complete example loads."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pyproxy.config import (
    ACCESS_LOG_VARIABLES,
    ALGORITHMS,
    LOG_LEVELS,
    ROUTE_PROTOCOLS,
    entities,
    load_config,
    validate,
)
from pyproxy.config.model import WORKER_SCHED_POLICIES
from pyproxy.plugins import REGISTRY
from tests.unit.test_config import make_certificate

REPOSITORY = Path(__file__).resolve().parents[2]
REFERENCE_PATH = REPOSITORY / "docs" / "configuration.md"
REFERENCE = REFERENCE_PATH.read_text() if REFERENCE_PATH.exists() else ""

# Where each schema of the validator sits in the file, as the reference writes the paths of its keys.
SCHEMAS = {
    "TOP_LEVEL_KEYS": [""],
    "SSL_KEYS": ["ssl."],
    "CERT_KEY_KEYS": ["ssl.default_certificate.", "services[].client_certificate."],
    "CLIENT_CERTIFICATE_KEYS": ["ssl.client_certificate.", "services[].routes[].ssl.client_certificate."],
    "CERTIFICATE_KEYS": ["certificates[]."],
    "UPSTREAM_KEYS": ["upstreams[]."],
    "HEALTHCHECKS_KEYS": ["upstreams[].healthchecks."],
    "ACTIVE_KEYS": ["upstreams[].healthchecks.active."],
    "PASSIVE_KEYS": ["upstreams[].healthchecks.passive."],
    "HEALTHY_KEYS": ["upstreams[].healthchecks.active.healthy."],
    "UNHEALTHY_KEYS": ["upstreams[].healthchecks.active.unhealthy.",
                       "upstreams[].healthchecks.passive.unhealthy."],
    "TARGET_KEYS": ["upstreams[].targets[]."],
    "QUEUE_KEYS": ["upstreams[].queue."],
    "SERVICE_KEYS": ["services[]."],
    "ROUTE_KEYS": ["services[].routes[]."],
    "ROUTE_SSL_KEYS": ["services[].routes[].ssl."],
    "ADDRESS_MATCH_KEYS": ["services[].routes[].sources[].", "services[].routes[].destinations[]."],
    "PLUGIN_KEYS": ["plugins[]."],
    "GATEWAY_KEYS": ["gateway."],
    "KUBERNETES_KEYS": ["gateway.kubernetes."],
}
# A subset of SERVICE_KEYS, for a warning; the keys another source (the gateway manifests) writes.
NOT_SCHEMAS = {"TLS_ONLY_SERVICE_KEYS", "FRAGMENT_KEYS"}


def _schema_constants() -> dict[str, tuple[str, ...]]:
    return {name: value for module in (validate, entities) for name, value in vars(module).items()
            if name.endswith("_KEYS") and name not in NOT_SCHEMAS}


def _plugin_keys(plugin) -> list[str]:
    """The settings a plugin's check() takes, read from its own refusal of a key it cannot know."""
    problems = dict(plugin.check({"\0probe": None}))
    listed = problems["\0probe"].partition("expected one of ")[2]
    assert listed, f"{plugin.name}: cannot read its settings from {problems}"
    return listed.split(", ")


def _section(heading: str) -> str:
    """The text under a heading of the reference, up to the next heading of the same or a higher level."""
    found, level, lines, fenced = False, 0, [], False
    for line in REFERENCE.splitlines(keepends=True):
        fenced ^= line.startswith("```")
        match = None if fenced else re.match(r"(#+) (.*)$", line)
        if found and match and len(match.group(1)) <= level:
            break
        if found:
            lines.append(line)
        elif match and match.group(2) == heading:
            found, level = True, len(match.group(1))
    assert found, f"no heading {heading!r} in docs/configuration.md"
    return "".join(lines)


def test_every_schema_of_the_validator_is_placed():
    assert set(_schema_constants()) == set(SCHEMAS)


@pytest.mark.parametrize("constant", sorted(SCHEMAS))
def test_every_key_is_in_the_reference(constant: str):
    keys = _schema_constants()[constant]
    missing = [prefix + key for prefix in SCHEMAS[constant] for key in keys
               if f"`{prefix}{key}`" not in REFERENCE]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_every_listen_flag_and_choice_is_in_the_reference():
    words = (validate.LISTEN_FLAGS + validate.TLS_VERSIONS + ALGORITHMS + LOG_LEVELS + ROUTE_PROTOCOLS
             + WORKER_SCHED_POLICIES)
    missing = [word for word in words if f"`{word}`" not in REFERENCE]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_every_access_log_variable_is_in_the_reference():
    missing = [name for name in ACCESS_LOG_VARIABLES if f"`${name}`" not in REFERENCE]
    assert not missing, f"docs/configuration.md lacks {missing}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_setting_of_every_built_in_plugin_is_in_the_reference(name: str):
    text = _section(f"`{name}`")
    missing = [key for key in _plugin_keys(REGISTRY[name]) if f"`{key}`" not in text]
    assert not missing, f"the {name} section of docs/configuration.md lacks {missing}"


def test_the_complete_example_loads(tmp_path: Path):
    (example,) = re.findall(r"```yaml\n(.*?)```", _section("A complete example"), re.S)
    (tmp_path / "certs").mkdir()
    make_certificate(tmp_path / "certs", "default", "default.example", ("default.example",))
    make_certificate(tmp_path / "certs", "tls9443.kong.example", "tls9443.kong.example",
                     ("tls9443.kong.example",))
    make_certificate(tmp_path / "certs", "wildcard", "*.web.example", ("*.web.example",))
    (tmp_path / "pyproxy.conf").write_text(example)
    config = load_config(str(tmp_path / "pyproxy.conf"))
    assert config.routes and config.plugins and config.upstreams


def test_the_repository_explains_itself():
    """The reference is the repository's: the README links to it and nothing points outside."""
    readme = (REPOSITORY / "README.md").read_text()
    assert "(docs/configuration.md)" in readme
    for path in [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md")),
                 *sorted((REPOSITORY / "conf").rglob("*")), *sorted((REPOSITORY / "deploy").rglob("*"))]:
        if path.is_file() and path.suffix not in (".crt", ".key", ".pid"):
            assert "../shared" not in path.read_text(errors="replace"), path


def test_the_readme_names_the_process_metrics_as_a_scrape_shows_them(tmp_path: Path, monkeypatch):
    """The README's process metrics are the sample names /metrics prints (a counter's end in _total)."""
    from pyproxy.metrics import MULTIPROC_ENV, render_metrics
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    exposition = render_metrics(os.getpid()).decode()
    samples = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines()
               if not line.startswith("#")}
    named = set(re.findall(r"`(pyproxy_process_\w+)`", (REPOSITORY / "README.md").read_text()))
    assert named and named <= samples, (f"the README names {sorted(named - samples)}; a "
                                        f"scrape has {sorted(samples)}")
