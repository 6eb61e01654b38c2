"""PortHostnames (the index a Gateway's many listeners on one port are judged with) against the
pairwise functions it replaces: the same listeners overlap, the same route hostnames are isolated."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyproxy.gateway.hostnames import PortHostnames, isolated, matches, overlap, specificity

# Few labels, so that random names often cover, equal or nest in one another.
LABELS = st.sampled_from(["a", "b", "c", "example"])
EXACT = st.lists(LABELS, min_size=1, max_size=4).map(".".join)
WILDCARD = EXACT.map(lambda domain: f"*.{domain}")
HOSTNAME = st.one_of(EXACT, WILDCARD)
LISTENER = st.one_of(st.none(), HOSTNAME, HOSTNAME)


@settings(max_examples=400, deadline=None)
@given(st.lists(LISTENER, min_size=1, max_size=8), st.lists(HOSTNAME, max_size=5))
def test_the_index_agrees_with_the_pairwise_reference(listeners, names):
    port = PortHostnames(listeners)
    for index, listener in enumerate(listeners):
        others = listeners[:index] + listeners[index + 1:]
        assert port.overlaps(listener) == any(overlap(listener, other) for other in others)
        assert port.isolated(listener, tuple(names)) == isolated(listener, others, tuple(names))
    # Shadowed: a hostname that a less specific listener (no hostname, or a wildcard of fewer labels)
    # covers too.
    assert set(port.shadowed()) == {
        name for name in listeners if name is not None
        and any(other is None or (matches(other, name) and specificity(other) < specificity(name))
                for other in listeners)}


def test_examples_a_reader_can_check():
    port = PortHostnames(["*.example.com", "a.example.com", "*.b.example.com", "other.org"])
    assert port.overlaps("*.example.com") and port.overlaps("a.example.com")
    assert port.overlaps("*.b.example.com") and not port.overlaps("other.org")
    # x.b.example.com belongs to the deeper wildcard's listener, a.example.com to its exact listener.
    assert port.isolated("*.example.com", ("x.b.example.com", "a.example.com", "z.example.com")) == (
        "z.example.com",)
    assert port.shadowed() == ["a.example.com", "*.b.example.com"]
    assert PortHostnames([None, "other.org"]).overlaps("other.org")
    assert PortHostnames([None, "other.org"]).shadowed() == ["other.org"]
    assert not PortHostnames(["a.example.com"]).overlaps("a.example.com")
