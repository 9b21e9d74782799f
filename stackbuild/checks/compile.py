"""Compile: every Python file the series touches or adds byte-compiles, and so does
every untouched file the other static checks read (they skip a file that does not
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
from stackbuild.checks.treefile import present, unreadable_reason

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
    todo: list[tuple[str, Path, str]] = []  # (file, path, why it is compiled: "" when touched)
    results: list[CheckResult] = []
    for source, files in ctx.touched.items():
        tree = ctx.tree(source)
        for rel in files:
            if not rel.endswith(".py"):
                continue
            path = tree / rel
            if present(path):  # a dangling symlink or a directory fails to compile, with the reason
                todo.append((rel, path, ""))
            else:
                results.append(CheckResult(CHECK, CheckStatus.SKIP, "file deleted by the series", subject=rel))
    for (source, rel), why in files_other_checks_read(ctx).items():
        todo.append((rel, ctx.tree(source) / rel, why))
    unreadable = [(rel, why, unreadable_reason(path)) for rel, path, why in todo]
    for rel, why, reason in unreadable:
        if reason:
            because = f"; {why}, not touched by the series" if why else ""
            results.append(CheckResult(CHECK, CheckStatus.FAIL, f"{rel}: cannot read: {reason}{because}",
                                       subject=rel, data={"read_by": why}))
    todo = [t for t, (_, _, reason) in zip(todo, unreadable, strict=True) if not reason]
    if not todo:
        return results or [CheckResult(CHECK, CheckStatus.SKIP, "the series touches no Python files")]
    try:
        version, compiled = compile_files([p for _, p, _ in todo], ctx.python)
    except CompileError as e:
        return results + [CheckResult(CHECK, CheckStatus.FAIL, str(e), subject=str(ctx.python or sys.executable))]
    read_ok = 0
    for (rel, _, why), r in zip(todo, compiled, strict=True):
        if r["ok"]:
            if why:
                read_ok += 1  # untouched files: one summary line, not a row each
                continue
            results.append(CheckResult(CHECK, CheckStatus.PASS, f"compiles with Python {version}",
                                       subject=rel, data={"python": version}))
        else:
            where = f"{rel}:{r['line']}" if r["line"] else rel
            because = f"; {why}, not touched by the series" if why else ""
            results.append(CheckResult(CHECK, CheckStatus.FAIL,
                                       f"{where}: {r['error']} (Python {version}{because})",
                                       subject=rel, data={"python": version, "line": r["line"], "read_by": why}))
    if read_ok:
        results.append(CheckResult(CHECK, CheckStatus.PASS,
                                   f"{read_ok} untouched files the other checks read compile with Python {version}",
                                   subject="files read by the checks", data={"python": version, "files": read_ok}))
    return results
