"""One way to write a file or a folder safely: a temp beside the target, fsync, rename, fsync of the folder.

A reader (or a run that crashed mid-write and was restarted) sees the previous file or the whole new one, never a
half-written one; after a power cut the rename itself survives, because the folder is synced too. Files and folders
get the modes a plain `open`/`mkdir` would give them (temp files are made 0600 and temp folders 0700).

    with atomic_file("out.json", "w") as f:          # a file
        f.write(text)
    with atomic_dir("checkpoints/run/adapter") as d:  # a folder, filled in d, then swapped in whole
        model.save_pretrained(d)

No Lightning, no torch: every writer of the project (checkpoints, reports, predict's outputs, adapters, converted
data, cached tokenization, built models) goes through here.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator, Union

PathLike = Union[str, os.PathLike]


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_modes(path: Path) -> None:
    """Modes a plain mkdir/open would give `path` and (a folder) everything in it."""
    mask = umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def fsync_dir(folder: PathLike) -> None:
    """Make a rename (or a new file) in `folder` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """A file object to write `path` through; `path` changes only when the block ends without an exception."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None,
                       newline=None if "b" in mode else "\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    _remove_stale_temps(path)


def _remove_stale_temps(path: Path) -> None:
    """Temp files of `path` that a killed writer left (`.<name>.<pid>.<random>.tmp` of a process that is gone)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = stale.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # (this process's own temps of `path` are done with)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` in place of `target` (which may exist): in one atomic step where the system
    can swap two paths, else by two renames with a short window without `target`."""
    default_modes(tmp)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # an empty folder (made by mkdir -p) is no obstacle
    if target.exists() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous folder
    elif target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    fsync_dir(target.parent)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*"):  # left by a write that was killed
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: PathLike) -> Iterator[Path]:
    """A temp folder beside `target` to fill; it replaces `target` whole when the block ends without an exception
    (and is removed otherwise)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def publish_dir(tmp: Path, target: Path) -> bool:
    """Move the finished folder `tmp` to `target` unless another process got there first (a cache entry or a built
    model: any complete copy is as good). True if this one was put in place; `tmp` is gone either way."""
    default_modes(tmp)
    try:
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise
        return False
    fsync_dir(target.parent)
    return True


@contextlib.contextmanager
def new_dir(target: PathLike) -> Iterator[Path]:
    """Like atomic_dir, for a folder that any complete copy serves (a cache entry, a built model): filled in a temp
    folder, moved to `target` unless another process put one there first (then this copy is dropped)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, target)
