"""Deciding a verdict: the evidence a refresh weighs beyond "does it apply".

Pure functions over file texts and a tree index; no git, no writes.

- `normalised_upstream`: proof that upstream already has a change in substance. The
  Python units a patch touches (whole functions; module- or class-level statements)
  are compared, as ASTs with docstrings dropped (so comments, docstrings and formatting
  do not count), between our patched file and the new release; a function upstream
  moved to another file is looked up there.
- `rank_moved`: where the code of a file that is gone at the new base went, ranked by
  content similarity (not by file name), with the figures.
- `added_names` / `possibly_upstream`: the names a patch introduces (identifiers and
  UPPER_CASE string constants absent from the whole old release) searched in the new
  release: evidence for a person to check, never a proof.
- `lines_evidence`: every added line present at the new base (or all but one, in place).
"""

from __future__ import annotations

import ast
import functools
import keyword
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from stackbuild.series import FilePatch, ParsedPatch

_UNIT_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)


# ------------------------------------------------------------------ normalised comparison


def _strip_docstrings(node: ast.AST) -> ast.AST:
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(n, (ast.Module, ast.ClassDef, *_UNIT_DEFS)) and isinstance(body, list) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                n.body = body[1:] or [ast.Pass()]
    return node


def _norm(node: ast.AST) -> str:
    """A node's code without comments, docstrings, formatting or positions."""
    return ast.dump(_strip_docstrings(node), annotate_fields=False, include_attributes=False)


@dataclass(frozen=True)
class _Unit:
    key: str  # "func:Class.method" or "stmt:Class"
    norm: str


def _start(node: ast.AST) -> int:
    decos = getattr(node, "decorator_list", None) or []
    return min([getattr(node, "lineno", 0)] + [d.lineno for d in decos])


def _is_docstring(st: ast.stmt) -> bool:
    return isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str)


def _same(ours: object, theirs: object) -> bool:
    """Structural AST equality (positions ignored), where our `_` as an assignment
    target matches any name upstream binds there (we discard what upstream keeps)."""
    if isinstance(ours, ast.Name) and ours.id == "_" and isinstance(ours.ctx, ast.Store):
        return isinstance(theirs, ast.Name) and isinstance(theirs.ctx, ast.Store)
    if type(ours) is not type(theirs):
        return False
    if isinstance(ours, ast.AST):
        return all(_same(getattr(ours, f, None), getattr(theirs, f, None)) for f in ours._fields)
    if isinstance(ours, list):
        return isinstance(theirs, list) and len(ours) == len(theirs) and all(
            _same(a, b) for a, b in zip(ours, theirs, strict=True))
    return ours == theirs


def _innermost(fn: ast.AST, line: int) -> ast.AST | None:
    """The smallest statement of `fn` spanning `line` (the function's own header when
    the line is in its signature or decorators); None on a blank or comment line."""
    best: ast.stmt | None = None
    for n in ast.walk(fn):
        if not (isinstance(n, ast.stmt) and n is not fn and n.lineno <= line <= (n.end_lineno or n.lineno)):
            continue
        if best is None or (n.end_lineno or n.lineno) - n.lineno < (best.end_lineno or best.lineno) - best.lineno:
            best = n
    if best is None and isinstance(fn, _UNIT_DEFS) and fn.body and _start(fn) <= line < fn.body[0].lineno:
        return fn.args
    return None if best is not None and _is_docstring(best) else best


def _statements_upstream(pre_fn: ast.AST | None, post_fn: ast.AST, new_fn: ast.AST,
                         removed: set[int], added: set[int]) -> bool:
    """Finer than whole functions: each statement the patch adds to the function (that
    the function did not already have) is in upstream's function, and each it removes
    (that the patched function no longer has) is not."""
    def stmts(fn: ast.AST) -> list[ast.AST]:
        out: list[ast.AST] = [n for n in ast.walk(fn) if isinstance(n, ast.stmt) and n is not fn]
        if isinstance(fn, _UNIT_DEFS):
            out.append(fn.args)
        return out

    theirs = stmts(new_fn)
    post_all = stmts(post_fn)
    pre_all = stmts(pre_fn) if pre_fn is not None else []
    seen = False
    for ln in sorted(added):
        st = _innermost(post_fn, ln)
        if st is None or any(_same(st, p) for p in pre_all):  # moved within the function, not changed
            continue
        seen = True
        if not any(_same(st, t) for t in theirs):
            return False
    if pre_fn is not None:
        for ln in sorted(removed):
            st = _innermost(pre_fn, ln)
            if st is None or any(_same(st, p) for p in post_all):
                continue
            seen = True
            if any(_same(st, t) for t in theirs):
                return False
    return seen


