"""Certificate, private key and CA files: present, readable, paired, in date, and the names they cover.

`pyproxy -t` promises to load every certificate and key, so these checks use the same OpenSSL calls
the workers will make (`load_cert_chain`, `create_default_context`).
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .sections import Place, Report

DecodedCertificate = dict[str, Any]   # the dict form of ssl.SSLSocket.getpeercert()

# Key pairs this process found usable, by the SHA-256 of both contents (pair_digest): their decoded
# certificate and its validity in seconds (_validity). A pair checked once is not loaded into OpenSSL
# again (its dates and the key file's mode are checked each time): a Gateway Secret is checked by the
# translation and again as the file it is written to, and the loader child of a reload, forked from
# the master, inherits what the start checked, so a reload that changes routes costs no certificate
# check (1,000 pairs: ~1.3 s of OpenSSL).
_USABLE_PAIRS: dict[bytes, tuple[DecodedCertificate, tuple[float, float] | None]] = {}
# Within `keeping_checked_contexts()` (a start: its configuration checked, then its SSL contexts made
# in the same process), the SSL context each usable key pair was checked with, by pair_digest, for
# `checked_context` to give once: the pair is not loaded into OpenSSL a second time (10,000 pairs:
# ~1.1 ms each). None otherwise: a reload's loader child, whose contexts the master cannot use, or
# the Admin API's checks keep none.
_CHECKED_CONTEXTS: dict[bytes, ssl.SSLContext] | None = None


class _EncryptedKey(Exception):
    """Raised from the password callback: we never prompt for a passphrase."""


def _refuse_password() -> bytes:
    raise _EncryptedKey()


def check_readable_file(report: Report, place: Place, path: str) -> bool:
    """True if `path` is a regular file we can read; otherwise report why at `place`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        report.error(place, f"no such file: {path}")
        return False
    except OSError as error:
        report.error(place, f"cannot access {path}: {error.strerror or error}")
        return False
    if not stat.S_ISREG(mode):
        report.error(place, f"not a regular file: {path}")
        return False
    if not os.access(path, os.R_OK):
        report.error(place, f"permission denied: {path}")
        return False
    return True


def load_certificate_pair(report: Report, cert_place: Place, key_place: Place,
                          cert_path: str, key_path: str) -> DecodedCertificate | None:
    """Check a certificate and its private key as the workers will load them.

    Returns the decoded certificate when it is usable, None after reporting why it is not.
    """
    cert_readable = check_readable_file(report, cert_place, cert_path)
    key_readable = check_readable_file(report, key_place, key_path)
    if not (cert_readable and key_readable):
        return None
    try:
        digest = _pair_digest(cert_path, key_path)
    except OSError:
        digest = b""            # reported by the checks below, which read the files again
    known = _USABLE_PAIRS.get(digest)
    if known is not None:
        if not _check_dates(report, cert_place, cert_path, *known):
            return None
        _check_key_permissions(report, key_place, key_path)
        return known[0]
    try:
        decoded = _decode_certificate(cert_path)
    except (ssl.SSLError, OSError) as error:
        report.error(cert_place, f"not a PEM certificate: {cert_path} ({_reason(error)})")
        return None
    validity = _validity(decoded)
    if not _check_dates(report, cert_place, cert_path, decoded, validity):
        return None
    _check_key_permissions(report, key_place, key_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path, password=_refuse_password)
    except _EncryptedKey:
        report.error(key_place,
                     f"the private key {key_path} is encrypted; pyproxy needs it without a passphrase")
        return None
    except (ssl.SSLError, OSError) as error:
        if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
            report.error(key_place, f"the private key {key_path} does not match the certificate {cert_path}")
        else:
            report.error(key_place, f"cannot load the private key {key_path} with its certificate "
                                    f"({_reason(error)})")
        return None
    try:
        if digest and _pair_digest(cert_path, key_path) == digest:     # not replaced while checked
            _USABLE_PAIRS[digest] = decoded, validity
            if _CHECKED_CONTEXTS is not None:
                _CHECKED_CONTEXTS[digest] = context
    except OSError:
        pass
    return decoded


