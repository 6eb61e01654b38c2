"""A Config written back in the file's own shape: `pyproxy -T`, and any export of the running configuration.

`dump_config(config)` gives plain data (dicts, lists, strings, numbers, bytes) that, written as YAML, loads
into an equal Config: every key is one the file takes, every value is in the form the file writes it
(durations with units, addresses as text, `off` for what is switched off), every default is filled in
and every path is absolute, so the dump loads from any folder. What the loader works out (lines, resolved
addresses, route indexes) is left out: it is worked out again when the dump is loaded.
"""

from __future__ import annotations

from typing import Any

import yaml

from pyproxy.addresses import host_port

from . import model
from .values import format_duration

# A mapping of the dump: plain data (str, int, bool, bytes, lists and such mappings), as YAML writes it.
Mapping = dict[str, Any]


def dump_config(config: model.Config) -> Mapping:
    """The configuration as the document a user would write for it (see the module's docstring)."""
    document = {
        "worker_processes": config.worker_processes,
        "worker_connections": config.worker_connections,
        "worker_shutdown_timeout": format_duration(config.worker_shutdown_timeout),
        "worker_sched_policy": config.worker_sched_policy,
        "proxy_protocol_timeout": format_duration(config.proxy_protocol_timeout),
        "reload_coalesce": format_duration(config.reload_coalesce),
        "pid": _off_if_none(config.pid),
        "user": config.user,
        "status_listen": host_port(*config.status_listen) if config.status_listen else None,
        "error_log": config.error_log,
        "log_level": config.log_level,
        "access_log": _off_if_none(config.access_log),
        "access_log_format": config.access_log_format,
        "plugin_modules": list(config.plugin_modules),
        "stream_listen": [_listen(listen) for listen in config.stream_listen],
        "ssl": _ssl(config.ssl),
        "certificates": [_certificate(certificate) for certificate in config.certificates],
        "upstreams": [_upstream(upstream) for upstream in config.upstreams],
        "services": [_service(service) for service in config.services],
        "plugins": [_plugin(plugin) for plugin in config.plugins],
        "gateway": _gateway(config.gateway) if config.gateway is not None else None,
        **_dns(config.dns),
    }
    return _without_nones(document)


def _dns(dns: model.DnsSettings) -> Mapping:
    return {
        "dns_resolver": [host_port(*server) for server in dns.resolver],
        "dns_hostsfile": _off_if_none(dns.hostsfile),
        "dns_valid_ttl": format_duration(dns.valid_ttl) if dns.valid_ttl is not None else "off",
        "dns_stale_ttl": format_duration(dns.stale_ttl),
        "dns_not_found_ttl": format_duration(dns.not_found_ttl),
        "dns_error_ttl": format_duration(dns.error_ttl),
        "dns_strict": dns.strict,
    }


def config_as_yaml(config: model.Config) -> str:
    """`pyproxy -T`'s output: dump_config as YAML, headed by a comment naming the file it came from."""
    header = (f"# pyproxy -T: the effective configuration of {config.path} (defaults "
              "filled in, paths absolute)\n")
    # Wide lines: a long value (access_log_format) stays on one line, where grep finds it.
    return header + yaml.safe_dump(dump_config(config), sort_keys=False, default_flow_style=False,
                                   width=1 << 16)


def _without_nones(mapping: Mapping) -> Mapping:
    """`mapping` without its unset optional keys (absent and null mean the same to the loader)."""
    return {key: value for key, value in mapping.items() if value is not None}


def _off_if_none(path: str | None) -> str:
    # null would mean "the default", which for `pid` is a file: a switched-off setting is written `off`.
    return "off" if path is None else path


def _listen(listen: model.Listen) -> str:
    if listen.udp:
        return str(listen)          # `ADDRESS:PORT udp`: a datagram socket has no backlog
    flags = [flag for flag, on in (("ssl", listen.ssl), ("proxy_protocol", listen.proxy_protocol)) if on]
    return " ".join([str(listen), *flags, f"backlog={listen.backlog}"])


def _gateway(settings: model.GatewaySettings) -> Mapping:
    kubernetes = settings.kubernetes
    # With an API server, `paths` ends with the snapshot of its objects, which validation adds.
    paths = settings.paths[:-1] if kubernetes is not None else settings.paths
    return _without_nones({
        "paths": list(paths) or None, "address": list(settings.addresses),
        "runtime_dir": settings.runtime_dir, "controller_name": settings.controller_name,
        "kubernetes": _without_nones({
            "kubeconfig": kubernetes.kubeconfig, "context": kubernetes.context,
            "in_cluster": True if kubernetes.kubeconfig is None else None,
            "namespaces": list(kubernetes.namespaces) or None, "lease_name": kubernetes.lease_name,
            "lease_namespace": kubernetes.lease_namespace,
            "lease_duration": format_duration(kubernetes.lease_duration),
            "lease_retry": format_duration(kubernetes.lease_retry)}) if kubernetes is not None else None})


def _ssl(settings: model.SSLSettings) -> Mapping:
    return _without_nones({
        "protocols": list(settings.protocols),
        "ciphers": settings.ciphers,
        "default_certificate": (_cert_key(settings.default_certificate) if settings.default_certificate
                                else None),
        "client_certificate": (_client_certificate(settings.client_certificate)
                               if settings.client_certificate else None),
        "preread_timeout": format_duration(settings.preread_timeout),
        "handshake_timeout": format_duration(settings.handshake_timeout),
        "alpn": list(settings.alpn) if settings.alpn else None,
    })


