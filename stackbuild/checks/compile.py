"""Compile: every Python file the series touches or adds byte-compiles.

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


def run(ctx: CheckContext) -> list[CheckResult]:
    todo: list[tuple[str, Path]] = []
    results: list[CheckResult] = []
    for source, files in ctx.touched.items():
        tree = ctx.tree(source)
        for rel in files:
            if not rel.endswith(".py"):
                continue
            path = tree / rel
            if path.is_file():
                todo.append((rel, path))
            else:
                results.append(CheckResult(CHECK, CheckStatus.SKIP, "file deleted by the series", subject=rel))
    if not todo:
        return results or [CheckResult(CHECK, CheckStatus.SKIP, "the series touches no Python files")]
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
    return results
