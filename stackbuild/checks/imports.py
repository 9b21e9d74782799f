"""Import closure: every in-tree import of a touched file resolves in the patched tree.

A backport taken from a newer release often imports names its new base lacks (vLLM
0.23.0's gemma4_unified.py needs `gemma4_mm._get_max_soft_tokens`, which 0.19.0 does
not have). Importing the module would catch that, but only on a machine that can
import vLLM at all; this check reads the source (AST only) and works anywhere.

`ModuleIndex` is the shared, lazily parsed view of one source tree: which modules
exist and which names each defines at module level. The registry check uses it too.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from stackbuild.checks import CheckContext, CheckResult, CheckStatus
from stackbuild.checks.treefile import Unparsable, parse_python, present

CHECK = "imports"

# Parsed module tables shared between checks and runs: keyed by path, mtime and size,
# so an edited file is parsed again and an unchanged one never is.
_TABLE_CACHE: dict[tuple[str, int, int], ModuleTable] = {}


@dataclass(frozen=True)
class Binding:
    """How a module-level name comes to exist."""

    kind: str  # def, class, assign, import, from, submodule, star, __all__, __getattr__, extension
    line: int
    # for kind "from": the module imported from (absolute when it could be resolved) and name
    source_module: str | None = None
    source_name: str | None = None

    @property
    def note(self) -> str:
        if self.kind == "__getattr__":
            return f"module-level __getattr__ (line {self.line}) answers any name"
        if self.kind == "star-external":
            return f"star import from {self.source_module} (line {self.line}), not in the tree"
        if self.kind == "extension":
            return "made by the build (compiled extension or a file .gitignore lists), not in the source tree"
        if self.kind == "unparsable":
            return f"not checked: {self.source_name}"
        return ""


@dataclass(frozen=True)
class ImportRef:
    """One imported module or name in a checked file."""

    line: int
    module: str  # absolute module name ("" when a relative import climbs out of the tree)
    name: str | None  # None for `import a.b.c`
    # "" for a plain import; "try/except ImportError" or "if TYPE_CHECKING" when a
    # missing module or name there does not break importing the file
    guard: str
    text: str  # as written, for messages


@dataclass
class ModuleTable:
    """The module-level names one file binds (no import is executed)."""

    bindings: dict[str, Binding] = field(default_factory=dict)
    stars: list[tuple[str, int]] = field(default_factory=list)  # (absolute module, line)
    all_names: tuple[str, ...] | None = None
    getattr_line: int | None = None
    syntax_error: str | None = None


@dataclass(frozen=True)
class Module:
    name: str
    path: Path | None  # None for a namespace package or a compiled extension
    is_package: bool
    extension: bool = False


class ModuleIndex:
    """Modules of one source tree, parsed on first use."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.packages = frozenset(
            p.name for p in self.root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()
        ) if self.root.is_dir() else frozenset()
        self._modules: dict[str, Module | None] = {}
        self._extensions: frozenset[str] | None = None
        self._ignore: list[tuple[bool, str, bool]] | None = None

    # ---------------------------------------------------------------- modules

    def is_local(self, module: str) -> bool:
        return module.split(".", 1)[0] in self.packages

    def extensions(self) -> frozenset[str]:
        """Extension modules setup.py builds (vllm._C, ...): present only after a build."""
        if self._extensions is None:
            names: set[str] = set()
            setup = self.root / "setup.py"
            if setup.is_file():
                text = setup.read_text(encoding="utf-8", errors="replace")
                names.update(re.findall(r"""CMakeExtension\(\s*name\s*=\s*["']([\w.]+)["']""", text))
            self._extensions = frozenset(names)
        return self._extensions

    def is_build_product(self, base: Path) -> bool:
        """Whether the tree's .gitignore says this module is made by the build (vLLM's
        vllm_flash_attn/*, third_party/flashmla/...): the source release cannot hold it."""
        if self._ignore is None:
            self._ignore = _gitignore_rules(self.root / ".gitignore")
        if not self._ignore:
            return False
        rel = base.relative_to(self.root).as_posix()
        for cand in (rel + ".py", rel, rel + "/__init__.py"):
            ignored = False
            for negate, pattern, anchored in self._ignore:
                if _ignore_match(cand, pattern, anchored):
                    ignored = not negate
            if ignored:
                return True
        return False

    def module(self, name: str) -> Module | None:
        if name in self._modules:
            return self._modules[name]
        found: Module | None = None
        parts = name.split(".")
        if all(p.isidentifier() for p in parts):
            base = self.root.joinpath(*parts)
            if present(base / "__init__.py"):
                found = Module(name, base / "__init__.py", True)
            elif present(base.with_suffix(".py")):
                found = Module(name, base.with_suffix(".py"), False)
            elif base.is_dir():
                found = Module(name, None, True)  # namespace package
            elif name in self.extensions() or self.is_build_product(base):
                found = Module(name, None, False, extension=True)
        self._modules[name] = found
        return found

    def file_module(self, rel: str) -> str:
        """The module name of a file path relative to the tree root."""
        parts = list(Path(rel).with_suffix("").parts)
        if parts and parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts)

    # ---------------------------------------------------------------- names

    def table(self, module: Module) -> ModuleTable:
        if module.path is None:
            return ModuleTable()
        return module_table(module.path, module.name, module.is_package)

    def lookup(self, module_name: str, name: str, _seen: frozenset[str] = frozenset()) -> Binding | None:
        """How `name` is defined in `module_name`, or None when it is not."""
        mod = self.module(module_name)
        if mod is None or module_name in _seen:
            return None
        if mod.extension:
            return Binding("extension", 0)
        seen = _seen | {module_name}
        table = self.table(mod)
        if table.syntax_error is not None:  # a broken file: nothing can be said about its names
            return Binding("unparsable", 0, source_module=module_name, source_name=table.syntax_error)
        if name in table.bindings:
            return table.bindings[name]
        if mod.is_package and self.module(f"{module_name}.{name}") is not None:
            return Binding("submodule", 0, source_module=f"{module_name}.{name}")
        for star_mod, line in table.stars:
            target = self.module(star_mod) if self.is_local(star_mod) else None
            if target is None:
                if not self.is_local(star_mod):
                    return Binding("star-external", line, source_module=star_mod)
                continue
            exported = self.table(target).all_names
            if exported is not None:
                if name in exported:
                    return Binding("star", line, source_module=star_mod, source_name=name)
            elif not name.startswith("_") and self.lookup(star_mod, name, seen) is not None:
                return Binding("star", line, source_module=star_mod, source_name=name)
        if table.all_names is not None and name in table.all_names:
            return Binding("__all__", 0)
        if table.getattr_line is not None:
            return Binding("__getattr__", table.getattr_line)
        return None

    def origin(self, module_name: str, name: str) -> tuple[str, Binding] | None:
        """Follow in-tree re-exports to where `name` is finally bound."""
        seen: set[tuple[str, str]] = set()
        cur_mod, cur_name = module_name, name
        while (cur_mod, cur_name) not in seen:
            seen.add((cur_mod, cur_name))
            b = self.lookup(cur_mod, cur_name)
            if b is None:
                return None
            nxt_mod = b.source_module
            if b.kind in ("from", "star") and nxt_mod and self.is_local(nxt_mod) and b.source_name:
                if self.module(nxt_mod) is None:
                    return cur_mod, b
                cur_mod, cur_name = nxt_mod, b.source_name
                continue
            return cur_mod, b
        return None

    # ---------------------------------------------------------------- imports of a file

    def imports_of(self, path: Path, rel: str) -> tuple[list[ImportRef], str | None]:
        """Every import of an in-tree module in a file (functions included)."""
        tree = parse_python(path, rel)
        if isinstance(tree, Unparsable):
            return [], tree.render()
        this = self.file_module(rel)
        is_pkg = Path(rel).name == "__init__.py"
        refs: list[ImportRef] = []

        def visit(node: ast.AST, guarded: str) -> None:
            if isinstance(node, ast.If) and _is_type_checking(node.test):
                for child in node.body:
                    visit(child, guarded or "if TYPE_CHECKING")
                for child in node.orelse:
                    visit(child, guarded)
                return
            if isinstance(node, ast.Try | ast.TryStar):
                catches = any(catches_import_error(h) for h in node.handlers)
                for child in node.body:
                    visit(child, guarded or ("try/except ImportError" if catches else ""))
                for h in node.handlers:
                    visit(h, guarded)
                for child in node.orelse + node.finalbody:
                    visit(child, guarded)
                return
            if isinstance(node, ast.With | ast.AsyncWith) and any(_suppresses_import_error(i) for i in node.items):
                for child in node.body:
                    visit(child, guarded or "with suppress(ImportError)")
                return
            if isinstance(node, ast.Import):
                for a in node.names:
                    if self.is_local(a.name):
                        refs.append(ImportRef(getattr(a, "lineno", node.lineno), a.name, None, guarded, f"import {a.name}"))
                return
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _relative_base(this, is_pkg, node.level)
                    if base is None:
                        refs.append(ImportRef(node.lineno, "", None, guarded, _from_text(node)))
                        return
                    mod = f"{base}.{node.module}" if node.module and base else (node.module or base)
                else:
                    mod = node.module or ""
                    if not self.is_local(mod):
                        return
                for a in node.names:
                    refs.append(ImportRef(getattr(a, "lineno", node.lineno), mod, a.name, guarded, _from_text(node)))
                return
            for sub in ast.iter_child_nodes(node):
                visit(sub, guarded)

        visit(tree, "")
        return refs, None


