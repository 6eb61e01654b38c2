"""`KongDeclarative`: a Kong declarative file (kong.yml) as a configuration source.

Two ways in (see docs/kong.md):

- `declarative_config: FILE` in the pyproxy file: the Kong file gives entities only; the pyproxy
  file's `stream_listen` and `ssl.default_certificate` are what its routes are checked against.
- `pyproxy -c kong.yml` (a file whose top level has `_format_version`): the Kong file is the whole
  configuration. Kong reads `stream_listen` from kong.conf, not from this file, so pyproxy listens
  where `KONG_STREAM_LISTEN` says (Kong's environment form of that setting), else on 0.0.0.0 at the
  ports the routes' `destinations` name, with `ssl` for the ports of `tls`/`tls_passthrough` routes.
  Every process setting keeps its default.

Kong keeps certificates and keys in the file itself, as PEM text; pyproxy's TLS contexts load them
from files, so each one is written once to a private folder (`pem_folder()`), named by its SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import replace

from pyproxy.config.errors import ConfigError, ConfigIssue
from pyproxy.config.loader import Document, YamlList, YamlMap, read_document
from pyproxy.config.model import Config
from pyproxy.config.sections import Report
from pyproxy.config.validate import build_config, collector_paused, follows_from

from .translate import Translation, Translator

Warn = Callable[[str], None] | None
LISTEN_ENV = "KONG_STREAM_LISTEN"
LISTEN_HOST = "0.0.0.0"


class KongDeclarative:
    """A Kong declarative file: entities (with `pyproxy_file`, the Config of the pyproxy file that
    names it), or the whole configuration (without)."""

    def __init__(self, path: str, pyproxy_file: Config | None = None):
        self.path = os.path.abspath(path)
        self.pyproxy_file = pyproxy_file

    @property
    def name(self) -> str:
        return self.path

    def load(self, warn: Warn) -> tuple[Config | None, list[ConfigIssue]]:
        with collector_paused():
            try:
                document = read_document(self.path)
            except ConfigError as exc:
                return None, exc.errors
            return self.load_document(document, warn)

    def load_document(self, document: Document, warn: Warn) -> tuple[Config | None, list[ConfigIssue]]:
        """The Config the Kong file read into `document` describes, and its errors in Kong's terms."""
        root = document.root
        if not isinstance(root, YamlMap) or "_format_version" not in root:
            return None, [*document.issues, ConfigIssue(
                self.path, getattr(root, "line", 1), "",
                "not a Kong declarative file: expected a mapping with _format_version")]
        try:
            store = PemFolder(pem_folder()).store
        except OSError as exc:
            return None, [ConfigIssue(self.path, 1, "", f"cannot keep the file's certificates: {exc}")]
        translation = Translator(self.path, root, store).translate()
        notes = self._listen(translation)
        report = Report(self.path)
        config = build_config(report, translation.root)
        if config is not None and self.pyproxy_file is not None:
            config = replace(config, stream_listen=())    # the pyproxy file's, lent for the checks
        errors = document.issues + translation.errors + [
            _renamed(error, translation) for error in report.errors
            if not follows_from(error, translation.refused)]
        if warn is not None:
            for warning in sorted(report.warnings, key=lambda issue: issue.line):
                warn(str(_renamed(warning, translation)))
            if translation.ignored:
                ignored = "; ".join(translation.ignored)
                warn(f"{self.path}:1: ignored (HTTP only, or not in pyproxy): {ignored}")
            for note in notes:
                warn(note)
        return config, errors

    def _listen(self, translation: Translation) -> list[str]:
        """Give the translated document its `stream_listen` (and, for a fragment, a certificate of the
        pyproxy file as its default one); the notes to print about it."""
        root = translation.root
        if self.pyproxy_file is not None:
            listens = [f"{listen}{' ssl' if listen.ssl else ''}"
                       for listen in self.pyproxy_file.stream_listen]
            root["stream_listen"] = _list(listens, root.line)
            # Only so that the Kong file's tls routes count the pyproxy file's certificates as ones
            # to terminate with: merge keeps the pyproxy file's own ssl.
            default = self.pyproxy_file.ssl.default_certificate or next(iter(self.pyproxy_file.certificates),
                                                                         None)
            if default is not None:
                pair = YamlMap(root.line)
                pair.update(cert=default.cert, key=default.key)
                ssl = YamlMap(root.line)
                ssl["default_certificate"] = pair
                root["ssl"] = ssl
            translation.refused.add("stream_listen")      # checked in the pyproxy file already
            return []
        written = os.environ.get(LISTEN_ENV, "").strip()
        if written:
            root["stream_listen"] = written
            translation.renames["stream_listen"] = LISTEN_ENV
            return [f"{self.path}:1: stream_listen: listening on {written} ({LISTEN_ENV})"]
        listens, notes = derived_listens(root, translation)
        if not listens:
            translation.refused.add("stream_listen")
            if not translation.errors:
                translation.errors.append(ConfigIssue(
                    self.path, 1, "", f"nothing to listen on: no tcp, tls or udp route names a destinations "
                                      f"port; set {LISTEN_ENV} (Kong's stream_listen), or name this file "
                                      "in a pyproxy file's declarative_config"))
            return notes
        root["stream_listen"] = _list(listens, root.line)
        return [f"{self.path}:1: stream_listen: Kong reads it from kong.conf, not from this file: "
                f"listening on {', '.join(listens)} (the ports of the routes' destinations; set "
                f"{LISTEN_ENV} to choose)", *notes]


