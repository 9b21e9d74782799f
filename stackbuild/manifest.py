"""The workspace manifest: what went into an applied workspace (recipe hash, each
source's sha256 or commit, each patch's sha256 and verdict). It makes re-runs
idempotent and is the provenance record that build and verify read."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stackbuild.errors import StackbuildError
from stackbuild.inputs import read_user_text

MANIFEST_NAME = "manifest.json"
SCHEMA = 1


@dataclass(frozen=True)
class SourceRecord:
    name: str
    kind: str  # pypi | git | local
    ref: str  # "vllm==0.19.0", a git url@commit, a local path
    sha256: str | None  # archive sha256 (pypi); local: git-tree-ID or files-SHA256 (localbase)
    commit: str | None  # upstream commit (git)
    tree: str | None  # folder in the workspace (patched sources only)
    base_commit: str | None  # workspace commit of the pristine base (tag stackbuild/base)
    head_commit: str | None  # workspace commit after the last patch


@dataclass(frozen=True)
class PatchRecord:
    name: str
    kind: str  # file | from-source | backport
    source: str
    sha256: str  # of the patch text as applied (or of the backport's files)
    verdict: str  # a PatchVerdict value
    detail: str
    files: tuple[str, ...]  # files the patch touched or added, relative to its source tree
    commit: str | None  # workspace commit holding it (None when skipped)


@dataclass(frozen=True)
class Manifest:
    recipe: str
    recipe_sha256: str
    inputs_sha256: str  # digest over recipe, sources and patch contents: unchanged => no-op
    platform: str
    sources: tuple[SourceRecord, ...]
    patches: tuple[PatchRecord, ...]
    created: str
    stackbuild_version: str
    schema: int = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    def touched(self) -> dict[str, tuple[str, ...]]:
        out: dict[str, list[str]] = {}
        for p in self.patches:
            lst = out.setdefault(p.source, [])
            for f in p.files:
                if f not in lst:
                    lst.append(f)
        return {k: tuple(v) for k, v in out.items()}

    def source(self, name: str) -> SourceRecord | None:
        return next((s for s in self.sources if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = [asdict(s) for s in self.sources]
        d["patches"] = [{**asdict(p), "files": list(p.files)} for p in self.patches]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            recipe=d["recipe"],
            recipe_sha256=d["recipe_sha256"],
            inputs_sha256=d["inputs_sha256"],
            platform=d["platform"],
            sources=tuple(SourceRecord(**s) for s in d["sources"]),
            patches=tuple(PatchRecord(**{**p, "files": tuple(p["files"])}) for p in d["patches"]),
            created=d["created"],
            stackbuild_version=d["stackbuild_version"],
            schema=d.get("schema", SCHEMA),
            extra=d.get("extra", {}),
        )

    def write(self, workspace: Path) -> Path:
        path = workspace / MANIFEST_NAME
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path


def read_manifest(workspace: Path) -> Manifest | None:
    path = workspace / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return Manifest.from_dict(json.loads(read_user_text(path, "manifest")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StackbuildError(f"unreadable manifest ({e}); re-run `stackbuild apply`", file=path) from None