@dataclass(frozen=True)
class Unresolved:
    file: str
    line: int
    what: str  # "name 'x' is not defined in vllm.a.b" / "module vllm.a.c does not exist"
    guard: str  # see ImportRef.guard

    def render(self) -> str:
        return f"{self.file}:{self.line}: {self.what}" + (f" (under {self.guard})" if self.guard else "")


def resolve_file(index: ModuleIndex, path: Path, rel: str) -> tuple[int, list[Unresolved], list[str], str | None]:
    """(imports checked, unresolved, notes, parse error) for one file."""
    refs, error = index.imports_of(path, rel)
    if error:
        return 0, [], [], error
    unresolved: list[Unresolved] = []
    notes: list[str] = []
    for ref in refs:
        if not ref.module:
            unresolved.append(Unresolved(rel, ref.line, f"relative import climbs out of the tree: {ref.text}", ref.guard))
            continue
        if ref.name is None:
            parts = ref.module.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if index.module(prefix) is None:
                    unresolved.append(Unresolved(rel, ref.line, f"module {prefix} does not exist ({_module_paths(prefix)})", ref.guard))
                    break
            continue
        mod = index.module(ref.module)
        if mod is None:
            unresolved.append(Unresolved(rel, ref.line, f"module {ref.module} does not exist ({_module_paths(ref.module)})", ref.guard))
            continue
        if ref.name == "*":
            continue
        b = index.lookup(ref.module, ref.name)
        if b is None:
            unresolved.append(Unresolved(rel, ref.line, f"name {ref.name!r} is not defined in {ref.module}", ref.guard))
        elif b.note:
            notes.append(f"{ref.module}.{ref.name}: {b.note}")
    return len(refs), unresolved, sorted(set(notes)), None


