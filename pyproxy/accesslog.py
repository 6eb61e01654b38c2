"""The access log: one line per session in `access_log_format`, compiled once per configuration.

Variables follow nginx's stream module ($bytes_sent is what the client was sent, $bytes_received
what it sent). Lines are buffered for the duration of one loop tick and written in chunks of at most
PIPE_BUF bytes cut at line ends, so lines from several workers sharing stdout never tear.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyproxy.log import open_append
from pyproxy.tls.stream import TLSStream

if TYPE_CHECKING:
    from pyproxy.session import Session

Getter = Callable[["Session"], str]

PIPE_BUF = 4096
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


class _Clock:
    """Formatted wall-clock strings, recomputed at most once per second."""

    def __init__(self) -> None:
        self.second = -1
        self.local = self.iso = ""

    def refresh(self) -> None:
        now = int(time.time())
        if now != self.second:
            self.second = now
            tm = time.localtime(now)
            self.local = time.strftime("%d/%b/%Y:%H:%M:%S %z", tm)
            offset = time.strftime("%z", tm)
            self.iso = time.strftime("%Y-%m-%dT%H:%M:%S", tm) + offset[:3] + ":" + offset[3:]


CLOCK = _Clock()


def _dash(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _client_certificate(s: Session, binary_form: bool) -> Any:
    """The certificate the client presented to a completed handshake (DER, or the dict Python makes
    of a verified one), or None."""
    client = s.client
    if type(client) is not TLSStream or s.ssl_cipher is None:
        return None
    return client.obj.getpeercert(binary_form)


def _alpn_protocol(s: Session) -> str:
    """nginx's $ssl_alpn_protocol: the protocol a terminating handshake selected (ssl.alpn)."""
    client = s.client
    if type(client) is not TLSStream or s.ssl_cipher is None:
        return "-"
    return _dash(client.obj.selected_alpn_protocol())


def _client_verify(s: Session) -> str:
    """nginx's $ssl_client_verify: SUCCESS, NONE, or FAILED:reason (noted by the failed handshake)."""
    noted = s.annotation("ssl_client_verify")
    if noted is not None:
        return str(noted)
    if s.ssl_cipher is None:
        return "-"
    return "NONE" if _client_certificate(s, True) is None else "SUCCESS"


# The short names OpenSSL writes in an RFC 2253 name; Python's dict has the long ones.
_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
    "localityName": "L", "stateOrProvinceName": "ST", "domainComponent": "DC", "streetAddress": "street",
    "userId": "UID", "surname": "SN", "givenName": "GN",
}
_RFC2253_SPECIAL = re.compile(r'([,+"\\<>;])')


def _rfc2253_value(value: str) -> str:
    value = _RFC2253_SPECIAL.sub(r"\\\1", value)
    if value.endswith(" "):
        value = value[:-1] + "\\ "
    if value[:1] in ("#", " "):
        value = "\\" + value
    return value


def rfc2253_subject(cert: dict[str, Any]) -> str:
    """The subject of a certificate as getpeercert() gives it, in RFC 2253 as OpenSSL and nginx
    write it (`O=Example,CN=alice`)."""
    return ",".join("+".join(f"{_SHORT_NAMES.get(name, name)}={_rfc2253_value(value)}" for name, value in rdn)
                    for rdn in reversed(cert["subject"]))


def _client_subject(s: Session) -> str:
    """nginx's $ssl_client_s_dn: the verified client certificate's subject, RFC 2253 (`CN=…,O=…`)."""
    cert = _client_certificate(s, False)
    if not cert or "subject" not in cert:
        return "-"
    return rfc2253_subject(cert)


def _client_fingerprint(s: Session) -> str:
    """nginx's $ssl_client_fingerprint: the SHA-1 of the client certificate's DER, in hex."""
    der = _client_certificate(s, True)
    return "-" if der is None else hashlib.sha1(der).hexdigest()


