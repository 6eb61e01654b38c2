"""status_listen: /metrics in Prometheus text (parsed by Prometheus' parser) and /status in JSON."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support import connect, free_port, recv_all, recv_line, tag_handler, wait_until


def config(port: int, status_port: int, upstream_port: int, dead_port: int) -> str:
    return f"""
worker_processes: 2
status_listen: 127.0.0.1:{status_port}
stream_listen: [127.0.0.1:{port}]
upstreams:
  - name: pool
    targets: [{{target: 127.0.0.1:{upstream_port}}}]
services:
  - name: svc
    host: pool
    routes:
      - name: r
        protocols: [tcp]
        sources: [{{ip: 127.0.0.1}}]
  - name: dead
    host: 127.0.0.1
    port: {dead_port}
    routes:
      - name: to-dead
        protocols: [tcp]
        sources: [{{ip: 127.0.0.2}}]
"""


def scrape(status_port: int) -> dict:
    """{(name, frozenset(labels)): value} from /metrics, through Prometheus' own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_the_sessions_made(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port, status_port = free_port(), free_port()
    p = proxy(config(port, status_port, up.port, free_port()))
    for _ in range(5):
        with connect(port) as sock:
            assert recv_line(sock) == b"up\n"
            sock.sendall(b"abc")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"abc"
    for _ in range(2):
        with connect(port, source="127.0.0.2") as sock:
            assert recv_all(sock) == b""                    # 502: nothing listens there
    with connect(port, source="127.0.0.3") as sock:
        assert recv_all(sock) == b""                        # 404: no route
    p.wait_access(8)

    def counted():
        samples = scrape(status_port)
        return samples if value(samples, "pyproxy_sessions_total", service="svc", route="r", status="200") == 5 \
            else None
    samples = wait_until(counted, timeout=5, interval=0.1, what="5 sessions in /metrics")
    assert value(samples, "pyproxy_sessions_total", service="dead", route="to-dead", status="502") == 2
    assert value(samples, "pyproxy_sessions_total", service="-", route="-", status="404") == 1
    assert value(samples, "pyproxy_client_received_bytes_total", service="svc") == 15
    assert value(samples, "pyproxy_client_sent_bytes_total", service="svc") == 5 * len(b"up\nabc")
    assert value(samples, "pyproxy_upstream_target_healthy", upstream="pool", target=up.target) == 1
    assert value(samples, "pyproxy_active_sessions") == 0
    roles = sorted(labels for (name, labels) in samples if name == "pyproxy_process_resident_memory_bytes")
    assert len(roles) == 3                                  # the master and its two workers

    held = connect(port)
    assert recv_line(held) == b"up\n"
    wait_until(lambda: value(scrape(status_port), "pyproxy_active_sessions") == 1, timeout=5, interval=0.2,
               what="the open session in the gauge")
    held.close()


def test_counters_survive_a_reload_and_reloads_are_counted(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port, status_port = free_port(), free_port()
    conf = config(port, status_port, up.port, free_port())
    p = proxy(conf)
    for _ in range(3):
        with connect(port) as sock:
            assert recv_line(sock) == b"up\n"
    p.wait_access(3)
    wait_until(lambda: value(scrape(status_port), "pyproxy_sessions_total", service="svc", route="r",
                             status="200") == 3, timeout=5, interval=0.1, what="3 sessions")
    p.reload(conf)
    p.reload("not: [valid", expect="reload failed")
    samples = scrape(status_port)
    assert value(samples, "pyproxy_sessions_total", service="svc", route="r", status="200") == 3
    assert value(samples, "pyproxy_reloads_total", result="ok") == 1
    assert value(samples, "pyproxy_reloads_total", result="failed") == 1
    assert value(samples, "pyproxy_config_generation") == 2


def test_status_json_and_unknown_paths(proxy, upstreams):
    up = upstreams(tag_handler, name="up")
    port, status_port = free_port(), free_port()
    p = proxy(config(port, status_port, up.port, free_port()))
    with connect(port) as sock:
        assert recv_line(sock) == b"up\n"
    p.wait_access(1)

    def status():
        with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/status", timeout=10) as response:
            doc = json.loads(response.read())
        return doc if doc["sessions"]["total"] == 1 else None
    doc = wait_until(status, timeout=5, interval=0.1, what="/status to count the session")
    assert doc["sessions"]["by_status"] == {"200": 1}
    assert doc["upstreams"]["pool"] == {up.target: True}
    assert {proc["role"] for proc in doc["processes"]} == {"master", "worker"}
    assert doc["master_pid"] == p.pid
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{status_port}/nope", timeout=10)
        raise AssertionError("expected a 404")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
