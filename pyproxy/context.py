"""What a session needs of the worker it runs in, declared in one frozen object.

A worker builds one `WorkerContext` at the end of `Worker.init_process` and hands it to every
session it starts; sessions read nothing else of the worker. So a session can also run without a
worker process: a test builds a context around its own loop and sockets (tests/unit/test_session.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyproxy.config.model import Config, Service
    from pyproxy.forward import PipePool
    from pyproxy.log import ErrorLog
    from pyproxy.loop import Loop
    from pyproxy.metrics import WorkerMetrics
    from pyproxy.plugins import PluginChains
    from pyproxy.router import Router
    from pyproxy.session import Connection, Session
    from pyproxy.tls.contexts import ServerTLS, UpstreamTLS
    from pyproxy.upstream import Balancer


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """One worker's shared state for its sessions. Frozen: a session may keep a reference to any
    part of it for its whole life. Slots: reading a field costs what reading a worker attribute did."""

    loop: Loop
    config: Config                      # the generation's settings (proxy_protocol_timeout, ssl.*)
    log: ErrorLog
    router: Router
    services: dict[str, Service]        # by name, as a route names its service
    balancers: dict[str, Balancer]      # by service name: each service's peers and their health
    plugins: PluginChains
    server_tls: ServerTLS | None        # None when no listener has `ssl`
    upstream_tls: dict[str, UpstreamTLS]    # by service name, for the services with protocol tls
    congestion: dict[str, bytes]        # by service name: the `tcp_congestion` this worker may set
    scratch: memoryview                 # the worker's one scratch buffer (forward.SCRATCH_SIZE)
    pool: PipePool                      # pipes for splice
    metrics: WorkerMetrics | None       # None without a status listener
    # The log phase: called once by Session.close with the finished session (access log, metrics,
    # the plugins' log hooks; the worker also forgets the session there).
    closed: Callable[[Session], None]
    # A refused client's socket, already shut down for writing, to read until its FIN (see
    # session.LingeringClose).
    linger: Callable[[Connection], None]
    # Services with a reject_share: how far each is into refusing its next session (rejected()).
    reject_credit: dict[str, float]

    def rejected(self, service: Service) -> bool:
        """Whether this new session of `service` falls in its `reject_share`. Each session adds the
        share to the service's credit and a refusal pays one back, so a worker refuses exactly that
        share of its sessions, evenly spread (0.3: the 4th, 7th and 10th of every ten), as smooth
        weighted round robin spreads a target's."""
        credit = self.reject_credit.get(service.name, 0.0) + service.reject_share
        refused = credit >= 1.0 - 1e-9
        self.reject_credit[service.name] = credit - 1.0 if refused else credit
        return refused
