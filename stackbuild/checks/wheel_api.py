"""The Python API of one wheel, read by AST from the archive (never installed, never
imported): which modules exist, which names each defines or re-exports, and the
signature of each function, method and class constructor.

Compiled extension modules (`_C.abi3.so`) exist as modules, but their attributes
cannot be read: a name looked up in one resolves as `extension` (not verifiable here).
"""

from __future__ import annotations

import ast
import contextlib
import json
import posixpath
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from stackbuild.cache import atomic_write_text, cache_dir
from stackbuild.errors import SourceError

# Where a name comes from when the wheel's code cannot tell more.
UNKNOWN_KINDS = frozenset({"extension", "external", "value", "unknown"})


@dataclass(frozen=True)
class Signature:
    """What a callable accepts (the bound `self`/`cls` already dropped)."""

    posonly: tuple[str, ...]
    params: tuple[str, ...]  # positional-or-keyword, in order
    kwonly: tuple[str, ...]
    required: frozenset[str]
    varargs: bool
    varkw: bool
    where: str  # file:line in the wheel

    def render(self) -> str:
        parts = [*self.posonly, *(["/"] if self.posonly else []), *self.params]
        if self.varargs:
            parts.append("*args")
        elif self.kwonly:
            parts.append("*")
        parts += list(self.kwonly)
        if self.varkw:
            parts.append("**kwargs")
        return "(" + ", ".join(parts) + ")"

    def problems(self, npos: int, keywords: tuple[str, ...], complete: bool) -> list[str]:
        """Why a call with `npos` positional and these keyword arguments fails; with
        `complete`, the call has no unknown `*args`/`**kwargs`, so missing required
        arguments count too."""
        out: list[str] = []
        positional = (*self.posonly, *self.params)
        by_keyword = set(self.params) | set(self.kwonly)
        if npos > len(positional) and not self.varargs:
            out.append(f"takes {len(positional)} positional argument(s), {npos} given")
        filled = set(positional[:npos])
        for k in keywords:
            if k in filled:
                out.append(f"got multiple values for argument {k!r}")
            elif k not in by_keyword and not self.varkw:
                out.append(f"unexpected keyword argument {k!r}")
        if complete:
            missing = sorted(self.required - filled - set(keywords))
            if missing:
                out.append("missing required argument(s) " + ", ".join(repr(m) for m in missing))
        return out


@dataclass(frozen=True)
class Entity:
    kind: str  # module, extension, function, class, method, value, external, unknown
    path: str  # dotted, as looked up
    file: str | None = None  # in the wheel
    line: int = 0
    node: ast.AST | None = None
    decorators: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.file else self.path


@dataclass
class _Module:
    name: str
    file: str | None
    is_package: bool
    extension: bool = False
    tree: ast.Module | None = None
    names: dict[str, ast.AST] = field(default_factory=dict)
    stars: list[str] = field(default_factory=list)
    getattr_line: int | None = None


