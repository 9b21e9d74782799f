"""Environment check: the target interpreter (--python) has what the lockfile says,
nothing the recipe forbids, and imports vllm from site-packages rather than from a
vllm/ source folder in the working directory.

Everything about the target is asked in one subprocess of that interpreter (stdlib
only there: a fresh venv has no `packaging`); comparing happens here.

Options read from `ctx.options`: `lockfile` (a path; default lockfiles/NAME.txt under
the project root) and `cwd` (the directory whose vllm/ folder could shadow the
package; default the current directory).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from packaging.markers import InvalidMarker, Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from stackbuild.checks import CheckContext, CheckResult, CheckStatus
from stackbuild.checks.probe import run_probe
from stackbuild.errors import StackbuildError
from stackbuild.lock.api import default_lockfile
from stackbuild.recipe import Recipe

CHECK = "environment"
PROBE_TIMEOUT_S = 120

# Runs inside the target interpreter: stdlib only, one JSON line out. sys.path[0] is
# the working directory here, exactly as for `python -c "import vllm"` typed there.
PROBE = r"""
import importlib.metadata as md, importlib.util, json, os, platform, sys
dists = {}
for d in md.distributions():
    name = d.metadata["Name"]
    if name and name not in dists:
        dists[name] = d.version
def origin(name):
    try:
        spec = importlib.util.find_spec(name)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if spec is None:
        return None
    locs = list(spec.submodule_search_locations or [])
    return {"origin": spec.origin, "locations": locs}
cwd = os.getcwd()
shadow = origin("vllm")
sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]
importlib.invalidate_caches()
sys.modules.pop("vllm", None)
installed = origin("vllm")
impl = sys.implementation
env = {
    "implementation_name": impl.name,
    "implementation_version": "{0.major}.{0.minor}.{0.micro}".format(impl.version),
    "os_name": os.name,
    "platform_machine": platform.machine(),
    "platform_python_implementation": platform.python_implementation(),
    "platform_release": platform.release(),
    "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform,
}
print(json.dumps({"executable": sys.executable, "python": platform.python_version(),
                  "cwd": cwd, "distributions": dists, "vllm_here": shadow,
                  "vllm_installed": installed, "markers": env}))
"""


@dataclass(frozen=True)
class LockedVersion:
    name: str  # canonical
    requirement: str
    version: str | None  # None: a direct URL without a version in its file name
    marker: str | None
    line: int


def read_locked_versions(path: Path) -> list[LockedVersion]:
    """`name==version` lines of a pip-compile style lockfile; hashes, comments, option
    lines and backslash continuations are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise StackbuildError(f"cannot read lockfile: {e.strerror}", file=path) from None
    from stackbuild.lock.requirements import logical_lines

    out: list[LockedVersion] = []
    logical = logical_lines(text)
    for lineno, entry in logical:
        entry = re.sub(r"\s--hash[= ]\S+", "", " " + entry).strip()
        if not entry or entry.startswith("-"):
            continue
        try:
            req = Requirement(entry)
        except InvalidRequirement as e:
            raise StackbuildError(f"not a requirement: {entry!r} ({e})", file=path, key=f"line {lineno}") from None
        version = None
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator in ("==", "==="):
            version = specs[0].version
        elif req.url:
            version = _version_from_url(req.url)
        out.append(LockedVersion(canonicalize_name(req.name), entry, version,
                                 str(req.marker) if req.marker else None, lineno))
    return out


def _version_from_url(url: str) -> str | None:
    name = unquote(Path(urlparse(url).path).name)
    if name.endswith(".whl"):
        parts = name.split("-")
        return parts[1] if len(parts) >= 5 else None
    return None


def probe_interpreter(python: Path, cwd: Path) -> dict[str, Any]:
    """Ask the target interpreter about itself (one subprocess)."""
    return run_probe(python, PROBE, timeout=PROBE_TIMEOUT_S, cwd=cwd)


def _installed(info: dict[str, Any]) -> dict[str, str]:
    return {canonicalize_name(n): v for n, v in info["distributions"].items()}


def _matches(locked: str, installed: str) -> bool:
    """PEP 440 `==`: a lock without a local label accepts any (2.10.0 ~ 2.10.0+xpu)."""
    try:
        return SpecifierSet(f"=={locked}").contains(installed, prereleases=True)
    except Exception:
        return locked == installed


