"""Balancers: smooth weighted round robin, least connections, consistent hashing, passive health."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from collections import Counter

import pytest

from pyproxy.config.model import (
    ActiveHealthcheck,
    Config,
    Healthchecks,
    PassiveHealthcheck,
    Service,
    Target,
    Upstream,
)
from pyproxy.shared import ADMIN_HEALTHY, ADMIN_UNHEALTHY, HealthTable
from pyproxy.upstream import Balancer, Peer, build_balancers, peer_name, stable_hash

A = ("127.0.0.1", 1025)
B = ("127.0.0.1", 1026)
C = ("127.0.0.1", 1027)


class LogRecorder:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def __call__(self, level: str, message: str) -> None:
        self.lines.append((level, message))

    def count(self, level: str, text: str = "") -> int:
        return sum(1 for lv, msg in self.lines if lv == level and text in msg)


def names(balancer, n, now=0.0, **kw):
    return [balancer.pick(now, **kw).name for _ in range(n)]


def ips(n):
    return [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(n)]


# -- peers ------------------------------------------------------------------------------------------

def test_peer_names_for_logs():
    assert Peer(A).name == "127.0.0.1:1025"
    assert Peer(("::1", 1025)).name == "[::1]:1025"
    assert peer_name(("::1", 80)) == "[::1]:80"
    assert not hasattr(Peer(A), "__dict__")


def test_peer_available():
    p = Peer(A)
    assert p.available(0.0)
    p.down_until = 10.0
    assert not p.available(9.99)
    assert p.available(10.0)


def test_unknown_algorithm_rejected():
    with pytest.raises(ValueError):
        Balancer("u", [Peer(A)], algorithm="random")


# -- round robin ------------------------------------------------------------------------------------

def test_round_robin_equal_weights_alternates():
    b = Balancer("u", [Peer(A), Peer(B), Peer(C)])
    assert names(b, 6) == ["127.0.0.1:1025", "127.0.0.1:1026", "127.0.0.1:1027"] * 2


def test_round_robin_weighted_is_smooth_and_exact():
    b = Balancer("u", [Peer(A, 100), Peer(B, 50)])
    seq = names(b, 300)
    a, bb = "127.0.0.1:1025", "127.0.0.1:1026"
    assert seq[:3] == [a, bb, a]  # nginx's smooth order: interleaved, not a a b
    assert Counter(seq) == {a: 200, bb: 100}
    # every window of 3 consecutive picks holds exactly 2 a's and 1 b
    for i in range(len(seq) - 2):
        assert Counter(seq[i:i + 3]) == {a: 2, bb: 1}
    # any window of 300 picks is exactly 2:1, wherever it starts
    more = seq + names(b, 300)
    for start in (1, 2, 7, 150):
        assert Counter(more[start:start + 300]) == {a: 200, bb: 100}


def test_round_robin_nginx_sequence_5_1_1():
    # The example from nginx's commit introducing smooth weighted round robin.
    b = Balancer("u", [Peer(("a", 1), 5, "a"), Peer(("b", 1), 1, "b"), Peer(("c", 1), 1, "c")])
    assert "".join(names(b, 7)) == "aabacaa"


def test_weight_zero_never_picked():
    b = Balancer("u", [Peer(A, 100), Peer(B, 0)])
    assert set(names(b, 50)) == {"127.0.0.1:1025"}
    lc = Balancer("u", [Peer(A, 100), Peer(B, 0)], algorithm="least-connections")
    assert set(names(lc, 50)) == {"127.0.0.1:1025"}
    ch = Balancer("u", [Peer(A, 100), Peer(B, 0)], algorithm="consistent-hashing")
    assert {ch.pick(0.0, key=ip).name for ip in ips(200)} == {"127.0.0.1:1025"}


def test_all_weights_zero_gives_none():
    for algorithm in ("round-robin", "least-connections", "consistent-hashing"):
        b = Balancer("u", [Peer(A, 0), Peer(B, 0)], algorithm=algorithm)
        assert b.pick(0.0) is None
        assert b.pick(0.0, key="10.0.0.1") is None


def test_empty_balancer_gives_none():
    for algorithm in ("round-robin", "least-connections", "consistent-hashing"):
        b = Balancer("u", [], algorithm=algorithm)
        assert b.pick(0.0) is None
        assert b.pick(0.0, key="x") is None


def test_single_peer():
    for algorithm in ("round-robin", "least-connections", "consistent-hashing"):
        peer = Peer(A)
        b = Balancer("u", [peer], algorithm=algorithm)
        assert all(b.pick(0.0, key=ip) is peer for ip in ips(20))
        assert all(b.pick(0.0) is peer for _ in range(5))
        assert b.pick(0.0, key="x", tried=[peer]) is None


def test_tried_peers_are_skipped():
    for algorithm in ("round-robin", "least-connections", "consistent-hashing"):
        peers = [Peer(A), Peer(B), Peer(C)]
        b = Balancer("u", peers, algorithm=algorithm)
        for key in (None, "10.0.0.1", "10.9.8.7"):
            tried = []
            while (peer := b.pick(0.0, key=key, tried=tried)) is not None:
                assert peer not in tried
                tried.append(peer)
            assert sorted(p.name for p in tried) == sorted(p.name for p in peers)


def test_tried_does_not_disturb_ratios_of_others():
    a, bb, c = Peer(A, 100), Peer(B, 50), Peer(C, 100)
    b = Balancer("u", [a, bb, c])
    seq = [b.pick(0.0, tried={c}).name for _ in range(300)]
    assert Counter(seq) == {a.name: 200, bb.name: 100}


# -- least connections ------------------------------------------------------------------------------

def test_least_connections_prefers_idle_peer():
    a, bb = Peer(A), Peer(B)
    b = Balancer("u", [a, bb], algorithm="least-connections")
    b.connected(a, 0.0)
    b.connected(a, 0.0)
    assert b.pick(0.0) is bb
    b.connected(bb, 0.0)
    assert b.pick(0.0) is bb
    b.released(a)
    b.released(a)
    assert b.pick(0.0) is a
    b.released(a)  # never below zero
    assert a.conns == 0


def test_least_connections_respects_weights():
    a, bb = Peer(A, 200), Peer(B, 100)
    b = Balancer("u", [a, bb], algorithm="least-connections")
    # Sessions that never end: the heavier peer should carry twice as many.
    for _ in range(300):
        peer = b.pick(0.0)
        b.connected(peer, 0.0)
    assert (a.conns, bb.conns) == (200, 100)


def test_least_connections_ties_use_weighted_round_robin():
    a, bb = Peer(A, 100), Peer(B, 50)
    b = Balancer("u", [a, bb], algorithm="least-connections")
    # Sessions that end immediately: always a tie, settled by smooth weighted round robin.
    seq = []
    for _ in range(300):
        peer = b.pick(0.0)
        b.connected(peer, 0.0)
        b.released(peer)
        seq.append(peer.name)
    assert seq[:3] == [a.name, bb.name, a.name]
    assert Counter(seq) == {a.name: 200, bb.name: 100}


# -- consistent hashing -----------------------------------------------------------------------------

def hashing(peers, **kw):
    return Balancer("u", peers, algorithm="consistent-hashing", **kw)


def mapping(balancer, keys):
    return {k: balancer.pick(0.0, key=k).name for k in keys}


def test_stable_hash_is_not_python_hash():
    assert stable_hash("10.0.0.1") == stable_hash("10.0.0.1")
    assert 0 <= stable_hash("x") < 2 ** 32


def test_consistent_hashing_same_key_same_peer():
    b = hashing([Peer(A), Peer(B), Peer(C)])
    for ip in ips(50):
        first = b.pick(0.0, key=ip)
        assert all(b.pick(0.0, key=ip) is first for _ in range(3))


def test_consistent_hashing_stable_across_balancers():
    keys = [*ips(500), "a.example", "b.example", ""]
    one = hashing([Peer(A), Peer(B), Peer(C)])
    two = hashing([Peer(C), Peer(A), Peer(B)])  # order in the file does not matter
    assert mapping(one, keys) == mapping(two, keys)


SUBPROCESS_MAPPING = """
import json, sys
from pyproxy.upstream import Balancer, Peer
b = Balancer("u", [Peer(("127.0.0.1", 1025)), Peer(("127.0.0.1", 1026)), Peer(("127.0.0.1", 1027))],
             algorithm="consistent-hashing")
