"""The cache directory's size cap: least recently used entries go first, never one in use."""

from __future__ import annotations

import os
import subprocess
import sys

from vqt_jax import cache as cache_lib

SIZE = 4096 + 2  # each entry: a 4 KiB field file and a 2-byte meta.json


def _entry(directory, name: str, last_use: float) -> str:
    path = directory / name
    path.mkdir()
    (path / "meta.json").write_text("{}")
    (path / "k.bin").write_bytes(b"\0" * 4096)
    os.utime(path, (last_use, last_use))
    return str(path)


def _gb(nbytes: int) -> float:
    return nbytes / 2**30


def test_make_room_removes_the_least_recently_used_entries_not_in_use(tmp_path):
    busy = _entry(tmp_path, "busy", 500)  # the oldest, but another process uses it
    old, mid, new = (_entry(tmp_path, n, t) for n, t in (("old", 1000), ("mid", 2000),
                                                         ("new", 3000)))
    (tmp_path / ".abc.tmp-host-1-x").mkdir()  # a build in progress is no entry
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
         "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); "
         "time.sleep(120)", busy], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # 4 entries and a new one of the same size, under a cap of 3: two must go.
        removed = cache_lib.make_room(str(tmp_path), SIZE, _gb(3 * SIZE))
    finally:
        holder.kill()
        holder.wait()
    assert removed == [old, mid]
    assert sorted(os.listdir(tmp_path)) == [".abc.tmp-host-1-x", "busy", "new"]
    assert cache_lib.make_room(str(tmp_path), 0, 0) == []  # no cap
    assert os.path.isdir(new) and os.path.isdir(busy)


def test_a_claimed_entry_is_recent_and_kept(tmp_path):
    first, second = _entry(tmp_path, "first", 1000), _entry(tmp_path, "second", 2000)
    cache_lib.claim(first)  # this process uses it now: the most recent, and locked
    assert os.path.getmtime(first) > os.path.getmtime(second)
    assert cache_lib.make_room(str(tmp_path), SIZE, _gb(SIZE)) == [second]
    assert cache_lib.make_room(str(tmp_path), SIZE, _gb(SIZE)) == []  # in use, kept
    assert os.listdir(tmp_path) == ["first"]