def check_versions(recipe: Recipe, info: dict[str, Any], lockfile: Path) -> list[CheckResult]:
    installed = _installed(info)
    results: list[CheckResult] = []
    if lockfile.exists():
        wanted = read_locked_versions(lockfile)
        source = str(lockfile)
    else:
        wanted = [
            LockedVersion(canonicalize_name(p.name), p.requirement(), p.spec[2:].strip(), p.markers, 0)
            for p in recipe.pins
            if p.spec.startswith("==") and not p.spec.startswith("===") and "*" not in p.spec
        ]
        source = f"the recipe's == pins ({recipe.path.name})"
        results.append(CheckResult(
            CHECK, CheckStatus.SKIP,
            f"no lockfile {lockfile} (run `stackbuild lock {recipe.name}`); compared {len(wanted)} "
            "== pins from the recipe instead",
            subject="lockfile",
        ))
    matched = 0
    for w in wanted:
        if w.marker:
            try:
                if not Marker(w.marker).evaluate(info["markers"]):
                    continue  # not for this interpreter or platform
            except InvalidMarker:
                pass
        have = installed.get(w.name)
        where = f"{source} line {w.line}" if w.line else source
        if have is None:
            results.append(CheckResult(CHECK, CheckStatus.FAIL,
                                       f"{w.name} is not installed; {where} wants {w.version or w.requirement}",
                                       subject=w.name, data={"locked": w.version, "installed": None}))
        elif w.version is not None and not _matches(w.version, have):
            results.append(CheckResult(CHECK, CheckStatus.FAIL,
                                       f"{w.name} {have} is installed; {where} wants {w.version}",
                                       subject=w.name, data={"locked": w.version, "installed": have}))
        else:
            matched += 1
    if not any(r.status is CheckStatus.FAIL for r in results):
        # mismatches are reported one per package; the summary line is for a clean run
        results.append(CheckResult(CHECK, CheckStatus.PASS, f"{matched} packages match {source}",
                                   subject="versions", data={"matched": matched, "source": source}))
    return results


def check_python_window(recipe: Recipe, info: dict[str, Any]) -> CheckResult:
    window = recipe.environment.python
    version = info["python"]
    data = {"python": version, "window": window, "executable": info["executable"]}
    if SpecifierSet(window).contains(version, prereleases=True):
        return CheckResult(CHECK, CheckStatus.PASS, f"Python {version} at {info['executable']} (recipe: {window})",
                           subject="interpreter", data=data)
    return CheckResult(CHECK, CheckStatus.FAIL,
                       f"Python {version} at {info['executable']} is outside the recipe's window {window} "
                       "(torch XPU wheels exist only inside it)", subject="interpreter", data=data)


def check_forbidden(recipe: Recipe, info: dict[str, Any]) -> list[CheckResult]:
    installed = _installed(info)
    results: list[CheckResult] = []
    seen: set[str] = set()
    for pkg, reason in recipe.environment.forbid:
        name = canonicalize_name(pkg)
        if name in seen:
            continue  # intel-extension-for-pytorch and intel_extension_for_pytorch are one
        seen.add(name)
        if name in installed:
            results.append(CheckResult(
                CHECK, CheckStatus.FAIL,
                f"{pkg} {installed[name]} is installed but forbidden: {reason} "
                f"(remove it: {info['executable']} -m pip uninstall {pkg})",
                subject=pkg, data={"installed": installed[name], "reason": reason},
            ))
        else:
            results.append(CheckResult(CHECK, CheckStatus.PASS, f"{pkg} is not installed (forbidden: {reason})",
                                       subject=pkg))
    return results


def check_shadowing(info: dict[str, Any]) -> CheckResult:
    cwd = Path(info["cwd"])
    here = info.get("vllm_here") or {}
    installed = info.get("vllm_installed") or {}
    folder = cwd / "vllm"
    locations = [*here.get("locations", []), here.get("origin") or ""]
    from_cwd = any(loc and _inside(Path(loc), folder) for loc in locations)
    inst_where = None
    if installed:
        inst_where = installed.get("origin") or (installed.get("locations") or ["?"])[0]
    data = {"cwd": str(cwd), "imports_from": here.get("origin"), "installed": inst_where}
    if from_cwd:
        what = f"the installed package at {inst_where}" if inst_where else "an installed vllm (none is installed)"
        return CheckResult(
            CHECK, CheckStatus.FAIL,
            f"a vllm/ folder in {cwd} shadows {what}: `import vllm` there loads {folder}; "
            "run from another directory or rename the folder",
            subject="vllm import", data=data,
        )
    if here.get("error"):
        return CheckResult(CHECK, CheckStatus.FAIL, f"finding vllm failed: {here['error']}",
                           subject="vllm import", data=data)
    if not here:
        return CheckResult(CHECK, CheckStatus.SKIP, "vllm is not installed in the target", subject="vllm import",
                           data=data)
    return CheckResult(CHECK, CheckStatus.PASS, f"vllm imports from {here.get('origin')}",
                       subject="vllm import", data=data)


def _inside(path: Path, folder: Path) -> bool:
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f + os.sep)


def run_environment(ctx: CheckContext) -> list[CheckResult]:
    if ctx.python is None:
        return [CheckResult(CHECK, CheckStatus.SKIP, "no target interpreter (give --python /path/to/venv/bin/python)")]
    cwd = Path(ctx.options.get("cwd") or Path.cwd())
    lockfile = Path(ctx.options.get("lockfile") or default_lockfile(ctx.recipe))
    try:
        info = probe_interpreter(ctx.python, cwd)
    except StackbuildError as e:
        return [CheckResult(CHECK, CheckStatus.FAIL, e.render(), subject=str(ctx.python))]
    results = [check_python_window(ctx.recipe, info)]
    results += check_versions(ctx.recipe, info, lockfile)
    results += check_forbidden(ctx.recipe, info)
    results.append(check_shadowing(info))
    return results

