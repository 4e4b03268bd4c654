"""Writing the book's files so that nothing is lost: atomic replacement and a lock for read-modify-write.

    from dlearn import fileio
    fileio.write_text(path, text)             # readers see the old file or the new one, never half of either
    with fileio.locked(path):                 # one process at a time between reading and writing `path`
        entries = json.loads(path.read_text()); entries.append(new); fileio.write_text(path, json.dumps(entries))

A crash (or `kill -9`) during a write leaves the previous file whole, because the new content goes to a
temporary file in the same folder first and `os.replace` swaps it in (atomic on POSIX and Windows). The lock
is an advisory lock on a companion file `<name>.lock`, so two processes recording into one results file
cannot interleave their read-modify-write cycles.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


def write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` by `data` atomically (a temporary file in the same folder, then `os.replace`)."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"data should be bytes, got {type(data).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes the file private; the book's files are ordinary ones
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` by `text` atomically; see `write_bytes`."""
    if not isinstance(text, str):
        raise TypeError(f"text should be a str, got {type(text).__name__}")
    write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for `path` (on `<path>.lock`) while the block runs; other processes that
    ask for the same lock wait. Use it around a read-modify-write of a shared file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)
