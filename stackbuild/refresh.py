"""`stackbuild refresh`: carry a recipe's patch series onto a new upstream release.

How: the series is first applied to its own (old) base by `stackbuild apply` (the
workspace; a no-op when it is up to date). Its repository is cloned into the refresh
worktree work/<recipe>.refresh/<source>, the new release is committed there as a new
root commit (tag `stackbuild/base`; the old base keeps `stackbuild/old-base`), and each
patch's commits are cherry-picked onto it: a three-way merge against the old base, so
context that moved or changed around a patch does not stop it.

A verdict per patch, decided in this order:
- obsolete: a file it changes is gone at the new base (a file of the same name
  elsewhere is named in the detail);
- already upstream, with the evidence: the same `git patch-id` as an upstream commit
  (git sources, whose history is known), the reverse applies, the three-way merge
  changes nothing, or the change's added lines are present in the new files (all of
  them, or all but one of at least four: upstream took it with a line changed);
- clean (applies at its stated lines; the patch file is carried byte for byte),
  offset (applies with hunks moved; regenerated), merged (only the three-way merge
  applies it; regenerated);
- conflict: the cherry-pick is left in progress with conflict markers in the refresh
  worktree; `refresh --continue` after editing, `refresh --abort` removes the worktree.
Backports: already upstream when the new base ships identical files, obsolete when it
ships its own different version, else carried.

Nothing outside the refresh worktree is written until the whole series is through. Then
refreshed patches go to patches/<source>/<new version>/ (DEP-3 header kept,
Last-Update bumped, diff regenerated against the new base) and a new recipe beside the
old one: recipes/<name>-<new version>.toml (the old version in the name is replaced
when it appears there), with the source's pin and sha256 and each patch's file and
sha256 updated, and patches found upstream or obsolete commented out with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from stackbuild.cache import atomic_write_text
from stackbuild.errors import PatchError, RecipeError, SourceError, StackbuildError
from stackbuild.inputs import read_user_text
from stackbuild.patchqueue import (
    bump_last_update,
    commit_diff,
    commit_trailers,
    find_block,
    git_out,
    join_patch,
    set_key,
    sha256_text,
    split_header,
    today,
)
from stackbuild.recipe import PatchEntry, PatchKind, Recipe, Source, SourceKind, load_recipe
from stackbuild.report import Table
from stackbuild.series import MalformedPatch, PatchVerdict, apply_parsed, parse_patch, split_mbox
from stackbuild.sources.archive import DEFAULT_LIMITS, extract_tarball, read_members
from stackbuild.sources.git import GitCheckout, export_tree, fetch_git
from stackbuild.sources.pypi import (
    configured_index,
    fetch_sdist,
    list_files,
    sdist_filename_candidates,
)
from stackbuild.treewrite import Tree, TreeWriteError
from stackbuild.workspace import BASE_TAG, apply_recipe, default_workdir, run_git

Progress = Callable[[str], None]
OLD_BASE_TAG = "stackbuild/old-base"
STATE_FILE = "refresh-state.json"
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


class RefreshVerdict(str, Enum):
    CLEAN = "clean"
    OFFSET = "offset"
    MERGED = "merged (3-way)"
    RESOLVED = "resolved by hand"
    ALREADY_UPSTREAM = "already upstream"
    OBSOLETE = "obsolete"
    CONFLICT = "conflict"
    NOT_ATTEMPTED = "not attempted"

    @property
    def kept(self) -> bool:
        return self in (RefreshVerdict.CLEAN, RefreshVerdict.OFFSET, RefreshVerdict.MERGED, RefreshVerdict.RESOLVED)


class Evidence(str, Enum):
    PATCH_ID = "same patch-id"
    REVERSE_APPLIES = "reverse applies"
    EMPTY_MERGE = "3-way merge changes nothing"
    LINES_PRESENT = "added lines present"
    IDENTICAL_FILES = "identical files"
    DIFFERENT_FILES = "new base ships its own version"
    AT_OLD_BASE = "already applied at the old base"
    FILE_GONE = "file gone upstream"


@dataclass(frozen=True)
class RefreshedPatch:
    name: str
    kind: str
    verdict: RefreshVerdict
    detail: str = ""
    evidence: Evidence | None = None
    old_sha256: str | None = None
    new_sha256: str | None = None
    file: str | None = None  # the refreshed patch file, relative to the project root
    commits: tuple[str, ...] = ()  # refreshed commits in the refresh worktree

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "verdict": self.verdict.value, "detail": self.detail,
            "evidence": self.evidence.value if self.evidence else None, "old_sha256": self.old_sha256,
            "new_sha256": self.new_sha256, "file": self.file, "commits": list(self.commits),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefreshedPatch:
        return cls(d["name"], d["kind"], RefreshVerdict(d["verdict"]), d["detail"],
                   Evidence(d["evidence"]) if d["evidence"] else None, d["old_sha256"], d["new_sha256"],
                   d["file"], tuple(d["commits"]))


@dataclass(frozen=True)
class RefreshResult:
    recipe: str
    source: str
    old: str  # "vllm==0.19.0"
    new: str  # "vllm==0.20.0"
    new_sha256: str | None
    worktree: Path
    state: str  # done | conflict | aborted | checked (matrix: nothing written)
    patches: tuple[RefreshedPatch, ...]
    new_recipe: Path | None = None
    written: tuple[str, ...] = ()
    message: str = ""

    @property
    def exit_code(self) -> int:
        return 1 if self.state == "conflict" else 0

    def verdict(self, name: str) -> RefreshedPatch:
        return next(p for p in self.patches if p.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "source": self.source, "old": self.old, "new": self.new,
            "new_sha256": self.new_sha256, "worktree": str(self.worktree), "state": self.state,
            "patches": [p.to_dict() for p in self.patches],
            "new_recipe": str(self.new_recipe) if self.new_recipe else None,
            "written": list(self.written), "message": self.message,
        }

    def tables(self) -> list[Table]:
        rows = tuple(
            (p.name, p.verdict.value, p.evidence.value if p.evidence else "", p.detail) for p in self.patches
        )
        return [Table(f"{self.recipe}: {self.old} -> {self.new}", ("patch", "verdict", "evidence", "detail"), rows, self.message)]


@dataclass(frozen=True)
class MatrixResult:
    recipe: str
    versions: tuple[str, ...]
    results: tuple[RefreshResult | None, ...]
    errors: tuple[str | None, ...]
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if any(e for e in self.errors) or any(
            r and any(p.verdict is RefreshVerdict.CONFLICT for p in r.patches) for r in self.results) else 0

    def grid(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for v, r in zip(self.versions, self.results, strict=True):
            if r is None:
                continue
            for p in r.patches:
                out.setdefault(p.name, {})[v] = p.verdict.value
        for v, e in zip(self.versions, self.errors, strict=True):
            if e:
                for row in out.values():
                    row.setdefault(v, "error")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "versions": list(self.versions), "grid": self.grid(),
                "results": [r.to_dict() if r else None for r in self.results], "errors": list(self.errors),
                "seconds": round(self.seconds, 2)}

    def tables(self) -> list[Table]:
        grid = self.grid()
        rows = tuple((name, *(row.get(v, "") for v in self.versions)) for name, row in grid.items())
        errs = "; ".join(f"{v}: {e}" for v, e in zip(self.versions, self.errors, strict=True) if e)
        return [Table(f"{self.recipe}: refresh matrix", ("patch", *self.versions), rows, errs)]


# ------------------------------------------------------------------ target


@dataclass(frozen=True)
class _Target:
    source: Source  # the recipe's source as it is
    new_source: Source  # the same source at the new release
    label_old: str
    label_new: str
    new_version: str


def _find_source(recipe: Recipe, name: str) -> Source:
    for s in recipe.sources:
        if s.name == name or (s.project and s.project.lower() == name.lower()):
            return s
    raise StackbuildError(f"recipe has no source {name!r} (sources: {', '.join(s.name for s in recipe.sources)})",
                          file=recipe.path, key="sources")


def index_sha256(requirement: str) -> str:
    """The sdist's sha256 as the index's JSON states it."""
    req = Requirement(requirement)
    version = next(iter(req.specifier)).version
    wanted = set(sdist_filename_candidates(req.name, version))
    for f in list_files(req.name):
        if f.filename in wanted:
            if not f.sha256:
                raise SourceError(f"the index gives no sha256 for {f.filename}; pass --sha256", file=f.url)
            return f.sha256
    raise SourceError(f"no source release {requirement} on the index {configured_index()}")


def _target(recipe: Recipe, to: str, sha256: str | None) -> _Target:
    if "==" in to:
        req = Requirement(to)
        src = _find_source(recipe, req.name)
        if src.kind is not SourceKind.PYPI:
            raise StackbuildError(f"source {src.name} is not a pypi source; give --to {src.name}@<tag or commit>", key="--to")
        version = next(iter(req.specifier)).version
        new_req = f"{src.project}=={version}"
        try:
            sha = sha256 or index_sha256(new_req)
        except SourceError as e:  # name the recipe and the option too, not only the index
            raise SourceError(f"--to {to}: {e.render()}", file=recipe.path) from None
        new = dataclasses.replace(src, requirement=new_req, sha256=sha)
        return _Target(src, new, src.requirement or "", new_req, version)
    if "@" in to:
        name, ref = to.split("@", 1)
        src = _find_source(recipe, name)
        if src.kind is not SourceKind.GIT:
            raise StackbuildError(f"source {src.name} is not a git source; give --to {src.name}==<version>", key="--to")
        commit = ref if _HEX40.match(ref) else None
        new = dataclasses.replace(src, tag=None if commit else ref, commit=commit, branch=None, float=False, sha256=None)
        old_label = f"{src.name}@{src.commit or src.tag or src.branch}"
        return _Target(src, new, old_label, f"{src.name}@{ref}", ref if not commit else ref[:12])
    raise StackbuildError(f"--to must be NAME==VERSION (pypi) or NAME@REF (git), got {to!r}", key="--to")


def refresh_dir(recipe: Recipe, workdir: Path | None = None) -> Path:
    if workdir is not None:
        return Path(workdir).resolve()
    ws = default_workdir(recipe).resolve()
    return ws.parent / f"{ws.name}.refresh"


# ------------------------------------------------------------------ the engine


class _Engine:
    """One refresh run in one refresh directory; its state is a JSON file so that
    --continue can pick it up in another process."""

    def __init__(self, recipe: Recipe, state: dict[str, Any], rdir: Path, progress: Progress):
        self.recipe = recipe
        self.st = state
        self.rdir = rdir
        self.tree = rdir / state["source"]
        self.progress = progress

    # -- state
    def save(self) -> None:
        atomic_write_text(self.rdir / STATE_FILE, json.dumps(self.st, indent=2) + "\n")

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.st["results"]

    def git(self, *args: str, check: bool = True, stdin: str | None = None) -> Any:
        return git_out(self.tree, *args, check=check, stdin=stdin)

    def read(self, rel: str) -> str | None:
        try:
            data = Tree(self.tree).read(rel)
        except TreeWriteError:
            return None  # a path the door refuses is not in the tree
        return None if data is None else data.decode("utf-8", "replace")

    # -- series
    def run(self) -> None:
        entries = self.st["entries"]
        while self.st["position"] < len(entries):
            i = self.st["position"]
            e = entries[i]
            self.progress(f"[{i + 1}/{len(entries)}] {e['name']}")
            done = self._entry(e, e["commits"])
            if not done:
                self.save()
                return
            self.st["position"] = i + 1
            self.save()

    def _record(self, e: dict[str, Any], verdict: RefreshVerdict, detail: str = "", evidence: Evidence | None = None,
                commits: tuple[str, ...] = ()) -> bool:
        self.results.append(RefreshedPatch(e["name"], e["kind"], verdict, detail, evidence, e.get("sha256"),
                                           None, None, commits).to_dict())
        return True

    def _entry(self, e: dict[str, Any], commits: list[str]) -> bool:
        if e["kind"] == PatchKind.BACKPORT.value:
            return self._backport(e)
        if not commits:
            return self._record(e, RefreshVerdict.ALREADY_UPSTREAM, e.get("old_detail") or "", Evidence.AT_OLD_BASE)
        first, last = commits[0], commits[-1]
        diff = self.git("diff", "--no-color", "--no-renames", "--full-index", f"{first}^", last).stdout
        try:
            parsed = parse_patch(diff)
        except MalformedPatch as ex:
            parsed = None
            self.progress(f"{e['name']}: combined diff unparsable ({ex}); three-way only")
        pre = self.git("rev-parse", "HEAD").stdout.strip()
        # obsolete: a file it changes is gone
        if parsed is not None:
            gone = [fp.old_path for fp in parsed.files if fp.old_path and self.read(fp.old_path) is None]
            if gone:
                hints = []
                for g in gone:
                    base = g.rsplit("/", 1)[-1]
                    same = self.git("ls-files", f"*/{base}", check=False).stdout.split()
                    if same:
                        hints.append(f"{base} now at {same[0]}")
                detail = f"gone at the new base: {', '.join(gone)}" + (f" ({'; '.join(hints)})" if hints else "")
                return self._record(e, RefreshVerdict.OBSOLETE, detail, Evidence.FILE_GONE)
        # patch-id against upstream history (git sources)
        ids: dict[str, str] = self.st.get("upstream_patch_ids") or {}
        if ids:
            pid = self.git("patch-id", "--stable", stdin=diff).stdout.split()
            if pid and pid[0] in ids:
                return self._record(e, RefreshVerdict.ALREADY_UPSTREAM, f"upstream commit {ids[pid[0]][:12]}", Evidence.PATCH_ID)
        verdict = None
        if parsed is not None:
            out = apply_parsed(parsed, self.read)
            if out.verdict is PatchVerdict.ALREADY_APPLIED:
                return self._record(e, RefreshVerdict.ALREADY_UPSTREAM, "the reverse applies at the new base", Evidence.REVERSE_APPLIES)
            verdict = {PatchVerdict.APPLIED: RefreshVerdict.CLEAN, PatchVerdict.APPLIED_OFFSET: RefreshVerdict.OFFSET,
                       PatchVerdict.APPLIED_FUZZ: RefreshVerdict.OFFSET}.get(out.verdict)
        # three-way: cherry-pick each commit of the patch
        for n, c in enumerate(commits):
            r = self.git("cherry-pick", "--keep-redundant-commits", c, check=False)
            if r.returncode != 0:
                lines = self._lines_evidence(parsed)
                if lines is not None:
                    self._drop_to(pre)
                    return self._record(e, RefreshVerdict.ALREADY_UPSTREAM, lines, Evidence.LINES_PRESENT)
                unmerged = self.git("diff", "--name-only", "--diff-filter=U").stdout.split()
                detail = f"conflict in {', '.join(unmerged) or 'the merge'}"
                if not self.st["stop_on_conflict"]:
                    self._drop_to(pre)
                    return self._record(e, RefreshVerdict.CONFLICT, detail + " (skipped; later patches tried without it)")
                self.st["conflict"] = {"entry": e["name"], "pre": pre, "pending": commits[n + 1:], "detail": detail,
                                       "commit": c}
                return False
        if self.git("rev-parse", "HEAD^{tree}").stdout.strip() == self.git("rev-parse", f"{pre}^{{tree}}").stdout.strip():
            self._drop_to(pre)
            return self._record(e, RefreshVerdict.ALREADY_UPSTREAM, "cherry-picking it leaves the new base unchanged", Evidence.EMPTY_MERGE)
        new_commits = tuple(self.git("rev-list", "--reverse", f"{pre}..HEAD").stdout.split())
        if verdict is None:
            verdict = RefreshVerdict.MERGED
        detail = {RefreshVerdict.CLEAN: "", RefreshVerdict.OFFSET: "hunks moved; regenerated",
                  RefreshVerdict.MERGED: "context changed upstream; three-way merge; regenerated"}[verdict]
        return self._record(e, verdict, detail, None, new_commits)

    def _drop_to(self, pre: str) -> None:
        self.git("cherry-pick", "--abort", check=False)
        self.git("reset", "-q", "--hard", pre)

    def _lines_evidence(self, parsed: Any) -> str | None:
        """The change is at the new base: every added line is there, or each hunk's
        result is there as one block with a single line different in all (upstream
        took it with a line changed; context lines anchor where)."""
        if parsed is None:
            return None
        present = total = 0
        mismatches: list[str] = []
        windows_ok = True
        for fp in parsed.files:
            # the new base's side (during a conflict the worktree has markers)
            r = self.git("show", f"HEAD:{fp.path}", check=False)
            if r.returncode != 0:
                return None
            lines = r.stdout.split("\n")
            have = {ln.strip() for ln in lines}
            for h in fp.hunks:
                for ln in h.lines:
                    s = ln[1:].strip()
                    if ln[0] == "+" and len(s) >= 4 and re.search(r"[A-Za-z0-9]", s):
                        total += 1
                        present += s in have
                best = _best_window(lines, h.new_lines)
                if best is None:
                    windows_ok = False
                else:
                    mismatches.extend(best)
        if total == 0:
            return None
        if present == total:
            return f"{present}/{total} added lines present at the new base"
        if windows_ok and len(mismatches) == 1 and total >= 2:
            return f"{present}/{total} added lines present, in place; upstream differs in: {mismatches[0].strip()[:80]!r}"
        return None

    def _backport(self, e: dict[str, Any]) -> bool:
        files: list[str] = e["files"]
        have = {f: (self.tree / f).read_bytes() for f in files if (self.tree / f).is_file()}
        if len(have) == len(files):
            theirs = read_members(fetch_sdist(e["release"], e["sha256"], self.progress), files)
            same = [f for f in files if theirs[f] == have[f]]
            if len(same) == len(files):
                return self._record(e, RefreshVerdict.ALREADY_UPSTREAM,
                                    f"the new base ships {', '.join(files)} identical to {e['release']}'s", Evidence.IDENTICAL_FILES)
            differ = [f for f in files if f not in same]
            return self._record(e, RefreshVerdict.OBSOLETE,
                                f"the new base ships {', '.join(files)}; differs from {e['release']}'s: {', '.join(differ)}",
                                Evidence.DIFFERENT_FILES)
        theirs = read_members(fetch_sdist(e["release"], e["sha256"], self.progress), files)
        pre = self.git("rev-parse", "HEAD").stdout.strip()
        door = Tree(self.tree)  # the one guarded writer into a tree
        for f in files:
            try:
                door.write(f, theirs[f])
            except TreeWriteError as ex:
                raise StackbuildError(f"backport {e['name']}: {ex}", file=self.tree) from None
        self.git("add", "-A", "-f", "--", *files)
        self.git("commit", "-q", "--no-verify", "--allow-empty", "-m",
                 f"{e.get('description') or 'backport'}\n\nBackport of {', '.join(files)} from {e['release']}\nstackbuild-patch: {e['name']}\n")
        shipped = [f for f in files if f in have]
        detail = f"carried: {len(files)} file(s) from {e['release']}"
        if shipped:
            detail += f"; the new base already ships {', '.join(shipped)} (replaced)"
        commits = tuple(self.git("rev-list", "--reverse", f"{pre}..HEAD").stdout.split())
        return self._record(e, RefreshVerdict.CLEAN, detail, None, commits)

    # -- continue
    def resume(self) -> None:
        c = self.st.get("conflict")
        if not c:
            raise StackbuildError("no conflict in progress", file=self.rdir)
        unmerged = self.git("diff", "--name-only", "--diff-filter=U").stdout.split()
        changed = self.git("diff", "--name-only", "HEAD").stdout.split()
        marked = [f for f in changed if (self.tree / f).is_file()
                  and re.search(r"^(<{7}|>{7}) ", (self.tree / f).read_text("utf-8", "replace"), re.M)]
        if marked:
            raise StackbuildError(f"conflict markers remain in {', '.join(marked)}; edit them away first", file=self.tree)
        del unmerged
        self.git("add", "-A", "-f")
        e = next(x for x in self.st["entries"] if x["name"] == c["entry"])
        if self.git("diff", "--cached", "--quiet", "HEAD", check=False).returncode == 0 and not c["pending"]:
            self.git("cherry-pick", "--skip", check=False)
            self.git("reset", "-q", "--hard", "HEAD")
            if self.git("rev-parse", "HEAD").stdout.strip() == c["pre"]:
                self._record(e, RefreshVerdict.ALREADY_UPSTREAM, "the resolution left nothing to change", Evidence.EMPTY_MERGE)
                self._next()
                return
        else:
            r = self.git("-c", "core.editor=true", "cherry-pick", "--continue", check=False)
            if r.returncode != 0 and self.git("rev-parse", "-q", "--verify", "CHERRY_PICK_HEAD", check=False).returncode == 0:
                msg = self.git("log", "-1", "--format=%B", c["commit"]).stdout
                self.git("commit", "-q", "--no-verify", "--allow-empty", "-m", msg)
                self.git("cherry-pick", "--quit", check=False)
        for pc in c["pending"]:
            r = self.git("cherry-pick", "--keep-redundant-commits", pc, check=False)
            if r.returncode != 0:
                c["pending"] = c["pending"][c["pending"].index(pc) + 1:]
                c["commit"] = pc
                self.save()
                return
        new_commits = tuple(self.git("rev-list", "--reverse", f"{c['pre']}..HEAD").stdout.split())
        self._record(e, RefreshVerdict.RESOLVED, f"{c['detail']}; resolved by hand; regenerated", None, new_commits)
        self._next()

    def _next(self) -> None:
        self.st["conflict"] = None
        self.st["position"] += 1
        self.save()
        self.run()


# ------------------------------------------------------------------ setting up


def _best_window(lines: list[str], want: list[str]) -> list[str] | None:
    """The lines of `want` that differ at the best-matching same-length window of
    `lines`, when at most one differs; else None."""
    n = len(want)
    if n < 3 or n > len(lines):
        return None
    for i in range(len(lines) - n + 1):
        diff = []
        for a, b in zip(lines[i:i + n], want, strict=True):
            if a.strip() != b.strip():
                diff.append(b)
                if len(diff) > 1:
                    break
        if len(diff) <= 1:
            return diff
    return None


def _old_commits(tree: Path) -> dict[str, list[str]]:
    out = run_git(tree, "log", "--reverse", "--format=%H%x00%B%x01", f"{OLD_BASE_TAG}..old-series")
    by_name: dict[str, list[str]] = {}
    for rec in out.split("\x01"):
        rec = rec.strip("\n")
        if not rec:
            continue
        sha, _, msg = rec.partition("\x00")
        name = commit_trailers(msg).get("patch")
        if name:
            by_name.setdefault(name, []).append(sha.strip())
    return by_name


def _materialise_new(target: _Target, dest: Path, progress: Progress) -> str | None:
    """Write the new release's files into `dest`; the upstream commit for git sources."""
    src = target.new_source
    if src.kind is SourceKind.PYPI:
        assert src.requirement and src.sha256
        extract_tarball(fetch_sdist(src.requirement, src.sha256, progress, limits=src.limits), dest,
                        limits=src.limits or DEFAULT_LIMITS)
        return None
    co = fetch_git(src)
    export_tree(co, dest)
    return co.commit


