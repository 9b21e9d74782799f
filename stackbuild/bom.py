"""The bill of materials: what exactly went into a built wheel (recipe and its hash,
sources, patches with verdicts, lockfile, toolchain, host, build command and env, the
wheels' hashes, the cache key). Written as bom.json beside the wheels of each cache
entry; `stackbuild bom NAME` reads the one of the recipe's last build."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from stackbuild.buildcache import BOM_NAME, builds_dir, last_key, read_entry
from stackbuild.errors import StackbuildError
from stackbuild.report import Table

BOM_SCHEMA = 1

# Python packages of the build environment whose versions decide the output.
BUILD_PACKAGES = ("pip", "setuptools", "setuptools-scm", "packaging", "wheel", "torch", "jinja2", "cmake", "ninja")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def python_facts() -> dict[str, Any]:
    return {
        "version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
    }


def build_packages() -> dict[str, str | None]:
    """Versions of the build environment's packages, read from their metadata (no
    import: cheap enough for every cache lookup)."""
    return {name: package_version(name) for name in BUILD_PACKAGES}


def tool_version(exe: str) -> str | None:
    """First line of `exe --version`, or None when it is not on PATH."""
    path = shutil.which(exe)
    if not path:
        return None
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (r.stdout or r.stderr).strip().splitlines()
    return first[0].strip() if first else path


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    out: dict[str, int] = {}
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def host_facts() -> dict[str, Any]:
    mem = meminfo()
    return {
        "os": _os_release(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem.get("MemTotal"),
        "mem_available_bytes": mem.get("MemAvailable"),
    }


# ------------------------------------------------------------------ stackbuild bom


@dataclass(frozen=True)
class BomResult:
    recipe: str
    key: str
    path: Path  # the bom.json
    bom: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "key": self.key, "path": str(self.path), "bom": self.bom}

    def tables(self) -> list[Table]:
        b = self.bom
        build = b.get("build", {})
        tc = b.get("toolchain", {})
        host = b.get("host", {})
        lock = b.get("lockfile") or {}
        py = tc.get("python", {})
        summary_rows: list[tuple[str, str]] = [
            ("recipe", f"{b['recipe']['name']} (sha256 {b['recipe']['sha256'][:16]})"),
            ("platform", str(b["recipe"].get("platform", ""))),
            ("cache key", b.get("cache_key", "")),
            ("version", str(build.get("version", ""))),
            ("target device", str(build.get("target_device", ""))),
            ("jobs", f"{build.get('jobs', {}).get('jobs')} ({build.get('jobs', {}).get('reason', '')})"),
            ("lockfile", f"{lock['path']} (sha256 {lock['sha256'][:16]})" if lock else "none"),
            ("python", f"{py.get('implementation', '')} {py.get('version', '')}"),
        ]
        for name, ver in tc.get("packages", {}).items():
            if ver:
                summary_rows.append((name, ver))
        for name, ver in tc.get("compilers", {}).items():
            summary_rows.append((name, ver or "not found"))
        summary_rows += [
            ("host", f"{host.get('os', '')}, kernel {host.get('kernel', '')}, {host.get('cpu_count')} cpus, "
                     f"{(host.get('mem_total_bytes') or 0) / 2**30:.1f} GiB"),
            ("command", " ".join(build.get("command", []))),
            ("env", " ".join(f"{k}={v}" for k, v in build.get("env", {}).items())),
            ("built", f"{b.get('started', '')} .. {b.get('finished', '')} ({b.get('duration_s', 0):.1f} s)"),
        ]
        tables = [Table(f"bill of materials: {self.path}", ("field", "value"), tuple(summary_rows))]
        tables.append(Table("artifacts", ("wheel", "sha256", "size"), tuple(
            (a["filename"], a["sha256"], f"{a['size'] / 1e6:.1f} MB") for a in b.get("artifacts", []))))
        tables.append(Table("sources", ("name", "kind", "ref", "sha256 / commit"), tuple(
            (s["name"], s["kind"], s["ref"], s.get("sha256") or s.get("commit") or "") for s in b.get("sources", []))))
        tables.append(Table("patches", ("#", "patch", "source", "verdict", "sha256"), tuple(
            (str(i), p["name"], p["source"], p["verdict"], p["sha256"][:16])
            for i, p in enumerate(b.get("patches", []), 1))))
        return tables


def read_bom(recipe: Any, key: str | None = None) -> BomResult:
    """The bill of materials of the recipe's last build (or of the entry `key`).
    `recipe` is a Recipe or a recipe name."""
    name = recipe if isinstance(recipe, str) else recipe.name
    if key is None:
        key = last_key(name)
        if key is None:
            raise StackbuildError(f"no build recorded for recipe {name!r}; run `stackbuild build {name}` first",
                                  file=builds_dir())
    elif len(key) < 64:  # a prefix, as `cache ls` shows it
        matches = [d.name for d in builds_dir().iterdir() if d.is_dir() and d.name.startswith(key)]
        if len(matches) != 1:
            raise StackbuildError(f"{len(matches)} cache entries start with {key!r}; give more of the key", file=builds_dir())
        key = matches[0]
    path = builds_dir() / key
    entry = read_entry(path)
    if entry is None:
        raise StackbuildError(
            f"the build of {name!r} with key {key[:12]} is no longer in the cache (removed by `cache gc`?); "
            f"run `stackbuild build {name}` again", file=path)
    return BomResult(name, key, path / BOM_NAME, entry.bom)