def _units_at(tree: ast.Module, lines: set[int]) -> list[_Unit] | None:
    """The unit holding each line: the innermost function, else the statement of the
    module or class body. None when a line is in no statement (blank/comment lines
    between statements only count when nothing else does)."""
    out: dict[str, _Unit] = {}

    def visit(body: list[ast.stmt], prefix: str, line: int) -> None:
        for st in body:
            end = getattr(st, "end_lineno", None) or st.lineno
            if not (_start(st) <= line <= end):
                continue
            if isinstance(st, _UNIT_DEFS):
                q = prefix + st.name
                out[f"func:{q}"] = _Unit(f"func:{q}", _norm(st))
                return
            if isinstance(st, ast.ClassDef):
                inner = [s for s in st.body if _start(s) <= line <= (getattr(s, "end_lineno", None) or s.lineno)]
                if inner:
                    visit(st.body, prefix + st.name + ".", line)
                    return
            if _is_docstring(st):
                return
            norm = _norm(st)
            out[f"stmt:{prefix}{norm}"] = _Unit(f"stmt:{prefix.rstrip('.')}", norm)
            return

    for ln in sorted(lines):
        visit(tree.body, "", ln)
    return list(out.values())


def _functions(tree: ast.Module) -> dict[str, str]:
    out: dict[str, str] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for st in body:
            if isinstance(st, _UNIT_DEFS):
                out[prefix + st.name] = _norm(st)
            elif isinstance(st, ast.ClassDef):
                visit(st.body, prefix + st.name + ".")

    visit(tree.body, "")
    return out


def _function_nodes(tree: ast.Module) -> dict[str, ast.AST]:
    out: dict[str, ast.AST] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for st in body:
            if isinstance(st, _UNIT_DEFS):
                out[prefix + st.name] = st
            elif isinstance(st, ast.ClassDef):
                visit(st.body, prefix + st.name + ".")

    visit(tree.body, "")
    return out


def _statements(tree: ast.Module) -> dict[str, set[str]]:
    """Module- and class-level statements (not defs), normalised, per container."""
    out: dict[str, set[str]] = {}

    def visit(body: list[ast.stmt], container: str) -> None:
        for st in body:
            if isinstance(st, _UNIT_DEFS):
                continue
            if isinstance(st, ast.ClassDef):
                visit(st.body, f"{container}.{st.name}".lstrip("."))
                continue
            if not _is_docstring(st):
                out.setdefault(container, set()).add(_norm(st))

    visit(tree.body, "")
    return out


def _parse(text: str | None) -> ast.Module | None:
    if text is None:
        return None
    try:
        return ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # a release's file is input too
        return None


_F = TypeVar("_F", bound=Callable[..., Any])


def _unparsable_as(default: Any) -> Callable[[_F], _F]:
    """For an entry point that walks Python files of a release: a file nested too deeply
    for the interpreter's recursion (a 1,500-term expression parses, then `ast.dump`
    of it overflows) counts as unparsable, `default`, instead of ending the refresh."""
    def wrap(fn: _F) -> _F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except RecursionError:
                return default
        return cast(_F, run)
    return wrap


def changed_lines(fp: FilePatch) -> tuple[set[int], set[int]]:
    """(old-side line numbers removed, new-side line numbers added) by a file's hunks,
    at the positions the hunk headers state."""
    old: set[int] = set()
    new: set[int] = set()
    for h in fp.hunks:
        o, n = h.old_start, h.new_start
        for ln in h.lines:
            tag = ln[:1]
            if tag == "-":
                old.add(o)
                o += 1
            elif tag == "+":
                new.add(n)
                n += 1
            else:
                o += 1
                n += 1
    return old, new