def _upstream_patch_ids(old: GitCheckout | None, new_commit: str | None) -> dict[str, str]:
    if old is None or new_commit is None:
        return {}
    bare = old.repo
    log = git_out(bare, "log", "-p", "--no-merges", "--no-color", "--full-index", f"{old.commit}..{new_commit}", check=False)
    if log.returncode != 0 or not log.stdout:
        return {}
    ids = git_out(bare, "patch-id", "--stable", stdin=log.stdout).stdout
    out: dict[str, str] = {}
    for ln in ids.split("\n"):
        parts = ln.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def _prepare(recipe: Recipe, target: _Target, rdir: Path, ws_tree: Path, ws_manifest: Any,
             stop_on_conflict: bool, progress: Progress) -> _Engine:
    name = target.source.name
    tree = rdir / name
    rdir.mkdir(parents=True, exist_ok=True)
    progress(f"cloning the applied series from {ws_tree}")
    git_out(rdir, "clone", "-q", "--local", "--no-checkout", str(ws_tree), str(tree))
    run_git(tree, "remote", "remove", "origin")
    run_git(tree, "config", "core.autocrlf", "false")
    run_git(tree, "branch", "-m", "stackbuild", "old-series")
    run_git(tree, "tag", OLD_BASE_TAG, BASE_TAG)
    progress(f"materialising {target.label_new}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.new-", dir=rdir))
    tmp.rmdir()
    new_commit = _materialise_new(target, tmp, progress)
    for child in tmp.iterdir():
        os.replace(child, tree / child.name)
    tmp.rmdir()
    run_git(tree, "symbolic-ref", "HEAD", "refs/heads/stackbuild")
    run_git(tree, "add", "-A", "-f")
    run_git(tree, "commit", "-q", "--no-verify", "-m", f"base: {target.new_source.describe()}")
    run_git(tree, "tag", "-f", BASE_TAG)
    old_co = fetch_git(target.source) if target.source.kind is SourceKind.GIT else None
    by_name = _old_commits(tree)
    verdicts = {p.name: (p.verdict, p.detail) for p in ws_manifest.patches} if ws_manifest else {}
    entries = []
    for p in recipe.patches:
        if p.source != name:
            continue
        entries.append({
            "name": p.name, "kind": p.kind.value, "sha256": p.sha256, "file": p.file, "release": p.release,
            "files": list(p.files), "description": p.description, "commits": by_name.get(p.name, []),
            "old_detail": verdicts.get(p.name, ("", ""))[1],
        })
    state = {
        "recipe": str(recipe.path), "source": name, "old": target.label_old, "new": target.label_new,
        "new_version": target.new_version, "new_sha256": target.new_source.sha256,
        "new_ref": {"tag": target.new_source.tag, "commit": target.new_source.commit},
        "entries": entries, "position": 0, "results": [], "conflict": None, "state": "running",
        "stop_on_conflict": stop_on_conflict, "upstream_patch_ids": _upstream_patch_ids(old_co, new_commit),
    }
    eng = _Engine(recipe, state, rdir, progress)
    eng.save()
    return eng


