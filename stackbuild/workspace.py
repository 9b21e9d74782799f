"""`stackbuild apply`: materialise a recipe's sources as git repos, apply the series
with a verdict per patch, record a manifest.

The new workspace is built beside the old one and swapped in only when every patch
applied, so a failure (or Ctrl-C) leaves the previous workspace byte for byte as it
was. The swap is one atomic exchange (`_swap`): the workspace path holds a complete
workspace, old or new, at every instant, even under `kill -9`; what a killed run leaves
beside it is removed by the next (`remove_litter`, under the workspace lock). A
workspace with local edits, or a folder stackbuild did not make, is never replaced
silently. Re-running with unchanged inputs changes nothing and says so.
"""

from __future__ import annotations

import datetime as _dt
import errno
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackbuild import __version__
from stackbuild.cache import atomic_file, cache_dir, diagnose_write_failure, disk_guard, locked
from stackbuild.errors import PatchError, SourceError, StackbuildError, WorkspaceError
from stackbuild.gitrun import GIT_ENV as GIT_ENV  # re-exported: the one git runner lives in gitrun
from stackbuild.gitrun import git_env, run_git
from stackbuild.gitrun import git_process as git_process
from stackbuild.recipe import (
    PatchEntry,
    PatchKind,
    Recipe,
    Source,
    SourceKind,
    local_source_dir,
    patch_file_path,
)
from stackbuild.report import Table
from stackbuild.series import (
    MalformedPatch,
    PatchVerdict,
    apply_parsed,
    check_safe_path,
    decode_patch_bytes,
    parse_patch,
    split_mbox,
)
from stackbuild.sparsetree import SparseTree, commit_files
from stackbuild.treewrite import Tree, TreeWriteError, UnsafePath, mode_bits

if TYPE_CHECKING:
    from stackbuild.localbase import LocalIdentity
    from stackbuild.manifest import Manifest
    from stackbuild.sources.git import GitCheckout

# sources.pypi (urllib, http) and sources.archive (tarfile) are imported where they are
# used: a re-apply with unchanged inputs needs neither, and it should take a blink. The
# manifest, local and git source modules too: apply --onto (which shares this module's
# patch steps) needs none of them.

Progress = Callable[[str], None]
BASE_TAG = "stackbuild/base"

@dataclass(frozen=True)
class PatchResult:
    name: str
    kind: str
    source: str
    verdict: PatchVerdict
    detail: str
    sha256: str = ""
    files: tuple[str, ...] = ()
    commit: str | None = None
    failures: tuple[str, ...] = ()  # a conflict: every hunk (or file) that did not apply
    applied: tuple[str, ...] = ()  # a conflict: the files that did apply
    hints: tuple[str, ...] = ()  # a conflict: what would make it apply (fuzz, whitespace)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "name": self.name, "kind": self.kind, "source": self.source,
            "verdict": self.verdict.value, "detail": self.detail, "sha256": self.sha256,
            "files": list(self.files), "commit": self.commit,
        }
        if self.failures or self.applied or self.hints:
            d.update(failures=list(self.failures), applied=list(self.applied), hints=list(self.hints))
        return d


@dataclass(frozen=True)
class ApplyResult:
    recipe: str
    workdir: Path
    changed: bool
    ok: bool
    message: str
    patches: tuple[PatchResult, ...]
    failed: PatchResult | None = None
    manifest: Manifest | None = None
    plan: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        """0 applied; 2 bad input (a malformed or unsafe patch: the input is wrong, as
        with a broken recipe); 1 any other verdict that stopped the series (a conflict,
        a missing file: a verdict about the world, like a failed check)."""
        if self.ok:
            return 0
        if self.failed is not None and self.failed.verdict is not PatchVerdict.MALFORMED:
            return 1
        return 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "workdir": str(self.workdir),
            "ok": self.ok,
            "changed": self.changed,
            "message": self.message,
            "patches": [p.to_dict() for p in self.patches],
            "failed": self.failed.name if self.failed else None,
            "plan": list(self.plan),
        }

    def tables(self) -> list[Table]:
        rows = tuple((p.name, p.verdict.value, p.detail) for p in self.patches)
        return [Table(f"{self.recipe}: {self.workdir}", ("patch", "verdict", "detail"), rows, self.message)]


@dataclass
class _Ctx:
    recipe: Recipe
    root: Path  # the project root holding patches/
    progress: Progress
    checkouts: dict[str, GitCheckout] = field(default_factory=dict)
    sdists: dict[str, Path] = field(default_factory=dict)
    patch_data: dict[int, bytes] = field(default_factory=dict)  # series position -> checked bytes
    locals: dict[str, LocalIdentity] = field(default_factory=dict)  # local sources, as identified


def default_workdir(recipe: Recipe) -> Path:
    return recipe.root / "work" / recipe.name


# ------------------------------------------------------------------ inputs (no side effects on the workspace)