FindFunction = Callable[[str], Iterable[tuple[str, str]]]  # qualname -> (path, normalised) elsewhere


@_unparsable_as(None)
def normalised_upstream(pre: str | None, post: str | None, new: str | None, fp: FilePatch,
                        elsewhere: FindFunction) -> tuple[bool, list[str]] | None:
    """Whether the new release already has this file's change in substance.

    `pre`/`post` are the file before/after our patch at the old base, `new` the file at
    the new base (None when gone). Returns None when not decidable (not Python, does not
    parse, or the change is only comments/formatting), else (proven, notes)."""
    t_pre, t_post = _parse(pre if pre is not None else ""), _parse(post if post is not None else "")
    if t_pre is None or t_post is None:
        return None
    t_new = _parse(new) if new is not None else None
    if new is not None and t_new is None:
        return None
    removed, added = changed_lines(fp)
    post_units = _units_at(t_post, added) or []
    pre_units = _units_at(t_pre, removed) or []
    # a function touched only by removed lines is compared as it stands after the patch
    post_funcs, pre_funcs = _functions(t_post), _functions(t_pre)
    keys = {u.key for u in post_units}
    for u in pre_units:
        if u.key.startswith("func:") and u.key not in keys and u.key[5:] in post_funcs:
            post_units.append(_Unit(u.key, post_funcs[u.key[5:]]))
    if not post_units and not pre_units:
        return None
    pre_stmts, post_stmts = _statements(t_pre), _statements(t_post)
    substantive = False
    new_funcs = _functions(t_new) if t_new is not None else {}
    new_stmts = _statements(t_new) if t_new is not None else {}
    notes: list[str] = []
    for u in post_units:
        kind, _, name = u.key.partition(":")
        if kind == "func":
            if pre_funcs.get(name) != u.norm:
                substantive = True
            if new_funcs.get(name) == u.norm:
                continue
            if name not in new_funcs:  # gone from this file: moved elsewhere as it is?
                where = next((path for path, norm in elsewhere(name) if norm == u.norm), None)
                if where is None:
                    return False, []
                notes.append(f"{name} is in {where}")
                continue
            assert t_new is not None
            if _statements_upstream(_function_nodes(t_pre).get(name), _function_nodes(t_post)[name],
                                    _function_nodes(t_new)[name], removed, added):
                notes.append(f"the statements it changes in {name} are upstream (the rest of {name} differs)")
                continue
            return False, []
        else:
            if u.norm not in pre_stmts.get(name, set()):
                substantive = True
            if u.norm not in new_stmts.get(name, set()):
                return False, []
    for u in pre_units:
        kind, _, name = u.key.partition(":")
        if kind == "func":
            if name not in post_funcs:  # our patch deletes the function: upstream must too
                substantive = True
                if name in new_funcs:
                    return False, []
        elif u.norm not in post_stmts.get(name, set()):
            substantive = True
            if u.norm in new_stmts.get(name, set()):  # a statement we remove is still upstream
                return False, []
    if not substantive:
        return None
    return True, notes


@_unparsable_as({})
def function_index(text: str) -> dict[str, str]:
    """qualname -> normalised code of every function in a Python file ({} when it does
    not parse)."""
    t = _parse(text)
    return _functions(t) if t is not None else {}


# ------------------------------------------------------------------ moved or split files


def significant_lines(text: str) -> frozenset[str]:
    """The lines that say something about the code: stripped, at least 6 characters
    (comments count: they move with the code)."""
    return frozenset(s for s in (ln.strip() for ln in text.split("\n")) if len(s) >= 6)


@dataclass(frozen=True)
class MoveCandidate:
    path: str
    code_share: float  # weighted share of the changed code's old lines found in this file
    similarity: float  # weighted Dice coefficient of the two files' significant lines

    def describe(self) -> str:
        return f"{self.path} (similarity {self.similarity:.2f}; {self.code_share:.0%} of the changed code's lines)"


