"""OCSP stapling from a response file: `certificates[].ocsp_response` (imported only then).

Python's ssl module cannot staple (it has no SSL_CTX_set_tlsext_status_cb), so this reaches the
OpenSSL that `_ssl` is linked with through ctypes, as little as it must: one status callback per
server context whose certificate has a response file. OpenSSL calls it during a handshake whose
client asked for the certificate's status (`status_request`: browsers, `openssl s_client -status`,
`curl --cert-status`); others cost nothing. The callback hands OpenSSL a copy of the response
(DER, as `openssl ocsp -respout` writes it), which OpenSSL frees after sending it.

The file is read where the context is made (the master, before forking) and read again by a
worker when it changed: at most one stat() per second, in a handshake that asks for the status.
Nothing here fetches from a responder (renew the file with a cron job, certbot's hook, ...).
"""

from __future__ import annotations

import _ssl
import ctypes
import os
import ssl
import time

from pyproxy.tls.ocsp import OCSPResponseError, read_response

_LIB = ctypes.CDLL(_ssl.__file__)        # its symbols include libssl's and libcrypto's
_SSL_CTX_callback_ctrl = _LIB.SSL_CTX_callback_ctrl
_SSL_CTX_callback_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
_SSL_CTX_callback_ctrl.restype = ctypes.c_long
_SSL_ctrl = _LIB.SSL_ctrl
_SSL_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
_SSL_ctrl.restype = ctypes.c_long
_CRYPTO_malloc = _LIB.CRYPTO_malloc
_CRYPTO_malloc.argtypes = [ctypes.c_size_t, ctypes.c_char_p, ctypes.c_int]
_CRYPTO_malloc.restype = ctypes.c_void_p

SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB = 63
SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP = 71
SSL_TLSEXT_ERR_OK = 0
SSL_TLSEXT_ERR_NOACK = 3
STATUS_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
# PySSLContext is PyObject_HEAD (reference count, type: two pointers) and then the SSL_CTX pointer.
_SSL_CTX_OFFSET = 2 * ctypes.sizeof(ctypes.c_void_p)
CHECK_EVERY = 1.0           # seconds between two looks at the file from one worker


class Staple:
    """One certificate's response file, and the status callback that sends its content."""

    def __init__(self, path: str):
        self.path = path
        self.response = read_response(path)
        self.stamp = _stamp(path)
        self.checked = time.monotonic()
        self.callback = STATUS_CALLBACK(self._on_status_request)   # kept alive with the Staple

    def install(self, context: ssl.SSLContext) -> None:
        """Make `context` staple this response to handshakes that ask for it."""
        ssl_ctx = ctypes.c_void_p.from_address(id(context) + _SSL_CTX_OFFSET).value
        callback = ctypes.cast(self.callback, ctypes.c_void_p)
        _SSL_CTX_callback_ctrl(ssl_ctx, SSL_CTRL_SET_TLSEXT_STATUS_REQ_CB, callback)

    def _on_status_request(self, ssl_object: int | None, arg: int | None) -> int:
        now = time.monotonic()
        if now - self.checked >= CHECK_EVERY:
            self.checked = now
            stamp = _stamp(self.path)
            if stamp != self.stamp:
                try:
                    self.response = read_response(self.path)
                    self.stamp = stamp
                except OCSPResponseError:
                    pass            # half written, or gone: the last one until a good one is there
        response = self.response
        buffer = _CRYPTO_malloc(len(response), None, 0)
        if not buffer:
            return SSL_TLSEXT_ERR_NOACK
        ctypes.memmove(buffer, response, len(response))
        # OpenSSL owns the buffer from here on, and frees it once sent.
        _SSL_ctrl(ssl_object, SSL_CTRL_SET_TLSEXT_STATUS_REQ_OCSP_RESP, len(response), buffer)
        return SSL_TLSEXT_ERR_OK


class StaplingContext(ssl.SSLContext):
    """A server context that staples the response in `ocsp` (its Staple lives as long as it does:
    OpenSSL calls the Staple's callback for as long as the context serves handshakes)."""

    staple: Staple

    def __new__(cls, ocsp: str) -> StaplingContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_SERVER)

    def __init__(self, ocsp: str):
        self.staple = Staple(ocsp)
        self.staple.install(self)


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
