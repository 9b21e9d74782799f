"""The download cache: where it lives, atomic writes, hashing, and a file lock."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from stackbuild.errors import CacheError, DiskFullError, StackbuildError

CACHE_ENV = "STACKBUILD_CACHE"


def cache_dir() -> Path:
    """`STACKBUILD_CACHE`, else the platform's user cache dir; created on first use.
    A value that cannot be a directory is bad input (exit 2) naming the variable."""
    env = os.environ.get(CACHE_ENV)
    if env is not None and not env.strip():
        raise CacheError(f"{CACHE_ENV} is set but empty; unset it or give a directory", key=CACHE_ENV)
    if env:
        d = Path(env).expanduser().absolute()
    else:
        import platformdirs  # imported here: a command that never reaches the cache need not load it

        d = Path(platformdirs.user_cache_dir("stackbuild"))
    where = f"{CACHE_ENV}={env}" if env else "the cache directory"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CacheError(f"{where}: {d} exists and is not a directory", key=CACHE_ENV if env else None) from None
    except OSError as e:
        raise CacheError(f"{where}: cannot create {d}: {e.strerror or e}{_hint()}", key=CACHE_ENV if env else None) from None
    return d


def _hint() -> str:
    return f" (point {CACHE_ENV} at a writable directory)"


def not_writable(path: Path, e: OSError) -> StackbuildError:
    """The one error for a write that the filesystem refused: full, read-only, or no
    permission. Names the path, says which."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on device: {path}")
    hint = ""
    try:
        if path.absolute().is_relative_to(cache_dir()):
            hint = _hint()
    except StackbuildError:
        pass
    if e.errno == errno.EROFS:
        return CacheError(f"read-only file system: cannot write {path}{hint}")
    return CacheError(f"cannot write {path}: {e.strerror or e}{hint}")


def disk_full(*paths: Path) -> Path | None:
    """The first of `paths` whose filesystem has (next to) no space left."""
    for p in paths:
        q = p
        while not q.exists() and q != q.parent:
            q = q.parent
        try:
            free = shutil.disk_usage(q).free
        except OSError:
            continue
        if free < (1 << 20):
            return p
    return None


def diagnose_write_failure(e: BaseException, *paths: Path) -> StackbuildError | None:
    """The one clear error for `e` if it is a full or read-only disk in disguise (ENOSPC,
    a broken pipe to a git that died of it, git's "No space left on device", a copytree
    error list), else None. Call it before cleaning up: deleting the half-written tree
    frees the space that would show the disk was full."""
    if isinstance(e, DiskFullError):
        return e
    if isinstance(e, shutil.Error):  # copytree collects one (src, dst, why) per failed file
        for entry in (e.args[0] if e.args and isinstance(e.args[0], list) else []):
            why = str(entry[2]) if len(entry) > 2 else ""
            for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                if f"[Errno {code}]" in why:
                    return not_writable(Path(str(entry[1])), OSError(code, os.strerror(code)))
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return not_writable(Path(e.filename) if isinstance(e.filename, str) else paths[0], e)
        if e.errno not in (errno.EPIPE, errno.EIO):  # what a writer sees when its git died of a full disk
            return None
        full = disk_full(*paths, _cache_or(paths[0]))
        return DiskFullError(f"no space left on device: {full}") if full is not None else None
    if isinstance(e, StackbuildError):
        text = e.message.lower()
        if "no space left on device" in text:
            return DiskFullError(f"no space left on device: {e.file or paths[0]}")
        if text.startswith("git ") or "broken pipe" in text or "cannot extract" in text:
            full = disk_full(*paths, _cache_or(paths[0]))
            if full is not None:
                return DiskFullError(f"no space left on device: {full}")
    return None


@contextmanager
def disk_guard(*paths: Path) -> Iterator[None]:
    """Raise `diagnose_write_failure`'s one clear error instead of what a full or
    read-only disk surfaced as inside the block."""
    try:
        yield
    except (OSError, StackbuildError) as e:
        clear = diagnose_write_failure(e, *paths)
        if clear is None or clear is e:
            raise
        raise clear from None


def _cache_or(default: Path) -> Path:
    try:
        return cache_dir()
    except StackbuildError:
        return default


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
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise not_writable(dest.parent, e) from None
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
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise not_writable(dest, e) from None
        raise
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
    from filelock import FileLock, Timeout  # 10 ms of start-up that `apply --onto` never needs

    lock = FileLock(str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=timeout)
    except Timeout:
        raise StackbuildError(f"{what} is in use by another stackbuild run (lock {path})") from None
    except OSError as e:
        raise not_writable(path, e) from None
    try:
        yield
    finally:
        lock.release()