def _applied_workspace(recipe: Recipe, source: str, base_workspace: Path | None, progress: Progress) -> tuple[Path, Any]:
    res = apply_recipe(recipe, base_workspace, progress=progress)
    if not res.ok:
        raise PatchError(f"the series does not apply to its own base, so it cannot be refreshed: {res.message}", file=recipe.path)
    return res.workdir / source, res.manifest


# ------------------------------------------------------------------ commands


def refresh(
    recipe: Recipe,
    to: str,
    sha256: str | None = None,
    workdir: Path | None = None,
    progress: Progress | None = None,
    *,
    base_workspace: Path | None = None,
    force: bool = False,
) -> RefreshResult:
    """Carry the series onto `to` ("vllm==0.20.0", or "name@tag" for a git source).
    `workdir` is the refresh directory (default work/<recipe>.refresh)."""
    progress = progress or (lambda _m: None)
    rdir = refresh_dir(recipe, workdir)
    if (rdir / STATE_FILE).exists():
        st = json.loads((rdir / STATE_FILE).read_text())
        if st.get("conflict"):
            raise StackbuildError(f"a refresh to {st['new']} stopped at a conflict in {st['conflict']['entry']}; "
                                  "finish it with --continue or drop it with --abort", file=rdir)
    target = _target(recipe, to, sha256)
    ws_tree, manifest = _applied_workspace(recipe, target.source.name, base_workspace, progress)
    if rdir.exists():
        shutil.rmtree(rdir)
    eng = _prepare(recipe, target, rdir, ws_tree, manifest, True, progress)
    eng.run()
    return _conclude(eng, write=True, force=force)


