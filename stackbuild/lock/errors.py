"""Errors raised while locking: one line each, naming the file (and key) and the cause."""

from __future__ import annotations

from stackbuild.errors import StackbuildError


class LockError(StackbuildError):
    """The lock cannot be written: bad input, a conflict, a resolver failure. The
    previous lockfile is left as it was."""


class IndexUnreachable(LockError):
    """An index or a direct URL named by the recipe or the source does not answer."""


class ResolverMissing(LockError):
    """The resolver backend asked for is not installed."""


class ResolutionFailed(LockError):
    """The resolver ran and found no solution (or crashed)."""