def _source_identity(ctx: _Ctx, src: Source) -> dict[str, Any]:
    from stackbuild import localbase
    from stackbuild.sources.git import fetch_git

    if src.kind is SourceKind.PYPI:
        return {"kind": "pypi", "ref": src.requirement, "sha256": src.sha256, "commit": None}
    if src.kind is SourceKind.GIT:
        co = ctx.checkouts.get(src.name) or fetch_git(src)
        ctx.checkouts[src.name] = co
        return {"kind": "git", "ref": f"{src.url}@{co.commit}", "sha256": src.sha256, "commit": co.commit}
    ident = ctx.locals[src.name] = localbase.identify(_local_path(ctx, src))
    return {"kind": "local", "ref": str(ident.path), "sha256": ident.key, "commit": None}


def _local_path(ctx: _Ctx, src: Source) -> Path:
    p = local_source_dir(ctx.recipe, src)
    if not p.is_dir():
        raise SourceError(f"local source {src.name!r}: {p} is not a directory", file=ctx.recipe.path, key=f"sources.{src.name}.path")
    return p


def _patch_bytes(ctx: _Ctx, entry: PatchEntry, index: int) -> bytes:
    """The patch's bytes, checked against the recipe's sha256 (read once per run: the
    inputs digest and the apply both need them)."""
    if index in ctx.patch_data:
        return ctx.patch_data[index]
    key = f"patches[{index}]"
    if entry.kind is PatchKind.FILE:
        path = patch_file_path(ctx.recipe, entry, key)
        if not path.is_file():
            raise PatchError(f"patch file {entry.file} does not exist", file=ctx.recipe.path, key=f"{key}.file")
        data = path.read_bytes()
        where = str(path)
    elif entry.kind is PatchKind.FROM_SOURCE:
        assert entry.from_source and entry.path
        src = ctx.recipe.source(entry.from_source)
        data = _read_from_source(ctx, src, entry.path, key)
        where = f"{entry.from_source}:{entry.path}"
    else:
        raise AssertionError(entry.kind)
    got = hashlib.sha256(data).hexdigest()
    if entry.sha256 and got != entry.sha256:
        raise PatchError(
            f"sha256 mismatch for {where}: recipe pins {entry.sha256}, the file has {got}",
            file=ctx.recipe.path, key=f"{key}.sha256",
        )
    ctx.patch_data[index] = data
    return data


def _read_from_source(ctx: _Ctx, src: Source, path: str, key: str) -> bytes:
    from stackbuild.sources.git import fetch_git, read_file_at

    try:
        check_safe_path(path)
    except MalformedPatch as e:
        raise PatchError(str(e), file=ctx.recipe.path, key=f"{key}.path") from None
    if src.kind is SourceKind.GIT:
        co = ctx.checkouts.get(src.name) or fetch_git(src)
        ctx.checkouts[src.name] = co
        return read_file_at(co, path)
    if src.kind is SourceKind.LOCAL:
        p = _local_path(ctx, src) / path
        if not p.is_file():
            raise PatchError(f"{path} not found in local source {src.name!r}", file=ctx.recipe.path, key=f"{key}.path")
        return p.read_bytes()
    sdist = _sdist(ctx, src)
    from stackbuild.sources.archive import DEFAULT_LIMITS, read_members

    return read_members(sdist, [path], limits=src.limits or DEFAULT_LIMITS)[path]


def _sdist(ctx: _Ctx, src: Source) -> Path:
    if src.name not in ctx.sdists:
        assert src.requirement and src.sha256
        from stackbuild.sources.pypi import fetch_sdist

        ctx.sdists[src.name] = fetch_sdist(src.requirement, src.sha256, ctx.progress, limits=src.limits)
    return ctx.sdists[src.name]


def _inputs_digest(ctx: _Ctx) -> tuple[str, dict[str, dict[str, Any]], list[str]]:
    recipe = ctx.recipe
    h = hashlib.sha256(recipe.sha256.encode())
    idents: dict[str, dict[str, Any]] = {}
    for src in recipe.sources:
        ident = _source_identity(ctx, src)
        idents[src.name] = ident
        h.update(repr(sorted(ident.items())).encode())
    patch_shas: list[str] = []
    for i, entry in enumerate(recipe.patches):
        if entry.kind is PatchKind.BACKPORT:
            sha = hashlib.sha256(f"{entry.release}:{entry.sha256}:{','.join(entry.files)}".encode()).hexdigest()
        else:
            sha = hashlib.sha256(_patch_bytes(ctx, entry, i)).hexdigest()
        patch_shas.append(sha)
        h.update(sha.encode())
    h.update(__version__.encode())
    return h.hexdigest(), idents, patch_shas


# ------------------------------------------------------------------ materialising


