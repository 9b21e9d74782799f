"""The one reader for files a user hands us (recipes, lockfiles, requirement files,
manifests): it decodes UTF-8 and turns every failure into one error naming the file
and the cause, never a traceback."""

from __future__ import annotations

from pathlib import Path

from stackbuild.errors import StackbuildError


def decode_user_bytes(
    data: bytes, path: str | Path, what: str = "file", error: type[StackbuildError] = StackbuildError
) -> str:
    """`data` as UTF-8 text; a byte that is not UTF-8 is an error naming `path` and the
    byte's offset (the place to look in a hex editor)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 1].hex()
        raise error(f"{what} is not UTF-8 text: byte 0x{bad} at offset {e.start} ({e.reason})", file=path) from None
    return text.removeprefix("\ufeff")  # a byte-order mark some editors write: not content


def read_user_text(path: Path, what: str = "file", error: type[StackbuildError] = StackbuildError) -> str:
    """Read a user's file as UTF-8 text, raising `error` naming the file on any failure
    (missing, unreadable, a directory, not UTF-8). Line endings are kept as written."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} does not exist", file=path) from None
    except IsADirectoryError:
        raise error(f"{what} is a directory, not a file", file=path) from None
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror or e}", file=path) from None
    return decode_user_bytes(data, path, what, error)
