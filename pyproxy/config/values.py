"""Single values of the configuration: durations, addresses, names, SNIs, networks, log formats.

Each parser takes what YAML gave (a str, an int, …) and returns the model's value, or raises `Invalid`
with a message meant for the user; the validator adds the file, line and key.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
from collections.abc import Callable, Iterable
from typing import TypeVar

from pyproxy.addresses import is_ip_address

from .errors import Invalid, describe
from .model import IPNetwork

T = TypeVar("T")
# Turns what YAML gave into the model's value of type T, or raises Invalid.
Converter = Callable[[object], T]

ACCESS_LOG_VARIABLES = (
    "remote_addr", "remote_port", "server_addr", "server_port", "protocol", "status", "bytes_sent",
    "bytes_received", "session_time", "upstream_addr", "upstream_bytes_sent", "upstream_bytes_received",
    "upstream_connect_time", "ssl_server_name", "ssl_protocol", "ssl_cipher", "ssl_client_verify",
    "ssl_client_s_dn", "ssl_client_fingerprint", "route", "service", "ssl_alpn_protocol",
    "time_local", "time_iso8601", "connection", "pid",
)

_DURATION_UNITS_MS = {"d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
# At most 12 digits: Python refuses to convert very long digit strings, and no timeout needs them.
_DURATION_PART = re.compile(r"\s*([0-9]{1,12})\s*(ms|d|h|m|s)")
_DURATION_DIGITS = re.compile(r"[0-9]{1,12}")
MAX_DURATION_MS = 365 * 86_400_000    # anything longer is a typo, and overflows timers

_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_NAME = re.compile(r"[A-Za-z0-9._~-]+")     # Kong's names: letters, digits and . - _ ~
_CONGESTION_NAME = re.compile(r"[a-z0-9_]{1,15}")    # the kernel's TCP_CA_NAME_MAX is 16 with the NUL
AVAILABLE_CONGESTION = "/proc/sys/net/ipv4/tcp_available_congestion_control"
_LOG_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z0-9_]+))?")


def did_you_mean(word: object, choices: Iterable[str], kind: str = "") -> str:
    """`; did you mean 'x'?` (`; did you mean upstream 'x'?` with a `kind`) when `word` is close to one of
    `choices`, else an empty string."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    what = f"{kind} " if kind else ""
    return f"; did you mean {what}{close[0]!r}?" if close else ""


def parse_duration(value: object) -> float:
    """Seconds in a duration: `500ms`, `30s`, `5m`, `1h`, `1d`, `1m30s`, or a bare integer of milliseconds.

    Raises Invalid (a ValueError) for a negative, malformed or absurdly long duration.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Invalid(f"expected a duration such as 500ms, 30s or 5m, got {describe(value)}")
    if isinstance(value, int):
        if value < 0:
            raise Invalid(f"a duration cannot be negative, got {describe(value)}")
        milliseconds = value
    else:
        milliseconds = _duration_text_ms(value)
    if milliseconds > MAX_DURATION_MS:
        raise Invalid(f"duration {describe(value)} is too long (at most 365d)")
    return milliseconds / 1000


def format_duration(seconds: float) -> str:
    """`seconds` as the file writes a duration (`1m30s`, `500ms`, `0s`): parse_duration reads it back."""
    milliseconds = round(seconds * 1000)
    parts = []
    for unit, size in _DURATION_UNITS_MS.items():     # from days down to milliseconds
        count, milliseconds = divmod(milliseconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _duration_text_ms(text: str) -> int:
    stripped = text.strip()
    if _DURATION_DIGITS.fullmatch(stripped):
        return int(stripped)
    parts = _DURATION_PART.findall(stripped)
    units = [unit for _, unit in parts]
    written = "".join(number + unit for number, unit in parts)
    # Like nginx: units from the largest to the smallest, each at most once ("1m30s", not "30s1m").
    in_order = sorted(units, key=lambda unit: -_DURATION_UNITS_MS[unit])
    if (not parts or written != re.sub(r"\s+", "", stripped) or units != in_order
            or len(set(units)) < len(units)):
        raise Invalid(f"expected a duration such as 500ms, 30s, 5m or 1m30s, got {describe(text)}")
    return sum(int(number) * _DURATION_UNITS_MS[unit] for number, unit in parts)


def parse_port(value: object) -> int:
    """A TCP port number, 1–65535 (YAML may give it as an int or a string of digits)."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,5}", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"expected a port number, got {describe(value)}")
    if not 1 <= value <= 65535:
        raise Invalid(f"port {describe(value)} is out of range (1-65535)")
    return value


