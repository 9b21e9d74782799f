"""The content-addressed build cache: cache_dir()/builds/<key>/ holds the wheel(s) of
one build and its bom.json. The key is a sha256 over everything that decides the
output (see `stackbuild.build.key_inputs`), so a hit can be returned without running
the build, and a changed patch, pin or toolchain lands in a new entry.

Entries are written whole or not at all: the build fills a temporary folder beside
the entries and renames it into place on success. `cache ls` lists the entries, `cache
gc` removes them by age (of last use) and by total size (least recently used first).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stackbuild.cache import atomic_write_text, cache_dir, locked, sha256_file
from stackbuild.errors import StackbuildError
from stackbuild.report import Table

BOM_NAME = "bom.json"
USED_MARKER = ".last-used"  # touched on every hit: gc's notion of age is "unused for"
TMP_PREFIX = ".tmp-"
KEY_LEN = 64
KEY_SCHEMA = 1  # bump when the meaning of the key's inputs changes


def builds_dir() -> Path:
    d = cache_dir() / "builds"
    d.mkdir(parents=True, exist_ok=True)
    return d


def logs_dir() -> Path:
    d = cache_dir() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def compute_key(inputs: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the key's inputs."""
    canonical = json.dumps({"key_schema": KEY_SCHEMA, **inputs}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def diff_inputs(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, ...]:
    """The top-level key inputs that differ: why a build missed the cache."""
    return tuple(sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)))


def _is_key(name: str) -> bool:
    return len(name) == KEY_LEN and all(c in "0123456789abcdef" for c in name)


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    recipe: str
    wheels: tuple[str, ...]  # file names, relative to path
    size_bytes: int
    built_at: float  # epoch seconds
    last_used: float  # epoch seconds
    bom: dict[str, Any]

    @property
    def wheel_paths(self) -> tuple[Path, ...]:
        return tuple(self.path / w for w in self.wheels)

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (now or time.time()) - self.last_used)

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        return {
            "key": self.key,
            "path": str(self.path),
            "recipe": self.recipe,
            "wheels": list(self.wheels),
            "size_bytes": self.size_bytes,
            "built_at": _iso(self.built_at),
            "last_used": _iso(self.last_used),
            "age_s": round(self.age_s(now), 1),
        }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_entry(path: Path) -> CacheEntry | None:
    """The entry in `path`, or None when it is not a complete entry."""
    bom_path = path / BOM_NAME
    try:
        bom = json.loads(bom_path.read_text())
    except (OSError, ValueError):
        return None
    wheels = tuple(a["filename"] for a in bom.get("artifacts", []))
    if not wheels or not all((path / w).is_file() for w in wheels):
        return None
    built_at = bom_path.stat().st_mtime
    used = path / USED_MARKER
    last_used = used.stat().st_mtime if used.exists() else built_at
    return CacheEntry(
        key=path.name, path=path, recipe=str(bom.get("recipe", {}).get("name", "?")), wheels=wheels,
        size_bytes=_dir_size(path), built_at=built_at, last_used=max(built_at, last_used), bom=bom,
    )


def lookup(key: str, verify: bool = True, touch: bool = True) -> CacheEntry | None:
    """The complete entry for `key`; with `verify`, its wheels must still hash to what
    the bill of materials says (a damaged entry is removed and counts as a miss).
    With `touch`, the entry counts as used now (for `cache gc`)."""
    path = builds_dir() / key
    if not path.is_dir():
        return None
    entry = read_entry(path)
    if entry is None:
        return None
    if verify:
        for art in entry.bom.get("artifacts", []):
            if sha256_file(path / art["filename"]) != art.get("sha256"):
                shutil.rmtree(path, ignore_errors=True)
                return None
    if touch:
        (path / USED_MARKER).touch()
    return entry


def new_staging(key: str) -> Path:
    """A fresh temporary folder beside the entries (same filesystem: the final rename
    is atomic)."""
    d = builds_dir() / f"{TMP_PREFIX}{key[:16]}-{os.getpid()}-{time.time_ns()}"
    d.mkdir()
    return d


def commit_entry(staging: Path, key: str) -> Path:
    """Rename a filled staging folder to its entry. If another run put the same key in
    place meanwhile, that entry wins (same inputs) and ours is dropped."""
    dest = builds_dir() / key
    try:
        os.rename(staging, dest)
    except OSError:
        if read_entry(dest) is None:
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def record_last(recipe: str, key: str) -> None:
    """Remember the entry the last build of `recipe` returned (for `stackbuild bom`)."""
    d = builds_dir() / ".last"
    atomic_write_text(d / f"{recipe}.json", json.dumps({"recipe": recipe, "key": key, "at": time.time()}) + "\n")


def last_key(recipe: str) -> str | None:
    p = builds_dir() / ".last" / f"{recipe}.json"
    try:
        return str(json.loads(p.read_text())["key"])
    except (OSError, ValueError, KeyError):
        return None


def entries() -> list[CacheEntry]:
    out = []
    for d in builds_dir().iterdir():
        if d.is_dir() and _is_key(d.name):
            e = read_entry(d)
            if e is not None:
                out.append(e)
    return sorted(out, key=lambda e: e.last_used, reverse=True)


def latest_for(recipe: str, exclude: str | None = None) -> CacheEntry | None:
    """The most recently used entry of `recipe` (to say why a build missed)."""
    return next((e for e in entries() if e.recipe == recipe and e.key != exclude), None)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _age(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.0f}h"
    return f"{s / 86400:.0f}d"


