"""SSL contexts: one server context per certificate, chosen by SNI; one client context per TLS service.

Termination uses a single listening context whose `sni_callback` swaps in the context of the
certificate for the name the client asked for (exact names first, then wildcards), or keeps the
listening context for no or unknown SNI — Kong's `certificates`/`snis` entities. That context holds
`ssl.default_certificate`, else the first of `certificates` (nginx's rule: the first certificate is
the default). A certificate with `listen` serves those ssl listeners only, where it takes its names
over the certificates without `listen` and the first of them is the default (nginx's per-`server`
certificates): each set of listeners served by the same certificates has its own listening context
and SNI map, chosen once per listener when a worker starts (`TLSContexts.listeners`).
Certificate wildcards follow RFC 6125: `*.example.com` covers one label (`a.example.com`, not
`a.b.example.com`); `example.*` any ending, as Kong allows. A certificate's `wildcard_depth: any`
makes its `*.` names cover one label or more, as nginx's server_name and Gateway API listener
hostnames do: they are tried after the others, the one with the most labels first.

Contexts outlive a reload when nothing they depend on changed (`TLSContexts`): a reload then costs
no certificate parsing, and clients resume their sessions across it.
"""

from __future__ import annotations

import _socket
import hashlib
import os
import ssl
from collections.abc import Callable, Hashable
from functools import partial

