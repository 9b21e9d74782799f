"""Reading a source tree's own requirement files (`requirements/common.txt`, `-r`
includes, `--extra-index-url` lines) into plain records the lock planner can merge
with the recipe's pins."""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from stackbuild.inputs import read_user_text
from stackbuild.lock.errors import LockError

# Options a requirement file may carry that do not change *what* is locked.
_IGNORED_OPTIONS = {"--pre", "--prefer-binary", "--only-binary", "--no-binary", "--trusted-host"}
_INDEX_OPTIONS = {"-i", "--index-url", "--extra-index-url"}
_FIND_LINKS_OPTIONS = {"-f", "--find-links"}
_INCLUDE_OPTIONS = {"-r", "--requirement"}
_CONSTRAINT_OPTIONS = {"-c", "--constraint"}


@dataclass(frozen=True)
class DeclaredRequirement:
    """One requirement line of the source, as written (comment stripped)."""

    text: str
    name: str  # canonical name
    file: str  # path relative to the source tree root
    line: int
    constraint: bool = False  # from a `-c` file: limits versions, adds nothing

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def parsed(self) -> Requirement:
        return Requirement(self.text)


@dataclass(frozen=True)
class DeclaredIndex:
    url: str
    file: str
    line: int
    find_links: bool = False


@dataclass(frozen=True)
class SourceRequirements:
    root_files: tuple[str, ...]  # what was asked for, relative to the tree
    files: tuple[str, ...]  # every file read, includes too, in reading order
    requirements: tuple[DeclaredRequirement, ...]
    indexes: tuple[DeclaredIndex, ...]
    ignored_options: tuple[str, ...]  # "requirements/x.txt:3: --pre"
    sha256: str  # over the contents of every file read, in order


def requirement_files_for(target_device: str) -> tuple[str, ...]:
    """vLLM's runtime requirement files for a build target: common.txt always, the
    target's own file (which includes common.txt) for xpu."""
    if target_device == "xpu":
        return ("requirements/xpu.txt", "requirements/common.txt")
    return ("requirements/common.txt",)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Join backslash continuations and strip comments, keeping the first line number."""
    out: list[tuple[int, str]] = []
    buf = ""
    start = 0
    for i, raw in enumerate(text.splitlines(), start=1):
        line = raw
        if not buf:
            start = i
        # pip: a comment starts at '#' at line start or after whitespace
        if line.lstrip().startswith("#"):
            line = ""
        else:
            for j, ch in enumerate(line):
                if ch == "#" and (j == 0 or line[j - 1].isspace()):
                    line = line[:j]
                    break
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            out.append((start, buf.strip()))
        buf = ""
    if buf.strip():
        out.append((start, buf.strip()))
    return out


def _split_option(line: str) -> tuple[str, str | None]:
    """'--extra-index-url=URL' or '--extra-index-url URL' or '-rfile' -> (option, value)."""
    if line.startswith("--"):
        if "=" in line.split()[0]:
            opt, _, val = line.partition("=")
            return opt.strip(), val.strip() or None
        parts = line.split(None, 1)
        return parts[0], parts[1].strip() if len(parts) > 1 else None
    # short option: "-r file", "-rfile"
    opt, rest = line[:2], line[2:].strip()
    return opt, rest or None


def read_source_requirements(tree: Path, files: tuple[str, ...]) -> SourceRequirements:
    """Read `files` (relative to `tree`) and everything they include."""
    tree = tree.resolve()
    reqs: list[DeclaredRequirement] = []
    indexes: list[DeclaredIndex] = []
    ignored: list[str] = []
    read: list[str] = []
    digest = hashlib.sha256()

    def rel(p: Path) -> str:
        try:
            return p.resolve().relative_to(tree).as_posix()
        except ValueError:
            raise LockError("includes a file outside the source tree", file=p) from None

    def visit(path: Path, constraint: bool, chain: tuple[str, ...]) -> None:
        name = rel(path)
        if name in chain:
            raise LockError(f"include cycle: {' -> '.join((*chain, name))}", file=path)
        if name in read:
            return
        where = f" (included from {chain[-1]})" if chain else ""
        text = read_user_text(path, f"requirement file{where}", LockError)
        read.append(name)
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        for lineno, line in logical_lines(text):
            if line.startswith("-"):
                opt, val = _split_option(line)
                if opt in _INCLUDE_OPTIONS or opt in _CONSTRAINT_OPTIONS:
                    if not val:
                        raise LockError(f"line {lineno}: {opt} needs a file", file=path)
                    visit(path.parent / shlex.split(val)[0], constraint or opt in _CONSTRAINT_OPTIONS,
                          (*chain, name))
                elif opt in _INDEX_OPTIONS or opt in _FIND_LINKS_OPTIONS:
                    if not val:
                        raise LockError(f"line {lineno}: {opt} needs a URL", file=path)
                    indexes.append(DeclaredIndex(val, name, lineno, find_links=opt in _FIND_LINKS_OPTIONS))
                elif opt in _IGNORED_OPTIONS:
                    ignored.append(f"{name}:{lineno}: {line}")
                else:
                    raise LockError(f"line {lineno}: option {opt!r} is not supported in a locked source "
                                    "(editable installs and unknown options cannot be locked)", file=path)
                continue
            try:
                req = Requirement(line)
            except InvalidRequirement as e:
                raise LockError(f"line {lineno}: not a requirement: {e}", file=path) from None
            reqs.append(DeclaredRequirement(str(req), canonicalize_name(req.name), name, lineno, constraint))

    for f in files:
        p = tree / f
        if not p.is_file():
            raise LockError("missing: the source tree has no such requirement file", file=p)
        visit(p, False, ())
    return SourceRequirements(
        root_files=tuple(files),
        files=tuple(read),
        requirements=tuple(reqs),
        indexes=tuple(indexes),
        ignored_options=tuple(ignored),
        sha256=digest.hexdigest(),
    )