def check_files(tree: Path, files: list[str], index: ModuleIndex | None = None) -> list[CheckResult]:
    index = index or ModuleIndex(tree)
    results: list[CheckResult] = []
    for rel in files:
        path = tree / rel
        if not present(path):
            results.append(CheckResult(CHECK, CheckStatus.SKIP, "file deleted by the series", subject=rel))
            continue
        count, unresolved, notes, error = resolve_file(index, path, rel)
        if error:
            results.append(CheckResult(CHECK, CheckStatus.SKIP, f"not checked: {error} (see the compile check)",
                                       subject=rel))
            continue
        hard = [u for u in unresolved if not u.guard]
        data = {
            "imports": count,
            "unresolved": [{"file": u.file, "line": u.line, "what": u.what, "guard": u.guard} for u in unresolved],
            "notes": notes,
        }
        if hard:
            detail = "; ".join(u.render() for u in hard)
            results.append(CheckResult(CHECK, CheckStatus.FAIL, detail, subject=rel, data=data))
        else:
            extra = [u.render() for u in unresolved] + notes
            detail = f"{count} in-tree imports resolve" + (f" ({'; '.join(extra)})" if extra else "")
            results.append(CheckResult(CHECK, CheckStatus.PASS, detail, subject=rel, data=data))
    return results


