"""A worked example of a pyproxy plugin: refuse TLS sessions by SNI, and count what it refused.

Use it by putting this file beside the configuration (or anywhere on PYTHONPATH) and writing:

    plugin_modules: [deny_sni]
    plugins:
      - name: deny-sni
        route: my-tls-route
        config: {names: [old.example.com, "*.internal.example"], status: 403}
"""

from __future__ import annotations

from pyproxy.plugins import Plugin, register


@register
class DenySni(Plugin):
    name = "deny-sni"
    priority = 2000           # after ip-restriction (3000), before the limits (1000, 900)

    @classmethod
    def check(cls, config):
        """Runs at start, reload and `pyproxy -t`: each problem becomes FILE:LINE: plugins[i].config.KEY."""
        problems = [(key, "unknown key; deny-sni takes names and status") for key in config
                    if key not in ("names", "status")]
        names = config.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            problems.append(("names", "expected a list of server names"))
        if config.get("status", 403) not in (400, 403, 404, 503):
            problems.append(("status", "expected 400, 403, 404 or 503"))
        return problems

    def __init__(self, config, context):
        super().__init__(config, context)                   # keeps self.config and self.context
        self.exact = {n.lower() for n in config["names"] if not n.startswith("*.")}
        self.suffixes = tuple(n[1:].lower() for n in config["names"] if n.startswith("*."))
        self.status = config.get("status", 403)
        self.refused = 0

    def access(self, session):
        """After routing, before an upstream is chosen: None lets the session on, a status ends it."""
        sni = session.sni                  # None for plain TCP or a hello without SNI
        if sni and (sni in self.exact or sni.endswith(self.suffixes)):
            self.refused += 1
            session.annotate(self.name, sni)                # seen again in log()
            session.log("info", f"deny-sni: refusing {sni}")     # "...; client: ..., server: ..."
            return self.status
        return None

    def log(self, session):
        """After the session ended (refused or not); keep it cheap, it runs for every session."""
        if session.annotation(self.name) and self.refused % 100 == 0:
            self.context.log("notice", f"deny-sni: {self.refused} session(s) refused by this worker so far")
