"""The benchmark's configurations: one port layout, a self-signed certificate, and a config file per server.

Every proxy gets the same four front ports in front of the same upstreams, so a scenario only has to
pick a port. Everything is written into the run's folder; nothing touches /etc.

    base + 0   HTTP upstream (nginx, `return 200 "ok"`)       = "direct" for the plain HTTP scenarios
    base + 1   the same upstream with TLS                     = "direct" for the TLS scenarios
    base + 2   iperf3 server                                  = "direct" for bulk throughput
    base + 3   idle upstream (bench.idle: accepts and holds)
    base + 4   redis-server                                   = "direct" for redis-benchmark
    base + 5   PostgreSQL                                     = "direct" for pgbench
    base + 6   sink (bench.tlsload: reads and discards)
    base + 7   tag server "A", base + 8 tag server "B" (bench.tlsload: answer their letter; reloads)
    base + 10*k + {0: plain → HTTP, 1: TLS terminated → HTTP, 2: plain → iperf3, 3: plain → idle,
                   4: plain → redis, 5: plain → PostgreSQL, 6: TLS terminated → sink,
                   7: TLS terminated, 10,000 SNI routes and 1,000 certificates → HTTP (a proxy of its own),
                   8: plain → tag server, 9: TLS passthrough with 10,000 SNI routes (the reload proxy)}
               for proxy k = 1 (nginx), 2 (haproxy), 3 (pyproxy)
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from pyproxy.config.values import congestion_control_refused

PROXIES = ("nginx", "haproxy", "pyproxy")
TARGETS = ("direct", *PROXIES)         # what every scenario is run against
LOOPBACK = "127.0.0.1"
PORT_STRIDE = 10                          # ports reserved per proxy in the layout above
HIGHEST_PORT = 32767                      # stay below the kernel's ephemeral range (32768-60999)
LISTEN_BACKLOG = 4096                     # = net.core.somaxconn here: the idle test opens thousands at once
IDLE_TIMEOUT = "300s"                     # far longer than any scenario: no proxy closes an idle session
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"   # Debian's libnginx-mod-stream
# The TLS versions every TLS endpoint offers: HAProxy's and pyproxy's defaults, and nginx's since
# 1.23.4. Debian 12's nginx 1.22 would offer TLS 1.2 only, so its handshakes would be TLS 1.2 session
# resumptions (no key exchange) against everyone else's TLS 1.3 ones (a fresh X25519 exchange each).
SSL_PROTOCOLS = "TLSv1.2 TLSv1.3"
NOFILE = 20000                            # this machine's hard RLIMIT_NOFILE (`ulimit -Hn`)
NGINX_CONNECTIONS = 10000                 # nginx's worker_connections (5,000 sessions a worker)
NGINX_CONNECTIONS_MOST = 19500            # for 9,000 idle sessions a worker: all NOFILE allows


@dataclass(frozen=True)
class FrontPorts:
    """The ports one target listens on, one per kind of traffic."""

    http: int
    https: int
    iperf: int
    idle: int
    redis: int
    postgres: int
    tls_bulk: int          # upstream: the sink
    sni: int               # upstream: tag server A
    reload: int            # upstream: tag server B
    reload_tls: int

    def main(self) -> list[int]:
        """The ports of the long-running proxies (`sni`, `reload` and `reload_tls` belong to
        proxies started for one scenario)."""
        return [self.http, self.https, self.iperf, self.idle, self.redis, self.postgres, self.tls_bulk]


@dataclass(frozen=True)
class Layout:
    """Every port of one benchmark run, derived from a base port."""

    base: int

    def __post_init__(self) -> None:
        if self.base < 1024 or self.base + PORT_STRIDE * (len(PROXIES) + 1) > HIGHEST_PORT:
            raise ValueError(f"base port {self.base}: the layout needs ports 1024..{HIGHEST_PORT}")

    @property
    def upstream(self) -> FrontPorts:
        """The upstreams themselves, which is what "direct" talks to."""
        return FrontPorts(*range(self.base, self.base + PORT_STRIDE))

    def front(self, target: str) -> FrontPorts:
        """The ports `target` ("direct" or a proxy name) listens on."""
        if target == "direct":
            return self.upstream
        first = self.base + PORT_STRIDE * (PROXIES.index(target) + 1)
        return FrontPorts(*range(first, first + PORT_STRIDE))

    def all_ports(self) -> list[int]:
        return [port for target in TARGETS for port in vars(self.front(target)).values()]


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate for `localhost` and 127.0.0.1, in the shapes each server wants."""

    cert: str
    key: str
    combined: str             # cert + key in one PEM: HAProxy's `crt`


