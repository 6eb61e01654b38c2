"""A BackendTLSPolicy translated and run by a real pyproxy (conformance
backendtlspolicy-tlsroute-terminate): the client's TLS ends at the Gateway listener, pyproxy opens TLS
to the backend with the policy's hostname as SNI and checks its certificate against the ConfigMap's CA."""

from __future__ import annotations

import ssl

import pytest
import yaml

from pyproxy.gateway import Options, merge_entities, translate_paths, write_pem_files
from tests.support import free_port, make_ca, make_cert, recv_line, tag_handler, tls_client, tls_handler_for
from tests.unit.test_gateway_translate import (
    backend_tls_policy,
    ca_config_map,
    gateway,
    gateway_class,
    listener,
    service,
    tls_route,
    tls_secret,
)


@pytest.mark.parametrize("hostname", ["abc.example.com", "wrong.example.com"])
def test_terminated_route_reaches_a_tls_backend_it_verifies(proxy, upstreams, tmp_path, hostname):
    ca = make_ca(tmp_path)
    backend_cert = make_cert(tmp_path, "abc.example.com", ["abc.example.com"], ca=ca)
    frontend_cert = make_cert(tmp_path, "tls.example.com", ["tls.example.com"])
    backend = upstreams(tls_handler_for(backend_cert, tag_handler), name="btls-backend")
    port = free_port()
    objects = [
        gateway_class(),
        gateway([listener("tls", port, "TLS", hostname="tls.example.com",
                          tls={"certificateRefs": [{"name": "cert"}]})]),
        tls_secret("cert", frontend_cert),
        *service("tls-backend", ports={"btls": 443}, target=backend.port),
        ca_config_map(ca[0]),
        backend_tls_policy("policy", section="btls", hostname=hostname),
        tls_route("r", [{"name": "gw"}], [{"name": "tls-backend", "port": 443}], ["tls.example.com"]),
    ]
    (tmp_path / "manifests.yaml").write_text(yaml.safe_dump_all(objects))
    translation = translate_paths([str(tmp_path / "manifests.yaml")],
                                  Options(addresses=("127.0.0.1",), runtime_dir=str(tmp_path / "run")))
    assert translation.notices == []
    write_pem_files(translation.files)
    p = proxy(yaml.safe_dump(merge_entities({}, translation.entities)))

    with tls_client(port, "tls.example.com") as client:
        if hostname == "abc.example.com":
            assert recv_line(client) == b"btls-backend\n"
            client.sendall(b"through two TLS sessions\n")
            assert recv_line(client) == b"through two TLS sessions\n"
        else:
            # The backend's certificate does not name the policy's hostname: no byte reaches the client.
            try:
                assert client.recv(100) == b""
            except (ssl.SSLError, ConnectionResetError):
                pass
    [line] = p.wait_access(1)
    assert (" tls 200 " if hostname == "abc.example.com" else " tls 502 ") in line
