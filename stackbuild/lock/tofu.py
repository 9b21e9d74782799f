"""Trust on first use: write the sha256 a first download produced into the recipe
file, in place of `trust_on_first_use = true`, keeping the rest of the file as it is."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

from stackbuild.errors import RecipeError
from stackbuild.inputs import read_user_text
from stackbuild.recipe import SHA256_RE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_TOFU_RE = re.compile(r"trust_on_first_use\s*=\s*true")
_SECTION_RE = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$")


def _key_variants(name: str) -> tuple[str, ...]:
    return (name, f'"{name}"', f"'{name}'")


def write_first_use(path: Path, pin: str, sha256: str) -> None:
    key = f"pins.{pin}"
    if not SHA256_RE.match(sha256):
        raise RecipeError(f"not a sha256 (64 lowercase hex digits): {sha256!r}", file=path, key=f"{key}.sha256")
    text = read_user_text(path, "recipe", RecipeError)
    lines = text.splitlines(keepends=True)
    section = ""
    done = False
    table_names = {f"pins.{v}" for v in _key_variants(pin)}
    for n, line in enumerate(lines):
        m = _SECTION_RE.match(line)
        if m:
            section = re.sub(r"\s*\.\s*", ".", m.group(1))
            continue
        if section == "pins":
            # inline table:  name = { url = "...", trust_on_first_use = true }
            head = line.split("=", 1)[0].strip()
            if head in _key_variants(pin) and "{" in line and _TOFU_RE.search(line):
                lines[n] = _TOFU_RE.sub(f'sha256 = "{sha256}"', line, count=1)
                done = True
                break
        elif section in table_names and _TOFU_RE.match(line.strip()):
            indent = line[: len(line) - len(line.lstrip())]
            lines[n] = f'{indent}sha256 = "{sha256}"\n'
            done = True
            break
    if not done:
        raise RecipeError("no `trust_on_first_use = true` for this pin in this file (is it defined in the "
                          "recipe it extends?)", file=path, key=key)
    new = "".join(lines)
    try:
        pins = tomllib.loads(new).get("pins", {})
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recording the sha256 would break the file: {e}", file=path, key=key) from None
    entry = pins.get(pin)
    if not isinstance(entry, dict) or entry.get("sha256") != sha256 or "trust_on_first_use" in entry:
        raise RecipeError("could not record the sha256 in place; edit the pin by hand", file=path, key=key)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