def derived_listens(root: YamlMap, translation: Translation) -> tuple[list[str], list[str]]:
    """`stream_listen` entries on LISTEN_HOST for the `destinations` ports of the translated routes,
    `ssl` for those of TLS routes, `udp` for those of udp routes; notes on routes that give no port. A
    port that both a tcp route and a TLS route want is an error (a listener is either TLS or not); a
    udp route's port is another listener (UDP), which a tcp or TLS one may share the number of."""
    ports: dict[int, tuple[bool, str]] = {}      # port → (ssl, the first route's Kong path)
    udp_ports: set[int] = set()
    notes = []
    services = root.get("services")
    for service_index, service in enumerate(services if isinstance(services, YamlList) else []):
        routes = service.get("routes") if isinstance(service, YamlMap) else None
        for index, route in enumerate(routes if isinstance(routes, YamlList) else []):
            if not isinstance(route, YamlMap):
                continue
            path = f"services[{service_index}].routes[{index}]"
            protocols = route.get("protocols")
            tls = isinstance(protocols, list) and "tcp" not in protocols
            udp = isinstance(protocols, list) and "udp" in protocols
            destinations = route.get("destinations")
            found = [port for entry in (destinations if isinstance(destinations, list) else [])
                     if isinstance(entry, YamlMap) and isinstance(port := entry.get("port"), int)
                     and not isinstance(port, bool)]
            if not found:
                notes.append(f"{translation.file}:{route.line}: {translation.kong_path(path)}: no "
                             f"destinations port, so no listener is made for it ({LISTEN_ENV} sets them)")
            if udp:
                udp_ports.update(found)
                continue
            for port in found:
                ssl, first = ports.setdefault(port, (tls, path))
                if ssl != tls:
                    translation.errors.append(ConfigIssue(
                        translation.file, route.line, translation.kong_path(path),
                        f"port {port} is wanted for TLS and for plain TCP (by "
                        f"{translation.kong_path(first)}): a listener is one or the other; set {LISTEN_ENV}"))
    listens = [(port, f"{LISTEN_HOST}:{port}{' ssl' if ssl else ''}") for port, (ssl, _) in ports.items()]
    listens += [(port, f"{LISTEN_HOST}:{port} udp") for port in udp_ports]
    return [listen for _, listen in sorted(listens)], notes


def pem_folder() -> str:
    """The folder the PEM text of Kong files is written to: private to this user (0700)."""
    return os.path.join(tempfile.gettempdir(), f"pyproxy-kong-{os.getuid()}")


class PemFolder:
    """A private folder of PEM files named by the SHA-256 of their content."""

    def __init__(self, folder: str):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(folder)
        # /tmp is everyone's: a folder someone else made (or a link) must not receive our keys.
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise OSError(f"{folder} is not a folder private to this user")
        self.folder = folder

    def store(self, pem: str) -> str:
        """The path of a file holding `pem` (written once, mode 0600)."""
        data = pem.encode()
        path = os.path.join(self.folder, hashlib.sha256(data).hexdigest() + ".pem")
        if not os.path.exists(path):
            temporary = f"{path}.{os.getpid()}"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
            os.replace(temporary, path)
        return path


def _renamed(issue: ConfigIssue, translation: Translation) -> ConfigIssue:
    return ConfigIssue(issue.file, issue.line, translation.kong_path(issue.key), issue.message)


def _list(items: list[str], line: int) -> YamlList:
    result = YamlList(line)
    result.extend(items)
    result.item_lines.extend([line] * len(items))
    return result