def _base_repo(ctx: _Ctx, src: Source, rebuild: bool = False) -> Path:
    """A bare repository in the cache holding the pristine release as one commit,
    keyed by the sdist's sha256: importing 4,000 files from a tarball is the slow part
    of a cold apply, and it only has to happen once per release. `rebuild` discards a
    damaged one and imports the verified sdist again."""
    assert src.sha256
    base = cache_dir() / "bases" / f"{src.sha256}.git"
    if not rebuild and (base / "refs" / "heads" / "stackbuild").exists() and not os.access(base.parent, os.W_OK):
        return base  # a read-only cache: nobody can be changing it, so no lock is needed to read it
    with locked(cache_dir() / "locks" / f"base-{src.sha256}.lock", f"cache entry for {src.requirement}", timeout=600):
        for stale in base.parent.glob(f".import-{src.sha256}-*"):  # from a run killed while importing
            shutil.rmtree(stale, ignore_errors=True)
        if not rebuild and (base / "refs" / "heads" / "stackbuild").exists():
            return base
        tmp = Path(tempfile.mkdtemp(prefix=f".import-{src.sha256}-", dir=_mkdir(base.parent)))
        try:
            from stackbuild.sources.archive import DEFAULT_LIMITS, import_tarball_to_git

            with disk_guard(tmp):  # diagnosed before the finally frees the space
                run_git(tmp, "init", "-q", "--bare", "-b", "stackbuild")
                # the ref appears only after the whole archive was read and checked (CRC included)
                import_tarball_to_git(_sdist(ctx, src), tmp, "stackbuild", f"base: {src.describe()}",
                                      git_env(), checkout=False, limits=src.limits or DEFAULT_LIMITS)
            shutil.rmtree(base, ignore_errors=True)
            os.replace(tmp, base)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return base


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _clone_base(base: Path, dest: Path) -> subprocess.CompletedProcess[str]:
    # --no-local: objects travel through git's pack protocol, so every object is read
    # and hashed (a damaged cache fails here, not later), nothing is hard-linked to the
    # cache (damage to it cannot reach the workspace), and it works across filesystems.
    # --no-checkout: the files are written out once, after the series (SparseTree).
    return git_process(dest.parent, "clone", "-q", "--no-local", "--no-tags", "--no-checkout", "-c",
                       "core.autocrlf=false", "-b", "stackbuild", str(base), dest.name)


def _source_base(ctx: _Ctx, src: Source, rebuild: bool = False) -> Path:
    """The cache's bare base repository of a release or of a local tree."""
    from stackbuild import localbase

    if src.kind is SourceKind.PYPI:
        return _base_repo(ctx, src, rebuild=rebuild)
    return localbase.base_repo(ctx.locals[src.name], rebuild=rebuild)


def _materialise(ctx: _Ctx, src: Source, dest: Path) -> SparseTree | None:
    """The source's pristine tree as a git repository at `dest`, its base commit tagged.
    A release or a local source comes from the cache as a sparse checkout (files
    written out as the series reads them; `write_out_rest` writes the others once the
    series is done); a git source is written out whole (None)."""
    if src.kind in (SourceKind.PYPI, SourceKind.LOCAL):
        base = _source_base(ctx, src)
        r = _clone_base(base, dest)
        if r.returncode != 0:
            full = diagnose_write_failure(StackbuildError(f"git clone failed: {r.stderr}"), dest)
            if full is not None:  # the workspace's disk, not the cache, is the problem
                raise full
            ctx.progress(f"the cached base of {src.describe()} is damaged ({_tail(r.stderr)}); "
                         "importing the verified source again")
            shutil.rmtree(dest, ignore_errors=True)
            base = _source_base(ctx, src, rebuild=True)
            r = _clone_base(base, dest)
            if r.returncode != 0:
                raise SourceError(f"git clone of the freshly imported base failed: {_tail(r.stderr)}", file=base)
        run_git(dest, "remote", "remove", "origin")
        run_git(dest, "tag", BASE_TAG)
        run_git(dest, "read-tree", BASE_TAG)
        _exclude_bytecode(dest)
        return SparseTree(dest, run_git(dest, "rev-parse", BASE_TAG + "^{commit}"))
    from stackbuild.sources.git import export_tree

    export_tree(ctx.checkouts[src.name], dest)  # a git source
    run_git(dest, "init", "-q", "-b", "stackbuild")
    run_git(dest, "config", "core.autocrlf", "false")
    run_git(dest, "add", "-A", "-f")
    run_git(dest, "commit", "-q", "--no-verify", "-m", f"base: {src.describe()}")
    run_git(dest, "tag", BASE_TAG)
    _exclude_bytecode(dest)
    return None


def _exclude_bytecode(tree: Path) -> None:
    """Importing the tree (verify) writes bytecode into it; that is not a local edit."""
    exclude = tree / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with open(exclude, "a", encoding="utf-8") as f:
        f.write("__pycache__/\n*.py[co]\n")


