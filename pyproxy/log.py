"""The error log: nginx's line format, a level threshold, and reopening for logrotate.

    2026/11/23 07:47:08 [notice] 4121#0: start worker process 4123

Lines are written with one `os.write` each on a file opened with O_APPEND, so the lines of the
master and every worker interleave whole, never torn.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from pyproxy.config.model import LOG_LEVELS

_RANK = {name: i for i, name in enumerate(LOG_LEVELS)}


def open_append(path: str) -> int:
    """Open a log file for appending, creating it (and nothing else) if needed."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


class ErrorLog:
    """Leveled log lines to stderr or a file; `reopen()` after logrotate moved the file."""

    def __init__(self, target: str = "stderr", level: str = "notice", slot: int = 0):
        self.target = target
        self.threshold = _RANK[level]
        self.slot = slot          # nginx prints the connection/worker slot after the pid
        self.fd = 2
        self.reopen()

    def configure(self, target: str, level: str) -> None:
        """Switch to a new target and level (a reload may change both)."""
        self.threshold = _RANK[level]
        if target != self.target:
            self.target = target
            self.reopen()

    def reopen(self) -> None:
        """Open the target again: USR1 after logrotate, or a changed path on reload."""
        if self.target == "stderr":
            new_fd = 2
        else:
            try:
                new_fd = open_append(self.target)
            except OSError as exc:
                self.error(f'cannot open error log "{self.target}": {exc.strerror}; keeping the old one')
                return
        old, self.fd = self.fd, new_fd
        if old > 2:
            os.close(old)

    def enabled(self, level: str) -> bool:
        return _RANK[level] >= self.threshold

    def log(self, level: str, message: str) -> None:
        if _RANK[level] < self.threshold:
            return
        stamp = time.strftime("%Y/%m/%d %H:%M:%S")
        line = f"{stamp} [{level}] {os.getpid()}#{self.slot}: {message}\n".encode("utf-8", "replace")
        try:
            os.write(self.fd, line)
        except OSError:
            # Nowhere left to complain to (a full disk, a closed stderr): never let logging kill a process.
            pass

    def exception(self, level: str, message: str, exc: BaseException) -> None:
        """`message`, then the traceback of `exc` indented under it, in one line's write (a bug's
        report stays whole among the other processes' lines)."""
        trace = "".join(traceback.format_exception(exc)).rstrip().replace("\n", "\n    ")
        self.log(level, f"{message}\n    {trace}")

    def debug(self, message: str) -> None:
        self.log("debug", message)

    def info(self, message: str) -> None:
        self.log("info", message)

    def notice(self, message: str) -> None:
        self.log("notice", message)

    def warn(self, message: str) -> None:
        self.log("warn", message)

    def error(self, message: str) -> None:
        self.log("error", message)

    def crit(self, message: str) -> None:
        self.log("crit", message)

    def close(self) -> None:
        if self.fd > 2:
            os.close(self.fd)
            self.fd = 2


def console(message: str) -> None:
    """A message for the person at the terminal (CLI errors, `-t` results): plain, on stderr."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
