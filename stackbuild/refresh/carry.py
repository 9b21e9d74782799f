"""Carrying a patch onto the new base, one at a time, in the refresh worktree
(the target release itself comes from target.py; the evidence from verdict.py).

The series, applied to its own (old) base, is cloned into work/<recipe>.refresh/<source>;
the new release is a new root commit there (tag `stackbuild/base`; the old base keeps
`stackbuild/old-base`): for a pypi release or a local tree, the cache's base commit that
`apply` clones, fetched (imported first if no run has yet). Each patch's commits are
cherry-picked onto it: a three-way merge against the old base, so context that moved or
changed around a patch does not stop it. The order in which a verdict is decided:

1. already upstream, proven: the same `git patch-id` as an upstream commit (git
   sources), the reverse applies, the same code in substance (verdict.normalised_upstream),
   the three-way merge changes nothing, or the added lines are present;
2. a file it changes is gone: the rest of the patch is applied when it applies, and
   the gone files' code is looked for by content (verdict.rank_moved): needs porting
   (moved: where, how similar), conflict (some files gone, not found), obsolete (every
   file gone and its code found nowhere: nothing replaced it);
3. clean / offset / merged (3-way);
4. when it does not apply: possibly upstream when the names it adds (absent from the
   whole old release) are in the new one (verdict.possibly_upstream), or upstream code
   new or changed between the releases does what it adds (verdict.same_behaviour_upstream);
   needs porting when a function it changes moved to another file, or upstream added
   code like the patch's in the function it changes; else conflict:
   the cherry-pick is left in progress for `refresh --continue` (or recorded and
   skipped in a matrix run).
Backports: already upstream when the new base ships identical files, or is at or past
the backport's release; otherwise carried (replacing the new base's older version).

The refresh's state is a JSON file, so that --continue picks it up in another process.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from stackbuild import localbase
from stackbuild.cache import atomic_write_text
from stackbuild.errors import StackbuildError
from stackbuild.gitrun import read_blobs
from stackbuild.patchqueue import commit_trailers, git_out
from stackbuild.recipe import PatchKind, Recipe, SourceKind
from stackbuild.refresh import verdict as V
from stackbuild.refresh.results import Evidence, RefreshedPatch, RefreshVerdict
from stackbuild.refresh.target import Progress, Target, materialise_new, new_base_repo
from stackbuild.series import MalformedPatch, ParsedPatch, PatchVerdict, apply_parsed, parse_patch
from stackbuild.sources.archive import read_members
from stackbuild.sources.git import GitCheckout, fetch_git
from stackbuild.sources.pypi import fetch_sdist
from stackbuild.treewrite import Tree, TreeWriteError
from stackbuild.workspace import BASE_TAG, run_git

OLD_BASE_TAG = "stackbuild/old-base"
STATE_FILE = "refresh-state.json"


def upstream_patch_ids(old: GitCheckout | None, new_commit: str | None) -> dict[str, str]:
    if old is None or new_commit is None:
        return {}
    log = git_out(old.repo, "log", "-p", "--no-merges", "--no-color", "--full-index", f"{old.commit}..{new_commit}", check=False)
    if log.returncode != 0 or not log.stdout:
        return {}
    ids = git_out(old.repo, "patch-id", "--stable", stdin=log.stdout).stdout
    out: dict[str, str] = {}
    for ln in ids.split("\n"):
        parts = ln.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def write_tree_file(tree: Path, rel: str, data: bytes) -> None:
    """The one place a refresh writes a file into its worktree (backports), through the
    one guarded writer into a tree (no .git, no links out, no parents made through links)."""
    try:
        Tree(tree).write(rel, data)
    except TreeWriteError as e:
        raise StackbuildError(f"refresh cannot write {rel}: {e}", file=tree) from None


_WORD = re.compile(r"\w+")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ERE_SPECIAL = re.compile(r"[.\[\]()*+?{}|^$\\]")


def series_names(tree: Path, series: list[list[str]]) -> list[str]:
    """Every distinctive name the patches add (verdict.added_names of each patch's
    combined diff, as `Carrier._entry` takes it), in order; `series` holds each patch's
    commits."""
    seen: dict[str, None] = {}
    for commits in series:
        if not commits:
            continue
        diff = git_out(tree, "diff", "--no-color", "--no-renames", "--full-index", f"{commits[0]}^", commits[-1]).stdout
        try:
            parsed = parse_patch(diff)
        except MalformedPatch:
            continue
        for n in V.added_names(parsed)[:200]:
            seen.setdefault(n, None)
    return list(seen)


def names_in(tree: Path, rev: str, names: list[str]) -> set[str]:
    """Which of `names` occur as whole words in a text file at `rev` (one git grep)."""
    if not names:
        return set()
    out = git_out(tree, "grep", "-h", "-o", "-w", "-I", "-E", "-e", names_pattern(names), rev, check=False).stdout
    return {ln.rsplit(":", 1)[-1] for ln in out.split("\n") if ln}


def names_pattern(names: list[str]) -> str:
    """One extended regex for `git grep -w -E`: as fast for 100 names as `-F -e` with
    one (`-w -F` with many patterns takes ten times as long over a vLLM release)."""
    return "(" + "|".join(n if _NAME.fullmatch(n) else _ERE_SPECIAL.sub(r"\\\g<0>", n) for n in names) + ")"


def old_base_names(recipe: Recipe, source: str, ws_tree: Path) -> dict[str, list[str]]:
    """The names the series adds and which of them its own (old) base has, read once
    from the applied workspace: a matrix gives it to every release (state key
    "old_base_names")."""
    by_name = _old_commits(ws_tree, BASE_TAG, "HEAD")
    series = series_names(ws_tree, [by_name.get(p.name, []) for p in recipe.patches
                                    if p.source == source and p.kind is not PatchKind.BACKPORT])
    return {"checked": series, "found": sorted(names_in(ws_tree, BASE_TAG, series))}


# ------------------------------------------------------------------ the refresh worktree


class Carrier:
    """One refresh run in one refresh directory."""

    def __init__(self, recipe: Recipe, state: dict[str, Any], rdir: Path, progress: Progress):
        self.recipe = recipe
        self.st = state
        self.rdir = rdir
        self.tree = rdir / state["source"]
        self.progress = progress
        self._sig: dict[str, frozenset[str]] | None = None
        self._shown: dict[tuple[str, str], str | None] = {}
        self._additions: dict[str, str] = {}
        self._changed: frozenset[str] | None = None
        self._behaviour_memo: dict[str, list[tuple[str, int, bool, frozenset[str]]]] = {}
        self._series: list[str] = []  # every name the series adds
        self._old_checked: set[str] | None = None  # names looked up at the old base
        self._old_found: set[str] = set()  # ... and found there
        self._new_checked: set[str] = set()  # names looked up at the new base
        self._new_lines: list[tuple[str, int, str]] = []  # ... and the lines holding them

    # -- state and git
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

    def show(self, rev: str, rel: str) -> str | None:
        """A file at `rev`. Read once per run for a commit or tag (the evidence steps ask
        for the same files before and after a patch in turn); HEAD moves, so it is
        read each time."""
        key = (rev, rel)
        if key in self._shown:
            return self._shown[key]
        r = self.git("show", f"{rev}:{rel}", check=False)
        text = r.stdout if r.returncode == 0 else None
        if rev != "HEAD":
            self._shown[key] = text
        return text

    # -- the series
    def run(self) -> None:
        entries = self.st["entries"]
        while self.st["position"] < len(entries):
            i = self.st["position"]
            e = entries[i]
            self.progress(f"[{i + 1}/{len(entries)}] {e['name']}")
            if not self._entry(e, e["commits"]):
                self.save()
                return
            self.st["position"] = i + 1
            self.save()

    def _record(self, e: dict[str, Any], verdict: RefreshVerdict, detail: str = "", evidence: Evidence | None = None,
                commits: tuple[str, ...] = (), hints: tuple[str, ...] = ()) -> bool:
        self.results.append(RefreshedPatch(e["name"], e["kind"], verdict, detail, evidence, e.get("sha256"),
                                           None, None, commits, hints).to_dict())
        return True

    def _entry(self, e: dict[str, Any], commits: list[str]) -> bool:
        if e["kind"] == PatchKind.BACKPORT.value:
            return self._backport(e)
        if not commits:
            return self._record(e, RefreshVerdict.ALREADY_UPSTREAM, e.get("old_detail") or "", Evidence.AT_OLD_BASE)
        first, last = commits[0], commits[-1]
        diff = self.git("diff", "--no-color", "--no-renames", "--full-index", f"{first}^", last).stdout
        parsed: ParsedPatch | None
        try:
            parsed = parse_patch(diff)
        except MalformedPatch as ex:
            parsed = None
            self.progress(f"{e['name']}: combined diff unparsable ({ex}); three-way only")
        pre = self.git("rev-parse", "HEAD").stdout.strip()
        ids: dict[str, str] = self.st.get("upstream_patch_ids") or {}
        if ids:
            pid = self.git("patch-id", "--stable", stdin=diff).stdout.split()
            if pid and pid[0] in ids:
                return self._record(e, RefreshVerdict.ALREADY_UPSTREAM, f"upstream commit {ids[pid[0]][:12]}", Evidence.PATCH_ID)
        applies = None
        gone: list[str] = []
        if parsed is not None:
            gone = [fp.old_path for fp in parsed.files if fp.old_path and self.read(fp.old_path) is None]
            if not gone:
                out = apply_parsed(parsed, self.read)
                if out.verdict is PatchVerdict.ALREADY_APPLIED:
                    return self._record(e, RefreshVerdict.ALREADY_UPSTREAM, "the reverse applies at the new base",
                                        Evidence.REVERSE_APPLIES)
                applies = {PatchVerdict.APPLIED: RefreshVerdict.CLEAN, PatchVerdict.APPLIED_OFFSET: RefreshVerdict.OFFSET,
                           PatchVerdict.APPLIED_FUZZ: RefreshVerdict.OFFSET}.get(out.verdict)
            proof = self._normalised(parsed, first, last)
            if proof is not None:
                return self._record(e, RefreshVerdict.ALREADY_UPSTREAM, proof, Evidence.NORMALISED)
            if gone:
                return self._some_files_gone(e, parsed, gone, first, last, pre)
        for n, c in enumerate(commits):
            r = self.git("cherry-pick", "--keep-redundant-commits", c, check=False)
            if r.returncode == 0:
                continue
            unmerged = self.git("diff", "--name-only", "--diff-filter=U").stdout.split()
            detail = f"conflict in {', '.join(unmerged) or 'the merge'}"
            if parsed is not None:
                lines = V.lines_evidence(parsed, lambda p: self.show("HEAD", p))
                if lines is not None:
                    self._drop_to(pre)
                    return self._record(e, RefreshVerdict.ALREADY_UPSTREAM, lines, Evidence.LINES_PRESENT)
                hint = self._possibly_upstream(parsed)
                if hint is not None:
                    self._drop_to(pre)
                    return self._record(e, RefreshVerdict.POSSIBLY_UPSTREAM, f"{hint.describe()}; it does not apply: {detail}",
                                        Evidence.NAMES_FOUND, hints=(f"{hint.path}:{hint.line}",))
                same = self._same_behaviour(parsed, first, last)
                if same is not None:
                    self._drop_to(pre)
                    return self._record(e, RefreshVerdict.POSSIBLY_UPSTREAM, f"{same.describe()}; it does not apply: {detail}",
                                        Evidence.SAME_BEHAVIOUR, hints=(f"{same.path}:{same.line}",))
                moved = self._moved_functions(parsed, first, last)
                if moved:
                    self._drop_to(pre)
                    return self._record(e, RefreshVerdict.NEEDS_PORTING, f"{'; '.join(moved)}: port the patch there; "
                                        f"it does not apply: {detail}", Evidence.FUNCTION_MOVED,
                                        hints=tuple(m.rpartition(" ")[2] for m in moved))
                similar = self._similar_upstream(parsed, first, last)
                if similar is not None:
                    self._drop_to(pre)
                    return self._record(e, RefreshVerdict.NEEDS_PORTING, f"{similar.describe()}; it does not apply: {detail}",
                                        Evidence.SIMILAR_CODE, hints=(f"{similar.path}:{similar.line}",))
            if not self.st["stop_on_conflict"]:
                self._drop_to(pre)
                return self._record(e, RefreshVerdict.CONFLICT, detail + " (skipped; later patches tried without it)")
            self.st["conflict"] = {"entry": e["name"], "pre": pre, "pending": commits[n + 1:], "detail": detail, "commit": c}
            return False
        if self.git("rev-parse", "HEAD^{tree}").stdout.strip() == self.git("rev-parse", f"{pre}^{{tree}}").stdout.strip():
            self._drop_to(pre)
            return self._record(e, RefreshVerdict.ALREADY_UPSTREAM, "cherry-picking it leaves the new base unchanged", Evidence.EMPTY_MERGE)
        new_commits = tuple(self.git("rev-list", "--reverse", f"{pre}..HEAD").stdout.split())
        verdict = applies or RefreshVerdict.MERGED
        detail = {RefreshVerdict.CLEAN: "", RefreshVerdict.OFFSET: "hunks moved; regenerated",
                  RefreshVerdict.MERGED: "context changed upstream; three-way merge; regenerated"}[verdict]
        return self._record(e, verdict, detail, None, new_commits)

    def _drop_to(self, pre: str) -> None:
        self.git("cherry-pick", "--abort", check=False)
        self.git("reset", "-q", "--hard", pre)

    # -- evidence
    def _normalised(self, parsed: ParsedPatch, first: str, last: str) -> str | None:
        """The change is at the new base in substance (every file of it)."""
        notes: list[str] = []
        names: list[str] = []
        for fp in parsed.files:
            if not fp.path.endswith(".py"):
                return None
            pre = self.show(f"{first}^", fp.old_path) if fp.old_path else ""
            post = self.show(last, fp.new_path) if fp.new_path else ""
            new = self.show("HEAD", fp.path)
            res = V.normalised_upstream(pre, post, new, fp, self._functions_elsewhere(fp.path))
            if not res or not res[0]:
                return None
            notes.extend(res[1])
            names.append(fp.path)
        return (f"the code it changes in {', '.join(names)} is at the new base in substance (functions and statements "
                "compared as ASTs, without comments, docstrings or formatting)" + (f"; {'; '.join(notes)}" if notes else ""))

    def _functions_elsewhere(self, path: str) -> V.FindFunction:
        def find(qualname: str) -> Iterator[tuple[str, str]]:
            simple = qualname.rsplit(".", 1)[-1]
            r = self.git("grep", "-l", "-E", rf"def {re.escape(simple)}\b", "HEAD", "--", "*.py", check=False)
            for ln in r.stdout.split("\n")[:30]:
                other = ln.partition(":")[2]
                if not other or other == path:
                    continue
                norm = V.function_index(self.show("HEAD", other) or "").get(qualname)
                if norm is not None:
                    yield other, norm
        return find

    def _possibly_upstream(self, parsed: ParsedPatch) -> V.UpstreamHint | None:
        return self._names_upstream(parsed) or V.file_novelty(
            parsed, lambda p: self.show(OLD_BASE_TAG, p), lambda p: self.show(BASE_TAG, p))

    def _same_behaviour(self, parsed: ParsedPatch, first: str, last: str) -> V.SameBehaviour | None:
        """Upstream code, new or changed between the two releases, that does what the
        patch adds (verdict.same_behaviour_upstream): looked for in the Python files
        under the patch's top folders (two levels: `vllm/model_executor`) where upstream
        added lines naming a third of the patch's specific words (two at least)."""
        wanted: set[str] = set()
        folders: set[str] = set()
        for fp in parsed.files:
            if not fp.path.endswith(".py"):
                continue
            pre = self.show(f"{first}^", fp.old_path) if fp.old_path else None
            post = self.show(last, fp.new_path) if fp.new_path else None
            wanted |= V.added_behaviour(pre, post, fp)
            folders.add("/".join(fp.path.split("/")[:2]) + "/" if fp.path.count("/") >= 2 else fp.path.split("/")[0] + "/")
        specific = {f for f in wanted if V.is_specific(f)}
        words = {V.feature_word(f).rpartition(".")[2] for f in specific}
        if len(wanted) < 2 or not words:
            return None
        need = max(2, -(-len(words) // 3)) if len(words) > 1 else 1
        pats = [a for w in sorted(words) for a in ("-e", w)]
        named = self.git("grep", "-l", "-F", "-I", *pats, BASE_TAG, "--", *sorted(folders), check=False).stdout
        changed = self._changed_python()
        near = sorted({p for ln in named.split("\n") if (p := ln.partition(":")[2]) in changed})
        paths = [p for p, text in self._upstream_additions(near).items() if sum(w in text for w in words) >= need]
        self._behaviours(paths)
        candidates = [(p, q, line, is_new, feats) for p in paths for q, line, is_new, feats in self._behaviour_memo[p]]
        if not candidates:
            return None
        by_word = {f: V.feature_word(f) for f in specific}
        at_old = self._at_old_base(sorted(set(by_word.values())))
        novel = frozenset(f for f, w in by_word.items() if w not in at_old)
        return V.same_behaviour_upstream(frozenset(wanted), novel, candidates)

    def _behaviours(self, paths: list[str]) -> None:
        """verdict.function_behaviours of each path between the releases, read and
        parsed once per refresh."""
        todo = [p for p in paths if p not in self._behaviour_memo]
        if not todo:
            return
        new = read_blobs(self.tree, [f"{BASE_TAG}:{p}" for p in todo])
        old = read_blobs(self.tree, [f"{OLD_BASE_TAG}:{p}" for p in todo])
        for p in todo:
            n, o = new.get(f"{BASE_TAG}:{p}"), old.get(f"{OLD_BASE_TAG}:{p}")
            self._behaviour_memo[p] = V.function_behaviours(
                n.decode("utf-8", "replace") if n is not None else None, o.decode("utf-8", "replace") if o is not None else None)

    def _changed_python(self) -> frozenset[str]:
        """The Python files that differ between the two releases (read once per refresh)."""
        if self._changed is None:
            out = self.git("diff", "--name-only", "--no-renames", "-z", OLD_BASE_TAG, BASE_TAG, "--", "*.py").stdout
            self._changed = frozenset(p for p in out.split("\0") if p)
        return self._changed

    def _upstream_additions(self, paths: list[str]) -> dict[str, str]:
        """Each of `paths` -> the lines upstream added to it between the two releases
        (one `git diff` for those not read yet in this refresh)."""
        todo = [p for p in paths if p not in self._additions]
        if todo:
            got: dict[str, list[str]] = {p: [] for p in todo}
            current: list[str] | None = None
            diff = self.git("diff", "-U0", "--no-color", "--no-renames", "--no-ext-diff", OLD_BASE_TAG, BASE_TAG,
                            "--", *todo).stdout
            for ln in diff.split("\n"):
                if ln.startswith("+++ "):
                    current = got.get(ln[4:].removeprefix("b/"))
                elif current is not None and ln.startswith("+"):
                    current.append(ln[1:])
            self._additions.update((p, "\n".join(v)) for p, v in got.items())
        return {p: self._additions[p] for p in paths}

    def _moved_functions(self, parsed: ParsedPatch, first: str, last: str) -> list[str]:
        """"Q moved to PATH:LINE" for each function the patch changes that its file no
        longer has at the new base while another file has a function of the same
        qualified name (upstream moved it; `_functions_elsewhere` finds it)."""
        out: list[str] = []
        for fp in parsed.files:
            if not (fp.path.endswith(".py") and fp.old_path and fp.new_path):
                continue
            here = self.show(BASE_TAG, fp.path)
            if here is None:
                continue  # a file that is gone: _some_files_gone's business
            names = V.changed_functions(self.show(f"{first}^", fp.old_path), self.show(last, fp.new_path), fp)
            have = V.function_index(here)
            for q in names:
                if q in have:
                    continue
                for other, _norm in self._functions_elsewhere(fp.path)(q):
                    out.append(f"{q} moved from {fp.path} to {other}:{V.def_line(self.show(BASE_TAG, other) or '', q)}")
                    break
        return out

    def _similar_upstream(self, parsed: ParsedPatch, first: str, last: str) -> V.SimilarCode | None:
        found = [V.similar_upstream_code(fp.path, self.show(f"{first}^", fp.path), self.show(last, fp.path),
                                         self.show(OLD_BASE_TAG, fp.path), self.show(BASE_TAG, fp.path), fp)
                 for fp in parsed.files if fp.path.endswith(".py") and fp.old_path and fp.new_path]
        return max((f for f in found if f is not None), key=lambda f: f.similarity, default=None)

    def _names_upstream(self, parsed: ParsedPatch) -> V.UpstreamHint | None:
        names = V.added_names(parsed)[:200]
        if not names:
            return None
        at_old = self._at_old_base(names)
        new_names = [n for n in names if n not in at_old]
        if not new_names:
            return None
        wanted = set(new_names)
        words_only = all(_NAME.fullmatch(n) for n in new_names)
        hits: dict[str, list[tuple[str, int]]] = {}
        for path, line, text in self._at_new_base(new_names):
            if words_only and wanted.isdisjoint(_WORD.findall(text)):
                continue  # a quick no: none of the names is a word of the line
            for n in new_names:
                if re.search(rf"\b{re.escape(n)}\b", text):
                    hits.setdefault(n, []).append((path, line))
        return V.possibly_upstream(new_names, hits, frozenset(fp.path for fp in parsed.files))

    # Looking names up costs a pass over every file of a release (about 0.6 s for vLLM):
    # the first lookup takes every name the series adds, so a run makes one pass per
    # base, not one per patch; a matrix reads the old base's once for every release
    # (the state's "old_base_names", from `old_base_names`).
    def _at_old_base(self, names: list[str]) -> set[str]:
        """Which of `names` the old base has anywhere (as whole words)."""
        if self._old_checked is None:
            known = self.st.get("old_base_names")
            if known is None:
                series = series_names(self.tree, [e["commits"] for e in self.st["entries"]
                                                  if e["kind"] != PatchKind.BACKPORT.value])
                known = {"checked": series, "found": sorted(names_in(self.tree, OLD_BASE_TAG, series))}
                self.st["old_base_names"] = known
            self._series = list(known["checked"])
            self._old_checked = set(known["checked"])
            self._old_found = set(known["found"])
        rest = [n for n in names if n not in self._old_checked]
        if rest:
            self._old_found |= names_in(self.tree, OLD_BASE_TAG, rest)
            self._old_checked.update(rest)
        return self._old_found

    def _at_new_base(self, names: list[str]) -> list[tuple[str, int, str]]:
        """(path, line, text) of the new base's lines holding any of `names` (and
        possibly other names looked up before)."""
        rest = [n for n in names if n not in self._new_checked]
        if rest:
            if not self._new_checked:
                at_old = self._at_old_base([])
                rest = list(dict.fromkeys(rest + [n for n in self._series if n not in at_old]))
            out = self.git("grep", "-n", "-w", "-I", "-E", "-e", names_pattern(rest), BASE_TAG, check=False).stdout
            merged = bool(self._new_lines)
            for ln in out.split("\n"):
                parts = ln.split(":", 3)
                if len(parts) == 4 and parts[2].isdigit():
                    self._new_lines.append((parts[1], int(parts[2]), parts[3]))
            if merged:
                self._new_lines = sorted(set(self._new_lines))
            self._new_checked.update(rest)
        return self._new_lines

    def _signatures(self) -> dict[str, frozenset[str]]:
        """Significant lines of every text file at the new base (read once per run)."""
        if self._sig is None:
            self._sig = {}
            for rel in self.git("ls-tree", "-r", "--name-only", "-z", BASE_TAG).stdout.split("\0"):
                p = self.tree / rel
                if rel and p.suffix in (".py", ".pyi", ".cpp", ".cu", ".h", ".hpp", ".c", ".txt", ".md", ".toml", ".cmake"):
                    try:
                        self._sig[rel] = V.significant_lines(p.read_bytes().decode("utf-8", "replace"))
                    except OSError:
                        continue
        return self._sig

    # -- some files gone
    def _some_files_gone(self, e: dict[str, Any], parsed: ParsedPatch, gone: list[str], first: str, last: str,
                         pre: str) -> bool:
        parts: list[str] = []
        hints: list[str] = []
        moved = 0
        sigs = self._signatures()
        for fp in parsed.files:
            if fp.old_path not in gone:
                continue
            old_text = self.show(f"{first}^", fp.old_path) or ""
            suffix = Path(fp.old_path).suffix
            ranked = V.rank_moved(old_text, fp, ((p, s) for p, s in sigs.items() if Path(p).suffix == suffix))
            best = ranked[0] if ranked else None
            hints.extend(f"{fp.old_path} -> {c.describe()}" for c in ranked)
            if V.is_moved(best):
                assert best is not None
                moved += 1
                parts.append(f"{fp.old_path} is gone; its code moved to {best.describe()}")
            else:
                where = f" (best match {best.describe()})" if best else ""
                parts.append(f"{fp.old_path} is gone and no file at the new base holds most of its code{where}")
        present = [fp.path for fp in parsed.files if fp.old_path not in gone]
        commits: tuple[str, ...] = ()
        if present:
            sub = self.git("diff", "--no-color", "--no-renames", "--full-index", f"{first}^", last, "--", *present).stdout
            r = self.git("apply", "-3", "--index", "--whitespace=nowarn", check=False, stdin=sub)
            if r.returncode == 0:
                msg = self.git("log", "-1", "--format=%B", first).stdout
                self.git("commit", "-q", "--no-verify", "--allow-empty", "-m", msg)
                commits = tuple(self.git("rev-list", "--reverse", f"{pre}..HEAD").stdout.split())
                parts.append(f"the rest applied ({', '.join(present)}; commit {commits[-1][:12]} in the refresh worktree)")
            else:
                self._drop_to(pre)
                unmerged = [ln for ln in r.stderr.split("\n") if ln.startswith(("error:", "U "))][:3]
                parts.append(f"the rest ({', '.join(present)}) does not apply either: {'; '.join(unmerged) or 'conflict'}")
        hint = self._possibly_upstream(parsed)
        detail = "; ".join(parts)
        if hint is not None:
            return self._record(e, RefreshVerdict.POSSIBLY_UPSTREAM, f"{hint.describe()}; {detail}", Evidence.NAMES_FOUND,
                                commits, (f"{hint.path}:{hint.line}", *hints))
        same = self._same_behaviour(parsed, first, last)
        if same is not None:
            return self._record(e, RefreshVerdict.POSSIBLY_UPSTREAM, f"{same.describe()}; {detail}", Evidence.SAME_BEHAVIOUR,
                                commits, (f"{same.path}:{same.line}", *hints))
        if moved:
            return self._record(e, RefreshVerdict.NEEDS_PORTING, detail, Evidence.FILE_MOVED, commits, tuple(hints))
        if present:
            return self._record(e, RefreshVerdict.CONFLICT, detail, Evidence.FILE_GONE, commits, tuple(hints))
        return self._record(e, RefreshVerdict.OBSOLETE, f"{detail}: the changed code is gone and nothing replaced it",
                            Evidence.FILE_GONE, commits, tuple(hints))

    # -- backports
    def _backport(self, e: dict[str, Any]) -> bool:
        files: list[str] = e["files"]
        have = {f: (self.tree / f).read_bytes() for f in files if (self.tree / f).is_file()}
        theirs = read_members(fetch_sdist(e["release"], e["sha256"], self.progress), files)
        if len(have) == len(files):
            same = [f for f in files if theirs[f] == have[f]]
            if len(same) == len(files):
                return self._record(e, RefreshVerdict.ALREADY_UPSTREAM,
                                    f"the new base ships {', '.join(files)} identical to {e['release']}'s", Evidence.IDENTICAL_FILES)
            newer = _at_or_past(self.st.get("new_version"), e["release"])
            if newer:
                return self._record(e, RefreshVerdict.ALREADY_UPSTREAM,
                                    f"the new base ({self.st['new']}) is at or past {e['release']} and ships its own "
                                    f"{', '.join(files)}", Evidence.NEWER_BASE)
            if newer is None:  # no order between the two: a person decides which version to keep
                differ = [f for f in files if f not in same]
                return self._record(e, RefreshVerdict.CONFLICT,
                                    f"the new base ships its own {', '.join(differ)}, different from {e['release']}'s; "
                                    "keep the backport or drop it", Evidence.DIFFERENT_FILES)
        pre = self.git("rev-parse", "HEAD").stdout.strip()
        for f in files:
            write_tree_file(self.tree, f, theirs[f])
        self.git("add", "-A", "-f", "--", *files)
        self.git("commit", "-q", "--no-verify", "--allow-empty", "-m",
                 f"{e.get('description') or 'backport'}\n\nBackport of {', '.join(files)} from {e['release']}\nstackbuild-patch: {e['name']}\n")
        shipped = [f for f in files if f in have]
        detail = f"carried: {len(files)} file(s) from {e['release']}"
        if shipped:
            detail += f"; replaces the new base's older {', '.join(shipped)}"
        commits = tuple(self.git("rev-list", "--reverse", f"{pre}..HEAD").stdout.split())
        return self._record(e, RefreshVerdict.CLEAN, detail, None, commits)

    # -- continue
    def resume(self) -> None:
        c = self.st.get("conflict")
        if not c:
            raise StackbuildError("no conflict in progress", file=self.rdir)
        changed = self.git("diff", "--name-only", "HEAD").stdout.split()
        marked = [f for f in changed if (self.tree / f).is_file()
                  and re.search(r"^(<{7}|>{7}) ", (self.tree / f).read_text("utf-8", "replace"), re.M)]
        if marked:
            raise StackbuildError(f"conflict markers remain in {', '.join(marked)}; edit them away first", file=self.tree)
        left_out = self._stage_resolution(c["commit"])
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
        detail = f"{c['detail']}; resolved by hand; regenerated"
        if left_out:
            shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
            detail += f"; left out (untracked, not files of the patch): {shown}"
        self._record(e, RefreshVerdict.RESOLVED, detail, None, new_commits)
        self._next()

    def _stage_resolution(self, commit: str) -> list[str]:
        """Stage the tracked changes and the files the patch is about; never untracked
        build products (__pycache__, *.pyc, ...). Returns what was left out."""
        self.git("add", "-u")
        ours = set(self.git("diff-tree", "--no-commit-id", "--name-only", "-r", "--no-renames", commit).stdout.split("\n")) - {""}
        untracked = [f for f in self.git("ls-files", "--others", "-z").stdout.split("\0") if f]
        add = [f for f in untracked if f in ours]
        if add:
            self.git("add", "-f", "--", *add)
        return [f for f in untracked if f not in ours]

    def _next(self) -> None:
        self.st["conflict"] = None
        self.st["position"] += 1
        self.save()
        self.run()


def _at_or_past(new_version: str | None, release: str) -> bool | None:
    """Whether the new base's version is at or past a backport's release; None when
    they cannot be ordered (a git ref or a local tree)."""
    try:
        rel = Version(next(iter(Requirement(release).specifier)).version)
        return Version(new_version or "") >= rel
    except (InvalidVersion, StopIteration):
        return None


# ------------------------------------------------------------------ setting up


def _old_commits(tree: Path, base: str = OLD_BASE_TAG, head: str = "old-series") -> dict[str, list[str]]:
    out = run_git(tree, "log", "--reverse", "--format=%H%x00%B%x01", f"{base}..{head}")
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


def _fetch_base(tree: Path, base: Path) -> Any:
    # the pack protocol, as workspace._clone_base: every object read and hashed, nothing
    # hard-linked to the cache
    return git_out(tree, "fetch", "-q", "--no-tags", "--no-write-fetch-head", str(base),
                   f"+refs/heads/{localbase.BRANCH}:refs/heads/stackbuild", check=False)


def _new_base(recipe: Recipe, target: Target, tree: Path, progress: Progress) -> str | None:
    """The new release as the root commit of branch `stackbuild` in the refresh
    worktree, checked out; the upstream commit for git sources. A pypi release or a
    local tree comes from the cache's base repository (target.new_base_repo), so a
    release already imported costs a fetch and a checkout, not an extraction."""
    base = new_base_repo(recipe, target, progress)
    if base is not None:
        r = _fetch_base(tree, base)
        if r.returncode != 0:
            progress(f"the cached base of {target.label_new} is damaged ({r.stderr.strip()[-200:]}); importing it again")
            base = new_base_repo(recipe, target, progress, rebuild=True)
            assert base is not None
            r = _fetch_base(tree, base)
            if r.returncode != 0:
                raise StackbuildError(f"git fetch of the freshly imported base failed: {r.stderr.strip()[-300:]}", file=base)
        run_git(tree, "checkout", "-q", "-f", "stackbuild")
        return None
    tmp = Path(tempfile.mkdtemp(prefix=f".{tree.name}.new-", dir=tree.parent))
    tmp.rmdir()
    new_commit = materialise_new(target, tmp)
    for child in tmp.iterdir():
        os.replace(child, tree / child.name)
    tmp.rmdir()
    run_git(tree, "symbolic-ref", "HEAD", "refs/heads/stackbuild")
    run_git(tree, "add", "-A", "-f")
    run_git(tree, "commit", "-q", "--no-verify", "-m", f"base: {target.label_new}")
    return new_commit


def prepare(recipe: Recipe, target: Target, rdir: Path, ws_tree: Path, ws_manifest: Any,
            stop_on_conflict: bool, progress: Progress, old_names: dict[str, list[str]] | None = None) -> Carrier:
    """The refresh worktree in `rdir`, and the carrier that runs the series there.
    `old_names`: `old_base_names` when the caller read them once for several runs."""
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
    new_commit = _new_base(recipe, target, tree, progress)
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
        "new_version": target.new_version, "new_sha256": target.new_source.sha256, "new_src": target.new_src_state(),
        "entries": entries, "position": 0, "results": [], "conflict": None, "state": "running",
        "stop_on_conflict": stop_on_conflict, "upstream_patch_ids": upstream_patch_ids(old_co, new_commit),
    }
    if old_names is not None:
        state["old_base_names"] = old_names
    carrier = Carrier(recipe, state, rdir, progress)
    carrier.save()
    return carrier
