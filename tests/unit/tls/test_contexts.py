"""TLSContexts across generations: what is unchanged is reused, what changed is rebuilt, what is gone
is freed. Real certificates (made with the openssl command) and real SSL contexts."""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import pytest

from pyproxy.config.model import Certificate, CertKey, Config, Listen, Service, SSLSettings
from pyproxy.tls.contexts import TLSContexts
from tests.support import make_ca, make_cert


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("certs")
    return {name: make_cert(d, f"{name}.example", [f"{name}.example"]) for name in ("default", "a", "b")}


def config(files, names=("a", "b"), protocols=("TLSv1.2", "TLSv1.3"), services=()) -> Config:
    default = files["default"]
    return Config(path="/etc/pyproxy.conf", stream_listen=(Listen("127.0.0.1", 9443, ssl=True),),
                  ssl=SSLSettings(protocols=protocols, default_certificate=CertKey(str(default[0]),
                                                                                   str(default[1]))),
                  certificates=tuple(Certificate(str(files[n][0]), str(files[n][1]), (f"{n}.example",))
                                     for n in names),
                  services=tuple(services))


def test_a_generation_with_the_same_files_and_settings_reuses_every_context(files):
    first = TLSContexts(config(files))
    second = TLSContexts(config(files), first)
    assert (first.built, first.reused) == (3, 0)
    assert (second.built, second.reused) == (0, 3)
    assert second.server.context is first.server.context            # the same session-ticket keys
    assert second.server.exact == first.server.exact


def test_a_changed_certificate_file_rebuilds_only_its_own_context(files, tmp_path):
    mine = {name: (tmp_path / f"{name}.crt", tmp_path / f"{name}.key") for name in files}
    for name, (crt, key) in files.items():
        shutil.copy(crt, mine[name][0])
        shutil.copy(key, mine[name][1])
    first = TLSContexts(config(mine))
    (tmp_path / "new").mkdir()
    renewed = make_cert(tmp_path / "new", "a-renewed.example", ["a.example"])
    shutil.copy(renewed[0], mine["a"][0])          # the same paths, new content (as certbot renews)
    shutil.copy(renewed[1], mine["a"][1])
    second = TLSContexts(config(mine), first)
    assert (second.built, second.reused) == (1, 2)
    assert second.server.context is first.server.context
    assert second.server.exact["b.example"] is first.server.exact["b.example"]
    assert second.server.exact["a.example"] is not first.server.exact["a.example"]


def test_changed_ssl_settings_rebuild_the_server_contexts(files):
    first = TLSContexts(config(files))
    second = TLSContexts(config(files, protocols=("TLSv1.3",)), first)
    assert (second.built, second.reused) == (3, 0)


def test_contexts_no_generation_uses_are_freed_with_the_previous_generation(files):
    first = TLSContexts(config(files))
    first.install()
    gone = weakref.ref(first.server.exact["b.example"])
    second = TLSContexts(config(files, names=("a",)), first)
    assert (second.built, second.reused) == (0, 2)
    second.install()                                # its workers are forked
    del first
    gc.collect()
    assert gone() is None


def test_each_generation_installs_its_own_names_on_a_shared_listening_context(files):
    """The master may fork a worker of the old generation (a respawn) while the new one boots: the
    fork must see the old generation's SNI map, not the new one's."""
    old = TLSContexts(config(files))
    old.install()
    new = TLSContexts(config(files, names=("a",)), old)
    listening = old.server.context
    assert listening is new.server.context
    assert listening.sni_callback.__self__ is old.server        # until a worker of `new` is forked
    new.install()
    assert listening.sni_callback.__self__ is new.server
    old.install()                                   # a respawn of the old generation
    assert listening.sni_callback.__self__ is old.server
    TLSContexts(config(files, names=()), new).install()
    assert listening.sni_callback is None          # no per-name certificates: no callback at all


def test_upstream_contexts_follow_their_ca_files(files, tmp_path):
    ca = make_ca(tmp_path)

    def services(verify: bool) -> list[Service]:
        return [Service(name=name, protocol="tls", host="127.0.0.1", port=1025, tls_verify=verify,
                        ca_certificates=(str(ca[0]),) if verify else ()) for name in ("one", "two")]

    first = TLSContexts(config(files, services=services(True)))
    one, two = first.upstream["one"], first.upstream["two"]
    assert one.context is two.context and one.chain_only is two.chain_only     # the same settings
    assert one.context is not one.chain_only
    second = TLSContexts(config(files, services=services(True)), first)
    assert second.upstream["one"].context is one.context
    make_ca(tmp_path)                               # the same path, a new CA
    third = TLSContexts(config(files, services=services(True)), second)
    assert third.upstream["one"].context is not one.context
    assert third.upstream["one"].chain_only is not one.chain_only
    plain = TLSContexts(config(files, services=services(False)), third)
    assert plain.upstream["one"].context is plain.upstream["one"].chain_only


def test_listeners_served_by_other_certificates_get_their_own_listening_context(files):
    """certificates[].listen: each set of listeners has its own SNI map, so its own listening context
    (the callback is the context's); listeners served alike share one, and a reload reuses them."""
    a, b = (Listen("127.0.0.1", port, ssl=True) for port in (8443, 9443))
    c = Listen("127.0.0.2", 9443, ssl=True)

    def scoped(files) -> Config:
        default = files["default"]
        return Config(path="/etc/pyproxy.conf", stream_listen=(a, b, c),
                      ssl=SSLSettings(default_certificate=CertKey(str(default[0]), str(default[1]))),
                      certificates=(Certificate(str(files["a"][0]), str(files["a"][1]), ("a.example",)),
                                    Certificate(str(files["b"][0]), str(files["b"][1]), ("a.example",),
                                                listen=((None, 9443),))))

    first = TLSContexts(scoped(files))
    first.install()
    on_a, on_b, on_c = (first.listeners[listen.key] for listen in (a, b, c))
    assert on_b is on_c and on_a is not on_b
    assert on_a.context is not on_b.context
    assert on_a.context_for("a.example") is on_a.exact["a.example"] is not on_b.context_for("a.example")
    assert on_a.context.sni_callback.__self__ is on_a and on_b.context.sni_callback.__self__ is on_b
    second = TLSContexts(scoped(files), first)
    assert (second.built, second.reused) == (0, 4)
    assert second.listeners[b.key].context is on_b.context
