"""`stackbuild verify --only layers`: the layers suite (layers.py) in the target python.

The worker runs the applied vLLM tree (ctx.tree("vllm")) on emulated kernels at the
version the recipe pins (a throw-away vllm_xpu_kernels package). It needs torch and
vLLM's import-time dependencies in the target interpreter (--python); where they are
missing, or the recipe patches no vLLM, the check is skipped with that reason. Torch-free.

ctx.options: layers_cases (names), timeout (seconds, default 600).
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
from stackbuild.checks.numerics.runner import last_json_line
from stackbuild.errors import StackbuildError

CHECK = "layers"
PACKAGE_PARENT = Path(__file__).resolve().parents[3]
_MISSING_RE = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")
_VERSION_RE = re.compile(r"(?:==|/v|-)(\d+\.\d+\.\d+(?:\.\d+)?)")
_STATUS = {"pass": CheckStatus.PASS, "fail": CheckStatus.FAIL, "skipped": CheckStatus.SKIP}


def pinned_kernels(ctx: CheckContext) -> str | None:
    """The vllm-xpu-kernels version the recipe pins (version spec or release URL), if any."""
    pin = ctx.recipe.pin("vllm-xpu-kernels")
    if pin is None:
        return None
    m = _VERSION_RE.search(f"{pin.spec} {pin.url or ''}")
    return m.group(1) if m else None


# the vLLM releases whose quantization-method API the harness (layers.py) is written for
HARNESS_VLLM = ("0.19.",)


def vllm_version(ctx: CheckContext, tree: Path) -> str | None:
    """The vLLM release the recipe builds: its pinned requirement, else the tree's PKG-INFO."""
    try:
        version = ctx.recipe.source("vllm").version
    except KeyError:
        version = None
    if version:
        return version
    pkg_info = tree / "PKG-INFO"
    if pkg_info.is_file():
        for line in pkg_info.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


def _skip(why: str) -> list[CheckResult]:
    return [CheckResult(CHECK, CheckStatus.SKIP, why, "layers")]


def results_from_output(stdout: str, stderr: str, returncode: int) -> list[CheckResult]:
    payload = last_json_line(stdout)
    if payload is None:
        missing = _MISSING_RE.search(stderr)
        if missing:
            return _skip(f"the target python lacks {missing.group(1)!r} (torch and vLLM's dependencies needed)")
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        return [CheckResult(CHECK, CheckStatus.FAIL, f"worker exited {returncode} without a result: {tail}", "worker")]
    if "error" in payload:
        raise StackbuildError(payload["error"], key="layers")
    out: list[CheckResult] = []
    for r in payload["results"]:
        subject = f"control:{r['control']}/{r['case']}" if r["control"] else f"{r['case']}@{r['kernels']}"
        out.append(CheckResult(CHECK, _STATUS[r["status"]], r["detail"], subject, r))
    return out


def run_layers(ctx: CheckContext) -> list[CheckResult]:
    tree = ctx.tree("vllm")
    if not (tree / "vllm" / "__init__.py").is_file():
        return _skip(f"no applied vLLM tree at {tree}")
    version = vllm_version(ctx, tree)
    if version is None or not version.startswith(HARNESS_VLLM):
        return _skip(
            f"the layers harness is written against vLLM {'/'.join(v + 'x' for v in HARNESS_VLLM)}'s "
            f"quantization methods; this recipe builds vLLM {version or '(version unknown)'}"
        )
    kernels = pinned_kernels(ctx)
    if kernels is None:
        return _skip("the recipe pins no vllm-xpu-kernels version to emulate")
    python = str(ctx.python) if ctx.python else sys.executable
    args: dict[str, Any] = {"tree": str(tree), "kernels": kernels}
    if ctx.options.get("layers_cases"):
        args["cases"] = list(ctx.options["layers_cases"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(PACKAGE_PARENT), HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="ERROR",
               VLLM_NO_USAGE_STATS="1")
    timeout = float(ctx.options.get("timeout", 600))
    try:
        proc = subprocess.run(
            [python, "-m", "stackbuild.checks.numerics.layers", json.dumps(args)],
            capture_output=True, text=True, timeout=timeout, env=env, check=False,
        )
    except OSError as exc:
        raise StackbuildError(f"{python}: cannot run: {exc.strerror or exc}", key="--python") from exc
    except subprocess.TimeoutExpired:
        return [CheckResult(CHECK, CheckStatus.FAIL, f"the layers worker ran past {timeout:g} s", "worker")]
    return results_from_output(proc.stdout, proc.stderr, proc.returncode)
