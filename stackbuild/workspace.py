"""`stackbuild apply`: materialise a recipe's sources as git repos, apply the series
with a verdict per patch, record a manifest.

The new workspace is built beside the old one and swapped in only when every patch
applied, so a failure (or Ctrl-C) leaves the previous workspace byte for byte as it
was. Re-running with unchanged inputs changes nothing and says so.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stackbuild import __version__
from stackbuild.cache import atomic_file, cache_dir, locked
from stackbuild.errors import PatchError, SourceError, StackbuildError
from stackbuild.manifest import Manifest, PatchRecord, SourceRecord, read_manifest
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
from stackbuild.sources.git import GitCheckout, export_tree, fetch_git, read_file_at

# sources.pypi (urllib, http) and sources.archive (tarfile) are imported where they are
# used: a re-apply with unchanged inputs needs neither, and it should take a blink.

Progress = Callable[[str], None]
BASE_TAG = "stackbuild/base"

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
}


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "source": self.source,
            "verdict": self.verdict.value, "detail": self.detail, "sha256": self.sha256,
            "files": list(self.files), "commit": self.commit,
        }


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
        return 0 if self.ok else 2

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


def default_workdir(recipe: Recipe) -> Path:
    return recipe.root / "work" / recipe.name


def git_process(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run git with stackbuild's fixed identity and dates (plus `env`); never raises."""
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV, **(env or {})},
                          capture_output=True, text=True, input=stdin)


def run_git(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, error: type[StackbuildError] = StackbuildError
) -> str:
    """`git_process`, raising `error` naming the command on failure; stdout stripped."""
    r = git_process(cwd, *args, env=env)
    if r.returncode != 0:
        raise error(f"git {' '.join(args[:3])} failed: {r.stderr.strip() or r.stdout.strip()}", file=cwd)
    return r.stdout.strip()


# ------------------------------------------------------------------ inputs (no side effects on the workspace)


def _source_identity(ctx: _Ctx, src: Source) -> dict[str, Any]:
    if src.kind is SourceKind.PYPI:
        return {"kind": "pypi", "ref": src.requirement, "sha256": src.sha256, "commit": None}
    if src.kind is SourceKind.GIT:
        co = ctx.checkouts.get(src.name) or fetch_git(src)
        ctx.checkouts[src.name] = co
        return {"kind": "git", "ref": f"{src.url}@{co.commit}", "sha256": src.sha256, "commit": co.commit}
    path = _local_path(ctx, src)
    return {"kind": "local", "ref": str(path), "sha256": _tree_digest(path), "commit": None}


def _local_path(ctx: _Ctx, src: Source) -> Path:
    p = local_source_dir(ctx.recipe, src)
    if not p.is_dir():
        raise SourceError(f"local source {src.name!r}: {p} is not a directory", file=ctx.recipe.path, key=f"sources.{src.name}.path")
    return p


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if ".git" in f.relative_to(path).parts or not f.is_file():
            continue
        h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


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
    from stackbuild.sources.archive import read_members

    return read_members(sdist, [path])[path]


def _sdist(ctx: _Ctx, src: Source) -> Path:
    if src.name not in ctx.sdists:
        assert src.requirement and src.sha256
        from stackbuild.sources.pypi import fetch_sdist

        ctx.sdists[src.name] = fetch_sdist(src.requirement, src.sha256, ctx.progress)
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


