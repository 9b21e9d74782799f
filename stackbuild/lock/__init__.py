"""Lockfiles: `stackbuild lock NAME` and `stackbuild lock NAME --check`.

    lock(recipe, requirements_from=..., resolver="pip-tools", offline=False) -> LockResult
    check_lock(recipe, lockfile) -> LockCheckResult      (no network; exit_code 1 on drift)
    record_first_use(recipe_path, pin_name, sha256) -> FirstUseRecorded
"""

from __future__ import annotations

from stackbuild.lock.api import (
    FirstUse,
    FirstUseRecorded,
    LockChange,
    LockCheckResult,
    LockResult,
    Override,
    Unresolved,
    check_lock,
    default_lockfile,
    lock,
    plan_lock,
    record_first_use,
)
from stackbuild.lock.backends import DEFAULT_INDEX, RESOLVERS
from stackbuild.lock.errors import IndexUnreachable, LockError, ResolutionFailed, ResolverMissing
from stackbuild.lock.lockfile import LockedPackage

__all__ = [
    "DEFAULT_INDEX",
    "RESOLVERS",
    "FirstUse",
    "FirstUseRecorded",
    "IndexUnreachable",
    "LockChange",
    "LockCheckResult",
    "LockError",
    "LockResult",
    "LockedPackage",
    "Override",
    "ResolutionFailed",
    "ResolverMissing",
    "Unresolved",
    "check_lock",
    "default_lockfile",
    "lock",
    "plan_lock",
    "record_first_use",
]
