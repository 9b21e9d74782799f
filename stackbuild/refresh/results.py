"""Writing the results of a refresh: the verdict types, the refreshed patch files and
the new recipe.

A patch that is not clean, offset, merged, resolved or already upstream is never
dropped: the new recipe keeps its entry as it was (naming the patch file for the old
base), marked with `refresh_verdict = "VERDICT: detail"` and a comment above it saying
the verdict and what to do. `stackbuild apply` refuses a series holding a marked entry
(workspace.refused_for_refresh_marks), whether or not the old file happens to apply to
the new base. Already-upstream entries are commented out with the evidence.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from stackbuild.cache import atomic_write_text
from stackbuild.errors import RecipeError, StackbuildError
from stackbuild.inputs import read_user_text
from stackbuild.patchqueue import (
    _toml_str,
    bump_last_update,
    commit_diff,
    find_block,
    join_patch,
    set_key,
    sha256_text,
    split_header,
    today,
)
from stackbuild.recipe import CONTROL_RE, PatchEntry, PatchKind, Recipe, SourceKind
from stackbuild.report import Table
from stackbuild.series import split_mbox


class RefreshVerdict(str, Enum):
    CLEAN = "clean"
    OFFSET = "offset"
    MERGED = "merged (3-way)"
    RESOLVED = "resolved by hand"
    ALREADY_UPSTREAM = "already upstream"
    POSSIBLY_UPSTREAM = "possibly upstream"
    NEEDS_PORTING = "needs porting"
    CONFLICT = "conflict"
    OBSOLETE = "obsolete"
    NOT_ATTEMPTED = "not attempted"

    @property
    def kept(self) -> bool:
        """Carried onto the new base: a refreshed patch file is written."""
        return self in (RefreshVerdict.CLEAN, RefreshVerdict.OFFSET, RefreshVerdict.MERGED, RefreshVerdict.RESOLVED)

    @property
    def ok(self) -> bool:
        """Nothing for a person to decide (the exit code is 0 when every patch is ok)."""
        return self.kept or self is RefreshVerdict.ALREADY_UPSTREAM


class Evidence(str, Enum):
    PATCH_ID = "same patch-id"
    REVERSE_APPLIES = "reverse applies"
    EMPTY_MERGE = "3-way merge changes nothing"
    LINES_PRESENT = "added lines present"
    NORMALISED = "same code ignoring comments, docstrings and formatting"
    NAMES_FOUND = "names it adds are upstream"
    IDENTICAL_FILES = "identical files"
    NEWER_BASE = "new base at or past the backport's release"
    DIFFERENT_FILES = "new base ships its own version"
    AT_OLD_BASE = "already applied at the old base"
    FILE_MOVED = "file moved or split upstream"
    FUNCTION_MOVED = "function moved to another file upstream"
    SIMILAR_CODE = "upstream added similar code"
    SAME_BEHAVIOUR = "upstream code elsewhere does what it adds"
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
    hints: tuple[str, ...] = ()  # where moved code went (ranked, with similarity), where upstream may have it

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "verdict": self.verdict.value, "detail": self.detail,
            "evidence": self.evidence.value if self.evidence else None, "old_sha256": self.old_sha256,
            "new_sha256": self.new_sha256, "file": self.file, "commits": list(self.commits), "hints": list(self.hints),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RefreshedPatch:
        return cls(d["name"], d["kind"], RefreshVerdict(d["verdict"]), d["detail"],
                   Evidence(d["evidence"]) if d["evidence"] else None, d["old_sha256"], d["new_sha256"],
                   d["file"], tuple(d["commits"]), tuple(d.get("hints", ())))


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
        """1 when a person has something to decide: a conflict in progress, or any patch
        not clean, offset, merged, resolved or already upstream."""
        if self.state == "aborted":
            return 0
        return 1 if self.state == "conflict" or any(not p.verdict.ok for p in self.patches) else 0

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
            r and any(not p.verdict.ok for p in r.patches) for r in self.results) else 0

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
        out = [Table(f"{self.recipe}: refresh matrix", ("patch", *self.versions), rows, errs)]
        details = tuple((p.name, v, p.verdict.value, p.detail) for v, r in zip(self.versions, self.results, strict=True)
                        if r is not None for p in r.patches if not p.verdict.kept and p.detail)
        if details:
            out.append(Table("details", ("patch", "release", "verdict", "detail"), details, f"{self.seconds:.1f} s"))
        return out


MARK_KEY = "refresh_verdict"  # recipe.PatchEntry.refresh_verdict: apply refuses a series holding it
_MARK_MAX = 300


def mark_value(p: RefreshedPatch) -> str:
    """The mark's one line: the verdict, and the detail cut to fit."""
    detail = " ".join(CONTROL_RE.sub(" ", p.detail or "").split())
    text = p.verdict.value + (f": {detail}" if detail else "")
    return text if len(text) <= _MARK_MAX else text[:_MARK_MAX - 3] + "..."