# ------------------------------------------------------------------ cache ls


@dataclass(frozen=True)
class CacheListing:
    root: Path
    entries: tuple[CacheEntry, ...]
    now: float

    @property
    def total_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries)

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "entries": [e.to_dict(self.now) for e in self.entries],
            "total_bytes": self.total_bytes,
        }

    def tables(self) -> list[Table]:
        rows = tuple(
            (e.key[:12], e.recipe, ", ".join(e.wheels), _mb(e.size_bytes), _age(e.age_s(self.now)))
            for e in self.entries
        )
        summary = f"{len(self.entries)} entr{'y' if len(self.entries) == 1 else 'ies'}, {_mb(self.total_bytes)}"
        return [Table(f"build cache: {self.root}", ("key", "recipe", "wheel", "size", "unused for"), rows, summary)]


def cache_ls() -> CacheListing:
    return CacheListing(builds_dir(), tuple(entries()), time.time())


# ------------------------------------------------------------------ cache gc


@dataclass(frozen=True)
class GcResult:
    removed: tuple[CacheEntry, ...]
    kept: tuple[CacheEntry, ...]
    reasons: tuple[str, ...]  # one per removed entry
    leftovers_removed: int  # staging folders of interrupted builds, old logs
    max_age_days: float | None
    max_size_mb: float | None
    now: float

    @property
    def freed_bytes(self) -> int:
        return sum(e.size_bytes for e in self.removed)

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_age_days": self.max_age_days,
            "max_size_mb": self.max_size_mb,
            "removed": [{**e.to_dict(self.now), "reason": r} for e, r in zip(self.removed, self.reasons, strict=True)],
            "kept": [e.to_dict(self.now) for e in self.kept],
            "freed_bytes": self.freed_bytes,
            "remaining_bytes": sum(e.size_bytes for e in self.kept),
            "leftovers_removed": self.leftovers_removed,
        }

    def tables(self) -> list[Table]:
        rows = tuple(
            (e.key[:12], e.recipe, _mb(e.size_bytes), _age(e.age_s(self.now)), r)
            for e, r in zip(self.removed, self.reasons, strict=True)
        )
        summary = (f"removed {len(self.removed)} entr{'y' if len(self.removed) == 1 else 'ies'} ({_mb(self.freed_bytes)}), "
                   f"kept {len(self.kept)} ({_mb(sum(e.size_bytes for e in self.kept))})")
        if self.leftovers_removed:
            summary += f"; {self.leftovers_removed} leftover(s) of interrupted builds or old logs removed"
        return [Table("cache gc", ("key", "recipe", "size", "unused for", "why"), rows, summary)]


LEFTOVER_GRACE_S = 24 * 3600  # a staging folder this old belongs to no running build


def cache_gc(max_age_days: float | None = None, max_size_mb: float | None = None) -> GcResult:
    """Remove entries unused for more than `max_age_days`, then the least recently used
    ones until the rest fit in `max_size_mb`. Staging folders of interrupted builds
    older than a day go too, and build logs and build copies of workspaces (see
    `stackbuild.build.sync_build_tree`) unused for more than `max_age_days`."""
    if max_age_days is not None and max_age_days < 0:
        raise StackbuildError(f"--max-age must be >= 0 days, got {max_age_days}")
    if max_size_mb is not None and max_size_mb < 0:
        raise StackbuildError(f"--max-size must be >= 0 MB, got {max_size_mb}")
    now = time.time()
    root = builds_dir()
    with locked(root / ".gc.lock", "the build cache"):
        live = sorted(entries(), key=lambda e: e.last_used)  # oldest first
        removed: list[CacheEntry] = []
        reasons: list[str] = []
        if max_age_days is not None:
            limit = max_age_days * 86400
            for e in list(live):
                if e.age_s(now) > limit:
                    removed.append(e)
                    reasons.append(f"unused for more than {max_age_days:g} day(s)")
                    live.remove(e)
        if max_size_mb is not None:
            budget = max_size_mb * 1e6
            total = sum(e.size_bytes for e in live)
            while live and total > budget:
                e = live.pop(0)
                total -= e.size_bytes
                removed.append(e)
                reasons.append(f"over the size limit of {max_size_mb:g} MB (least recently used)")
        for e in removed:
            shutil.rmtree(e.path, ignore_errors=True)
        leftovers = 0
        for d in root.iterdir():
            if d.name.startswith(TMP_PREFIX) and now - d.stat().st_mtime > LEFTOVER_GRACE_S:
                shutil.rmtree(d, ignore_errors=True)
                leftovers += 1
        if max_age_days is not None:
            trees = cache_dir() / "buildtrees"
            for index in trees.glob("*.index") if trees.is_dir() else ():
                if now - index.stat().st_mtime > max_age_days * 86400:
                    tree = index.with_suffix("")
                    with locked(tree.parent / f"{tree.name}.lock", f"the build tree {tree}"):
                        index.unlink(missing_ok=True)
                        shutil.rmtree(tree, ignore_errors=True)
                    leftovers += 1
            for log in logs_dir().glob("build-*.log"):
                if now - log.stat().st_mtime > max_age_days * 86400:
                    log.unlink(missing_ok=True)
                    leftovers += 1
    return GcResult(tuple(removed), tuple(sorted(live, key=lambda e: e.last_used, reverse=True)), tuple(reasons),
                    leftovers, max_age_days, max_size_mb, now)

