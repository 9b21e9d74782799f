"""API closure: what the patched tree imports from, and calls with keyword arguments
into, `vllm_xpu_kernels` exists in the PINNED kernel release.

The pinned release is read from its wheel (`wheel_api.WheelAPI`, AST only): a release
on the package index is downloaded once into the cache; a GitHub-only release (0.1.4,
0.1.5) is read from `--kernel-wheel`, a local wheel the lockfile or pin names, a wheel
already in the cache, or the pin's URL through the mirror map (`STACKBUILD_GIT_MIRRORS`);
otherwise the check is skipped and says so.

Which files: every Python file the series touches or adds, and every file of the
patched tree that mentions `vllm_xpu_kernels` (vLLM 0.19.0's own
`fused_moe/xpu_fused_moe.py:24` imports `xpu_fused_moe`, which kernels >= 0.1.12 lack).

How: a small abstract interpreter over each file's AST follows values through
assignments, tuple returns of local functions, `getattr(module, NAME, None)`,
`hasattr`, `dict(...)` keyword bundles passed as `**kwargs`, and instances of kernel
classes. Conditions it can decide for the pinned release (feature tests such as
`getattr(...) is not None`, `hasattr`, `"x" in inspect.signature(f).parameters`,
comparisons of the kernel's version) prune the branch that cannot run, and every
pruned branch is reported as not checked. A failing import under
`try/except ImportError` is a fallback (reported), unless the handler raises.
Calls into the package's native operators (`torch.ops._xpu_C.int4_gemm_w4a16(...)`)
are checked against the schema strings its extension module registers with torch
(`wheel_api.WheelAPI.op_schemas`); operator namespaces the patched tree builds itself
(vLLM's `_C`, `_moe_C`) are left alone.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from packaging.version import InvalidVersion, Version

from stackbuild.checks import CheckContext, CheckResult, CheckStatus, pinned_wheel
from stackbuild.checks.imports import catches_import_error
from stackbuild.checks.treefile import Unparsable, parse_python, present
from stackbuild.checks.wheel_api import Signature, WheelAPI
from stackbuild.errors import StackbuildError
from stackbuild.lock.api import default_lockfile

CHECK = "api"
KERNELS = "vllm-xpu-kernels"
PACKAGE = "vllm_xpu_kernels"
MAX_WORLDS = 32
MAX_ALTS = 8
SKIP_DIRS = frozenset({".git", "__pycache__", "node_modules"})


# ---------------------------------------------------------------- values


class Value:
    kdep = False  # derived from the pinned kernel (a feature test or version check)


@dataclass(frozen=True)
class Unknown(Value):
    pass


UNKNOWN = Unknown()


@dataclass(frozen=True)
class Ref(Value):
    """A name of the kernel package that exists in the pinned release."""

    path: str
    bound: bool = False  # a method looked up on an instance
    kdep = True


@dataclass(frozen=True)
class Inst(Value):
    cls: str  # the kernel class's dotted path


@dataclass(frozen=True)
class Const(Value):
    value: Any
    kdep: bool = False


@dataclass(frozen=True)
class KwDict(Value):
    items: tuple[tuple[str, Value], ...]
    open: bool = False  # may hold keys not known here


@dataclass(frozen=True)
class Tup(Value):
    items: tuple[Value, ...]


@dataclass(frozen=True)
class KVersion(Value):
    """The installed kernel's version string (metadata.version / __version__)."""

    parsed: bool = False  # wrapped in packaging's Version
    kdep = True


@dataclass(frozen=True)
class VersionConst(Value):
    text: str


@dataclass(frozen=True)
class SigOf(Value):
    ref: Ref


@dataclass(frozen=True)
class ParamNames(Value):
    names: frozenset[str]
    kdep = True


@dataclass(frozen=True)
class Std(Value):
    """A stdlib or packaging helper the interpreter understands."""

    path: str


@dataclass(frozen=True)
class OpNamespace(Value):
    """`torch.ops.NS` for an operator namespace the kernel package's .so registers."""

    namespace: str


@dataclass(frozen=True)
class OpRef(Value):
    """`torch.ops.NS.op` (or its `.default` overload), registered in the pinned release."""

    namespace: str
    op: str
    kdep = True


@dataclass(frozen=True)
class LocalFunc(Value):
    module: str
    qualname: str


STD_NAMES = {
    "importlib.metadata": "importlib.metadata",
    "importlib.metadata.version": "importlib.metadata.version",
    "importlib_metadata.version": "importlib.metadata.version",
    "packaging.version.Version": "Version",
    "packaging.version.parse": "Version",
    "inspect.signature": "inspect.signature",
    "inspect": "inspect",
    "importlib": "importlib",
    "torch": "torch",
    "torch.ops": "torch.ops",
}

World = dict[str, Value]


# ---------------------------------------------------------------- findings


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    what: str
    fallback: str = ""  # "" a hard failure; else how the code copes

    def render(self) -> str:
        return f"{self.file}:{self.line}: {self.what}" + (f" ({self.fallback})" if self.fallback else "")


@dataclass(frozen=True)
class Unchecked:
    file: str
    line: int
    why: str

    def render(self) -> str:
        return f"{self.file}:{self.line}: {self.why}"


@dataclass
class FileReport:
    rel: str
    imports: int = 0
    calls: int = 0
    problems: set[Problem] = field(default_factory=set)
    unchecked: set[Unchecked] = field(default_factory=set)
    notes: set[str] = field(default_factory=set)


# ---------------------------------------------------------------- the interpreter


class _Scope:
    def __init__(self, module: str, globals_: World | None, enclosing: World | None = None):
        self.module = module
        self.globals = globals_  # None: this is the module scope
        self.enclosing = enclosing or {}
        self.returns: list[Value] = []