def _base_repo(ctx: _Ctx, src: Source) -> Path:
    """A bare repository in the cache holding the pristine release as one commit,
    keyed by the sdist's sha256: importing 4,000 files from a tarball is the slow part
    of a cold apply, and it only has to happen once per release."""
    assert src.sha256
    base = cache_dir() / "bases" / f"{src.sha256}.git"
    with locked(cache_dir() / "locks" / f"base-{src.sha256}.lock", f"cache entry for {src.requirement}", timeout=600):
        if (base / "refs" / "heads" / "stackbuild").exists():
            return base
        tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=base.parent if base.parent.exists() else _mkdir(base.parent)))
        try:
            from stackbuild.sources.archive import import_tarball_to_git

            run_git(tmp, "init", "-q", "--bare", "-b", "stackbuild")
            import_tarball_to_git(_sdist(ctx, src), tmp, "stackbuild", f"base: {src.describe()}",
                                  {**os.environ, **GIT_ENV}, checkout=False)
            shutil.rmtree(base, ignore_errors=True)
            os.replace(tmp, base)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return base


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _materialise(ctx: _Ctx, src: Source, dest: Path) -> None:
    if src.kind is SourceKind.PYPI:
        base = _base_repo(ctx, src)
        # a local clone hard-links the objects: the workspace shares nothing mutable with the cache
        run_git(dest.parent, "clone", "-q", "--local", "-b", "stackbuild", str(base), dest.name)
        run_git(dest, "remote", "remove", "origin")
        run_git(dest, "config", "core.autocrlf", "false")
        run_git(dest, "tag", BASE_TAG)
        return
    if src.kind is SourceKind.GIT:
        export_tree(ctx.checkouts[src.name], dest)
    else:
        shutil.copytree(_local_path(ctx, src), dest, ignore=shutil.ignore_patterns(".git"), symlinks=True)
    run_git(dest, "init", "-q", "-b", "stackbuild")
    run_git(dest, "config", "core.autocrlf", "false")
    run_git(dest, "add", "-A", "-f")
    run_git(dest, "commit", "-q", "--no-verify", "-m", f"base: {src.describe()}")
    run_git(dest, "tag", BASE_TAG)


def _tree_reader(tree: Path) -> Callable[[str], str | None]:
    root = tree.resolve()

    def read(rel: str) -> str | None:
        p = (tree / rel)
        try:
            rp = p.resolve()
        except OSError:
            return None
        if root not in rp.parents and rp != root:
            raise MalformedPatch(f"path {rel!r} resolves outside the tree (through a symlink)")
        if not p.is_file():
            return None
        data = p.read_bytes()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")

    return read


def _write_outcome(tree: Path, contents: dict[str, str | None], modes: dict[str, str]) -> None:
    root = tree.resolve()
    for rel, text in contents.items():
        p = tree / rel
        if root not in p.resolve().parents:
            raise MalformedPatch(f"path {rel!r} resolves outside the tree")
        if text is None:
            p.unlink(missing_ok=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode("utf-8"))
        if modes.get(rel, "").endswith("755"):
            p.chmod(0o755)


def _commit(tree: Path, files: Sequence[str], message: str) -> str:
    run_git(tree, "add", "-A", "-f", "--", *files)
    run_git(tree, "commit", "-q", "--no-verify", "--allow-empty", "-m", message)
    return run_git(tree, "rev-parse", "HEAD")


def _apply_text_patch(ctx: _Ctx, entry: PatchEntry, data: bytes, tree: Path) -> PatchResult:
    sha = hashlib.sha256(data).hexdigest()
    base = PatchResult(entry.name, entry.kind.value, entry.source, PatchVerdict.MALFORMED, "", sha)
    try:
        text, notes = decode_patch_bytes(data, entry.file or entry.path or "")
        parts = split_mbox(text)
    except MalformedPatch as e:
        return _replace(base, detail=str(e))
    read = _tree_reader(tree)
    verdicts: list[PatchVerdict] = []
    details: list[str] = []
    files: list[str] = []
    commit = None
    for n, part in enumerate(parts, 1):
        label = f"part {n}/{len(parts)}: " if len(parts) > 1 else ""
        try:
            parsed = parse_patch(part, entry.strip, notes if n == 1 else [])
            outcome = apply_parsed(parsed, read, entry.fuzz)
        except MalformedPatch as e:
            return _replace(base, verdict=PatchVerdict.MALFORMED, detail=f"{label}{e}", files=tuple(files))
        files.extend(f for f in outcome.files if f not in files)
        verdicts.append(outcome.verdict)
        if outcome.detail:
            details.append(label + outcome.detail)
        if not outcome.verdict.ok:
            return _replace(base, verdict=outcome.verdict, detail="; ".join(details), files=tuple(files))
        if outcome.verdict is PatchVerdict.ALREADY_APPLIED:
            continue
        try:
            _write_outcome(tree, outcome.new_contents, outcome.modes)
        except MalformedPatch as e:
            return _replace(base, verdict=PatchVerdict.MALFORMED, detail=f"{label}{e}", files=tuple(files))
        subject = parsed.description or entry.description or entry.name
        msg = f"{subject}\n\nstackbuild-patch: {entry.name}\nstackbuild-sha256: {sha}\n"
        commit = _commit(tree, list(outcome.new_contents), msg)
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


