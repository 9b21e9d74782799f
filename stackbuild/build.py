"""`stackbuild build`: the patched vLLM wheel from the applied workspace, cached by a
key over everything that decides it, with a bill of materials beside it.

The flow: check the toolchain the target needs (before anything slow) -> bring the
workspace up to date with `apply_recipe` (a no-op when its manifest matches the
recipe) -> compute the cache key -> on a hit return the cached wheel (no pip) -> on a
miss bring a build copy of the workspace's HEAD up to date (in the cache, with its
own git index: build artefacts never touch the workspace, and only files that changed
since the last build are rewritten), run `pip wheel` there with its output streamed
to a log and to `progress`, and rename the finished entry into the cache.

Targets: `xpu` (both hardware targets; needs the oneAPI DPC++ compiler, torch built
with XPU, cmake and ninja), `empty` (a pure-Python wheel that builds anywhere) and
`cpu` (vLLM's CPU build; needs a C++ compiler, cmake and ninja; not exercised here).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import parse_wheel_filename
from packaging.version import InvalidVersion, Version

from stackbuild import __version__
from stackbuild.bom import (
    BOM_SCHEMA,
    build_packages,
    host_facts,
    meminfo,
    package_version,
    python_facts,
    tool_version,
)
from stackbuild.buildcache import (
    BOM_NAME,
    CacheEntry,
    builds_dir,
    commit_entry,
    compute_key,
    diff_inputs,
    latest_for,
    logs_dir,
    lookup,
    new_staging,
    record_last,
)
from stackbuild.cache import atomic_write_text, cache_dir, locked, sha256_file
from stackbuild.errors import CheckFailed, StackbuildError
from stackbuild.lock.api import default_lockfile
from stackbuild.manifest import Manifest, SourceRecord, read_manifest
from stackbuild.recipe import Recipe, Source, SourceKind
from stackbuild.report import Table
from stackbuild.workspace import (
    apply_recipe,
    default_workdir,
    git_process,
    refused_for_refresh_marks,
    run_git,
)

Progress = Callable[[str], None]

VLLM_SOURCE = "vllm"
KERNELS_SOURCE = "vllm-xpu-kernels"
TARGETS = ("xpu", "empty", "cpu")
GIB = 1 << 30
# Memory one compile job needs at its peak; a pure-Python build compiles nothing.
MEM_PER_JOB = {"xpu": 4 * GIB, "cpu": 2 * GIB}
PROGRESS_EVERY_S = 1.0
TAIL_LINES = 20
# Wheels record this as every file's time: same inputs, same wheel bytes.
SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the earliest a zip can say
# Inherited variables that would change what setup.py builds without being in the key.
SCRUBBED_ENV_PREFIXES = ("VLLM_", "SETUPTOOLS_SCM_")
SCRUBBED_ENV = ("MAX_JOBS", "NVCC_THREADS", "CMAKE_BUILD_TYPE")
# Build requirements only a native compile uses; cmake and ninja are looked for on PATH.
NATIVE_ONLY = {"cmake", "ninja", "jinja2"}


class BuildError(StackbuildError):
    """The build cannot run (missing prerequisites) or ran and failed (the message
    holds the log's last lines and its path)."""


# ------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class JobsPlan:
    jobs: int
    requested: int | None  # what --jobs or the recipe asked for
    source: str  # where `requested` came from
    mem_available_bytes: int | None
    per_job_bytes: int | None  # None: nothing is compiled
    capped: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_jobs(
    cli_jobs: int | None,
    recipe_jobs: int | None,
    mem_available_bytes: int | None,
    per_job_bytes: int | None,
    cpu_count: int | None = None,
) -> JobsPlan:
    """MAX_JOBS: --jobs, else the recipe's build.max_jobs (the platform's default when
    unset), else the cpu count; never more than the available memory allows."""
    if cli_jobs is not None:
        if cli_jobs < 1:
            raise BuildError(f"--jobs must be >= 1, got {cli_jobs}")
        requested, source = cli_jobs, "--jobs"
    elif recipe_jobs is not None:
        requested, source = recipe_jobs, "recipe build.max_jobs (or the platform default)"
    else:
        requested, source = cpu_count or os.cpu_count() or 1, "cpu count"
    if per_job_bytes is None:
        return JobsPlan(requested, requested, source, mem_available_bytes, None, False,
                        f"{requested} from {source}; nothing is compiled, so memory sets no cap")
    if mem_available_bytes is None:
        return JobsPlan(requested, requested, source, None, per_job_bytes, False,
                        f"{requested} from {source}; available memory unknown (no /proc/meminfo), not capped")
    allowed = max(1, mem_available_bytes // per_job_bytes)
    gib = mem_available_bytes / GIB
    per = per_job_bytes / GIB
    if requested > allowed:
        return JobsPlan(int(allowed), requested, source, mem_available_bytes, per_job_bytes, True,
                        f"capped from {requested} ({source}) to {allowed}: {gib:.1f} GiB available, "
                        f"{per:.0f} GiB per compile job")
    return JobsPlan(requested, requested, source, mem_available_bytes, per_job_bytes, False,
                    f"{requested} from {source}; {gib:.1f} GiB available allows {allowed} at {per:.0f} GiB per job")


# ------------------------------------------------------------------ prerequisites


@dataclass(frozen=True)
class Missing:
    what: str
    why: str  # what was found instead
    hint: str = ""

    def render(self) -> str:
        return f"{self.what}: {self.why}" + (f" ({self.hint})" if self.hint else "")


def _torch_xpu(python: str) -> tuple[str | None, str | None]:
    """(torch version, torch.version.xpu) of the build interpreter; imports torch in a
    child so the CLI process stays light."""
    code = "import json, torch; print(json.dumps([torch.__version__, getattr(torch.version, 'xpu', None)]))"
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if r.returncode != 0:
        return None, None
    ver, xpu = json.loads(r.stdout.strip().splitlines()[-1])
    return ver, xpu


def compilers(target: str) -> dict[str, str | None]:
    """The native toolchain a compiling target uses (first line of --version each)."""
    if target == "xpu":
        names = ("icpx", "cmake", "ninja")
    elif target == "cpu":
        names = ("c++", "cmake", "ninja")
    else:
        return {}
    return {n: tool_version(n) for n in names}


def check_toolchain(target: str, kernels: bool, python: str = sys.executable) -> tuple[Missing, ...]:
    """What the target's native build needs and this machine lacks. Cheap for `empty`;
    for `xpu` it imports torch once in a child process."""
    missing: list[Missing] = []
    if target == "empty" and not kernels:
        return ()
    tools = compilers("xpu" if kernels else target)
    if "icpx" in tools and tools["icpx"] is None:
        setvars = Path(os.environ.get("ONEAPI_ROOT", "/opt/intel/oneapi")) / "setvars.sh"
        hint = (f"run `source {setvars}` first" if setvars.exists()
                else "install the Intel oneAPI Base Toolkit (DPC++/C++ compiler) and source its setvars.sh")
        missing.append(Missing("Intel oneAPI DPC++ compiler", "icpx is not on PATH", hint))
    if "c++" in tools and tools["c++"] is None:
        missing.append(Missing("a C++ compiler", "c++ is not on PATH", "install g++"))
    for tool in ("cmake", "ninja"):
        if tool in tools and tools[tool] is None:
            missing.append(Missing(tool, "not on PATH", f"pip install {tool}"))
    if tools.get("cmake"):
        m = re.search(r"(\d+\.\d+(\.\d+)?)", tools["cmake"] or "")
        if m and Version(m.group(1)) < Version("3.26.1"):
            missing.append(Missing("cmake>=3.26.1", f"found {m.group(1)}", "pip install 'cmake>=3.26.1'"))
    if target == "xpu" or kernels:
        ver, xpu = _torch_xpu(python)
        if ver is None:
            missing.append(Missing("torch with XPU support", f"torch does not import in {python}",
                                   "install the recipe's torch pin from the PyTorch XPU index"))
        elif not xpu:
            missing.append(Missing("torch with XPU support", f"torch {ver} was built without XPU (torch.version.xpu is None)",
                                   "install the recipe's torch pin (+xpu) from the PyTorch XPU index"))
    return tuple(missing)


def check_build_requires(tree: Path, target: str) -> tuple[Missing, ...]:
    """The tree's [build-system] requires, checked against the build interpreter (the
    build runs without isolation). Lower bounds only: vLLM caps setuptools below what
    builds it fine, and pins the torch it was released with while a recipe pins its
    own (recorded in the bill of materials)."""
    import tomllib

    try:
        data = tomllib.loads((tree / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BuildError(f"cannot read the build requirements: {e}", file=tree / "pyproject.toml") from None
    missing: list[Missing] = []
    for spec in data.get("build-system", {}).get("requires", []):
        try:
            req = Requirement(spec)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = req.name.lower()
        if name in ("cmake", "ninja") or (target == "empty" and name in NATIVE_ONLY):
            continue
        found = package_version(name)
        if found is None:
            missing.append(Missing(spec, "not installed", f"pip install '{spec}'"))
            continue
        if name == "torch":
            continue
        for clause in req.specifier:
            if clause.operator in (">=", ">", "==", "~=") and not clause.contains(found, prereleases=True):
                missing.append(Missing(spec, f"found {found}", f"pip install '{req.name}{clause}'"))
    return tuple(missing)


def _missing_message(target: str, missing: tuple[Missing, ...]) -> str:
    lines = "; ".join(m.render() for m in missing)
    msg = f"cannot build for target {target!r} on this machine, missing: {lines}"
    if target != "empty":
        msg += ". `--target-device empty` builds a pure-Python wheel anywhere"
    return msg


# ------------------------------------------------------------------ key and version


def key_inputs(
    recipe_name: str,
    manifest: Manifest,
    trees: Mapping[str, str],
    pins: list[dict[str, Any]],
    target: str,
    kernels: bool,
    build_env: Mapping[str, str],
    python: Mapping[str, Any],
    packages: Mapping[str, str | None],
    native: Mapping[str, str | None],
    stackbuild_version: str = __version__,
) -> dict[str, Any]:
    """Everything that decides the output, as plain data (its sha256 is the key). The
    recipe name is in it because the wheel's version carries it."""
    return {
        "recipe": recipe_name,
        "sources": [
            {"name": s.name, "kind": s.kind, "ref": s.ref, "sha256": s.sha256, "commit": s.commit}
            for s in manifest.sources
        ],
        "patches": [{"name": p.name, "source": p.source, "sha256": p.sha256} for p in manifest.patches],
        "trees": dict(sorted(trees.items())),
        "pins": pins,
        "target_device": target,
        "kernels_from_source": kernels,
        "build_env": dict(sorted(build_env.items())),
        "python": {"version": python.get("version"), "implementation": python.get("implementation")},
        "packages": dict(sorted(packages.items())),
        "native_toolchain": dict(sorted(native.items())),
        "stackbuild": stackbuild_version,
    }


def local_label(recipe_name: str) -> str:
    """The recipe name as a PEP 440 local version part: lowercase letters, digits, dots."""
    label = re.sub(r"[^a-z0-9]+", ".", recipe_name.lower()).strip(".")
    return label or "recipe"


def make_version(upstream: str, recipe_name: str, key: str) -> str:
    """`<upstream>+<recipe>.<first 8 of the key>`, normalised as pip will write it."""
    try:
        base = Version(upstream).public
    except InvalidVersion:
        raise BuildError(f"upstream version {upstream!r} is not a PEP 440 version") from None
    return str(Version(f"{base}+{local_label(recipe_name)}.{key[:8]}"))


def upstream_version(src: Source | None, record: SourceRecord, tree: Path) -> str:
    """The release the tree is: the pypi pin, else the sdist's PKG-INFO, else the tag."""
    if src is not None and src.kind is SourceKind.PYPI and src.version:
        return src.version
    pkg_info = tree / "PKG-INFO"
    if pkg_info.is_file():
        for line in pkg_info.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    if src is not None and src.tag:
        tag = src.tag.removeprefix("v")
        try:
            return str(Version(tag))
        except InvalidVersion:
            pass
    raise BuildError(
        f"cannot tell which release source {record.name!r} is (no pypi pin, PKG-INFO or version tag) "
        "to set VLLM_VERSION_OVERRIDE", key=f"sources.{record.name}")


# ------------------------------------------------------------------ the result


@dataclass(frozen=True)
class BuildResult:
    recipe: str
    target_device: str
    dry_run: bool
    cache_hit: bool
    key: str | None
    version: str | None
    wheels: tuple[Path, ...]
    entry: Path | None
    bom_path: Path | None
    log_path: Path | None  # None on a hit: nothing ran
    jobs: JobsPlan
    duration_s: float
    message: str
    workspace: str = ""  # what apply said
    miss_reasons: tuple[str, ...] = ()  # key inputs that differ from the recipe's previous build
    notes: tuple[str, ...] = ()
    plan: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  # prerequisites this machine lacks (dry run)
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @property
    def wheel(self) -> Path | None:
        return self.wheels[0] if self.wheels else None

    @property
    def ok(self) -> bool:
        return not self.missing

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "target_device": self.target_device,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "cache_hit": self.cache_hit,
            "key": self.key,
            "version": self.version,
            "wheels": [str(w) for w in self.wheels],
            "entry": str(self.entry) if self.entry else None,
            "bom": str(self.bom_path) if self.bom_path else None,
            "log": str(self.log_path) if self.log_path else None,
            "jobs": self.jobs.to_dict(),
            "duration_s": round(self.duration_s, 3),
            "message": self.message,
            "workspace": self.workspace,
            "miss_reasons": list(self.miss_reasons),
            "notes": list(self.notes),
            "plan": list(self.plan),
            "missing": list(self.missing),
            "command": list(self.command),
            "env": dict(self.env),
        }

    def tables(self) -> list[Table]:
        rows: list[tuple[str, str]] = [
            ("target device", self.target_device),
            ("cache", "dry run" if self.dry_run else ("hit" if self.cache_hit else "miss, built")),
            ("key", self.key or "known once the workspace is applied"),
            ("version", self.version or ""),
            ("jobs", f"{self.jobs.jobs}: {self.jobs.reason}"),
        ]
        rows += [("wheel", str(w)) for w in self.wheels]
        if self.bom_path:
            rows.append(("bill of materials", str(self.bom_path)))
        if self.log_path:
            rows.append(("log", str(self.log_path)))
        if self.workspace:
            rows.append(("workspace", self.workspace))
        if self.miss_reasons:
            rows.append(("changed since last build", ", ".join(self.miss_reasons)))
        rows += [("note", n) for n in self.notes]
        rows += [("missing", m) for m in self.missing]
        if self.command:
            rows.append(("command", " ".join(self.command)))
            rows.append(("env", " ".join(f"{k}={v}" for k, v in self.env)))
        rows += [("plan", p) for p in self.plan]
        return [Table(f"build {self.recipe}", ("", ""), tuple(rows), self.message)]


# ------------------------------------------------------------------ doing


def build_tree_dir(tree: Path) -> Path:
    """Where the throwaway build copy of a workspace tree lives: in the cache, not in
    the workspace (apply swaps the workspace whole, and a copy kept there would go)."""
    digest = hashlib.sha256(str(tree.resolve()).encode()).hexdigest()[:12]
    return cache_dir() / "buildtrees" / f"{tree.parent.name}-{tree.name}-{digest}"


def sync_build_tree(tree: Path, dest: Path) -> str:
    """Make `dest` exactly the workspace tree's HEAD: tracked files as committed,
    nothing else (the last build's build/, egg-info and _version.py go). It has its own
    git index beside it, so the workspace's index and files are never touched, and
    only files that differ are rewritten: the first sync copies the whole tree, later
    ones take a fraction of that. Returns the commit."""
    index = dest.parent / f"{dest.name}.index"
    if not index.exists() and dest.exists():
        shutil.rmtree(dest)  # a copy without its index: start over
    dest.mkdir(parents=True, exist_ok=True)
    env = {"GIT_INDEX_FILE": str(index), "GIT_DIR": str(tree / ".git"), "GIT_WORK_TREE": str(dest)}
    try:
        run_git(dest, "-c", "checkout.workers=0", "read-tree", "--reset", "-u", "HEAD", env=env, error=BuildError)
        run_git(dest, "clean", "-f", "-d", "-x", "-q", env=env, error=BuildError)
        return run_git(dest, "rev-parse", "HEAD", env=env, error=BuildError)
    except BaseException:
        # half-synced: the next build copies afresh
        index.unlink(missing_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        raise


def tree_id(tree: Path) -> str:
    r = git_process(tree, "rev-parse", "HEAD^{tree}")
    if r.returncode != 0:
        raise BuildError(f"not a workspace git tree: {r.stderr.strip()}", file=tree)
    return r.stdout.strip()


def run_logged(cmd: list[str], cwd: Path, env: Mapping[str, str], log_path: Path, progress: Progress, label: str) -> None:
    """Run `cmd`, its output going whole to `log_path` and, at most once a second, as
    a line count and the last line to `progress`. Raises BuildError with the log's
    tail when it fails; Ctrl-C stops the child."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    n = 0
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ cd {cwd}\n$ {' '.join(cmd)}\n")
        for k, v in sorted(env.items()):
            if k.startswith(SCRUBBED_ENV_PREFIXES) or k in ("MAX_JOBS", "SOURCE_DATE_EPOCH"):
                log.write(f"# {k}={v}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1)
        assert proc.stdout is not None
        last_emit = 0.0
        try:
            for line in proc.stdout:
                log.write(line)
                n += 1
                now = time.monotonic()
                if now - last_emit >= PROGRESS_EVERY_S:
                    last_emit = now
                    progress(f"{label}: {n} lines, {now - start:.0f}s: {line.strip()[:160]}")
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            log.write("\n# interrupted\n")
            raise
        log.write(f"\n# exit status {rc} after {time.monotonic() - start:.1f}s\n")
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-TAIL_LINES - 2:]
        raise BuildError(f"{label} failed (exit status {rc}); last lines of the log:\n"
                         + "\n".join("  " + t for t in tail) + f"\nfull log: {log_path}")
    progress(f"{label}: done in {time.monotonic() - start:.1f}s ({n} lines)")


def build_env(target: str, version: str | None, jobs: int, recipe_env: Mapping[str, str],
              base: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(full environment for the child, the part stackbuild sets). Inherited VLLM_*
    and the like are dropped: they would change the output without being in the key."""
    env = {k: v for k, v in (base if base is not None else os.environ).items()
           if not k.startswith(SCRUBBED_ENV_PREFIXES) and k not in SCRUBBED_ENV}
    ours = {"VLLM_TARGET_DEVICE": target, "MAX_JOBS": str(jobs), "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
            **dict(recipe_env)}
    if version:
        ours["VLLM_VERSION_OVERRIDE"] = version
    env.update(ours)
    env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PYTHONUNBUFFERED": "1"})
    return env, ours


def pip_wheel_command(out: Path, target: str, python: str = sys.executable) -> list[str]:
    """--no-index: nothing is resolved or downloaded; the build runs in this interpreter.
    -v streams the compiler's lines (progress for an hours-long native build) but costs
    pip about 2 s per 6,000 lines, so a pure-Python build runs quiet: pip still prints
    the whole output of a build step that fails."""
    verbose = ["-v"] if target != "empty" else []
    return [python, "-m", "pip", "wheel", *verbose, "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), "."]


def lockfile_facts(recipe: Recipe) -> dict[str, str] | None:
    path = default_lockfile(recipe)
    return {"path": str(path), "sha256": sha256_file(path)} if path.is_file() else None


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _pins(recipe: Recipe) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(p).items() if v not in (None, "", False)} for p in recipe.pins]


def _single_wheel(out: Path, label: str, log: Path) -> Path:
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"{label}: expected one wheel in {out}, found {len(wheels)}; see {log}")
    return wheels[0]


@dataclass
class _Job:
    role: str  # vllm | vllm-xpu-kernels
    tree: Path  # what to export
    exported: bool  # tree is already a throwaway copy
    env_extra: dict[str, str] = field(default_factory=dict)


def build(
    recipe: Recipe,
    workdir: Path | None = None,
    target_device: str | None = None,
    jobs: int | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Build (or fetch from the cache) the recipe's patched vLLM wheel.

    The workspace is brought up to date first with `apply_recipe` (which does nothing
    when the manifest matches the recipe); a series that no longer applies is a
    BuildError. A dry run applies and builds nothing and reports the plan, whether the
    cache would hit, and what this machine lacks."""
    say: Progress = progress or (lambda _m: None)
    started = time.monotonic()
    refused = refused_for_refresh_marks(recipe, (workdir or default_workdir(recipe)).resolve())
    if refused is not None:  # before anything: a verdict about the series (exit 1), as `apply` gives
        raise CheckFailed(refused.message)
    target = target_device or recipe.build.target_device
    if target not in TARGETS:
        raise BuildError(f"unknown target device {target!r} (one of: {', '.join(TARGETS)})",
                         key="--target-device" if target_device else "build.target_device",
                         file=None if target_device else recipe.path)
    try:
        recipe.source(VLLM_SOURCE)
    except KeyError:
        raise BuildError(f"the recipe has no [sources.{VLLM_SOURCE}] to build", file=recipe.path, key="sources") from None
    workdir = (workdir or default_workdir(recipe)).resolve()
    notes: list[str] = []
    kernels = recipe.build.kernels_from_source and target == "xpu"
    if recipe.build.kernels_from_source and not kernels:
        notes.append(f"build.kernels_from_source is ignored for target {target!r} (the kernels are XPU code)")
    if kernels:
        try:
            recipe.source(KERNELS_SOURCE)
        except KeyError:
            raise BuildError(f"build.kernels_from_source is set, but the recipe declares no [sources.{KERNELS_SOURCE}]",
                             file=recipe.path, key="build.kernels_from_source") from None
    jobs_plan = plan_jobs(jobs, recipe.build.max_jobs, meminfo().get("MemAvailable"), MEM_PER_JOB.get(
        "xpu" if kernels else target))
    if jobs_plan.capped:
        say(f"jobs: {jobs_plan.reason}")

    missing = check_toolchain(target, kernels)
    if dry_run:
        return _dry_run(recipe, workdir, target, kernels, jobs_plan, missing, notes, started)
    if missing:
        raise BuildError(_missing_message(target, missing), file=recipe.path)

    say(f"workspace {workdir}: checking it matches the recipe")
    applied = apply_recipe(recipe, workdir, say)
    if not applied.ok:
        raise BuildError(f"the workspace cannot be brought up to date: {applied.message}", file=recipe.path)
    manifest = applied.manifest or read_manifest(workdir)
    if manifest is None:
        raise BuildError("the workspace has no manifest after apply", file=workdir)
    say(f"workspace: {applied.message}")
    plan = _plan(recipe, workdir, manifest, target, kernels, jobs_plan)
    req_missing = check_build_requires(plan.vllm_tree, target)
    if req_missing:
        raise BuildError(_missing_message(target, req_missing), file=plan.vllm_tree / "pyproject.toml")

    with locked(builds_dir() / ".locks" / f"{plan.key}.lock", f"the build {plan.key[:12]}"):
        hit = lookup(plan.key)
        if hit is not None:
            record_last(recipe.name, plan.key)
            say(f"cache hit {plan.key[:12]}: {', '.join(hit.wheels)}")
            return _result(recipe, target, plan, hit, None, True, started, applied.message, (), notes)
        prev = latest_for(recipe.name, exclude=plan.key)
        reasons = diff_inputs(prev.bom.get("key_inputs", {}), plan.inputs) if prev else ()
        say(f"cache miss {plan.key[:12]}" + (f" (changed: {', '.join(reasons)})" if reasons else ""))
        entry, log = _build_entry(recipe, workdir, manifest, plan, say)
        record_last(recipe.name, plan.key)
        return _result(recipe, target, plan, entry, log, False, started, applied.message, reasons, notes)


@dataclass(frozen=True)
class CachedBuild:
    """What `stackbuild build` would return now, looked up without building."""

    key: str | None  # None: the key cannot be computed (no applied workspace)
    entry: CacheEntry | None
    why: str  # how it was found, or why not


def cached_build(recipe: Recipe, workdir: Path | None = None, target_device: str | None = None) -> CachedBuild:
    """The build cache entry for the recipe's build key as `build` computes it from the
    applied workspace (the same `_plan`), verified against its bill of materials. No
    apply, no build, nothing written (the entry is not marked as used)."""
    target = target_device or recipe.build.target_device
    workdir = (workdir or default_workdir(recipe)).resolve()
    manifest = read_manifest(workdir) if workdir.is_dir() else None
    if manifest is None:
        return CachedBuild(None, None, f"no applied workspace at {workdir}")
    if manifest.recipe_sha256 != recipe.sha256:
        return CachedBuild(None, None, f"the workspace {workdir} was applied from another version of the recipe")
    kernels = recipe.build.kernels_from_source and target == "xpu"
    jobs_plan = plan_jobs(None, recipe.build.max_jobs, None, None)  # MAX_JOBS is not in the key
    plan = _plan(recipe, workdir, manifest, target, kernels, jobs_plan)
    entry = lookup(plan.key, verify=True, touch=False)
    if entry is None:
        return CachedBuild(plan.key, None, f"the build cache has no entry for build key {plan.key[:12]}")
    return CachedBuild(plan.key, entry, f"build key {plan.key[:12]} in {entry.path}")


@dataclass(frozen=True)
class _Plan:
    key: str
    inputs: dict[str, Any]
    version: str
    vllm_tree: Path
    kernels_tree: Path | None
    kernels_source: Source | None
    jobs: JobsPlan
    target: str
    env: dict[str, str]
    ours: dict[str, str]
    native: dict[str, str | None]
    packages: dict[str, str | None]


def _plan(recipe: Recipe, workdir: Path, manifest: Manifest, target: str, kernels: bool, jobs_plan: JobsPlan) -> _Plan:
    rec = manifest.source(VLLM_SOURCE)
    if rec is None or not rec.tree:
        raise BuildError(f"source {VLLM_SOURCE!r} is not in the workspace (a source is materialised only when a patch "
                         "applies to it)", file=workdir / "manifest.json")
    vllm_tree = workdir / rec.tree
    trees = {rec.name: tree_id(vllm_tree)}
    kernels_tree = None
    kernels_source = None
    if kernels:
        krec = manifest.source(KERNELS_SOURCE)
        kernels_source = recipe.source(KERNELS_SOURCE)
        if krec is not None and krec.tree:
            kernels_tree = workdir / krec.tree
            trees[krec.name] = tree_id(kernels_tree)
    native = compilers("xpu" if kernels else target)
    packages = build_packages()
    if native == {}:  # a pure-Python build: the native tools' versions cannot change it
        packages = {k: v for k, v in packages.items() if k not in NATIVE_ONLY}
    _env, key_env = build_env(target, None, jobs_plan.jobs, dict(recipe.build.env), base={})
    key_env.pop("MAX_JOBS")  # how fast, not what
    inputs = key_inputs(recipe.name, manifest, trees, _pins(recipe), target, kernels, key_env,
                        python_facts(), packages, native)
    key = compute_key(inputs)
    version = make_version(upstream_version(recipe.source(VLLM_SOURCE), rec, vllm_tree), recipe.name, key)
    env, ours = build_env(target, version, jobs_plan.jobs, dict(recipe.build.env))
    return _Plan(key, inputs, version, vllm_tree, kernels_tree, kernels_source, jobs_plan, target, env, ours, native, packages)


def _dry_run(recipe: Recipe, workdir: Path, target: str, kernels: bool, jobs_plan: JobsPlan,
             missing: tuple[Missing, ...], notes: list[str], started: float) -> BuildResult:
    manifest = read_manifest(workdir) if workdir.is_dir() else None
    steps: list[str] = []
    key = version = None
    cache_hit = False
    env: dict[str, str] = {}
    reasons: tuple[str, ...] = ()
    if missing:
        steps.append("would stop: " + _missing_message(target, missing))
    if manifest is None or manifest.recipe_sha256 != recipe.sha256:
        why = "no workspace yet" if manifest is None else "the recipe changed since the workspace was applied"
        steps.append(f"apply the recipe into {workdir} first ({why}); the cache key is known after that")
    else:
        plan = _plan(recipe, workdir, manifest, target, kernels, jobs_plan)
        key, version, env = plan.key, plan.version, plan.ours
        cache_hit = lookup(key, verify=False, touch=False) is not None
        prev = None if cache_hit else latest_for(recipe.name, exclude=key)
        reasons = diff_inputs(prev.bom.get("key_inputs", {}), plan.inputs) if prev else ()
        steps.append(f"workspace {workdir} matches the recipe (apply re-checks it at build time)")
        missing = missing + check_build_requires(plan.vllm_tree, target)
    if cache_hit:
        steps.append(f"cache hit {key[:12] if key else ''}: return the cached wheel, run nothing")
    else:
        steps.append("sync the build copy of the workspace HEAD (outside the workspace)")
        steps.append("run: " + " ".join(pip_wheel_command(Path("<out>"), target)))
        if kernels:
            steps.append(f"build {KERNELS_SOURCE} from source with MAX_JOBS={jobs_plan.jobs}")
        steps.append(f"store the wheel(s) and {BOM_NAME} under {builds_dir()}/<key>/")
    msg = "dry run: nothing applied or built"
    return BuildResult(recipe.name, target, True, cache_hit, key, version, (), None, None, None, jobs_plan,
                       time.monotonic() - started, msg, miss_reasons=reasons, notes=tuple(notes), plan=tuple(steps),
                       missing=tuple(m.render() for m in missing),
                       command=tuple(pip_wheel_command(Path("<out>"), target)),
                       env=tuple(sorted(env.items())))


def _result(recipe: Recipe, target: str, plan: _Plan, entry: CacheEntry, log: Path | None, hit: bool,
            started: float, workspace_msg: str, reasons: tuple[str, ...], notes: list[str]) -> BuildResult:
    dur = time.monotonic() - started
    msg = (f"cache hit: {entry.wheels[0]} in {dur:.2f}s" if hit
           else f"built {entry.wheels[0]} in {dur:.1f}s")
    cmd = tuple(pip_wheel_command(Path("<out>"), target))
    return BuildResult(recipe.name, target, False, hit, plan.key, plan.version, entry.wheel_paths, entry.path,
                       entry.path / BOM_NAME, log, plan.jobs, dur, msg, workspace_msg, reasons, tuple(notes),
                       command=cmd, env=tuple(sorted(plan.ours.items())))


def _build_entry(recipe: Recipe, workdir: Path, manifest: Manifest, plan: _Plan, say: Progress) -> tuple[CacheEntry, Path]:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    log = logs_dir() / f"build-{recipe.name}-{stamp}.log"
    started_iso = _now_iso()
    t0 = time.monotonic()
    staging = new_staging(plan.key)
    try:
        artifacts: list[dict[str, Any]] = []
        commits: dict[str, str] = {}
        jobs = [_Job("vllm", plan.vllm_tree, False)]
        if plan.kernels_source is not None:
            kernels_tree = plan.kernels_tree or _materialise_kernels(recipe, plan.kernels_source, staging, say)
            jobs.append(_Job(KERNELS_SOURCE, kernels_tree,
                             plan.kernels_tree is None,
                             {"CMAKE_BUILD_PARALLEL_LEVEL": str(plan.jobs.jobs)}))
        for job in jobs:
            with ExitStack() as stack:
                src = job.tree
                if not job.exported:
                    src = build_tree_dir(job.tree)
                    stack.enter_context(locked(src.parent / f"{src.name}.lock", f"the build tree {src}"))
                    t_sync = time.monotonic()
                    commits[job.role] = sync_build_tree(job.tree, src)
                    say(f"build tree {src} at {commits[job.role][:12]} ({time.monotonic() - t_sync:.1f}s)")
                out = staging / f"out-{job.role}"
                run_logged(pip_wheel_command(out, plan.target), src, {**plan.env, **job.env_extra}, log, say,
                           f"pip wheel ({job.role})")
            wheel = _single_wheel(out, job.role, log)
            if job.role == "vllm":
                got = str(parse_wheel_filename(wheel.name)[1])
                if got != plan.version:
                    raise BuildError(f"the wheel says version {got}, expected {plan.version} "
                                     f"(did a patch change how setup.py reads VLLM_VERSION_OVERRIDE?); see {log}")
            final = staging / wheel.name
            os.replace(wheel, final)
            artifacts.append({"role": job.role, "filename": wheel.name, "sha256": sha256_file(final),
                              "size": final.stat().st_size})
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(staging / f"src-{KERNELS_SOURCE}", ignore_errors=True)
        bom = _bom(recipe, workdir, manifest, plan, artifacts, commits, log, started_iso, time.monotonic() - t0)
        atomic_write_text(staging / BOM_NAME, json.dumps(bom, indent=2) + "\n")
        path = commit_entry(staging, plan.key)
        say(f"stored {', '.join(a['filename'] for a in artifacts)} in {path}")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    entry = lookup(plan.key, verify=False)
    if entry is None:  # pragma: no cover - just renamed into place
        raise BuildError("the cache entry vanished right after it was written", file=path)
    return entry, log


def _materialise_kernels(recipe: Recipe, src: Source, staging: Path, say: Progress) -> Path:
    """vllm-xpu-kernels as a throwaway tree when the workspace does not hold it (no
    patch applies to it)."""
    from stackbuild.sources.archive import DEFAULT_LIMITS, extract_tarball
    from stackbuild.sources.git import export_tree, fetch_git
    from stackbuild.sources.pypi import fetch_sdist

    dest = staging / f"src-{KERNELS_SOURCE}"
    say(f"fetching {KERNELS_SOURCE} ({src.describe()})")
    if src.kind is SourceKind.PYPI:
        assert src.requirement and src.sha256
        extract_tarball(fetch_sdist(src.requirement, src.sha256, say, limits=src.limits), dest,
                        limits=src.limits or DEFAULT_LIMITS)
    elif src.kind is SourceKind.GIT:
        export_tree(fetch_git(src), dest)
    else:
        assert src.path
        local = Path(src.path)
        local = local if local.is_absolute() else (recipe.path.parent / local).resolve()
        shutil.copytree(local, dest, ignore=shutil.ignore_patterns(".git"), symlinks=True)
    return dest


def _bom(recipe: Recipe, workdir: Path, manifest: Manifest, plan: _Plan, artifacts: list[dict[str, Any]],
         commits: dict[str, str], log: Path, started: str, duration: float) -> dict[str, Any]:
    return {
        "schema": BOM_SCHEMA,
        "stackbuild_version": __version__,
        "cache_key": plan.key,
        "recipe": {"name": recipe.name, "sha256": recipe.sha256, "path": str(recipe.path),
                   "platform": recipe.platform.name},
        "workspace": {"path": str(workdir), "inputs_sha256": manifest.inputs_sha256, "applied": manifest.created,
                      "commits": commits, "trees": plan.inputs["trees"]},
        "sources": [asdict(s) for s in manifest.sources],
        "patches": [{"name": p.name, "kind": p.kind, "source": p.source, "sha256": p.sha256, "verdict": p.verdict,
                     "detail": p.detail, "commit": p.commit} for p in manifest.patches],
        "pins": plan.inputs["pins"],
        "lockfile": lockfile_facts(recipe),
        "toolchain": {"python": python_facts(), "packages": plan.packages, "compilers": plan.native},
        "host": host_facts(),
        "build": {
            "target_device": plan.target,
            "version": plan.version,
            "command": pip_wheel_command(Path("<out>"), plan.target),
            "env": plan.ours,
            "jobs": plan.jobs.to_dict(),
            "log": str(log),
        },
        "artifacts": artifacts,
        "key_inputs": plan.inputs,
        "started": started,
        "finished": _now_iso(),
        "duration_s": round(duration, 2),
    }