@_unparsable_as(frozenset())
def hunk_old_lines(fp: FilePatch, old_text: str = "") -> frozenset[str]:
    """The code a file's hunks change: for Python, the whole top-level functions and
    classes the hunks touch in the old file (three lines of context are too little to
    tell a class from the boilerplate its siblings share); else the hunks' context and
    removed lines."""
    tree = _parse(old_text) if old_text else None
    if tree is not None:
        lines = old_text.split("\n")
        spans = [(h.old_start, h.old_start + max(h.old_len, 1) - 1) for h in fp.hunks]
        picked = [st for st in tree.body if any(_start(st) <= b and a <= (st.end_lineno or st.lineno) for a, b in spans)
                  and isinstance(st, (ast.ClassDef, *_UNIT_DEFS))]
        if picked:
            return significant_lines("\n".join("\n".join(lines[_start(st) - 1:st.end_lineno]) for st in picked))
    return significant_lines("\n".join(ln[1:] for h in fp.hunks for ln in h.lines if ln[:1] in " -"))


def rank_moved(old_text: str, fp: FilePatch, candidates: Iterable[tuple[str, frozenset[str]]],
               limit: int = 3) -> list[MoveCandidate]:
    """Files of the new base ranked by how much of the gone file's changed code and
    content they hold. A line counts 1/n when n files of the new base have it, so
    boilerplate (licence headers, the signature every subclass repeats) says little."""
    cands = [(p, sig) for p, sig in candidates if sig]
    old_sig = significant_lines(old_text)
    code = hunk_old_lines(fp, old_text) or old_sig
    df: dict[str, int] = {}
    for _p, sig in cands:
        for ln in sig & old_sig | sig & code:
            df[ln] = df.get(ln, 0) + 1

    def weight(lines: Iterable[str]) -> float:
        return sum(1.0 / max(1, df.get(ln, 1)) for ln in lines)

    w_code, w_old = weight(code), weight(old_sig)
    out = []
    for path, sig in cands:
        shared_old = old_sig & sig
        shared_code = code & sig
        if not shared_old and not shared_code:
            continue
        share = weight(shared_code) / w_code if w_code else 0.0
        w_shared = weight(shared_old)
        # the candidate's own lines not in the old file count 1 each
        dice = 2 * w_shared / (w_old + w_shared + len(sig - old_sig)) if w_old else 0.0
        out.append(MoveCandidate(path, share, dice))
    out.sort(key=lambda c: (c.code_share + c.similarity, c.similarity), reverse=True)
    return out[:limit]


def is_moved(c: MoveCandidate | None) -> bool:
    """Where the code went: a file holding most of the changed code, or sharing a
    third of the old file's (weighted) content. Below that it is a hint, not a move."""
    return c is not None and (c.code_share >= 0.5 or c.similarity >= 0.3)


# ------------------------------------------------------------------ possibly upstream

_IDENT = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")
_COMMON = frozenset(keyword.kwlist) | frozenset(dir(__builtins__)) | {
    "self", "torch", "tensor", "device", "return", "dtype", "kwargs", "args", "layer", "module",
}


def _distinctive(name: str) -> bool:
    if name in _COMMON or len(name) < 6:
        return False
    return "_" in name.strip("_") or any(c.isupper() for c in name[1:])


def added_names(parsed: ParsedPatch) -> list[str]:
    """Distinctive identifiers on the patch's added lines (comments left out), in
    order of first appearance."""
    seen: dict[str, None] = {}
    for fp in parsed.files:
        for h in fp.hunks:
            for ln in h.lines:
                if ln[:1] != "+":
                    continue
                code = ln[1:].split("#", 1)[0] if not ln[1:].lstrip().startswith(("'", '"')) else ln[1:]
                for m in _IDENT.finditer(code):
                    if _distinctive(m.group(0)):
                        seen.setdefault(m.group(0), None)
    return list(seen)


@dataclass(frozen=True)
class UpstreamHint:
    path: str
    line: int
    found: tuple[str, ...]
    total: int
    scope: str = "absent from the old release"

    def describe(self) -> str:
        names = ", ".join(self.found[:5]) + (", ..." if len(self.found) > 5 else "")
        return (f"possibly upstream in {self.path}:{self.line} (check): {len(self.found)}/{self.total} of the names "
                f"it adds, {self.scope}, are there ({names})")


def _line_of(text: str, name: str) -> int:
    m = re.search(rf"\b{re.escape(name)}\b", text)
    return text.count("\n", 0, m.start()) + 1 if m else 0