def parse_address(text: object) -> tuple[str, int]:
    """`(ip, port)` for a listening address written like nginx's `listen`.

    `127.0.0.1:9000`, `[::1]:9000`, `0.0.0.0:9000`, `*:9000` (= 0.0.0.0) and a bare port `9000`
    (= 0.0.0.0:9000). The IP comes back normalised (`[0::0]` → `::`). Raises Invalid otherwise.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return "0.0.0.0", parse_port(text)
    if not isinstance(text, str):
        raise Invalid(f"expected an address such as 127.0.0.1:9000, got {describe(text)}")
    text = text.strip()
    if text.isascii() and text.isdigit():
        return "0.0.0.0", parse_port(text)
    if text.startswith("["):
        host, closing, port = text[1:].partition("]:")
        if not closing:
            raise Invalid(f"expected [IPv6]:PORT, got {describe(text)}")
        return _listen_ip(host, version=6), parse_port(port)
    host, colon, port = text.rpartition(":")
    if not colon:
        raise Invalid(f"expected ADDRESS:PORT (or a port alone), got {describe(text)}")
    if ":" in host:
        raise Invalid(f"write an IPv6 address in brackets, such as [::1]:9000, got {describe(text)}")
    if host == "*":
        host = "0.0.0.0"
    return _listen_ip(host, version=4), parse_port(port)


def _listen_ip(host: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise Invalid(f"expected an IPv{version} address to listen on, got {describe(host)}") from None
    if address.version != version:
        raise Invalid(f"expected an IPv{version} address to listen on, got {describe(host)}")
    return str(address)


def is_hostname(text: str) -> bool:
    """True for a DNS name (letters, digits, `-`, `_`; a trailing dot allowed; not all-numeric)."""
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    return (
        0 < len(text) <= 253
        and all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()      # "10.0.0" is a broken address, not a name
    )


def parse_host_port(text: object, default_port: int) -> tuple[str, int]:
    """`(host, port)` from `host:port`, `[v6]:port`, a bare IPv6 address or a bare host.

    The host may be an IP address (returned normalised) or a hostname (returned as written).
    """
    if not isinstance(text, str):
        raise Invalid(f"expected HOST:PORT, got {describe(text)}")
    text = text.strip()
    if text.startswith("["):
        host, closing, rest = text[1:].partition("]")
        if not closing or (rest and not rest.startswith(":")):
            raise Invalid(f"expected [IPv6]:PORT, got {describe(text)}")
        if not _is_ipv6(host):
            raise Invalid(f"{describe(host)} is not an IPv6 address")
        port = parse_port(rest[1:]) if rest else default_port
        return str(ipaddress.ip_address(host)), port
    if text.count(":") > 1:
        if not _is_ipv6(text):
            raise Invalid(f"expected HOST:PORT (IPv6 addresses in brackets), got {describe(text)}")
        return str(ipaddress.ip_address(text)), default_port
    host, colon, port_text = text.partition(":")
    port = parse_port(port_text) if colon else default_port
    return parse_host(host), port


def parse_host(value: object) -> str:
    """A hostname (as written) or a literal IP address (normalised)."""
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a hostname or an IP address, got {describe(value)}")
    if is_ip_address(value):
        return str(ipaddress.ip_address(value))
    if not is_hostname(value):
        raise Invalid(f"expected a hostname or an IP address, got {describe(value)}")
    return value


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def parse_network(value: object) -> IPNetwork:
    """An IP network from `10.0.0.0/8` or a single address (`10.1.2.3` = /32); host bits are ignored."""
    if not isinstance(value, str):
        raise Invalid(f"expected an IP address or CIDR such as 10.0.0.0/8, got {describe(value)}")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise Invalid(f"expected an IP address or CIDR such as 10.0.0.0/8, got {describe(value)}") from None


def parse_sni(value: object) -> str:
    """A lower-cased SNI pattern: `host.example`, `*.example.com` (leftmost) or `example.*` (rightmost)."""
    if not isinstance(value, str):
        raise Invalid(f"expected a server name, got {describe(value)}")
    sni = value.strip().lower()
    if sni.startswith("*."):
        rest = sni[2:]
    elif sni.endswith(".*"):
        rest = sni[:-2]
    else:
        rest = sni
    if "*" in rest or rest.endswith(".") or not is_hostname(rest):
        raise Invalid(f"invalid server name {describe(value)}: expected host.example, "
                      "a leftmost wildcard *.example.com or a rightmost one example.*")
    return sni


def parse_name(value: object) -> str:
    """An entity name: Kong's alphabet (letters, digits, `.`, `-`, `_`, `~`), so it reads well in logs."""
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a name, got {describe(value)}")
    if not _NAME.fullmatch(value):
        raise Invalid(f"invalid name {describe(value)}: use letters, digits, '.', '-', '_' and '~'")
    return value


