"""The download cache: where it lives, atomic writes, hashing, and a file lock."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import platformdirs
from filelock import FileLock, Timeout

from stackbuild.errors import StackbuildError


def cache_dir() -> Path:
    """`STACKBUILD_CACHE`, else the platform's user cache dir."""
    env = os.environ.get("STACKBUILD_CACHE")
    d = Path(env) if env else Path(platformdirs.user_cache_dir("stackbuild"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """Write to a temporary file beside `dest` and rename it into place on success, so
    a crash or Ctrl-C never leaves a half-written file under the final name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    # mkstemp makes 0600: keep the mode of the file being replaced, else an ordinary 0644
    try:
        mode = dest.stat().st_mode & 0o7777
    except OSError:
        mode = 0o644
    os.fchmod(fd, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(dest: Path, text: str) -> None:
    """Replace `dest` with `text` (UTF-8, line endings as given) in one rename."""
    with atomic_file(dest) as f:
        f.write(text.encode("utf-8"))


@contextmanager
def locked(path: Path, what: str, timeout: float = 0.5) -> Iterator[None]:
    """An exclusive lock on `path`; a second run on the same thing fails fast."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout)
    except Timeout:
        raise StackbuildError(f"{what} is in use by another stackbuild run (lock {path})") from None
    try:
        yield
    finally:
        lock.release()
