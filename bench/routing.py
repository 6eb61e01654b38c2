"""What choosing a route costs a session, and how it grows with the routes of its listener.

    python -m bench.routing                  # 1, 100 and 10,000 routes; about 30 s
    python -m bench.routing --routes 1 --routes 1000

For three kinds of listener (TLS routes by exact SNI, TLS routes by wildcard SNI, TCP routes by
source CIDR) and each number of routes, it times `ListenerRoutes.match` for one session, the way the
session calls it, twice: with every candidate scored in turn (`select_linear`, the matcher before
the index and the reference it is tested against) and the way the router does it now (the same
linear scoring up to `LINEAR_MAX` candidates, a `RouteIndex` above). Each figure is the best of
several timed repeats (the least disturbed by the rest of the machine), in microseconds per session.
Then it counts the Python calls (functions and builtins) of one match with 1 and 5 routes, the common
case, both ways, and how long building the router takes and how much memory it holds with the most
routes.
Nothing here starts a process or opens a socket: it is the router alone, in this process.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

from pyproxy.config.model import AddressMatch, Listen, Route
from pyproxy.router import LINEAR_MAX, ListenerRoutes, RouteIndex, Router

ROUTES = [1, 100, 10_000]
REPEATS = 5                # timed repeats; the best one is kept
TIMED_SECONDS = 0.2        # least time of one repeat (timeit's autorange)
COUNTED = [1, 5]           # route counts whose calls per match are counted


@dataclass(frozen=True)
class Kind:
    name: str
    listen: Listen
    route: Callable[[int], Route]                        # the i-th route
    session: Callable[[int], tuple[str, str | None]]     # (client address, SNI) of a session for route i


def _tls_route(i: int, sni: str) -> Route:
    return Route(name=f"r{i}", service="svc", protocols=("tls_passthrough",), snis=(sni,), index=i)


KINDS = [
    Kind("SNI exact", Listen("0.0.0.0", 9443, ssl=True),
         lambda i: _tls_route(i, f"customer{i}.example.com"),
         lambda i: ("192.0.2.7", f"customer{i}.example.com")),
    Kind("SNI wildcard", Listen("0.0.0.0", 9443, ssl=True),
         lambda i: _tls_route(i, f"*.customer{i}.example.com"),
         lambda i: ("192.0.2.7", f"www.customer{i}.example.com")),
    Kind("CIDR sources", Listen("127.0.0.1", 9000),
         lambda i: Route(name=f"r{i}", service="svc", index=i, sources=(
             AddressMatch(network=ipaddress.ip_network(f"10.{i >> 8 & 255}.{i & 255}.0/24")),)),
         lambda i: (f"10.{i >> 8 & 255}.{i & 255}.7", None)),
]


def listener_routes(kind: Kind, count: int) -> tuple[ListenerRoutes, tuple[str, str | None]]:
    """The listener's routes and a session that takes the middle one (a linear scan scores all anyway)."""
    router = Router(tuple(kind.route(i) for i in range(count)), (kind.listen,))
    return router.for_listener(kind.listen), kind.session(count // 2)


def per_session(routes: ListenerRoutes, session: tuple[str, str | None], port: int) -> float:
    """Best time of one match, in microseconds."""
    src, sni = session
    match = routes.match
    timer = timeit.Timer(lambda: match(src, 40000, None, port, sni))
    number, _ = timer.autorange()
    number = max(1, int(number * TIMED_SECONDS / 0.2))
    return min(timer.repeat(repeat=REPEATS, number=number)) / number * 1e6


def linear(routes: ListenerRoutes) -> ListenerRoutes:
    """The same listener with every candidate scored in turn."""
    routes.index = None
    return routes


def indexed(routes: ListenerRoutes) -> ListenerRoutes:
    """The same listener looked up through a RouteIndex, whatever its size."""
    routes.index = RouteIndex(routes.candidates)
    return routes


def calls(routes: ListenerRoutes, session: tuple[str, str | None], port: int) -> int:
    """Python function and builtin calls made by one match (the first, uncounted, fills the caches)."""
    src, sni = session
    routes.match(src, 40000, None, port, sni)
    count = 0

    def profile(frame: object, event: str, arg: object) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    routes.match(src, 40000, None, port, sni)
    sys.setprofile(None)
    return count - 1            # setprofile(None) itself


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", type=int, action="append", help=f"route counts (default {ROUTES})")
    args = parser.parse_args(argv)
    counts = sorted(set(args.routes or ROUTES))
    print(f"µs per match, best of {REPEATS} (linear: every candidate scored; now: the router as built, "
          f"indexed above {LINEAR_MAX} candidate(s))\n")
    print("| listener | routes | linear | now | now / now with 1 route |")
    print("|---|---:|---:|---:|---:|")
    for kind in KINDS:
        port = kind.listen.port
        first = None
        for count in counts:
            before = per_session(linear(listener_routes(kind, count)[0]), kind.session(count // 2), port)
            now = per_session(*listener_routes(kind, count), port)
            first = first or now
            print(f"| {kind.name} | {count:,} | {before:.2f} | {now:.2f} | {now / first:.2f}× |")
    print("\nPython calls per match (the router uses the linear scoring up to LINEAR_MAX candidates)\n")
    print("| listener | routes | linear | indexed | the router |")
    print("|---|---:|---:|---:|---|")
    for kind in KINDS:
        for count in COUNTED:
            routes, session = listener_routes(kind, count)
            uses = "indexed" if routes.index is not None else "linear"
            print(f"| {kind.name} | {count} | {calls(linear(routes), session, kind.listen.port)} "
                  f"| {calls(indexed(routes), session, kind.listen.port)} | {uses} |")
    most = counts[-1]
    print(f"\nBuilding the router with {most:,} routes (once per worker)\n")
    for kind in KINDS:
        all_routes = tuple(kind.route(i) for i in range(most))
        started = time.perf_counter()
        Router(all_routes, (kind.listen,))
        built = time.perf_counter() - started
        tracemalloc.start()
        router = Router(all_routes, (kind.listen,))
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del router
        print(f"- {kind.name}: {built * 1e3:.0f} ms, {held / 1024:.0f} KiB held by the router "
              f"({held / most:.0f} bytes a route, the routes themselves not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
