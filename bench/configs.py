"""The benchmark's configurations: one port layout, a self-signed certificate, and a config file per server.

Every proxy gets the same four front ports in front of the same upstreams, so a scenario only has to
pick a port. Everything is written into the run's folder; nothing touches /etc.

    base + 0   HTTP upstream (nginx, `return 200 "ok"`)       = "direct" for the plain HTTP scenarios
    base + 1   the same upstream with TLS                     = "direct" for the TLS scenarios
    base + 2   iperf3 server                                  = "direct" for bulk throughput
    base + 3   idle upstream (bench.idle: accepts and holds)
    base + 10*k + {0: plain → HTTP, 1: TLS terminated → HTTP, 2: plain → iperf3, 3: plain → idle}
               for proxy k = 1 (nginx), 2 (haproxy), 3 (pyproxy)
"""

from __future__ import annotations

import os
import subprocess
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


@dataclass(frozen=True)
class FrontPorts:
    """The ports one target listens on, one per kind of traffic."""

    http: int
    https: int
    iperf: int
    idle: int


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
        return FrontPorts(self.base, self.base + 1, self.base + 2, self.base + 3)

    def front(self, target: str) -> FrontPorts:
        """The ports `target` ("direct" or a proxy name) listens on."""
        if target == "direct":
            return self.upstream
        first = self.base + PORT_STRIDE * (PROXIES.index(target) + 1)
        return FrontPorts(first, first + 1, first + 2, first + 3)

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


def nginx_stream_conf(folder: str, layout: Layout, cert: Certificate, workers: int) -> str:
    """nginx's stream module in front of the upstreams (`reuseport`: one accept queue per worker, as
    pyproxy does)."""
    front, up = layout.front("nginx"), layout.upstream
    listen = f"reuseport backlog={LISTEN_BACKLOG}"
    return f"""# nginx stream proxy for the benchmark.
load_module {NGINX_STREAM_MODULE};
worker_processes {workers};
worker_rlimit_nofile {NOFILE};
pid {folder}/nginx.pid;
daemon off;
error_log {folder}/nginx.error.log warn;
events {{ worker_connections 10000; }}   # each proxied session takes two
stream {{
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
{proxy("iperf", front.iperf, up.iperf)}{proxy("idle", front.idle, up.idle)}"""


# The bulk service's upstream connections use CUBIC whatever the host's default: with BBR (this
# machine's default) the proxy -> iperf3 leg is held to BBR's window of about twice bandwidth x
# minimum RTT, a few microseconds on loopback, and data waits in the proxy's send queue whenever the
# receiver is scheduled late (README, Performance). nginx 1.22 and HAProxy 2.6 have no such setting.
# On a host without CUBIC the setting is left out (and the report says which was used).
BULK_CONGESTION = "cubic" if congestion_control_refused("cubic") is None else None
BULK_SERVICE_EXTRA = f"\n    tcp_congestion: {BULK_CONGESTION}" if BULK_CONGESTION else ""


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
worker_processes: {workers}
worker_connections: 16384
pid: {folder}/pyproxy.pid
error_log: {folder}/pyproxy.error.log
log_level: notice
access_log: off

stream_listen:
  - {LOOPBACK}:{front.http} backlog={LISTEN_BACKLOG}
  - {LOOPBACK}:{front.https} ssl backlog={LISTEN_BACKLOG}
  - {LOOPBACK}:{front.iperf} backlog={LISTEN_BACKLOG}
  - {LOOPBACK}:{front.idle} backlog={LISTEN_BACKLOG}

ssl:
  default_certificate: {{cert: {cert.cert}, key: {cert.key}}}

services:
{service("http", up.http, front.http)}\
      - name: https               # terminate TLS (whatever the SNI), forward plain HTTP
        protocols: [tls]
        sources: [{{ip: 127.0.0.0/8}}]
        destinations: [{{port: {front.https}}}]
{service("iperf", up.iperf, front.iperf, BULK_SERVICE_EXTRA)}{service("idle", up.idle, front.idle)}"""


@dataclass(frozen=True)
class ConfigFiles:
    """The paths of everything `write_configs` made."""

    cert: Certificate
    upstream_nginx: str
    nginx: str
    haproxy: str
    pyproxy: str


def write_configs(folder: str, layout: Layout, workers: int, cert_kind: str = "ec",
                  upstream_workers: int = 1) -> ConfigFiles:
    """Write the certificate and every server's configuration into `folder`."""
    os.makedirs(folder, exist_ok=True)
    cert = make_certificate(folder, cert_kind)
    texts = {
        "upstream-http.nginx.conf": nginx_upstream_conf(folder, layout, cert, upstream_workers),
        "nginx.conf": nginx_stream_conf(folder, layout, cert, workers),
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
