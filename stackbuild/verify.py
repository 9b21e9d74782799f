"""`stackbuild verify`: run the checks a recipe asks for and gather one report.

Checks are registered by name with the dotted path of their function and imported
only when run, so a check module that is missing (or fails to import) costs that
check, never the others. A skip is reported as a skip, never counted as a pass.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stackbuild.checks import CheckContext, CheckResult, CheckStatus
from stackbuild.errors import ExitCode, StackbuildError
from stackbuild.report import Table

CheckFn = Callable[[CheckContext], list[CheckResult]]

# name -> "module:function", in the order they run and are reported
CHECKS: dict[str, str] = {
    "compile": "stackbuild.checks.compile:run",
    "registry": "stackbuild.checks.registry:run",
    "imports": "stackbuild.checks.imports:run",
    "api": "stackbuild.checks.api_closure:run",
    "transformers": "stackbuild.checks.transformers_support:run",
    "registry-dynamic": "stackbuild.checks.registry:run_dynamic",
    "numerics": "stackbuild.checks.numerics.runner:run_numerics",
    "layers": "stackbuild.checks.numerics.layers_check:run_layers",
    "environment": "stackbuild.checks.environment:run_environment",
    "platform": "stackbuild.checks.platform:run_platform",
}
# Static checks read the tree (and the pinned transformers and kernel wheels) only: any machine.
STATIC_CHECKS = ("compile", "registry", "imports", "api", "transformers")


@dataclass(frozen=True)
class VerifyReport:
    recipe: str
    results: tuple[CheckResult, ...]
    checks_run: tuple[str, ...]
    timings: tuple[tuple[str, float], ...] = ()  # seconds per check

    def count(self, status: CheckStatus) -> int:
        return sum(1 for r in self.results if r.status is status)

    @property
    def passed(self) -> int:
        return self.count(CheckStatus.PASS)

    @property
    def failed(self) -> int:
        return self.count(CheckStatus.FAIL)

    @property
    def skipped(self) -> int:
        return self.count(CheckStatus.SKIP)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    @property
    def exit_code(self) -> int:
        return int(ExitCode.OK if self.ok else ExitCode.CHECK_FAILED)

    @property
    def summary(self) -> str:
        return f"{self.passed} passed, {self.failed} failed, {self.skipped} skipped"

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "checks": list(self.checks_run),
            "results": [r.to_dict() for r in self.results],
            "summary": {"passed": self.passed, "failed": self.failed, "skipped": self.skipped},
            "timings_s": dict(self.timings),
            "exit_code": self.exit_code,
        }

    def tables(self) -> list[Table]:
        rows = tuple((r.check, r.subject, r.status_text, r.detail if r.status is not CheckStatus.SKIP else "")
                     for r in self.results)
        return [Table(f"verify {self.recipe}", ("check", "subject", "status", "detail"), rows, self.summary)]


def resolve_check(name: str) -> CheckFn:
    """The function registered for `name`, imported now."""
    target = CHECKS[name]
    module_name, _, func = target.partition(":")
    module = importlib.import_module(module_name)
    fn: CheckFn = getattr(module, func)
    return fn


def check_names(names: list[str]) -> None:
    """Refuse a check name that is not registered, listing the known ones."""
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise StackbuildError(f"unknown check {unknown[0]!r} (known: {', '.join(CHECKS)})", key="--only")


def run_verify(ctx: CheckContext, only: list[str] | None = None) -> VerifyReport:
    names = list(CHECKS)
    if only:
        check_names(only)
        names = [n for n in CHECKS if n in only]
    results: list[CheckResult] = []
    timings: list[tuple[str, float]] = []
    for name in names:
        t0 = time.perf_counter()
        results.extend(_run_one(name, ctx))
        timings.append((name, round(time.perf_counter() - t0, 4)))
    return VerifyReport(ctx.recipe.name, tuple(results), tuple(names), tuple(timings))


def _run_one(name: str, ctx: CheckContext) -> list[CheckResult]:
    module_name = CHECKS[name].partition(":")[0]
    try:
        fn = resolve_check(name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            return [CheckResult(name, CheckStatus.SKIP, f"check module {module_name} is not installed")]
        return [CheckResult(name, CheckStatus.FAIL, f"check module {module_name} cannot be imported: {e}")]
    except (ImportError, AttributeError) as e:
        return [CheckResult(name, CheckStatus.FAIL, f"check module {module_name} cannot be imported: {e}")]
    try:
        out = fn(ctx)
    except StackbuildError as e:
        # e.g. the index is unreachable for the transformers check: the others still run
        return [CheckResult(name, CheckStatus.FAIL, e.render())]
    return [r if r.check else CheckResult(name, r.status, r.detail, r.subject, r.data) for r in out]
