"""OCSP response files (`certificates[].ocsp_response`): what -t checks and what a stapling
context sends (pyproxy.tls.stapling, loaded only when a certificate has one)."""

from __future__ import annotations


class OCSPResponseError(ValueError):
    """The response file cannot be read or is not DER."""


def read_response(path: str) -> bytes:
    """The DER OCSPResponse in `path`; OCSPResponseError when it cannot be one."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise OCSPResponseError(f"cannot read {path} ({exc.strerror})") from None
    if not data or data[0] != 0x30:       # a DER SEQUENCE; PEM or text is not what OpenSSL sends
        raise OCSPResponseError(f"{path} is not a DER OCSP response (openssl ocsp -respout writes one)")
    return data