class _TreeText:
    """A tree's files as text, read and written only through the tree door (links
    followed only inside the tree; a path into git metadata or outside is refused with
    UnsafePath). A file that is not UTF-8 is read as latin-1, like patch text, and
    written back the same way, so its other bytes survive."""

    def __init__(self, tree: Path, fill: Callable[[str], None] | None = None):
        self.door = Tree(tree)
        self.latin1: set[str] = set()
        self.fill = fill  # a sparse tree (apply --onto) brings a file in before it is read

    def read(self, rel: str) -> str | None:
        if self.fill is not None:
            self.fill(rel)
        data = self.door.read(rel)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.latin1.add(rel)
            return data.decode("latin-1")

    def encode(self, rel: str, text: str) -> bytes:
        if rel in self.latin1:
            try:
                return text.encode("latin-1")
            except UnicodeEncodeError:
                pass
        return text.encode("utf-8")

    def write_outcome(self, contents: Mapping[str, str | None], modes: Mapping[str, str]) -> list[str]:
        """Every file a patch changes goes through the door: the final paths, after
        strip, quoting and path repair. Returns the real paths changed (for git)."""
        changed = []
        for rel, text in contents.items():
            if text is None:
                changed.append(self.door.delete(rel))
            else:
                changed.append(self.door.write(rel, self.encode(rel, text), mode_bits(modes.get(rel))))
        for rel, mode in modes.items():
            bits = mode_bits(mode)
            if rel not in contents and bits is not None:
                self.door.chmod(rel, bits)
                changed.append(self.door.real_path(rel))
        return changed


Committer = Callable[[Sequence[str], str], str]  # (changed paths, message) -> the new commit


def _moving_head(sp: SparseTree) -> Committer:
    """A sparse workspace tree's commits, each also moving HEAD (a workspace is the
    user's repository: its HEAD is the last patch)."""
    def commit(files: Sequence[str], message: str) -> str:
        c = sp.commit(files, message)
        run_git(sp.path, "update-ref", "-m", "commit: stackbuild", "HEAD", c)
        return c
    return commit


def _commit(tree: Path, files: Sequence[str], message: str) -> str:
    commit = commit_files(tree, files, message, "HEAD")
    run_git(tree, "update-ref", "-m", "commit: stackbuild", "HEAD", commit)
    return commit


def _apply_text_patch(ctx: _Ctx | None, entry: PatchEntry, data: bytes, tree: Path,
                      fill: Callable[[str], None] | None = None, commit_with: Committer | None = None) -> PatchResult:
    """One patch (of one or more parts, one commit each) onto `tree`; `fill` brings a
    file in before it is read and `commit_with` makes the commits (apply --onto's
    scratch checkout has no files until read and moves no ref)."""
    commit_with = commit_with or functools.partial(_commit, tree)
    sha = hashlib.sha256(data).hexdigest()
    base = PatchResult(entry.name, entry.kind.value, entry.source, PatchVerdict.MALFORMED, "", sha)
    try:
        text, notes = decode_patch_bytes(data, entry.file or entry.path or "")
        parts = split_mbox(text)
    except MalformedPatch as e:
        return _replace(base, detail=str(e))
    text_tree = _TreeText(tree, fill)
    verdicts: list[PatchVerdict] = []
    details: list[str] = []
    files: list[str] = []
    commit = None
    for n, part in enumerate(parts, 1):
        label = f"part {n}/{len(parts)}: " if len(parts) > 1 else ""
        try:
            parsed = parse_patch(part, entry.strip, notes if n == 1 else [])
            outcome = apply_parsed(parsed, text_tree.read, entry.fuzz)
        except (MalformedPatch, UnsafePath) as e:
            return _replace(base, verdict=PatchVerdict.MALFORMED, detail=f"{label}{e}", files=tuple(files))
        except TreeWriteError as e:  # a file the patch reads cannot be read
            return _replace(base, verdict=PatchVerdict.CONFLICT, detail=f"{label}{e}", files=tuple(files))
        files.extend(f for f in outcome.files if f not in files)
        verdicts.append(outcome.verdict)
        if outcome.detail:
            details.append(label + outcome.detail)
        if not outcome.verdict.ok:
            return _replace(base, verdict=outcome.verdict, detail="; ".join(details), files=tuple(files),
                            failures=tuple(label + f for f in outcome.failures), applied=outcome.applied,
                            hints=outcome.hints)
        if outcome.verdict is PatchVerdict.ALREADY_APPLIED:
            continue
        try:
            changed = text_tree.write_outcome(outcome.new_contents, outcome.modes)
        except UnsafePath as e:
            return _replace(base, verdict=PatchVerdict.MALFORMED, detail=f"{label}{e}", files=tuple(files))
        except TreeWriteError as e:
            return _replace(base, verdict=PatchVerdict.CONFLICT, detail=f"{label}{e}", files=tuple(files))
        subject = parsed.description or entry.description or entry.name
        msg = f"{subject}\n\nstackbuild-patch: {entry.name}\nstackbuild-sha256: {sha}\n"
        commit = commit_with(changed, msg)
    if all(v is PatchVerdict.ALREADY_APPLIED for v in verdicts):
        verdict = PatchVerdict.ALREADY_APPLIED
    elif PatchVerdict.APPLIED_FUZZ in verdicts:
        verdict = PatchVerdict.APPLIED_FUZZ
    elif PatchVerdict.APPLIED_OFFSET in verdicts:
        verdict = PatchVerdict.APPLIED_OFFSET
    else:
        verdict = PatchVerdict.APPLIED
    if len(parts) > 1:
        details.insert(0, f"{len(parts)} commits")
    return PatchResult(entry.name, entry.kind.value, entry.source, verdict, "; ".join(details), sha, tuple(files), commit)


