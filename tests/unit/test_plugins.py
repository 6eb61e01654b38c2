"""The plugin hook's name: `access` (the phase it runs in), with `preread`, its first name, kept working
for plugins written before the rename."""

from __future__ import annotations

import warnings

import pytest

from pyproxy.plugins import Plugin, PluginContext

CONTEXT = PluginContext(log=lambda level, message: None, shared=None)


def test_a_plugin_that_names_its_hook_preread_still_refuses_and_is_told_to_rename_it():
    with pytest.warns(DeprecationWarning, match=r"OldStyle: preread\(\) is deprecated, name it access\(\)"):
        class OldStyle(Plugin):
            def preread(self, session):
                return 403

    assert OldStyle({}, CONTEXT).access(object()) == 403


def test_a_plugin_that_names_its_hook_access_is_not_warned_and_answers_to_both_names():
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        class NewStyle(Plugin):
            def access(self, session):
                return 503

    plugin = NewStyle({}, CONTEXT)
    assert plugin.access(object()) == 503
    assert plugin.preread(object()) == 503
    assert Plugin({}, CONTEXT).access(object()) is None


def test_an_old_plugin_that_extends_a_new_one_through_super_preread_still_reaches_its_check():
    """super().preread() from a subclass written against the old name runs the parent's access,
    once (no recursion through the alias)."""
    calls = []

    class Parent(Plugin):
        def access(self, session):
            calls.append("parent")
            return 503

    with pytest.warns(DeprecationWarning):
        class Child(Parent):
            def preread(self, session):
                calls.append("child")
                return super().preread(session)

    assert Child({}, CONTEXT).access(object()) == 503
    assert calls == ["child", "parent"]


# -- plugin_modules: imported for each load into that configuration's own plugin table ----------------

PLUGIN_CONFIG = """\
stream_listen: [127.0.0.1:9000]
plugin_modules: [answer]
services:
  - name: svc
    host: 127.0.0.1
    port: 1025
    routes: [{name: r, protocols: [tcp], destinations: [{port: 9000}]}]
plugins: [{name: answer}]
"""

ANSWER_PLUGIN = """\
from pyproxy.plugins import Plugin, register
from answer_status import STATUS


@register
class Answer(Plugin):
    name = "answer"

    def access(self, session):
        return STATUS
"""


def _write_answer_plugin(folder, status: int) -> str:
    """A plugin module beside the configuration, with a helper module it imports from there too."""
    (folder / "answer.py").write_text(ANSWER_PLUGIN)
    (folder / "answer_status.py").write_text(f"STATUS = {status}\n")
    path = folder / "pyproxy.conf"
    path.write_text(PLUGIN_CONFIG)
    return str(path)


def test_loading_a_configuration_leaves_the_import_path_and_registry_as_they_were(tmp_path):
    import sys

    from pyproxy.config import load_config
    from pyproxy.plugins import REGISTRY

    path = _write_answer_plugin(tmp_path, 403)
    before = (list(sys.path), dict(REGISTRY))
    config = load_config(path)
    assert (list(sys.path), dict(REGISTRY)) == before
    assert not {"answer", "answer_status"} & set(sys.modules)
    assert "answer" not in REGISTRY and config.plugin_types["answer"]({}, CONTEXT).access(None) == 403
    assert set(config.plugin_types) == set(REGISTRY) | {"answer"}
    assert not (tmp_path / "__pycache__").exists()       # no bytecode left beside the configuration


def test_each_load_runs_the_plugin_files_as_they_are_then(tmp_path):
    """Edited at once, to the same size: a cached module or bytecode would still say 403."""
    from pyproxy.config import load_config

    path = _write_answer_plugin(tmp_path, 403)
    first = load_config(path)
    _write_answer_plugin(tmp_path, 503)
    second = load_config(path)
    assert first.plugin_types["answer"]({}, CONTEXT).access(None) == 403
    assert second.plugin_types["answer"]({}, CONTEXT).access(None) == 503