def _load_engine(recipe: Recipe, workdir: Path | None, progress: Progress | None) -> _Engine:
    rdir = refresh_dir(recipe, workdir)
    f = rdir / STATE_FILE
    if not f.exists():
        raise StackbuildError("no refresh in progress", file=rdir)
    return _Engine(recipe, json.loads(f.read_text()), rdir, progress or (lambda _m: None))


def refresh_continue(recipe: Recipe, workdir: Path | None = None, progress: Progress | None = None, *, force: bool = False) -> RefreshResult:
    eng = _load_engine(recipe, workdir, progress)
    if not eng.st.get("conflict"):
        raise StackbuildError(f"the refresh to {eng.st['new']} is not stopped at a conflict; nothing to continue", file=eng.rdir)
    eng.resume()
    return _conclude(eng, write=True, force=force)


def refresh_abort(recipe: Recipe, workdir: Path | None = None, progress: Progress | None = None) -> RefreshResult:
    """Drop an unfinished refresh: the refresh worktree goes; nothing else was written."""
    eng = _load_engine(recipe, workdir, progress)
    if eng.st.get("state") == "done":
        raise StackbuildError(f"the refresh to {eng.st['new']} finished; its files are written (remove them with git)", file=eng.rdir)
    shutil.rmtree(eng.rdir)
    patches = tuple(RefreshedPatch.from_dict(d) for d in eng.results)
    return RefreshResult(recipe.name, eng.st["source"], eng.st["old"], eng.st["new"], eng.st["new_sha256"], eng.rdir,
                         "aborted", patches, message=f"aborted; removed {eng.rdir}; nothing else was changed")