def parse_text(value: object) -> str:
    """A non-empty string without NUL characters (those cannot reach a path or a C library)."""
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {describe(value)}")
    if not value:
        raise Invalid("expected a non-empty string")
    if "\0" in value:
        raise Invalid(f"{describe(value)} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"{describe(value)} is not valid Unicode text") from None
    return value


def in_folder(base: str, value: object) -> str:
    """A path from the file, made absolute relative to the configuration file's folder `base`."""
    return os.path.normpath(os.path.join(base, parse_text(value)))


def parse_bool(value: object) -> bool:
    """true / false (YAML also reads yes/no and on/off as booleans)."""
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {describe(value)}")
    return value


def integer(minimum: int, maximum: int | None = None) -> Converter[int]:
    """A converter for an integer in [minimum, maximum]."""
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected an integer, got {describe(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            limits = f"{minimum}-{maximum}" if maximum is not None else f"at least {minimum}"
            raise Invalid(f"{describe(value)} is out of range ({limits})")
        return value
    return convert


def one_of(choices: Iterable[str]) -> Converter[str]:
    """A converter accepting exactly one of `choices`."""
    choices = tuple(choices)

    def convert(value: object) -> str:
        if value not in choices or not isinstance(value, str):
            allowed = ", ".join(choices)
            raise Invalid(f"expected one of {allowed}, got {describe(value)}{did_you_mean(value, choices)}")
        return value
    return convert


def positive_duration(value: object) -> float:
    """A duration that must be longer than zero (a timeout)."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise Invalid("must be longer than 0")
    return seconds


def parse_log_format(value: object) -> str:
    """An access log format whose `$variable` / `${variable}` names are all known."""
    text = parse_text(value)
    for match in _LOG_VARIABLE.finditer(text):
        name = match.group("braced") or match.group("plain")
        if not name:
            raise Invalid(f"'$' at offset {match.start()} is not followed by a variable name"
                          " (write $name or ${name})")
        if name not in ACCESS_LOG_VARIABLES:
            raise Invalid(f"unknown variable {'$' + name!r}{did_you_mean(name, ACCESS_LOG_VARIABLES)}")
    return text


def usable_congestion_control(value: object) -> str:
    """A TCP congestion control algorithm (`cubic`, `reno`, `bbr`…) this host lets us set on a socket.

    Tried for real on a throwaway socket: the kernel alone knows whether the module exists, can be
    loaded, and is allowed for this user."""
    if not isinstance(value, str) or not _CONGESTION_NAME.fullmatch(value):
        raise Invalid("expected the name of a TCP congestion control algorithm such as "
                      f"cubic, got {describe(value)}")
    refused = congestion_control_refused(value)
    if refused is not None:
        try:
            with open(AVAILABLE_CONGESTION) as available:
                names = available.read().split()
        except OSError:
            names = []
        listed = f"; this host has {', '.join(names)}" if names else ""
        raise Invalid(f"TCP congestion control {value!r} cannot be used here ({refused}){listed}"
                      f"{did_you_mean(value, names)}")
    return value


def congestion_control_refused(name: str) -> str | None:
    """Why this process cannot set TCP congestion control `name` on a socket; None when it can."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