class Program:
    """Files of one tree analysed against one kernel release."""

    def __init__(self, api: WheelAPI, root: Path, files: dict[str, ast.Module], package: str = PACKAGE,
                 dist: str = KERNELS, check_calls: bool = True, op_namespaces: frozenset[str] = frozenset()):
        self.api = api
        self.op_namespaces = op_namespaces  # torch.ops namespaces only the pinned package registers
        self.package = package  # the import name whose uses are checked
        self.dist = dist  # its distribution name, for metadata.version() and messages
        self.check_calls = check_calls
        self.root = root
        self.files = files  # rel path -> parsed tree
        self.by_module = {_module_name(rel): rel for rel in files}
        self.reports = {rel: FileReport(rel) for rel in files}
        self._globals: dict[str, World | None] = {}
        self._functions: dict[tuple[str, str], ast.FunctionDef | ast.AsyncFunctionDef] = {}
        self._summaries: dict[tuple[str, str], list[Value] | None] = {}
        self._current: list[str] = []  # file stack
        self._import_failed: list[bool] = [False]
        self._fallback: list[str] = []  # how the innermost try/except ImportError copes
        self._enclosing: dict[tuple[str, str], World] = {}
        self._decided_if: ast.stmt | None = None  # the last `if` a kernel feature test decided

    # ---- driving

    def run(self) -> dict[str, FileReport]:
        for rel in self.files:
            module = _module_name(rel)
            self.module_globals(module)
            for key in [k for k in self._functions if k[0] == module]:
                self.summary(*key)
        return self.reports

    def module_globals(self, module: str) -> World | None:
        if module in self._globals:
            return self._globals[module]
        rel = self.by_module.get(module)
        if rel is None:
            return None
        self._globals[module] = {}  # a cycle sees an empty module
        self._current.append(rel)
        try:
            scope = _Scope(module, None)
            worlds = self.block(self.files[rel].body, [{}], scope, "")
        finally:
            self._current.pop()
        merged = _merge(worlds)
        self._globals[module] = merged
        return merged

    def summary(self, module: str, qualname: str) -> list[Value]:
        key = (module, qualname)
        if key in self._summaries:
            return self._summaries[key] or [UNKNOWN]  # None: being computed (recursion)
        fn = self._functions.get(key)
        rel = self.by_module.get(module)
        if fn is None or rel is None:
            return [UNKNOWN]
        self._summaries[key] = None
        globals_ = self.module_globals(module) or {}
        scope = _Scope(module, globals_, self._enclosing.get(key))
        world: World = {a.arg: UNKNOWN for a in _all_args(fn.args)}
        self._current.append(rel)
        try:
            ends = self.block(fn.body, [world], scope, qualname)
        finally:
            self._current.pop()
        rets = scope.returns + ([Const(None)] if ends else [])
        out = _dedupe(rets)[:MAX_ALTS] or [UNKNOWN]
        self._summaries[key] = out
        return out

    def ours(self, module: str) -> bool:
        return module == self.package or module.startswith(self.package + ".")

    @property
    def rel(self) -> str:
        return self._current[-1]

    @property
    def report(self) -> FileReport:
        return self.reports[self.rel]

    def problem(self, node: ast.AST, what: str, fallback: str = "") -> None:
        self.report.problems.add(Problem(self.rel, getattr(node, "lineno", 0), what, fallback))

    def unchecked(self, node: ast.AST, why: str) -> None:
        self.report.unchecked.add(Unchecked(self.rel, getattr(node, "lineno", 0), why))

    # ---- statements

    def block(self, body: list[ast.stmt], worlds: list[World], scope: _Scope, qual: str) -> list[World]:
        for i, stmt in enumerate(body):
            self._decided_if = None
            worlds = self.stmt(stmt, worlds, scope, qual)
            if not worlds:
                rest = body[i + 1:]
                if rest and self._decided_if is stmt:
                    assert isinstance(stmt, ast.If)
                    end = getattr(rest[-1], "end_lineno", rest[-1].lineno)
                    self.unchecked(rest[0], f"lines {rest[0].lineno}-{end} not checked: `if "
                                            f"{_short(ast.unparse(stmt.test))}` (line {stmt.lineno}) is decided by "
                                            f"{self.dist} {self.api.version} and its branch leaves the block")
                break
        return worlds

    def stmt(self, node: ast.stmt, worlds: list[World], scope: _Scope, qual: str) -> list[World]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            return [self.do_import(node, w, scope) for w in worlds]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = f"{qual}.{node.name}" if qual else node.name
            self._functions[(scope.module, name)] = node
            if scope.globals is not None and not qual.endswith(">"):  # nested: sees the enclosing names
                self._enclosing[(scope.module, name)] = {**scope.enclosing, **_merge(worlds)}
            for d in node.decorator_list:
                self.each(d, worlds, scope)
            return [_bind(w, node.name, LocalFunc(scope.module, name)) for w in worlds]
        if isinstance(node, ast.ClassDef):
            for e in [*node.bases, *node.decorator_list]:
                self.each(e, worlds, scope)
            cls_scope = _Scope(scope.module, scope.globals if scope.globals is not None else {}, {})
            inner_qual = f"{qual}.{node.name}<class>" if qual else f"{node.name}<class>"
            for stmt in node.body:  # class-level code; methods see the module, not the class
                if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                    self._functions[(scope.module, f"{inner_qual}.{stmt.name}")] = stmt
                else:
                    self.block([stmt], [dict(worlds[0])], cls_scope, inner_qual)
            return [_bind(w, node.name, UNKNOWN) for w in worlds]
        if isinstance(node, ast.Assign | ast.AnnAssign):
            value = node.value
            if value is None:
                return worlds
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out: list[World] = []
            for w in worlds:
                for alt in self.ev(value, w, scope):
                    nw = dict(w)
                    for t in targets:
                        self.assign(t, alt, nw, scope)
                    out.append(nw)
            return _cap(out)
        if isinstance(node, ast.AugAssign):
            for w in worlds:
                self.ev(node.value, w, scope)
            return [_bind(w, node.target.id, UNKNOWN) if isinstance(node.target, ast.Name) else w for w in worlds]
        if isinstance(node, ast.Expr):
            out = []
            for w in worlds:
                self.ev(node.value, w, scope)
                out.append(self.mutate(node.value, w, scope))
            return out
        if isinstance(node, ast.Return):
            for w in worlds:
                scope.returns.extend(self.ev(node.value, w, scope) if node.value is not None else [Const(None)])
            return []
        if isinstance(node, ast.Raise):
            for w in worlds:
                if node.exc is not None:
                    self.ev(node.exc, w, scope)
            return []
        if isinstance(node, ast.If):
            return self.do_if(node, worlds, scope, qual)
        if isinstance(node, ast.For | ast.AsyncFor | ast.While):
            loop_in = worlds
            if isinstance(node, ast.For | ast.AsyncFor):
                for w in worlds:
                    self.ev(node.iter, w, scope)
                loop_in = [dict(w) for w in worlds]
                for w in loop_in:
                    self.assign(node.target, UNKNOWN, w, scope)
            else:
                for w in worlds:
                    self.ev(node.test, w, scope)
            after = self.block(node.body, loop_in, scope, qual)
            merged = _cap(worlds + after)
            return _cap(self.block(node.orelse, merged, scope, qual)) if node.orelse else merged
        if isinstance(node, ast.With | ast.AsyncWith):
            inner = []
            for w in worlds:
                nw = dict(w)
                for item in node.items:
                    self.ev(item.context_expr, nw, scope)
                    if item.optional_vars is not None:
                        self.assign(item.optional_vars, UNKNOWN, nw, scope)
                inner.append(nw)
            return self.block(node.body, inner, scope, qual)
        if isinstance(node, ast.Try | ast.TryStar):
            return self.do_try(node, worlds, scope, qual)
        if isinstance(node, ast.Match):
            out = []
            for w in worlds:
                self.ev(node.subject, w, scope)
            for case in node.cases:
                out += self.block(case.body, [dict(w) for w in worlds], scope, qual)
            return _cap(out + worlds)
        if isinstance(node, ast.Assert):
            for w in worlds:
                self.ev(node.test, w, scope)
            return worlds
        if isinstance(node, ast.Delete):
            return [{k: v for k, v in w.items() if not any(isinstance(t, ast.Name) and t.id == k for t in node.targets)}
                    for w in worlds]
        return worlds

    def do_if(self, node: ast.If, worlds: list[World], scope: _Scope, qual: str) -> list[World]:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or \
                isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING":
            return self.block(node.orelse, worlds, scope, qual) if node.orelse else worlds
        yes: list[World] = []
        no: list[World] = []
        pruned_body = pruned_else = False
        for w in worlds:
            truth, kdep = self.truth(node.test, w, scope)
            if truth is not False:
                yes.append(w)
            elif kdep:
                pruned_body = True
            if truth is not True:
                no.append(w)
            elif kdep:
                pruned_else = True
        cond = ast.unparse(node.test)
        decided = node if (pruned_body and not yes) or (pruned_else and not no) else None
        if pruned_body and not yes:
            self.unchecked(node, f"branch `if {_short(cond)}` not checked: false with {self.dist} {self.api.version}")
        if pruned_else and not no and node.orelse:
            self.unchecked(node.orelse[0], f"`else` of `if {_short(cond)}` (line {node.lineno}) not checked: "
                                           f"the condition is true with {self.dist} {self.api.version}")
        out = self.block(node.body, yes, scope, qual) if yes else []
        out += self.block(node.orelse, no, scope, qual) if node.orelse else no
        self._decided_if = decided
        return _cap(out)

    def do_try(self, node: ast.Try | ast.TryStar, worlds: list[World], scope: _Scope, qual: str) -> list[World]:
        catches_import = [h for h in node.handlers if catches_import_error(h)]
        self._import_failed.append(False)
        fallback = ""
        if catches_import:
            h = catches_import[0]
            fallback = ("under try/except ImportError, whose handler raises"
                        if h.body and isinstance(h.body[-1], ast.Raise) else
                        f"under try/except ImportError: falls back to line {h.body[0].lineno if h.body else h.lineno}")
        self._fallback.append(fallback)
        try:
            body_out = self.block(node.body, [dict(w) for w in worlds], scope, qual)
            failed = self._import_failed[-1]
        finally:
            self._import_failed.pop()
            self._fallback.pop()
        out = self.block(node.orelse, body_out, scope, qual) if node.orelse else body_out
        for h in node.handlers:
            only_import = catches_import_error(h) and _only_import_errors(h)
            if only_import and not failed and _imports_package(node.body, self.package):
                self.unchecked(h, f"`except ImportError` handler not checked: the imports of its `try` "
                                  f"succeed with {self.dist} {self.api.version}")
                continue
            hw = [dict(w) for w in worlds + body_out]
            if h.name:
                hw = [_bind(w, h.name, UNKNOWN) for w in hw]
            out += self.block(h.body, _cap(hw), scope, qual)
        out = _cap(out)
        return self.block(node.finalbody, out, scope, qual) if node.finalbody else out

    # ---- imports

    def do_import(self, node: ast.Import | ast.ImportFrom, world: World, scope: _Scope) -> World:
        w = dict(world)
        fallback = self._fallback[-1] if self._fallback else ""
        if isinstance(node, ast.Import):
            for a in node.names:
                if self.ours(a.name):
                    self.report.imports += 1
                    if self.api.module(a.name) is None:
                        self._missing(node, f"module {a.name} does not exist", fallback)
                        continue
                    if a.asname:
                        w[a.asname] = Ref(a.name)
                    else:
                        w[a.name.split(".")[0]] = Ref(a.name.split(".")[0])
                else:
                    bound = a.asname or a.name.split(".")[0]
                    std = STD_NAMES.get(a.name if a.asname else bound)
                    w[bound] = Std(std) if std else UNKNOWN
            return w
        module = node.module or ""
        if node.level:
            module = _relative(scope.module, self.rel, node.level, node.module)
        for a in node.names:
            bound = a.asname or a.name
            if a.name == "*":
                continue
            if self.ours(module):
                self.report.imports += 1
                if self.api.module(module) is None:
                    self._missing(node, f"module {module} does not exist", fallback)
                    continue
                ent = self.api.resolve(f"{module}.{a.name}")
                if ent is None:
                    self._missing(node, f"cannot import name {a.name!r} from {module}", fallback)
                    continue
                w[bound] = Ref(f"{module}.{a.name}")
            elif f"{module}.{a.name}" in STD_NAMES:
                w[bound] = Std(STD_NAMES[f"{module}.{a.name}"])
            elif module in self.by_module or f"{module}.{a.name}" in self.by_module:
                g = self.module_globals(module) or {}
                w[bound] = g.get(a.name, UNKNOWN)
            else:
                w[bound] = UNKNOWN
        return w

    def _missing(self, node: ast.AST, what: str, fallback: str) -> None:
        if fallback:
            self._import_failed[-1] = True
        self.problem(node, f"{what} in {self.dist} {self.api.version}", fallback)

    # ---- assignment

    def assign(self, target: ast.expr, value: Value, w: World, scope: _Scope) -> None:
        if isinstance(target, ast.Name):
            w[target.id] = value
        elif isinstance(target, ast.Tuple | ast.List):
            if isinstance(value, Tup) and len(value.items) == len(target.elts) and \
                    not any(isinstance(e, ast.Starred) for e in target.elts):
                for t, v in zip(target.elts, value.items, strict=True):
                    self.assign(t, v, w, scope)
            else:
                for t in target.elts:
                    self.assign(t.value if isinstance(t, ast.Starred) else t, UNKNOWN, w, scope)
        elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
            d = w.get(target.value.id)
            key = target.slice
            if isinstance(d, KwDict):
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    w[target.value.id] = KwDict(tuple((k, v) for k, v in d.items if k != key.value)
                                                + ((key.value, value),), d.open)
                else:
                    w[target.value.id] = KwDict(d.items, True)
        elif isinstance(target, ast.Starred):
            self.assign(target.value, UNKNOWN, w, scope)

    def mutate(self, expr: ast.expr, w: World, scope: _Scope) -> World:
        """`d.update(...)`, `d.pop("k")`, `d.setdefault(...)` on a keyword bundle."""
        if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute)
                and isinstance(expr.func.value, ast.Name)):
            return w
        name = expr.func.value.id
        d = w.get(name)
        if not isinstance(d, KwDict):
            return w
        items = dict(d.items)
        open_ = d.open
        if expr.func.attr == "update":
            for arg in expr.args:
                alts = self.ev(arg, w, scope)
                if len(alts) == 1 and isinstance(alts[0], KwDict):
                    items.update(alts[0].items)
                    open_ = open_ or alts[0].open
                else:
                    open_ = True
            for kw in expr.keywords:
                if kw.arg:
                    items[kw.arg] = UNKNOWN
                else:
                    open_ = True
        elif expr.func.attr in ("pop", "setdefault") and expr.args and isinstance(expr.args[0], ast.Constant) \
                and isinstance(expr.args[0].value, str):
            key = expr.args[0].value
            if expr.func.attr == "pop":
                items.pop(key, None)
            else:
                items.setdefault(key, UNKNOWN)
        elif expr.func.attr == "clear":
            items, open_ = {}, False
        else:
            return w
        return {**w, name: KwDict(tuple(items.items()), open_)}

    # ---- expressions

    def lookup(self, name: str, w: World, scope: _Scope) -> Value:
        if name in w:
            return w[name]
        if name in scope.enclosing:
            return scope.enclosing[name]
        if scope.globals is not None and name in scope.globals:
            return scope.globals[name]
        if name in ("getattr", "hasattr", "callable", "dict", "isinstance"):
            return Std(f"builtins.{name}")
        return UNKNOWN

    def each(self, node: ast.expr, worlds: list[World], scope: _Scope) -> None:
        for w in worlds:
            self.ev(node, w, scope)

    def ev(self, node: ast.expr, w: World, scope: _Scope) -> list[Value]:
        """The values `node` may have in world `w` (alternatives); calls into the kernel
        package met on the way are checked."""
        if isinstance(node, ast.Constant):
            return [Const(node.value)]
        if isinstance(node, ast.Name):
            return [self.lookup(node.id, w, scope)]
        if isinstance(node, ast.Attribute):
            out = []
            for base in self.ev(node.value, w, scope):
                out.append(self.attr(base, node.attr, node, default=None))
            return _dedupe(out)
        if isinstance(node, ast.Call):
            return self.call(node, w, scope)
        if isinstance(node, ast.Tuple | ast.List) and isinstance(node.ctx, ast.Load):
            elts = [self.ev(e, w, scope)[:3] for e in node.elts]
            if isinstance(node, ast.List) or any(isinstance(e, ast.Starred) for e in node.elts):
                return [UNKNOWN]
            return [Tup(tuple(c)) for c in itertools.islice(itertools.product(*elts), MAX_ALTS)]
        if isinstance(node, ast.Dict):
            items: dict[str, Value] = {}
            open_ = False
            for k, v in zip(node.keys, node.values, strict=True):
                vals = self.ev(v, w, scope)
                if k is None:
                    if len(vals) == 1 and isinstance(vals[0], KwDict):
                        items.update(vals[0].items)
                        open_ = open_ or vals[0].open
                    else:
                        open_ = True
                elif isinstance(k, ast.Constant) and isinstance(k.value, str):
                    items[k.value] = vals[0]
                else:
                    self.ev(k, w, scope)
                    open_ = True
            return [KwDict(tuple(items.items()), open_)]
        if isinstance(node, ast.Compare):
            return [self.compare(node, w, scope)]
        if isinstance(node, ast.BoolOp) or isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            truth, kdep = self.truth(node, w, scope)
            return [Const(truth, kdep) if truth is not None else UNKNOWN]
        if isinstance(node, ast.IfExp):
            truth, _ = self.truth(node.test, w, scope)
            out = []
            if truth is not False:
                out += self.ev(node.body, w, scope)
            if truth is not True:
                out += self.ev(node.orelse, w, scope)
            return _dedupe(out)
        if isinstance(node, ast.Lambda):
            return [UNKNOWN]
        if isinstance(node, ast.NamedExpr):
            vals = self.ev(node.value, w, scope)
            w[node.target.id] = vals[0]
            return vals
        # anything else: visit the parts for calls, know nothing of the value
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.ev(child, w, scope)
            elif isinstance(child, ast.comprehension):
                self.ev(child.iter, w, scope)
        return [UNKNOWN]

    def attr(self, base: Value, name: str, node: ast.AST, default: list[Value] | None) -> Value:
        """`base.name`; with `default` (getattr's third argument) a missing name gives
        the default instead of an AttributeError."""
        if isinstance(base, Ref | Inst):
            path = base.path if isinstance(base, Ref) else base.cls
            target = self.api.resolve(path)
            if target is None:
                return UNKNOWN
            if target.kind == "extension":
                return UNKNOWN
            ent = self.api.attribute(target, name)
            if ent is None:
                if default is not None:
                    return _kdep(default[0])
                what = "instance of " + base.cls if isinstance(base, Inst) else base.path
                self.problem(node, f"{what} has no attribute {name!r} in {self.dist} {self.api.version}")
                return UNKNOWN
            if name == "__version__":
                return KVersion()
            if ent.kind in ("unknown", "external"):
                return UNKNOWN
            return Ref(ent.path, bound=isinstance(base, Inst))
        if isinstance(base, Std):
            full = f"{base.path}.{name}"
            if full.startswith("torch.ops.") and name in self.op_namespaces:
                return OpNamespace(name)
            std = STD_NAMES.get(full)
            return Std(std) if std else UNKNOWN
        if isinstance(base, OpNamespace):
            ops = self.api.op_schemas(base.namespace) or {}
            if name in ops:
                return OpRef(base.namespace, name)
            if default is not None:
                return _kdep(default[0])
            self.problem(node, f"torch.ops.{base.namespace} has no operator {name!r} in {self.dist} "
                               f"{self.api.version} (its {base.namespace} registers {len(ops)} operators)")
            return UNKNOWN
        if isinstance(base, OpRef):
            return base if name == "default" else UNKNOWN
        if isinstance(base, SigOf) and name == "parameters":
            ent = self.api.resolve(base.ref.path)
            sig = self.api.signature(ent, base.ref.bound) if ent is not None else None
            if sig is None or sig.varkw:
                return UNKNOWN
            return ParamNames(frozenset((*sig.posonly, *sig.params, *sig.kwonly)))
        return UNKNOWN

    def call(self, node: ast.Call, w: World, scope: _Scope) -> list[Value]:
        callees = self.ev(node.func, w, scope)
        args = [self.ev(a.value if isinstance(a, ast.Starred) else a, w, scope) for a in node.args]
        kwargs = [(k.arg, self.ev(k.value, w, scope)) for k in node.keywords]
        out: list[Value] = []
        for callee in callees:
            out += self.call_one(node, callee, args, kwargs)
        return _dedupe(out)[:MAX_ALTS] or [UNKNOWN]

    def call_one(self, node: ast.Call, callee: Value, args: list[list[Value]],
                 kwargs: list[tuple[str | None, list[Value]]]) -> list[Value]:
        if isinstance(callee, Std):
            return self.call_std(node, callee.path, args, kwargs)
        if isinstance(callee, LocalFunc):
            return self.summary(callee.module, callee.qualname)
        if isinstance(callee, OpRef):
            schema = (self.api.op_schemas(callee.namespace) or {})[callee.op]
            self.report.calls += 1
            self.check_signature(node, schema, f"torch.ops.{callee.namespace}.{callee.op}", kwargs)
            return [UNKNOWN]
        if not isinstance(callee, Ref):
            return [UNKNOWN]
        ent = self.api.resolve(callee.path)
        if ent is None or ent.kind in ("module", "extension", "unknown", "external", "value"):
            return [UNKNOWN]
        if not self.check_calls:
            return [Inst(ent.path)] if ent.kind == "class" else [UNKNOWN]
        self.report.calls += 1
        sig = self.api.signature(ent, callee.bound)
        if sig is None:
            self.report.notes.add(f"{callee.path}: signature not readable from the wheel")
            return [Inst(ent.path)] if ent.kind == "class" else [UNKNOWN]
        self.check_signature(node, sig, ent.path, kwargs)
        return [Inst(ent.path)] if ent.kind == "class" else [UNKNOWN]

    def check_signature(self, node: ast.Call, sig: Signature, target: str,
                        kwargs: list[tuple[str | None, list[Value]]]) -> None:
        npos = len([a for a in node.args if not isinstance(a, ast.Starred)])
        complete = not any(isinstance(a, ast.Starred) for a in node.args)
        # one check per alternative of each **bundle
        bundles: list[list[tuple[tuple[str, ...], bool]]] = []
        named = tuple(k for k, _ in kwargs if k is not None)
        for k, vals in kwargs:
            if k is None:
                opts = []
                for v in vals:
                    if isinstance(v, KwDict):
                        opts.append((tuple(key for key, _ in v.items), not v.open))
                    else:
                        opts.append(((), False))
                bundles.append(opts)
        shown = ast.unparse(node.func)
        for combo in itertools.islice(itertools.product(*bundles), MAX_ALTS):
            keys = named + tuple(k for keys_, _ in combo for k in keys_)
            full = complete and all(c for _, c in combo)
            for why in sig.problems(npos, keys, full):
                self.problem(node, f"{shown}(...) -> {target}{sig.render()} at {sig.where}: {why}")

    def call_std(self, node: ast.Call, what: str, args: list[list[Value]],
                 kwargs: list[tuple[str | None, list[Value]]]) -> list[Value]:
        first = args[0] if args else [UNKNOWN]
        out: list[Value] = []
        if what in ("builtins.getattr", "builtins.hasattr") and len(args) >= 2:
            for obj in first:
                for name in args[1]:
                    if not (isinstance(obj, Ref | Inst | OpNamespace) and isinstance(name, Const)
                            and isinstance(name.value, str)):
                        out.append(UNKNOWN)
                        continue
                    if what == "builtins.hasattr":
                        got = self.attr(obj, name.value, node, default=[Const(False)])
                        out.append(Const(not (isinstance(got, Const) and got.value is False), True))
                    else:
                        default = args[2] if len(args) > 2 else None
                        out.append(self.attr(obj, name.value, node, default=default))
            return _dedupe(out)
        if what == "builtins.callable":
            for v in first:
                if isinstance(v, Ref):
                    ent = self.api.resolve(v.path)
                    kind = ent.kind if ent else ""
                    out.append(Const(True, True) if kind in ("function", "method", "class") else UNKNOWN)
                elif isinstance(v, Const) and v.value is None:
                    out.append(Const(False, v.kdep))
                else:
                    out.append(UNKNOWN)
            return _dedupe(out)
        if what == "builtins.dict":
            items: dict[str, Value] = {}
            open_ = False
            for vals in args:
                if len(vals) == 1 and isinstance(vals[0], KwDict):
                    items.update(vals[0].items)
                    open_ = open_ or vals[0].open
                else:
                    open_ = True
            for k, vals in kwargs:
                if k is None:
                    if len(vals) == 1 and isinstance(vals[0], KwDict):
                        items.update(vals[0].items)
                        open_ = open_ or vals[0].open
                    else:
                        open_ = True
                else:
                    items[k] = vals[0]
            return [KwDict(tuple(items.items()), open_)]
        if what == "importlib.metadata.version":
            if any(isinstance(v, Const) and isinstance(v.value, str) and _same_dist(v.value, self.dist) for v in first):
                return [KVersion()]
            return [UNKNOWN]
        if what == "Version":
            for v in first:
                if isinstance(v, KVersion):
                    out.append(KVersion(parsed=True))
                elif isinstance(v, Const) and isinstance(v.value, str):
                    out.append(VersionConst(v.value))
                else:
                    out.append(UNKNOWN)
            return out
        if what == "inspect.signature":
            return [SigOf(v) if isinstance(v, Ref) else UNKNOWN for v in first]
        return [UNKNOWN]

    # ---- conditions

    def compare(self, node: ast.Compare, w: World, scope: _Scope) -> Value:
        if len(node.ops) != 1:
            for c in [node.left, *node.comparators]:
                self.ev(c, w, scope)
            return UNKNOWN
        op = node.ops[0]
        lefts = self.ev(node.left, w, scope)
        rights = self.ev(node.comparators[0], w, scope)
        results = set()
        kdep = False
        for a, b in itertools.product(lefts, rights):
            kdep = kdep or a.kdep or b.kdep
            results.add(self._compare(a, op, b))
        if len(results) == 1:
            r = results.pop()
            return Const(r, kdep) if r is not None else UNKNOWN
        return UNKNOWN

    def _compare(self, a: Value, op: ast.cmpop, b: Value) -> bool | None:
        if isinstance(op, ast.Is | ast.IsNot):
            none_a = isinstance(a, Const) and a.value is None
            none_b = isinstance(b, Const) and b.value is None
            if none_b and isinstance(a, Ref | Inst | KVersion) or none_a and isinstance(b, Ref | Inst | KVersion):
                same = False
            elif isinstance(a, Const) and isinstance(b, Const) and (none_a or none_b):
                same = none_a and none_b
            else:
                return None
            return same if isinstance(op, ast.Is) else not same
        if isinstance(op, ast.In | ast.NotIn):
            if isinstance(a, Const) and isinstance(b, ParamNames):
                hit = a.value in b.names
                return hit if isinstance(op, ast.In) else not hit
            return None
        if isinstance(a, KVersion) or isinstance(b, KVersion):
            return self._compare_version(a, op, b)
        if isinstance(a, Const) and isinstance(b, Const) and isinstance(op, ast.Eq | ast.NotEq):
            if type(a.value) is not type(b.value) and not (
                    isinstance(a.value, int | float) and isinstance(b.value, int | float)):
                return None if isinstance(op, ast.Eq) else None
            return (a.value == b.value) == isinstance(op, ast.Eq)
        return None

    def _compare_version(self, a: Value, op: ast.cmpop, b: Value) -> bool | None:
        mine = self.api.version
        ops = {ast.Eq: "__eq__", ast.NotEq: "__ne__", ast.Lt: "__lt__", ast.LtE: "__le__",
               ast.Gt: "__gt__", ast.GtE: "__ge__"}
        name = ops.get(type(op))
        if name is None:
            return None

        def side(v: Value) -> Any:
            if isinstance(v, KVersion):
                return Version(mine) if v.parsed else mine
            if isinstance(v, VersionConst):
                return Version(v.text)
            if isinstance(v, Const) and isinstance(v.value, str):
                return v.value
            raise ValueError
        try:
            left, right = side(a), side(b)
            if isinstance(left, Version) != isinstance(right, Version):
                return None  # Version vs str raises TypeError at run time: not a branch we decide
            return bool(getattr(left, name)(right))
        except (ValueError, InvalidVersion):
            return None

    def truth(self, node: ast.expr, w: World, scope: _Scope) -> tuple[bool | None, bool]:
        """(truth value if decidable, whether it depends on the pinned kernel)."""
        if isinstance(node, ast.BoolOp):
            vals = [self.truth(v, w, scope) for v in node.values]
            kdep = any(k for _, k in vals)
            parts = [t for t, _ in vals]
            if isinstance(node.op, ast.And):
                if False in parts:
                    return False, any(k for t, k in vals if t is False)
                return (True if all(t is True for t in parts) else None), kdep
            if True in parts:
                return True, any(k for t, k in vals if t is True)
            return (False if all(t is False for t in parts) else None), kdep
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            t, k = self.truth(node.operand, w, scope)
            return (None if t is None else not t), k
        values = self.ev(node, w, scope)
        truths: set[bool | None] = set()
        kdep = False
        for v in values:
            kdep = kdep or v.kdep
            if isinstance(v, Const):
                truths.add(bool(v.value))
            elif isinstance(v, Ref | Inst):
                truths.add(True)
            else:
                truths.add(None)
        if len(truths) == 1:
            return truths.pop(), kdep
        return None, kdep


