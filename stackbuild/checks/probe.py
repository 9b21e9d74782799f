"""Asking a target interpreter about itself: one subprocess running a snippet that
prints JSON on its last line. Shared by the checks that need `--python`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from stackbuild.errors import StackbuildError


def run_probe(python: Path, code: str, *, timeout: float, cwd: Path | str = "/") -> dict[str, Any]:
    try:
        proc = subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise StackbuildError("no such interpreter", file=python, key="--python") from None
    except PermissionError:
        raise StackbuildError("not executable", file=python, key="--python") from None
    except subprocess.TimeoutExpired:
        raise StackbuildError(f"did not answer within {timeout} s", file=python, key="--python") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StackbuildError(f"failed to run (exit {proc.returncode}): {last}", file=python, key="--python")
    data: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return data
