"""Files written so that nothing is lost: atomic writes, directories cleared without following
symbolic links, and advisory locks that a killed process cannot leave behind.

The library (kernels' build cache, probes' CSV output) and the lab both write through here; this
module imports nothing of bnlab's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["atomic_write_bytes", "atomic_write_text", "clear_directory", "FileLock", "LockBusy"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``: a reader
    sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())          # mkstemp creates 0600; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def clear_directory(path: Path, keep: Iterable[str] = ()) -> None:
    """Empty ``path`` (a real directory) except the top-level names in ``keep``.

    Never follows a symbolic link: a link inside is removed as a link (its target untouched), and
    a ``path`` that is itself a link is refused with NotADirectoryError — clearing it would empty
    a directory the caller never named.
    """
    if path.is_symlink():
        raise NotADirectoryError(
            f"{path} is a symbolic link (to {os.readlink(path)}); bnlab will not clear a directory "
            f"through a link: remove the link or choose another --out")
    if not path.exists():
        return
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    keep = set(keep)
    for entry in os.scandir(path):
        if entry.name in keep:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)               # rmtree unlinks links, never follows them
        else:
            os.unlink(entry.path)


class LockBusy(RuntimeError):
    """Another process holds the lock (its pid and purpose in the message)."""


class FileLock:
    """An exclusive advisory lock (``fcntl.flock``) on ``path``, held while the context is open.

    The kernel releases a flock when its holder exits for any reason — SIGKILL included — so a
    lock can never be left stale. The holder writes its pid and ``purpose`` into the file, which
    is what a waiting process reports. ``timeout``: seconds to wait (0: fail at once with
    LockBusy; None: wait for ever, saying once on stderr what it waits for).
    """

    def __init__(self, path: Path | str, purpose: str, timeout: Optional[float] = 0.0,
                 poll: float = 0.2) -> None:
        self.path, self.purpose, self.timeout, self.poll = Path(path), purpose, timeout, poll
        self._fd: Optional[int] = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown process"
        except OSError:
            return "unknown process"

    def __enter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        start, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            waited = time.monotonic() - start
            if self.timeout is not None and waited >= self.timeout:
                os.close(fd)
                raise LockBusy(f"{self.path} is held by {self.holder()}")
            if not said and waited >= 1.0:
                print(f"bnlab: waiting for {self.holder()} ({self.path})", file=sys.stderr, flush=True)
                said = True
            time.sleep(self.poll)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {self.purpose}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