def _pending(eng: _Engine) -> list[RefreshedPatch]:
    out = []
    c = eng.st.get("conflict")
    for i, e in enumerate(eng.st["entries"]):
        if i < eng.st["position"]:
            continue
        if c and e["name"] == c["entry"]:
            out.append(RefreshedPatch(e["name"], e["kind"], RefreshVerdict.CONFLICT,
                                      f"{c['detail']}: resolve in {eng.tree}, then `refresh --continue` (or --abort)",
                                      old_sha256=e.get("sha256")))
        else:
            out.append(RefreshedPatch(e["name"], e["kind"], RefreshVerdict.NOT_ATTEMPTED,
                                      "waits for the conflict above", old_sha256=e.get("sha256")))
    return out


def _conclude(eng: _Engine, write: bool, force: bool) -> RefreshResult:
    st = eng.st
    done = [RefreshedPatch.from_dict(d) for d in eng.results]
    if st.get("conflict"):
        pats = tuple(done + _pending(eng))
        c = st["conflict"]
        msg = f"conflict in {c['entry']}: {c['detail']}; resolve in {eng.tree}, then --continue (or --abort)"
        return RefreshResult(eng.recipe.name, st["source"], st["old"], st["new"], st["new_sha256"], eng.tree,
                             "conflict", pats, message=msg)
    if not write:
        counts = _counts(done)
        return RefreshResult(eng.recipe.name, st["source"], st["old"], st["new"], st["new_sha256"], eng.tree,
                             "checked", tuple(done), message=counts)
    final, new_recipe, written = _write_outputs(eng, done, force)
    st["state"] = "done"
    eng.save()
    msg = _counts(final) + f"; new recipe {new_recipe.name}; {len(written)} file(s) written"
    return RefreshResult(eng.recipe.name, st["source"], st["old"], st["new"], st["new_sha256"], eng.tree,
                         "done", tuple(final), new_recipe, tuple(written), msg)


