"""`stackbuild apply RECIPE --onto DIR` and `stackbuild apply-patch FILE --onto DIR`:
a series (or one patch file) onto a git checkout the user already has.

The user's checkout is never written while the verdicts are made: the patches are
applied, through the same tree door and with the same verdicts as a workspace, in a
scratch checkout outside DIR (`git clone --shared`: it reads DIR's objects and writes
its own; only the files the series reads are written out, see `_SparseTree`), one
commit per patch. Only when every patch applied (and a commit was asked
for) are the new commits and the branch fetched into DIR, in one `git fetch`. On any
other outcome nothing under DIR changes, .git included; the scratch checkout is
removed either way.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from stackbuild.errors import PatchError, SourceError
from stackbuild.gitrun import git_process, run_git
from stackbuild.recipe import PatchEntry, PatchKind, Recipe
from stackbuild.series import PatchVerdict
from stackbuild.treewrite import Tree, TreeWriteError
from stackbuild.workspace import (
    ApplyResult,
    PatchResult,
    _apply_backport,
    _apply_text_patch,
    _Ctx,
    _patch_bytes,
    _replace,
    entry_file,
    refused_for_refresh_marks,
)

Progress = Callable[[str], None]
_READ_ONLY = {"GIT_OPTIONAL_LOCKS": "0"}  # looking must not refresh DIR's index


def checkout_root(target: Path) -> Path:
    """`target` as the top folder of a git checkout with a commit checked out and
    nothing uncommitted; otherwise one error (exit 2) naming DIR and the cause."""
    target = target.resolve()
    if not target.is_dir():
        raise SourceError("not a directory", file=target)
    r = git_process(target, "rev-parse", "--show-toplevel", env=_READ_ONLY)
    if r.returncode != 0:
        raise SourceError("not a git checkout (--onto needs one)", file=target)
    top = Path(r.stdout.strip()).resolve()
    if top != target:
        raise SourceError(f"not the top of its git checkout (that is {top}); give the top folder", file=target)
    s = git_process(target, "status", "--porcelain", "-z", "--untracked-files=all", env=_READ_ONLY)
    if s.returncode != 0:
        raise SourceError(f"git status failed: {s.stderr.strip()[-300:]}", file=target)
    changed: list[str] = []
    entries = iter(s.stdout.split("\0"))
    for e in entries:
        if len(e) > 3:
            changed.append(e[3:])
            if e[0] in "RC":  # -z: a rename's old name follows as an entry of its own
                next(entries, None)
    if changed:
        shown = ", ".join(changed[:20]) + (f" and {len(changed) - 20} more" if len(changed) > 20 else "")
        raise SourceError(f"the checkout has uncommitted changes ({shown}); commit or stash them first", file=target)
    return target


def _head(target: Path) -> str:
    r = git_process(target, "rev-parse", "--verify", "-q", "HEAD^{commit}", env=_READ_ONLY)
    if r.returncode != 0:
        raise SourceError("the checkout has no commit yet", file=target)
    return r.stdout.strip()


def _check_branch(target: Path, branch: str, force: bool) -> None:
    if git_process(target, "check-ref-format", "--branch", branch).returncode != 0:
        raise SourceError(f"{branch!r} is not a valid branch name", file=target)
    exists = git_process(target, "rev-parse", "--verify", "-q", f"refs/heads/{branch}", env=_READ_ONLY).returncode == 0
    if exists and not force:
        raise SourceError(f"branch {branch} already exists; give another --branch, or --force to move it", file=target)
    if exists and git_process(target, "symbolic-ref", "-q", "HEAD", env=_READ_ONLY).stdout.strip() == f"refs/heads/{branch}":
        raise SourceError(f"branch {branch} is checked out in {target}; it cannot be moved under the checkout", file=target)


@contextmanager
def _scratch_checkout(target: Path, head: str) -> Iterator[_SparseTree]:
    """DIR's HEAD in a scratch repository in a temporary folder outside DIR, removed
    whatever happens. It borrows DIR's objects read-only (`clone --shared`), so the
    commits made in it are written to the scratch repository, never into DIR."""
    parent = Path(tempfile.mkdtemp(prefix="stackbuild-onto-"))
    try:
        run_git(parent, "clone", "-q", "--shared", "--no-checkout", str(target), "tree", error=SourceError)
        tree = parent / "tree"
        # DIR's line-ending settings shape its files
        for line in git_process(target, "config", "--get-regexp", r"^core\.(autocrlf|eol)$").stdout.splitlines():
            key, _, value = line.partition(" ")
            run_git(tree, "config", key, value, error=SourceError)
        run_git(tree, "update-ref", "--no-deref", "HEAD", head, error=SourceError)
        run_git(tree, "read-tree", head, error=SourceError)
        yield _SparseTree(tree)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


class _SparseTree:
    """A checkout whose index holds every file of HEAD but whose folder holds only the
    files the series reads: writing out 4,500 files to change two is most of the cost
    of a full checkout. Every read of the tree door asks `fill` first, which brings the
    file in (`git checkout-index`) when HEAD has it, so a patch sees exactly what a full
    checkout would show. Symbolic links and .gitattributes files are written out up
    front: the door resolves links in folder names, and git reads attributes from them.
    A commit records the index, so files never brought in stay as HEAD has them."""

    def __init__(self, path: Path):
        self.path = path
        self.door = Tree(path)
        self.in_head: set[str] = set()
        self.folders: dict[str, str] = {}  # a folder in HEAD -> one file in it
        self.brought: set[str] = set()
        up_front = []
        for e in run_git(path, "ls-files", "-s", "-z", error=SourceError).split("\0"):
            meta, _, rel = e.partition("\t")
            if not rel:
                continue
            self.in_head.add(rel)
            parts = rel.split("/")
            for i in range(1, len(parts)):
                self.folders.setdefault("/".join(parts[:i]), rel)
            if meta.startswith("120000 ") or rel.rpartition("/")[2] == ".gitattributes":
                up_front.append(rel)
        self._checkout(up_front)

    def _checkout(self, paths: Sequence[str]) -> None:
        todo = [p for p in paths if p not in self.brought]
        if not todo:
            return
        self.brought.update(todo)
        r = git_process(self.path, "checkout-index", "-f", "-z", "--stdin", stdin="\0".join(todo) + "\0")
        if r.returncode != 0:
            raise SourceError(f"cannot check out {', '.join(todo[:5])}: {r.stderr.strip()[-300:]}", file=self.path)

    def fill(self, rel: str) -> None:
        try:
            real = self.door.real_path(rel)
        except TreeWriteError:
            return  # the door refuses the path itself when it is read
        # the file, a file of HEAD standing where the path needs a folder, and a file
        # of the folder HEAD has where the path names a file: the door then sees what
        # a full checkout would show it ("is a file, not a folder", "it is a folder")
        parts = real.split("/")
        wanted = [p for p in ("/".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in self.in_head]
        if real in self.folders:
            wanted.append(self.folders[real])
        self._checkout(wanted)


def _run_series(ctx: _Ctx | None, entries: Sequence[tuple[PatchEntry, Callable[[], bytes] | None]], tree: _SparseTree,
                progress: Progress) -> tuple[list[PatchResult], PatchResult | None]:
    results: list[PatchResult] = []
    failed: PatchResult | None = None
    for i, (entry, data) in enumerate(entries):
        if failed is not None:
            results.append(PatchResult(entry.name, entry.kind.value, entry.source, PatchVerdict.NOT_ATTEMPTED,
                                       f"the series stopped at {failed.name}"))
            continue
        progress(f"[{i + 1}/{len(entries)}] {entry.name}")
        if data is None:
            assert ctx is not None
            for rel in entry.files:
                tree.fill(rel)
            r = _apply_backport(ctx, entry, tree.path)
        else:
            r = _apply_text_patch(ctx, entry, data(), tree.path, tree.fill)
        results.append(r)
        if not r.verdict.ok:
            failed = r
    return results, failed


def _finish(name: str, target: Path, tree: _SparseTree, results: list[PatchResult], failed: PatchResult | None,
            where: Callable[[str], str], branch: str | None, force: bool) -> ApplyResult:
    if failed is not None or branch is None:
        # the scratch commits are not reachable from DIR: naming them would mislead
        results = [_replace(r, commit=None) for r in results]
    if failed is not None:
        cause = failed.detail.split("; ")[0]
        cause = cause if len(cause) <= 300 else cause[:297] + "..."
        msg = (f"{failed.name} ({where(failed.name)}): {failed.verdict.value}" + (f": {cause}" if cause else "")
               + f"; {target} was left as it was")
        return ApplyResult(name, target, False, False, msg, tuple(results), failed)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.verdict.value] = counts.get(r.verdict.value, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    if branch is None:
        return ApplyResult(name, target, False, True, f"{summary}; dry verdict: nothing written (--commit to commit it)",
                           tuple(results))
    tip = run_git(tree.path, "rev-parse", "HEAD")
    # the scratch commits and the branch arrive in DIR together, and only now
    run_git(target, "fetch", "-q", "--no-tags", "--no-write-fetch-head", str(tree.path),
            f"{'+' if force else ''}HEAD:refs/heads/{branch}", error=SourceError)
    return ApplyResult(name, target, True, True, f"{summary}; branch {branch} at {tip[:12]}", tuple(results))


def apply_onto(recipe: Recipe, target: Path, source: str | None = None, branch: str | None = None,
               force: bool = False, progress: Progress | None = None) -> ApplyResult:
    """The recipe's series for one patched source, one commit per patch, onto the clean
    checkout `target`, ending in a new branch (default `stackbuild/RECIPE`)."""
    say = progress or (lambda _m: None)
    patched = recipe.patched_sources
    if source is None:
        if len(patched) != 1:
            raise PatchError(f"the recipe patches {len(patched)} sources ({', '.join(patched)}); "
                             "say which one DIR is with --source NAME", file=recipe.path)
        source = patched[0]
    elif source not in patched:
        raise PatchError(f"--source {source}: the recipe patches {', '.join(patched) or 'no source'}", file=recipe.path)
    refused = refused_for_refresh_marks(recipe, target, source)
    if refused is not None:
        return refused
    target = checkout_root(target)
    head = _head(target)
    branch = branch or f"stackbuild/{recipe.name}"
    _check_branch(target, branch, force)
    ctx = _Ctx(recipe, recipe.root, say)
    entries: list[tuple[PatchEntry, Callable[[], bytes] | None]] = []
    for i, entry in enumerate(recipe.patches):
        if entry.source != source:
            continue
        if entry.kind is PatchKind.BACKPORT:
            entries.append((entry, None))
        else:
            _patch_bytes(ctx, entry, i)  # read and sha256-checked before anything is done
            entries.append((entry, functools.partial(_patch_bytes, ctx, entry, i)))
    with _scratch_checkout(target, head) as tree:
        results, failed = _run_series(ctx, entries, tree, say)
        return _finish(recipe.name, target, tree, results, failed, lambda n: entry_file(recipe, n), branch, force)


def apply_patch_onto(patch: Path, target: Path, strip: int = 1, fuzz: int = 0, commit: bool = False,
                     branch: str | None = None, force: bool = False) -> ApplyResult:
    """One patch file's verdict on the clean checkout `target`, without a recipe. Dry
    (nothing written) unless `commit`: then a new branch (default `stackbuild/STEM`)."""
    if strip < 0 or fuzz < 0:
        raise PatchError("--strip and --fuzz must be 0 or more", file=patch)
    try:
        data = patch.read_bytes()
    except OSError as e:
        raise PatchError(f"cannot read the patch: {e.strerror or e}", file=patch) from None
    target = checkout_root(target)
    head = _head(target)
    if commit:
        branch = branch or f"stackbuild/{patch.stem}"
        _check_branch(target, branch, force)
    entry = PatchEntry(patch.name, PatchKind.FILE, target.name, None, strip=strip, fuzz=fuzz, file=str(patch))
    with _scratch_checkout(target, head) as tree:
        results, failed = _run_series(None, [(entry, lambda: data)], tree, lambda _m: None)
        return _finish(patch.name, target, tree, results, failed, lambda _n: str(patch), branch if commit else None, force)
