"""The `pyproxy` command, with nginx's conventions.

    pyproxy [-c FILE]              run in the foreground (add -d to detach)
    pyproxy -t [-c FILE]           test the configuration and exit 0 (valid) or 1
    pyproxy -T [-c FILE]           test it and print the effective configuration
    pyproxy -t --status [-o yaml|json] [-c FILE]   test it and print the `status` of each Gateway API
                                   object of the `gateway` manifests, as `kubectl get -o yaml` shows it
    pyproxy -s reload|stop|quit|reopen [-c FILE]   signal the running master (found via the pid file)
    pyproxy -v                     print the version

Every expected failure (bad file, port in use, no master running) is one plain sentence on stderr
and a non-zero exit code; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import yaml

from pyproxy import __version__
from pyproxy.config import Config, ConfigError, YamlFile, config_as_yaml, load_config, load_sources
from pyproxy.config.tlsfiles import keeping_checked_contexts
from pyproxy.log import ErrorLog, console

DEFAULT_CONFIG = "conf/pyproxy.conf"
SIGNALS = {"reload": signal.SIGHUP, "stop": signal.SIGTERM, "quit": signal.SIGQUIT, "reopen": signal.SIGUSR1}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyproxy", description="A Layer-4 TCP/TLS proxy (nginx stream / Kong stream style).")
    parser.add_argument("-c", "--conf", default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"configuration file (default: {DEFAULT_CONFIG})")
    parser.add_argument("-t", "--test", action="store_true", help="test the configuration and exit")
    parser.add_argument("-T", "--dump", action="store_true",
                        help="test the configuration, print the effective configuration and exit")
    parser.add_argument("--status", action="store_true",
                        help="with -t: print the status of the Gateway API objects of the gateway manifests")
    parser.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml",
                        help="the format --status prints in (default: yaml)")
    parser.add_argument("-s", "--signal", choices=sorted(SIGNALS), help="send a signal to the master process")
    parser.add_argument("-d", "--daemon", action="store_true", help="detach from the terminal")
    parser.add_argument("-v", "--version", action="store_true", help="print the version and exit")
    return parser


def _warn(message: str) -> None:
    console(f"pyproxy: [warn] {message}")


def _load(path: str) -> Config | None:
    """The validated configuration, or None after printing every error."""
    try:
        return load_config(path, warn=_warn)
    except ConfigError as exc:
        for issue in exc.errors:
            console(f"pyproxy: [emerg] {issue}")
        return None


def _default_certificate_notice(config: Config) -> None:
    """Say which certificate a terminating listener serves without a matching SNI when the file
    does not: nginx's rule, the first certificate, which a user may not expect."""
    if (config.ssl.default_certificate is None and config.certificates
            and any(listen.ssl for listen in config.stream_listen)):
        first = next((c.cert for c in config.certificates if not c.listen), None)
        get = f"get {first} (the first certificate)" if first is not None else "get"
        if any(c.listen for c in config.certificates):
            # A listener's own certificates (certificates[].listen) come first there.
            get += ("," if first is not None else "") + (" on a listener with certificates of its own "
                                                          "the first of them")
        console(f"pyproxy: [notice] no ssl.default_certificate: clients without a matching server name {get}")


def test_config(path: str, dump: bool = False, status: str | None = None) -> int:
    """`-t`, `-T` (dump) and `-t --status` (status: the output format)."""
    config = _load(path)
    if config is None:
        console(f"pyproxy: configuration file {os.path.abspath(path)} test failed")
        return 1
    _default_certificate_notice(config)
    if dump:
        # Without what the gateway manifests add: the dump keeps its `gateway` key, and they are
        # added again when it is loaded. A Kong file's entities are printed with the file's own.
        sys.stdout.write(config_as_yaml(load_sources([YamlFile(path)], manifests=False)
                                        if config.gateway is not None else config))
    if status is not None:
        from pyproxy.gateway.source import status_list
        statuses = status_list(config)
        sys.stdout.write(json.dumps(statuses, indent=2) + "\n" if status == "json"
                         else yaml.safe_dump(statuses, sort_keys=False, width=1 << 16))
    console(f"pyproxy: configuration file {config.path} test is successful")
    return 0


def send_signal(path: str, name: str) -> int:
    from pyproxy.master import process_alive, read_pid

    if name == "reload":
        config = _load(path)         # an invalid file is refused here, before it reaches the master
        if config is None:
            console("pyproxy: reload not sent: the configuration is invalid; the running proxy keeps its own")
            return 1
        pid_path = config.pid
    else:
        from pyproxy.config import pid_path_of
        try:
            pid_path = pid_path_of(path)
        except ConfigError as exc:
            for issue in exc.errors:
                console(f"pyproxy: [emerg] {issue}")
            return 1
    if pid_path is None:
        console("pyproxy: the configuration sets `pid: off`, so there is no pid file to find the master by")
        return 1
    pid = read_pid(pid_path)
    if pid is None:
        console(f'pyproxy: cannot read pid file "{pid_path}": is pyproxy running?')
        return 1
    if not process_alive(pid):
        console(f'pyproxy: no process with pid {pid} (from "{pid_path}"): is pyproxy running?')
        return 1
    try:
        os.kill(pid, SIGNALS[name])
    except PermissionError:
        console(f"pyproxy: not allowed to signal pid {pid}: run as the user that started pyproxy")
        return 1
    return 0


def run(path: str, daemon: bool) -> int:
    from pyproxy.master import Master, MasterError, daemonize

    # The SSL contexts the configuration's key pairs are checked with serve them (master.bind).
    with keeping_checked_contexts():
        config = _load(path)
        if config is None:
            return 1
        log = ErrorLog(config.error_log, config.log_level)
        master = Master(config, log, " ".join(["-c", config.path] + (["-d"] if daemon else [])))
        try:
            master.bind()
        except MasterError as exc:
            console(f"pyproxy: [emerg] {exc}")
            return 1
    if daemon:
        daemonize(log)
    return master.run()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"pyproxy version: pyproxy/{__version__}")
        return 0
    try:
        if args.status and not args.test:
            console("pyproxy: --status goes with -t: pyproxy -t --status [-o yaml|json] -c FILE")
            return 2
        if args.test or args.dump:
            return test_config(args.conf, dump=args.dump, status=args.output if args.status else None)
        if args.signal:
            return send_signal(args.conf, args.signal)
        return run(args.conf, args.daemon)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
