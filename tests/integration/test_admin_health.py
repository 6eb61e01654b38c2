"""Targets' health and weight through the Admin API, applied by every worker without a reload:
Kong's `PUT /upstreams/{u}/targets/{t}/healthy|unhealthy`, `GET /upstreams/{u}/health`, and a
target drained by giving it weight 0 (no new sessions; those open go on). Real pyproxy processes,
real sessions on loopback."""

from __future__ import annotations

import time

from tests.integration.test_admin import _answers, call, reloads, settled
from tests.support import connect, free_port, recv_line, tag_handler, wait_until

CONFIG = """
stream_listen: [127.0.0.1:{port}]
admin_listen: {admin}
worker_processes: 2
reload_coalesce: 50ms
"""


def start(proxy, upstreams):
    """A pyproxy with an upstream `pool` of two tagged targets, `a` and `b`, behind one route."""
    a, b = upstreams(tag_handler, name="a"), upstreams(tag_handler, name="b")
    port, admin = free_port(), free_port()
    p = proxy(CONFIG.format(port=port, admin=admin))
    p.admin, p.port = f"http://127.0.0.1:{admin}", port
    wait_until(lambda: _answers(p.admin), what="the Admin API")
    assert call(p.admin, "POST", "/upstreams", {"name": "pool"})[0] == 201
    for up in (a, b):
        assert call(p.admin, "POST", "/upstreams/pool/targets", {"target": up.target})[0] == 201
    assert call(p.admin, "POST", "/services", {"name": "s", "protocol": "tcp", "host": "pool"})[0] == 201
    assert call(p.admin, "POST", "/services/s/routes",
                {"protocols": ["tcp"], "destinations": [{"port": port}]})[0] == 201
    wait_until(lambda: answering(p) == {"a", "b"}, what="both targets serving")
    wait_until(lambda: settled(p), what="no reload in flight")
    return p, a, b


def who(port: int) -> str:
    try:
        with connect(port) as sock:
            return recv_line(sock).decode().strip()
    except OSError:
        return ""


def answering(p, sessions: int = 12) -> set[str]:
    """The targets that answered a few new sessions (round robin over two workers' balancers)."""
    return {who(p.port) for _ in range(sessions)}


def test_unhealthy_and_healthy_apply_without_a_reload_and_hold_across_one(proxy, upstreams):
    p, a, b = start(proxy, upstreams)
    before = reloads(p)
    assert call(p.admin, "PUT", f"/upstreams/pool/targets/{a.target}/unhealthy") == (204, None)
    wait_until(lambda: answering(p) == {"b"}, timeout=3, what="a out of rotation in every worker")
    status, health = call(p.admin, "GET", "/upstreams/pool/health")
    assert status == 200 and health["next"] is None and health["node_id"]
    by_target = {t["target"]: t for t in health["data"]}
    # Kong's upstreams have their health checks off unless configured: b is neither up nor down.
    assert by_target[a.target]["health"] == "UNHEALTHY"
    assert by_target[b.target]["health"] == "HEALTHCHECKS_OFF"
    assert by_target[a.target]["data"]["addresses"] == [
        {"ip": "127.0.0.1", "port": a.port, "weight": 100, "health": "UNHEALTHY"}]
    assert by_target[a.target]["data"]["weight"] == {"total": 100, "unavailable": 100, "available": 0}
    balancer = call(p.admin, "GET", "/upstreams/pool/health?balancer_health=1")[1]["data"]
    assert (balancer["balancer_health"], balancer["details"]["weight"]["available"]) == ("HEALTHY", 100)
    assert reloads(p) == before                     # told to the workers, not reloaded

    p.reload()                                      # a new generation still has it out
    assert answering(p) == {"b"}
    target_id = by_target[a.target]["id"]
    assert call(p.admin, "PUT", f"/upstreams/pool/targets/{target_id}/healthy") == (204, None)
    wait_until(lambda: answering(p) == {"a", "b"}, timeout=3, what="a back in every worker")

    assert call(p.admin, "PUT", "/upstreams/pool/targets/127.0.0.1:1/unhealthy") == (
        404, {"message": "Not found"})
    assert call(p.admin, "PUT", "/upstreams/nope/targets/x/healthy")[0] == 404
    assert call(p.admin, "GET", f"/upstreams/pool/targets/{a.target}/healthy")[0] == 405
    status, body = call(p.admin, "PUT", f"/upstreams/pool/targets/{a.target}/10.9.9.9/unhealthy")
    assert (status, body) == (400, {"message": f"target {a.target} has no address 10.9.9.9"})


def test_weight_zero_drains_a_target_its_open_sessions_go_on(proxy, upstreams):
    p, _, b = start(proxy, upstreams)
    before = reloads(p)
    held = []
    while len(held) < 4:                    # sessions open on b, in whichever worker
        sock = connect(p.port)
        if recv_line(sock) == b"b\n":
            held.append(sock)
        else:
            sock.close()
    try:
        status, target = call(p.admin, "PATCH", f"/upstreams/pool/targets/{b.target}", {"weight": 0})
        assert (status, target["weight"]) == (200, 0)
        wait_until(lambda: answering(p) == {"a"}, timeout=3, what="no new session on b")
        time.sleep(0.5)
        assert reloads(p) == before             # no reload: nothing retires the workers holding them
        for sock in held:
            sock.sendall(b"still here\n")
            assert recv_line(sock) == b"still here\n"
        status, health = call(p.admin, "GET", "/upstreams/pool/health")
        drained = next(t for t in health["data"] if t["target"] == b.target)
        assert (drained["weight"], drained["data"]["weight"]["total"]) == (0, 0)
    finally:
        for sock in held:
            sock.close()
    assert call(p.admin, "PATCH", f"/upstreams/pool/targets/{b.target}", {"weight": 100})[0] == 200
    wait_until(lambda: answering(p) == {"a", "b"}, timeout=3, what="b back")
    p.reload()                                   # the state file has the weights: a reload agrees
    assert answering(p) == {"a", "b"}
    assert reloads(p) == before + 1


def test_a_weight_told_then_replaced_by_a_reloading_change_is_not_applied_again(proxy, upstreams):
    p, _, b = start(proxy, upstreams)
    assert call(p.admin, "PATCH", f"/upstreams/pool/targets/{b.target}", {"weight": 0})[0] == 200
    wait_until(lambda: answering(p) == {"a"}, timeout=3, what="no new session on b")
    before = reloads(p)
    # Not only a weight: a reload, whose new generation has weight 100 from the state file.
    assert call(p.admin, "PATCH", f"/upstreams/pool/targets/{b.target}", {"weight": 100, "tags": ["back"]}
                )[0] == 200
    wait_until(lambda: reloads(p) == before + 1 and settled(p), what="one reload, complete")
    wait_until(lambda: answering(p) == {"a", "b"}, timeout=3, what="b back in the new generation")