@contextmanager
def keeping_checked_contexts() -> Iterator[None]:
    """Keep the contexts key pairs are checked with, for `checked_context`, until the block ends."""
    global _CHECKED_CONTEXTS
    _CHECKED_CONTEXTS = {}
    try:
        yield
    finally:
        _CHECKED_CONTEXTS = None


def checked_context(cert_path: str, key_path: str) -> ssl.SSLContext | None:
    """The context the pair in these files (as they are now) was checked with, kept by
    `keeping_checked_contexts`, with nothing but that pair loaded; given once, None otherwise."""
    if not _CHECKED_CONTEXTS:
        return None
    try:
        return _CHECKED_CONTEXTS.pop(_pair_digest(cert_path, key_path), None)
    except OSError:
        return None


def _pair_digest(cert_path: str, key_path: str) -> bytes:
    with open(cert_path, "rb") as cert_file, open(key_path, "rb") as key_file:
        return pair_digest(cert_file.read(), key_file.read())


def pair_digest(certificate: bytes, key: bytes) -> bytes:
    """What identifies a key pair whatever its files are called: a hash of both contents."""
    return hashlib.sha256(certificate + b"\0" + key + b"\0").digest()


def usable_pair(certificate: bytes, key: bytes) -> DecodedCertificate | None:
    """The decoded certificate of a key pair, given as its contents, that this process found usable
    already and that is still in date; otherwise None (`load_certificate_pair` says why not)."""
    known = _USABLE_PAIRS.get(pair_digest(certificate, key))
    if known is None or not _check_dates(Report(""), Place("", 1), "", *known):
        return None
    return known[0]


def _decode_certificate(path: str) -> DecodedCertificate:
    """The only stdlib way to read a certificate's fields from a file: a private helper of the ssl
    module's C part, which typeshed does not describe."""
    decode: Callable[[str], DecodedCertificate] = ssl._ssl._test_decode_cert  # type: ignore[attr-defined]
    return decode(path)


def _validity(decoded: DecodedCertificate) -> tuple[float, float] | None:
    """`(notBefore, notAfter)` in seconds since the epoch; None when they cannot be read."""
    try:
        return ssl.cert_time_to_seconds(decoded["notBefore"]), ssl.cert_time_to_seconds(decoded["notAfter"])
    except (KeyError, ValueError):
        return None


def _check_dates(report: Report, place: Place, path: str, decoded: DecodedCertificate,
                 validity: tuple[float, float] | None) -> bool:
    if validity is None:
        report.error(place, f"cannot read the validity dates of {path}")
        return False
    not_before, not_after = validity
    now = time.time()
    if not_after < now:
        report.error(place, f"the certificate {path} expired on {decoded['notAfter']}")
        return False
    if not_before > now:
        report.warn(place, f"the certificate {path} is not valid before {decoded['notBefore']}")
    return True


def _check_key_permissions(report: Report, place: Place, path: str) -> None:
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        report.warn(place, f"the private key {path} is readable by group or others "
                           f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")


def _reason(error: OSError) -> str:
    """OpenSSL's words for what went wrong, without the CPython source location."""
    reason = getattr(error, "reason", None)
    if reason:
        return str(reason)
    text = error.strerror or (error.args[-1] if error.args else "") or str(error)
    return re.sub(r"^\[\w+\] | \(_ssl\.c:\d+\)$", "", str(text))


def certificate_names(decoded: DecodedCertificate) -> tuple[str, ...]:
    """The host names a certificate covers, lower-cased: its DNS subjectAltNames, else its CN."""
    names = [value for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        names = [value for rdn in decoded.get("subject", ()) for name, value in rdn if name == "commonName"]
    unique: dict[str, None] = {}
    for name in names:
        unique[name.lower()] = None
    return tuple(unique)


def check_ca_file(report: Report, place: Place, path: str, what: str = "CA certificates") -> bool:
    """True if `path` is a PEM bundle of CA certificates (or `what` else OpenSSL loads as a CA
    file: CRLs) OpenSSL can load; otherwise report why."""
    if not check_readable_file(report, place, path):
        return False
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as error:
        report.error(place, f"cannot load {what} from {path} ({_reason(error)})")
        return False
    return True
