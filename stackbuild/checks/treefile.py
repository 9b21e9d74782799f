"""One reader for the Python files of a patched tree, for every static check: a file
that cannot be read or parsed comes back as a reason naming file:line, never as an
exception, so one broken file costs the checks that file and nothing else (the compile
check is the one that fails on it)."""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Unparsable:
    rel: str
    line: int | None
    reason: str  # "SyntaxError: invalid syntax", "dangling symlink", ...

    @property
    def where(self) -> str:
        return f"{self.rel}:{self.line}" if self.line else self.rel

    def render(self) -> str:
        return f"{self.where}: {self.reason}"


def unreadable_reason(path: Path) -> str | None:
    """Why `path` cannot be read as a file (None when it can, or when it is absent)."""
    if path.is_symlink() and not path.exists():
        return f"dangling symlink (-> {os.readlink(path)})"
    if path.is_dir():
        return "a directory where a file is expected"
    if path.exists() and not path.is_file():
        return "not a regular file"
    return None


# Parsed files shared by the checks of one process (compile parses what registry,
# imports and api then read): keyed by path, mtime and size, so an edited file is
# parsed again and an unchanged one never is. The trees are read, never modified.
_PARSED: dict[tuple[str, int, int], ast.Module | Unparsable] = {}


def parse_python(path: Path, rel: str) -> ast.Module | Unparsable:
    """The module AST of one file of the tree, or why there is none (named `rel`)."""
    try:
        st = path.stat()
    except OSError:
        return _parse(path, rel)
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _PARSED:
        _PARSED[key] = _parse(path, rel)
    got = _PARSED[key]
    return replace(got, rel=rel) if isinstance(got, Unparsable) else got


def _parse(path: Path, rel: str) -> ast.Module | Unparsable:
    why = unreadable_reason(path)
    if why is not None:
        return Unparsable(rel, None, f"cannot read: {why}")
    try:
        data = path.read_bytes()
    except OSError as e:
        return Unparsable(rel, None, f"cannot read: {e.strerror or e}")
    try:
        return ast.parse(data, filename=rel)
    except SyntaxError as e:  # invalid UTF-8 and null bytes included
        return Unparsable(rel, e.lineno, f"{type(e).__name__}: {e.msg}")
    except (ValueError, RecursionError, MemoryError) as e:
        return Unparsable(rel, None, f"cannot parse: {type(e).__name__}: {e}")


def present(path: Path) -> bool:
    """Whether something is at `path` (a dangling symlink counts: it was not deleted)."""
    return path.exists() or path.is_symlink()