def make_certificate(folder: str, kind: str = "ec") -> Certificate:
    """Generate a self-signed certificate with openssl. `kind`: "ec" (P-256) or "rsa" (2048 bits).

    The key type decides how much of a TLS handshake is spent in OpenSSL's signature (the same C code
    for every proxy): ECDSA P-256 is today's common choice and leaves the proxy's own work visible.
    """
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] if kind == "ec" \
        else ["-newkey", "rsa:2048"]
    subprocess.run(["openssl", "req", "-x509", "-nodes", *newkey, "-keyout", key, "-out", cert,
                    "-days", "30", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    combined = os.path.join(folder, "combined.pem")
    with open(combined, "w") as out:
        for part in (cert, key):
            with open(part) as source:
                out.write(source.read())
    return Certificate(cert, key, combined)


def nginx_upstream_conf(folder: str, layout: Layout, cert: Certificate, workers: int) -> str:
    """The HTTP upstream: nginx answering `ok` to everything, in plain HTTP and over TLS."""
    ports = layout.upstream
    return f"""# HTTP upstream for the benchmark: answers "ok"; never the bottleneck.
worker_processes {workers};
worker_rlimit_nofile {NOFILE};
pid {folder}/upstream-http.pid;
daemon off;
error_log {folder}/upstream-http.error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 100000000;   # wrk keeps its connections for the whole run
    keepalive_timeout 300s;
    server {{
        listen {LOOPBACK}:{ports.http} reuseport backlog={LISTEN_BACKLOG};
        listen {LOOPBACK}:{ports.https} ssl reuseport backlog={LISTEN_BACKLOG};
        ssl_certificate {cert.cert};
        ssl_certificate_key {cert.key};
        ssl_protocols {SSL_PROTOCOLS};
        location / {{ return 200 "ok"; }}
    }}
}}
"""


def nginx_stream_head(folder: str, name: str, workers: int, connections: int = NGINX_CONNECTIONS) -> str:
    """The lines before `stream {` of an nginx stream proxy run as server `name` (its pid file and
    error log are named after it), with `connections` a worker (each proxied session takes two)."""
    return f"""load_module {NGINX_STREAM_MODULE};
worker_processes {workers};
worker_rlimit_nofile {NOFILE};
pid {folder}/{name}.pid;
daemon off;
error_log {folder}/{name}.error.log warn;
events {{ worker_connections {connections}; }}
"""


def nginx_stream_conf(folder: str, layout: Layout, cert: Certificate, workers: int,
                      connections: int = NGINX_CONNECTIONS) -> str:
    """nginx's stream module in front of the upstreams (`reuseport`: one accept queue per worker, as
    pyproxy does), with `connections` a worker (each proxied session takes two)."""
    front, up = layout.front("nginx"), layout.upstream
    listen = f"reuseport backlog={LISTEN_BACKLOG}"
    return f"""# nginx stream proxy for the benchmark.
{nginx_stream_head(folder, "nginx", workers, connections)}stream {{
    proxy_timeout {IDLE_TIMEOUT};
    server {{ listen {LOOPBACK}:{front.http} {listen}; proxy_pass {LOOPBACK}:{up.http}; }}
    server {{
        listen {LOOPBACK}:{front.https} ssl {listen};
        ssl_certificate {cert.cert};
        ssl_certificate_key {cert.key};
        ssl_protocols {SSL_PROTOCOLS};
        proxy_pass {LOOPBACK}:{up.http};
    }}
    server {{ listen {LOOPBACK}:{front.iperf} {listen}; proxy_pass {LOOPBACK}:{up.iperf}; }}
    server {{ listen {LOOPBACK}:{front.idle} {listen}; proxy_pass {LOOPBACK}:{up.idle}; }}
    server {{ listen {LOOPBACK}:{front.redis} {listen}; proxy_pass {LOOPBACK}:{up.redis}; }}
    server {{ listen {LOOPBACK}:{front.postgres} {listen}; proxy_pass {LOOPBACK}:{up.postgres}; }}
    server {{
        listen {LOOPBACK}:{front.tls_bulk} ssl {listen};
        ssl_certificate {cert.cert};
        ssl_certificate_key {cert.key};
        ssl_protocols {SSL_PROTOCOLS};
        proxy_pass {LOOPBACK}:{up.tls_bulk};
    }}
}}
"""


def haproxy_conf(folder: str, layout: Layout, cert: Certificate, threads: int) -> str:
    """HAProxy in `mode tcp` with `nbthread` threads and kernel splicing (its own heuristic)."""
    front, up = layout.front("haproxy"), layout.upstream

    def proxy(name: str, port: int, upstream: int, bind_options: str = "") -> str:
        return (f"frontend fe_{name}\n    bind {LOOPBACK}:{port}{bind_options}\n    "
                f"default_backend be_{name}\n"
                f"backend be_{name}\n    server s1 {LOOPBACK}:{upstream}\n")

    return f"""# HAProxy (mode tcp) for the benchmark.
global
    nbthread {threads}
    maxconn 7900            # 2.5 fds per session (two sockets, splice pipes for a quarter): < {NOFILE}
    pidfile {folder}/haproxy.pid
defaults
    mode tcp
    option splice-auto      # splice(2) where HAProxy finds it pays (bulk transfers)
    timeout connect 5s
    timeout client {IDLE_TIMEOUT}
    timeout server {IDLE_TIMEOUT}
    backlog {LISTEN_BACKLOG}
{proxy("http", front.http, up.http)}{proxy("https", front.https, up.http, f" ssl crt {cert.combined}")}\
{proxy("iperf", front.iperf, up.iperf)}{proxy("idle", front.idle, up.idle)}\
{proxy("redis", front.redis, up.redis)}{proxy("postgres", front.postgres, up.postgres)}\
{proxy("tls_bulk", front.tls_bulk, up.tls_bulk, f" ssl crt {cert.combined}")}"""


# The bulk service's upstream connections use CUBIC whatever the host's default: with BBR (this
# machine's default) the proxy -> iperf3 leg is held to BBR's window of about twice bandwidth x
# minimum RTT, a few microseconds on loopback, and data waits in the proxy's send queue whenever the
# receiver is scheduled late (README, Performance). nginx 1.22 and HAProxy 2.6 have no such setting.
# On a host without CUBIC the setting is left out (and the report says which was used).
BULK_CONGESTION = "cubic" if congestion_control_refused("cubic") is None else None
BULK_SERVICE_EXTRA = f"\n    tcp_congestion: {BULK_CONGESTION}" if BULK_CONGESTION else ""


def pyproxy_head(folder: str, name: str, workers: int) -> str:
    """The process settings of a pyproxy run as server `name` (its pid file and error log are named
    after it)."""
    return f"""worker_processes: {workers}
worker_connections: 16384
pid: {folder}/{name}.pid
error_log: {folder}/{name}.error.log
log_level: notice
access_log: off
"""


def pyproxy_conf(folder: str, layout: Layout, cert: Certificate, workers: int) -> str:
    """pyproxy with one service per upstream, routed by listener port; TLS terminated on the https port."""
    front, up = layout.front("pyproxy"), layout.upstream

    def service(name: str, upstream: int, port: int, extra: str = "") -> str:
        return f"""  - name: {name}
    host: {LOOPBACK}
    port: {upstream}
    connect_timeout: 5s
    read_timeout: {IDLE_TIMEOUT}
    write_timeout: {IDLE_TIMEOUT}{extra}
    routes:
      - name: {name}
        protocols: [tcp]
        destinations: [{{port: {port}}}]
"""

    return f"""# pyproxy for the benchmark.
{pyproxy_head(folder, "pyproxy", workers)}
stream_listen:
  - {LOOPBACK}:{front.http} backlog={LISTEN_BACKLOG}
  - {LOOPBACK}:{front.https} ssl backlog={LISTEN_BACKLOG}
  - {LOOPBACK}:{front.iperf} backlog={LISTEN_BACKLOG}
  - {LOOPBACK}:{front.idle} backlog={LISTEN_BACKLOG}
  - {LOOPBACK}:{front.redis} backlog={LISTEN_BACKLOG}
  - {LOOPBACK}:{front.postgres} backlog={LISTEN_BACKLOG}
  - {LOOPBACK}:{front.tls_bulk} ssl backlog={LISTEN_BACKLOG}

ssl:
  default_certificate: {{cert: {cert.cert}, key: {cert.key}}}

services:
{service("http", up.http, front.http)}\
      - name: https               # terminate TLS (whatever the SNI), forward plain HTTP
        protocols: [tls]
        sources: [{{ip: 127.0.0.0/8}}]
        destinations: [{{port: {front.https}}}]
{service("iperf", up.iperf, front.iperf, BULK_SERVICE_EXTRA)}{service("idle", up.idle, front.idle)}\
{service("redis", up.redis, front.redis)}{service("postgres", up.postgres, front.postgres)}\
  - name: sink
    host: {LOOPBACK}
    port: {up.tls_bulk}
    connect_timeout: 5s
    read_timeout: {IDLE_TIMEOUT}
    write_timeout: {IDLE_TIMEOUT}
    routes:
      - name: tls-bulk            # terminate TLS, forward the plain bytes to the sink
        protocols: [tls]
        destinations: [{{port: {front.tls_bulk}}}]
"""


@dataclass(frozen=True)
class ConfigFiles:
    """The paths of everything `write_configs` made."""

    cert: Certificate
    upstream_nginx: str
    nginx: str
    haproxy: str
    pyproxy: str


def write_configs(folder: str, layout: Layout, workers: int, cert_kind: str = "ec",
                  upstream_workers: int = 1, nginx_connections: int = NGINX_CONNECTIONS) -> ConfigFiles:
    """Write the certificate and every server's configuration into `folder`."""
    os.makedirs(folder, exist_ok=True)
    cert = make_certificate(folder, cert_kind)
    texts = {
        "upstream-http.nginx.conf": nginx_upstream_conf(folder, layout, cert, upstream_workers),
        "nginx.conf": nginx_stream_conf(folder, layout, cert, workers, nginx_connections),
        "haproxy.cfg": haproxy_conf(folder, layout, cert, workers),
        "pyproxy.conf": pyproxy_conf(folder, layout, cert, workers),
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = os.path.join(folder, name)
        with open(paths[name], "w") as out:
            out.write(text)
    return ConfigFiles(cert, paths["upstream-http.nginx.conf"], paths["nginx.conf"],
                       paths["haproxy.cfg"], paths["pyproxy.conf"])


# --- proxies started for one scenario ---------------------------------------------------------------

SNI_ROUTES = 10_000                       # issue 21: a TLS listener with 10,000 SNI routes...
SNI_CERTIFICATES = 1_000                  # ...and 1,000 certificates (10 names each)
# nginx 1.22's map hash defaults (max_size 2048) are too small for 10,000 names; it says so and exits.
NGINX_MAP_HASH = "map_hash_max_size 32768;\n    map_hash_bucket_size 128;"


def sni_name(index: int) -> str:
    """The server name of SNI route `index`."""
    return f"customer{index}.example.com"


@dataclass(frozen=True)
class ManyCertificates:
    """`count` certificates, each for its own names, in the shapes each server wants."""

    certs: tuple[Certificate, ...]
    names: tuple[tuple[str, ...], ...]    # the names of each certificate, in the same order


def make_many_certificates(folder: str, count: int, names_per_certificate: int,
                           first_name: Callable[[int], str] = sni_name) -> ManyCertificates:
    """`count` self-signed ECDSA P-256 certificates, each with a key of its own and the names
    `first_name(i)` for its `names_per_certificate` consecutive indexes as subjectAltNames. Made with
    the `cryptography` library (the bench extra): 1,000 take about a second, the openssl CLI a minute."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(folder, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    certs, all_names = [], []
    for number in range(count):
        names = tuple(first_name(number * names_per_certificate + k) for k in range(names_per_certificate))
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(number + 1)
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in names]),
                               critical=False)
                .sign(key, hashes.SHA256()))
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        paths = [os.path.join(folder, f"c{number}.{kind}.pem") for kind in ("cert", "key", "combined")]
        # The key alone is private (pyproxy warns otherwise); the combined file is read by nginx's
        # workers, which run as `nobody`, on every handshake.
        for path, content, mode in zip(paths, (cert_pem, key_pem, cert_pem + key_pem), (0o644, 0o600, 0o644),
                                       strict=True):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as out:
                out.write(content)
        certs.append(Certificate(*paths))
        all_names.append(names)
    return ManyCertificates(tuple(certs), tuple(all_names))


def sni_nginx_conf(folder: str, layout: Layout, cert: Certificate, many: ManyCertificates,
                   workers: int, routes: int) -> str:
    """nginx 1.22 terminating TLS with a certificate chosen by SNI among many, and an upstream per
    name. Its stream module has no `server_name` (1.25.5 added it), so the certificate is a variable
    mapped from `$ssl_server_name`; nginx then reads the certificate and key files on every handshake
    (its documentation says so; 1.27.4 added a cache). The alternative, a preread front mapping
    `$ssl_preread_server_name` to one TLS server per certificate on a unix socket, adds a proxy hop
    to every connection: both cost nginx something that pyproxy and HAProxy do not pay."""
    front, up = layout.front("nginx"), layout.upstream
    by_name = {name: c.combined for c, names in zip(many.certs, many.names, strict=True) for name in names}
    certificates = "\n".join(f"        {name} {path};" for name, path in by_name.items())
    upstreams = "\n".join(f"        {sni_name(i)} {LOOPBACK}:{up.http};" for i in range(routes))
    return f"""# nginx stream: TLS terminated, {len(many.certs)} certificates and {routes} names.
{nginx_stream_head(folder, "nginx-sni", workers)}stream {{
    {NGINX_MAP_HASH}
    map $ssl_server_name $sni_certificate {{
        default {cert.combined};
{certificates}
    }}
    map $ssl_server_name $sni_upstream {{
        default {LOOPBACK}:{up.http};
{upstreams}
    }}
    server {{
        listen {LOOPBACK}:{front.sni} ssl reuseport backlog={LISTEN_BACKLOG};
        ssl_certificate $sni_certificate;
        ssl_certificate_key $sni_certificate;
        ssl_protocols {SSL_PROTOCOLS};
        proxy_pass $sni_upstream;
    }}
}}
"""


def sni_haproxy_conf(folder: str, layout: Layout, cert: Certificate, many: ManyCertificates,
                     threads: int, routes: int) -> str:
    """HAProxy terminating TLS with a `crt-list` of the certificates and their names (loaded at
    start, looked up by SNI in a tree) and the backend chosen from a map of every name."""
    front, up = layout.front("haproxy"), layout.upstream
    crt_list = os.path.join(folder, "haproxy-sni.crt-list")
    routes_map = os.path.join(folder, "haproxy-sni.map")
    with open(crt_list, "w") as out:
        for certificate, names in zip(many.certs, many.names, strict=True):
            out.write(f"{certificate.combined} {' '.join(names)}\n")
    with open(routes_map, "w") as out:
        out.writelines(f"{sni_name(i)} be_sni\n" for i in range(routes))
    return f"""# HAProxy: TLS terminated, {len(many.certs)} certificates and {routes} names.
global
    nbthread {threads}
    maxconn 7900
    pidfile {folder}/haproxy-sni.pid
defaults
    mode tcp
    timeout connect 5s
    timeout client {IDLE_TIMEOUT}
    timeout server {IDLE_TIMEOUT}
    backlog {LISTEN_BACKLOG}
frontend fe_sni
    bind {LOOPBACK}:{front.sni} ssl crt {cert.combined} crt-list {crt_list}
    use_backend %[ssl_fc_sni,lower,map({routes_map},be_sni)]
backend be_sni
    server s1 {LOOPBACK}:{up.http}
"""


def sni_pyproxy_conf(folder: str, layout: Layout, cert: Certificate, many: ManyCertificates,
                     workers: int, routes: int) -> str:
    """pyproxy terminating TLS with `certificates` (one context each, chosen by SNI) and one route per
    name (the router's exact-SNI index)."""
    front, up = layout.front("pyproxy"), layout.upstream
    certificates = "".join(f"  - {{cert: {c.cert}, key: {c.key}, snis: [{', '.join(names)}]}}\n"
                           for c, names in zip(many.certs, many.names, strict=True))
    route_lines = "".join(f"      - {{name: r{i}, protocols: [tls], snis: [{sni_name(i)}]}}\n"
                          for i in range(routes))
    return f"""# pyproxy: TLS terminated, {len(many.certs)} certificates and {routes} SNI routes.
{pyproxy_head(folder, "pyproxy-sni", workers)}
stream_listen:
  - {LOOPBACK}:{front.sni} ssl backlog={LISTEN_BACKLOG}

ssl:
  default_certificate: {{cert: {cert.cert}, key: {cert.key}}}

certificates:
{certificates}
services:
  - name: sni
    host: {LOOPBACK}
    port: {up.http}
    connect_timeout: 5s
    routes:
{route_lines}"""


def write_sni_configs(folder: str, layout: Layout, cert: Certificate, workers: int,
                      routes: int = SNI_ROUTES, certificates: int = SNI_CERTIFICATES) -> dict[str, str]:
    """The certificates and each proxy's configuration for the `tls-sni-10k` scenario, in `folder`;
    returns {proxy: config path, "names": a file of every server name, one a line}."""
    many = make_many_certificates(os.path.join(folder, "certs"), certificates, routes // certificates)
    texts = {
        "nginx": ("nginx-sni.conf", sni_nginx_conf(folder, layout, cert, many, workers, routes)),
        "haproxy": ("haproxy-sni.cfg", sni_haproxy_conf(folder, layout, cert, many, workers, routes)),
        "pyproxy": ("pyproxy-sni.conf", sni_pyproxy_conf(folder, layout, cert, many, workers, routes)),
        "names": ("sni-names.txt", "".join(f"{sni_name(i)}\n" for i in range(routes))),
    }
    paths = {}
    for what, (name, text) in texts.items():
        paths[what] = os.path.join(folder, name)
        with open(paths[what], "w") as out:
            out.write(text)
    return paths


def reload_nginx_conf(folder: str, layout: Layout, workers: int, routes: int, tag_port: int) -> str:
    """nginx for the reload scenario: the probe port forwards to `tag_port`; a TLS passthrough port
    routes `routes` server names with `map $ssl_preread_server_name`."""
    front, up = layout.front("nginx"), layout.upstream
    names = "\n".join(f"        {sni_name(i)} {LOOPBACK}:{up.https};" for i in range(routes))
    return f"""# nginx stream for the reload scenario: {routes} SNI routes.
{nginx_stream_head(folder, "nginx-reload", workers)}stream {{
    {NGINX_MAP_HASH}
    map $ssl_preread_server_name $reload_upstream {{
        default {LOOPBACK}:{up.https};
{names}
    }}
    server {{
        listen {LOOPBACK}:{front.reload} reuseport backlog={LISTEN_BACKLOG};
        proxy_pass {LOOPBACK}:{tag_port};
    }}
    server {{
        listen {LOOPBACK}:{front.reload_tls} reuseport backlog={LISTEN_BACKLOG};
        ssl_preread on;
        proxy_pass $reload_upstream;
    }}
}}
"""


def reload_pyproxy_conf(folder: str, layout: Layout, cert: Certificate, workers: int, routes: int,
                        tag_port: int) -> str:
    """pyproxy for the reload scenario. With `routes` = 1, the demo's shape (conf/pyproxy.conf): a
    plain and a TLS listener, one certificate, a route terminating TLS for its name; otherwise
    `routes` TLS passthrough routes by SNI. Either way the probe port forwards to `tag_port`."""
    front, up = layout.front("pyproxy"), layout.upstream
    if routes == 1:
        tls_routes = "      - {name: demo-tls, protocols: [tls], snis: [tls9443.kong.example]}\n"
        certificates = (f"certificates:\n"
                        f"  - {{cert: {cert.cert}, key: {cert.key}, snis: [tls9443.kong.example]}}\n")
    else:
        tls_routes = "".join(f"      - {{name: r{i}, protocols: [tls_passthrough], snis: [{sni_name(i)}]}}\n"
                             for i in range(routes))
        certificates = ""
    return f"""# pyproxy for the reload scenario: {routes} TLS route(s).
{pyproxy_head(folder, "pyproxy-reload", workers)}
stream_listen:
  - {LOOPBACK}:{front.reload} backlog={LISTEN_BACKLOG}
  - {LOOPBACK}:{front.reload_tls} ssl backlog={LISTEN_BACKLOG}

ssl:
  default_certificate: {{cert: {cert.cert}, key: {cert.key}}}
{certificates}
services:
  - name: probe
    host: {LOOPBACK}
    port: {tag_port}
    routes:
      - {{name: probe, protocols: [tcp], destinations: [{{port: {front.reload}}}]}}
  - name: tls
    host: {LOOPBACK}
    port: {up.https}
    routes:
{tls_routes}"""