def file_novelty(parsed: ParsedPatch, read_old: Callable[[str], str | None],
                 read_new: Callable[[str], str | None]) -> UpstreamHint | None:
    """Weaker than `possibly_upstream`, for names the old release used elsewhere: the
    names the patch adds to each of its files that the file did not have, found in
    the same file at the new base (upstream changed it the same way). At least three
    names and three in ten."""
    total = 0
    per_file: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    for fp in parsed.files:
        old, new = read_old(fp.path), read_new(fp.path)
        if old is None or new is None:
            continue
        names = [n for n in added_names(ParsedPatch(parsed.header, "", (fp,)))
                 if not re.search(rf"\b{re.escape(n)}\b", old)]
        total += len(names)
        found = [n for n in names if re.search(rf"\b{re.escape(n)}\b", new)]
        if found:
            per_file[fp.path] = found
            texts[fp.path] = new
    n = sum(len(v) for v in per_file.values())
    if n < 3 or n * 10 < total * 3:
        return None
    path, found = max(per_file.items(), key=lambda kv: len(kv[1]))
    line = min(_line_of(texts[path], x) for x in found)
    return UpstreamHint(path, line, tuple(x for v in per_file.values() for x in v), total,
                        "new to the files it changes")


def possibly_upstream(new_names: list[str], hits: dict[str, list[tuple[str, int]]],
                      own: frozenset[str] = frozenset()) -> UpstreamHint | None:
    """`new_names`: the names the patch adds that the old release has nowhere;
    `hits`: name -> (path, line) where the new release has it; `own`: the files the
    patch changes. The file holding most of them (on a tie, one the patch changes,
    where upstream would define them rather than import them), when that is at least
    two names that the old release had nowhere (or the one name, when the patch adds
    one long name)."""
    if not new_names:
        return None
    per_file: dict[str, dict[str, int]] = {}
    for name, locs in hits.items():
        for path, line in locs:
            per_file.setdefault(path, {}).setdefault(name, line)
    if not per_file:
        return None
    path, found = max(per_file.items(), key=lambda kv: (len(kv[1]), kv[0] in own, -min(kv[1].values())))
    n = len(found)
    if n >= 2 or (n == len(new_names) == 1 and len(new_names[0]) >= 12):
        ordered = tuple(x for x in new_names if x in found)
        return UpstreamHint(path, min(found.values()), ordered, len(new_names))
    return None


# ------------------------------------------------------------------ upstream did it its own way


def _tokens(node: ast.AST) -> frozenset[str]:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and len(n.value) < 40:
            out.add(repr(n.value))
    return frozenset(out)


def _simple_statements(fn: ast.AST) -> list[ast.stmt]:
    return [n for n in ast.walk(fn) if isinstance(n, ast.stmt) and n is not fn
            and not isinstance(n, (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.FunctionDef, ast.AsyncFunctionDef,
                                   ast.ClassDef, ast.AsyncFor, ast.AsyncWith)) and not _is_docstring(n)]


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _like_any(t: frozenset[str], others: list[frozenset[str]]) -> bool:
    return any(_jaccard(t, o) >= SIMILAR_THRESHOLD for o in others)


@dataclass(frozen=True)
class SimilarCode:
    path: str
    line: int
    function: str
    similarity: float
    code: str
    condition: bool = False  # upstream rewrote the condition of the branch the patch extends

    def describe(self) -> str:
        if self.condition:
            return (f"upstream rewrote the condition of the `if` the patch adds a branch to, around the same body: "
                    f"`{self.code[:100]}` at {self.path}:{self.line} in {self.function}; port the patch's condition there")
        return (f"upstream added code of its own like the patch's at {self.path}:{self.line} in {self.function} "
                f"(similarity {self.similarity:.2f}: `{self.code[:100]}`); port the patch onto it")


SIMILAR_THRESHOLD = 0.6


