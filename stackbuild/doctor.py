"""`stackbuild doctor`: can this host run stackbuild and a recipe's install script?

The host-side checks that an install script makes (user and working directory, the GPU
render node and group access, a Python in the recipe's window, oneAPI) are not
re-implemented here: doctor runs the install script's own preflight functions
(templates/preflight.sh, with the same variables `installer.preflight_vars` renders),
in report mode, so the two never disagree. Doctor adds what stackbuild itself needs:
git, free disk, a writable cache, and the indexes the recipe locks from.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stackbuild.errors import StackbuildError
from stackbuild.installer import (
    DISTROS,
    GENERIC_PYTHON_HINT,
    preflight_functions,
    preflight_vars,
    sh_quote,
)
from stackbuild.recipe import EnvironmentSettings, Recipe
from stackbuild.report import Table

GIT_MIN = (2, 28)  # `git init -b` (workspace.py)
DISK_FAIL_GB = 2.0
DISK_WARN_GB = 10.0  # a vLLM workspace and its builds take a few GB; kernels from source more
PREFLIGHT_CHECKS = ("user", "render-node", "python", "oneapi")
PREFLIGHT_TIMEOUT_S = 120


@dataclass(frozen=True)
class DoctorCheck:
    name: str
    status: str  # ok | warn | fail
    detail: str
    source: str  # "install-script preflight" or "stackbuild"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "source": self.source}


@dataclass(frozen=True)
class DoctorResult:
    recipe: str | None
    checks: tuple[DoctorCheck, ...]

    @property
    def exit_code(self) -> int:
        return 1 if any(c.status == "fail" for c in self.checks) else 0

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "checks": [c.to_dict() for c in self.checks], "exit_code": self.exit_code}

    def tables(self) -> list[Table]:
        counts = {s: sum(c.status == s for c in self.checks) for s in ("ok", "warn", "fail")}
        summary = f"{counts['ok']} ok, {counts['warn']} warning(s), {counts['fail']} failed"
        title = f"doctor{' for ' + self.recipe if self.recipe else ''}"
        return [Table(title, ("check", "status", "detail"),
                      tuple((c.name, c.status, c.detail) for c in self.checks), summary)]


# ---------------------------------------------------------------- the install script's preflight


def preflight_script(recipe: Recipe | None) -> str:
    """A bash script of the install script's preflight checks for `recipe`, in report mode."""
    if recipe is not None:
        distro = DISTROS.get(recipe.platform.distro)
        hint = distro.python_hint if distro else GENERIC_PYTHON_HINT
        window, oneapi, name, path = (recipe.environment.python, recipe.build.kernels_from_source, recipe.name,
                                      recipe.path)
    else:
        window, oneapi, name, path = EnvironmentSettings().python, False, "RECIPE", None
        hint = GENERIC_PYTHON_HINT
    return "\n".join([
        "set -o pipefail",
        'die() { echo "$*" >&2; exit 1; }',
        f'VENV_DEFAULT="$HOME/.local/share/stackbuild/venvs/"{sh_quote(name)}',
        'VENV="${STACKBUILD_VENV:-$VENV_DEFAULT}"',
        preflight_vars(window, oneapi_required=oneapi, python_hint=hint, file=path),
        preflight_functions(),
        *(f"preflight_{c.replace('-', '_')}" for c in PREFLIGHT_CHECKS),
        "",
    ])