keys = json.loads(sys.stdin.read())
print(json.dumps({k: b.pick(0.0, key=k).name for k in keys}))
"""


def test_consistent_hashing_stable_across_processes():
    import json
    keys = [*ips(300), "tls9443.kong.example"]
    results = []
    for seed in ("1", "2", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run([sys.executable, "-c", SUBPROCESS_MAPPING], input=json.dumps(keys),
                             capture_output=True, text=True, env=env, check=True, timeout=60)
        results.append(json.loads(out.stdout))
    here = mapping(hashing([Peer(A), Peer(B), Peer(C)]), keys)
    assert results[0] == results[1] == results[2] == here


def test_consistent_hashing_spreads_by_weight():
    a, bb, c = Peer(A, 100), Peer(B, 100), Peer(C, 200)
    b = hashing([a, bb, c])
    counts = Counter(mapping(b, ips(20000)).values())
    total = sum(counts.values())
    assert abs(counts[a.name] / total - 0.25) < 0.06
    assert abs(counts[bb.name] / total - 0.25) < 0.06
    assert abs(counts[c.name] / total - 0.50) < 0.06


def test_consistent_hashing_minimal_disruption_on_removal():
    addrs = [(f"10.1.0.{i}", 80) for i in range(1, 6)]
    keys = ips(10000)
    before = mapping(hashing([Peer(a) for a in addrs]), keys)
    after = mapping(hashing([Peer(a) for a in addrs[:2] + addrs[3:]]), keys)
    removed = peer_name(addrs[2])
    moved = [k for k in keys if before[k] != after[k]]
    # Only the removed target's keys move...
    assert all(before[k] == removed for k in moved)
    assert not any(v == removed for v in after.values())
    # ...and that is about 1/N of them.
    assert abs(len(moved) / len(keys) - 1 / 5) < 0.07


def test_consistent_hashing_minimal_disruption_on_addition():
    addrs = [(f"10.1.0.{i}", 80) for i in range(1, 5)]
    keys = ips(10000)
    before = mapping(hashing([Peer(a) for a in addrs]), keys)
    added = ("10.1.0.9", 80)
    after = mapping(hashing([Peer(a) for a in [*addrs, added]]), keys)
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == peer_name(added) for k in moved)
    assert abs(len(moved) / len(keys) - 1 / 5) < 0.07


def test_consistent_hashing_down_peer_moves_only_its_keys():
    peers = [Peer(A), Peer(B), Peer(C)]
    b = hashing(peers, passive=PassiveHealthcheck(unhealthy_tcp_failures=1, fail_timeout=10))
    keys = ips(2000)
    before = mapping(b, keys)
    b.failed(peers[1], 0.0, timeout=False)
    during = mapping(b, keys)
    for k in keys:
        if before[k] != peers[1].name:
            assert during[k] == before[k]
        else:
            assert during[k] != peers[1].name
    assert {k: b.pick(10.0, key=k).name for k in keys} == before  # back after fail_timeout


def test_consistent_hashing_without_key_falls_back_to_round_robin():
    b = hashing([Peer(A), Peer(B)])
    assert names(b, 4) == ["127.0.0.1:1025", "127.0.0.1:1026"] * 2


# -- passive health ---------------------------------------------------------------------------------

def test_failure_takes_peer_down_for_fail_timeout():
    log = LogRecorder()
    a, bb = Peer(A), Peer(B)
    b = Balancer("up", [a, bb], passive=PassiveHealthcheck(1, 1, 10.0), log=log)
    b.failed(bb, 100.0, timeout=False)
    assert not bb.available(100.0)
    assert bb.down_until == 110.0
    assert log.lines == [("warn",
                          'upstream "up": target 127.0.0.1:1026 is down for 10s after 1 connect failure(s)')]
    assert set(names(b, 20, now=105.0)) == {a.name}
    assert bb.available(110.0)
    assert set(names(b, 20, now=110.0)) == {a.name, bb.name}


def test_timeouts_counted_separately():
    log = LogRecorder()
    bb = Peer(B)
    passive = PassiveHealthcheck(unhealthy_tcp_failures=3, unhealthy_timeouts=2, fail_timeout=5)
    b = Balancer("up", [Peer(A), bb], passive=passive, log=log)
    b.failed(bb, 0.0, timeout=False)
    b.failed(bb, 0.0, timeout=True)
    b.failed(bb, 0.0, timeout=False)
    assert bb.available(0.0)
    b.failed(bb, 0.0, timeout=True)
    assert not bb.available(0.0)
    assert (bb.fails, bb.timeouts) == (2, 2)
    assert log.lines == [("warn",
                          'upstream "up": target 127.0.0.1:1026 is down for 5s after 2 connect timeout(s)')]


def test_threshold_above_one_needs_consecutive_failures():
    log = LogRecorder()
    bb = Peer(B)
    b = Balancer("up", [Peer(A), bb], passive=PassiveHealthcheck(3, 3, 10.0), log=log)
    b.failed(bb, 0.0, timeout=False)
    b.failed(bb, 0.0, timeout=False)
    b.connected(bb, 0.0)  # a success in between resets the count
    assert (bb.fails, bb.timeouts) == (0, 0)
    b.released(bb)
    b.failed(bb, 1.0, timeout=False)
    b.failed(bb, 1.0, timeout=False)
    assert bb.available(1.0) and not log.lines
    b.failed(bb, 1.0, timeout=False)
    assert not bb.available(1.0)
    assert bb.down_until == 11.0
    assert log.count("warn", "after 3 connect failure(s)") == 1


def test_zero_threshold_disables_that_kind():
    bb = Peer(B)
    b = Balancer("up", [Peer(A), bb], passive=PassiveHealthcheck(0, 1, 10.0))
    for _ in range(10):
        b.failed(bb, 0.0, timeout=False)
    assert bb.available(0.0)
    assert bb.effective_weight == bb.weight
    b.failed(bb, 0.0, timeout=True)
    assert not bb.available(0.0)


def test_down_logged_once_while_down():
    log = LogRecorder()
    a = Peer(A)
    b = Balancer("up", [a], passive=PassiveHealthcheck(1, 1, 10.0), log=log)
    b.failed(a, 0.0, timeout=False)
    b.failed(a, 1.0, timeout=False)  # tried anyway while down, failed again: extends, no new line
    assert a.down_until == 11.0
    assert log.count("warn", "is down for") == 1
    b.failed(a, 20.0, timeout=False)  # down again after having come back: a new line
    assert log.count("warn", "is down for") == 2


def test_failed_peer_recovers_weight_gradually():
    a, bb = Peer(A, 100), Peer(B, 100)
    b = Balancer("up", [a, bb], passive=PassiveHealthcheck(2, 2, 10.0))
    b.failed(bb, 0.0, timeout=False)
    assert bb.effective_weight == 50 and bb.available(0.0)
    seq = names(b, 300)
    assert Counter(seq)[a.name] > Counter(seq)[bb.name]
    assert bb.effective_weight == 100


def test_all_down_still_returns_a_peer_and_logs_once():
    log = LogRecorder()
    a, bb = Peer(A), Peer(B)
    b = Balancer("up", [a, bb], passive=PassiveHealthcheck(1, 1, 10.0), log=log)
    b.failed(a, 0.0, timeout=False)
    b.failed(bb, 0.0, timeout=True)
    picked = [b.pick(1.0) for _ in range(50)]
    assert all(p is not None for p in picked)
    assert {p.name for p in picked} == {a.name, bb.name}  # still balanced while trying anyway
    assert log.count("warn", "all targets are unhealthy") == 1
    assert ("warn", 'upstream "up": all targets are unhealthy, trying them anyway') in log.lines
    # with retries inside one session: tried peers are still excluded, then None
    first = b.pick(2.0)
    assert b.pick(2.0, tried=[first]) not in (None, first)
    assert b.pick(2.0, tried=[a, bb]) is None
    assert log.count("warn", "all targets are unhealthy") == 1
    # fail_timeout passes: a notice, and the next outage is logged again
    assert b.pick(10.0) is not None
    assert log.count("notice") == 1
    assert log.count("warn", "all targets are unhealthy") == 1
    b.failed(a, 11.0, timeout=False)
    b.failed(bb, 11.0, timeout=False)
    b.pick(11.0)
    b.pick(11.0)
    assert log.count("warn", "all targets are unhealthy") == 2


def test_all_down_per_algorithm():
    for algorithm in ("least-connections", "consistent-hashing"):
        log = LogRecorder()
        a, bb = Peer(A), Peer(B)
        b = Balancer("up", [a, bb], algorithm=algorithm, passive=PassiveHealthcheck(1, 1, 10.0), log=log)
        b.failed(a, 0.0, timeout=False)
        b.failed(bb, 0.0, timeout=False)
        for ip in ips(20):
            assert b.pick(1.0, key=ip) is not None
        assert log.count("warn", "all targets are unhealthy") == 1


def test_not_all_down_when_a_tried_peer_is_still_up():
    log = LogRecorder()
    a, bb = Peer(A), Peer(B)
    b = Balancer("up", [a, bb], passive=PassiveHealthcheck(1, 1, 10.0), log=log)
    b.failed(bb, 0.0, timeout=False)
    # a is up but already tried by this session: the down peer is tried, but that is no outage
    assert b.pick(0.0, tried=[a]) is bb
    assert log.count("warn", "all targets are unhealthy") == 0


def test_success_on_down_peer_brings_it_back():
    log = LogRecorder()
    a = Peer(A)
    b = Balancer("up", [a], passive=PassiveHealthcheck(1, 1, 10.0), log=log)
    b.failed(a, 0.0, timeout=False)
    assert b.pick(1.0) is a
    b.connected(a, 1.0)
    assert a.available(1.0) and a.conns == 1 and a.fails == 0
    assert log.count("notice", "is up again") == 1
    b.released(a)
    assert a.conns == 0


def test_mark_down_and_up_for_active_checks():
    log = LogRecorder()
    a, bb = Peer(A), Peer(B)
    b = Balancer("up", [a, bb], log=log)
    b.mark_down(bb, 0.0, reason="active check: connection refused")
    assert set(names(b, 10, now=1e9)) == {a.name}
    b.mark_up(bb, 5.0)
    assert set(names(b, 10, now=5.0)) == {a.name, bb.name}
    assert log.count("warn", "is down (active check") == 1 and log.count("notice", "up again") == 1


# -- build_balancers --------------------------------------------------------------------------------

def make_config():
    up = Upstream(
        name="echo-upstream",
        algorithm="least-connections",
        healthchecks=Healthchecks(passive=PassiveHealthcheck(3, 2, 7.0)),
        targets=(
            Target("localhost", 1025, 100, (("127.0.0.1", 1025), ("::1", 1025))),
            Target("127.0.0.1", 1026, 50, (("127.0.0.1", 1026),)),
            Target("127.0.0.1", 1027, 0, (("127.0.0.1", 1027),)),
        ),
    )
    hashed = Upstream(name="sticky", algorithm="consistent-hashing", hash_on="sni",
                      targets=(Target("127.0.0.2", 80, 100, (("127.0.0.2", 80),)),))
    services = (
        Service(name="echo", host="echo-upstream", port=1025, upstream="echo-upstream"),
        Service(name="echo-tls", protocol="tls", host="echo-upstream", upstream="echo-upstream"),
        Service(name="plain", host="backend.local", port=8080,
                addresses=(("10.0.0.1", 8080), ("10.0.0.2", 8080))),
        Service(name="sticky-svc", host="sticky", upstream="sticky"),
    )
    return Config(path="/etc/pyproxy.conf", upstreams=(up, hashed), services=services)


def test_build_balancers():
    log = LogRecorder()
    balancers = build_balancers(make_config(), log=log)
    assert set(balancers) == {"echo", "echo-tls", "plain", "sticky-svc"}

    echo = balancers["echo"]
    assert echo is balancers["echo-tls"]  # one balancer per upstream, shared
    assert echo.name == "echo-upstream"
    assert echo.algorithm == "least-connections"
    assert echo.passive == PassiveHealthcheck(3, 2, 7.0)
    assert [(p.name, p.weight) for p in echo.peers] == [
        ("127.0.0.1:1025", 100), ("[::1]:1025", 100), ("127.0.0.1:1026", 50), ("127.0.0.1:1027", 0)]
    assert echo.peers[1].addr == ("::1", 1025)
    assert "127.0.0.1:1027" not in set(names(echo, 50))

    plain = balancers["plain"]
    assert plain is not echo
    assert plain.algorithm == "round-robin"
    assert [(p.addr, p.weight) for p in plain.peers] == [(("10.0.0.1", 8080), 100), (("10.0.0.2", 8080), 100)]
    assert names(plain, 4) == ["10.0.0.1:8080", "10.0.0.2:8080"] * 2

    sticky = balancers["sticky-svc"]
    assert sticky.algorithm == "consistent-hashing" and sticky.hash_on == "sni"
    assert sticky.pick(0.0, key="a.example").name == "127.0.0.2:80"

    # the log callable is wired through
    echo.failed(echo.peers[0], 0.0, timeout=True)
    echo.failed(echo.peers[0], 0.0, timeout=True)
    assert log.count("warn", 'upstream "echo-upstream": target 127.0.0.1:1025 is down for 7s after 2') == 1


def test_build_balancers_fresh_per_call():
    config = make_config()
    one, two = build_balancers(config), build_balancers(config)
    assert one["echo"] is not two["echo"]
    assert one["echo"].peers[0] is not two["echo"].peers[0]


# -- health across generations ----------------------------------------------------------------------


def with_active_checks(config: Config) -> Config:
    up = config.upstreams[0]
    checked = dataclasses.replace(up, healthchecks=dataclasses.replace(
        up.healthchecks, active=ActiveHealthcheck(interval=1.0)))
    return dataclasses.replace(config, upstreams=(checked, *config.upstreams[1:]))


def test_a_new_generation_starts_from_the_health_the_last_one_stored():
    table = HealthTable()
    config = with_active_checks(make_config())
    old = build_balancers(config, health=table, now=100.0)
    echo, plain = old["echo"], old["plain"]
    echo.mark_down(echo.peers[0], 100.0, reason="active health check")        # until a check passes
    echo.failed(echo.peers[2], 100.0, timeout=True)                            # passive: 7 s
    echo.failed(echo.peers[2], 100.0, timeout=True)
    echo.mark_down(echo.peers[1], 100.0)
    echo.mark_up(echo.peers[1], 101.0)                                         # came back
    plain.failed(plain.peers[1], 100.0, timeout=False)                         # implicit upstream: 10 s

    log = LogRecorder()
    new = build_balancers(config, log=log, health=table, now=102.0)
    assert [p.down_until for p in new["echo"].peers] == [math.inf, 0.0, 107.0, 0.0]
    assert [p.down_until for p in new["plain"].peers] == [0.0, 110.0]
    assert log.lines == [
        ("info", 'upstream "echo-upstream": target 127.0.0.1:1025 is still down until an active health '
                 'check succeeds (as the previous generation left it)'),
        ("info", 'upstream "echo-upstream": target 127.0.0.1:1026 is still down for 5s '
                 '(as the previous generation left it)'),
        ("info", 'upstream "backend.local:8080": target 10.0.0.2:8080 is still down for 8s '
                 '(as the previous generation left it)'),
    ]
    later = build_balancers(config, health=table, now=200.0)
    assert [p.down_until for p in later["echo"].peers] == [math.inf, 0.0, 0.0, 0.0]    # 7 s are over


def test_a_target_out_until_an_active_check_starts_healthy_without_active_checks():
    """Nothing in a generation without active checks would ever bring it back."""
    table = HealthTable()
    old = build_balancers(with_active_checks(make_config()), health=table, now=0.0)
    old["echo"].mark_down(old["echo"].peers[0], 0.0)
    assert build_balancers(make_config(), health=table, now=1.0)["echo"].peers[0].down_until == 0.0


def test_health_is_kept_per_upstream_and_target():
    """The same address in another upstream, or a target that is new, starts healthy."""
    table = HealthTable()
    config = make_config()
    old = build_balancers(config, health=table, now=0.0)
    old["echo"].mark_down(old["echo"].peers[0], 0.0, duration=60.0)
    moved = dataclasses.replace(config.upstreams[0], name="renamed")
    services = tuple(dataclasses.replace(s, host="renamed", upstream="renamed")
                     if s.upstream == "echo-upstream" else s for s in config.services)
    renamed = dataclasses.replace(config, upstreams=(moved, config.upstreams[1]), services=services)
    new = build_balancers(renamed, health=table, now=1.0)
    assert new["echo"].peers[0].down_until == 0.0


def test_what_the_admin_api_said_applies_once_and_a_new_generation_keeps_it():
    table = HealthTable()
    peers = [Peer(("10.0.0.1", 80)), Peer(("10.0.0.2", 80))]
    ring = Balancer("pool", peers, "consistent-hashing", health=table)
    table.tell(HealthTable.key("pool", "10.0.0.1:80"), weight=0)              # drained
    table.tell(HealthTable.key("pool", "10.0.0.2:80"), health=ADMIN_UNHEALTHY)
    ring.administer(1.0)
    assert peers[0].weight == 0 and peers[1].down_until == math.inf
    assert {ring.pick(1.0, f"key-{i}").name for i in range(50)} == {"10.0.0.2:80"}   # ring rebuilt
    ring.mark_up(peers[1], 2.0)                        # an active check: the event is not replayed
    ring.administer(3.0)
    assert peers[1].down_until == 0.0
    table.tell(HealthTable.key("pool", "10.0.0.2:80"), health=ADMIN_UNHEALTHY)
    # A new generation (no active checks) keeps both: the weight, and unhealthy until `healthy`.
    fresh = [Peer(("10.0.0.1", 80)), Peer(("10.0.0.2", 80))]
    again = Balancer("pool", fresh, health=table)
    ring.administer(4.0)
    again.restore(4.0, active_checks=False)
    again.administer(4.0, health_too=False)
    assert fresh[0].weight == 0 and fresh[1].down_until == math.inf
    table.tell(HealthTable.key("pool", "10.0.0.2:80"), health=ADMIN_HEALTHY)
    again.administer(5.0)
    assert fresh[1].down_until == 0.0 and again.pick(5.0) is fresh[1]
