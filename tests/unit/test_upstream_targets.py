"""Targets beyond a weight: backup, max_conns, slow_start, and addresses that follow the master's DNS."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from pyproxy.config import ConfigError, load_config
from pyproxy.config.model import ActiveHealthcheck, Config, Healthchecks, Queue, Service, Target, Upstream
from pyproxy.shared import AddressTable, CounterRows, HealthTable
from pyproxy.upstream import Balancer, Peer, build_balancers

A, B, C = ("127.0.0.1", 1025), ("127.0.0.1", 1026), ("127.0.0.1", 1027)


def picks(balancer: Balancer, count: int, now: float = 0.0) -> list[str]:
    return [peer.name.rsplit(":", 1)[1] if (peer := balancer.pick(now)) else "-" for _ in range(count)]


# -- backup -------------------------------------------------------------------------------------------

def test_a_backup_target_is_used_only_while_every_other_one_is_down():
    a, b, spare = Peer(A), Peer(B), Peer(C, backup=True)
    balancer = Balancer("u", [a, b, spare])
    assert set(picks(balancer, 6)) == {"1025", "1026"}
    balancer.mark_down(a, 0.0)
    assert set(picks(balancer, 4)) == {"1026"}
    balancer.mark_down(b, 0.0)
    assert picks(balancer, 3) == ["1027"] * 3
    balancer.mark_up(a, 1.0)
    assert picks(balancer, 3, 1.0) == ["1025"] * 3


def test_a_retry_goes_to_the_backup_once_the_other_targets_were_tried():
    a, spare = Peer(A), Peer(B, backup=True)
    balancer = Balancer("u", [a, spare])
    assert balancer.pick(0.0) is a
    assert balancer.pick(0.0, tried=[a]) is spare
    assert balancer.pick(0.0, tried=[a, spare]) is None


# -- max_conns ----------------------------------------------------------------------------------------

def test_max_conns_is_counted_over_every_worker():
    counts = CounterRows(rows=2, slots=64)
    first = Balancer("u", [Peer(A, max_conns=2), Peer(B)], counts=counts)
    second = Balancer("u", [Peer(A, max_conns=2), Peer(B)], counts=counts)   # another worker's
    counts.claim(0)
    capped = first.peers[0]
    first.connected(capped, 0.0)
    counts.claim(1)
    second.connected(second.peers[0], 0.0)
    # Two sessions over two workers: the target is full for both.
    assert {first.pick(0.0).name for _ in range(4)} == {"127.0.0.1:1026"}
    assert {second.pick(0.0).name for _ in range(4)} == {"127.0.0.1:1026"}
    second.released(second.peers[0])
    assert "127.0.0.1:1025" in {second.pick(0.0).name for _ in range(4)}


def test_every_target_full_means_no_peer_and_a_backup_takes_over():
    counts = CounterRows(rows=1, slots=64)
    counts.claim(0)
    balancer = Balancer("u", [Peer(A, max_conns=1), Peer(B, backup=True)], counts=counts)
    first = balancer.pick(0.0)
    balancer.connected(first, 0.0)
    assert balancer.pick(0.0).addr == B
    balancer = Balancer("v", [Peer(A, max_conns=1)], counts=counts)
    balancer.connected(balancer.pick(0.0), 0.0)
    assert balancer.pick(0.0) is None


# -- slow_start ---------------------------------------------------------------------------------------

def test_slow_start_ramps_a_revived_target_up_over_its_time():
    a, b = Peer(A, slow_start=10.0), Peer(B)
    balancer = Balancer("u", [a, b])
    balancer.mark_down(a, 0.0)
    balancer.mark_up(a, 100.0)
    early = picks(balancer, 100, 101.0)          # 10% of the ramp: about one in ten
    assert 1 <= early.count("1025") <= 15
    late = picks(balancer, 100, 200.0)           # ramp over: an even share again
    assert 45 <= late.count("1025") <= 55


def test_without_slow_start_a_revived_target_gets_its_share_at_once():
    a, b = Peer(A), Peer(B)
    balancer = Balancer("u", [a, b])
    balancer.mark_down(a, 0.0)
    balancer.mark_up(a, 100.0)
    assert picks(balancer, 100, 101.0).count("1025") == 50


# -- DNS ----------------------------------------------------------------------------------------------

def dns_config(*targets: Target) -> Config:
    return Config(path="/x", upstreams=(Upstream("pool", targets=targets),))


def test_a_balancer_follows_the_table_and_keeps_the_state_of_addresses_that_stay():
    table = AddressTable(size=1 << 16)
    table.publish({"svc.test": (("10.0.0.1", 0, 0), ("10.0.0.2", 0, 0))})
    config = dns_config(Target("svc.test", 80, 100, (("10.0.0.9", 80),)), Target("10.0.0.5", 81, 100,
                                                                                  (("10.0.0.5", 81),)))
    balancer = build_balancers(with_service(config), table=table)["s"]
    assert [p.name for p in balancer.peers] == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.5:81"]
    kept = balancer.peers[1]
    balancer.connected(kept, 0.0)
    table.publish({"svc.test": (("10.0.0.2", 0, 0), ("10.0.0.3", 0, 0))})
    balancer.pick(0.0)
    assert [p.name for p in balancer.peers] == ["10.0.0.2:80", "10.0.0.3:80", "10.0.0.5:81"]
    assert balancer.peers[0] is kept and kept.conns == 1
    table.publish({"svc.test": ()})
    assert {balancer.pick(0.0).name for _ in range(3)} == {"10.0.0.5:81"}


def test_srv_records_give_ports_and_weights_and_new_addresses_start_as_the_last_generation_left_them():
    table, health = AddressTable(size=1 << 16), HealthTable(slots=64)
    health.store("pool\n10.0.0.2:7002", math.inf)
    table.publish({"_app._tcp.svc.test": (("10.0.0.1", 7001, 30), ("10.0.0.2", 7002, 10))})
    config = with_service(dns_config(Target("_app._tcp.svc.test", 8000)), active=True)
    balancer = build_balancers(config, health=health, table=table)["s"]
    assert [(p.name, p.weight, p.down_until) for p in balancer.peers] == [
        ("10.0.0.1:7001", 30, 0.0), ("10.0.0.2:7002", 10, math.inf)]


def test_an_ip_only_balancer_never_reads_the_table():
    table = AddressTable(size=1 << 16)
    config = with_service(dns_config(Target("10.0.0.5", 81, 100, (("10.0.0.5", 81),))))
    assert build_balancers(config, table=table)["s"].table is None


def with_service(config: Config, active: bool = False) -> Config:
    """`config` with a service "s" over its upstream (probed by active checks if `active`)."""
    upstreams = config.upstreams
    if active:
        upstreams = tuple(replace(u, healthchecks=Healthchecks(active=ActiveHealthcheck(interval=1.0)))
                          for u in upstreams)
    return replace(config, upstreams=upstreams, services=(Service("s", host="pool", upstream="pool"),))


# -- the configuration ----------------------------------------------------------------------------------

TARGETS_CONFIG = """\
stream_listen: [127.0.0.1:9000]
upstreams:
  - name: pool
    queue: {QUEUE}
    targets:
      - {target: 127.0.0.1:1025, max_conns: 10, slow_start: 30s}
      - {target: 127.0.0.1:1026, backup: true}