def _counts(pats: list[RefreshedPatch]) -> str:
    counts: dict[str, int] = {}
    for p in pats:
        counts[p.verdict.value] = counts.get(p.verdict.value, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in counts.items()) or "no patches"


def new_recipe_name(name: str, old_version: str | None, new_version: str) -> str:
    if old_version and old_version in name:
        return name.replace(old_version, new_version)
    return f"{name}-{new_version}"


def _write_outputs(eng: _Engine, done: list[RefreshedPatch], force: bool) -> tuple[list[RefreshedPatch], Path, list[str]]:
    recipe = eng.recipe
    st = eng.st
    root = recipe.root
    src = recipe.source(st["source"])
    old_version = src.version or src.tag or (src.commit[:12] if src.commit else None)
    new_version = st["new_version"]
    out_dir = root / "patches" / st["source"] / new_version
    entries = {e["name"]: e for e in st["entries"]}
    files: dict[Path, bytes] = {}
    final: list[RefreshedPatch] = []
    for p in done:
        e = entries[p.name]
        entry = next(x for x in recipe.patches if x.name == p.name)
        if not p.verdict.kept or entry.kind is PatchKind.BACKPORT:
            final.append(p)
            continue
        if entry.kind is PatchKind.FILE:
            assert entry.file is not None
            old_path = root / entry.file
            old_text = old_path.read_bytes()
            dest = out_dir / old_path.name
        else:
            old_text = b""
            dest = out_dir / f"{p.name}.patch"
        if p.verdict is RefreshVerdict.CLEAN and old_text:
            data = old_text  # applies as it is: carried byte for byte
        else:
            old_parts = split_mbox(old_text.decode("utf-8", "replace")) if old_text else []
            rendered = []
            for k, c in enumerate(p.commits):
                header = split_header(old_parts[k])[0] if k < len(old_parts) else (
                    f"Description: {e.get('description') or p.name}\nOrigin: {entry.from_source}:{entry.path}\n")
                rendered.append(join_patch(bump_last_update(header), commit_diff(eng.tree, c)))
            data = "\n".join(rendered).encode("utf-8")
        files[dest] = data
        final.append(dataclasses.replace(p, new_sha256=sha256_text(data.decode("utf-8", "replace")) if data else None,
                                         file=str(dest.relative_to(root))))
    # the new recipe
    new_name = new_recipe_name(recipe.name, old_version, new_version)
    new_path = recipe.path.parent / f"{new_name}.toml"
    text = read_user_text(recipe.path, "recipe", RecipeError)
    new_text = _new_recipe_text(text, recipe, st, final, new_name)
    files[new_path] = new_text.encode("utf-8")
    clashes = [str(f) for f, d in files.items() if f.exists() and f.read_bytes() != d]
    if clashes and not force:
        raise StackbuildError(f"would overwrite files that differ: {', '.join(clashes)} (pass --force)", file=out_dir)
    written = []
    for f, d in files.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.tmp")
        tmp.write_bytes(d)
        os.replace(tmp, f)
        written.append(str(f.relative_to(root)))
    return final, new_path, written