def counts(pats: list[RefreshedPatch]) -> str:
    c: dict[str, int] = {}
    for p in pats:
        c[p.verdict.value] = c.get(p.verdict.value, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in c.items()) or "no patches"


def new_recipe_name(name: str, old_version: str | None, new_version: str) -> str:
    if old_version and old_version in name:
        return name.replace(old_version, new_version)
    return f"{name}-{new_version}"


# ------------------------------------------------------------------ writing


def write_outputs(recipe: Recipe, st: dict[str, Any], tree: Path, done: list[RefreshedPatch],
                  force: bool) -> tuple[list[RefreshedPatch], Path, list[str]]:
    """The refreshed patch files and the new recipe; nothing is written when a file
    that would be replaced differs (unless `force`)."""
    root = recipe.root
    src = recipe.source(st["source"])
    old_version = src.version or src.tag or (src.commit[:12] if src.commit else None) or (Path(src.path).name if src.path else None)
    new_version = st["new_version"]
    out_dir = root / "patches" / st["source"] / new_version
    entries = {e["name"]: e for e in st["entries"]}
    files: dict[Path, str] = {}
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
            old_text = old_path.read_bytes().decode("utf-8", "replace")
            dest = out_dir / old_path.name
        else:
            old_text = ""
            dest = out_dir / f"{p.name}.patch"
        if p.verdict is RefreshVerdict.CLEAN and old_text:
            data = old_text  # applies as it is: carried byte for byte (its strip level too)
        else:
            old_parts = split_mbox(old_text) if old_text else []
            rendered = []
            for k, c in enumerate(p.commits):
                header = split_header(old_parts[k])[0] if k < len(old_parts) else (
                    f"Description: {e.get('description') or p.name}\nOrigin: {entry.from_source}:{entry.path}\n")
                rendered.append(join_patch(bump_last_update(header), commit_diff(tree, c)))
            data = "\n".join(rendered)
        files[dest] = data
        final.append(dataclasses.replace(p, new_sha256=sha256_text(data) if data else None,
                                         file=str(dest.relative_to(root))))
    new_name = new_recipe_name(recipe.name, old_version, new_version)
    new_path = recipe.path.parent / f"{new_name}.toml"
    text = read_user_text(recipe.path, "recipe", RecipeError)
    files[new_path] = new_recipe_text(text, recipe, st, final, new_name)
    clashes = [str(f) for f, d in files.items() if f.exists() and f.read_bytes() != d.encode("utf-8")]
    if clashes and not force:
        raise StackbuildError(f"would overwrite files that differ: {', '.join(clashes)} (pass --force)", file=out_dir)
    written = []
    for f, d in files.items():
        atomic_write_text(f, d)
        written.append(str(f.relative_to(root)))
    return final, new_path, written


def _source_lines(st: dict[str, Any]) -> list[str]:
    n = st["new_src"]
    if n["kind"] == SourceKind.PYPI.value:
        return [f'pypi = "{n["requirement"]}"', f'sha256 = "{n["sha256"]}"']
    if n["kind"] == SourceKind.GIT.value:
        return [f'git = "{n["url"]}"'] + ([f'tag = "{n["tag"]}"'] if n["tag"] else [f'commit = "{n["commit"]}"'])
    return [f'path = "{n["path"]}"']


