"""`certificates[].listen`: a certificate served on some ssl listeners only, so two ports serve one
server name with two certificates (a Gateway's two Terminate listeners with two Secrets), seen by
`openssl s_client -servername` (issue 17, gap 9.2 b)."""

from __future__ import annotations

import pytest

from tests.support import free_port, make_cert, s_client_lines, tag_handler


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    # Each is for shared.example; its CN says which one a client got.
    return {name: make_cert(d, f"{name}.example", [f"{name}.example", "shared.example"])
            for name in ("everywhere", "port-a", "port-b")}


def scoped_config(ports: dict[str, int], certs, up_port: int, scoped: bool = True) -> str:
    """Three ssl listeners; a certificate for every listener, and (`scoped`) one for port a and one
    for port b's listener, all for shared.example."""
    def certificate(name: str, listen: str = "") -> str:
        cert, key = certs[name]
        if listen and not scoped:
            return ""
        return f"  - {{cert: {cert}, key: {key}, snis: [shared.example]{listen}}}\n"

    return f"""
stream_listen:
  - 127.0.0.1:{ports['a']} ssl
  - 127.0.0.1:{ports['b']} ssl
  - 127.0.0.1:{ports['c']} ssl
certificates:
{certificate('everywhere')}{certificate('port-a', f", listen: [{ports['a']}]")}\
{certificate('port-b', f", listen: ['127.0.0.1:{ports['b']}']")}
services:
  - name: web
    host: 127.0.0.1
    port: {up_port}
    routes:
      - name: shared
        protocols: [tls]
        snis: [shared.example]
"""


def served(port: int, *args: str) -> tuple[bytes, bytes]:
    """The subject of the certificate `openssl s_client` got on `port`, and the upstream's greeting."""
    lines = s_client_lines(port, b"tagged\n", *args)
    subjects = [line for line in lines if line.startswith(b"subject=")]
    return subjects[0] if subjects else b"", lines[-1]


def test_each_port_serves_its_own_certificate_for_one_server_name(proxy, upstreams, certs):
    up = upstreams(tag_handler, name="tagged")
    ports = {name: free_port() for name in "abc"}
    proxy(scoped_config(ports, certs, up.port))
    assert served(ports["a"], "-servername", "shared.example") == (b"subject=CN = port-a.example\n",
                                                                   b"tagged\n")
    assert served(ports["b"], "-servername", "shared.example") == (b"subject=CN = port-b.example\n",
                                                                   b"tagged\n")
    # A listener no `listen` names keeps the certificate of every listener.
    assert served(ports["c"], "-servername", "shared.example") == (b"subject=CN = everywhere.example\n",
                                                                   b"tagged\n")


def test_a_listeners_own_first_certificate_is_its_default(proxy, upstreams, certs):
    up = upstreams(tag_handler, name="tagged")
    ports = {name: free_port() for name in "abc"}
    proxy(scoped_config(ports, certs, up.port))
    for name, expected in (("a", b"port-a"), ("b", b"port-b"), ("c", b"everywhere")):
        subject, _ = served(ports[name], "-noservername")
        assert subject == b"subject=CN = " + expected + b".example\n", name


def test_a_reload_scopes_a_certificate_to_its_listener(proxy, upstreams, certs):
    up = upstreams(tag_handler, name="tagged")
    ports = {name: free_port() for name in "abc"}
    p = proxy(scoped_config(ports, certs, up.port, scoped=False))
    assert served(ports["a"], "-servername", "shared.example")[0] == b"subject=CN = everywhere.example\n"
    p.reload(scoped_config(ports, certs, up.port))
    assert served(ports["a"], "-servername", "shared.example")[0] == b"subject=CN = port-a.example\n"
    assert served(ports["c"], "-servername", "shared.example")[0] == b"subject=CN = everywhere.example\n"


def test_wildcard_depth_any_covers_names_deeper_than_one_label(proxy, upstreams, tmp_path):
    up = upstreams(tag_handler, name="tagged")
    port = free_port()
    default = make_cert(tmp_path, "default.example", ["default.example"])
    deep = make_cert(tmp_path, "deep.example", ["*.deep.example"])
    shallow = make_cert(tmp_path, "shallow.example", ["*.shallow.example"])
    deeper = make_cert(tmp_path, "deeper.example", ["*.b.deep.example"])
    proxy(f"""
stream_listen: [127.0.0.1:{port} ssl]
ssl: {{default_certificate: {{cert: {default[0]}, key: {default[1]}}}}}
certificates:
  - {{cert: {deep[0]}, key: {deep[1]}, wildcard_depth: any, listen: [{port}]}}
  - {{cert: {shallow[0]}, key: {shallow[1]}}}
  - {{cert: {deeper[0]}, key: {deeper[1]}, wildcard_depth: any}}
services:
  - name: web
    host: 127.0.0.1
    port: {up.port}
    routes:
      - {{name: all, protocols: [tls], destinations: [{{port: {port}}}]}}
""")
    for name, expected in (("a.deep.example", b"deep"), ("a.b.c.deep.example", b"deep"),
                           ("a.c.b.deep.example", b"deeper"),    # the one with the most labels
                           ("a.shallow.example", b"shallow"),
                           ("a.b.shallow.example", b"default"),   # RFC 6125: one label
                           ("deep.example", b"default")):
        subject = b"subject=CN = " + expected + b".example\n"
        assert served(port, "-servername", name) == (subject, b"tagged\n"), name


def test_t_says_a_listener_s_own_first_certificate_is_its_default(proxy, certs):
    ports = {name: free_port() for name in "abc"}
    p = proxy(scoped_config(ports, certs, free_port()), start=False)
    result = p.run_cli("-t")
    assert result.returncode == 0, result.stderr
    assert (f"pyproxy: [notice] no ssl.default_certificate: clients without a matching server name get "
            f"{certs['everywhere'][0]} (the first certificate), on a listener with certificates of its own "
            "the first of them") in result.stderr.splitlines(), result.stderr