def _new_recipe_text(text: str, recipe: Recipe, st: dict[str, Any], final: list[RefreshedPatch], new_name: str) -> str:
    lines = text.split("\n")
    src_name = st["source"]
    src = recipe.source(src_name)
    # name
    for i, ln in enumerate(lines):
        if re.match(r"^\s*\[", ln):
            break
        if re.match(r'^name\s*=\s*"', ln):
            lines[i] = re.sub(r'"[^"]*"', f'"{new_name}"', ln, count=1)
    # the source table
    head = f"[sources.{src_name}]"
    start = next((i for i, ln in enumerate(lines) if ln.strip() == head), None)
    if start is None:
        new_src = ["", f"# refreshed by stackbuild refresh {today()}: overrides the source inherited from {', '.join(recipe.extends)}", head]
        if src.kind is SourceKind.PYPI:
            new_src += [f'pypi = "{st["new"]}"', f'sha256 = "{st["new_sha256"]}"']
        else:
            new_src += [f'git = "{src.url}"'] + ([f'tag = "{st["new_ref"]["tag"]}"'] if st["new_ref"]["tag"] else [f'commit = "{st["new_ref"]["commit"]}"'])
        lines += new_src
    else:
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
        for i in range(start + 1, end):
            if src.kind is SourceKind.PYPI:
                lines[i] = re.sub(r'^(\s*pypi\s*=\s*)"[^"]*"', lambda m: f'{m.group(1)}"{st["new"]}"', lines[i])
                lines[i] = re.sub(r'^(\s*sha256\s*=\s*)"[^"]*"', lambda m: f'{m.group(1)}"{st["new_sha256"]}"', lines[i])
            else:
                tag, commit = st["new_ref"]["tag"], st["new_ref"]["commit"]
                if tag:
                    lines[i] = re.sub(r'^(\s*tag\s*=\s*)"[^"]*"', rf'\g<1>"{tag}"', lines[i])
                    lines[i] = re.sub(r'^(\s*commit\s*=.*)$', r"# \1  (stackbuild refresh: the tag is the new pin)", lines[i])
                else:
                    lines[i] = re.sub(r'^(\s*commit\s*=\s*)"[^"]*"', rf'\g<1>"{commit}"', lines[i])
                    lines[i] = re.sub(r'^(\s*tag\s*=.*)$', r"# \1  (stackbuild refresh: the commit is the new pin)", lines[i])
    # patches
    for p in final:
        entry: PatchEntry = next(x for x in recipe.patches if x.name == p.name)
        block = find_block(lines, entry)
        if block is None:
            continue  # declared in a recipe this one extends
        if not p.verdict.kept:
            why = f"# dropped by stackbuild refresh to {st['new']} ({today()}): {p.verdict.value}"
            if p.evidence:
                why += f" ({p.evidence.value})"
            if p.detail:
                why += f": {p.detail}"
            for i in range(block.start, block.end):
                lines[i] = "# " + lines[i] if lines[i].strip() else lines[i]
            lines.insert(block.start, why.replace("\n", " "))
            continue
        if entry.kind is PatchKind.BACKPORT:
            continue
        if p.file and p.new_sha256:
            if entry.kind is PatchKind.FROM_SOURCE:
                for i in range(block.start + 1, block.end):
                    if re.match(r"^\s*(from|path)\s*=", lines[i]):
                        lines[i] = f"# {lines[i]}  (refreshed into a file of its own)"
                if "name" not in block.values:
                    set_key(lines, block, "name", entry.name)
            set_key(lines, block, "file", p.file)
            set_key(lines, block, "sha256", p.new_sha256)
    header = f"# Refreshed from {recipe.path.name} onto {st['new']} by stackbuild refresh ({today()})."
    return header + "\n" + "\n".join(lines)


