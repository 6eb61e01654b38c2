"""`ip-restriction`: allow or deny sessions by client address (IPv4 and IPv6 CIDRs), status 403.

    config: {allow: [127.0.0.0/8, "::1"], deny: [127.0.0.5]}

With `allow`, a client outside every allowed network is refused; a client inside a `deny` network
is refused whatever `allow` says (Kong's ip-restriction: deny wins). The client address is the one
PROXY protocol announced, when the listener has it.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from pyproxy.config.model import STATUS_FORBIDDEN
from pyproxy.plugins import Plugin, PluginConfig, PluginContext, register, unknown_keys

if TYPE_CHECKING:
    from pyproxy.session import Session


def _networks(items: list[object]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(str(item), strict=False) for item in items]


@register
class IpRestriction(Plugin):
    name = "ip-restriction"
    priority = 3000

    @classmethod
    def check(cls, config: PluginConfig) -> list[tuple[str, str]]:
        problems = unknown_keys(config, ("allow", "deny"))
        if not config.get("allow") and not config.get("deny"):
            problems.append(("allow", "ip-restriction needs allow or deny (or both)"))
        for key in ("allow", "deny"):
            items = config.get(key, [])
            if not isinstance(items, list):
                problems.append((key, "expected a list of addresses or CIDR networks"))
                continue
            for i, item in enumerate(items):
                try:
                    ipaddress.ip_network(str(item), strict=False)
                except ValueError:
                    problems.append((f"{key}[{i}]", f"not an IP address or CIDR network: {item!r}"))
        return problems

    def __init__(self, config: PluginConfig, context: PluginContext):
        super().__init__(config, context)
        self.allow = _networks(config.get("allow", []))
        self.deny = _networks(config.get("deny", []))
        self.cache: dict[str, bool] = {}

    def allowed(self, address: str) -> bool:
        verdict = self.cache.get(address)
        if verdict is None:
            ip = ipaddress.ip_address(address)
            denied = any(ip in net for net in self.deny if net.version == ip.version)
            listed = not self.allow or any(ip in net for net in self.allow if net.version == ip.version)
            verdict = listed and not denied
            if len(self.cache) > 10000:          # bounded: a scan from many addresses cannot grow it
                self.cache.clear()
            self.cache[address] = verdict
        return verdict

    def access(self, session: Session) -> int | None:
        if self.allowed(session.client_addr[0]):
            return None
        session.log("info", f"ip-restriction: client {session.client_addr[0]} is not allowed")
        return STATUS_FORBIDDEN
