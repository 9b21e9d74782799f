"""The one door for writing into a source tree (a workspace, a refresh tree).

Patches, backports, new files, deletes, mode changes and refresh results all go
through `Tree`, and the guard lives here, so a second code path cannot bypass it:

- `verify_path` refuses a path git itself would refuse as a tree entry (git's
  `verify_path`, read-cache.c, with `core.protectNTFS` and `core.protectHFS` on):
  empty, `.` or `..` components, absolute paths, backslashes, NUL and other control
  characters, and a `.git` component in any spelling: any case, trailing dots or
  spaces (`.git.`, `.GIT `), an NTFS stream suffix (`.git::$INDEX_ALLOCATION`), the
  NTFS short name `git~1`, and HFS+ ignorable code points (`.g\\u200cit`).
- The real location, after resolving every symbolic link of the existing part of the
  path, must be inside the tree and must not be git metadata either (a link
  `docs -> .git` is refused as `.git` is).
- Parents are created one folder at a time below an open directory descriptor, and
  every step is opened with O_NOFOLLOW: a link planted between the check and the
  write is refused, never followed. A file is written to a temporary name beside its
  destination and renamed over it, so a hard link to a file outside the tree is
  replaced, not written through; a symbolic link as the final component is refused.

The checks run on the final path, after every transformation a patch path goes
through (strip, quoting, leading-component repair): callers hand the path they are
about to write, and the door decides.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# code points HFS+ ignores when comparing names (git's utf8.c is_hfs_dotgit)
_HFS_IGNORABLE = dict.fromkeys(
    [0x200C, 0x200D, 0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E,
     0x206A, 0x206B, 0x206C, 0x206D, 0x206E, 0x206F, 0xFEFF]
)


class TreeWriteError(Exception):
    """A write into a tree that cannot be done; the message names the path and why."""


class UnsafePath(TreeWriteError):
    """The path would write outside the tree or into its git metadata."""


def is_git_component(component: str) -> bool:
    """Whether one path component names git metadata on some file system git runs on."""
    c = component.translate(_HFS_IGNORABLE).lower()
    if c.startswith(".git:") or c.startswith("git~1"):
        return True
    return c.rstrip(". ") == ".git"


def verify_path(path: str) -> None:
    """Refuse a path that is not a plain relative path inside a tree, or that names
    git metadata. Raises UnsafePath naming the path and the rule."""
    if not path:
        raise UnsafePath("empty path")
    bad = next((ch for ch in path if ord(ch) < 0x20 or ord(ch) == 0x7F), None)
    if bad is not None:
        raise UnsafePath(f"path {path!r} contains a control character ({bad!r})")
    if path.startswith("/"):
        raise UnsafePath(f"path {path!r} is absolute")
    if "\\" in path:
        raise UnsafePath(f"path {path!r} contains a backslash (a folder separator on Windows)")
    for c in path.split("/"):
        if c == "":
            raise UnsafePath(f"path {path!r} has an empty component")
        if c in (".", ".."):
            raise UnsafePath(f"path {path!r} has a {c!r} component" + (" (escapes the tree)" if c == ".." else ""))
        if is_git_component(c):
            raise UnsafePath(f"path {path!r} points into the git metadata ({c!r})")


class Tree:
    """A source tree, written and read only through the guard."""

    def __init__(self, root: Path | str):
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise TreeWriteError(f"{root} is not a folder")

    # -- locating

    def _real_parent(self, rel: str) -> list[str]:
        """The components of the real folder `rel` would live in, relative to the root,
        after resolving the links of its existing part; checked inside and not git."""
        verify_path(rel)
        parent = rel.rpartition("/")[0]
        if not parent:
            return []
        real = os.path.realpath(os.path.join(self.root, parent))
        if real != self.root and not real.startswith(self.root + os.sep):
            raise UnsafePath(f"path {rel!r} resolves outside the tree (through a symbolic link)")
        real_rel = os.path.relpath(real, self.root)
        comps = [] if real_rel == "." else real_rel.split(os.sep)
        if comps != parent.split("/"):
            try:
                verify_path("/".join([*comps, rel.rpartition("/")[2]]))
            except UnsafePath as e:
                raise UnsafePath(f"path {rel!r} resolves to {real_rel!r} through a symbolic link: {e}") from None
        return comps

    def _open_parent(self, rel: str, create: bool) -> list[int] | None:
        """Open the folders from the root to `rel`'s parent, one at a time and never
        through a link (creating missing ones when `create`). Returns the descriptors,
        root first; None when a folder is missing and not created."""
        comps = self._real_parent(rel)
        fds = [os.open(self.root, _O_DIR)]
        try:
            for i, c in enumerate(comps):
                try:
                    fds.append(os.open(c, _O_DIR, dir_fd=fds[-1]))
                    continue
                except FileNotFoundError:
                    if not create:
                        _close(fds)
                        return None
                except OSError as e:
                    raise self._not_a_folder(rel, comps[: i + 1], fds[-1], c, e) from None
                try:
                    os.mkdir(c, 0o755, dir_fd=fds[-1])
                    fds.append(os.open(c, _O_DIR, dir_fd=fds[-1]))
                except OSError as e:
                    raise self._not_a_folder(rel, comps[: i + 1], fds[-1], c, e) from None
            return fds
        except BaseException:
            _close(fds)
            raise

    def _not_a_folder(self, rel: str, where: list[str], dir_fd: int, name: str, err: OSError) -> TreeWriteError:
        at = "/".join(where)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return TreeWriteError(f"cannot write {rel!r}: {at}: {err.strerror}")
        if stat.S_ISLNK(st.st_mode):
            return UnsafePath(f"path {rel!r} goes through a symbolic link ({at}) that changed while writing")
        return TreeWriteError(f"cannot write {rel!r}: {at} is a file, not a folder")

    # -- reading

    def read(self, rel: str) -> bytes | None:
        """The file's bytes, or None when there is no regular file there. Links are
        followed only while they stay inside the tree and out of git metadata."""
        verify_path(rel)
        real = os.path.realpath(os.path.join(self.root, rel))
        if real != self.root and not real.startswith(self.root + os.sep):
            raise UnsafePath(f"path {rel!r} resolves outside the tree (through a symbolic link)")
        real_rel = os.path.relpath(real, self.root)
        if real_rel != rel:
            try:
                verify_path(real_rel.replace(os.sep, "/"))
            except UnsafePath as e:
                raise UnsafePath(f"path {rel!r} resolves to {real_rel!r} through a symbolic link: {e}") from None
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None
            raise TreeWriteError(f"cannot read {rel!r}: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with os.fdopen(fd, "rb", closefd=False) as f:
                return f.read()
        finally:
            os.close(fd)

    def exists(self, rel: str) -> bool:
        """A regular file is at `rel` (False for a path the door would refuse)."""
        try:
            return self.read(rel) is not None
        except TreeWriteError:
            return False

    # -- writing

    def real_path(self, rel: str) -> str:
        """Where `rel` really is, relative to the root (links of its folders resolved):
        the name to hand to git, which refuses paths beyond a symbolic link."""
        return "/".join([*self._real_parent(rel), rel.rpartition("/")[2]])

    def write(self, rel: str, data: bytes, mode: int | None = None) -> str:
        return _os_errors(rel, lambda: self._write(rel, data, mode))

    def _write(self, rel: str, data: bytes, mode: int | None = None) -> str:
        """Create or replace the regular file `rel` with `data` (mode kept from the old
        file unless given). Returns the real path written (see `real_path`)."""
        fds = self._open_parent(rel, create=True)
        assert fds is not None
        real = self.real_path(rel)
        name = rel.rpartition("/")[2]
        pfd = fds[-1]
        tmp = f".{name}.stackbuild-{os.getpid()}"
        try:
            old = _lstat(name, pfd)
            if old is not None and stat.S_ISLNK(old.st_mode):
                raise UnsafePath(f"path {rel!r} is a symbolic link; refusing to write through it")
            if old is not None and stat.S_ISDIR(old.st_mode):
                raise TreeWriteError(f"cannot write {rel!r}: it is a folder")
            perm = mode if mode is not None else (stat.S_IMODE(old.st_mode) if old is not None else 0o644)
            if _lstat(tmp, pfd) is not None:
                os.unlink(tmp, dir_fd=pfd)  # litter of an interrupted run of this process id
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd)
            try:
                with os.fdopen(fd, "wb", closefd=False) as f:
                    f.write(data)
                os.fchmod(fd, perm)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            return real
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=pfd)
            raise
        finally:
            _close(fds)

    def chmod(self, rel: str, mode: int) -> None:
        _os_errors(rel, lambda: self._chmod(rel, mode))

    def _chmod(self, rel: str, mode: int) -> None:
        fds = self._open_parent(rel, create=False)
        if fds is None:
            raise TreeWriteError(f"cannot change the mode of {rel!r}: it does not exist")
        try:
            try:
                fd = os.open(rel.rpartition("/")[2], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fds[-1])
            except OSError as e:
                raise UnsafePath(f"cannot change the mode of {rel!r}: {e.strerror}") from None
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        finally:
            _close(fds)

    def delete(self, rel: str) -> str:
        return _os_errors(rel, lambda: self._delete(rel))

    def _delete(self, rel: str) -> str:
        """Remove the file (or link) `rel`, and folders it leaves empty (as git does).
        Returns the real path (see `real_path`)."""
        comps = self._real_parent(rel)
        real = "/".join([*comps, rel.rpartition("/")[2]])
        fds = self._open_parent(rel, create=False)
        if fds is None:
            return real
        try:
            name = rel.rpartition("/")[2]
            old = _lstat(name, fds[-1])
            if old is None:
                return real
            if stat.S_ISDIR(old.st_mode):
                raise TreeWriteError(f"cannot delete {rel!r}: it is a folder")
            os.unlink(name, dir_fd=fds[-1])
            for i in range(len(comps) - 1, -1, -1):
                try:
                    os.rmdir(comps[i], dir_fd=fds[i])
                except OSError:
                    break
            return real
        finally:
            _close(fds)


_T = TypeVar("_T")


def _os_errors(rel: str, op: Callable[[], _T]) -> _T:
    """An OS error while writing (no space, a name too long, no permission) is one
    TreeWriteError naming the path and the cause, not a crash."""
    try:
        return op()
    except OSError as e:
        raise TreeWriteError(f"cannot write {rel!r}: {e.strerror or e}") from None


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def mode_bits(git_mode: str | None) -> int | None:
    """A git file mode (`100755`, `100644`) -> permission bits; None when absent."""
    if not git_mode:
        return None
    if git_mode.endswith("755"):
        return 0o755
    if git_mode.endswith("644"):
        return 0o644
    raise TreeWriteError(f"unsupported file mode {git_mode} (only regular files: 100644 or 100755)")