class WheelAPI:
    """The modules of one wheel, parsed on first use."""

    def __init__(self, wheel: Path):
        self.wheel = Path(wheel)
        try:
            _, version, _, _ = parse_wheel_filename(self.wheel.name)
            self.version = str(version)
        except InvalidWheelFilename:
            raise SourceError("not a wheel file name (NAME-VERSION-...-TAG.whl)", file=wheel) from None
        self._py: set[str] = set()  # .py members; read on first use (transformers has thousands)
        self._read_cache: dict[str, bytes] = {}
        self._dirs: set[str] = set()
        self.extensions: set[str] = set()
        self.packages: set[str] = set()
        try:
            self._zip = zipfile.ZipFile(self.wheel)
        except (zipfile.BadZipFile, OSError) as e:
            raise SourceError(f"cannot read the wheel: {e}", file=wheel) from None
        for name in self._zip.namelist():
            if ".dist-info/" in name or ".data/" in name:
                continue
            if name.endswith(".py"):
                mod = name[:-3].replace("/", ".")
                if mod.endswith(".__init__"):
                    self.packages.add(mod[: -len(".__init__")])
                self._py.add(name)
                parts = name.split("/")[:-1]
                self._dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
            elif name.endswith((".so", ".pyd")):
                stem = posixpath.basename(name).split(".", 1)[0]
                folder = posixpath.dirname(name).replace("/", ".")
                self.extensions.add(f"{folder}.{stem}" if folder else stem)
        self._modules: dict[str, _Module | None] = {}
        self._ops: dict[str, dict[str, Signature] | None] = {}

    # ---------------------------------------------------------------- native operators

    def op_schemas(self, namespace: str) -> dict[str, Signature] | None:
        """The operators the extension module `namespace` (e.g. `_xpu_C`) registers
        with torch, read from the schema strings in its .so (`name(Tensor A, int g,
        Tensor? b=None) -> Tensor`); None when the wheel has no such top-level module."""
        if namespace in self._ops:
            return self._ops[namespace]
        member = next((m for m in self._zip.namelist() if m.count("/") == 1
                       and posixpath.basename(m).split(".", 1)[0] == namespace
                       and m.endswith((".so", ".pyd"))), None)
        if member is None:
            self._ops[namespace] = None
            return None
        st = self.wheel.stat()
        memo = cache_dir() / "api" / f"{self.wheel.name}-{st.st_size}-{st.st_mtime_ns}-{namespace}.json"
        try:
            raw = json.loads(memo.read_text(encoding="utf-8"))
            self._ops[namespace] = {k: Signature(tuple(v[0]), tuple(v[1]), tuple(v[2]), frozenset(v[3]),
                                                 v[4], v[5], v[6]) for k, v in raw.items()}
            return self._ops[namespace]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            pass  # not read yet (or damaged): read the .so
        try:
            data = self._zip.read(member)
        except (zipfile.BadZipFile, OSError) as e:
            raise SourceError(f"cannot read {member}: {e}", file=self.wheel) from None
        ops = _schemas_in(data, member)
        with contextlib.suppress(OSError):  # a read-only cache: read the .so again next time
            atomic_write_text(memo, json.dumps({k: [list(v.posonly), list(v.params), list(v.kwonly),
                                                    sorted(v.required), v.varargs, v.varkw, v.where]
                                                for k, v in ops.items()}))
        self._ops[namespace] = ops
        return ops

    def _source(self, member: str) -> bytes | None:
        if member not in self._py:
            return None
        if member not in self._read_cache:
            try:
                self._read_cache[member] = self._zip.read(member)
            except (zipfile.BadZipFile, OSError, KeyError) as e:
                raise SourceError(f"cannot read {member}: {e}", file=self.wheel) from None
        return self._read_cache[member]

    # ---------------------------------------------------------------- modules

    def module(self, name: str) -> _Module | None:
        if name in self._modules:
            return self._modules[name]
        base = name.replace(".", "/")
        found: _Module | None = None
        if f"{base}/__init__.py" in self._py:
            found = _Module(name, f"{base}/__init__.py", True)
        elif f"{base}.py" in self._py:
            found = _Module(name, f"{base}.py", False)
        elif name in self.extensions:
            found = _Module(name, None, False, extension=True)
        elif base in self._dirs:
            found = _Module(name, None, True)  # namespace package
        if found is not None and found.file is not None:
            self._read(found)
        self._modules[name] = found
        return found

    def _read(self, mod: _Module) -> None:
        assert mod.file is not None
        try:
            mod.tree = ast.parse(self._source(mod.file) or b"", filename=mod.file)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            mod.getattr_line = 0  # unreadable: answer every name as unknown rather than "missing"
            return

        def walk(body: list[ast.stmt]) -> None:
            for node in body:
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    mod.names.setdefault(node.name, node)
                    if node.name == "__getattr__":
                        mod.getattr_line = node.lineno
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        mod.names.setdefault(a.asname or a.name.split(".")[0], node)
                elif isinstance(node, ast.ImportFrom):
                    for a in node.names:
                        if a.name == "*":
                            mod.stars.append(self._absolute(mod, node))
                        else:
                            mod.names.setdefault(a.asname or a.name, node)
                elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for t in targets:
                        for n in ast.walk(t):
                            if isinstance(n, ast.Name):
                                mod.names.setdefault(n.id, node)
                elif isinstance(node, ast.If | ast.For | ast.While | ast.With | ast.Try | ast.TryStar):
                    walk(getattr(node, "body", []))
                    walk(getattr(node, "orelse", []))
                    walk(getattr(node, "finalbody", []))
                    for h in getattr(node, "handlers", []):
                        walk(h.body)

        walk(mod.tree.body)

    def _absolute(self, mod: _Module, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = mod.name.split(".")
        if not mod.is_package:
            parts = parts[:-1]
        parts = parts[: max(0, len(parts) - (node.level - 1))]
        return ".".join([*parts, *([node.module] if node.module else [])])

    def _may_bind(self, module: str, name: str) -> bool:
        """Whether `module` can bind `name`: it says the name, or star-imports more. A
        bytes search, so that a miss in transformers' 400 star-imported model packages
        does not parse every modeling file."""
        base = module.replace(".", "/")
        for file in (f"{base}/__init__.py", f"{base}.py"):
            src = self._source(file)
            if src is not None:
                return name.encode() in src or b"import *" in src
        return True  # an extension or namespace package: let resolve decide

    def _in_wheel(self, module: str) -> bool:
        top = module.split(".", 1)[0]
        return any(p.split(".", 1)[0] == top for p in self.packages | self.extensions)

    # ---------------------------------------------------------------- names

    def resolve(self, path: str, _depth: int = 0) -> Entity | None:
        """What a dotted path names in this wheel, or None when it does not exist."""
        if _depth > 20:
            return Entity("unknown", path)
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            mod = self.module(".".join(parts[:i]))
            if mod is not None:
                break
        else:
            return None
        ent: Entity | None = Entity("extension" if mod.extension else "module", mod.name, mod.file, 0)
        for attr in parts[i:]:
            assert ent is not None
            ent = self.attribute(ent, attr, _depth)
            if ent is None:
                return None
        return ent

    def attribute(self, ent: Entity, name: str, _depth: int = 0) -> Entity | None:
        path = f"{ent.path}.{name}"
        if ent.kind in UNKNOWN_KINDS | {"function", "method"}:
            return Entity("extension" if ent.kind == "extension" else "unknown", path)
        if ent.kind == "module":
            return self._module_attr(ent.path, name, _depth)
        if ent.kind == "class":
            return self._class_attr(ent, name, _depth, set())
        return Entity("unknown", path)

    def _module_attr(self, module: str, name: str, depth: int) -> Entity | None:
        mod = self.module(module)
        if mod is None:
            return None
        path = f"{module}.{name}"
        node = mod.names.get(name)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return Entity("function", path, mod.file, node.lineno, node, _decorators(node))
        if isinstance(node, ast.ClassDef):
            return Entity("class", path, mod.file, node.lineno, node, _decorators(node))
        if isinstance(node, ast.ImportFrom):
            alias = next(a for a in node.names if (a.asname or a.name) == name)
            src = self._absolute(mod, node)
            if self._in_wheel(src):
                target = self.resolve(f"{src}.{alias.name}", depth + 1)
                return target if target is not None else None
            return Entity("external", path, mod.file, node.lineno)
        if isinstance(node, ast.Import):
            return Entity("external", path, mod.file, node.lineno)
        if node is not None:
            return Entity("value", path, mod.file, getattr(node, "lineno", 0), node)
        if mod.is_package and self.module(path) is not None:
            sub = self.module(path)
            assert sub is not None
            return Entity("extension" if sub.extension else "module", path, sub.file, 0)
        for star in mod.stars:
            if self._in_wheel(star):
                if name.startswith("_") or not self._may_bind(star, name):
                    continue
                hit = self._module_attr(star, name, depth + 1)
                if hit is not None:
                    return hit
            else:
                return Entity("external", path)
        if mod.getattr_line is not None:
            return Entity("unknown", path, mod.file, mod.getattr_line)
        return None

    def _class_attr(self, cls: Entity, name: str, depth: int, seen: set[str]) -> Entity | None:
        node = cls.node
        assert isinstance(node, ast.ClassDef)
        seen.add(cls.path)
        path = f"{cls.path}.{name}"
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef) and stmt.name == name:
                return Entity("method", path, cls.file, stmt.lineno, stmt, _decorators(stmt))
            if isinstance(stmt, ast.Assign | ast.AnnAssign):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return Entity("value", path, cls.file, stmt.lineno, stmt)
        # instance attributes set in any method (self.NAME = ...)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and sub.attr == name \
                    and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                return Entity("value", path, cls.file, sub.lineno, sub)
        for base in self.bases(cls):
            if base.kind != "class":
                return Entity("unknown", path)  # an external base (torch.nn.Module, ...) may define it
            if base.path in seen:
                continue
            hit = self._class_attr(base, name, depth, seen)
            if hit is not None:
                return hit
        return None

    def bases(self, cls: Entity) -> list[Entity]:
        """The class's bases as entities (`external` when outside the wheel)."""
        node = cls.node
        assert isinstance(node, ast.ClassDef) and cls.file is not None
        module = cls.file[:-3].replace("/", ".").removesuffix(".__init__")
        out: list[Entity] = []
        for b in node.bases:
            dotted = _dotted(b)
            if dotted is None:
                out.append(Entity("unknown", "?"))
                continue
            if dotted == "object":
                continue
            head, _, rest = dotted.partition(".")
            ent = self._module_attr(module, head, 1)
            if ent is not None and rest:
                ent = self.attribute(ent, rest)
            out.append(ent if ent is not None else Entity("unknown", dotted))
        return out

    # ---------------------------------------------------------------- signatures

    def signature(self, ent: Entity, bound: bool) -> Signature | None:
        """What calling `ent` accepts; None when it cannot be read (an extension, an
        external base's constructor)."""
        if ent.kind in ("function", "method") and isinstance(ent.node, ast.FunctionDef | ast.AsyncFunctionDef):
            drop = 0
            if ent.kind == "method" and "staticmethod" not in ent.decorators:
                drop = 1 if (bound or "classmethod" in ent.decorators) else 0
            return _signature(ent.node.args, drop, ent.where)
        if ent.kind == "class":
            return self._constructor(ent, set())
        return None

    def _constructor(self, cls: Entity, seen: set[str]) -> Signature | None:
        node = cls.node
        assert isinstance(node, ast.ClassDef)
        seen.add(cls.path)
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef) and stmt.name == "__init__":
                return _signature(stmt.args, 1, f"{cls.file}:{stmt.lineno}")
        if "dataclass" in cls.decorators:
            return _dataclass_signature(node, f"{cls.file}:{node.lineno}")
        bases = self.bases(cls)
        if not bases:  # object.__init__: no arguments at all
            return Signature((), (), (), frozenset(), False, False, f"{cls.file}:{node.lineno}")
        for base in bases:
            if base.kind != "class":
                return None
            if base.path not in seen:
                sig = self._constructor(base, seen)
                if sig is not None:
                    return sig
        return None