def _cert_key(files: model.CertKey) -> Mapping:
    return {"cert": files.cert, "key": files.key}


def _client_certificate(client: model.ClientCertificate) -> Mapping:
    return _without_nones({"ca": client.ca, "verify": client.verify, "depth": client.depth,
                           "crl": client.crl})


def _certificate(certificate: model.Certificate) -> Mapping:
    # The SNIs the loader settled on (those written, or the certificate's own names), written out.
    return {"cert": certificate.cert, "key": certificate.key, "snis": list(certificate.snis),
            **({"ocsp_response": certificate.ocsp_response} if certificate.ocsp_response else {}),
            **({"listen": [host_port(host, port) if host is not None else port
                           for host, port in certificate.listen]} if certificate.listen else {}),
            **({"wildcard_depth": certificate.wildcard_depth} if certificate.wildcard_depth != "one" else {})}


def _upstream(upstream: model.Upstream) -> Mapping:
    return _without_nones({
        "name": upstream.name,
        "algorithm": upstream.algorithm,
        "hash_on": upstream.hash_on,
        "healthchecks": {
            "active": _active_healthcheck(upstream.healthchecks.active),
            "passive": _passive_healthcheck(upstream.healthchecks.passive),
        },
        "targets": [_target(target) for target in upstream.targets],
        "queue": ({"size": upstream.queue.size, "timeout": format_duration(upstream.queue.timeout)}
                  if upstream.queue.size else None),
    })


def _active_healthcheck(check: model.ActiveHealthcheck) -> Mapping:
    return _without_nones({
        "type": check.type,
        "interval": format_duration(check.interval),
        "timeout": format_duration(check.timeout),
        "healthy": {"successes": check.healthy_successes},
        "unhealthy": {"tcp_failures": check.unhealthy_tcp_failures, "timeouts": check.unhealthy_timeouts},
        "send": _probe_bytes(check.send),
        "expect": _probe_bytes(check.expect),
    })


def _passive_healthcheck(check: model.PassiveHealthcheck) -> Mapping:
    return {
        "unhealthy": {"tcp_failures": check.unhealthy_tcp_failures, "timeouts": check.unhealthy_timeouts},
        "fail_timeout": format_duration(check.fail_timeout),
    }


def _probe_bytes(data: bytes | None) -> str | bytes | None:
    """Text where the loader would read the same bytes back from it, else the bytes (YAML `!!binary`)."""
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    return data if "\0" in text else text      # the loader refuses NUL in text, not in !!binary


def _target(target: model.Target) -> Mapping:
    return {"target": host_port(target.host, target.port), "weight": target.weight, "backup": target.backup,
            "max_conns": target.max_conns, "slow_start": format_duration(target.slow_start)}


def _service(service: model.Service) -> Mapping:
    return _without_nones({
        "name": service.name,
        "protocol": service.protocol,
        "host": service.host,
        "port": service.port,
        "connect_timeout": format_duration(service.connect_timeout),
        "read_timeout": format_duration(service.read_timeout),
        "write_timeout": format_duration(service.write_timeout),
        "retries": service.retries,
        "tls_verify": service.tls_verify,
        "ca_certificates": list(service.ca_certificates),
        "tls_server_name": service.tls_server_name,
        "client_certificate": _cert_key(service.client_certificate) if service.client_certificate else None,
        "proxy_protocol": service.proxy_protocol,
        "tcp_congestion": service.tcp_congestion,
        "reject_share": service.reject_share,
        **(_udp_service(service) if service.protocol == "udp" else {}),
        "routes": [_route(route) for route in service.routes],
    })


def _udp_service(service: model.Service) -> Mapping:
    """The settings only a `protocol: udp` service takes (on another they are a warning)."""
    return {"proxy_responses": service.proxy_responses, "proxy_requests": service.proxy_requests,
            "proxy_buffer_size": service.proxy_buffer_size}


def _route(route: model.Route) -> Mapping:
    return {
        "name": route.name,
        "protocols": list(route.protocols),
        "sources": [_address_match(match) for match in route.sources],
        "destinations": [_address_match(match) for match in route.destinations],
        "snis": list(route.snis),
        **({"alpn": list(route.alpn)} if route.alpn else {}),
        **({"ssl": _without_nones({
            "client_certificate": (_client_certificate(route.client_certificate)
                                   if route.client_certificate else None),
            "alpn": list(route.ssl_alpn) if route.ssl_alpn is not None else None})}
           if route.client_certificate or route.ssl_alpn is not None else {}),
        **({"client_identities": list(route.client_identities)} if route.client_identities else {}),
    }


def _address_match(match: model.AddressMatch) -> Mapping:
    return _without_nones({"ip": str(match.network) if match.network is not None else None,
                           "port": match.port})


def _plugin(plugin: model.Plugin) -> Mapping:
    from pyproxy.plugins import plain  # here, not at the top: the plugins package imports this one
    # `or {}`: the loader keeps an empty mapping as (), which plain() would turn into a list.
    return _without_nones({"name": plugin.name, "route": plugin.route, "service": plugin.service,
                           "config": plain(plugin.config) or {}})
