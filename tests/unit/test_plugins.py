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
