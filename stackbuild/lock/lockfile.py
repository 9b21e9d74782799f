"""The lockfile format: one normalised rendering for every resolver backend, and the
header records `--check` reads back without the network.

    # stackbuild lockfile for recipe NAME. Do not edit; regenerate with:
    #   stackbuild lock NAME
    # recipe sha256: ...
    # inputs sha256: ...   (pins, overrides and patch series)
    ...
    # stackbuild-input pin {"name": ..., "spec": ...}
    # stackbuild-input patch {"name": ..., "sha256": ...}
    #
    alpha==1.0 \\
        --hash=sha256:...
        # via recipe pins
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from stackbuild.inputs import read_user_text
from stackbuild.lock.errors import LockError

INPUT_PREFIX = "# stackbuild-input "
UNRESOLVED_PREFIX = "# stackbuild-unresolved "
FIRST_LINE = "# stackbuild lockfile for recipe "
CONTENT_PREFIX = "# content sha256: "
CONTENT_NOTE = "  (every other line of this file: `--check` catches hand edits)"
COMPLETE_PREFIX = "# complete: "
_HASH_RE = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class LockedPackage:
    name: str  # canonical
    requirement: str  # "beta==2.0", "alpha @ https://...", markers kept
    version: str | None
    url: str | None
    hashes: tuple[str, ...]  # sha256 hex, sorted
    via: tuple[str, ...]  # who asked for it, normalised ("recipe pins", "vllm", "alpha")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "requirement": self.requirement, "version": self.version,
                "url": self.url, "hashes": list(self.hashes), "via": list(self.via)}


def parse_resolver_output(text: str, via_labels: dict[str, str]) -> list[LockedPackage]:
    """Parse pip-compile / uv pip compile output (generated with hashes) into packages.

    Option lines (`--index-url`, `--find-links`, ...) are dropped here: what gets
    written is rendered from these records only, so nothing machine-local survives.
    `via_labels` maps input file names (basename) to the label to show instead of a path.
    """
    blocks: list[list[str]] = []
    for raw in text.splitlines():
        if not raw.strip():
            continue
        if raw[0].isspace():
            if blocks:
                blocks[-1].append(raw.strip())
            continue
        if raw.startswith("#") or raw.startswith("-"):
            blocks.append([])  # header, "unsafe" notes, option lines: end the previous block
            continue
        blocks.append([raw.strip()])
    out: list[LockedPackage] = []
    for block in blocks:
        if not block:
            continue
        head = block[0].rstrip("\\").strip()
        hashes: list[str] = _HASH_RE.findall(block[0])
        via: list[str] = []
        in_via = False
        for line in block[1:]:
            if line.startswith("--hash"):
                hashes += _HASH_RE.findall(line)
                continue
            if line.startswith("# via"):
                rest = line[len("# via"):].strip()
                in_via = True
                if rest:
                    via.append(rest)
                continue
            if in_via and line.startswith("#"):
                rest = line.lstrip("#").strip()
                if rest:
                    via.append(rest)
        head = _HASH_RE.sub("", head).rstrip("\\ ").strip()
        try:
            req = Requirement(head)
        except InvalidRequirement as e:
            raise LockError(f"resolver output has a line that is not a requirement: {head!r} ({e})") from None
        version = None
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator in ("==", "==="):
            version = specs[0].version
        name = canonicalize_name(req.name)
        # One spelling for every backend: canonical name, no extras, no markers (the
        # lock is resolved for one interpreter and platform, which the header states).
        requirement = f"{name} @ {req.url}" if req.url else f"{name}{req.specifier}"
        out.append(LockedPackage(
            name=name,
            requirement=requirement,
            version=version,
            url=req.url,
            hashes=tuple(sorted(set(hashes))),
            via=tuple(dict.fromkeys(_normalise_via(v, via_labels) for v in via)),
        ))
    out.sort(key=lambda p: p.name)
    return out


def _normalise_via(entry: str, labels: dict[str, str]) -> str:
    # "-r /tmp/xyz/vllm.in", "-r vllm.in (line 3)", "--override /tmp/x/overrides.txt"
    m = re.match(r"^(?:-r|-c|--override|--constraint|--requirement)\s+(\S+)", entry)
    if m:
        return labels.get(Path(m.group(1)).name, Path(m.group(1)).name)
    return canonicalize_name(entry.split()[0]) if entry else entry


def render_packages(packages: list[LockedPackage], notes: dict[str, str] | None = None) -> str:
    notes = notes or {}
    lines: list[str] = []
    for p in packages:
        lines.append(p.requirement + (" \\" if p.hashes else ""))
        for i, h in enumerate(p.hashes):
            lines.append(f"    --hash=sha256:{h}" + (" \\" if i < len(p.hashes) - 1 else ""))
        if p.name in notes:
            lines.append(f"    # {notes[p.name]}")
        if p.via:
            if len(p.via) == 1:
                lines.append(f"    # via {p.via[0]}")
            else:
                lines.append("    # via")
                lines += [f"    #   {v}" for v in p.via]
    return "\n".join(lines) + ("\n" if lines else "")


# ---------------------------------------------------------------- input records


def pin_record(pin: Any) -> dict[str, Any]:
    d = {
        "name": canonicalize_name(pin.name),
        "spec": pin.spec or None,
        "index": pin.index,
        "url": pin.url,
        "sha256": pin.sha256,
        "trust_on_first_use": pin.trust_on_first_use or None,
        "override": pin.override,
        "markers": pin.markers,
    }
    return {k: v for k, v in d.items() if v is not None}


def patch_record(position: int, patch: Any) -> dict[str, Any]:
    d = {
        "position": position,
        "name": patch.name,
        "kind": getattr(patch.kind, "value", patch.kind),
        "source": patch.source,
        "sha256": patch.sha256,
        "file": patch.file,
        "from": patch.from_source,
        "path": patch.path,
        "release": patch.release,
        "files": list(patch.files) or None,
        "strip": patch.strip if patch.strip != 1 else None,
        "fuzz": patch.fuzz or None,
    }
    return {k: v for k, v in d.items() if v is not None}


def inputs_digest(pins: list[dict[str, Any]], patches: list[dict[str, Any]]) -> str:
    blob = json.dumps({"pins": sorted(pins, key=lambda p: p["name"]), "patches": patches},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def record_line(kind: str, record: dict[str, Any]) -> str:
    return f"{INPUT_PREFIX}{kind} {json.dumps(record, sort_keys=True, separators=(',', ':'))}"


def content_digest(text: str) -> str:
    """sha256 of the lockfile's text without its own `# content sha256:` line: the whole
    body (packages, versions, hashes) and the header records."""
    kept = [ln for ln in text.splitlines(keepends=True) if not ln.startswith(CONTENT_PREFIX)]
    return hashlib.sha256("".join(kept).encode()).hexdigest()


def seal(text: str) -> str:
    """Fill in the `# content sha256:` line (which must be there, once)."""
    digest = content_digest(text)
    lines = text.splitlines(keepends=True)
    at = [n for n, ln in enumerate(lines) if ln.startswith(CONTENT_PREFIX)]
    if len(at) != 1:
        raise LockError("internal: a lockfile needs exactly one content sha256 line")
    lines[at[0]] = f"{CONTENT_PREFIX}{digest}{CONTENT_NOTE}\n"
    return "".join(lines)


@dataclass(frozen=True)
class LockfileHeader:
    recipe: str
    recipe_sha256: str
    inputs_sha256: str
    resolver: str
    command: str  # the line that regenerates the lockfile
    pins: tuple[dict[str, Any], ...]
    patches: tuple[dict[str, Any], ...]
    unresolved: tuple[dict[str, Any], ...]
    content_sha256: str | None = None  # as recorded; None: written before stackbuild recorded it
    content_actual: str = ""  # as computed from the file now
    primary_index: str = ""
    packages: tuple[str, ...] = ()  # names locked in the body

    @property
    def edited(self) -> bool:
        return self.content_sha256 is not None and self.content_sha256 != self.content_actual

    @property
    def complete(self) -> bool:
        return not self.unresolved


def read_header(path: Path) -> LockfileHeader:
    """Read the records a stackbuild lockfile keeps in its header (no network)."""
    if not path.exists():
        raise LockError("no lockfile yet: run `stackbuild lock` for this recipe first", file=path)
    text = read_user_text(path, "lockfile", LockError)
    lines = text.splitlines()
    if not lines or not lines[0].startswith(FIRST_LINE):
        raise LockError("not a stackbuild lockfile (its first line is not the stackbuild header)", file=path)
    recipe = lines[0][len(FIRST_LINE):].split(".")[0].strip()
    fields: dict[str, str] = {}
    pins: list[dict[str, Any]] = []
    patches: list[dict[str, Any]] = []
    unresolved: list[dict[str, Any]] = []
    for n, line in enumerate(lines, start=1):
        if line.startswith(INPUT_PREFIX) or line.startswith(UNRESOLVED_PREFIX):
            is_input = line.startswith(INPUT_PREFIX)
            body = line[len(INPUT_PREFIX if is_input else UNRESOLVED_PREFIX):]
            kind, _, blob = body.partition(" ") if is_input else ("unresolved", "", body)
            try:
                rec = json.loads(blob)
            except json.JSONDecodeError:
                raise LockError(f"line {n}: damaged stackbuild record", file=path) from None
            if not isinstance(rec, dict):
                raise LockError(f"line {n}: damaged stackbuild record", file=path)
            {"pin": pins, "patch": patches, "unresolved": unresolved}.get(kind, []).append(rec)
            continue
        m = re.match(r"^# (recipe sha256|inputs sha256|content sha256|resolver|primary index): (\S.*)$", line)
        if m and m.group(1) not in fields:
            fields[m.group(1)] = m.group(2).split()[0] if "sha256" in m.group(1) else m.group(2)
    for key in ("recipe sha256", "inputs sha256"):
        if key not in fields:
            raise LockError(f"header has no '{key}' line", file=path)
    command = lines[1].removeprefix("#").strip() if len(lines) > 1 and "stackbuild lock" in lines[1] else ""
    try:
        names = tuple(p.name for p in parse_resolver_output(text, {}))
    except LockError:
        names = ()
    return LockfileHeader(recipe, fields["recipe sha256"], fields["inputs sha256"],
                          fields.get("resolver", ""), command, tuple(pins), tuple(patches), tuple(unresolved),
                          fields.get("content sha256"), content_digest(text), fields.get("primary index", ""),
                          names)


def incomplete_message(header: LockfileHeader) -> str | None:
    """None for a complete lockfile; else one line: what is missing, and which host and
    indexes can complete it, with the command. `lock --check` and `install-script` both
    say exactly this."""
    return incompleteness(header.recipe, header.command, header.pins, header.unresolved, header.primary_index)


def incompleteness(recipe: str, command: str, pins: tuple[dict[str, Any], ...] | list[dict[str, Any]],
                   unresolved: tuple[dict[str, Any], ...] | list[dict[str, Any]], primary: str) -> str | None:
    if not unresolved:
        return None
    names = list(dict.fromkeys(str(u.get("name", "?")) for u in unresolved))
    by_name = {str(p.get("name")): p for p in pins}
    reach: list[str] = []
    for u in unresolved:
        origin = str(u.get("origin", ""))
        pin = by_name.get(origin.removeprefix("pins.")) if origin.startswith("pins.") else None
        for url in ((pin.get("index"), pin.get("url")) if pin else (primary,)):
            if url and not str(url).startswith("a local index") and url not in reach:
                reach.append(str(url))
    complete_with = command.replace(" --offline", "").replace(" --partial", "") or f"stackbuild lock {recipe}"
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    return (f"incomplete lockfile: {len(names)} requirement(s) not resolved in it ({shown}); complete it on a "
            f"host that reaches {', '.join(reach) or 'the package index'} with: {complete_with}")
