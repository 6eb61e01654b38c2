"""`file-log`: one JSON object per session, appended to a file (Kong's file-log, stream flavour).

    - name: file-log
      config: {path: logs/sessions.json}     # relative to the config file's folder

Each line: {"session": {...}, "client": {...}, "server": {...}, "upstream": {...}, "tls": {...} | null,
"route": name, "service": name, "started_at": epoch ms, "worker": pid}. The file is opened with
O_APPEND and reopened on USR1 with the other logs; each line is one write, so workers never tear
each other's lines.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from pyproxy.plugins import Plugin, PluginConfig, PluginContext, register, unknown_keys

if TYPE_CHECKING:
    from pyproxy.session import Session


def session_record(session: Session) -> dict[str, Any]:
    """What a session looked like, for structured logs (also the shape metrics code can reuse)."""
    wall_end = time.time()
    tls = None
    if session.protocol != "tcp":
        tls = {"sni": session.sni, "protocol": session.ssl_protocol, "cipher": session.ssl_cipher,
               "passthrough": session.protocol == "tls_passthrough"}
    return {
        "session": {"id": session.serial, "protocol": session.protocol, "status": session.status,
                    "received": session.bytes_received(), "sent": session.bytes_sent(),
                    "duration": round(session.ended - session.started, 6)},
        "client": {"ip": session.client_addr[0], "port": session.client_addr[1]},
        "server": {"ip": session.local_ip(), "port": session.listen.port},
        "upstream": {"tried": [p.name for p in session.tried],
                     "sent": session.upstream_bytes_sent(), "received": session.upstream_bytes_received(),
                     "connect_time": (None if session.connect_time is None
                                      else round(session.connect_time, 6))},
        "tls": tls,
        "route": session.route.name if session.route else None,
        "service": session.route.service if session.route else None,
        "started_at": int((wall_end - (session.ended - session.started)) * 1000),
        "worker": os.getpid(),
    }


@register
class FileLog(Plugin):
    name = "file-log"
    priority = 5          # loggers run last (Kong: 9)

    @classmethod
    def check(cls, config: PluginConfig) -> list[tuple[str, str]]:
        problems = unknown_keys(config, ("path",))
        path = config.get("path")
        if not isinstance(path, str) or not path:
            problems.append(("path", "expected the path of the file to write"))
        return problems

    def __init__(self, config: PluginConfig, context: PluginContext):
        super().__init__(config, context)
        self.path = os.path.join(context.base, config["path"])
        self.fd = -1
        self.reopen(first=True)

    def reopen(self, first: bool = False) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if first:
                raise
            self.context.log("error", f'file-log: cannot reopen "{self.path}": {exc.strerror}')
            return
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def log(self, session: Session) -> None:
        line = json.dumps(session_record(session), separators=(",", ":")) + "\n"
        try:
            os.write(self.fd, line.encode())
        except OSError as exc:
            self.context.log("error", f'file-log: cannot write "{self.path}": {exc.strerror}')

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
