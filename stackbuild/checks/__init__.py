"""Checks run by `stackbuild verify`. Each check is a function
`run(ctx: CheckContext) -> list[CheckResult]`; none of them prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from stackbuild.recipe import Recipe


class CheckStatus(str, Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skipped"


@dataclass(frozen=True)
class CheckResult:
    check: str  # "compile", "registry", "imports", "numerics", ...
    status: CheckStatus
    detail: str = ""
    subject: str = ""  # what was checked: a file, an architecture, an adapter/shape
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def status_text(self) -> str:
        if self.status is CheckStatus.SKIP:
            return f"skipped: {self.detail}"
        return self.status.value

    def to_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "subject": self.subject,
            "status": self.status.value,
            "detail": self.detail,
            "data": self.data,
        }


@dataclass(frozen=True)
class CheckContext:
    recipe: Recipe
    workspace: Path  # the applied workspace root (holds one git tree per patched source)
    # per patched source: files (relative to the source tree) the series touched or added
    touched: dict[str, tuple[str, ...]] = field(default_factory=dict)
    python: Path | None = None  # the target interpreter (--python), if given
    options: dict[str, Any] = field(default_factory=dict)  # check-specific CLI options

    def tree(self, source: str) -> Path:
        return self.workspace / source