@_unparsable_as(None)
def similar_upstream_code(path: str, pre: str | None, post: str | None, up_old: str | None, up_new: str | None,
                          fp: FilePatch) -> SimilarCode | None:
    """In a function the patch changes, a statement upstream added between the two
    releases that looks like one the patch adds (identifier sets, Jaccard >= 0.6)."""
    trees = [_parse(t) if t is not None else None for t in (pre, post, up_old, up_new)]
    if any(t is None for t in trees):
        return None
    t_pre, t_post, t_old, t_new = trees
    assert t_pre and t_post and t_old and t_new
    _removed, added = changed_lines(fp)
    units = _units_at(t_post, added) or []
    f_pre, f_post, f_old, f_new = (_function_nodes(t) for t in (t_pre, t_post, t_old, t_new))
    best: SimilarCode | None = None
    for u in units:
        kind, _, name = u.key.partition(":")
        if kind != "func" or name not in f_old or name not in f_new:
            continue
        # new statements only: an edit of a statement the function had (both sides adding
        # an item to the same list, say) is not code of its own
        before = [_tokens(x) for x in _simple_statements(f_pre[name])] if name in f_pre else []
        ours = [x for x in _simple_statements(f_post[name]) if not _like_any(_tokens(x), before)]
        old_up = [_tokens(x) for x in _simple_statements(f_old[name])]
        theirs = [x for x in _simple_statements(f_new[name]) if not _like_any(_tokens(x), old_up)]
        for a in ours:
            ta = _tokens(a)
            for b in theirs:
                tb = _tokens(b)
                if len(ta) < 3 or len(tb) < 3:
                    continue
                sim = _jaccard(ta, tb)
                if sim >= SIMILAR_THRESHOLD and (best is None or sim > best.similarity):
                    best = SimilarCode(path, b.lineno, name, sim, ast.unparse(b).replace("\n", " "))
    if best is None:
        return _rewritten_condition(path, f_post, f_old, f_new, units, added)
    return best


def _body_norm(body: list[ast.stmt]) -> str:
    return "|".join(_norm(x) for x in body)


def _rewritten_condition(path: str, f_post: dict[str, ast.AST], f_old: dict[str, ast.AST], f_new: dict[str, ast.AST],
                         units: list[_Unit], added: set[int]) -> SimilarCode | None:
    """The patch adds an `elif` to an `if` whose condition upstream rewrote around the
    same body (a special case made general, often a platform hook): the patch's
    condition belongs in upstream's new one."""
    for u in units:
        kind, _, name = u.key.partition(":")
        if kind != "func" or name not in f_old or name not in f_new:
            continue
        for node in ast.walk(f_post[name]):
            if not (isinstance(node, ast.If) and node.orelse and isinstance(node.orelse[0], ast.If)
                    and node.orelse[0].lineno in added and node.lineno not in added):
                continue
            test, body = _norm(node.test), _body_norm(node.body)
            old_if = [n for n in ast.walk(f_old[name]) if isinstance(n, ast.If) and _norm(n.test) == test
                      and _body_norm(n.body) == body]
            new_if = [n for n in ast.walk(f_new[name]) if isinstance(n, ast.If) and _norm(n.test) != test
                      and _body_norm(n.body) == body]
            if old_if and new_if:
                n = new_if[0]
                return SimilarCode(path, n.lineno, name, 1.0, f"if {ast.unparse(n.test)}:", condition=True)
    return None


# ------------------------------------------------------------------ added lines present


def best_window(lines: list[str], want: list[str]) -> list[str] | None:
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


def lines_evidence(parsed: ParsedPatch, read_new: Callable[[str], str | None]) -> str | None:
    """The change is at the new base: every added line is there, or each hunk's result
    is there as one block with a single line different in all (upstream took it with a
    line changed; context lines anchor where)."""
    present = total = 0
    mismatches: list[str] = []
    windows_ok = True
    for fp in parsed.files:
        text = read_new(fp.path)
        if text is None:
            return None
        lines = text.split("\n")
        have = {ln.strip() for ln in lines}
        for h in fp.hunks:
            for ln in h.lines:
                s = ln[1:].strip()
                if ln[0] == "+" and len(s) >= 4 and re.search(r"[A-Za-z0-9]", s):
                    total += 1
                    present += s in have
            best = best_window(lines, h.new_lines)
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


# ------------------------------------------------------------------ upstream does the same elsewhere

