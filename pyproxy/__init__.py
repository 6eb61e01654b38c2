"""pyproxy: a Layer-4 TCP/TLS proxy in the pre-fork style of nginx's stream module."""

__version__ = "0.1.0"
