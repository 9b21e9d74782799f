"""Fresh-host install scripts: recipe + lockfile + built wheels -> one bash script.

The script is rendered from stackbuild/templates/install.sh.in (placeholders are
`@@NAME@@`, so bash's own `$VAR` needs no escaping). The lockfile is embedded, so the
script is self-contained but for the built wheels, which it expects beside itself
(wheels/) and checks by sha256.

Recipe text is untrusted (recipes travel between labs), so it reaches the script in
exactly two forms: a shell word made by `sh_quote` (shlex.quote, or bash's `$'...'`
for text with control characters, like `printf %q`), or a comment made by
`sh_comment` (control characters escaped, so it cannot start a new line). There is no
heredoc: multi-line data (the plan, the lockfile, the activate block) is written with
`printf '%s\n'` and one quoted word per line. Planning is pure: `render_install_script` returns the
text and the plan steps; the CLI writes the file or, with --dry-run, prints the plan.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

from stackbuild.cache import sha256_file
from stackbuild.errors import RecipeError, StackbuildError
from stackbuild.inputs import read_user_text
from stackbuild.lock.requirements import logical_lines
from stackbuild.recipe import Recipe
from stackbuild.report import Table

TEMPLATE = "install.sh.in"
PREFLIGHT = "preflight.sh"
GENERIC_PYTHON_HINT = "your distribution's python3.12 package"
PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ENV_BEGIN = "# >>> stackbuild environment >>>"
ENV_END = "# <<< stackbuild environment <<<"


def sh_quote(value: str) -> str:
    """`value` as one shell word on one line. Plain text: shlex.quote (single quotes,
    nothing inside is special). Text with control characters (a newline, a carriage
    return, an escape): bash's `$'...'` with each one written as `\\xHH`, which is what
    `printf %q` does; the word then never spans lines, so nothing line-based (the
    activate block's markers, a reader) can be fooled. NUL cannot be in a shell word."""
    if "\x00" in value:
        raise StackbuildError(f"a NUL byte cannot be passed to the shell: {value!r}")
    if not _CONTROL.search(value):
        return shlex.quote(value)
    out = []
    for ch in value:
        if ch in ("\\", "'"):
            out.append("\\" + ch)
        elif _CONTROL.match(ch):
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def sh_comment(value: str) -> str:
    """`value` for a `#` comment line: control characters escaped, so it stays one line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)


def printf_lines(lines: list[str], redirect: str = "") -> str:
    """A bash command that writes `lines`, one per line: `printf '%s\\n'` and one quoted
    word per line (a builtin, so no argument-length limit)."""
    tail = f" {redirect}" if redirect else ""
    if not lines:
        return f":{tail}"
    return "printf '%s\\n'" + "".join(f" \\\n    {sh_quote(ln)}" for ln in lines) + tail


@dataclass(frozen=True)
class Distro:
    name: str
    manager: str  # apt-get | dnf
    packages: tuple[str, ...]
    python_hint: str


DISTROS = {
    "ubuntu-24.04": Distro(
        "Ubuntu 24.04", "apt-get",
        ("ca-certificates", "git", "build-essential", "python3-dev", "python3-venv",
         "intel-opencl-icd", "libze1", "libze-intel-gpu1", "clinfo"),
        "`sudo apt-get install python3.12-venv` (Ubuntu 24.04's python3 is 3.12)",
    ),
    "fedora": Distro(
        "Fedora", "dnf",
        ("ca-certificates", "git", "gcc", "gcc-c++", "python3-devel",
         "intel-compute-runtime", "oneapi-level-zero", "clinfo"),
        "`sudo dnf install python3.12`",
    ),
}


@dataclass(frozen=True)
class PlanStep:
    title: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"title": self.title, "detail": self.detail}


@dataclass(frozen=True)
class InstallScript:
    recipe: str
    platform: str
    distro: str
    steps: tuple[PlanStep, ...]
    text: str
    lockfile: str | None
    wheels: tuple[tuple[str, str], ...] = ()  # (file name, sha256)
    dry_run: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    wheel_files: tuple[Path, ...] = ()  # where the wheels are now

    def write(self, dest: Path) -> None:
        """Write the script (mode 0755) atomically, and put the wheels it installs into
        wheels/ beside it (where the script looks first), unless already there."""
        dest = Path(dest)
        self._stage_wheels(dest.parent / "wheels")
        tmp = dest.with_name(f".{dest.name}.tmp")
        try:
            tmp.write_text(self.text, encoding="utf-8")
            tmp.chmod(0o755)
            os.replace(tmp, dest)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StackbuildError(f"cannot write the install script: {e.strerror}", file=dest) from None

    def _stage_wheels(self, wheel_dir: Path) -> None:
        for src, (name, sha) in zip(self.wheel_files, self.wheels, strict=True):
            target = wheel_dir / name
            if target.is_file() and sha256_file(target) == sha:
                continue
            tmp = wheel_dir / f".{name}.tmp"
            try:
                wheel_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp)
                os.replace(tmp, target)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise StackbuildError(f"cannot copy the wheel beside the script: {e.strerror}", file=target) from None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "recipe": self.recipe,
            "platform": self.platform,
            "distro": self.distro,
            "lockfile": self.lockfile,
            "wheels": [{"file": n, "sha256": s} for n, s in self.wheels],
            "steps": [s.to_dict() for s in self.steps],
            "notes": list(self.notes),
            "dry_run": self.dry_run,
        }
        if not self.dry_run:
            d["script_sha256"] = hashlib.sha256(self.text.encode()).hexdigest()
        return d

    def tables(self) -> list[Table]:
        rows = tuple((str(i), s.title, s.detail) for i, s in enumerate(self.steps, 1))
        summary = "; ".join(self.notes)
        return [Table(f"install plan for {self.recipe} ({self.platform}, {self.distro})",
                      ("step", "what", "detail"), rows, summary)]


# ---------------------------------------------------------------- helpers


def python_expression(window: str, *, key: str = "environment.python", file: str | Path | None = None) -> str:
    """A stdlib Python expression over sys.version_info that is true inside `window`."""
    try:
        spec = SpecifierSet(window)
    except InvalidSpecifier:
        raise RecipeError(f"not a version window: {window!r}", file=file, key=key) from None
    parts = []
    for s in spec:
        v = s.version
        if s.operator in ("==", "!=") and v.endswith(".*"):
            nums = tuple(int(x) for x in v[:-2].split("."))
            op = "==" if s.operator == "==" else "!="
            parts.append(f"sys.version_info[:{len(nums)}] {op} {nums!r}")
            continue
        try:
            nums = tuple(int(x) for x in v.split("."))
        except ValueError:
            raise RecipeError(f"unsupported version in window {window!r}: {v!r}", file=file, key=key) from None
        full = (nums + (0, 0, 0))[:3]
        if s.operator == "~=":
            parts.append(f"sys.version_info[:3] >= {full!r}")
            parts.append(f"sys.version_info[:{len(nums) - 1}] == {nums[:-1]!r}")
        elif s.operator in (">=", "<=", ">", "<", "==", "!="):
            parts.append(f"sys.version_info[:3] {s.operator} {full!r}")
        else:
            raise RecipeError(f"unsupported operator {s.operator!r} in {window!r}", file=file, key=key)
    return " and ".join(parts) or "True"


def python_minors(window: str) -> list[str]:
    """3.x releases inside the window, newest first."""
    spec = SpecifierSet(window)
    return [f"3.{m}" for m in range(30, 5, -1)
            if spec.contains(f"3.{m}.0") or spec.contains(f"3.{m}.99")]


def check_lockfile_text(text: str, path: Path) -> int:
    """Count the requirements; each must carry a hash (pip --require-hashes needs it)."""
    count = 0
    for line, entry in logical_lines(text):
        if entry.startswith("-"):
            continue
        if "--hash=" not in entry:
            raise StackbuildError(
                f"requirement without a hash: {entry.split()[0]!r}; an install script installs with "
                "--require-hashes (regenerate the lockfile with hashes)", file=path, key=f"line {line}")
        count += 1
    if "\x00" in text:
        raise StackbuildError("contains a NUL byte", file=path)
    return count


def lockfile_problem(path: Path, recipe: Recipe) -> str | None:
    """Why this lockfile must not be installed, in the words `lock --check` uses: not
    a stackbuild lockfile, edited since it was written (its content sha256), or
    incomplete (what is missing and which host can complete it). None: install it."""
    from stackbuild.lock.errors import LockError
    from stackbuild.lock.lockfile import incomplete_message, read_header

    try:
        header = read_header(path)
    except LockError as e:
        return f"{e.message}; regenerate it with `stackbuild lock {recipe.name}`"
    if header.content_sha256 is None:
        return (f"the lockfile has no content sha256 (written by an older stackbuild), so edits cannot be "
                f"detected; regenerate it with `stackbuild lock {recipe.name}`")
    if header.edited:
        return ("the lockfile does not match its content sha256 (edited by hand?); regenerate it with "
                f"`{header.command or 'stackbuild lock ' + recipe.name}`")
    return incomplete_message(header)


def _package_step(distro: Distro) -> str:
    pkgs = " ".join(distro.packages)
    if distro.manager == "apt-get":
        query = (
            '    # shellcheck disable=SC2016 # ${Status} is dpkg-query\'s field, not a shell variable\n'
            "    status=\"$(dpkg-query -W -f='${Status}' \"$p\" 2>/dev/null || true)\"\n"
            '    [[ "$status" == "install ok installed" ]] || missing+=("$p")\n'
        )
        install = '    sudo apt-get update\n    sudo apt-get install -y "${missing[@]}"\n'
    else:
        query = '    rpm -q "$p" >/dev/null 2>&1 || missing+=("$p")\n'
        install = '    sudo dnf install -y "${missing[@]}"\n'
    return (
        f"PACKAGES=({pkgs})\n"
        'if [[ "${STACKBUILD_SKIP_PACKAGES:-0}" == 1 ]]; then\n'
        '    echo "skipped (STACKBUILD_SKIP_PACKAGES=1): ${PACKAGES[*]}"\n'
        "else\n"
        "missing=()\n"
        'for p in "${PACKAGES[@]}"; do\n'
        f"{query}"
        "done\n"
        "if [[ ${#missing[@]} -eq 0 ]]; then\n"
        '    echo "all installed: ${PACKAGES[*]}"\n'
        "else\n"
        '    echo "installing: ${missing[*]}"\n'
        f"{install}"
        "fi\n"
        "fi"
    )


def _wheel_step(wheels: list[tuple[str, str]]) -> str:
    if not wheels:
        return 'echo "no built wheels for this recipe (nothing needed from $WHEEL_DIR)"'
    names = " ".join(sh_quote(n) for n, _ in wheels)
    shas = " ".join(s for _, s in wheels)
    return (
        f"WHEELS=({names})\n"
        f"WHEEL_SHA256=({shas})\n"
        "wheel_paths=()\n"
        'for i in "${!WHEELS[@]}"; do\n'
        '    f="$WHEEL_DIR/${WHEELS[$i]}"\n'
        '    [[ -f "$f" ]] || die "missing wheel $f: copy the built wheels into $WHEEL_DIR (or set STACKBUILD_WHEEL_DIR)"\n'
        '    sum="$(sha256sum "$f")"\n'
        '    [[ "${sum%% *}" == "${WHEEL_SHA256[$i]}" ]] || die "sha256 of $f is ${sum%% *}, expected ${WHEEL_SHA256[$i]}"\n'
        '    wheel_paths+=("$f")\n'
        "done\n"
        '"$VPY" -m pip install --disable-pip-version-check --no-deps --force-reinstall "${wheel_paths[@]}"'
    )


def _template(name: str = TEMPLATE) -> str:
    return resources.files("stackbuild").joinpath("templates", name).read_text(encoding="utf-8")


def preflight_functions() -> str:
    """The preflight checks (templates/preflight.sh): inlined into the install script and
    run by `stackbuild doctor`."""
    return _template(PREFLIGHT).rstrip("\n")


def preflight_vars(window: str, *, oneapi_required: bool, python_hint: str,
                   file: str | Path | None = None) -> str:
    """The shell variables the preflight checks read, every value quoted."""
    expr = python_expression(window, file=file)
    minors = python_minors(window)
    if not minors:
        raise RecipeError(f"no Python 3 release fits the window {window!r}", file=file, key="environment.python")
    candidates = [f"python{m}" for m in minors] + ["python3"]
    return "\n".join([
        f"PYTHON_WINDOW={sh_quote(window)}",
        f"PYTHON_FITS_CODE={sh_quote(f'import sys; sys.exit(0 if {expr} else 1)')}",
        f"PYTHON_CANDIDATES=({' '.join(sh_quote(c) for c in candidates)})",
        f"PYTHON_PREFERRED={sh_quote(minors[0])}",
        f"PYTHON_HINT={sh_quote(python_hint)}",
        f"ONEAPI_REQUIRED={'1' if oneapi_required else '0'}",
        'SETVARS="${STACKBUILD_ONEAPI_SETVARS:-/opt/intel/oneapi/setvars.sh}"',
        'RENDER_NODE_GLOB="${STACKBUILD_RENDER_NODE_GLOB:-/dev/dri/renderD*}"',
    ])


def _render(template: str, values: dict[str, str]) -> str:
    missing = sorted(set(PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise RuntimeError(f"template {TEMPLATE} needs values for {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


# ---------------------------------------------------------------- rendering


def _wheel_project(filename: str) -> str | None:
    try:
        return str(parse_wheel_filename(filename)[0])
    except InvalidWheelFilename:
        return None


def find_wheels(recipe: Recipe, given: list[Path], workdir: Path | None = None) -> tuple[list[Path], str]:
    """The wheels to install: those given (--wheel), else the build cache's entry for
    the recipe's build key (what `stackbuild build` would return now). Also says where
    they came from, or why none was found."""
    if given:
        return list(given), "given with --wheel"
    from stackbuild.build import cached_build

    found = cached_build(recipe, workdir)
    if found.entry is None:
        return [], found.why
    return list(found.entry.wheel_paths), f"from the build cache: {found.why}"


def render_install_script(recipe: Recipe, lockfile: Path | None, wheels: list[Path],
                          dry_run: bool = False, wheels_origin: str = "given") -> InstallScript:
    platform = recipe.platform
    distro = DISTROS.get(platform.distro)
    if distro is None:
        raise StackbuildError(f"no install recipe for distribution {platform.distro!r} "
                              f"(known: {', '.join(DISTROS)})", key=f"platform {platform.name}")
    notes: list[str] = []
    lock_text = ""
    lock_count = 0
    if lockfile is None or not Path(lockfile).exists():
        where = f" ({lockfile} does not exist)" if lockfile else ""
        if not dry_run:
            raise StackbuildError(f"an install script installs from a lockfile with hashes{where}; "
                                  f"run `stackbuild lock {recipe.name}` first", key="lockfile")
        notes.append(f"no lockfile{where}: run `stackbuild lock {recipe.name}` before writing the script")
    else:
        lock_text = read_user_text(Path(lockfile), "lockfile")
        lock_count = check_lockfile_text(lock_text, Path(lockfile))

    lock_name = Path(lockfile).name if lockfile else ""
    wheel_info: list[tuple[str, str]] = []
    for w in wheels:
        if not Path(w).is_file():
            raise StackbuildError("no such wheel", file=w)
        wheel_info.append((Path(w).name, sha256_file(Path(w))))
    if lockfile is not None and Path(lockfile).exists():
        problem = lockfile_problem(Path(lockfile), recipe)
        if problem is not None:
            if not dry_run:
                raise StackbuildError(problem, file=lockfile)
            notes.append(problem)
    if not any(_wheel_project(n) == "vllm" for n, _ in wheel_info):
        # Without it the script would install no vLLM and fail at its own import check.
        msg = (f"no built vLLM wheel to install ({wheels_origin}): run `stackbuild build {recipe.name}` "
               "first, or give the wheel with --wheel")
        if not dry_run:
            raise StackbuildError(msg, file=recipe.path, key="--wheel")
        notes.append(msg)
    elif wheels_origin != "given":
        notes.append(f"wheels {wheels_origin}")

    window = recipe.environment.python
    minors = python_minors(window)
    if not minors:
        raise RecipeError(f"no Python 3 release fits the window {window!r}", file=recipe.path, key="environment.python")
    candidates = [f"python{m}" for m in minors] + ["python3"]
    indexes = sorted({p.index for p in recipe.pins if p.index})
    env = list(recipe.environment.vars)
    oneapi_required = recipe.build.kernels_from_source
    venv_default = f"$HOME/.local/share/stackbuild/venvs/{recipe.name}"

    steps = [
        PlanStep("preflight", "refuse root and sudo (the venv is a user venv); refuse a vllm/ folder in "
                 "the working directory"),
        PlanStep("GPU render node", "a /dev/dri/renderD* node exists and this user can open it (render group)"),
        PlanStep(f"{distro.name} packages", f"sudo {distro.manager} install, only what is missing: "
                 + " ".join(distro.packages)),
        PlanStep("Python", f"an interpreter in {window}: " + ", ".join(candidates)),
        PlanStep("oneAPI", ("source setvars.sh (required: kernels are built from source)" if oneapi_required
                            else "source setvars.sh if present") + " with set -u off; check ONEAPI_ROOT"),
        PlanStep("venv", f"create or reuse $STACKBUILD_VENV (default {venv_default})"),
        PlanStep("lockfile", (f"pip install --require-hashes -r (embedded {lock_name}, "
                              f"{lock_count} package{'' if lock_count == 1 else 's'})" if lock_text else "lockfile missing")
                 + (f"; extra indexes: {', '.join(indexes)}" if indexes else "")),
        PlanStep("built wheels", ("pip install --no-deps after sha256 checks: "
                                  + ", ".join(n for n, _ in wheel_info)) if wheel_info else "none"),
        PlanStep("environment", ("export in the venv's activate script: "
                                 + " ".join(f"{k}={sh_quote(v)}" for k, v in env)) if env else "no variables"),
        PlanStep("import check", "import vllm from a neutral directory; it must come from the venv"),
        PlanStep("verify", f"stackbuild verify {recipe.name} --python $VENV/bin/python --lockfile (the installed copy) "
                 "--only environment,platform"),
    ]
    for k, _ in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise RecipeError(f"not a shell variable name: {k!r}", file=recipe.path, key="environment.vars")
    plan_lines = [f"  {i:2d}. {s.title}: {s.detail}" for i, s in enumerate(steps, 1)]
    # Every value below is a shell word (sh_quote), a comment (sh_comment), or text this
    # module makes from fixed parts (numbers, python3.N names, the distro tables).
    values = {
        "RECIPE_C": sh_comment(recipe.name),
        "RECIPE_Q": sh_quote(recipe.name),
        "PLATFORM_C": sh_comment(platform.name),
        "DISTRO_C": sh_comment(distro.name),
        "DISTRO_Q": sh_quote(distro.name),
        "PYTHON_WINDOW_C": sh_comment(window),
        "PYTHON_CANDIDATES": " ".join(candidates),
        "PREFLIGHT_VARS": preflight_vars(window, oneapi_required=oneapi_required, python_hint=distro.python_hint,
                                         file=recipe.path),
        "PREFLIGHT": preflight_functions(),
        "STEP_COUNT": str(len(steps)),
        "PLAN_PRINTF": "    " + printf_lines(plan_lines),
        "PACKAGE_STEP": _package_step(distro),
        "LOCK_COUNT": str(lock_count),
        "LOCKFILE_PRINTF": printf_lines(lock_text.splitlines(), '>"$LOCKFILE"'),
        "INDEX_ARGS": " ".join(f"--extra-index-url {sh_quote(u)}" for u in indexes),
        "WHEEL_COUNT": str(len(wheel_info)),
        "WHEEL_STEP": _wheel_step(wheel_info),
        "ENV_PRINTF": printf_lines([ENV_BEGIN, *(f"export {k}={sh_quote(v)}" for k, v in env), ENV_END],
                                   '>>"$ACTIVATE"'),
        "ENV_SUMMARY": sh_quote(("exported " + " ".join(f"{k}={sh_quote(v)}" for k, v in env))
                                if env else "no variables to export"),
    }
    text = _render(_template(), values)
    return InstallScript(
        recipe=recipe.name,
        platform=platform.name,
        distro=distro.name,
        steps=tuple(steps),
        text=text,
        lockfile=str(lockfile) if lockfile else None,
        wheels=tuple(wheel_info),
        dry_run=dry_run,
        notes=tuple(notes),
        wheel_files=tuple(Path(w) for w in wheels),
    )