# calls so common that finding them says nothing about what a change does
_TRIVIAL_CALLS = frozenset({
    "len", "isinstance", "getattr", "setattr", "hasattr", "range", "print", "super", "str", "int", "float", "bool",
    "list", "dict", "tuple", "set", "type", "enumerate", "zip", "min", "max", "sum", "any", "all", "sorted",
    "debug", "info", "warning", "warning_once", "info_once", "error", "format", "append", "get", "items", "keys",
    "values", "update", "join", "split", "startswith", "endswith", "lower", "upper", "strip",
})


def _const(node: ast.AST) -> str | None:
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    text = repr(value)
    return text if len(text) <= 40 else None


@_unparsable_as(frozenset())
def behaviour_features(node: ast.AST) -> frozenset[str]:
    """What a piece of code does, without the names it gives its own variables: the
    calls it makes (with their constant arguments and keyword names), the enum-like
    members it tests (`Backend.XPU`), and the platform predicates it asks (`is_xpu`).
    Upstream's version of a change keeps these while renaming everything else."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name is None or name in _TRIVIAL_CALLS:
                continue
            out.add(f"call {name}")
            args = [_const(a) for a in n.args]
            if args and all(a is not None for a in args):
                out.add(f"call {name}({', '.join(a for a in args if a is not None)})")
            for kw in n.keywords:
                if kw.arg:
                    v = _const(kw.value)
                    out.add(f"keyword {name}({kw.arg}=)")
                    out.add(f"keyword {kw.arg}=")  # the same argument to another door to the same kernel
                    if v is not None:
                        out.add(f"keyword {name}({kw.arg}={v})")
        elif isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            if n.value.id[:1].isupper() and n.attr.isupper() and len(n.attr) >= 2:
                out.add(f"member {n.value.id}.{n.attr}")
            elif n.attr.startswith("is_") and len(n.attr) > 4:
                out.add(f"predicate {n.attr}")
    return frozenset(out)


@_unparsable_as(frozenset())
def added_behaviour(pre: str | None, post: str | None, fp: FilePatch) -> frozenset[str]:
    """The behaviour features of the statements a patch adds to a Python file that the
    function (or module) they land in did not have before the patch."""
    t_post = _parse(post)
    if t_post is None:
        return frozenset()
    t_pre = _parse(pre) if pre else None
    _removed, added = changed_lines(fp)
    post_fns = _function_nodes(t_post)
    pre_fns = _function_nodes(t_pre) if t_pre is not None else {}
    feats: set[str] = set()
    had: dict[str, frozenset[str]] = {}
    for ln in sorted(added):
        owner, node = _owner(t_post, post_fns, ln)
        if node is None:
            continue
        st = _innermost(node, ln) if owner else node
        if st is None:
            continue
        if owner not in had:
            before = pre_fns.get(owner) if owner else t_pre
            had[owner] = behaviour_features(before) if before is not None else frozenset()
        feats |= behaviour_features(st) - had[owner]
    return frozenset(feats)


def _owner(tree: ast.Module, fns: dict[str, ast.AST], line: int) -> tuple[str, ast.AST | None]:
    """(qualname, node) of the innermost function holding `line`, else ("", the module
    statement holding it)."""
    best = ""
    for q, fn in fns.items():
        if _start(fn) <= line <= (getattr(fn, "end_lineno", None) or 0) and len(q) >= len(best):
            best = q
    if best:
        return best, fns[best]
    for st in tree.body:
        if _start(st) <= line <= (st.end_lineno or st.lineno):
            return "", st
    return "", None


@dataclass(frozen=True)
class SameBehaviour:
    path: str
    line: int
    function: str
    found: tuple[str, ...]
    total: int
    score: float

    def describe(self) -> str:
        shown = ", ".join(f"`{f.split(' ', 1)[1]}`" for f in self.found[:4]) + (", ..." if len(self.found) > 4 else "")
        return (f"possibly upstream in {self.path}:{self.line} (check): {self.function}, new or changed in the new "
                f"release, does what the patch adds ({len(self.found)}/{self.total} of its calls and tests, "
                f"weighted {self.score:.2f}: {shown})")


BEHAVIOUR_THRESHOLD = 0.5


@_unparsable_as([])
def function_behaviours(new_text: str | None, old_text: str | None) -> list[tuple[str, int, bool, frozenset[str]]]:
    """(qualname, line, whether the function is new, its features new to it) for every
    function of a file at the new release that is new or changed since the old one."""
    t_new = _parse(new_text)
    if t_new is None:
        return []
    t_old = _parse(old_text)
    old_fns = _function_nodes(t_old) if t_old is not None else {}
    out = []
    for q, fn in _function_nodes(t_new).items():
        old = old_fns.get(q)
        if old is not None and _norm(old) == _norm(fn):
            continue
        new_feats = behaviour_features(fn) - (behaviour_features(old) if old is not None else frozenset())
        if new_feats:
            out.append((q, _start(fn), old is None, new_feats))
    return out


def feature_word(feature: str) -> str:
    """The word a feature is found by in a text search: the keyword's, the called
    name's, the member's (`Backend.XPU`)."""
    kind, _, rest = feature.partition(" ")
    if kind == "keyword":
        return rest.rpartition("(")[2].split("=", 1)[0] if "(" in rest else rest.rstrip("=")
    if kind == "member":
        return rest
    return rest.split("(", 1)[0]


def is_specific(feature: str) -> bool:
    """A feature that says what is done, not only which name is called: a call with its
    constant arguments, a keyword argument, an enum member."""
    return feature.startswith(("keyword ", "member ")) or (feature.startswith("call ") and "(" in feature)


SPECIFIC_HITS = 6
SPECIFIC_WEIGHT = 3.0


def same_behaviour_upstream(wanted: frozenset[str], novel: frozenset[str],
                            candidates: list[tuple[str, str, int, bool, frozenset[str]]]) -> SameBehaviour | None:
    """The function upstream added or changed between the releases whose new behaviour
    covers what the patch adds.

    `wanted`: the patch's features; `novel`: those the old release has nowhere (by a
    text search for their word). A changed function counts the features new to it; a
    new function (code can move between releases unchanged) only when one of them is
    novel. The match needs a specific feature (`is_specific`), and either half the
    patch's weight or SPECIFIC_HITS specific features weighing SPECIFIC_WEIGHT (one call
    with the same keyword arguments to the same kernel, not the keywords every caller
    of a layer passes). A feature weighs 1/(1+n), n being how many
    candidate functions have it, so `contiguous()` says little."""
    if len(wanted) < 2 or not candidates:
        return None
    df: dict[str, int] = {}
    for *_rest, feats in candidates:
        for f in feats & wanted:
            df[f] = df.get(f, 0) + 1

    def weight(fs: Iterable[str]) -> float:
        return sum(1.0 / (1 + df.get(f, 0)) for f in fs)

    total = weight(wanted)
    best: SameBehaviour | None = None
    for path, q, line, is_new, feats in candidates:
        hit = feats & wanted
        specific = [f for f in hit if is_specific(f)]
        if len(hit) < 2 or not specific or (is_new and not hit & novel):
            continue
        score = weight(hit) / total
        strong = len(specific) >= SPECIFIC_HITS and weight(specific) >= SPECIFIC_WEIGHT
        if (score >= BEHAVIOUR_THRESHOLD or strong) and (best is None or score > best.score):
            best = SameBehaviour(path, line, q, tuple(sorted(hit, key=lambda f: (f not in novel, not is_specific(f), f))),
                                 len(wanted), score)
    return best


# ------------------------------------------------------------------ functions moved to another file


@_unparsable_as([])
def changed_functions(pre: str | None, post: str | None, fp: FilePatch) -> list[str]:
    """Qualified names of the functions a file's hunks change (added lines in the
    patched file, removed lines in the file before), in file order."""
    removed, added = changed_lines(fp)
    names: dict[str, None] = {}
    for text, lines in ((pre, removed), (post, added)):
        tree = _parse(text)
        if tree is None:
            continue
        for ln in sorted(lines):
            for u in _units_at(tree, {ln}) or []:
                kind, _, name = u.key.partition(":")
                if kind == "func":
                    names.setdefault(name, None)
    return list(names)


@_unparsable_as(0)
def def_line(text: str, qualname: str) -> int:
    """The line of `def NAME` for a qualified name in a Python file (0 when absent)."""
    tree = _parse(text)
    node = _function_nodes(tree).get(qualname) if tree is not None else None
    return _start(node) if node is not None else 0