def _decorators(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> tuple[str, ...]:
    out = []
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        dotted = _dotted(target)
        if dotted:
            out.append(dotted.rsplit(".", 1)[-1])
    return tuple(out)


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    if isinstance(node, ast.Subscript):  # Generic[T]
        return _dotted(node.value)
    return None


def _signature(args: ast.arguments, drop: int, where: str) -> Signature:
    posonly = [a.arg for a in args.posonlyargs]
    params = [a.arg for a in args.args]
    both = posonly + params
    n_defaults = len(args.defaults)
    required = set(both[: len(both) - n_defaults])
    required |= {a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None}
    dropped = both[:drop]
    if drop:
        if posonly:
            posonly = posonly[drop:]
        else:
            params = params[drop:]
    return Signature(tuple(posonly), tuple(params), tuple(a.arg for a in args.kwonlyargs),
                     frozenset(required - set(dropped)), args.vararg is not None, args.kwarg is not None, where)


def _dataclass_signature(node: ast.ClassDef, where: str) -> Signature:
    params: list[str] = []
    required: set[str] = set()
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            ann = ast.unparse(stmt.annotation)
            if ann.startswith(("ClassVar", "typing.ClassVar")):
                continue
            params.append(stmt.target.id)
            if stmt.value is None:
                required.add(stmt.target.id)
    return Signature((), tuple(params), (), frozenset(required), False, False, where)


_SCHEMA = re.compile(rb"^([A-Za-z_][A-Za-z0-9_]*)(?:\.[A-Za-z0-9_]+)?\((.*)\) -> .+$", re.S)


def _schemas_in(data: bytes, member: str) -> dict[str, Signature]:
    """Operator schemas among the NUL-terminated strings of a shared object. Only the
    strings around ") -> " are looked at (a 50 MB .so holds a few hundred)."""
    out: dict[str, Signature] = {}
    pos = data.find(b") -> ")
    while pos != -1:
        start = data.rfind(b"\0", 0, pos) + 1
        end = data.find(b"\0", pos)
        text = data[start:end if end != -1 else len(data)]
        m = _SCHEMA.match(text)
        if m:
            sig = _schema_signature(m.group(2).decode("utf-8", "replace"), f"{member} ({m.group(1).decode()})")
            if sig is not None:
                out.setdefault(m.group(1).decode(), sig)
        pos = data.find(b") -> ", pos + 5)
    return out


def _schema_signature(args: str, where: str) -> Signature | None:
    """`Tensor A, Tensor? bias=None, *, int g=1` -> a Signature (every argument of a
    torch operator can be passed by name)."""
    parts: list[str] = []
    depth, cur = 0, ""
    for ch in args:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    params: list[str] = []
    kwonly: list[str] = []
    required: set[str] = set()
    star = False
    for part in (p.strip() for p in parts):
        if part == "*":
            star = True
            continue
        decl, eq, _ = part.partition("=")
        words = decl.split()
        if len(words) < 2 or not words[-1].isidentifier():
            return None  # not a schema after all
        name = words[-1]
        (kwonly if star else params).append(name)
        if not eq:
            required.add(name)
    return Signature((), tuple(params), tuple(kwonly), frozenset(required), False, False, where)