def _replace_values(lines: list[str], start: int, end: int, new_src: dict[str, Any]) -> bool:
    """Set the source's pin keys in place (a trailing comment stays); False when a
    key the new pin needs is not there to replace."""
    if new_src["kind"] == SourceKind.PYPI.value:
        want = {"pypi": new_src["requirement"], "sha256": new_src["sha256"]}
    elif new_src["kind"] == SourceKind.GIT.value:
        want = {"tag": new_src["tag"]} if new_src["tag"] else {"commit": new_src["commit"]}
    else:
        want = {"path": new_src["path"]}
    drop = {"tag", "commit", "branch"} - set(want) if new_src["kind"] == SourceKind.GIT.value else set()
    found = set()
    for i in range(start, end):
        m = re.match(r'^(\s*)([A-Za-z_]+)(\s*=\s*)"[^"]*"(.*)$', lines[i])
        if not m:
            continue
        if m.group(2) in want:
            lines[i] = f'{m.group(1)}{m.group(2)}{m.group(3)}"{want[m.group(2)]}"{m.group(4)}'
            found.add(m.group(2))
        elif m.group(2) in drop:
            lines[i] = f"# {lines[i]}  (stackbuild refresh: replaced by the new pin)"
    return found == set(want)


def new_recipe_text(text: str, recipe: Recipe, st: dict[str, Any], final: list[RefreshedPatch], new_name: str) -> str:
    lines = text.split("\n")
    src_name = st["source"]
    new_src = st["new_src"]
    for i, ln in enumerate(lines):
        if re.match(r"^\s*\[", ln):
            break
        if re.match(r'^name\s*=\s*"', ln):
            lines[i] = re.sub(r'"[^"]*"', f'"{new_name}"', ln, count=1)
    head = f"[sources.{src_name}]"
    start = next((i for i, ln in enumerate(lines) if ln.strip() == head), None)
    if start is None:
        lines += ["", f"# refreshed by stackbuild refresh {today()}: overrides the source inherited from "
                      f"{', '.join(recipe.extends)}", head, *_source_lines(st)]
    else:
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
        if new_src["kind"] == recipe.source(src_name).kind.value and _replace_values(lines, start + 1, end, new_src):
            pass  # the same kind: values replaced in place, comments and order kept
        else:
            keys = r"^\s*(pypi|sha256|git|tag|commit|branch|float|path)\s*="
            kept = [ln for ln in lines[start + 1:end] if not re.match(keys, ln)]
            lines[start + 1:end] = _source_lines(st) + kept
            if new_src["kind"] == SourceKind.GIT.value and recipe.source(src_name).kind is SourceKind.LOCAL:
                lines.insert(start + 1, f"# stackbuild refresh: the local checkout at {new_src['ref']}, pinned by commit")
    marked = 0
    for p in final:
        entry: PatchEntry = next(x for x in recipe.patches if x.name == p.name)
        block = find_block(lines, entry)
        if block is None:
            continue  # declared in a recipe this one extends
        if p.verdict is RefreshVerdict.ALREADY_UPSTREAM or (not p.verdict.ok and entry.kind is PatchKind.BACKPORT):
            why = [f"# stackbuild refresh to {st['new']} ({today()}): {p.verdict.value}"
                   + (f" ({p.evidence.value})" if p.evidence else "")
                   + (f": {' '.join(p.detail.split())}" if p.detail else "")]
            if not p.verdict.ok:
                why.append("# a person must decide: uncomment to keep carrying these files, or delete this entry")
            for i in range(block.start, block.end):
                lines[i] = "# " + lines[i] if lines[i].strip() else lines[i]
            lines[block.start:block.start] = why
            continue
        if not p.verdict.ok:
            marked += 1
            set_key(lines, block, MARK_KEY, _toml_str(mark_value(p)))
            note = [f"# stackbuild refresh to {st['new']} ({today()}): {p.verdict.value}"
                    + (f" ({p.evidence.value})" if p.evidence else "") + ":",
                    *(f"#   {d}" for d in (p.detail or "").split("\n") if d),
                    "#   This entry still names the patch for the old base. `stackbuild apply` (and --onto, build)",
                    f"#   refuses the whole series while it has `{MARK_KEY}`: port the patch to the new release",
                    "#   (set `file` to the ported patch, `stackbuild rehash`) and delete that line, or delete the entry."]
            lines[block.start:block.start] = note
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
            if p.verdict is not RefreshVerdict.CLEAN and entry.strip != 1:
                set_key(lines, block, "strip", 1)  # regenerated with git's a/ b/ paths
    header = f"# Refreshed from {recipe.path.name} onto {st['new']} by stackbuild refresh ({today()})."
    if marked:
        header += f"\n# {marked} patch(es) below are marked for a person to decide; this recipe does not apply until they are."
    return header + "\n" + "\n".join(lines)