from pyproxy.addresses import is_ip_address
from pyproxy.config.model import Certificate, ClientCertificate, Config, Route, Service, SSLSettings
from pyproxy.config.tlsfiles import checked_context
from pyproxy.loop import Loop
from pyproxy.tls.stream import TLSStream, UpstreamTLSStream

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def _server_context(settings: SSLSettings, client: ClientCertificate | None, alpn: tuple[str, ...],
                    cert: str | None, key: str | None, ocsp: str | None = None) -> ssl.SSLContext:
    # At a start, the context the configuration's check loaded this very pair into (settings are
    # applied below as to a new one): OpenSSL parses each certificate and key once.
    checked = checked_context(cert, key) if cert is not None and key is not None and ocsp is None else None
    if checked is not None:
        ctx = checked
    elif ocsp is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    else:
        from pyproxy.tls.stapling import StaplingContext  # ctypes: only where a response is stapled
        ctx = StaplingContext(ocsp)
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
    if client is not None:
        # Every context asks: the one SNI switches to verifies with its own store and the listening
        # context's mode. Depth is checked after the handshake (Python cannot set OpenSSL's).
        ctx.verify_mode = ssl.CERT_REQUIRED if client.verify == "on" else ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=client.ca)
        if client.crl is not None:
            ctx.load_verify_locations(cafile=client.crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    if alpn:
        # Selected by OpenSSL in the handshake (the first of ours the client offers), on whichever
        # context SNI switched to: every server context of a ServerTLS offers the same.
        ctx.set_alpn_protocols(list(alpn))
    if cert is not None and checked is None:
        ctx.load_cert_chain(cert, key)
    return ctx


def file_digest(path: str) -> bytes:
    """SHA-256 of a file's content: what decides whether a context made from it can be reused."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").digest()


class ContextCache:
    """While a generation is made: its contexts by what they depend on, reusing the previous one's.

    A key holds the settings that shape a context and the SHA-256 of every file it was made from.
    A content hash rather than (device, inode, size, mtime): certificate tools replace files in
    ways a stat misses (a copy that keeps the mtime, a renewal of the same size within the mtime's
    granularity), and hashing is cheap next to what it saves — 5 ms for 400 PEM files, against
    1.3 ms to parse each certificate and key into a context.
    """

    def __init__(self, previous: dict[Hashable, ssl.SSLContext]):
        self.previous = previous
        self.contexts: dict[Hashable, ssl.SSLContext] = {}
        self.reused = self.built = 0

    def get(self, key: Hashable, make: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        """The context for `key`: this generation's, else the previous one's, else `make()`."""
        ctx = self.contexts.get(key)
        if ctx is None:
            ctx = self.previous.get(key)
            if ctx is None:
                ctx = make()
                self.built += 1
            else:
                self.reused += 1
            self.contexts[key] = ctx
        return ctx


def _server_key(kind: str, settings: SSLSettings, client: ClientCertificate | None, alpn: tuple[str, ...],
                cert: str | None, key: str | None, ocsp: str | None = None,
                scope: Hashable = None) -> Hashable:
    files = (cert, file_digest(cert), key, file_digest(key)) if cert is not None and key is not None else ()
    verify = (() if client is None else
              (client.verify, client.ca, file_digest(client.ca),
               client.crl, file_digest(client.crl) if client.crl is not None else None))
    # The response file's path only: its content is read again when it changes (Staple).
    return (kind, settings.protocols, settings.ciphers, alpn, files, verify, ocsp, scope)


def default_certificate_files(config: Config, certificates: tuple[Certificate, ...],
                              ) -> tuple[str | None, str | None, str | None]:
    """The certificate, key and OCSP response file served without a matching SNI:
    `ssl.default_certificate`, else the first of `certificates` (those of one listener, its own
    first) as nginx serves its first, else none (no handshake can complete)."""
    default = config.ssl.default_certificate
    if default is not None:
        return default.cert, default.key, None
    if certificates:
        first = certificates[0]
        return first.cert, first.key, first.ocsp_response
    return None, None, None


class ServerTLS:
    """Everything a worker needs to terminate TLS: the listening context and the SNI → context map.

    The listener's asks clients for the certificate `ssl.client_certificate` says and selects ALPN
    from `ssl.alpn`; each route with an `ssl` of its own has a ServerTLS made with its
    `client_certificate` and `alpn` in their place (`routes`, by route name), whose contexts are
    the listener's when both are the same.

    `certificates` are those of the listeners it serves (see TLSContexts.listeners)."""

    def __init__(self, config: Config, cache: ContextCache, certificates: tuple[Certificate, ...],
                 route: Route | None = None):
        settings = config.ssl
        cert, key, ocsp = default_certificate_files(config, certificates)
        self.has_default = cert is not None       # a certificate for clients whose SNI has none
        client = settings.client_certificate
        alpn = settings.alpn
        if route is not None:
            client = route.client_certificate or client
            alpn = route.ssl_alpn if route.ssl_alpn is not None else alpn
        # The depth a client's chain may have, when clients are asked for a certificate.
        self.client_depth: int | None = client.depth if client is not None else None
        # The listening context carries the session-ticket keys (OpenSSL encrypts tickets with the
        # keys of the context the handshake began on, whatever context SNI switches to): kept while
        # the default certificate and the settings are, sessions resume across reloads. It serves
        # clients without SNI or with a name no certificate has. Listeners served by other
        # certificates need another one: its SNI callback looks in another map.
        scope = None if certificates == config.certificates else certificates
        self.context = cache.get(_server_key("listen", settings, client, alpn, cert, key, ocsp, scope),
                                 partial(_server_context, settings, client, alpn, cert, key, ocsp))
        self.exact: dict[str, ssl.SSLContext] = {}
        self.wildcards: list[tuple[str, ssl.SSLContext]] = []
        self.deep_wildcards: list[tuple[str, ssl.SSLContext]] = []      # their suffix: ".example.com"
        for certificate in certificates:
            files = (certificate.cert, certificate.key, certificate.ocsp_response)
            ctx = cache.get(_server_key("sni", settings, client, alpn, *files),
                            partial(_server_context, settings, client, alpn, *files))
            for name in certificate.snis:
                if name.startswith("*.") and certificate.wildcard_depth == "any":
                    self.deep_wildcards.append((name[1:], ctx))
                elif name.startswith("*.") or name.endswith(".*"):
                    self.wildcards.append((name, ctx))
                else:
                    self.exact.setdefault(name, ctx)
        self.deep_wildcards.sort(key=lambda item: -item[0].count("."))     # stable: first written first
        self.routes: dict[str, ServerTLS] = {} if route is not None else {
            r.name: ServerTLS(config, cache, certificates, r) for r in config.routes
            if (r.client_certificate is not None or r.ssl_alpn is not None) and "tls" in r.protocols}

    def install(self) -> None:
        """Point the listening context's SNI callback at this generation's names. The context may be
        the previous generation's too, which the master may still fork a worker for: it calls this
        before every fork, and the worker's copy of the context keeps what it found. Nothing else
        sets the callback, so a reload that fails leaves nothing holding on to its contexts."""
        # Only with per-name certificates: a Python callback on every handshake otherwise.
        named = self.exact or self.wildcards or self.deep_wildcards
        self.context.sni_callback = self._on_sni if named else None
        for route_tls in self.routes.values():
            route_tls.install()

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
        for suffix, ctx in self.deep_wildcards:
            if name.endswith(suffix) and len(name) > len(suffix):
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

    def __init__(self, service: Service, cache: ContextCache, system_ca: Hashable):
        self.verify = service.tls_verify
        # Shaped by the CA files and the system store when verifying, by nothing otherwise; and by
        # the client certificate it presents, if any.
        files = ((system_ca, *((path, file_digest(path)) for path in service.ca_certificates))
                 if self.verify else ())
        mine = service.client_certificate
        if mine is not None:
            files += (mine.cert, file_digest(mine.cert), mine.key, file_digest(mine.key))
        self.context = cache.get(("client", self.verify, True, files), partial(self._context, service, True))
        # With nothing to check the name against (no tls_server_name, an IP host, no client SNI)
        # verification still checks the chain, through a second context.
        self.chain_only = (cache.get(("client", True, False, files), partial(self._context, service, False))
                           if self.verify else self.context)
        if service.tls_server_name:
            self.server_name: str | None = service.tls_server_name
        elif service.upstream is None and not is_ip_address(service.host):
            self.server_name = service.host
        else:
            self.server_name = None
        # The last TLS session with each (peer address, name), for the next connection to resume:
        # one cache per service and worker (each worker's copy fills on its own after the fork).
        self.sessions: dict[Hashable, ssl.SSLSession] = {}

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
        if service.client_certificate is not None:
            ctx.load_cert_chain(service.client_certificate.cert, service.client_certificate.key)
        return ctx

    def wrap(self, sock: _socket.socket, scratch: memoryview, client_sni: str | None,
             loop: Loop, peer: tuple[str, int]) -> TLSStream:
        """The client side of TLS over a socket connected to `peer`, resuming the last session with
        it; SNI is tls_server_name, else the host, else the client's own SNI."""
        name = self.server_name or client_sni
        ctx = self.context if name is not None else self.chain_only
        return UpstreamTLSStream(sock, ctx, scratch, name, loop, self.sessions, (peer, name))


def system_ca_fingerprint() -> Hashable:
    """What the system store a verifying context loads depends on: the content of OpenSSL's default
    CA file, and the modification time of its CA directory (c_rehash adds and removes links)."""
    paths = ssl.get_default_verify_paths()
    cafile = file_digest(paths.cafile) if paths.cafile else None
    try:
        capath = os.stat(paths.capath).st_mtime_ns if paths.capath else None
    except OSError:
        capath = None
    return (cafile, capath)


class TLSContexts:
    """The SSL contexts of one configuration generation.

    Made once, in the master, before the workers of that generation are forked — as nginx makes its
    SSL_CTX before forking. The contexts carry OpenSSL's session-ticket keys, so every worker can
    resume a session another worker started; contexts made after the fork would give each worker
    its own random key and turn about half of all resumptions into full handshakes.

    A generation takes from `previous` (the one it replaces) every context whose settings and files
    are unchanged, and makes only the others; contexts the new generation no longer uses are freed
    with the previous one. The listening context, and with it the ticket keys, is kept while the
    default certificate and the `ssl` settings are: clients then resume across the reload.
    """

    def __init__(self, config: Config, previous: TLSContexts | None = None):
        cache = ContextCache(previous.contexts if previous is not None else {})
        # Each ssl listener's, by Listen.key: one ServerTLS per set of certificates serving listeners
        # (one for all of them while no certificate has `listen`).
        self.listeners: dict[tuple[str, int, bool], ServerTLS] = {}
        made: dict[tuple[Certificate, ...], ServerTLS] = {}
        for listen in config.stream_listen:
            if listen.ssl:
                # Its own first (they take their names over the others', and the first is its default).
                serving = (tuple(c for c in config.certificates if c.listen and c.serves(listen))
                           + tuple(c for c in config.certificates if not c.listen))
                server = made.get(serving)
                if server is None:
                    server = made[serving] = ServerTLS(config, cache, serving)
                self.listeners[listen.key] = server
        # The first ssl listener's: the `ssl` settings every listener shares (client_depth).
        self.server: ServerTLS | None = next(iter(made.values()), None)
        services = [s for s in config.services if s.protocol == "tls"]
        system_ca = system_ca_fingerprint() if any(s.tls_verify for s in services) else None
        self.upstream = {s.name: UpstreamTLS(s, cache, system_ca) for s in services}
        self.contexts: dict[Hashable, ssl.SSLContext] = cache.contexts   # what the next one may take
        self.reused, self.built = cache.reused, cache.built

    def install(self) -> None:
        """Before forking a worker of this generation, and before terminating TLS with these
        contexts in this process: see ServerTLS.install."""
        for server in set(self.listeners.values()):
            server.install()
