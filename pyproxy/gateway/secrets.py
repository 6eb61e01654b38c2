"""TLS Secrets → certificate files the configuration can name.

`check_pair` decides whether a Secret's `tls.crt`/`tls.key` is a usable key pair with the very checks
`pyproxy -t` makes on files (`pyproxy.config.tlsfiles.load_certificate_pair`), reading the PEM from
memory files so that the translation writes nothing; a pair this process found usable already is only
checked for its dates (a reload's loader child inherits what the start checked). `pem_paths` names
the files after their content, so an unchanged Secret keeps its paths across translations;
`write_pem_files` writes them (0600).
"""

from __future__ import annotations

import hashlib
import os
import ssl

from pyproxy.config.sections import Place, Report
from pyproxy.config.tlsfiles import certificate_names, load_certificate_pair, usable_pair


def check_pair(certificate: bytes, key: bytes) -> tuple[tuple[str, ...], str | None]:
    """`(names the certificate covers, None)` for a usable pair, else `((), why not)`."""
    known = usable_pair(certificate, key)
    if known is not None:
        return certificate_names(known), None
    descriptors = []
    try:
        for label, data in (("tls.crt", certificate), ("tls.key", key)):
            descriptor = os.memfd_create(label, os.MFD_CLOEXEC)
            descriptors.append(descriptor)
            with open(descriptor, "wb", closefd=False) as memory_file:
                memory_file.write(data)
        report = Report("secret")
        cert_path, key_path = (f"/proc/self/fd/{descriptor}" for descriptor in descriptors)
        decoded = load_certificate_pair(report, Place("tls.crt", 1), Place("tls.key", 1), cert_path, key_path)
    finally:
        for descriptor in descriptors:
            os.close(descriptor)
    if decoded is None:
        reason = report.errors[0].message if report.errors else "unusable"
        return (), reason.replace(cert_path, "tls.crt").replace(key_path, "tls.key")
    return certificate_names(decoded), None


def pem_paths(folder: str, certificate: bytes, key: bytes) -> tuple[str, str]:
    """`(certificate path, key path)` in `folder`, named by a hash of both contents."""
    digest = hashlib.sha256(certificate + b"\0" + key).hexdigest()[:24]
    return os.path.join(folder, f"tls-{digest}.crt"), os.path.join(folder, f"tls-{digest}.key")


def check_ca_bundle(pem: str) -> str | None:
    """None when `pem` holds CA certificates OpenSSL loads (what `tls_verify` will trust), else why not."""
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as error:
        return f"no usable PEM CA certificate ({getattr(error, 'reason', None) or error})"
    return None


def ca_path(folder: str, content: bytes) -> str:
    """Where a CA bundle is written, named by a hash of its content."""
    return os.path.join(folder, f"ca-{hashlib.sha256(content).hexdigest()[:24]}.crt")


def write_pem_files(files: dict[str, bytes]) -> None:
    """Write each `path: content` (mode 0600, folders 0700), leaving a file with that content as is.

    A file is written beside its path and renamed over it, so a reader never sees half of one.
    """
    for path, content in files.items():
        try:
            with open(path, "rb") as existing:
                if existing.read() == content:
                    continue
        except FileNotFoundError:
            pass
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(descriptor, "wb") as stream:
            stream.write(content)
        os.replace(temporary, path)