BACKPORT_INDEX = ".stackbuild-sha256.json"


def _backport_files(ctx: _Ctx, entry: PatchEntry) -> dict[str, bytes]:
    """The backported files, read once from the verified release and kept in the cache
    (keyed by the release's sha256), so later applies need not scan a 36 MB tarball.
    The cache is not trusted: each use re-hashes every file against the digests taken
    when it was read from the verified sdist, and anything missing, edited or truncated
    is read from the sdist again."""
    assert entry.release and entry.sha256
    root = cache_dir() / "backports" / entry.sha256
    index = root / BACKPORT_INDEX
    try:
        digests = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(digests, dict):
            digests = {}
    except (OSError, ValueError):
        digests = {}
    out: dict[str, bytes] = {}
    for rel in entry.files:
        want = digests.get(rel)
        try:
            data = (root / rel).read_bytes()
        except OSError:
            break
        if not isinstance(want, str) or hashlib.sha256(data).hexdigest() != want:
            if want is not None:
                ctx.progress(f"cached backport file {rel} of {entry.release} does not match its digest; reading the sdist again")
            break
        out[rel] = data
    else:
        return out
    from stackbuild.sources.archive import read_members
    from stackbuild.sources.pypi import fetch_sdist

    members = read_members(fetch_sdist(entry.release, entry.sha256, ctx.progress), list(entry.files))
    for rel, data in members.items():
        with atomic_file(root / rel) as f:
            f.write(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    with atomic_file(index) as f:
        f.write(json.dumps(digests, indent=1, sort_keys=True).encode())
    return members


def _apply_backport(ctx: _Ctx, entry: PatchEntry, tree: Path, commit_with: Committer | None = None) -> PatchResult:
    assert entry.release and entry.sha256
    members = _backport_files(ctx, entry)
    door = Tree(tree)
    digest = hashlib.sha256()
    replaced = []
    same = 0
    base = PatchResult(entry.name, entry.kind.value, entry.source, PatchVerdict.MALFORMED, "", "", entry.files)
    written: list[str] = []
    for rel in entry.files:
        data = members[rel]
        digest.update(rel.encode() + b"\0" + data)
        try:
            have = door.read(rel)
            if have is not None:
                if have == data:
                    same += 1
                    continue
                replaced.append(rel)
            written.append(door.write(rel, data))
        except UnsafePath as e:
            return _replace(base, detail=f"{rel} from {entry.release}: {e}")
        except TreeWriteError as e:
            return _replace(base, verdict=PatchVerdict.CONFLICT, detail=f"{rel} from {entry.release}: {e}")
    sha = digest.hexdigest()
    if same == len(entry.files):
        return PatchResult(entry.name, entry.kind.value, entry.source, PatchVerdict.ALREADY_APPLIED,
                           f"files from {entry.release} already identical in the tree", sha, entry.files)
    msg = (f"{entry.description or 'backport'}\n\nBackport of {', '.join(entry.files)} from {entry.release}\n"
           f"stackbuild-patch: {entry.name}\n")
    commit = (commit_with or functools.partial(_commit, tree))(written, msg)
    detail = f"{len(entry.files)} file(s) from {entry.release}"
    if replaced:
        detail += f"; replaced existing {', '.join(replaced)}"
    return PatchResult(entry.name, entry.kind.value, entry.source, PatchVerdict.APPLIED, detail, sha, entry.files, commit)


def _replace(r: PatchResult, **kw: Any) -> PatchResult:
    d = {**r.__dict__, **kw}
    return PatchResult(**d)


# ------------------------------------------------------------------ the command


def refused_for_refresh_marks(recipe: Recipe, workdir: Path, source: str | None = None) -> ApplyResult | None:
    """The verdict on a series holding an entry `stackbuild refresh` marked for a person
    to decide (`refresh_verdict`): nothing is applied (exit 1, a verdict about the
    world), even where the entry's old patch file would apply. None when no entry of
    `source` (default: every source) is marked."""
    marked = [p for p in recipe.patches if p.refresh_verdict and source in (None, p.source)]
    if not marked:
        return None
    names = {p.name for p in marked}
    first = marked[0]
    results = tuple(
        PatchResult(p.name, p.kind.value, p.source, PatchVerdict.NOT_ATTEMPTED,
                    f"marked by refresh: {p.refresh_verdict}" if p.name in names else f"the series is refused: {first.name} is marked")
        for p in recipe.patches if source in (None, p.source))
    shown = "; ".join(f"{p.name} ({entry_file(recipe, p.name)}): {p.refresh_verdict}" for p in marked)
    msg = (f"{recipe.path}: refresh marked {len(marked)} patch(es) for a person to decide, so nothing was applied: "
           f"{shown}. Port each to the new release (point its `file` at the ported patch, run `stackbuild rehash "
           f"{recipe.path.stem}`) and delete its `refresh_verdict` line, or delete the entry")
    return ApplyResult(recipe.name, workdir, False, False, msg,
                       results, next(r for r in results if r.name == first.name))


def plan_apply(recipe: Recipe) -> tuple[str, ...]:
    steps = []
    for src in recipe.sources:
        role = "patched" if src.name in recipe.patched_sources else "patch holder"
        steps.append(f"fetch {src.name}: {src.describe()} ({role})")
    for p in recipe.patches:
        what = p.file or (f"{p.from_source}:{p.path}" if p.from_source else f"{', '.join(p.files)} from {p.release}")
        steps.append(f"apply {p.name} to {p.source}: {what}" + (
            f" (refused: marked by refresh: {p.refresh_verdict})" if p.refresh_verdict else ""))
    return tuple(steps)


def apply_recipe(
    recipe: Recipe,
    workdir: Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> ApplyResult:
    workdir = (workdir or default_workdir(recipe)).resolve()
    ctx = _Ctx(recipe, recipe.root, progress or (lambda _m: None))
    if dry_run:
        return ApplyResult(recipe.name, workdir, False, True, "dry run: nothing fetched or applied", (), plan=plan_apply(recipe))
    refused = refused_for_refresh_marks(recipe, workdir)
    if refused is not None:
        return refused
    with disk_guard(workdir.parent):
        workdir.parent.mkdir(parents=True, exist_ok=True)
        with locked(workdir.parent / f".{workdir.name}.lock", f"workspace {workdir}"):
            remove_litter(workdir, ctx.progress)
            _refuse_foreign(workdir)
            digest, idents, patch_shas = _inputs_digest(ctx)
            if force or not os.path.lexists(workdir):
                return _build(ctx, workdir, digest, idents, patch_shas)
            old, damage = _inspect(workdir)
            if old is not None and not damage and old.inputs_sha256 == digest:
                results = tuple(
                    PatchResult(p.name, p.kind, p.source, PatchVerdict(p.verdict), p.detail, p.sha256, p.files, p.commit)
                    for p in old.patches
                )
                return ApplyResult(recipe.name, workdir, False, True, "unchanged: inputs match the manifest; nothing to do", results, manifest=old)
            _refuse_local_edits(recipe, workdir, old)
            if damage:
                ctx.progress(f"the workspace is damaged ({damage}); rebuilding it")
            return _build(ctx, workdir, digest, idents, patch_shas)


def _refuse_foreign(workdir: Path) -> None:
    """Never replace what stackbuild did not make (a `--workdir` pointing at a user's
    folder or file), not even with --force: only an empty folder, or one holding a
    manifest or source trees (damaged or not), is a workspace to rebuild."""
    if not os.path.lexists(workdir):
        return
    if workdir.is_dir() and not workdir.is_symlink():
        children = list(workdir.iterdir())
        if not children or (workdir / "manifest.json").exists() or any((c / ".git").exists() for c in children):
            return
    raise WorkspaceError("exists and is not a stackbuild workspace (no manifest.json, no source trees); "
                         "refusing to replace it: give another --workdir, or move it away", file=workdir)


def _inspect(workdir: Path) -> tuple[Manifest | None, str]:
    """The workspace's manifest, and what is wrong with it ("" when it still is what the
    manifest says: each tree's HEAD and a clean tree). Damage is reported, never raised:
    a damaged workspace is rebuilt, not a reason to stop."""
    from stackbuild.manifest import read_manifest

    if not workdir.is_dir():
        return None, f"{workdir} is not a directory"
    try:
        manifest = read_manifest(workdir)
    except StackbuildError as e:
        return None, f"unreadable manifest: {e.message}"
    if manifest is None:
        return None, "no manifest.json"
    for s in manifest.sources:
        if not s.tree:
            continue
        tree = workdir / s.tree
        if not (tree / ".git").exists():
            return manifest, f"{s.tree} is not a git repository"
        head = git_process(tree, "rev-parse", "--verify", "-q", "HEAD")
        if head.returncode != 0:
            return manifest, f"{s.tree}: git cannot read HEAD ({_tail(head.stderr)})"
        if head.stdout.strip() != s.head_commit:
            return manifest, f"{s.tree} has moved from the applied commit"
        st = git_process(tree, "status", "--porcelain", "--untracked-files=all")
        if st.returncode != 0:
            return manifest, f"{s.tree}: git status fails ({_tail(st.stderr)})"
        if st.stdout.strip():
            return manifest, f"{s.tree} has local changes"
    return manifest, ""


def _tail(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


def _trees_of(workdir: Path, manifest: Manifest | None) -> list[str]:
    if manifest is not None:
        return [s.tree for s in manifest.sources if s.tree]
    try:
        return sorted(p.name for p in workdir.iterdir() if (p / ".git").exists())
    except OSError:
        return []


def local_changes(workdir: Path, manifest: Manifest | None) -> dict[str, list[str]]:
    """Per tree, the files a user changed or added since the last commit (`git status`),
    or a one-item list saying git cannot tell (a damaged repository)."""
    out: dict[str, list[str]] = {}
    for name in _trees_of(workdir, manifest):
        tree = workdir / name
        if not (tree / ".git").exists():
            continue
        st = git_process(tree, "status", "--porcelain", "-z", "--untracked-files=all")
        if st.returncode != 0:
            out[name] = [f"(git cannot read this repository: {_tail(st.stderr)})"]
            continue
        files: list[str] = []
        entries = iter(st.stdout.split("\0"))
        for e in entries:
            if len(e) > 3:
                files.append(e[3:])
                if e[0] in "RC":
                    next(entries, None)  # a rename's old path follows it
        rec = manifest.source(name) if manifest is not None else None
        if rec is not None and rec.head_commit:
            ahead = git_process(tree, "rev-list", "--count", f"{rec.head_commit}..HEAD")
            if ahead.returncode == 0 and ahead.stdout.strip() not in ("", "0"):
                files.append(f"{ahead.stdout.strip()} commit(s) made since apply (save them with "
                             f"`git -C {tree} format-patch {rec.head_commit[:12]}..HEAD` and `stackbuild import`)")
        if files:
            out[name] = files
    return out


def _refuse_local_edits(recipe: Recipe, workdir: Path, manifest: Manifest | None) -> None:
    """A rebuild replaces the workspace: never silently drop what a user changed there."""
    changed = local_changes(workdir, manifest)
    if not changed:
        return
    parts = []
    for name, files in changed.items():
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        parts.append(f"{name}: {shown}")
    first = next(iter(changed))
    raise WorkspaceError(
        f"has local edits that a rebuild would discard ({'; '.join(parts)}); keep them as a patch with "
        f"`stackbuild snapshot {workdir / first} --into {recipe.name}` and then `stackbuild apply --force "
        f"{recipe.name}`, or discard them with `stackbuild apply --force {recipe.name}`", file=workdir)


def _build(ctx: _Ctx, workdir: Path, digest: str, idents: dict[str, dict[str, Any]], patch_shas: list[str]) -> ApplyResult:
    staging = Path(tempfile.mkdtemp(prefix=f".{workdir.name}.new-", dir=workdir.parent))
    fault_point("staging-created")
    try:
        with disk_guard(staging):  # diagnosed before the finally frees the space
            return _build_in(ctx, staging, workdir, digest, idents, patch_shas)
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _build_in(ctx: _Ctx, staging: Path, workdir: Path, digest: str, idents: dict[str, dict[str, Any]],
              patch_shas: list[str]) -> ApplyResult:
    recipe = ctx.recipe
    trees: dict[str, Path] = {}
    sparse: dict[str, SparseTree] = {}
    base_commits: dict[str, str] = {}
    for name in recipe.patched_sources:
        src = recipe.source(name)
        ctx.progress(f"materialising {name} ({src.describe()})")
        tree = staging / name
        sp = _materialise(ctx, src, tree)
        if sp is not None:
            sparse[name] = sp
        trees[name] = tree
        base_commits[name] = sp.tip if sp is not None else run_git(tree, "rev-parse", "HEAD")
        fault_point("materialised")
    results: list[PatchResult] = []
    failed: PatchResult | None = None
    for i, entry in enumerate(recipe.patches):
        if failed is not None:
            results.append(PatchResult(entry.name, entry.kind.value, entry.source, PatchVerdict.NOT_ATTEMPTED,
                                       f"the series stopped at {failed.name}"))
            continue
        ctx.progress(f"[{i + 1}/{len(recipe.patches)}] {entry.name}")
        tree = trees[entry.source]
        sp = sparse.get(entry.source)
        fill, commit_with = (sp.fill, _moving_head(sp)) if sp is not None else (None, None)
        if entry.kind is PatchKind.BACKPORT:
            if sp is not None:
                for rel in entry.files:
                    sp.fill(rel)
            r = _apply_backport(ctx, entry, tree, commit_with)
        else:
            r = _apply_text_patch(ctx, entry, _patch_bytes(ctx, entry, i), tree, fill, commit_with)
        results.append(r)
        if not r.verdict.ok:
            failed = r
    if failed is not None:
        where = entry_file(recipe, failed.name)
        cause = failed.detail.split("; ")[0]
        cause = cause if len(cause) <= 300 else cause[:297] + "..."
        msg = (f"{failed.name} ({where}): {failed.verdict.value}" + (f": {cause}" if cause else "")
               + "; the workspace was left as it was")
        return ApplyResult(recipe.name, workdir, False, False, msg, tuple(results), failed)
    for sp in sparse.values():
        sp.write_out_rest()
    from stackbuild.manifest import Manifest, PatchRecord, SourceRecord

    manifest = Manifest(
        recipe=recipe.name,
        recipe_sha256=recipe.sha256,
        inputs_sha256=digest,
        platform=recipe.platform.name,
        sources=tuple(
            SourceRecord(
                name=s.name, kind=s.kind.value, ref=idents[s.name]["ref"], sha256=idents[s.name]["sha256"],
                commit=idents[s.name]["commit"], tree=s.name if s.name in trees else None,
                base_commit=base_commits.get(s.name),
                head_commit=(sparse[s.name].tip if s.name in sparse else run_git(trees[s.name], "rev-parse", "HEAD"))
                if s.name in trees else None,
            )
            for s in recipe.sources
        ),
        patches=tuple(
            PatchRecord(r.name, r.kind, r.source, r.sha256 or patch_shas[i], r.verdict.value, r.detail, r.files, r.commit)
            for i, r in enumerate(results)
        ),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        stackbuild_version=__version__,
    )
    fault_point("patched")
    manifest.write(staging)
    fault_point("manifest-written")
    _swap(staging, workdir)
    n = len(results)
    counts: dict[str, int] = {}
    for r in results:
        counts[r.verdict.value] = counts.get(r.verdict.value, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    return ApplyResult(recipe.name, workdir, True, True, f"{n} patch(es): {summary}", tuple(results), manifest=manifest)


def entry_file(recipe: Recipe, name: str) -> str:
    for p in recipe.patches:
        if p.name == name:
            return p.file or (f"{p.from_source}:{p.path}" if p.from_source else f"backport {p.release}")
    return name


# ------------------------------------------------------------------ the swap, and what interrupted runs leave


FAULT_ENV = "STACKBUILD_FAULT_POINT"
# Paths swapped in by this process: the Ctrl-C message says what happened (cli.main).
SWAPPED_IN: list[Path] = []


def fault_point(name: str) -> None:
    """A test hook: `STACKBUILD_FAULT_POINT=NAME` kills the process here as `kill -9`
    would (no cleanup, no finally), so the fault-injection tests can stop an apply
    between any two steps."""
    if os.environ.get(FAULT_ENV) == name:
        os._exit(137)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE). False where the
    C library or the filesystem does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _litter_re(workdir: Path) -> re.Pattern[str]:
    # mkdtemp's 8 random characters, or our 8 hex digits: never another workspace's
    # name (a workspace called "r.new-x" has staging ".r.new-x.new-abcd1234").
    return re.compile(rf"^\.{re.escape(workdir.name)}\.(new|old)-[a-z0-9_]{{8}}$")


def remove_litter(workdir: Path, progress: Progress | None = None) -> list[Path]:
    """Remove what interrupted runs left beside `workdir` (staging trees, old trees
    waiting for deletion). Call with the workspace lock held. If a run was killed
    between the two renames of the fallback swap, the workspace path is empty and the
    old tree is put back first."""
    pat = _litter_re(workdir)
    found = sorted(p for p in workdir.parent.iterdir() if pat.match(p.name))
    if not os.path.lexists(workdir):
        olds = [p for p in found if ".old-" in p.name and (p / "manifest.json").is_file()]
        if olds:
            os.replace(olds[-1], workdir)
            found.remove(olds[-1])
            if progress:
                progress(f"restored {workdir} from an interrupted swap")
    for p in found:
        if progress:
            progress(f"removing {p.name}, left by an interrupted run")
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def _swap(staging: Path, workdir: Path) -> None:
    """Put `staging` in place of `workdir` so that the path always holds a complete
    workspace, old or new: one renameat2(RENAME_EXCHANGE). Where that is missing, two
    renames, and a run killed between them is repaired by the next (remove_litter)."""
    with _ctrl_c_deferred():  # the rename and its record in SWAPPED_IN happen together
        if not os.path.lexists(workdir):
            os.replace(staging, workdir)
            SWAPPED_IN.append(workdir)
            return
        fault_point("swap-before")
        old = workdir.parent / f".{workdir.name}.old-{secrets.token_hex(4)}"
        if _exchange(staging, workdir):
            SWAPPED_IN.append(workdir)
            fault_point("swap-exchanged")
            os.replace(staging, old)  # the old tree, under the name litter removal knows
        else:
            os.replace(workdir, old)
            fault_point("swap-between-renames")
            try:
                os.replace(staging, workdir)
            except BaseException:
                os.replace(old, workdir)
                raise
            SWAPPED_IN.append(workdir)
    fault_point("swap-renamed-old")
    _discard(old)


@contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold SIGINT (it is delivered, as KeyboardInterrupt, on leaving) so that a Ctrl-C
    cannot land between a rename and the record that says it happened."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _discard(old: Path) -> None:
    if os.environ.get(FAULT_ENV) == "swap-removing-old":  # die half-way through the delete
        for child in sorted(old.iterdir())[:1]:
            shutil.rmtree(child, ignore_errors=True)
        os._exit(137)
    shutil.rmtree(old, ignore_errors=True)
