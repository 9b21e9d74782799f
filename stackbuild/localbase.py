"""Content-addressed base repositories for `kind local` sources, as releases have.

A local source used to be copied and `git add`ed whole (4,500 files for vLLM) on
every apply. Now its content is imported once into a bare repository in the cache,
`bases/local-KEY.git` (branch `stackbuild`, one commit), and a workspace is cloned
from it like a release's base. The key says what the content is:

- `git-tree-ID`: the source is a clean git checkout (or a clean folder of one):
  its content is HEAD's tree at that folder, and ID is git's own id for that tree,
  read in a few milliseconds. The import packs exactly those objects out of the
  user's repository (`git pack-objects`, which only reads it). "Clean" is
  `git status` with untracked files: nothing modified, staged or untracked. Files
  the checkout ignores (build outputs, `__pycache__`) are not part of HEAD's tree
  and so not of the base.
- `files-SHA256`: anything else (not a checkout, a dirty one, one with submodules):
  a digest over every file's path and bytes (git metadata excluded), and the import
  adds every file, ignored ones too, as the old copy did. Only reads the folder.

Nothing is ever written into the user's folder or repository: git runs there only
with optional locks off (`git status` would otherwise refresh the index), and the
import's objects go into a temporary bare repository that is renamed into place
whole once its ref exists. A workspace must not share inodes with this cache; the
clone is the workspace module's business (see `workspace._materialise`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stackbuild.cache import cache_dir, locked
from stackbuild.errors import SourceError
from stackbuild.gitrun import git_process, run_git

BRANCH = "stackbuild"
# git must not refresh the user's index (a write) while we only look at the checkout
_READ_ONLY = {"GIT_OPTIONAL_LOCKS": "0"}


@dataclass(frozen=True)
class LocalIdentity:
    path: Path
    key: str  # "git-tree-<id>" or "files-<sha256>": names the cache entry
    tree: str | None = None  # the git tree id when the source is a clean checkout
    repo: Path | None = None  # ... and the checkout's top folder (to pack its objects from)
    why_files: str = ""  # why the content is hashed file by file (for the progress line)

    @property
    def describe(self) -> str:
        if self.tree:
            return f"clean git checkout, tree {self.tree[:12]}"
        return f"files digest {self.key.removeprefix('files-')[:12]} ({self.why_files})"


def identify(path: Path) -> LocalIdentity:
    """What the local source at `path` holds, as a cache key (see the module doc)."""
    # one rev-parse: the top folder, the folder's place in it, and HEAD's tree there
    # (`HEAD:./` is the folder's own path in HEAD); it prints each answer in turn
    r = git_process(path, "rev-parse", "--show-toplevel", "--show-prefix", "--verify", "-q", "HEAD:./", env=_READ_ONLY)
    lines = r.stdout.split("\n")
    if r.returncode not in (0, 1) or len(lines) < 2:
        return _by_files(path, "not a git checkout")
    top = lines[0]
    if r.returncode != 0 or len(lines) < 3 or not lines[2].strip():
        return _by_files(path, "the folder is not in the checkout's HEAD")
    tree = lines[2].strip()
    s = git_process(path, "status", "--porcelain", "-z", "--untracked-files=all", "--ignore-submodules=none",
                    "--", ".", env=_READ_ONLY)
    if s.returncode != 0:
        return _by_files(path, "git status failed")
    if s.stdout:
        return _by_files(path, "the checkout has uncommitted changes")
    # a tree with a submodule is never cached under its tree id, so a cache entry for
    # this id means it was listed before and has none (the id names the content)
    if not (cache_dir() / "bases" / f"local-git-tree-{tree}.git" / "refs" / "heads" / BRANCH).exists():
        entries = git_process(path, "ls-tree", "-r", tree, env=_READ_ONLY)
        if entries.returncode != 0 or "\n160000 " in "\n" + entries.stdout:
            return _by_files(path, "the checkout has submodules")
    return LocalIdentity(path, f"git-tree-{tree}", tree, Path(top.strip()))


def _by_files(path: Path, why: str) -> LocalIdentity:
    return LocalIdentity(path, f"files-{files_digest(path)}", why_files=why)


def files_digest(path: Path) -> str:
    """sha256 over every file's relative path and bytes, git metadata excluded."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if ".git" in f.relative_to(path).parts or not f.is_file():
            continue
        h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def base_repo(ident: LocalIdentity, rebuild: bool = False) -> Path:
    """The bare cache repository holding the local source's content as one commit on
    branch `stackbuild` (imported on first use). The commit names the content, not the
    folder: two recipes whose folders hold the same tree share it, and the same content
    gives the same base commit id wherever it lies. `rebuild` imports it again (a clone
    of the cached one failed: the cache was damaged)."""
    bases = cache_dir() / "bases"
    base = bases / f"local-{ident.key}.git"
    with locked(cache_dir() / "locks" / f"base-local-{ident.key}.lock", f"cache entry for {ident.path}", timeout=600):
        if (base / "refs" / "heads" / BRANCH).exists() and not rebuild:
            return base
        bases.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=bases))
        try:
            run_git(tmp, "init", "-q", "--bare", "-b", BRANCH, error=SourceError)
            tree = _import_tree(ident, tmp) if ident.tree else _import_files(ident, tmp)
            commit = run_git(tmp, "commit-tree", tree, "-m", f"base: local source, {ident.key}", error=SourceError)
            # the ref is written last: a repository without it is litter, never a base
            run_git(tmp, "update-ref", f"refs/heads/{BRANCH}", commit, error=SourceError)
            shutil.rmtree(base, ignore_errors=True)
            os.replace(tmp, base)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return base


def _import_tree(ident: LocalIdentity, dest: Path) -> str:
    """Pack the tree's objects out of the user's repository (read only) into `dest`."""
    assert ident.tree and ident.repo
    objects = run_git(ident.repo, "rev-list", "--objects", ident.tree, error=SourceError)
    pack = git_process(ident.repo, "pack-objects", "-q", str(dest / "objects" / "pack" / "pack"),
                       stdin=objects + "\n", env=_READ_ONLY)
    if pack.returncode != 0:
        raise SourceError(f"cannot read tree {ident.tree} from the checkout: {pack.stderr.strip()[-300:]}", file=ident.repo)
    if run_git(dest, "cat-file", "-t", ident.tree, error=SourceError) != "tree":
        raise SourceError(f"tree {ident.tree} did not arrive in the cache", file=ident.repo)
    return ident.tree


def _import_files(ident: LocalIdentity, dest: Path) -> str:
    """Add every file of the folder (ignored ones too, git metadata never) to `dest`'s
    object store through a private index: the folder is only read."""
    env = {"GIT_DIR": str(dest), "GIT_WORK_TREE": str(ident.path), "GIT_INDEX_FILE": str(dest / "import-index")}
    run_git(ident.path, "-c", "core.autocrlf=false", "add", "-A", "-f", env=env, error=SourceError)
    tree = run_git(ident.path, "write-tree", env=env, error=SourceError)
    (dest / "import-index").unlink()
    return tree