services:
  - name: svc
    host: pool
    routes: [{name: r, destinations: [{port: 9000}]}]
"""


def test_target_options_and_the_queue_are_read(tmp_path):
    path = tmp_path / "pyproxy.conf"
    path.write_text(TARGETS_CONFIG.replace("{QUEUE}", "{size: 50, timeout: 2s}"))
    upstream = load_config(str(path)).upstream("pool")
    assert [(t.max_conns, t.slow_start, t.backup) for t in upstream.targets] == [(10, 30.0, False),
                                                                               (0, 0.0, True)]
    assert upstream.queue == Queue(size=50, timeout=2.0)


def test_a_queue_needs_a_size(tmp_path):
    path = tmp_path / "pyproxy.conf"
    path.write_text(TARGETS_CONFIG.replace("{QUEUE}", "{timeout: 2s}"))
    with pytest.raises(ConfigError) as raised:
        load_config(str(path))
    assert [str(error) for error in raised.value.errors] == [
        f"{path}:4: upstreams[0].queue.size: required key is missing"]


def test_a_target_a_previous_generation_left_down_ramps_up_once_it_is_back():
    health = HealthTable(slots=64)
    health.store("u\n127.0.0.1:1025", 50.0)           # passive checks took it out until t=50
    a, b = Peer(A, slow_start=10.0), Peer(B)
    balancer = Balancer("u", [a, b], health=health)
    balancer.restore(40.0, active_checks=False)
    assert picks(balancer, 4, 45.0) == ["1026"] * 4
    assert 1 <= picks(balancer, 100, 51.0).count("1025") <= 15
