"""A worker process's last words: whatever escapes the worker is logged before the process exits."""

from __future__ import annotations

import os

from pyproxy.log import ErrorLog
from pyproxy.worker import worker_main


class BrokenWorker:
    """Stands in for a Worker whose loop raised something nobody caught."""

    slot = 3

    def __init__(self, log: ErrorLog):
        self.log = log

    def run(self, ready_fd: int) -> int:
        raise RuntimeError("boom in the loop")


def test_an_exception_that_escapes_the_worker_is_logged_with_its_traceback(tmp_path):
    log_path = tmp_path / "error.log"
    worker = BrokenWorker(ErrorLog(str(log_path), "notice"))
    pid = os.fork()
    if pid == 0:
        worker_main(worker, -1)           # never returns: os._exit
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    text = log_path.read_text()
    assert (f"[crit] {pid}#0: worker process #3 failed, please report it: RuntimeError('boom in the loop')"
            in text)
    assert "Traceback (most recent call last):" in text
    assert 'in run\n        raise RuntimeError("boom in the loop")' in text
