"""The one runner for git: every git command stackbuild runs goes through `git_process`.

A workspace tree is built from untrusted input (patch text, archives, mirrors), so git
must not take instructions from it:
- hooks are off (`core.hooksPath=/dev/null`) and so is fsmonitor
  (`core.fsmonitor=false`), given on the command line, which wins over any config file;
- the system and global config files are not read (`GIT_CONFIG_NOSYSTEM`,
  `GIT_CONFIG_GLOBAL=/dev/null`), and no inherited `GIT_*` variable (GIT_DIR,
  GIT_CONFIG_COUNT/KEY/VALUE, GIT_EXTERNAL_DIFF, GIT_SSH_COMMAND, ...) reaches git:
  only the ones a caller passes explicitly;
- the repository's own `.git/config` is still read (git cannot skip it), which is
  why the tree writer (stackbuild.treewrite) refuses every path into git metadata.

Identity and dates are fixed so that the same inputs give the same commit ids.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from stackbuild.errors import StackbuildError

# Workspace commits are deterministic: same inputs, same commit ids.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "stackbuild",
    "GIT_AUTHOR_EMAIL": "stackbuild@localhost",
    "GIT_COMMITTER_NAME": "stackbuild",
    "GIT_COMMITTER_EMAIL": "stackbuild@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_TERMINAL_PROMPT": "0",
}

# Given before the subcommand: command-line config beats every config file.
GIT_SAFE_ARGS = ("-c", f"core.hooksPath={os.devnull}", "-c", "core.fsmonitor=false")


def git_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment without any inherited GIT_* variable, plus the fixed
    identity and config isolation, plus `extra` (what the caller means git to see)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return {**base, **GIT_ENV, **(extra or {})}


def git_argv(*args: str) -> list[str]:
    return ["git", *GIT_SAFE_ARGS, *args]


def git_process(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run git with hooks and fsmonitor off, a clean environment and stackbuild's fixed
    identity and dates (plus `env`); never raises for git's own failures."""
    return subprocess.run(git_argv(*args), cwd=cwd, env=git_env(env), capture_output=True, text=True, input=stdin)


def git_bytes(cwd: Path, *args: str, env: Mapping[str, str] | None = None,
              stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """`git_process` for binary data (a pack on stdin or stdout); never raises for
    git's own failures."""
    return subprocess.run(git_argv(*args), cwd=cwd, env=git_env(env), capture_output=True, input=stdin)


def run_git(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, error: type[StackbuildError] = StackbuildError
) -> str:
    """`git_process`, raising `error` naming the command and git's stderr tail on
    failure; stdout stripped."""
    r = git_process(cwd, *args, env=env)
    if r.returncode != 0:
        tail = "\n".join((r.stderr.strip() or r.stdout.strip()).splitlines()[-5:])
        raise error(f"git {' '.join(args[:3])} failed: {tail}", file=cwd)
    return r.stdout.strip()


def read_blobs(cwd: Path, specs: Sequence[str]) -> dict[str, bytes | None]:
    """`REV:PATH` -> the blob's bytes (None when git has no such object), for many at
    once through one `git cat-file --batch` (a `git show` per file costs a process each)."""
    if not specs:
        return {}
    if any("\n" in s for s in specs):
        raise ValueError("a REV:PATH with a newline cannot be asked of git cat-file --batch")
    r = subprocess.run(git_argv("cat-file", "--batch"), cwd=cwd, env=git_env(), capture_output=True,
                       input="".join(f"{s}\n" for s in specs).encode())
    out: dict[str, bytes | None] = {}
    data, pos = r.stdout, 0
    for spec in specs:
        nl = data.find(b"\n", pos)
        if nl < 0:
            out[spec] = None
            continue
        head = data[pos:nl].split()
        pos = nl + 1
        if len(head) == 3 and head[1] == b"blob":
            size = int(head[2])
            out[spec] = data[pos:pos + size]
            pos += size + 1
        elif len(head) == 3:  # a tree or commit: skip its body
            pos += int(head[2]) + 1
            out[spec] = None
        else:  # "<spec> missing"
            out[spec] = None
    return out
