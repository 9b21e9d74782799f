"""`stackbuild apply RECIPE --onto DIR` and `stackbuild apply-patch FILE --onto DIR`:
a series (or one patch file) onto a git checkout the user already has.

The user's checkout is never written while the verdicts are made: git only reads DIR
(`rev-parse`, `status`, `config`), and the patches are applied, through the same
tree door and with the same verdicts as a workspace, in a scratch repository outside
DIR (a fresh `git init`: its own config, so none of DIR's filters or hooks run there;
it reads DIR's objects through GIT_ALTERNATE_OBJECT_DIRECTORIES and writes its own),
one commit per patch, with only the files the series reads written out (SparseTree).
Only when every patch applied (and a commit was asked for) do the new objects arrive
in DIR, as one pack (`unpack-objects`), and then the branch (`update-ref`, compare and
swap). On any other outcome nothing under DIR changes, .git included; the scratch
repository is removed either way.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stackbuild.errors import PatchError, SourceError
from stackbuild.gitrun import git_bytes, git_process, run_git
from stackbuild.recipe import PatchEntry, PatchKind, Recipe
from stackbuild.series import PatchVerdict
from stackbuild.sparsetree import SparseTree
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
# names judged without asking git: plain characters, and git's rules on them
_PLAIN_BRANCH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*")


@dataclass(frozen=True)
class _Checkout:
    """What a run needs to know of DIR, read in two git commands."""

    top: Path
    objects: Path  # DIR's object store (shared by its worktrees): the scratch repository borrows it
    object_format: str  # sha1 or sha256: the scratch repository must use DIR's
    head: str
    branch_tip: str | None  # the commit the asked-for branch is at, when it exists


def checkout_root(target: Path) -> Path:
    """`target` as the top folder of a git checkout with a commit checked out and
    nothing uncommitted; otherwise one error (exit 2) naming DIR and the cause."""
    return _look(target, None).top


def _look(target: Path, branch: str | None) -> _Checkout:
    """DIR as a clean checkout with a commit (else one error, exit 2), and where
    `branch` is. One `rev-parse` (top folder, object store, the branch) and one
    `status` (what is uncommitted, HEAD's commit), both only reading."""
    target = target.resolve()
    if not target.is_dir():
        raise SourceError("not a directory", file=target)
    asks = ("--verify", "-q", f"refs/heads/{branch}") if branch else ()
    r = git_process(target, "rev-parse", "--show-toplevel", "--git-path", "objects", "--show-object-format", *asks,
                    env=_READ_ONLY)
    lines = r.stdout.splitlines()
    # rev-parse prints each answer in turn; exit 1 (and no fourth line) is a missing branch
    if r.returncode not in (0, 1) or len(lines) < 3 or (r.returncode == 1 and not branch):
        raise SourceError("not a git checkout (--onto needs one)", file=target)
    top = Path(lines[0]).resolve()
    if top != target:
        raise SourceError(f"not the top of its git checkout (that is {top}); give the top folder", file=target)
    tip = lines[3].strip() if branch and r.returncode == 0 and len(lines) > 3 else None
    s = git_process(target, "status", "--porcelain=v2", "--branch", "--no-ahead-behind", "-z",
                    "--untracked-files=all", env=_READ_ONLY)
    if s.returncode != 0:
        raise SourceError(f"git status failed: {s.stderr.strip()[-300:]}", file=target)
    head = ""
    changed: list[str] = []
    entries = iter(s.stdout.split("\0"))
    for e in entries:
        if e.startswith("# branch.oid "):
            head = e.removeprefix("# branch.oid ").strip()
        elif e[:2] in ("1 ", "u ", "? ", "! "):  # the path is the last field (it may hold spaces)
            changed.append(e.split(" ", {"1": 8, "u": 10}.get(e[0], 1))[-1])
        elif e.startswith("2 "):  # a rename or copy: its new name, then the old one as an entry of its own
            changed.append(e.split(" ", 9)[-1])
            next(entries, None)
    if changed:
        shown = ", ".join(changed[:20]) + (f" and {len(changed) - 20} more" if len(changed) > 20 else "")
        raise SourceError(f"the checkout has uncommitted changes ({shown}); commit or stash them first", file=target)
    if not head or head == "(initial)":
        raise SourceError("the checkout has no commit yet", file=target)
    return _Checkout(top, (target / lines[1]).resolve(), lines[2].strip(), head, tip)


def _plain_branch(branch: str) -> bool:
    """True only for names `git check-ref-format --branch` accepts, judged here: plain
    characters under git's rules (no `..`, no part that starts with `.` or ends with
    `.lock`, no empty part, no `.` at the end). Any other name is asked of git."""
    return (branch != "HEAD" and _PLAIN_BRANCH.fullmatch(branch) is not None and ".." not in branch
            and not branch.endswith(".")
            and all(p and not p.startswith(".") and not p.endswith(".lock") for p in branch.split("/")))


def _prepare(target: Path, branch: str | None, force: bool) -> _Checkout:
    """DIR checked (`_look`), and `branch` (None for a dry verdict) checked: a valid
    name, and new unless `force`, and then not checked out anywhere."""
    plain = branch is None or _plain_branch(branch)
    co = _look(target, branch if plain else None)
    if branch is None:
        return co
    if not plain:
        if git_process(co.top, "check-ref-format", "--branch", branch).returncode != 0:
            raise SourceError(f"{branch!r} is not a valid branch name", file=co.top)
        r = git_process(co.top, "rev-parse", "--verify", "-q", f"refs/heads/{branch}", env=_READ_ONLY)
        co = dataclasses.replace(co, branch_tip=r.stdout.strip() if r.returncode == 0 else None)
    if co.branch_tip is not None:
        _check_branch(co, branch, force)
    return co


def _check_branch(co: _Checkout, branch: str, force: bool) -> None:
    if not force:
        raise SourceError(f"branch {branch} already exists; give another --branch, or --force to move it", file=co.top)
    # a branch checked out in DIR or in another of its worktrees is not moved under it
    wt = git_process(co.top, "worktree", "list", "--porcelain", "-z", env=_READ_ONLY)
    where = ""
    for block in wt.stdout.split("\0\0"):
        fields = block.strip("\0").split("\0")
        if f"branch refs/heads/{branch}" in fields:
            where = fields[0].removeprefix("worktree ")
    if where or wt.returncode != 0:
        raise SourceError(f"branch {branch} is checked out in {where or 'a worktree'}; it cannot be moved under the "
                          "checkout", file=co.top)


def _alternate(objects: Path) -> str:
    """`objects` as the one entry of GIT_ALTERNATE_OBJECT_DIRECTORIES, a colon-separated
    list: a path holding a colon (or starting with a quote) is given C-quoted, which git
    reads back as the path (git(1), GIT_ALTERNATE_OBJECT_DIRECTORIES)."""
    path = str(objects)
    if ":" not in path and not path.startswith('"'):
        return path
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@contextmanager
def _scratch_checkout(co: _Checkout) -> Iterator[SparseTree]:
    """DIR's HEAD in a scratch repository in a temporary folder outside DIR, removed
    whatever happens. A fresh repository (its own config: nothing of DIR's filters or
    hooks runs, nothing is written under DIR's .git) that borrows DIR's objects
    read-only through GIT_ALTERNATE_OBJECT_DIRECTORIES, so the commits made in it are
    written to it, never into DIR."""
    parent = Path(tempfile.mkdtemp(prefix="stackbuild-onto-"))
    try:
        run_git(parent, "init", "-q", "--template=", "-b", "stackbuild", f"--object-format={co.object_format}", "tree",
                error=SourceError)
        tree = parent / "tree"
        # DIR's line-ending settings shape its files
        for line in git_process(co.top, "config", "--get-regexp", r"^core\.(autocrlf|eol)$").stdout.splitlines():
            key, _, value = line.partition(" ")
            run_git(tree, "config", key, value, error=SourceError)
        env = {"GIT_ALTERNATE_OBJECT_DIRECTORIES": _alternate(co.objects)}
        run_git(tree, "read-tree", co.head, env=env, error=SourceError)
        yield SparseTree(tree, co.head, env)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def _run_series(ctx: _Ctx | None, entries: Sequence[tuple[PatchEntry, Callable[[], bytes] | None]], tree: SparseTree,
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
            r = _apply_backport(ctx, entry, tree.path, tree.commit)
        else:
            r = _apply_text_patch(ctx, entry, data(), tree.path, tree.fill, tree.commit)
        results.append(r)
        if not r.verdict.ok:
            failed = r
    return results, failed


def _finish(name: str, co: _Checkout, tree: SparseTree, results: list[PatchResult], failed: PatchResult | None,
            where: Callable[[str], str], branch: str | None) -> ApplyResult:
    target = co.top
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
    _deliver(co, tree, branch)
    return ApplyResult(name, target, True, True, f"{summary}; branch {branch} at {tree.tip[:12]}", tuple(results))


def _deliver(co: _Checkout, tree: SparseTree, branch: str) -> None:
    """The scratch commits, and then the branch, arrive in DIR, and only now: the new
    objects (those HEAD does not reach) as one pack that `unpack-objects` stores in
    DIR, then one `update-ref` that creates the branch only if it still does not exist
    (with --force: only if it is still where it was when the run began)."""
    if tree.tip == co.head:  # every patch was already applied: the branch is HEAD
        objects = None
    else:
        pack = git_bytes(tree.path, "pack-objects", "--revs", "--stdout", "-q", env=tree.env,
                         stdin=f"{tree.tip}\n^{co.head}\n".encode())
        if pack.returncode != 0:
            raise SourceError(f"git pack-objects failed: {pack.stderr.decode(errors='replace').strip()[-300:]}",
                              file=tree.path)
        objects = pack.stdout
    if objects is not None:
        u = git_bytes(co.top, "unpack-objects", "-q", stdin=objects)
        if u.returncode != 0:
            raise SourceError(f"git unpack-objects failed: {u.stderr.decode(errors='replace').strip()[-300:]}",
                              file=co.top)
    run_git(co.top, "update-ref", "-m", f"stackbuild: apply onto {branch}", f"refs/heads/{branch}", tree.tip,
            co.branch_tip or "", error=SourceError)


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
    branch = branch or f"stackbuild/{recipe.name}"
    co = _prepare(target, branch, force)
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
    with _scratch_checkout(co) as tree:
        results, failed = _run_series(ctx, entries, tree, say)
        return _finish(recipe.name, co, tree, results, failed, lambda n: entry_file(recipe, n), branch)


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
    branch = (branch or f"stackbuild/{patch.stem}") if commit else None
    co = _prepare(target, branch, force)
    entry = PatchEntry(patch.name, PatchKind.FILE, co.top.name, None, strip=strip, fuzz=fuzz, file=str(patch))
    with _scratch_checkout(co) as tree:
        results, failed = _run_series(None, [(entry, lambda: data)], tree, lambda _m: None)
        return _finish(patch.name, co, tree, results, failed, lambda _n: str(patch), branch)
