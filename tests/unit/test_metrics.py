"""The metrics folder: folding the files of exited processes, and finding folders nobody owns any more.

Files are written with prometheus_client's own MmapedDict and keys, and read back with its own
MultiProcessCollector, as the workers and the status process do.
"""

from __future__ import annotations

import os
import subprocess
import sys

from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from pyproxy.metrics import fold_dead_files, remove_stale_directories

SESSIONS = ("pyproxy_sessions", "pyproxy_sessions_total", ["service"], ["svc"], "Sessions ended")
ACTIVE = ("pyproxy_active_sessions", "pyproxy_active_sessions", [], [], "Sessions open now")


def write(path, name: str, key: tuple, value: float) -> None:
    """What a process's metric object leaves in its file (`counter_<pid>.db` and the like)."""
    db = MmapedDict(str(path / name))
    try:
        db.write_value(mmap_key(*key), value, 0.0)
    finally:
        db.close()


def scraped(path) -> dict:
    """{sample name: value} as a scrape of the folder sees it."""
    return {sample.name: sample.value for metric in MultiProcessCollector(None, str(path)).collect()
            for sample in metric.samples}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_dead_processes_counters_go_to_the_archive_and_their_files_go(tmp_path):
    write(tmp_path, "counter_101.db", SESSIONS, 3)
    write(tmp_path, "gauge_livesum_101.db", ACTIVE, 2)
    write(tmp_path, "counter_102.db", SESSIONS, 4)
    write(tmp_path, "gauge_livesum_102.db", ACTIVE, 1)
    live = {102}
    assert fold_dead_files(str(tmp_path), lambda pid: pid in live) == 2
    assert sorted(os.listdir(tmp_path)) == ["counter_102.db", "counter_archive.db", "gauge_livesum_102.db"]
    assert scraped(tmp_path) == {"pyproxy_sessions_total": 7, "pyproxy_active_sessions": 1}

    live.clear()                                # the next generation: the archive adds up
    write(tmp_path, "counter_103.db", SESSIONS, 5)
    assert fold_dead_files(str(tmp_path), lambda pid: False) == 3
    assert sorted(os.listdir(tmp_path)) == ["counter_archive.db"]
    assert scraped(tmp_path) == {"pyproxy_sessions_total": 12}


def test_nothing_dead_changes_nothing(tmp_path):
    write(tmp_path, "counter_101.db", SESSIONS, 3)
    assert fold_dead_files(str(tmp_path), lambda pid: True) == 0
    assert os.listdir(tmp_path) == ["counter_101.db"]


def test_stale_folders_are_removed_and_live_or_unknown_ones_kept(tmp_path):
    owners = {os.geteuid()}
    gone = dead_pid()
    named_dead = tmp_path / f"pyproxy-metrics-{gone}-abc123"
    named_other = tmp_path / f"pyproxy-metrics-{os.getpid()}-abc123"     # alive, but no pyproxy master
    old_dead = tmp_path / "pyproxy-metrics-k2j4h5g6"                      # older versions' names
    old_live = tmp_path / "pyproxy-metrics-q8w7e6r5"
    old_empty = tmp_path / "pyproxy-metrics-z1x2c3v4"
    unrelated = tmp_path / "something-else"
    for folder in (named_dead, named_other, old_dead, old_live, old_empty, unrelated):
        folder.mkdir()
    write(old_dead, f"counter_{gone}.db", SESSIONS, 1)
    write(old_live, f"counter_{gone}.db", SESSIONS, 1)
    write(old_live, f"counter_{os.getpid()}.db", SESSIONS, 1)
    remove_stale_directories(str(tmp_path), owners)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([old_live.name, old_empty.name,
                                                                  unrelated.name])
    # Someone else's folder is never touched.
    named_dead.mkdir()
    remove_stale_directories(str(tmp_path), {os.geteuid() + 1})
    assert named_dead.exists()