def run(ctx: CheckContext) -> list[CheckResult]:
    results: list[CheckResult] = []
    for source, files in ctx.touched.items():
        py = [f for f in files if f.endswith(".py")]
        if py:
            results.extend(check_files(ctx.tree(source), py))
    if not results:
        return [CheckResult(CHECK, CheckStatus.SKIP, "the series touches no Python files")]
    return results


# ---------------------------------------------------------------- module tables


def module_table(path: Path, module_name: str, is_package: bool) -> ModuleTable:
    try:
        st = path.stat()
    except OSError:  # a dangling symlink: parse_python says why, nothing to cache by
        return _build_table(path, module_name, is_package)
    key = (str(path), st.st_mtime_ns, st.st_size)
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = _build_table(path, module_name, is_package)
        _TABLE_CACHE[key] = table
    return table


def _build_table(path: Path, module_name: str, is_package: bool) -> ModuleTable:
    table = ModuleTable()
    tree = parse_python(path, str(path))
    if isinstance(tree, Unparsable):
        table.syntax_error = tree.render()
        return table
    def bind(name: str, b: Binding) -> None:
        table.bindings.setdefault(name, b)

    def stmts(body: list[ast.stmt]) -> None:
        for node in body:
            stmt(node)

    def stmt(node: ast.stmt) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            bind(node.name, Binding("def", node.lineno))
            if node.name == "__getattr__":
                table.getattr_line = node.lineno
        elif isinstance(node, ast.ClassDef):
            bind(node.name, Binding("class", node.lineno))
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in _target_names(t):
                    bind(n, Binding("assign", node.lineno))
                if isinstance(t, ast.Name) and t.id == "__all__":
                    table.all_names = _literal_names(node.value) or table.all_names
        elif isinstance(node, ast.AnnAssign):
            if node.value is not None and isinstance(node.target, ast.Name):
                bind(node.target.id, Binding("assign", node.lineno))
                if node.target.id == "__all__":
                    table.all_names = _literal_names(node.value) or table.all_names
        elif isinstance(node, ast.AugAssign):
            if isinstance(node.target, ast.Name):
                bind(node.target.id, Binding("assign", node.lineno))
                if node.target.id == "__all__":
                    table.all_names = (table.all_names or ()) + (_literal_names(node.value) or ())
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            f = node.value.func  # __all__.extend([...]) / __all__.append("x")
            if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "__all__"
                    and f.attr in ("extend", "append") and node.value.args):
                arg = node.value.args[0]
                extra = _literal_names(arg) if f.attr == "extend" else _literal_names(ast.List([arg]))
                table.all_names = (table.all_names or ()) + (extra or ())
        elif isinstance(node, ast.Import):
            for a in node.names:
                bind(a.asname or a.name.split(".")[0], Binding("import", node.lineno, source_module=a.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _relative_base(module_name, is_package, node.level)
                src = f"{base}.{node.module}" if (base and node.module) else (node.module or base or "")
            else:
                src = node.module or ""
            for a in node.names:
                if a.name == "*":
                    table.stars.append((src, node.lineno))
                else:
                    bind(a.asname or a.name, Binding("from", node.lineno, source_module=src, source_name=a.name))
        elif isinstance(node, ast.If | ast.While):
            stmts(node.body)
            stmts(node.orelse)
        elif isinstance(node, ast.For | ast.AsyncFor):
            for n in _target_names(node.target):
                bind(n, Binding("assign", node.lineno))
            stmts(node.body)
            stmts(node.orelse)
        elif isinstance(node, ast.With | ast.AsyncWith):
            for item in node.items:
                if item.optional_vars is not None:
                    for n in _target_names(item.optional_vars):
                        bind(n, Binding("assign", node.lineno))
            stmts(node.body)
        elif isinstance(node, ast.Try | ast.TryStar):
            stmts(node.body)
            for h in node.handlers:
                if h.name:
                    bind(h.name, Binding("assign", h.lineno))
                stmts(h.body)
            stmts(node.orelse)
            stmts(node.finalbody)
        elif isinstance(node, ast.Match):
            for case in node.cases:
                stmts(case.body)

    stmts(tree.body)
    return table


def _target_names(t: ast.expr) -> list[str]:
    if isinstance(t, ast.Name):
        return [t.id]
    if isinstance(t, ast.Tuple | ast.List):
        return [n for e in t.elts for n in _target_names(e)]
    if isinstance(t, ast.Starred):
        return _target_names(t.value)
    return []


def _literal_names(node: ast.expr) -> tuple[str, ...] | None:
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        out = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        return tuple(out)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _literal_names(node.left), _literal_names(node.right)
        return (left or ()) + (right or ())
    return None


def _relative_base(module_name: str, is_package: bool, level: int) -> str | None:
    """The package a relative import of `level` dots names; None beyond the top package."""
    parts = module_name.split(".") if module_name else []
    if not is_package:
        parts = parts[:-1]
    drop = level - 1
    if drop >= len(parts):
        return None
    return ".".join(parts[: len(parts) - drop])


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def catches_import_error(h: ast.ExceptHandler) -> bool:
    """Whether an `except` clause would catch a failing import (api_closure uses it too)."""
    if h.type is None:
        return True
    names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception", "BaseException")
               for n in names)


def _suppresses_import_error(item: ast.withitem) -> bool:
    """`with contextlib.suppress(ImportError):` (or `suppress(...)` imported by name)
    guards its body as `try/except ImportError` does (vLLM 0.33.0 platforms/xpu.py:136)."""
    call = item.context_expr
    if not isinstance(call, ast.Call):
        return False
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name == "suppress" and any(
        isinstance(a, ast.Name) and a.id in ("ImportError", "ModuleNotFoundError", "Exception", "BaseException")
        for a in call.args)


def _from_text(node: ast.ImportFrom) -> str:
    names = ", ".join(a.name for a in node.names)
    return f"from {'.' * node.level}{node.module or ''} import {names}"


def _gitignore_rules(path: Path) -> list[tuple[bool, str, bool]]:
    rules: list[tuple[bool, str, bool]] = []
    if not path.is_file():
        return rules
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line.lstrip("!").rstrip("/")
        anchored = "/" in line
        rules.append((negate, line.lstrip("/"), anchored))
    return rules


def _ignore_match(rel: str, pattern: str, anchored: bool) -> bool:
    if anchored:
        # "dir/*" ignores everything below dir, as git does once the directory is ignored
        return fnmatch.fnmatchcase(rel, pattern) or any(
            fnmatch.fnmatchcase(rel[: i], pattern) for i in range(len(rel)) if rel[i] == "/"
        )
    return any(fnmatch.fnmatchcase(part, pattern) for part in rel.split("/"))


def _module_paths(module: str) -> str:
    p = module.replace(".", os.sep)
    return f"no {p}.py or {p}{os.sep}__init__.py"
