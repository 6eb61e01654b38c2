"""Kubernetes Gateway API (L4) and Kong TCPIngress and UDPIngress objects → pyproxy configuration entities.

    translation = translate_paths(["manifests/"], Options(runtime_dir="/run/pyproxy/gateway"))
    write_pem_files(translation.files)
    config = merge_entities(base_config, translation.entities)   # then the usual validator

Everything here is pure but `read_paths` (reads the manifests) and `write_pem_files` (writes the PEM
of the TLS Secrets): no socket, no process. The statuses are what a status writer would PUT.
"""

from __future__ import annotations

from collections.abc import Iterable

from .manifests import Notice, Resource, read_paths
from .secrets import write_pem_files
from .translate import CONTROLLER_NAME, Options, Translation, condition, merge_entities, translate

__all__ = [
    "translate_paths", "translate", "read_paths", "merge_entities", "write_pem_files", "condition",
    "Options", "Translation", "Resource", "Notice", "CONTROLLER_NAME",
]


def translate_paths(paths: Iterable[str], options: Options | None = None) -> Translation:
    """Read the manifests in `paths` (files and folders) and translate them; reading notices come first."""
    resources, notices = read_paths(paths)
    translation = translate(resources, options)
    translation.notices[:0] = notices
    return translation
