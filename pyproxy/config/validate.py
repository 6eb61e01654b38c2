"""The top of the schema: global settings, `stream_listen`, `ssl` and `certificates`.

Kong-shaped entities (upstreams, services, routes, plugins) live in `entities.py`. `build_config` reads
the whole document, reports every problem it finds in `report`, and returns a Config that is only
meaningful when the report has no errors.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import ipaddress
import os
import pwd
import re
import ssl
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from pyproxy.addresses import host_port, is_ip_address, wildcard_addresses
from pyproxy.tls.ocsp import OCSPResponseError, read_response

from . import entities
from .errors import ConfigIssue, Invalid, describe
from .loader import Document
from .model import (
    LOG_LEVELS,
    WORKER_SCHED_POLICIES,
    Certificate,
    Config,
    DnsSettings,
    GatewaySettings,
    KubernetesSettings,
    Listen,
    SSLSettings,
)
from .sections import Place, Report, Section
from .tlsfiles import DecodedCertificate, certificate_names
from .values import (
    Converter,
    did_you_mean,
    format_duration,
    in_folder,
    integer,
    one_of,
    parse_address,
    parse_bool,
    parse_duration,
    parse_host_port,
    parse_log_format,
    parse_port,
    parse_sni,
    parse_text,
    positive_duration,
)

if TYPE_CHECKING:
    from pyproxy.plugins import Plugin as PluginClass

TOP_LEVEL_KEYS = (
    "worker_processes", "worker_connections", "worker_shutdown_timeout", "worker_sched_policy",
    "proxy_protocol_timeout", "reload_coalesce", "pid",
    "plugin_modules", "user", "status_listen",
    "error_log", "log_level", "access_log", "access_log_format", "stream_listen", "ssl", "certificates",
    "upstreams", "services", "plugins", "declarative_config", "gateway", "admin_listen", "admin_state",
    "dns_resolver", "dns_hostsfile", "dns_valid_ttl", "dns_stale_ttl", "dns_not_found_ttl", "dns_error_ttl",
    "dns_strict",
    "admin_token",
)
SSL_KEYS = ("protocols", "ciphers", "default_certificate", "client_certificate", "preread_timeout",
            "handshake_timeout", "alpn")
CERTIFICATE_KEYS = ("cert", "key", "snis", "ocsp_response", "listen", "wildcard_depth")
WILDCARD_DEPTHS = ("one", "any")
GATEWAY_KEYS = ("paths", "address", "runtime_dir", "controller_name", "kubernetes")
KUBERNETES_KEYS = ("kubeconfig", "context", "in_cluster", "namespaces", "lease_name", "lease_namespace",
                   "lease_duration", "lease_retry")
# The objects read from an API server (pyproxy.gateway.cluster), in gateway.runtime_dir.
CLUSTER_SNAPSHOT = "cluster-objects.json"
# What the Gateway API manifests source adds to the pyproxy file (pyproxy.gateway.source).
FRAGMENT_KEYS = ("stream_listen", "certificates", "upstreams", "services")
TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
OBSOLETE_TLS_VERSIONS = ("TLSv1", "TLSv1.1")
LISTEN_FLAGS = ("ssl", "proxy_protocol", "reuseport", "backlog", "udp")
ADMIN_STATE = "admin_state.yml"   # the Admin API's entities, beside the file, unless admin_state says
ADMIN_CACHE = "admin_state.cache.yml"   # with admin_state: postgres://…, the last entities it gave
MAX_WORKER_PROCESSES = 1024
C_INT_MAX = 2**31 - 1      # counts that reach C calls (listen's backlog, rlimits) must fit a C int


def validate_document(path: str, document: Document,
                      warn: Callable[[str], None] | None) -> tuple[Config | None, list[ConfigIssue]]:
    """The Config of `document`, read from the file at `path` (meaningful only without errors), and
    the errors, in no particular order; warnings are passed to `warn` in file order."""
    report = Report(path)
    config = build_config(report, document.root)
    if warn is not None:
        for warning in sorted(report.warnings, key=lambda issue: issue.line):
            warn(str(warning))
    errors = document.issues + [error for error in report.errors
                                if not follows_from(error, document.refused)]
    return config, errors


def follows_from(error: ConfigIssue, refused: set[str]) -> bool:
    """True if `error` is about a value the loader already refused (it reads as null to the validator)."""
    return any(error.key == path or error.key.startswith((path + ".", path + "["))
               for path in refused if path)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a file is read and validated.

    Loading makes millions of objects and keeps them all until the end, and each collection of the
    oldest generation walks every one of them: a 5 MB file took three times as long with the collector
    running. What loading leaves behind is freed by reference counting or at the next collection.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def build_config(report: Report, document: object) -> Config | None:
    """The Config described by `document` (what the loader read from `report.file`).

    Every problem goes to `report`; the result is None when the document is not even a mapping.
    """
    root = report.section(Place("", 1), document, TOP_LEVEL_KEYS)
    if root is None:
        return None
    base = os.path.dirname(report.file)
    defaults = Config(path=report.file)

    gateway = root.nested("gateway", lambda r, p, v: _gateway(r, p, v, base))
    stream_listen = _stream_listen(report, root, listeners_elsewhere=gateway is not None)
    status_listen = root.get("status_listen", parse_address)
    if status_listen is not None:
        _check_status_listen(report, root, status_listen, stream_listen)
    admin_listen = root.get("admin_listen", _admin_listen)
    admin_state = root.get("admin_state", lambda value: _admin_state(base, value),
                           os.path.join(base, ADMIN_STATE) if admin_listen is not None else None)
    ssl_settings = root.nested("ssl", lambda r, p, v: _ssl_settings(r, p, v, base), SSLSettings())
    certificates = _certificates(report, root, base, stream_listen)
    upstreams = entities.read_upstreams(report, root)
    tls = entities.TLSContext(
        can_terminate=bool(certificates) or ssl_settings.default_certificate is not None,
        has_ssl_listener=any(listen.ssl for listen in stream_listen),
        asks_client_certificate=ssl_settings.client_certificate is not None,
    )
    services = entities.read_services(report, root, base, upstreams, tls)
    plugin_modules, plugin_types = _plugin_modules(report, root)
    plugins = entities.read_plugins(report, root, services, plugin_types)

    return Config(
        path=report.file,
        worker_processes=root.get("worker_processes", _worker_processes, defaults.worker_processes),
        worker_connections=root.get("worker_connections", integer(1, C_INT_MAX), defaults.worker_connections),
        worker_shutdown_timeout=root.get("worker_shutdown_timeout", parse_duration,
                                         defaults.worker_shutdown_timeout),
        worker_sched_policy=root.get("worker_sched_policy", one_of(WORKER_SCHED_POLICIES),
                                     defaults.worker_sched_policy),
        proxy_protocol_timeout=root.get("proxy_protocol_timeout", positive_duration,
                                        defaults.proxy_protocol_timeout),
        reload_coalesce=root.get("reload_coalesce", parse_duration, defaults.reload_coalesce),
        pid=root.get("pid", pid_file(base), default_pid_path(base)),
        user=root.get("user", _existing_user, defaults.user),
        status_listen=status_listen,
        error_log=root.get("error_log", _error_log(base), defaults.error_log),
        log_level=root.get("log_level", one_of(LOG_LEVELS), defaults.log_level),
        access_log=root.get("access_log", _file_or_words(base, "stdout", "stderr", off=True),
                            defaults.access_log),
        access_log_format=root.get("access_log_format", parse_log_format, defaults.access_log_format),
        stream_listen=stream_listen,
        ssl=ssl_settings,
        certificates=certificates,
        upstreams=upstreams,
        services=services,
        plugins=plugins,
        plugin_modules=plugin_modules,
        plugin_types=plugin_types,
        declarative_config=root.get("declarative_config", lambda value: in_folder(base, value)),
        gateway=gateway,
        admin_listen=admin_listen,
        admin_state=os.path.join(base, ADMIN_CACHE) if is_database_url(admin_state) else admin_state,
        admin_database=admin_state if is_database_url(admin_state) else None,
        admin_token=root.get("admin_token", _admin_token),
        hostnames=tuple(report.hostnames),
        dns=_dns_settings(report, root, base),
    )


# --- global settings --------------------------------------------------------------------------------

def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

    `os.cpu_count()` counts the host's CPUs; in a container limited to 2 CPUs on a 64-core node
    that would start 64 workers. cgroup v2 says `cpu.max` = "QUOTA PERIOD" (or "max PERIOD");
    cgroup v1 says cpu.cfs_quota_us (-1 for none) and cpu.cfs_period_us.
    """
    cpus = len(os.sched_getaffinity(0)) or 1
    quota = period = None
    try:
        with open(os.path.join(cgroup_root, "cpu.max")) as fh:
            fields = fh.read().split()
        if len(fields) == 2 and fields[0] != "max":
            quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError):
        try:
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_quota_us")) as fh:
                quota = int(fh.read())
            with open(os.path.join(cgroup_root, "cpu", "cpu.cfs_period_us")) as fh:
                period = int(fh.read())
        except (OSError, ValueError):
            quota = None
    if quota is not None and quota > 0 and period:
        cpus = min(cpus, max(1, -(-quota // period)))      # ceil: 1.5 CPUs → 2 workers
    return cpus


def _plugin_modules(report: Report, root: Section) -> tuple[tuple[str, ...], dict[str, type[PluginClass]]]:
    """`plugin_modules` (Python modules that register plugins) and the plugins the file may name: the
    built-ins and what those modules register, each imported afresh for this load, before plugin
    names are checked. A module that fails to import is an error at its line; nothing of it is used."""
    from pyproxy.plugins import REGISTRY, load_plugin_module  # here: the plugins import the model

    names = []
    types = dict(REGISTRY)
    folder = os.path.dirname(report.file)      # a plugin file may sit beside the configuration
    for place, value in root.items("plugin_modules"):
        name = report.convert(place, value, parse_text)
        if name is None:
            continue
        try:
            types.update(load_plugin_module(name, folder))
        except Exception as exc:         # any failure of someone else's module is a config error here
            report.error(place, f"cannot import plugin module {name!r}: {exc.__class__.__name__}: {exc}")
            continue
        names.append(name)
    return tuple(names), types


def _worker_processes(value: object) -> int:
    if value == "auto":
        return usable_cpus()
    if isinstance(value, str):
        raise Invalid(f"expected auto or a number of processes, got {describe(value)}")
    return integer(1, MAX_WORKER_PROCESSES)(value)


def _existing_user(value: object) -> str:
    name = parse_text(value)
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise Invalid(f"no such user: {describe(name)}") from None
    return name


def _file_or_words(base: str, *words: str, off: bool = False,
                   folder_must_exist: bool = True) -> Converter[str | None]:
    """A converter for a file we write (pid, logs): one of `words` kept as is, `off` → None, or a path
    whose folder must exist (unless `folder_must_exist` is False)."""
    def convert(value: object) -> str | None:
        if off and (value is False or value == "off"):
            return None
        if value in words:
            return value
        path = in_folder(base, value)
        folder = os.path.dirname(path)
        if folder_must_exist and not os.path.isdir(folder):
            raise Invalid(f"the folder {folder} does not exist")
        if os.path.isdir(path):
            raise Invalid(f"{path} is a directory; name a file in it")
        return path
    return convert


def default_pid_path(base: str) -> str:
    """Like nginx, there is always a pid file unless `pid: off`: `pyproxy.pid` beside the config."""
    return os.path.join(base, "pyproxy.pid")


def pid_file(base: str) -> Converter[str | None]:
    """A converter for `pid`: `off` → None, else an absolute path. Like nginx, `-t` does not insist
    that its folder exists yet (systemd's RuntimeDirectory= makes /run/pyproxy only at start);
    the master says so plainly if it cannot write the file."""
    return _file_or_words(base, off=True, folder_must_exist=False)


def _error_log(base: str) -> Converter[str]:
    write_file = _file_or_words(base, "stderr")

    def convert(value: object) -> str:
        # nginx has no `error_log off` (it would write a file named "off"); we refuse rather than guess.
        if value is False or value in ("off", "stdout"):
            raise Invalid(f"error_log goes to stderr or to a file, not {describe(value)}")
        path = write_file(value)
        assert path is not None, "only `off` gives None, and error_log does not take it"
        return path
    return convert


# --- stream_listen ----------------------------------------------------------------------------------

def _stream_listen(report: Report, root: Section, listeners_elsewhere: bool = False) -> tuple[Listen, ...]:
    """The entries of `stream_listen`; none is an error unless another source may add listeners."""
    place = root.place_of("stream_listen")
    raw = root.mapping.get("stream_listen")
    entries: list[tuple[Place, object]]
    if isinstance(raw, (str, int)) and not isinstance(raw, bool):
        # Kong writes stream_listen as one comma-separated string.
        entries = [(Place(f"stream_listen[{index}]", place.line), text)
                   for index, text in enumerate(str(raw).split(","))]
    else:
        entries = root.items("stream_listen")
    if (raw is None or raw == []) and not listeners_elsewhere:
        report.error(place, "nothing to listen on: add at least one stream_listen address")
    listens: list[Listen] = []
    lines_by_address: dict[tuple[str, int, bool], int] = {}
    for entry_place, value in entries:
        listen = _listen(report, entry_place, value)
        if listen is None:
            continue
        if listen.key in lines_by_address:
            report.error(entry_place, f"{listen} is already listed at line {lines_by_address[listen.key]}")
            continue
        lines_by_address[listen.key] = entry_place.line
        listens.append(listen)
    return tuple(listens)


def _listen(report: Report, place: Place, value: object) -> Listen | None:
    """One `ADDR:PORT [ssl] [proxy_protocol] [backlog=N] [reuseport]` or `ADDR:PORT udp [reuseport]`
    entry."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.split():
        report.error(place,
                     f"expected 'ADDRESS:PORT [ssl] [proxy_protocol] [backlog=N]', got {describe(value)}")
        return None
    address, *words = value.split()
    host_port = report.convert(place, address, parse_address)
    flags: dict[str, int | None] = {}
    for word in words:
        name, equals, argument = word.partition("=")
        if name not in LISTEN_FLAGS or (name == "backlog") != bool(equals):
            report.error(place, f"unknown listen flag {describe(word)}{did_you_mean(name, LISTEN_FLAGS)}")
        elif name in flags:
            report.error(place, f"listen flag {name!r} is given twice")
        elif name == "backlog":
            number = int(argument) if re.fullmatch(r"[0-9]{1,10}", argument) else argument
            flags[name] = report.convert(place, number, integer(1, C_INT_MAX))
        else:
            flags[name] = True
    if "reuseport" in flags:
        report.warn(place, "reuseport is always on in pyproxy; the flag is ignored")
    if "udp" in flags:
        for name in ("ssl", "proxy_protocol", "backlog"):
            if name in flags:
                report.error(place, f"listen flag {name!r} is for TCP listeners, not with udp")
    backlog = flags.get("backlog", Listen("", 0).backlog)
    if host_port is None or backlog is None:
        return None
    host, port = host_port
    return Listen(host=host, port=port, ssl="ssl" in flags, proxy_protocol="proxy_protocol" in flags,
                  backlog=backlog, line=place.line, udp="udp" in flags)


def _check_status_listen(report: Report, root: Section, address: tuple[str, int],
                         stream_listen: tuple[Listen, ...]) -> None:
    place = root.place_of("status_listen")
    if any((listen.host, listen.port) == address and not listen.udp for listen in stream_listen):
        report.error(place, "the status address is also a stream_listen address")


# --- gateway ----------------------------------------------------------------------------------------

def _gateway(report: Report, place: Place, value: object, base: str) -> GatewaySettings | None:
    """The `gateway` key: the manifests to read (they must exist) and how to serve them."""
    section = report.section(place, value, GATEWAY_KEYS)
    if section is None:
        return None
    defaults = GatewaySettings(paths=())
    paths = []
    kubernetes = section.nested("kubernetes", lambda r, p, v: _kubernetes(r, p, v, base))
    if not section.has("paths") and not section.has("kubernetes"):
        report.error(section.place_of("paths"),
                     "required key is missing: list the manifest files and folders")
    for item_place, item in _one_or_more(report, section, "paths"):
        path = report.convert(item_place, item, lambda text: in_folder(base, text))
        if path is not None and not os.path.exists(path):
            report.error(item_place, f"no such file or folder: {path}")
        elif path is not None:
            paths.append(path)
    addresses = []
    for item_place, item in _one_or_more(report, section, "address"):
        address = report.convert(item_place, item, _ip_address)
        if address is not None:
            addresses.append(address)
    runtime_dir = section.get("runtime_dir", lambda text: in_folder(base, text),
                              os.path.join(base, "gateway-runtime"))
    if kubernetes is not None:
        paths.append(os.path.join(runtime_dir, CLUSTER_SNAPSHOT))
    return GatewaySettings(
        paths=tuple(paths),
        addresses=tuple(addresses) or wildcard_addresses(),
        runtime_dir=runtime_dir,
        controller_name=section.get("controller_name", _controller_name, defaults.controller_name),
        line=place.line,
        kubernetes=kubernetes,
    )


def _kubernetes(report: Report, place: Place, value: object, base: str) -> KubernetesSettings | None:
    """`gateway.kubernetes`: where the API server is (a kubeconfig or the Pod's service account),
    which namespaces to watch, and the Lease that elects the replica writing statuses."""
    section = report.section(place, value, KUBERNETES_KEYS)
    if section is None:
        return None
    defaults = KubernetesSettings()
    if importlib.util.find_spec("kubernetes") is None:
        report.error(place, "reading from an API server needs the Kubernetes client: "
                            "pip install 'pyproxy[kubernetes]'")
    kubeconfig = section.get("kubeconfig", lambda text: in_folder(base, text))
    in_cluster = section.get("in_cluster", parse_bool, False)
    if (kubeconfig is None) == (not in_cluster):
        report.error(place, "expected either kubeconfig: FILE or in_cluster: true")
    elif kubeconfig is not None and not os.path.isfile(kubeconfig):
        report.error(section.place_of("kubeconfig"), f"no such file: {kubeconfig}")
    if in_cluster and section.has("context"):
        report.error(section.place_of("context"),
                     "a context names a kubeconfig's cluster: not with in_cluster")
    namespaces = []
    for item_place, item in _one_or_more(report, section, "namespaces"):
        namespace = report.convert(item_place, item, _object_name)
        if namespace is not None:
            namespaces.append(namespace)
    duration = section.get("lease_duration", positive_duration, defaults.lease_duration)
    retry = section.get("lease_retry", positive_duration, min(defaults.lease_retry, duration / 3))
    if retry >= duration and section.has("lease_retry"):
        report.error(section.place_of("lease_retry"),
                     f"must be shorter than lease_duration ({format_duration(duration)}): a leader "
                     f"renews the Lease every lease_retry")
    return KubernetesSettings(
        kubeconfig=kubeconfig if not in_cluster else None,
        context=section.get("context", parse_text),
        namespaces=tuple(namespaces),
        lease_name=section.get("lease_name", _object_name, defaults.lease_name),
        lease_namespace=section.get("lease_namespace", _object_name),
        lease_duration=duration,
        lease_retry=retry,
    )


def _object_name(value: object) -> str:
    """A Kubernetes object or namespace name (RFC 1123 subdomain)."""
    text = parse_text(value)
    label = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
    if len(text) > 253 or not re.fullmatch(rf"{label}(\.{label})*", text):
        raise Invalid("expected a Kubernetes name (lower case letters, digits, '-' and '.'), "
                      f"got {describe(text)}")
    return text


def _one_or_more(report: Report, section: Section, key: str) -> list[tuple[Place, object]]:
    """The items of a key that takes a list, or one value written alone."""
    value = section.mapping.get(key)
    if value is None or isinstance(value, list):
        return section.items(key)
    return [(section.place_of(key), value)]


def _dns_settings(report: Report, root: Section, base: str) -> DnsSettings:
    """The `dns_*` keys (Kong's names and meanings; durations are written with units here)."""
    defaults = DnsSettings()
    servers = [report.convert(place, value, _nameserver)
               for place, value in _one_or_more(report, root, "dns_resolver")]
    return DnsSettings(
        resolver=tuple(server for server in servers if server is not None),
        hostsfile=root.get("dns_hostsfile", _file_or_off(base), defaults.hostsfile),
        valid_ttl=root.get("dns_valid_ttl", _duration_or_off, defaults.valid_ttl),
        stale_ttl=root.get("dns_stale_ttl", parse_duration, defaults.stale_ttl),
        not_found_ttl=root.get("dns_not_found_ttl", parse_duration, defaults.not_found_ttl),
        error_ttl=root.get("dns_error_ttl", parse_duration, defaults.error_ttl),
        strict=root.get("dns_strict", parse_bool, defaults.strict),
    )


def _nameserver(value: object) -> tuple[str, int]:
    """A DNS server as Kong's dns_resolver writes it: `IP` or `IP:PORT` (`[IPv6]:PORT`); port 53 if
    left out."""
    host, port = parse_host_port(value, 53)
    if not is_ip_address(host):
        raise Invalid(f"expected the IP address of a DNS server (IP or IP:PORT), got {describe(value)}")
    return host, port


def _file_or_off(base: str) -> Converter[str | None]:
    def convert(value: object) -> str | None:
        return None if value is False or value == "off" else in_folder(base, value)
    return convert


def _duration_or_off(value: object) -> float | None:
    return None if value is False or value == "off" else positive_duration(value)


def _ip_address(value: object) -> str:
    """A literal IP address, normalised (`[::]` and `0::0` are `::`)."""
    try:
        return str(ipaddress.ip_address(parse_text(value).strip("[]")))
    except ValueError:
        raise Invalid(f"expected an IP address, got {describe(value)}") from None


def _controller_name(value: object) -> str:
    """A GatewayClass controllerName: a domain-prefixed path, `example.net/gateway-controller`."""
    text = parse_text(value)
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9/\-._~%!$&'()*+,;=:]+", text):
        raise Invalid("expected a domain-prefixed path like gateway.pyproxy.dev/controller, "
                      f"got {describe(text)}")
    return text


def validate_fragment(path: str, document: Document, base: Config) -> tuple[Config | None, list[ConfigIssue]]:
    """The entities another source writes in this file's schema (`FRAGMENT_KEYS` only), as a Config
    fragment to merge into `base` (the pyproxy file's), and the errors. TLS routes may rely on the
    certificates and ssl listeners of `base`."""
    report = Report(path)
    root = report.section(Place("", 1), document.root, FRAGMENT_KEYS)
    if root is None:
        return None, document.issues + report.errors
    stream_listen = tuple(listen for place, value in root.items("stream_listen")
                          if (listen := _listen(report, place, value)) is not None)
    certificates = _certificates(report, root, os.path.dirname(path), base.stream_listen + stream_listen)
    upstreams = entities.read_upstreams(report, root)
    tls = entities.TLSContext(
        can_terminate=bool(certificates or base.certificates) or base.ssl.default_certificate is not None,
        has_ssl_listener=any(listen.ssl for listen in base.stream_listen + stream_listen),
    )
    services = entities.read_services(report, root, os.path.dirname(path), upstreams, tls)
    fragment = Config(path=path, stream_listen=stream_listen, certificates=certificates, upstreams=upstreams,
                      services=services, hostnames=tuple(report.hostnames))
    return fragment, document.issues + report.errors


def _admin_listen(value: object) -> tuple[str, int]:
    """`ADDRESS:PORT [public]`, a port alone meaning loopback. The Admin API has no authentication
    (neither has Kong's), so an address other than loopback needs the word `public` after it."""
    text = value.strip() if isinstance(value, str) else value
    public = False
    if isinstance(text, str) and text.endswith(" public"):
        text, public = text[:-len(" public")].strip(), True
    if isinstance(text, int) or (isinstance(text, str) and text.isascii() and text.isdigit()):
        text = f"127.0.0.1:{text}"
    host, port = parse_address(text)
    if not public and not ipaddress.ip_address(host).is_loopback:
        raise Invalid(f"{host_port(host, port)} is not a loopback address, and the Admin API has no "
                      f"authentication: write `{host_port(host, port)} public` to serve it there anyway")
    return host, port


def _admin_token(value: object) -> str:
    """The token every Admin API request must carry in `Kong-Admin-Token` (Kong Enterprise's header)."""
    text = parse_text(value)
    if len(text) < 16 or not text.isprintable() or text != text.strip():
        raise Invalid("expected at least 16 printable characters, without spaces around them (a secret "
                      "nobody can guess: `openssl rand -hex 24` makes one)")
    return text


def is_database_url(value: object) -> bool:
    """admin_state names a PostgreSQL database, not a file."""
    return isinstance(value, str) and value.startswith(("postgres://", "postgresql://"))


def _admin_state(base: str, value: object) -> str:
    """A file (relative to the pyproxy file's folder) or `postgres://[USER[:PASSWORD]@]HOST[:PORT]/DB`
    (libpq's URL, `?param=` included)."""
    text = parse_text(value).strip()
    if not is_database_url(text):
        return in_folder(base, text)
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise Invalid(f"{redacted(text)!r}: the port is not one from 1 to 65535")
    if not parts.path.strip("/") and "dbname=" not in parts.query:
        raise Invalid(f"{redacted(text)!r} names no database: postgres://USER@HOST:PORT/DATABASE")
    if importlib.util.find_spec("psycopg") is None:
        raise Invalid(f"{redacted(text)!r}: keeping the entities in PostgreSQL needs psycopg, which "
                      "`pip install 'pyproxy[postgres]'` installs")
    return text


def redacted(url: str) -> str:
    """A database URL as logs and errors show it: without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rpartition("@")[2]))


# --- ssl and certificates ---------------------------------------------------------------------------

def _ssl_settings(report: Report, place: Place, value: object, base: str) -> SSLSettings:
    defaults = SSLSettings()
    section = report.section(place, value, SSL_KEYS)
    if section is None:
        return defaults
    default_certificate = section.nested("default_certificate",
                                         lambda r, p, v: entities.read_cert_key(r, p, v, base))
    return SSLSettings(
        protocols=section.nested("protocols", _tls_versions, defaults.protocols),
        ciphers=section.get("ciphers", _cipher_list, defaults.ciphers),
        default_certificate=default_certificate,
        client_certificate=section.nested("client_certificate",
                                          lambda r, p, v: entities.read_client_certificate(r, p, v, base)),
        preread_timeout=section.get("preread_timeout", positive_duration, defaults.preread_timeout),
        handshake_timeout=section.get("handshake_timeout", positive_duration, defaults.handshake_timeout),
        alpn=entities.read_alpn(report, section.place_of("alpn"), section.mapping["alpn"])
        if section.has("alpn") else defaults.alpn,
    )


def _tls_versions(report: Report, place: Place, value: object) -> tuple[str, ...]:
    versions: dict[str, None] = {}
    items = report.items(place, value)
    for item_place, item in items:
        version = report.convert(item_place, item, one_of(TLS_VERSIONS))
        if version in OBSOLETE_TLS_VERSIONS:
            report.warn(item_place,
                        f"{version} is obsolete and insecure; clients should use TLSv1.2 or later")
        if version is not None:
            versions[version] = None
    if isinstance(value, list) and not items:
        report.error(place, "list at least one TLS version")
    return tuple(versions) or SSLSettings().protocols


def _cipher_list(value: object) -> str:
    ciphers = parse_text(value)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
    except ssl.SSLError:
        raise Invalid(f"OpenSSL accepts no cipher from {describe(ciphers)}") from None
    return ciphers


def _certificates(report: Report, root: Section, base: str,
                  stream_listen: tuple[Listen, ...]) -> tuple[Certificate, ...]:
    """The `certificates`; each `listen` entry must name some ssl listener of `stream_listen`."""
    certificates: list[Certificate] = []
    # SNI → (line, certificate) of the certificates serving it so far
    owners: dict[str, list[tuple[int, Certificate]]] = {}
    ssl_listeners = [listen for listen in stream_listen if listen.ssl]
    for place, value in root.items("certificates"):
        section = report.section(place, value, CERTIFICATE_KEYS)
        if section is None:
            continue
        files = entities.certificate_files(report, section, base)
        if section.has("snis") and section.mapping["snis"] != []:
            snis = entities.read_snis(report, section.place_of("snis"), section.mapping["snis"])
        elif files is not None:
            snis = _names_inside(report, section.place_of("cert"), files[2])
        else:
            snis = []
        scope = Certificate(cert="", key="", listen=_certificate_listen(report, section, ssl_listeners))
        for sni_place, sni in snis:
            others = owners.setdefault(sni, [])
            first = next((line for line, other in others if other.competes_with(scope)), None)
            if first is not None:
                on = " on a listener both serve" if scope.listen else ""
                report.error(sni_place, f"server name {sni!r} is already served{on} by the certificate "
                                        f"at line {first}")
            others.append((place.line, scope))
        ocsp = section.get("ocsp_response", lambda v: _ocsp_response_file(base, v))
        depth = section.get("wildcard_depth", one_of(WILDCARD_DEPTHS), "one")
        if files is not None:
            unique_snis = tuple(dict.fromkeys(sni for _, sni in snis))
            certificates.append(Certificate(cert=files[0], key=files[1], snis=unique_snis,
                                            ocsp_response=ocsp, listen=scope.listen, wildcard_depth=depth))
    return tuple(certificates)


def _certificate_listen(report: Report, section: Section,
                        ssl_listeners: list[Listen]) -> tuple[tuple[str | None, int], ...]:
    """A certificate's `listen`: `PORT` (every ssl listener on it) or `ADDRESS:PORT` entries."""
    entries: dict[tuple[str | None, int], None] = {}
    for place, value in section.items("listen"):
        entry = report.convert(place, value, _listen_entry)
        if entry is None:
            continue
        host, port = entry
        if not any(listen.port == port and host in (None, listen.host) for listen in ssl_listeners):
            report.error(place, f"no ssl listener in stream_listen is on {host_port(host or '*', port)}")
        entries[entry] = None
    if section.mapping.get("listen") == []:
        report.error(section.place_of("listen"), "list at least one listener (without listen: every one)")
    return tuple(entries)


def _listen_entry(value: object) -> tuple[str | None, int]:
    """`PORT` (host None: every address) or `ADDRESS:PORT` as stream_listen writes it."""
    if (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and value.strip().isascii() and value.strip().isdigit()):
        return None, parse_port(value)
    return parse_address(value)


def _ocsp_response_file(base: str, value: object) -> str:
    """An OCSP response file that is there and DER (it is read again whenever it changes)."""
    path = in_folder(base, value)
    try:
        read_response(path)
    except OCSPResponseError as problem:
        raise Invalid(str(problem)) from None
    return path


def _names_inside(report: Report, place: Place, decoded: DecodedCertificate) -> list[tuple[Place, str]]:
    names = []
    for name in certificate_names(decoded):
        try:
            names.append((place, parse_sni(name)))
        except Invalid:
            report.warn(place, f"the certificate name {name!r} is not a server name; ignored")
    if not names:
        report.error(place, "the certificate names no host (no DNS subjectAltName or CN): list its snis")
    return names