# Each getter takes a finished session (pyproxy.session.Session) and returns the text to print.
GETTERS: dict[str, Getter] = {
    "remote_addr": lambda s: s.client_addr[0],
    "remote_port": lambda s: str(s.client_addr[1]),
    "server_addr": lambda s: s.local_ip(),
    "server_port": lambda s: str(s.listen.port),
    "protocol": lambda s: s.protocol,
    "status": lambda s: str(s.status),
    "bytes_sent": lambda s: str(s.bytes_sent()),
    "bytes_received": lambda s: str(s.bytes_received()),
    "session_time": lambda s: f"{s.ended - s.started:.3f}",
    "upstream_addr": lambda s: ", ".join(p.name for p in s.tried) if s.tried else "-",
    "upstream_bytes_sent": lambda s: str(s.upstream_bytes_sent()),
    "upstream_bytes_received": lambda s: str(s.upstream_bytes_received()),
    "upstream_connect_time": lambda s: "-" if s.connect_time is None else f"{s.connect_time:.3f}",
    "ssl_server_name": lambda s: _dash(s.sni),
    "ssl_protocol": lambda s: _dash(s.ssl_protocol),
    "ssl_cipher": lambda s: _dash(s.ssl_cipher),
    "ssl_client_verify": _client_verify,
    "ssl_client_s_dn": _client_subject,
    "ssl_client_fingerprint": _client_fingerprint,
    "ssl_alpn_protocol": _alpn_protocol,
    "route": lambda s: s.route.name if s.route is not None else "-",
    "service": lambda s: s.route.service if s.route is not None else "-",
    "time_local": lambda s: CLOCK.local,
    "time_iso8601": lambda s: CLOCK.iso,
    "connection": lambda s: str(s.serial),
    "pid": lambda s: str(os.getpid()),
}


def compile_format(fmt: str) -> Getter:
    """Turn `access_log_format` into a function session → line (without the newline)."""
    parts: list[str | Getter] = []
    pos = 0
    for m in VARIABLE.finditer(fmt):
        if m.start() > pos:
            parts.append(fmt[pos:m.start()])
        name = m.group(1) or m.group(2)
        parts.append(GETTERS[name])     # the config loader already rejected unknown names
        pos = m.end()
    if pos < len(fmt):
        parts.append(fmt[pos:])

    def render(session: Session) -> str:
        # `type(p) is str` is the fastest test in CPython 3.11 (isinstance and p.__class__ cost ~20 %
        # more per line), but mypy cannot rule out a str subclass after it: the rest are getters.
        return "".join(p if type(p) is str else p(session) for p in parts)  # type: ignore[operator]

    return render


class AccessLog:
    """Buffered access-log writer; `flush()` runs once per loop tick."""

    def __init__(self, target: str | None, fmt: str):
        self.target = target
        self.render = compile_format(fmt)
        self.fd = -1
        self.lines: list[str] = []
        self.reopen(first=True)

    def reopen(self, first: bool = False) -> None:
        """Open the target (again, after logrotate). The first open raises OSError, so a worker that
        cannot write its access log does not start; a failed reopen keeps the old file."""
        old = self.fd
        if self.target is None:
            self.fd = -1
        elif self.target == "stdout":
            self.fd = 1
        elif self.target == "stderr":
            self.fd = 2
        else:
            try:
                self.fd = open_append(self.target)
            except OSError:
                if first:
                    raise
                return      # keep writing to the old file
        if old > 2 and old != self.fd:
            os.close(old)

    def write(self, session: Session) -> None:
        if self.fd >= 0:
            CLOCK.refresh()
            self.lines.append(self.render(session) + "\n")

    def flush(self) -> None:
        if not self.lines:
            return
        data = "".join(self.lines).encode("utf-8", "replace")
        self.lines.clear()
        view = memoryview(data)
        try:
            while view:
                chunk = view[:PIPE_BUF]
                if len(view) > PIPE_BUF:
                    cut = bytes(chunk).rfind(b"\n") + 1
                    chunk = view[:cut or PIPE_BUF]
                written = os.write(self.fd, chunk)
                view = view[written:]
        except OSError:
            pass        # a full disk or closed stdout must not end sessions

    def close(self) -> None:
        self.flush()
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1
