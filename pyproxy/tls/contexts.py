"""SSL contexts: one server context per certificate, chosen by SNI; one client context per TLS service.

Termination uses a single listening context whose `sni_callback` swaps in the context of the
certificate for the name the client asked for (exact names first, then wildcards), or keeps the
default certificate's context for no or unknown SNI — Kong's `certificates`/`snis` entities.
Certificate wildcards follow RFC 6125: `*.example.com` covers one label (`a.example.com`, not
`a.b.example.com`); `example.*` any ending, as Kong allows.
"""

from __future__ import annotations

import _socket
import ssl

from pyproxy.addresses import is_ip_address
from pyproxy.config.model import Config, Service, SSLSettings
from pyproxy.loop import Loop
from pyproxy.tls.stream import TLSStream

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def _server_context(settings: SSLSettings, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    versions = [_VERSIONS[p] for p in settings.protocols]
    if ssl.TLSVersion.TLSv1 in versions or ssl.TLSVersion.TLSv1_1 in versions:
        ctx.set_ciphers(settings.ciphers + ":@SECLEVEL=0")    # old protocols need OpenSSL's level 0
    else:
        ctx.set_ciphers(settings.ciphers)
    ctx.minimum_version = min(versions)
    ctx.maximum_version = max(versions)
    # OP_IGNORE_UNEXPECTED_EOF: a peer that half-closes with a bare TCP FIN (no close_notify) has
    # ended its data, not broken the connection; OpenSSL 3 would otherwise fail the session with a
    # fatal alert and lose the reply still to be sent. nginx sets it too.
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
                    | ssl.OP_IGNORE_UNEXPECTED_EOF)
    # One TLS 1.3 session ticket per handshake (OpenSSL sends two): a resuming client uses one,
    # and gets a fresh one on every connection. Go's TLS server sends one too.
    ctx.num_tickets = 1
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


class ServerTLS:
    """Everything a worker needs to terminate TLS: the listening context and the SNI → context map."""

    def __init__(self, config: Config):
        settings = config.ssl
        default = settings.default_certificate
        self.has_default = default is not None
        self.context = _server_context(settings, default.cert if default else None,
                                       default.key if default else None)
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcards: list[tuple[str, ssl.SSLContext]] = []
        for certificate in config.certificates:
            ctx = _server_context(settings, certificate.cert, certificate.key)
            ctx.sni_callback = None
            for name in certificate.snis:
                if name.startswith("*.") or name.endswith(".*"):
                    self.wildcards.append((name, ctx))
                else:
                    self.exact.setdefault(name, ctx)
        if self.exact or self.wildcards:
            # Only with per-name certificates: a Python callback on every handshake otherwise.
            self.context.sni_callback = self._on_sni

    def context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context of the certificate for this name, or None for the default certificate."""
        if not server_name:
            return None
        name = server_name.lower()
        ctx = self.exact.get(name)
        if ctx is not None:
            return ctx
        for pattern, ctx in self.wildcards:
            if pattern.startswith("*."):
                suffix = pattern[1:]
                if name.endswith(suffix) and "." not in name[:-len(suffix)] and len(name) > len(suffix):
                    return ctx
            elif name.startswith(pattern[:-1]) and len(name) > len(pattern) - 1:
                return ctx
        return None

    def _on_sni(self, ssl_object: ssl.SSLObject, server_name: str | None,
                listening_context: ssl.SSLContext) -> None:
        ctx = self.context_for(server_name)
        if ctx is not None:
            ssl_object.context = ctx
        return None

    def wrap(self, sock: _socket.socket, scratch: memoryview, loop: Loop) -> TLSStream:
        """The server side of TLS over an accepted socket; the handshake is driven by the caller."""
        return TLSStream(sock, self.context, True, scratch, loop=loop)


class UpstreamTLS:
    """The client context of one `protocol: tls` service and the name it sends as SNI."""

    def __init__(self, service: Service):
        self.verify = service.tls_verify
        self.context = self._context(service, check_hostname=True)
        # With nothing to check the name against (no tls_server_name, an IP host, no client SNI)
        # verification still checks the chain, through a second context.
        self.chain_only = self._context(service, check_hostname=False) if self.verify else self.context
        if service.tls_server_name:
            self.server_name: str | None = service.tls_server_name
        elif service.upstream is None and not is_ip_address(service.host):
            self.server_name = service.host
        else:
            self.server_name = None

    @staticmethod
    def _context(service: Service, check_hostname: bool) -> ssl.SSLContext:
        if service.tls_verify:
            ctx = ssl.create_default_context()
            for path in service.ca_certificates:
                ctx.load_verify_locations(cafile=path)
            ctx.check_hostname = check_hostname
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF     # as on the server side: a FIN ends the data
        return ctx

    def wrap(self, sock: _socket.socket, scratch: memoryview, client_sni: str | None,
             loop: Loop) -> TLSStream:
        """The client side of TLS over a connected socket; SNI is tls_server_name, else the host,
        else the client's own SNI."""
        name = self.server_name or client_sni
        ctx = self.context if name is not None else self.chain_only
        return TLSStream(sock, ctx, False, scratch, server_hostname=name, loop=loop)


def build_upstream_tls(config: Config) -> dict[str, UpstreamTLS]:
    """Client contexts for every service that encrypts towards its upstream, by service name."""
    return {s.name: UpstreamTLS(s) for s in config.services if s.protocol == "tls"}


class TLSContexts:
    """The SSL contexts of one configuration generation.

    Made once, in the master, before the workers of that generation are forked — as nginx makes its
    SSL_CTX before forking. The contexts carry OpenSSL's session-ticket keys, so every worker can
    resume a session another worker started; contexts made after the fork would give each worker
    its own random key and turn about half of all resumptions into full handshakes.
    """

    def __init__(self, config: Config):
        needs_server = any(listen.ssl for listen in config.stream_listen)
        self.server: ServerTLS | None = ServerTLS(config) if needs_server else None
        self.upstream: dict[str, UpstreamTLS] = build_upstream_tls(config)