def _backport_files(ctx: _Ctx, entry: PatchEntry) -> dict[str, bytes]:
    """The backported files, read once from the verified release and kept in the cache
    (keyed by the release's sha256), so later applies need not scan a 36 MB tarball."""
    assert entry.release and entry.sha256
    root = cache_dir() / "backports" / entry.sha256
    cached = {rel: root / rel for rel in entry.files}
    if all(p.is_file() for p in cached.values()):
        return {rel: p.read_bytes() for rel, p in cached.items()}
    from stackbuild.sources.archive import read_members
    from stackbuild.sources.pypi import fetch_sdist

    members = read_members(fetch_sdist(entry.release, entry.sha256, ctx.progress), list(entry.files))
    for rel, data in members.items():
        with atomic_file(root / rel) as f:
            f.write(data)
    return members


def _apply_backport(ctx: _Ctx, entry: PatchEntry, tree: Path) -> PatchResult:
    assert entry.release and entry.sha256
    members = _backport_files(ctx, entry)
    digest = hashlib.sha256()
    replaced = []
    same = 0
    for rel in entry.files:
        data = members[rel]
        digest.update(rel.encode() + b"\0" + data)
        dest = tree / rel
        if dest.exists():
            if dest.read_bytes() == data:
                same += 1
                continue
            replaced.append(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    sha = digest.hexdigest()
    if same == len(entry.files):
        return PatchResult(entry.name, entry.kind.value, entry.source, PatchVerdict.ALREADY_APPLIED,
                           f"files from {entry.release} already identical in the tree", sha, entry.files)
    msg = (f"{entry.description or 'backport'}\n\nBackport of {', '.join(entry.files)} from {entry.release}\n"
           f"stackbuild-patch: {entry.name}\n")
    commit = _commit(tree, entry.files, msg)
    detail = f"{len(entry.files)} file(s) from {entry.release}"
    if replaced:
        detail += f"; replaced existing {', '.join(replaced)}"
    return PatchResult(entry.name, entry.kind.value, entry.source, PatchVerdict.APPLIED, detail, sha, entry.files, commit)


def _replace(r: PatchResult, **kw: Any) -> PatchResult:
    d = {**r.__dict__, **kw}
    return PatchResult(**d)


# ------------------------------------------------------------------ the command


def plan_apply(recipe: Recipe) -> tuple[str, ...]:
    steps = []
    for src in recipe.sources:
        role = "patched" if src.name in recipe.patched_sources else "patch holder"
        steps.append(f"fetch {src.name}: {src.describe()} ({role})")
    for p in recipe.patches:
        what = p.file or (f"{p.from_source}:{p.path}" if p.from_source else f"{', '.join(p.files)} from {p.release}")
        steps.append(f"apply {p.name} to {p.source}: {what}")
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
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with locked(workdir.parent / f".{workdir.name}.lock", f"workspace {workdir}"):
        digest, idents, patch_shas = _inputs_digest(ctx)
        old = read_manifest(workdir) if workdir.is_dir() else None
        if old and not force and old.inputs_sha256 == digest and _intact(workdir, old):
            results = tuple(
                PatchResult(p.name, p.kind, p.source, PatchVerdict(p.verdict), p.detail, p.sha256, p.files, p.commit)
                for p in old.patches
            )
            return ApplyResult(recipe.name, workdir, False, True, "unchanged: inputs match the manifest; nothing to do", results, manifest=old)
        return _build(ctx, workdir, digest, idents, patch_shas)


def _intact(workdir: Path, manifest: Manifest) -> bool:
    """The workspace still is what the manifest says (HEAD and a clean tree)."""
    for s in manifest.sources:
        if not s.tree:
            continue
        tree = workdir / s.tree
        if not (tree / ".git").exists():
            return False
        head = run_git(tree, "rev-parse", "HEAD")
        if head != s.head_commit:
            return False
        if run_git(tree, "status", "--porcelain", "--untracked-files=no"):
            return False
    return True


def _build(ctx: _Ctx, workdir: Path, digest: str, idents: dict[str, dict[str, Any]], patch_shas: list[str]) -> ApplyResult:
    recipe = ctx.recipe
    staging = Path(tempfile.mkdtemp(prefix=f".{workdir.name}.new-", dir=workdir.parent))
    try:
        trees: dict[str, Path] = {}
        base_commits: dict[str, str] = {}
        for name in recipe.patched_sources:
            src = recipe.source(name)
            ctx.progress(f"materialising {name} ({src.describe()})")
            tree = staging / name
            _materialise(ctx, src, tree)
            trees[name] = tree
            base_commits[name] = run_git(tree, "rev-parse", "HEAD")
        results: list[PatchResult] = []
        failed: PatchResult | None = None
        for i, entry in enumerate(recipe.patches):
            if failed is not None:
                results.append(PatchResult(entry.name, entry.kind.value, entry.source, PatchVerdict.NOT_ATTEMPTED,
                                           f"the series stopped at {failed.name}"))
                continue
            ctx.progress(f"[{i + 1}/{len(recipe.patches)}] {entry.name}")
            tree = trees[entry.source]
            if entry.kind is PatchKind.BACKPORT:
                r = _apply_backport(ctx, entry, tree)
            else:
                r = _apply_text_patch(ctx, entry, _patch_bytes(ctx, entry, i), tree)
            results.append(r)
            if not r.verdict.ok:
                failed = r
        if failed is not None:
            where = entry_file(recipe, failed.name)
            msg = f"{failed.name} ({where}): {failed.verdict.value}; the workspace was left as it was"
            return ApplyResult(recipe.name, workdir, False, False, msg, tuple(results), failed)
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
                    head_commit=run_git(trees[s.name], "rev-parse", "HEAD") if s.name in trees else None,
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
        manifest.write(staging)
        _swap(staging, workdir)
        staging = None  # type: ignore[assignment]
        n = len(results)
        counts: dict[str, int] = {}
        for r in results:
            counts[r.verdict.value] = counts.get(r.verdict.value, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in counts.items())
        return ApplyResult(recipe.name, workdir, True, True, f"{n} patch(es): {summary}", tuple(results), manifest=manifest)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def entry_file(recipe: Recipe, name: str) -> str:
    for p in recipe.patches:
        if p.name == name:
            return p.file or (f"{p.from_source}:{p.path}" if p.from_source else f"backport {p.release}")
    return name


def _swap(staging: Path, workdir: Path) -> None:
    """Put `staging` in place of `workdir`. Two renames; the old tree is removed only
    once the new one is in place."""
    if workdir.exists():
        old = workdir.parent / f".{workdir.name}.old-{os.getpid()}"
        os.replace(workdir, old)
        try:
            os.replace(staging, workdir)
        except BaseException:
            os.replace(old, workdir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, workdir)