# ---------------------------------------------------------------- helpers


def _bind(w: World, name: str, value: Value) -> World:
    return {**w, name: value}


def _kdep(v: Value) -> Value:
    if isinstance(v, Const):
        return Const(v.value, True)
    return v


def _dedupe(values: list[Value]) -> list[Value]:
    out: list[Value] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _cap(worlds: list[World]) -> list[World]:
    out: list[World] = []
    for w in worlds:
        if w not in out:
            out.append(w)
        if len(out) >= MAX_WORLDS:
            break
    return out


def _merge(worlds: list[World]) -> World:
    merged: World = {}
    for w in worlds:
        for k, v in w.items():
            if k not in merged or isinstance(merged[k], Unknown):
                merged[k] = v
    return merged


def _all_args(args: ast.arguments) -> list[ast.arg]:
    out = [*args.posonlyargs, *args.args, *args.kwonlyargs]
    if args.vararg:
        out.append(args.vararg)
    if args.kwarg:
        out.append(args.kwarg)
    return out


def _same_dist(name: str, dist: str) -> bool:
    return name.lower().replace("_", "-") == dist


def _module_name(rel: str) -> str:
    parts = list(Path(rel).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _relative(module: str, rel: str, level: int, name: str | None) -> str:
    parts = module.split(".")
    if Path(rel).name != "__init__.py":
        parts = parts[:-1]
    parts = parts[: max(0, len(parts) - (level - 1))]
    return ".".join([*parts, *([name] if name else [])])


def _only_import_errors(h: ast.ExceptHandler) -> bool:
    if h.type is None:
        return False
    names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
    return all(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


def _imports_package(body: list[ast.stmt], package: str) -> bool:
    def ours(m: str) -> bool:
        return m == package or m.startswith(package + ".")
    for node in body:
        for n in ast.walk(node):
            if isinstance(n, ast.Import) and any(ours(a.name) for a in n.names):
                return True
            if isinstance(n, ast.ImportFrom) and not n.level and ours(n.module or ""):
                return True
    return False


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------- the pinned wheel


@dataclass(frozen=True)
class PinnedKernel:
    wheel: Path | None
    version: str | None  # the version the recipe pins, when it names one
    how: str  # where the wheel came from, or why there is none
    given: bool = False  # --kernel-wheel: the user chose the wheel


def _version_from_url(url: str) -> str | None:
    name = unquote(Path(urlparse(url).path).name)
    parts = name.split("-")
    return parts[1] if name.endswith(".whl") and len(parts) >= 5 else None


def find_pinned_wheel(ctx: CheckContext) -> PinnedKernel:
    """The wheel of the kernel release the recipe pins (see the module docstring for the order)."""
    from stackbuild.checks.platform import _cached_kernel_wheel, _locked_kernel_wheel
    from stackbuild.sources.git import apply_mirrors

    pin = ctx.recipe.pin(KERNELS)
    given = ctx.options.get("kernel_wheel")
    if given:
        wanted = None
        if pin is not None:
            spec = pin.spec.strip()
            if spec.startswith("==") and not spec.startswith("===") and "*" not in spec:
                wanted = spec[2:].strip()
            elif pin.url:
                wanted = _version_from_url(pin.url)
        return PinnedKernel(Path(given), wanted, f"--kernel-wheel {given}", given=True)
    if pin is None:
        return PinnedKernel(None, None, f"the recipe pins no {KERNELS}")
    lockfile = Path(ctx.options.get("lockfile") or default_lockfile(ctx.recipe))
    local, version = _locked_kernel_wheel(ctx.recipe, lockfile)
    if local is not None:
        return PinnedKernel(local, version, f"local wheel {local}")
    spec = pin.spec.strip()
    if spec.startswith("==") and not spec.startswith("===") and "*" not in spec:
        version = spec[2:].strip()
    if version is None:
        return PinnedKernel(None, None, f"pin {KERNELS} {pin.spec or pin.url!r} names no single release")
    cached = _cached_kernel_wheel(version)
    if cached is not None and (pin.sha256 is None or _sha_ok(cached, pin.sha256)):
        return PinnedKernel(cached, version, f"cached wheel {cached}")
    if pin.url:
        mirrored = apply_mirrors(pin.url)
        parsed = urlparse(mirrored)
        if parsed.scheme in ("", "file"):
            path = Path(unquote(parsed.path))
            if path.is_file():
                if pin.sha256 and not _sha_ok(path, pin.sha256):
                    raise StackbuildError(f"{path} does not match the pinned sha256 {pin.sha256}",
                                          key=f"pins.{KERNELS}")
                return PinnedKernel(path, version, f"mirror {path}")
        elif mirrored != pin.url:
            if not pin.sha256:
                return PinnedKernel(None, version, f"{KERNELS} {version} is pinned by URL without a sha256; "
                                                   "give --kernel-wheel to read it")
            dest = pinned_wheel.cached_wheel_dir(KERNELS, version) / Path(unquote(urlparse(pin.url).path)).name
            from stackbuild.sources.pypi import download_verified
            if not dest.exists():
                download_verified(mirrored, dest, pin.sha256)
            return PinnedKernel(dest, version, f"mirror {mirrored}")
        return PinnedKernel(None, version, f"{KERNELS} {version} is a release outside the package index "
                                           f"({pin.url}); give --kernel-wheel or a mirror to check against it")
    wheel = pinned_wheel.fetch_wheel(KERNELS, version, pin.index, pin.sha256)
    return PinnedKernel(wheel, version, f"index wheel {wheel.name}")


def _sha_ok(path: Path, sha256: str) -> bool:
    from stackbuild.cache import sha256_file
    return sha256_file(path) == sha256


# ---------------------------------------------------------------- files and the check


def op_namespaces(api: WheelAPI, tree: Path) -> frozenset[str]:
    """The torch.ops namespaces only the kernel package registers: its top-level
    extension modules minus those the patched source builds itself (vLLM's own `_C`
    and `_moe_C` share names with the kernel's, and their ops are not the kernel's)."""
    from stackbuild.checks.imports import ModuleIndex

    own = {e.rsplit(".", 1)[-1] for e in ModuleIndex(tree).extensions()}
    return frozenset(e.split(".", 1)[1] for e in api.extensions
                     if e.count(".") == 1 and e.split(".", 1)[0] == PACKAGE and e.split(".", 1)[1] not in own)


# What marks a file as using the kernel package: its import name, and the operator
# namespace its native ops are called through (vLLM calls them as torch.ops._xpu_C.*).
KERNEL_MARKERS = (PACKAGE.encode(), b"torch.ops._xpu_C")


def kernel_files(tree: Path, touched: tuple[str, ...]) -> tuple[list[str], set[str]]:
    """(files to analyse, those among them the series touched): the touched Python
    files and every file of the tree that mentions the kernel package."""
    out: list[str] = []
    for path in sorted(tree.rglob("*.py")):
        rel_parts = path.relative_to(tree).parts
        if any(p in SKIP_DIRS or p.startswith(".") for p in rel_parts[:-1]):
            continue
        try:
            data = path.read_bytes() if path.is_file() else b""
            if any(m in data for m in KERNEL_MARKERS):
                out.append(path.relative_to(tree).as_posix())
        except OSError:
            continue  # unreadable: the compile check names it (when the series touches it)
    touched_py = {t for t in touched if t.endswith(".py")}
    for t in sorted(touched_py):
        if t not in out:
            out.append(t)
    return out, touched_py


def check_tree(api: WheelAPI, tree: Path, files: list[str], touched: set[str], *, package: str = PACKAGE,
               dist: str = KERNELS, check: str = CHECK, check_calls: bool = True) -> list[CheckResult]:
    """One result per file that uses `package` (imports it or calls into it), judged
    against the release `api` was read from."""
    parsed: dict[str, ast.Module] = {}
    results: list[CheckResult] = []
    for rel in files:
        path = tree / rel
        if not present(path):
            results.append(CheckResult(check, CheckStatus.SKIP, "file deleted by the series", subject=rel))
            continue
        got = parse_python(path, rel)
        if isinstance(got, Unparsable):
            results.append(CheckResult(check, CheckStatus.SKIP,
                                       f"not checked: {got.render()} (see the compile check)", subject=rel))
        else:
            parsed[rel] = got
    program = Program(api, tree, parsed, package, dist, check_calls, op_namespaces(api, tree) if check_calls else frozenset())
    reports = program.run()
    for rel, rep in reports.items():
        if rep.imports == 0 and rep.calls == 0 and not rep.problems and not rep.unchecked:
            continue  # a touched file that does not use the package
        hard = sorted((p for p in rep.problems if not p.fallback or "raises" in p.fallback),
                      key=lambda p: (p.line, p.what))
        soft = sorted((p for p in rep.problems if p.fallback and "raises" not in p.fallback),
                      key=lambda p: (p.line, p.what))
        unchecked = sorted(rep.unchecked, key=lambda u: u.line)
        data = {
            "version": api.version,
            "touched": rel in touched,
            "imports": rep.imports,
            "calls": rep.calls,
            "problems": [p.render() for p in hard],
            "fallbacks": [p.render() for p in soft],
            "not_checked": [u.render() for u in unchecked],
            "notes": sorted(rep.notes),
        }
        origin = "" if rel in touched else " (not touched by the series)"
        extra = [p.render() for p in soft] + [u.render() for u in unchecked]
        tail = f"; {'; '.join(extra)}" if extra else ""
        if hard:
            results.append(CheckResult(check, CheckStatus.FAIL,
                                       f"{dist} {api.version}{origin}: " + "; ".join(p.render() for p in hard) + tail,
                                       subject=rel, data=data))
        else:
            calls = f" and {rep.calls} calls" if check_calls else ""
            results.append(CheckResult(check, CheckStatus.PASS,
                                       f"{rep.imports} imports{calls} resolve in {dist} "
                                       f"{api.version}{origin}{tail}", subject=rel, data=data))
    return results


def run(ctx: CheckContext) -> list[CheckResult]:
    if not ctx.touched:
        return [CheckResult(CHECK, CheckStatus.SKIP, "no applied series (nothing touched)")]
    pinned = find_pinned_wheel(ctx)
    if pinned.wheel is None:
        return [CheckResult(CHECK, CheckStatus.SKIP, pinned.how, subject=KERNELS,
                            data={"version": pinned.version})]
    api = WheelAPI(pinned.wheel)
    results: list[CheckResult] = []
    if pinned.version and pinned.version != api.version:
        data = {"version": api.version, "pinned": pinned.version}
        if pinned.given:  # the user asked for another release: judged against it, the pin stays unchecked
            results.append(CheckResult(CHECK, CheckStatus.SKIP,
                                       f"the pinned {KERNELS} {pinned.version} was not checked: {pinned.how} is "
                                       f"{api.version}, and the rows below are for that release",
                                       subject=KERNELS, data=data))
        else:
            results.append(CheckResult(CHECK, CheckStatus.FAIL,
                                       f"the wheel read ({pinned.how}) is {KERNELS} {api.version}; the recipe pins "
                                       f"{pinned.version}", subject=KERNELS, data=data))
    for source, touched in ctx.touched.items():
        tree = ctx.tree(source)
        if not tree.is_dir():
            results.append(CheckResult(CHECK, CheckStatus.FAIL, f"{tree} does not exist", subject=source))
            continue
        files, touched_py = kernel_files(tree, touched)
        results.extend(check_tree(api, tree, files, touched_py))
    if not results:
        return [CheckResult(CHECK, CheckStatus.SKIP, f"nothing in the tree uses {PACKAGE}")]
    return results
