"""`stackbuild verify --only numerics`: run the numerics worker inside the target environment.

The worker is a subprocess of the target interpreter (ctx.python, default this one), so the
kernels are the ones installed there and run on its device. This module imports no torch.

ctx.options (all optional):
    device      "xpu" | "cuda" | "cpu"; default: xpu, then cuda, then cpu (decided there)
    adapters    ["module:function", ...] user adapters, importable by the target python
                (this process's working directory is put on its path)
    suites      ["int4-linear", "int4-moe"]; default recipe.checks.numerics, else both
    builtin     names of built-in adapters to run; default all of them
    thresholds  {"bf16.rel": 2e-2, ...} on top of recipe.checks.thresholds
    repeats     timed calls per shape (default 2)
    threads     torch CPU threads in the worker (default 1)
    timeout     seconds for the whole worker (default 900)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from stackbuild.checks import CheckContext, CheckResult, CheckStatus
from stackbuild.errors import RecipeError, StackbuildError

from .config import SUITES, merge_thresholds

CHECK = "numerics"
DEVICES = ("auto", "xpu", "cuda", "cpu")
PACKAGE_PARENT = Path(__file__).resolve().parents[3]  # the directory holding stackbuild/

_STATUS = {"pass": CheckStatus.PASS, "fail": CheckStatus.FAIL, "skipped": CheckStatus.SKIP}
_MISSING_RE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")


def worker_args(ctx: CheckContext) -> dict[str, Any]:
    """The JSON argument object for the worker; StackbuildError on bad recipe or options."""
    opts = ctx.options
    recipe = ctx.recipe
    suites = list(opts.get("suites") or recipe.checks.numerics or SUITES)
    for suite in suites:
        if suite not in SUITES:
            raise RecipeError(
                f"unknown numerics suite {suite!r}: expected one of {', '.join(SUITES)}",
                file=recipe.path,
                key="checks.numerics",
            )
    thresholds = dict(recipe.checks.thresholds)
    try:
        merge_thresholds(thresholds)
    except KeyError as exc:
        raise RecipeError(str(exc.args[0]), file=recipe.path, key="checks.thresholds") from exc
    extra = dict(opts.get("thresholds") or {})
    try:
        merge_thresholds(extra)
    except KeyError as exc:
        raise StackbuildError(str(exc.args[0]), key="--threshold") from exc
    thresholds.update(extra)
    device = opts.get("device") or "auto"
    if device not in DEVICES:
        raise StackbuildError(
            f"unknown device {device!r}: expected xpu, cuda or cpu", key="--device"
        )
    adapters = list(opts.get("adapters") or [])
    for spec in adapters:
        module, sep, function = str(spec).partition(":")
        if not (module and sep and function):
            raise StackbuildError(f"{spec!r}: expected module:function", key="--adapter")
    return {
        "device": device,
        "suites": suites,
        "adapters": adapters,
        "builtin": opts.get("builtin"),
        "workspace": str(ctx.workspace) if ctx.workspace else None,
        "thresholds": thresholds,
        "repeats": int(opts.get("repeats", 2)),
        "threads": int(opts.get("threads", 1)),
    }


def _fail(detail: str, subject: str = "worker", **data: Any) -> list[CheckResult]:
    return [CheckResult(CHECK, CheckStatus.FAIL, detail, subject, dict(data))]


def _g(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def last_json_line(stdout: str) -> Any:
    """The last line of a worker's stdout that parses as a JSON object, or None (a worker
    prints its result last; whatever it printed before is progress or noise)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def results_from_output(stdout: str, stderr: str, returncode: int) -> list[CheckResult]:
    """The worker's last JSON line -> CheckResult rows (one per adapter/suite/shape/dtype,
    one per negative control and suite)."""
    payload = last_json_line(stdout)
    if payload is None:
        missing = _MISSING_RE.search(stderr)
        if missing:
            return _fail(
                f"the target python lacks the package {missing.group(1)!r}",
                missing=missing.group(1),
            )
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return _fail(f"worker exited {returncode} without a result: {tail}")
    if "error" in payload:
        if payload.get("missing"):
            return _fail(
                f"the target python lacks the package {payload['missing']!r}",
                missing=payload["missing"],
            )
        raise StackbuildError(payload["error"], key="numerics")

    device = payload["device"]
    env = {
        "device": device,
        "torch": payload["torch"],
        "vllm_xpu_kernels": payload["vllm_xpu_kernels"],
    }
    results: list[CheckResult] = []
    for row in payload["rows"]:
        subject = "/".join(
            [row["adapter"], row["suite"]]
            + ([f"{row['case']}:{row['shape']}:{row['dtype']}"] if row["case"] else [])
        )
        status = _STATUS[row["status"]]
        detail = row["detail"]
        if row["rel"] is not None:
            figures = (
                f"rel {_g(row['rel'], '.3g')}, corr {_g(row['corr'], '.6f')}, "
                f"max abs {_g(row['max_abs'], '.3g')}, "
                f"{_g(row['ms_per_call'], '.3f')} ms/call on {device}"
            )
            detail = f"{detail}; {figures}" if detail else figures
        results.append(CheckResult(CHECK, status, detail, subject, {**row, **env}))
    for control in payload["controls"]:
        results.append(
            CheckResult(
                CHECK,
                _STATUS[control["status"]],
                control["detail"],
                f"control:{control['control']}/{control['suite']}",
                {**control, **env},
            )
        )
    return results


def run_numerics(ctx: CheckContext) -> list[CheckResult]:
    """Run the numerics suites in the target environment; one CheckResult per row."""
    args = worker_args(ctx)
    python = str(ctx.python) if ctx.python else sys.executable
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE_PARENT), os.getcwd(), env.get("PYTHONPATH", "")) if p
    )
    timeout = float(ctx.options.get("timeout", 900))
    try:
        proc = subprocess.run(
            [python, "-m", "stackbuild.checks.numerics.worker", json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except OSError as exc:
        raise StackbuildError(
            f"{python}: cannot run: {exc.strerror or exc}", key="--python"
        ) from exc
    except subprocess.TimeoutExpired:
        return _fail(f"the numerics worker ran past {timeout:g} s")
    return results_from_output(proc.stdout, proc.stderr, proc.returncode)
