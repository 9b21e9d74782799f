"""The maintainers' patch-queue loop: `edit`, `export`, `import`, `snapshot`.

- `edit` clones the applied workspace's tree of each patched source into
  work/<recipe>.edit/<source> on a branch `stackbuild-edit` (the series as commits on
  the tag `stackbuild/base`). It is a clone, not the workspace itself, because
  `stackbuild apply` rebuilds a workspace whose HEAD moved and would take the edits
  with it. (A branch named `stackbuild/edit` cannot exist beside the workspace branch
  `stackbuild`: git refuses refs that are both a file and a folder.)
- `export` writes the commits after the base back to patch files, one per patch name
  (the commit's `stackbuild-patch:` trailer, else a slug of its subject), DEP-3 header
  kept from the old file, Last-Update bumped only when the diff changed, and edits the
  recipe TOML surgically (only the sha256 lines of matching [[patches]] entries; new
  commits appended as new entries; comments kept), and the sha256 lines of every other
  recipe that names a rewritten file. Refused during an unfinished refresh or git
  operation.
- `rehash` sets recipes' patch sha256 lines to the files' hashes, in place.
- `import_patch` normalises the forms patches travel in (format-patch mbox series,
  plain `diff -u` against a site-packages, gzip+base64 artifacts) into git-style
  patches with a DEP-3 header.
- `snapshot` turns a dirty workspace tree into a patch against HEAD or the pinned base.

The text helpers here (DEP-3 header handling, rendering a parsed patch, the surgical
recipe edits) are shared with the refresh package.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stackbuild.cache import atomic_write_text
from stackbuild.errors import PatchError, RecipeError, StackbuildError
from stackbuild.inputs import read_user_text
from stackbuild.recipe import PatchEntry, PatchKind, Recipe, find_recipe, recipes_dir
from stackbuild.report import Table
from stackbuild.series import (
    DEP3_FIELDS,
    FilePatch,
    Hunk,
    MalformedPatch,
    ParsedPatch,
    PatchVerdict,
    apply_parsed,
    check_safe_path,
    decode_patch_bytes,
    parse_patch,
    quote_git_path,
    resolve_paths,
    split_mbox,
)
from stackbuild.treewrite import Tree, TreeWriteError
from stackbuild.workspace import BASE_TAG, apply_recipe, default_workdir, git_process, run_git

EDIT_BRANCH = "stackbuild-edit"
TRAILER_RE = re.compile(r"^stackbuild-(patch|sha256):\s*(.*)$", re.M)
_FILE_START_RE = re.compile(r"^(diff --git |--- )")
_DIFFSTAT_RE = re.compile(r"^ \S.*\|\s+(\d+|Bin)|^ \d+ files? changed")


def today() -> str:
    return _dt.date.today().isoformat()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def slug(text: str, limit: int = 60) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text.strip().lower()).strip("-")
    return (s[:limit].rstrip("-")) or "patch"


# ------------------------------------------------------------------ patch text


def split_header(text: str) -> tuple[str, str]:
    """A patch's text -> (header, diff): the header is everything before the first
    file header, with a format-patch diffstat dropped (it would go stale)."""
    lines = text.split("\n")
    for i, ln in enumerate(lines):
        if ln.startswith("diff --git ") or (
            ln.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")
        ):
            head = [h for h in lines[:i] if not _DIFFSTAT_RE.match(h)]
            while head and head[-1].strip() == "":
                head.pop()
            return ("\n".join(head) + "\n") if head else "", "\n".join(lines[i:])
    return text, ""


def bump_last_update(header: str, date: str | None = None) -> str:
    """Set (or add) the DEP-3 Last-Update field, keeping everything else."""
    date = date or today()
    if re.search(r"^Last-Update:.*$", header, flags=re.M):
        return re.sub(r"^Last-Update:.*$", f"Last-Update: {date}", header, count=1, flags=re.M)
    lines = header.split("\n") if header else []
    # after the first block of DEP-3 fields (and their continuation lines)
    last = -1
    for i, ln in enumerate(lines):
        m = re.match(r"^([A-Za-z][A-Za-z-]*):", ln)
        if m and (m.group(1) in DEP3_FIELDS or m.group(1).startswith("X-")) or last >= 0 and ln.startswith((" ", "\t")) and ln.strip():
            last = i
        elif last >= 0:
            break
    if last < 0:
        return f"Last-Update: {date}\n" + header
    lines.insert(last + 1, f"Last-Update: {date}")
    return "\n".join(lines)


def join_patch(header: str, diff: str) -> str:
    header = header.rstrip("\n")
    diff = diff if diff.endswith("\n") else diff + "\n"
    if not header:
        return diff
    sep = "\n" if header.rstrip().endswith("---") else "\n\n"
    return header + sep + diff


def render_file_patch(fp: FilePatch) -> str:
    """One parsed file change as a git-style diff (a/ b/ headers)."""
    old = fp.old_path
    new = fp.new_path
    for p in (old, new):
        if p is not None:
            check_safe_path(p)  # never write a patch whose paths git or the tree door would refuse
    a = old or new or ""
    b = new or old or ""
    q = quote_git_path
    out = [f"diff --git {q('a/' + a)} {q('b/' + b)}"]
    if old is None:
        out.append(f"new file mode {fp.new_mode or '100644'}")
    elif new is None:
        out.append("deleted file mode 100644")
    elif fp.is_rename and old != new:
        out += [f"rename from {q(old)}", f"rename to {q(new)}"]
    elif fp.is_copy and old != new:
        out += [f"copy from {q(old)}", f"copy to {q(new)}"]
    elif fp.new_mode:
        out.append(f"new mode {fp.new_mode}")
    out.append(f"--- {q('a/' + old) if old else '/dev/null'}")
    out.append(f"+++ {q('b/' + new) if new else '/dev/null'}")
    for h in fp.hunks:
        out.extend(_render_hunk(h))
    return "\n".join(out) + "\n"


def _render_hunk(h: Hunk) -> list[str]:
    def rng(start: int, n: int) -> str:
        return f"{start}" if n == 1 else f"{start},{n}"

    out = [f"@@ -{rng(h.old_start, h.old_len)} +{rng(h.new_start, h.new_len)} @@" + (f" {h.section}" if h.section else "")]
    last_old = max((i for i, ln in enumerate(h.lines) if ln[0] in " -"), default=-1)
    last_new = max((i for i, ln in enumerate(h.lines) if ln[0] in " +"), default=-1)
    for i, ln in enumerate(h.lines):
        out.append(ln)
        if (h.no_newline_old and i == last_old) or (h.no_newline_new and i == last_new):
            out.append("\\ No newline at end of file")
    return out


# ------------------------------------------------------------------ surgical recipe edits


@dataclass
class _Block:
    start: int  # line index of "[[patches]]"
    end: int  # exclusive
    values: dict[str, str]  # simple string keys of the block


_KV_RE = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*"([^"]*)"')
_TABLE_RE = re.compile(r"^\s*\[")


def patch_blocks(lines: list[str]) -> list[_Block]:
    blocks: list[_Block] = []
    cur: _Block | None = None
    for i, ln in enumerate(lines):
        if _TABLE_RE.match(ln):
            if cur is not None:
                cur.end = i
                blocks.append(cur)
                cur = None
            if ln.strip() == "[[patches]]":
                cur = _Block(i, len(lines), {})
            continue
        if cur is not None:
            m = _KV_RE.match(ln)
            if m:
                cur.values[m.group(1)] = m.group(2)
    if cur is not None:
        # trailing blank/comment lines belong to whatever follows, not to the block
        end = len(lines)
        while end > cur.start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        cur.end = end
        blocks.append(cur)
    for b in blocks:
        while b.end > b.start + 1 and (not lines[b.end - 1].strip() or lines[b.end - 1].lstrip().startswith("#")):
            b.end -= 1
    return blocks


def block_matches(block: _Block, entry: PatchEntry) -> bool:
    v = block.values
    if "name" in v:
        return v["name"] == entry.name
    if entry.kind is PatchKind.FILE:
        return v.get("file") == entry.file
    if entry.kind is PatchKind.FROM_SOURCE:
        return v.get("from") == entry.from_source and v.get("path") == entry.path
    return v.get("backport") == entry.release


def set_key(lines: list[str], block: _Block, key: str, value: str | int) -> None:
    """Replace `key = "..."` (or `key = 123` for an int) inside the block, keeping a
    trailing comment, or add it."""
    old, text = (r"\d+", str(value)) if isinstance(value, int) else (r'"[^"]*"', f'"{value}"')
    pat = re.compile(rf"^(\s*{re.escape(key)}\s*=\s*){old}(.*)$")
    for i in range(block.start + 1, block.end):
        m = pat.match(lines[i])
        if m:
            lines[i] = f"{m.group(1)}{text}{m.group(2)}"
            return
    lines.insert(block.end, f"{key} = {text}")
    block.end += 1


def find_block(lines: list[str], entry: PatchEntry) -> _Block | None:
    return next((b for b in patch_blocks(lines) if block_matches(b, entry)), None)


def new_entry_text(file: str, source: str, sha: str, description: str | None = None, name: str | None = None) -> str:
    out = ["", "[[patches]]"]
    if name:
        out.append(f'name = "{_toml_str(name)}"')
    out += [f'file = "{_toml_str(file)}"', f'source = "{_toml_str(source)}"', f'sha256 = "{sha}"']
    if description:
        out.append(f'description = "{_toml_str(description)}"')
    return "\n".join(out) + "\n"


def _toml_str(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def append_entries(text: str, entries: list[str]) -> str:
    if not entries:
        return text
    return text.rstrip("\n") + "\n" + "".join(entries)


def git_out(cwd: Path, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = git_process(cwd, *args, stdin=stdin)
    if check and r.returncode != 0:
        raise StackbuildError(f"git {' '.join(args[:3])} failed: {r.stderr.strip() or r.stdout.strip()}", file=cwd)
    return r


def commit_trailers(message: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in TRAILER_RE.finditer(message)}


# ------------------------------------------------------------------ edit


@dataclass(frozen=True)
class EditTree:
    source: str
    path: Path
    branch: str
    base: str
    commits: int
    created: bool

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "path": str(self.path), "branch": self.branch, "base": self.base,
                "commits": self.commits, "created": self.created}


@dataclass(frozen=True)
class EditResult:
    recipe: str
    trees: tuple[EditTree, ...]
    message: str

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "trees": [t.to_dict() for t in self.trees], "message": self.message}

    def tables(self) -> list[Table]:
        rows = tuple((t.source, str(t.path), t.branch, str(t.commits), "new" if t.created else "existing") for t in self.trees)
        return [Table(f"{self.recipe}: edit trees", ("source", "path", "branch", "commits", "state"), rows, self.message)]


def edit_dir(recipe: Recipe, workdir: Path | None = None) -> Path:
    ws = (workdir or default_workdir(recipe)).resolve()
    return ws.parent / f"{ws.name}.edit"


def edit(recipe: Recipe, workdir: Path | None = None, progress: Any = None) -> EditResult:
    """The series as commits in a worktree per patched source, ready for git."""
    ws = (workdir or default_workdir(recipe)).resolve()
    dest_root = edit_dir(recipe, ws)
    trees: list[EditTree] = []
    need_apply = any(not (dest_root / s / ".git").exists() for s in recipe.patched_sources)
    if need_apply:
        res = apply_recipe(recipe, ws, progress=progress)
        if not res.ok:
            raise PatchError(f"the series does not apply, so there is nothing to edit: {res.message}", file=recipe.path)
    for name in recipe.patched_sources:
        dest = dest_root / name
        created = False
        if not (dest / ".git").exists():
            dest_root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest_root))
            tmp.rmdir()
            git_out(dest_root, "clone", "-q", "--local", str(ws / name), str(tmp))
            run_git(tmp, "checkout", "-q", "-B", EDIT_BRANCH)
            run_git(tmp, "remote", "remove", "origin")
            run_git(tmp, "config", "core.autocrlf", "false")
            os.replace(tmp, dest)
            created = True
        base = run_git(dest, "rev-parse", BASE_TAG)
        n = int(run_git(dest, "rev-list", "--count", f"{BASE_TAG}..HEAD"))
        trees.append(EditTree(name, dest, EDIT_BRANCH, base, n, created))
    msg = "; ".join(f"{t.source}: {t.path} ({t.commits} commit(s) on {BASE_TAG})" for t in trees)
    return EditResult(recipe.name, tuple(trees), msg + "; edit with git, then `stackbuild export`")


# ------------------------------------------------------------------ export


@dataclass(frozen=True)
class ExportedPatch:
    name: str
    file: str  # relative to the project root
    action: str  # unchanged | updated | new | skipped
    sha256: str
    old_sha256: str | None
    commits: tuple[str, ...]
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "action": self.action, "sha256": self.sha256,
                "old_sha256": self.old_sha256, "commits": list(self.commits), "detail": self.detail}


@dataclass(frozen=True)
class ExportResult:
    recipe: str
    recipe_file: Path
    patches: tuple[ExportedPatch, ...]
    missing: tuple[str, ...]  # recipe entries with no commit on the edit branch
    message: str

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "recipe_file": str(self.recipe_file),
                "patches": [p.to_dict() for p in self.patches], "missing": list(self.missing), "message": self.message}

    def tables(self) -> list[Table]:
        rows = tuple((p.name, p.action, p.file, p.sha256[:12], p.detail) for p in self.patches)
        return [Table(f"{self.recipe}: export", ("patch", "action", "file", "sha256", "detail"), rows, self.message)]


def _commits(tree: Path, rev_range: str) -> list[tuple[str, str]]:
    out = run_git(tree, "log", "--reverse", "--format=%H%x00%B%x01", rev_range)
    result = []
    for rec in out.split("\x01"):
        rec = rec.strip("\n")
        if not rec:
            continue
        sha, _, msg = rec.partition("\x00")
        result.append((sha.strip(), msg))
    return result


def commit_diff(tree: Path, commit: str) -> str:
    return git_out(tree, "diff", "--no-color", "--no-ext-diff", "--no-renames", "--full-index", f"{commit}^", commit).stdout


def _diff_key(diff: str) -> tuple[Any, ...]:
    """What a diff changes, independent of index lines and hunk positions."""
    try:
        parsed = parse_patch(diff)
    except MalformedPatch:
        return (diff,)
    return tuple((f.old_path, f.new_path, tuple(h.lines for h in f.hunks)) for f in parsed.files)


def _header_for_new(subject: str, body: str, author: str) -> str:
    desc = subject + ("\n" + "\n".join(f" {ln}" if ln.strip() else " ." for ln in body.strip().split("\n")) if body.strip() else "")
    return (f"Description: {desc}\nAuthor: {author}\nOrigin: other, stackbuild edit\n"
            f"Forwarded: no\nLast-Update: {today()}\n")


def _message_parts(msg: str) -> tuple[str, str]:
    clean = TRAILER_RE.sub("", msg).strip()
    subject, _, body = clean.partition("\n")
    return subject.strip(), body.strip()


def export(recipe: Recipe, workdir: Path | None = None) -> ExportResult:
    """Edit-branch commits back to patch files and the sha256 lines of every recipe
    that names them. Refused while a refresh of the recipe is unfinished, or while an
    edit tree is in the middle of a rebase, cherry-pick or merge."""
    from stackbuild.refresh import refresh_in_progress

    ws = (workdir or default_workdir(recipe)).resolve()
    root = recipe.root
    droot = edit_dir(recipe, ws)
    busy = refresh_in_progress(recipe)
    if busy:
        raise StackbuildError(f"{busy}; finish it (refresh --continue) or drop it (refresh --abort) before exporting",
                              file=recipe.path)
    for source in recipe.patched_sources:
        unfinished = _unfinished_git_operation(droot / source)
        if unfinished:
            raise StackbuildError(f"the edit tree is in the middle of a {unfinished}; finish or abort it first",
                                  file=droot / source)
    text = read_user_text(recipe.path, "recipe", RecipeError)
    lines = text.split("\n")
    results: list[ExportedPatch] = []
    appended: list[str] = []
    seen_names: set[str] = set()
    writes: dict[Path, str] = {}
    for source in recipe.patched_sources:
        tree = droot / source
        if not (tree / ".git").exists():
            raise StackbuildError(f"no edit tree for {source}; run `stackbuild edit {recipe.name}` first", file=tree)
        src = recipe.source(source)
        version = src.version or src.tag or (src.commit or "local")[:12]
        # group consecutive commits by patch name
        groups: list[tuple[str, list[tuple[str, str]]]] = []
        for sha, msg in _commits(tree, f"{BASE_TAG}..HEAD"):
            name = commit_trailers(msg).get("patch") or slug(_message_parts(msg)[0])
            if groups and groups[-1][0] == name:
                groups[-1][1].append((sha, msg))
            else:
                groups.append((name, [(sha, msg)]))
        for name, commits in groups:
            seen_names.add(name)
            entry = next((p for p in recipe.patches if p.name == name and p.source == source), None)
            shas = tuple(c[0] for c in commits)
            if entry is not None and entry.kind is PatchKind.BACKPORT:
                results.append(ExportedPatch(name, f"backport {entry.release}", "skipped", entry.sha256 or "", entry.sha256, shas,
                                             "a backport takes whole files from a release; not exported as a patch"))
                continue
            if entry is not None and entry.kind is PatchKind.FILE:
                assert entry.file is not None
                path = root / entry.file
                old_text = path.read_text(encoding="utf-8") if path.exists() else ""
            else:
                path = root / "patches" / source / version / f"{name}.patch"
                old_text = path.read_text(encoding="utf-8") if path.exists() else ""
            old_parts = split_mbox(old_text) if old_text else []
            new_parts: list[tuple[str, str]] = []
            changed = len(old_parts) != len(commits)
            for k, (sha, msg) in enumerate(commits):
                diff = commit_diff(tree, sha)
                if k < len(old_parts):
                    header, old_diff = split_header(old_parts[k])
                    if _diff_key(old_diff) != _diff_key(diff):
                        changed = True
                else:
                    subject, body = _message_parts(msg)
                    author = run_git(tree, "log", "-1", "--format=%an <%ae>", sha)
                    header = _header_for_new(subject, body, author)
                    changed = True
                new_parts.append((header, diff))
            if not changed and entry is not None:
                results.append(ExportedPatch(name, _rel(path, root), "unchanged", sha256_text(old_text), entry.sha256, shas))
                continue
            rendered = "\n".join(
                join_patch(bump_last_update(h) if (k >= len(old_parts) or _diff_key(split_header(old_parts[k])[1]) != _diff_key(d)) else h, d)
                for k, (h, d) in enumerate(new_parts)
            )
            writes[path] = rendered
            new_sha = sha256_text(rendered)
            rel = _rel(path, root)
            if entry is not None and entry.kind is PatchKind.FILE:
                block = find_block(lines, entry)
                if block is None:
                    detail = "entry lives in a recipe this one extends"
                else:
                    set_key(lines, block, "sha256", new_sha)
                    detail = ""
                results.append(ExportedPatch(name, rel, "updated", new_sha, entry.sha256, shas, detail))
            else:
                subject = _message_parts(commits[0][1])[0]
                if entry is not None:  # a from-source patch that was edited: becomes a file of its own
                    block = find_block(lines, entry)
                    if block is not None:
                        _comment_out(lines, block, f"replaced by {rel} (stackbuild export {today()})")
                appended.append(new_entry_text(rel, source, new_sha, subject, name=name if slug(subject) != name else None))
                results.append(ExportedPatch(name, rel, "new", new_sha, None, shas))
    missing = tuple(p.name for p in recipe.patches if p.name not in seen_names and p.kind is not PatchKind.BACKPORT)
    for path, body in writes.items():
        atomic_write_text(path, body)
    new_text = append_entries("\n".join(lines), appended)
    if new_text != text:
        atomic_write_text(recipe.path, new_text)
    shared = rehash_references(root, {_rel(p, root) for p in writes}, skip=recipe.path)
    if shared:
        results = [dataclasses.replace(r, detail="; ".join(x for x in (
            r.detail, f"also updated in {', '.join(shared[r.file])}" if r.file in shared else "") if x))
            for r in results]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.action] = counts.get(r.action, 0) + 1
    msg = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no commits after the base"
    if missing:
        msg += f"; not on the edit branch (left in the recipe): {', '.join(missing)}"
    return ExportResult(recipe.name, recipe.path, tuple(results), missing, msg)


def _comment_out(lines: list[str], block: _Block, why: str) -> None:
    for i in range(block.start, block.end):
        lines[i] = "# " + lines[i] if lines[i].strip() else lines[i]
    lines.insert(block.start, f"# {why}")


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _unfinished_git_operation(tree: Path) -> str | None:
    git_dir = tree / ".git"
    if not git_dir.is_dir():
        return None
    for name, what in (("rebase-merge", "rebase"), ("rebase-apply", "rebase"), ("CHERRY_PICK_HEAD", "cherry-pick"),
                       ("MERGE_HEAD", "merge"), ("REVERT_HEAD", "revert")):
        if (git_dir / name).exists():
            return what
    return None


def rehash_references(root: Path, files: set[str], skip: Path | None = None) -> dict[str, list[str]]:
    """Set the sha256 of every [[patches]] entry naming one of `files` (relative to
    the project root) in every recipe of the project, to the file's current sha256.
    Returns file -> the recipes changed."""
    changed: dict[str, list[str]] = {}
    d = recipes_dir(root)
    if not files or not d.is_dir():
        return changed
    for path in sorted(d.glob("*.toml")):
        if skip is not None and path.resolve() == skip.resolve():
            continue
        text = read_user_text(path, "recipe", RecipeError)
        lines = text.split("\n")
        for block in patch_blocks(lines):
            f = block.values.get("file")
            if f in files and (root / f).is_file():
                new_sha = hashlib.sha256((root / f).read_bytes()).hexdigest()
                if block.values.get("sha256") != new_sha:
                    set_key(lines, block, "sha256", new_sha)
                    changed.setdefault(f, []).append(path.name)
        new_text = "\n".join(lines)
        if new_text != text:
            atomic_write_text(path, new_text)
    return changed


# ------------------------------------------------------------------ rehash


@dataclass(frozen=True)
class RehashedEntry:
    recipe: str
    file: str
    old_sha256: str
    sha256: str

    @property
    def action(self) -> str:
        return "unchanged" if self.old_sha256 == self.sha256 else "updated"

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "file": self.file, "old_sha256": self.old_sha256, "sha256": self.sha256,
                "action": self.action}


@dataclass(frozen=True)
class RehashResult:
    entries: tuple[RehashedEntry, ...]
    message: str

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [e.to_dict() for e in self.entries], "message": self.message}

    def tables(self) -> list[Table]:
        rows = tuple((e.recipe, e.file, e.action, e.sha256[:12]) for e in self.entries)
        return [Table("rehash", ("recipe", "patch file", "action", "sha256"), rows, self.message)]


def rehash(recipes: list[str], root: Path | None = None) -> RehashResult:
    """Rewrite, in place, the sha256 line of each [[patches]] entry with a `file` in
    the given recipe files to the patch file's current sha256; every other line
    (comments, order, formatting) stays. Every file is checked before any recipe is
    written: a missing patch file changes nothing."""
    plans: list[tuple[Path, str, list[str], list[RehashedEntry]]] = []
    for name in recipes:
        path = find_recipe(name, root)
        proj = path.parent.parent
        text = read_user_text(path, "recipe", RecipeError)
        lines = text.split("\n")
        done: list[RehashedEntry] = []
        for block in patch_blocks(lines):
            f = block.values.get("file")
            if f is None:
                continue
            p = proj / f
            if not p.is_file():
                raise PatchError(f"[[patches]] names {f}, which does not exist", file=path)
            new_sha = hashlib.sha256(p.read_bytes()).hexdigest()
            done.append(RehashedEntry(path.name, f, block.values.get("sha256", ""), new_sha))
            if block.values.get("sha256") != new_sha:
                set_key(lines, block, "sha256", new_sha)
        plans.append((path, text, lines, done))
    entries: list[RehashedEntry] = []
    for path, text, lines, done in plans:
        new_text = "\n".join(lines)
        if new_text != text:
            atomic_write_text(path, new_text)
        entries.extend(done)
    n = sum(e.action == "updated" for e in entries)
    return RehashResult(tuple(entries), f"{n} sha256 line(s) updated in {len(plans)} recipe(s); "
                                        f"{len(entries) - n} already right")


# ------------------------------------------------------------------ import


@dataclass(frozen=True)
class ImportedPatch:
    file: str
    sha256: str
    description: str
    files: tuple[str, ...]
    strip: int
    verdict: str | None  # against the target tree, when one is known
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "description": self.description, "files": list(self.files),
                "strip": self.strip, "verdict": self.verdict, "notes": list(self.notes)}


@dataclass(frozen=True)
class ImportResult:
    source_file: str
    form: str  # mbox series | git diff | plain diff | gzip+base64 ...
    patches: tuple[ImportedPatch, ...]
    recipe: Path | None
    message: str

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"source_file": self.source_file, "form": self.form, "patches": [p.to_dict() for p in self.patches],
                "recipe": str(self.recipe) if self.recipe else None, "message": self.message}

    def tables(self) -> list[Table]:
        rows = tuple((p.file, str(len(p.files)), str(p.strip), p.verdict or "-", "; ".join(p.notes)) for p in self.patches)
        return [Table(f"import {self.source_file} ({self.form})", ("patch", "files", "strip", "verdict", "notes"), rows, self.message)]


def detect_strip(paths: list[str], exists: Any = None) -> int:
    """The `-p` level: the component count that makes the paths exist in the target
    tree, else the one ending at `site-packages/`, else git's a/ b/ (1). As with
    `patch -p`, the leading '/' of an absolute path counts as one component."""
    cands = [p.split("\t")[0].strip().strip('"') for p in paths if p and p.split("\t")[0].strip() != "/dev/null"]
    if not cands:
        return 1
    absolute = 1 if cands[0].startswith("/") else 0
    if exists is not None:
        # all the names, else all the `---` names, else all the `+++` names (a diff
        # between a checkout and an installed copy has one side laid out like the tree)
        sides = [cands, cands[0::2], cands[1::2]] if len(cands) % 2 == 0 else [cands]
        for side in sides:
            if not side:
                continue
            for k in range(0, len([c for c in side[0].split("/") if c])):
                try:
                    if all(_cut(c, k) and exists(_cut(c, k)) for c in side):
                        return k + absolute
                except ValueError:  # a NUL in a name: the parser refuses it next
                    break
    for c in cands:
        parts = [x for x in c.split("/") if x]
        for marker in ("site-packages", "dist-packages"):
            if marker in parts:
                return parts.index(marker) + 1 + absolute
    return 1 if "/" in cands[0].lstrip("/") else 0


def _cut(path: str, k: int) -> str:
    parts = [x for x in path.split("/") if x]
    return "/".join(parts[k:]) if k < len(parts) else ""


def _raw_paths(text: str) -> list[str]:
    out = []
    for ln in text.split("\n"):
        if ln.startswith("--- ") or ln.startswith("+++ "):
            out.append(ln[4:])
    return out


def _tree_reader(tree: Path) -> Any:
    """Reads through the tree door: a path into git metadata or out of the tree
    through a link reads as absent."""
    door = Tree(tree)

    def read(rel: str) -> str | None:
        try:
            data = door.read(rel)
        except TreeWriteError:
            return None
        return None if data is None else data.decode("utf-8", "replace")

    return read


def import_patch(
    file: Path,
    into: Recipe | None = None,
    *,
    source: str = "vllm",
    version: str | None = None,
    dest: Path | None = None,
    tree: Path | None = None,
    split_per_file: bool = False,
    strip: int | None = None,
    workdir: Path | None = None,
) -> ImportResult:
    """Normalise a patch in the form it travels in, write it into
    patches/<source>/<version>/ (or `dest`), and append [[patches]] entries to `into`.

    The strip level is detected against `tree` (default: the recipe's applied workspace
    tree of `source`, when there is one)."""
    file = Path(file)
    if not file.is_file():
        raise PatchError("no such patch file", file=file)
    data = file.read_bytes()
    try:
        text, notes = decode_patch_bytes(data, file.name)
    except MalformedPatch as e:
        raise PatchError(str(e), file=file) from None
    parts = split_mbox(text)
    if into is not None:
        if source not in {s.name for s in into.sources}:
            raise RecipeError(f"recipe has no source {source!r}", file=into.path, key="sources")
        src = into.source(source)
        version = version or src.version or src.tag or (src.commit[:12] if src.commit else None)
        if tree is None:
            cand = (workdir or default_workdir(into)).resolve() / source
            tree = cand if cand.is_dir() else None
    if dest is None:
        root = into.root if into is not None else Path.cwd()
        dest = root / "patches" / source / (version or "unversioned")
    form = ("gzip+base64 " if "base64-decoded" in notes else "gzip " if "gunzipped" in notes else "")
    form += "mbox series" if len(parts) > 1 else ("git diff" if "diff --git " in text else "plain diff")
    exists = Tree(tree).exists if tree is not None else None
    stem = re.sub(r"(\.patch|\.diff)?(\.gz)?(\.b64)?$", "", file.name)
    outputs: list[tuple[str, str, ParsedPatch, int, list[str]]] = []  # (name, text, parsed, strip, notes)
    for n, part in enumerate(parts, 1):
        level = strip if strip is not None else detect_strip(_raw_paths(part), exists)
        try:
            parsed = parse_patch(part, level, notes if n == 1 else [])
            # which file each change is for (the existing one of two names), said in the notes
            parsed, repaired = resolve_paths(parsed, exists or (lambda _p: False))
        except MalformedPatch as e:
            raise PatchError((f"mail {n}: " if len(parts) > 1 else "") + str(e), file=file) from None
        parsed = ParsedPatch(parsed.header, parsed.description, parsed.files, (*parsed.notes, *repaired))
        header_text, _ = split_header(part)
        desc = parsed.description or (f"imported from {file.name}" + (f" (part {n})" if len(parts) > 1 else ""))
        base_name = slug(parsed.header.get("Subject", "") and desc) if len(parts) > 1 else stem
        pieces = [(fp,) for fp in parsed.files] if split_per_file else [tuple(parsed.files)]
        for fps in pieces:
            name = base_name if not split_per_file else f"{base_name}-{slug(fps[0].path.rsplit('/', 1)[-1].rsplit('.', 1)[0], 40)}"
            d = desc if not split_per_file else f"{desc} ({fps[0].path})"
            header = _import_header(parsed, d, file.name)
            try:
                body = "".join(render_file_patch(fp) for fp in fps)
            except MalformedPatch as e:
                raise PatchError((f"mail {n}: " if len(parts) > 1 else "") + str(e), file=file) from None
            sub = ParsedPatch(parsed.header, d, tuple(fps), parsed.notes)
            outputs.append((name, join_patch(header, body), sub, level, list(parsed.notes)))
    # unique file names
    used: dict[str, int] = {}
    written: list[ImportedPatch] = []
    appended: list[str] = []
    read = _tree_reader(tree) if tree is not None else None
    overlay: dict[str, str | None] = {}
    for name, body, parsed, level, pnotes in outputs:
        used[name] = used.get(name, 0) + 1
        fname = f"{name}.patch" if used[name] == 1 else f"{name}-{used[name]}.patch"
        path = dest / fname
        verdict = None
        if read is not None:
            def read_over(p: str) -> str | None:
                return overlay[p] if p in overlay else read(p)
            out = apply_parsed(parse_patch(body), read_over)
            verdict = out.verdict.value
            if out.verdict in (PatchVerdict.APPLIED, PatchVerdict.APPLIED_OFFSET):
                overlay.update(out.new_contents)
        atomic_write_text(path, body)
        sha = sha256_text(body)
        root = into.root if into is not None else Path.cwd()
        rel = _rel(path, root)
        written.append(ImportedPatch(rel, sha, parsed.description, tuple(fp.path for fp in parsed.files), level, verdict, tuple(pnotes)))
        if into is not None:
            appended.append(new_entry_text(rel, source, sha, parsed.description))
    if into is not None and appended:
        text_r = read_user_text(into.path, "recipe", RecipeError)
        atomic_write_text(into.path, append_entries(text_r, appended))
    msg = f"{len(written)} patch(es) written to {dest}"
    if into is not None:
        msg += f"; {len(appended)} entr{'y' if len(appended) == 1 else 'ies'} appended to {into.path.name}"
    return ImportResult(str(file), form, tuple(written), into.path if into is not None else None, msg)


def _import_header(parsed: ParsedPatch, description: str, origin_file: str) -> str:
    h = dict(parsed.header)
    out = [f"Description: {description}"]
    author = h.get("Author") or h.get("From")
    if author:
        out.append(f"Author: {author}")
    if h.get("Origin"):
        out.append(f"Origin: {h['Origin']}")
        out.append(f"X-Imported-From: {origin_file}")
    else:
        out.append(f"Origin: imported from {origin_file}")
    for k in ("Bug", "Forwarded", "Applied-Upstream", "Reviewed-By", "Signed-off-by"):
        if h.get(k):
            out.append(f"{k}: {h[k]}")
    out.append(f"Last-Update: {today()}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ snapshot


@dataclass(frozen=True)
class SnapshotResult:
    tree: Path
    against: str  # head | base
    base_commit: str
    files: tuple[str, ...]
    text: str
    output: Path | None
    message: str
    imported: ImportResult | None = None

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"tree": str(self.tree), "against": self.against, "base_commit": self.base_commit,
                "files": list(self.files), "output": str(self.output) if self.output else None,
                "message": self.message, "imported": self.imported.to_dict() if self.imported else None}

    def tables(self) -> list[Table]:
        rows = tuple((f,) for f in self.files)
        return [Table(f"snapshot of {self.tree} against {self.against} ({self.base_commit[:12]})", ("file",), rows, self.message)]


def snapshot(
    tree: Path,
    against: str = "head",
    output: Path | None = None,
    into: Recipe | None = None,
    source: str | None = None,
    split_per_file: bool = False,
) -> SnapshotResult:
    """A dirty source tree (a workspace or edit tree) as a patch against HEAD (the
    uncommitted changes) or against its pinned base (`stackbuild/base`: the whole
    series plus the uncommitted changes). Untracked files are included; the tree's
    own index is not touched."""
    tree = Path(tree).resolve()
    if not (tree / ".git").exists():
        raise StackbuildError("not a git tree (snapshot needs a workspace or edit tree)", file=tree)
    if against not in ("head", "base"):
        raise StackbuildError(f"--against must be head or base, got {against!r}")
    ref = "HEAD" if against == "head" else BASE_TAG
    if git_out(tree, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False).returncode != 0:
        raise StackbuildError(f"{ref} does not exist in this tree (not a stackbuild workspace?)", file=tree)
    base = run_git(tree, "rev-parse", f"{ref}^{{commit}}")
    with tempfile.TemporaryDirectory(prefix="stackbuild-snap-") as td:
        env = {"GIT_INDEX_FILE": str(Path(td) / "index")}

        def g(*args: str) -> str:
            r = git_process(tree, *args, env=env)
            if r.returncode != 0:
                raise StackbuildError(f"git {' '.join(args[:2])} failed: {r.stderr.strip()}", file=tree)
            return r.stdout
        g("read-tree", "HEAD")
        g("add", "-A")
        diff = g("diff", "--cached", "--no-color", "--no-ext-diff", "--no-renames", "--full-index", base)
        files = tuple(x for x in g("diff", "--cached", "--name-only", "--no-renames", base).split("\n") if x)
    if not diff.strip():
        return SnapshotResult(tree, against, base, (), "", None, f"no changes against {ref}")
    header = (f"Description: snapshot of {tree.name} against {ref}\n"
              f"Origin: stackbuild snapshot of {tree} against {ref} ({base[:12]})\n"
              f"Forwarded: no\nLast-Update: {today()}\n")
    text = join_patch(header, diff)
    imported = None
    out_path = output
    if into is not None:
        with tempfile.TemporaryDirectory(prefix="stackbuild-snap-") as td:
            tmpf = Path(td) / f"snapshot-{tree.name}.patch"
            tmpf.write_text(text, encoding="utf-8")
            imported = import_patch(tmpf, into, source=source or tree.name, tree=None, split_per_file=split_per_file, strip=1)
        out_path = None
    elif output is not None:
        atomic_write_text(output, text)
    msg = f"{len(files)} file(s) differ from {ref}"
    if out_path:
        msg += f"; written to {out_path}"
    if imported:
        msg += f"; {imported.message}"
    return SnapshotResult(tree, against, base, files, text, out_path, msg, imported)
