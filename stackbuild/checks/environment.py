"""Environment check: the target interpreter (--python) has what the lockfile says,
nothing the recipe forbids, and imports vllm from site-packages rather than from a
vllm/ source folder in the working directory.

Versions are compared with the lockfile and, independently, with every pin of the
recipe (a pin the lockfile does not carry is still checked, local labels included:
`2.13.0` does not satisfy `==2.10.0+xpu`).

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
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name

from stackbuild.checks import CheckContext, CheckResult, CheckStatus
from stackbuild.checks.probe import run_probe
from stackbuild.errors import StackbuildError
from stackbuild.lock.api import default_lockfile
from stackbuild.recipe import Pin, Recipe

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
    """Installed versions against the lockfile (when there is one) AND against every
    pin of the recipe: the shipped lockfiles leave out torch, triton-xpu and the
    kernel wheel, so a CPU torch 2.13.0 must still fail against `==2.10.0+xpu`."""
    installed = _installed(info)
    results: list[CheckResult] = []
    matched = 0
    if lockfile.exists():
        source = str(lockfile)
        for w in read_locked_versions(lockfile):
            if not _applies(w.marker, info):
                continue  # not for this interpreter or platform
            have = installed.get(w.name)
            where = f"{source} line {w.line}"
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
    else:
        source = ""
        results.append(CheckResult(
            CHECK, CheckStatus.SKIP,
            f"no lockfile {lockfile} (run `stackbuild lock {recipe.name}`); compared the recipe's pins only",
            subject="lockfile",
        ))
    pins_ok, pin_results = check_pins(recipe, info, installed)
    results += pin_results
    if not any(r.status is CheckStatus.FAIL for r in results):
        # mismatches are reported one per package; the summary line is for a clean run
        parts = [f"{matched} packages match {source}"] if source else []
        if pins_ok or not source:
            parts.append(f"{pins_ok} pins of recipe {recipe.name} match")
        results.append(CheckResult(CHECK, CheckStatus.PASS, "; ".join(parts), subject="versions",
                                   data={"matched": matched, "source": source, "pins_matched": pins_ok}))
    return results


def pin_specifier(pin: Pin) -> str | None:
    """What a pin requires of the installed version: its specifier, or for a URL pin
    `==VERSION` read from the wheel's file name; None when it names no version."""
    if pin.spec.strip():
        return pin.spec.strip()
    if pin.url:
        version = _version_from_url(pin.url)
        return f"=={version}" if version else None
    return None


def check_pins(recipe: Recipe, info: dict[str, Any], installed: dict[str, str]) -> tuple[int, list[CheckResult]]:
    """(pins matched, one fail per pin the installed version breaks or is missing for)."""
    results: list[CheckResult] = []
    ok = 0
    for pin in recipe.pins:
        spec = pin_specifier(pin)
        if spec is None or not _applies(pin.markers, info):
            continue
        name = canonicalize_name(pin.name)
        have = installed.get(name)
        where = f"recipe {recipe.name} pins {pin.name}{spec} (pins.{pin.name})"
        data = {"pinned": spec, "installed": have, "recipe": str(recipe.path)}
        try:
            wanted = SpecifierSet(spec)
        except InvalidSpecifier:
            results.append(CheckResult(CHECK, CheckStatus.FAIL, f"{where}: not a version specifier",
                                       subject=name, data=data))
            continue
        if have is None:
            results.append(CheckResult(CHECK, CheckStatus.FAIL, f"{name} is not installed; {where}",
                                       subject=name, data=data))
        elif not wanted.contains(have, prereleases=True):
            results.append(CheckResult(CHECK, CheckStatus.FAIL, f"{name} {have} is installed; {where}",
                                       subject=name, data=data))
        else:
            ok += 1
    return ok, results


def _applies(marker: str | None, info: dict[str, Any]) -> bool:
    if not marker:
        return True
    try:
        return bool(Marker(marker).evaluate(info["markers"]))
    except InvalidMarker:
        return True


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