def run_preflight(recipe: Recipe | None, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> list[DoctorCheck]:
    bash = shutil.which("bash", path=(env or os.environ).get("PATH")) or "/bin/bash"
    source = "install-script preflight"
    try:
        # $0 is what the script's messages call it ("bash install.sh")
        proc = subprocess.run([bash, "-c", preflight_script(recipe), "install.sh"], capture_output=True, text=True,
                              timeout=PREFLIGHT_TIMEOUT_S, stdin=subprocess.DEVNULL, cwd=cwd,
                              env={**(os.environ if env is None else env), "STACKBUILD_PREFLIGHT_REPORT": "1"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return [DoctorCheck("preflight", "fail", f"could not run the preflight checks with {bash}: {e}", source)]
    out: list[DoctorCheck] = []
    for line in proc.stdout.splitlines():
        status, _, rest = line.partition("\t")
        name, _, detail = rest.partition("\t")
        if status in ("ok", "warn", "fail") and name in PREFLIGHT_CHECKS:
            out.append(DoctorCheck(name, status, detail, source))
    missing = [c for c in PREFLIGHT_CHECKS if c not in {d.name for d in out}]
    if missing or proc.returncode != 0:
        tail = " ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit {proc.returncode}"
        out.append(DoctorCheck("preflight", "fail", f"the preflight checks stopped before {', '.join(missing) or 'the end'}: "
                                                    f"{tail}", source))
    return out


# ---------------------------------------------------------------- what stackbuild itself needs


def check_git() -> DoctorCheck:
    exe = shutil.which("git")
    if exe is None:
        return DoctorCheck("git", "fail", "git is not installed (stackbuild keeps each patched source as a git "
                                          "repository)", "stackbuild")
    try:
        text = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return DoctorCheck("git", "fail", f"`git --version` failed: {e}", "stackbuild")
    m = re.search(r"(\d+)\.(\d+)", text)
    if not m:
        return DoctorCheck("git", "fail", f"cannot read the version from {text!r}", "stackbuild")
    have = (int(m.group(1)), int(m.group(2)))
    need = ".".join(map(str, GIT_MIN))
    if have < GIT_MIN:
        return DoctorCheck("git", "fail", f"{text}: stackbuild needs git >= {need} (`git init -b`)", "stackbuild")
    return DoctorCheck("git", "ok", f"{text} at {exe} (>= {need})", "stackbuild")


def check_disk(paths: dict[str, Path]) -> list[DoctorCheck]:
    out = []
    for label, path in paths.items():
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free / 1e9
        except OSError as e:
            out.append(DoctorCheck(f"disk ({label})", "fail", f"cannot read free space at {path}: {e.strerror}",
                                   "stackbuild"))
            continue
        status = "fail" if free < DISK_FAIL_GB else "warn" if free < DISK_WARN_GB else "ok"
        want = "" if status == "ok" else f" (want >= {DISK_WARN_GB:g} GB for workspaces and builds)"
        out.append(DoctorCheck(f"disk ({label})", status, f"{free:.1f} GB free at {probe}{want}", "stackbuild"))
    return out


def check_cache() -> tuple[DoctorCheck, Path | None]:
    from stackbuild.cache import cache_dir

    try:
        d = cache_dir()
        fd, tmp = tempfile.mkstemp(prefix=".doctor-", dir=d)
        os.close(fd)
        os.unlink(tmp)
    except StackbuildError as e:
        return DoctorCheck("cache", "fail", e.render(), "stackbuild"), None
    except OSError as e:
        where = os.environ.get("STACKBUILD_CACHE") or "the user cache dir"
        return DoctorCheck("cache", "fail", f"cannot write to the cache ({where}): {e.strerror}; set "
                                            "STACKBUILD_CACHE to a writable folder", "stackbuild"), None
    return DoctorCheck("cache", "ok", f"{d} is writable", "stackbuild"), d


def check_indexes(recipe: Recipe | None, timeout: float) -> list[DoctorCheck]:
    from stackbuild.lock import backends

    urls: list[tuple[str, bool, str]] = [(os.environ.get("PIP_INDEX_URL") or backends.DEFAULT_INDEX, False,
                                          "the package index")]
    for pin in recipe.pins if recipe else ():
        if pin.index:
            urls.append((pin.index, False, f"pins.{pin.name}.index"))
        if pin.url:
            urls.append((pin.url, True, f"pins.{pin.name}.url"))
    seen: dict[str, tuple[bool, str]] = {}
    for url, artifact, origin in urls:
        seen.setdefault(url, (artifact, origin))
    results = backends.probe_all([(u, a) for u, (a, _) in seen.items()], timeout)
    out = []
    for url, (_, origin) in seen.items():
        why = results[url]
        out.append(DoctorCheck(f"index ({origin})", "ok" if why is None else "fail",
                               f"{url} answers" if why is None else f"{url} unreachable: {why}", "stackbuild"))
    return out


def doctor(recipe: Recipe | None, *, probe_timeout: float = 5.0) -> DoctorResult:
    checks = run_preflight(recipe)
    checks.append(check_git())
    cache, cache_path = check_cache()
    checks.append(cache)
    paths = {"working directory": Path.cwd()}
    if cache_path is not None:
        paths["cache"] = cache_path
    checks += check_disk(paths)
    checks += check_indexes(recipe, probe_timeout)
    return DoctorResult(recipe.name if recipe else None, tuple(checks))
