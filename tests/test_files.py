"""files.py, the one way every writer writes: whole or not at all, plain modes, a killed writer's temp cleaned up."""

import os
import subprocess
import sys

import pytest

from finllm_pl import files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.json"
    files.write_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with files.atomic_file(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]
    files.write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600


def test_a_dead_writer_s_temp_is_removed_by_the_next_write_and_a_live_one_s_is_not(tmp_path):
    path = tmp_path / "last.ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".last.ckpt.{int(dead.stdout)}.abc.tmp"  # a writer killed mid-write (its pid is gone)
    live = tmp_path / f".last.ckpt.{os.getppid()}.def.tmp"  # another process still writing
    stale.write_text("x")
    live.write_text("y")
    files.write_atomic(path, "ckpt")
    assert not stale.exists() and live.exists() and path.read_text() == "ckpt"


def test_a_folder_is_swapped_in_whole_and_a_failed_one_leaves_the_old(tmp_path):
    target = tmp_path / "adapter"
    with files.atomic_dir(target) as tmp:
        (tmp / "w").write_text("1")
    with pytest.raises(RuntimeError):
        with files.atomic_dir(target) as tmp:
            (tmp / "w").write_text("2")
            raise RuntimeError("killed")
    assert (target / "w").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # not mkdtemp's 0700


def test_new_dir_keeps_the_first_complete_copy(tmp_path):
    target = tmp_path / "cache"
    with files.new_dir(target) as a:
        (a / "f").write_text("first")
    with files.new_dir(target) as b:  # another process's copy, arriving second: dropped
        (b / "f").write_text("second")
    assert (target / "f").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["cache"]
