"""One user-facing error type, and the exit codes the CLI maps errors to."""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    OK = 0
    CHECK_FAILED = 1
    BAD_INPUT = 2
    INTERNAL = 3
    INTERRUPTED = 130


class StackbuildError(Exception):
    """A problem the user can act on: bad input, an unreachable index, a patch that
    does not apply. Rendered as one line naming the file (and key) and the cause."""

    exit_code: ExitCode = ExitCode.BAD_INPUT

    def __init__(self, message: str, *, file: str | Path | None = None, key: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.key = key
        super().__init__(self.render())

    def render(self) -> str:
        where = ""
        if self.file and self.key:
            where = f"{self.file}: {self.key}: "
        elif self.file:
            where = f"{self.file}: "
        elif self.key:
            where = f"{self.key}: "
        return f"{where}{self.message}"

    def to_dict(self) -> dict[str, object]:
        """What `--json` prints for this error, on stdout, instead of a line on stderr."""
        return {"error": self.message, "file": self.file, "key": self.key,
                "exit_code": int(self.exit_code), "kind": type(self).__name__}


class RecipeError(StackbuildError):
    """A recipe is malformed: unknown key, wrong type, cycle in `extends`, ..."""


class SourceError(StackbuildError):
    """A source cannot be fetched or does not match its pinned hash."""


class PatchError(StackbuildError):
    """The series does not apply; the workspace is left as it was."""


class CheckFailed(StackbuildError):
    """A check ran and failed (exit 1, not 2)."""

    exit_code = ExitCode.CHECK_FAILED


class WorkspaceError(StackbuildError):
    """A workspace cannot be replaced as asked (local edits, a damaged tree)."""


class CacheError(StackbuildError):
    """The cache directory is unusable: not creatable, not writable, not a directory."""


class DiskFullError(StackbuildError):
    """No space left on a device stackbuild writes to."""