# ------------------------------------------------------------------ matrix


def _matrix_worker(recipe_path: str, to: str, sha256: str | None, rdir: str, ws_tree: str, manifest_dir: str) -> RefreshResult:
    from stackbuild.manifest import read_manifest

    recipe = load_recipe(recipe_path)
    target = _target(recipe, to, sha256)
    eng = _prepare(recipe, target, Path(rdir), Path(ws_tree), read_manifest(Path(manifest_dir)), False, lambda _m: None)
    eng.run()
    return _conclude(eng, write=False, force=False)


def refresh_matrix(
    recipe: Recipe,
    versions: list[str],
    jobs: int = 2,
    progress: Progress | None = None,
    *,
    sha256s: dict[str, str] | None = None,
    base_workspace: Path | None = None,
) -> MatrixResult:
    """Try the series on several releases at once (one process and one temporary
    directory each); nothing is written. A conflict is recorded and the series goes on
    without that patch, so the grid shows every patch on every release."""
    import time

    progress = progress or (lambda _m: None)
    t0 = time.perf_counter()
    source = None
    tos = []
    for v in versions:
        to = v
        if "==" not in v and "@" not in v:
            src = next((s for s in recipe.sources if s.name in recipe.patched_sources), None)
            if src is None or not src.project:
                raise StackbuildError(f"give {v!r} as NAME==VERSION", key="--matrix")
            to = f"{src.project}=={v}"
        tos.append(to)
        source = _target_source_name(recipe, to)
    assert source is not None
    ws_tree, _manifest = _applied_workspace(recipe, source, base_workspace, progress)
    base = Path(tempfile.mkdtemp(prefix=f"stackbuild-matrix-{recipe.name}-"))
    results: list[RefreshResult | None] = [None] * len(tos)
    errors: list[str | None] = [None] * len(tos)
    try:
        with ProcessPoolExecutor(max_workers=max(1, jobs)) as ex:
            futs = {}
            for i, to in enumerate(tos):
                sha = (sha256s or {}).get(to) or (sha256s or {}).get(versions[i])
                futs[i] = ex.submit(_matrix_worker, str(recipe.path), to, sha, str(base / str(i)), str(ws_tree), str(ws_tree.parent))
            for i, f in futs.items():
                try:
                    r = f.result()
                    results[i] = r
                    progress(f"{tos[i]}: {r.message}")
                except StackbuildError as e:
                    errors[i] = e.render()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return MatrixResult(recipe.name, tuple(versions), tuple(results), tuple(errors), time.perf_counter() - t0)


def _target_source_name(recipe: Recipe, to: str) -> str:
    name = Requirement(to).name if "==" in to else to.split("@", 1)[0]
    return _find_source(recipe, name).name
