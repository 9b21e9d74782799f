"""A sealed stackbuild lockfile around a given body, for tests of what reads lockfiles
(the install script). It is what `stackbuild lock` writes, minus the resolver: the
header records and the content seal are real, so install-script accepts it; anything
an attacker can put in a lockfile can be put in such a body."""

from __future__ import annotations

from pathlib import Path

from stackbuild.lock.lockfile import (
    COMPLETE_PREFIX,
    CONTENT_PREFIX,
    FIRST_LINE,
    inputs_digest,
    seal,
)


def sealed_lockfile(path: Path, recipe: str, body: str, *, header: str = "") -> Path:
    text = (f"{FIRST_LINE}{recipe}. Do not edit; regenerate with:\n"
            f"#   stackbuild lock {recipe}\n"
            f"# recipe sha256: {'0' * 64}\n"
            f"# inputs sha256: {inputs_digest([], [])}\n"
            f"{CONTENT_PREFIX}-\n"
            f"{COMPLETE_PREFIX}yes: every pin and every requirement is in this file, with hashes\n"
            f"{header}#\n{body}")
    path.write_text(seal(text))
    return path
