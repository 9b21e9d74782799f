"""Compile: every Python file the series touches or adds byte-compiles, and every
untouched file the other static checks read parses (they skip a file that does not
parse; this check fails on it, naming file:line).

With the target interpreter (--python) the files are compiled there, in one
subprocess, so a backport that uses syntax newer than the target's Python fails here
and not on the target. Nothing is written: no .pyc lands in the tree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from stackbuild.checks import CheckContext, CheckResult, CheckStatus
from stackbuild.checks.treefile import Unparsable, parse_python, present, unreadable_reason

CHECK = "compile"

# Runs in the target interpreter: compile each file, report the first error per file.
_COMPILER = r"""
import json, sys
out = {"python": sys.version.split()[0], "results": []}
for path in json.load(sys.stdin):
    try:
        with open(path, "rb") as f:
            compile(f.read(), path, "exec", dont_inherit=True)
        out["results"].append({"path": path, "ok": True})
    except SyntaxError as e:  # IndentationError and TabError included
        out["results"].append({"path": path, "ok": False, "line": e.lineno,
                               "error": f"{type(e).__name__}: {e.msg}"})
    except (ValueError, OSError) as e:  # null bytes, unreadable
        out["results"].append({"path": path, "ok": False, "line": None,
                               "error": f"{type(e).__name__}: {e}"})
print(json.dumps(out))
"""


def compile_files(paths: list[Path], python: Path | None = None, timeout: float = 300) -> tuple[str, list[dict]]:
    """(python version, one {path, ok, line, error} per file) compiled by `python`
    (this interpreter when None)."""
    exe = str(python) if python else sys.executable
    try:
        proc = subprocess.run([exe, "-I", "-c", _COMPILER], input=json.dumps([str(p) for p in paths]),
                              capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise CompileError(f"interpreter {exe} does not exist") from None
    except subprocess.TimeoutExpired:
        raise CompileError(f"{exe} did not finish compiling {len(paths)} files in {timeout:.0f} s") from None
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CompileError(f"{exe} exited {proc.returncode}: {tail}") from None
    return out["python"], out["results"]


class CompileError(Exception):
    """The interpreter could not be run at all (not a file failing to compile)."""


def files_other_checks_read(ctx: CheckContext) -> dict[tuple[str, str], str]:
    """(source, file) -> why, for the untouched files the other static checks read: the
    registry and the registered model modules, the in-tree modules the touched files
    import, the files that use the kernel package. A syntax error there fails here,
    named file:line, while those checks skip the file."""
    from stackbuild.checks.api_closure import kernel_files
    from stackbuild.checks.imports import ModuleIndex
    from stackbuild.checks.registry import (
        MODELS_PACKAGE,
        REGISTRY_FILE,
        RegistryUnreadable,
        read_registry,
    )

    out: dict[tuple[str, str], str] = {}
    source = ctx.recipe.checks.registry_source
    tree = ctx.tree(source)
    if ctx.recipe.checks.registry and present(tree / REGISTRY_FILE):
        out[(source, REGISTRY_FILE)] = "read by the registry check"
        try:
            reg = read_registry(tree / REGISTRY_FILE)
        except RegistryUnreadable:
            reg = None
        for arch in ctx.recipe.checks.registry:
            entry = reg.entries.get(arch) if reg else None
            if entry is not None:
                index = ModuleIndex(tree)
                mod = index.module(f"{MODELS_PACKAGE}.{entry.module}")
                if mod is not None and mod.path is not None:
                    out.setdefault((source, mod.path.relative_to(tree).as_posix()), f"module of {arch} (registry)")
    for src, touched in ctx.touched.items():
        tree = ctx.tree(src)
        if not tree.is_dir():
            continue
        index = ModuleIndex(tree)
        for rel in touched:
            if not rel.endswith(".py") or not present(tree / rel):
                continue
            refs, _ = index.imports_of(tree / rel, rel)
            for ref in refs:
                for name in (ref.module, f"{ref.module}.{ref.name}" if ref.name else None):
                    mod = index.module(name) if name else None
                    if mod is not None and mod.path is not None:
                        out.setdefault((src, mod.path.relative_to(tree).as_posix()), f"imported by {rel} (imports)")
        for rel in kernel_files(tree, ())[0]:
            out.setdefault((src, rel), "uses vllm_xpu_kernels (api)")
    return {k: v for k, v in out.items() if k[1] not in ctx.touched.get(k[0], ())}


def run(ctx: CheckContext) -> list[CheckResult]:
    todo: list[tuple[str, Path]] = []
    results: list[CheckResult] = []
    for source, files in ctx.touched.items():
        tree = ctx.tree(source)
        for rel in files:
            if not rel.endswith(".py"):
                continue
            path = tree / rel
            if not present(path):
                results.append(CheckResult(CHECK, CheckStatus.SKIP, "file deleted by the series", subject=rel))
            elif (why := unreadable_reason(path)) is not None:
                results.append(CheckResult(CHECK, CheckStatus.FAIL, f"{rel}: cannot read: {why}", subject=rel))
            else:
                todo.append((rel, path))
    if todo:
        try:
            version, compiled = compile_files([p for _, p in todo], ctx.python)
        except CompileError as e:
            return results + [CheckResult(CHECK, CheckStatus.FAIL, str(e), subject=str(ctx.python or sys.executable))]
        for (rel, _), r in zip(todo, compiled, strict=True):
            if r["ok"]:
                results.append(CheckResult(CHECK, CheckStatus.PASS, f"compiles with Python {version}",
                                           subject=rel, data={"python": version}))
            else:
                where = f"{rel}:{r['line']}" if r["line"] else rel
                results.append(CheckResult(CHECK, CheckStatus.FAIL, f"{where}: {r['error']} (Python {version})",
                                           subject=rel, data={"python": version, "line": r["line"]}))
    results += check_files_read(ctx)
    return results or [CheckResult(CHECK, CheckStatus.SKIP, "the series touches no Python files")]


def check_files_read(ctx: CheckContext) -> list[CheckResult]:
    """The untouched files the other checks read parse (with this interpreter, through
    the parse the other checks then reuse: upstream files, so the target's Python
    version matters less than that nothing is skipped unnamed)."""
    here = sys.version.split()[0]
    results: list[CheckResult] = []
    ok = 0
    for (source, rel), why in files_other_checks_read(ctx).items():
        got = parse_python(ctx.tree(source) / rel, rel)
        if isinstance(got, Unparsable):
            results.append(CheckResult(CHECK, CheckStatus.FAIL,
                                       f"{got.render()} (Python {here}; {why}, not touched by the series)",
                                       subject=rel, data={"python": here, "line": got.line, "read_by": why}))
        else:
            ok += 1
    if ok:
        results.append(CheckResult(CHECK, CheckStatus.PASS,
                                   f"{ok} untouched files the other checks read parse with Python {here}",
                                   subject="files read by the checks", data={"python": here, "files": ok}))
    return results
