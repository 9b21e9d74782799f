"""The command line: parse, call a domain function, render its result. Nothing else.

Exit codes: 0 ok, 1 a check failed, 2 bad input, 3 internal bug (with a log),
130 interrupted.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

import typer

from stackbuild import __version__
from stackbuild.errors import ExitCode, StackbuildError
from stackbuild.report import Table, to_json

# help text is plain text: rich markup would eat `[[patches]]` and `[sources]`
_CONTEXT = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="Patch-and-build manager for vLLM on Intel XPU (Arc Pro B70, Lunar Lake).",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=_CONTEXT,
)

_state: dict[str, Any] = {"debug": False}

JsonOpt = typer.Option(False, "--json", help="Machine-readable output on stdout.")
WorkdirOpt = typer.Option(None, "--workdir", help="Workspace directory (default: work/RECIPE).")


def _progress(msg: str) -> None:
    print(f"stackbuild: {msg}", file=sys.stderr, flush=True)


def _emit(result: Any, as_json: bool) -> None:
    if as_json:
        print(to_json(result.to_dict()))
    else:
        for t in result.tables():
            print(t.render())
            print()


def _print_version(value: bool) -> None:
    if value:
        print(f"stackbuild {__version__}")
        raise typer.Exit(0)


def _finish(result: Any, as_json: bool) -> None:
    """Render the result and exit with its code."""
    _emit(result, as_json)
    raise typer.Exit(result.exit_code)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 callback=_print_version, is_eager=True),
) -> None:
    _state["debug"] = debug


def _load(recipe: str) -> Any:
    """The recipe a command acts on; a base recipe is refused (it has nothing to act on)."""
    from stackbuild.errors import RecipeError
    from stackbuild.recipe import list_recipe_names, load_recipe

    r = load_recipe(recipe)
    if r.is_base:
        users = []
        for name in list_recipe_names(r.root):
            try:
                if r.name in load_recipe(name, root=r.root).extends:
                    users.append(name)
            except StackbuildError:
                continue
        hint = f"; use a recipe that extends it: {', '.join(users)}" if users else ""
        raise RecipeError(f"{r.name} is a base recipe (no sources), only meant to be extended{hint}", file=r.path)
    return r


@app.command("list")
def list_cmd(as_json: bool = JsonOpt) -> None:
    """The recipes, one line each."""
    from stackbuild.listing import render_list

    text, rc = render_list(as_json)
    print(text)
    if rc:
        raise typer.Exit(rc)


@app.command()
def show(recipe: str = typer.Argument(..., help="Recipe name or path."), as_json: bool = JsonOpt) -> None:
    """The resolved recipe (extends applied)."""
    from stackbuild.recipe import load_recipe

    r = load_recipe(recipe)
    d = r.to_dict()
    if as_json:
        print(to_json(d))
        return
    print(f"{r.name}  ({r.path})")
    if r.extends:
        print(f"extends: {' -> '.join(r.extends)}")
    print(f"platform: {r.platform.name} - {r.platform.product}, {r.platform.device_count} x {r.platform.memory_gb_per_device} GB, "
          f"{r.platform.memory_model.value} memory, TP {r.platform.tensor_parallel}")
    print(f"sha256: {r.sha256}")
    print(Table("sources", ("name", "pin"), tuple((s.name, s.describe()) for s in r.sources)).render())
    print(Table("patches (series order)", ("#", "patch", "source", "from"),
                tuple((str(i + 1), p.name, p.source, p.file or (f"{p.from_source}:{p.path}" if p.from_source else f"{p.release}: {', '.join(p.files)}"))
                      for i, p in enumerate(r.patches))).render())
    if r.pins:
        print(Table("pins", ("package", "pin", "note"),
                    tuple((p.name, p.spec or p.url or "", p.override or (f"index {p.index}" if p.index else "")) for p in r.pins)).render())
    env = dict(r.environment.vars)
    if env:
        print("environment: " + " ".join(f"{k}={v}" for k, v in env.items()))


@app.command()
def apply(
    recipe: str = typer.Argument(..., help="Recipe name or path."),
    workdir: Path | None = WorkdirOpt,
    force: bool = typer.Option(False, "--force", help="Rebuild even when the inputs are unchanged."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; fetch and apply nothing."),
    as_json: bool = JsonOpt,
    onto: Path | None = typer.Option(None, "--onto", help="Apply onto this clean git checkout instead: one commit per patch on a new branch."),
    source: str | None = typer.Option(None, "--source", help="With --onto: which patched source DIR is (when the recipe patches several)."),
    branch: str | None = typer.Option(None, "--branch", help="With --onto: the new branch (default stackbuild/RECIPE); --force moves an existing one."),
) -> None:
    """Fetch the pinned sources and apply the patch series, with a verdict per patch."""
    from stackbuild.workspace import apply_recipe

    r = _load(recipe)
    if onto is not None and not dry_run:
        from stackbuild.onto import apply_onto

        if workdir is not None:
            raise StackbuildError("--onto and --workdir exclude each other: --onto applies in DIR's own repository")
        result = apply_onto(r, onto, source, branch, force, progress=None if as_json else _progress)
    else:
        result = apply_recipe(r, workdir, progress=None if as_json else _progress, force=force, dry_run=dry_run)
    if dry_run and not as_json:
        print("\n".join(result.plan))
        return
    _emit(result, as_json)
    if not result.ok and not as_json:
        print(f"stackbuild: error: {result.message}", file=sys.stderr)
    raise typer.Exit(result.exit_code)


@app.command("apply-patch")
def apply_patch_cmd(
    patch: Path = typer.Argument(..., help="The patch file."),
    onto: Path = typer.Option(..., "--onto", help="A clean git checkout to apply it to."),
    strip: int = typer.Option(1, "--strip", help="Leading path components to strip (as patch -p)."),
    fuzz: int = typer.Option(0, "--fuzz", help="Context lines a hunk may ignore (0 refuses fuzz)."),
    commit: bool = typer.Option(False, "--commit", help="Commit it on a new branch (default: a dry verdict, nothing written)."),
    branch: str | None = typer.Option(None, "--branch", help="With --commit: the new branch (default stackbuild/FILE-STEM)."),
    force: bool = typer.Option(False, "--force", help="With --commit: move an existing branch."),
    as_json: bool = JsonOpt,
) -> None:
    """One patch file's verdict on a checkout, without a recipe (exit 0 applied, 1 conflict, 2 malformed)."""
    from stackbuild.onto import apply_patch_onto

    result = apply_patch_onto(patch, onto, strip, fuzz, commit, branch, force)
    _emit(result, as_json)
    if not result.ok and not as_json:
        print(f"stackbuild: error: {result.message}", file=sys.stderr)
    raise typer.Exit(result.exit_code)


def _split_csv(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


@app.command()
def verify(
    recipe: str = typer.Argument(..., help="Recipe name or path."),
    workdir: Path | None = WorkdirOpt,
    python: Path | None = typer.Option(None, "--python", help="The target environment's interpreter."),
    only: list[str] | None = typer.Option(None, "--only", help="Checks to run (repeat or comma-separate)."),
    device: str | None = typer.Option(None, "--device", help="numerics: xpu, cuda or cpu (default: the first available)."),
    adapter: list[str] | None = typer.Option(None, "--adapter", help="numerics: extra adapter module:function."),
    threshold: list[str] | None = typer.Option(None, "--threshold", help="numerics: override a threshold, e.g. bf16.rel=2e-2."),
    lockfile: Path | None = typer.Option(None, "--lockfile", help="environment: the lockfile to compare with (default lockfiles/RECIPE.txt)."),
    kernel_wheel: Path | None = typer.Option(None, "--kernel-wheel", help="platform, api: read this vllm-xpu-kernels wheel instead of the installed package or the pinned release."),
    as_json: bool = JsonOpt,
) -> None:
    """Check the applied workspace (and with --python, a target environment)."""
    from stackbuild.checks import CheckContext
    from stackbuild.errors import StackbuildError as _E
    from stackbuild.manifest import read_manifest
    from stackbuild.verify import check_names, run_verify
    from stackbuild.workspace import default_workdir

    r = _load(recipe)
    wd = (workdir or default_workdir(r)).resolve()
    checks = _split_csv(only)
    check_names(checks or [])  # before looking for a workspace: a bad name is the problem
    if python is not None and not python.exists():
        raise _E(f"interpreter {python} does not exist", key="--python")
    if device is not None and device not in ("xpu", "cuda", "cpu"):
        raise _E(f"must be xpu, cuda or cpu, got {device!r}", key="--device")
    manifest = read_manifest(wd)
    needs_tree = checks is None or any(c in ("compile", "registry", "imports", "api", "numerics") for c in checks)
    if manifest is None and needs_tree:
        raise _E(f"no applied workspace at {wd}; run `stackbuild apply {r.name}` first", file=r.path)
    if manifest is not None and manifest.recipe_sha256 != r.sha256 and not as_json:
        _progress(f"warning: the workspace was applied from a different version of {r.name}; re-run `stackbuild apply {r.name}`")
    options: dict[str, Any] = {}
    if device:
        options["device"] = device
    if adapter:
        options["adapters"] = list(adapter)
    if lockfile is not None:
        options["lockfile"] = lockfile
    if kernel_wheel is not None:
        if not kernel_wheel.is_file():
            raise _E(f"{kernel_wheel} is not a file", key="--kernel-wheel")
        options["kernel_wheel"] = kernel_wheel
    if threshold:
        thr: dict[str, float] = {}
        for item in threshold:
            key, sep, val = item.partition("=")
            try:
                thr[key.strip()] = float(val)
            except ValueError:
                raise _E(f"expected KEY=NUMBER such as bf16.rel=2e-2, got {item!r}", key="--threshold") from None
            if not sep:
                raise _E(f"expected KEY=NUMBER, got {item!r}", key="--threshold")
        options["thresholds"] = thr
    ctx = CheckContext(recipe=r, workspace=wd, touched=manifest.touched() if manifest else {},
                       python=python, options=options)
    report = run_verify(ctx, checks)
    _emit(report, as_json)
    raise typer.Exit(report.exit_code)


@app.command("install-script")
def install_script(
    recipe: str = typer.Argument(..., help="Recipe name or path."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Where to write the script."),
    lockfile: Path | None = typer.Option(None, "--lockfile", help="Default: lockfiles/RECIPE.txt."),
    wheel: list[Path] | None = typer.Option(None, "--wheel", help="A built wheel to install (repeatable). Default: the build cache's wheel for the recipe's build key (run `stackbuild build` first)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    workdir: Path | None = WorkdirOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Render a bash script that installs the recipe's stack on a fresh host."""
    from stackbuild.errors import StackbuildError as _E
    from stackbuild.installer import find_wheels, render_install_script
    from stackbuild.lock import default_lockfile

    r = _load(recipe)
    lock = lockfile or default_lockfile(r)
    wheels, origin = find_wheels(r, list(wheel or []), workdir)
    script = render_install_script(r, lock if (lock.exists() or lockfile) else None, wheels, dry_run=dry_run,
                                   wheels_origin=origin)
    if dry_run:
        _emit(script, as_json)
        return
    if output is None:
        raise _E("where should the script go? give -o FILE (or --dry-run to see the plan)", key="-o")
    script.write(output)
    if as_json:
        print(to_json({**script.to_dict(), "written": str(output)}))
    else:
        print(f"wrote {output} ({len(script.text.splitlines())} lines); run it on the target host as the user who will serve models")


@app.command("doctor")
def doctor_cmd(
    recipe: str | None = typer.Argument(None, help="Recipe name or path (its Python window, oneAPI need and indexes); default: the generic checks."),
    as_json: bool = JsonOpt,
) -> None:
    """Check this host: the install script's own preflight (user, render node and group, Python window, oneAPI), git, disk, cache, indexes."""
    from stackbuild.doctor import doctor
    from stackbuild.recipe import load_recipe

    _finish(doctor(load_recipe(recipe) if recipe else None), as_json)


@app.command("build")
def build_cmd(
    recipe: str = typer.Argument(..., help="Recipe name or path."),
    target_device: str | None = typer.Option(None, "--target-device", help="xpu (both hardware targets) or empty (a pure-Python wheel that builds anywhere)."),
    jobs: int | None = typer.Option(None, "--jobs", help="Compile jobs (default: the recipe's, capped by free memory)."),
    workdir: Path | None = WorkdirOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be built and whether the cache has it."),
    as_json: bool = JsonOpt,
) -> None:
    """Build the patched vLLM wheel from the applied workspace (cached by everything that decides it)."""
    from stackbuild.build import build
    from stackbuild.errors import StackbuildError as _E

    if target_device is not None and target_device not in ("xpu", "empty", "cpu"):
        raise _E(f"must be xpu, empty or cpu, got {target_device!r}", key="--target-device")
    if jobs is not None and jobs < 1:
        raise _E("must be >= 1", key="--jobs")
    result = build(_load(recipe), workdir, target_device=target_device, jobs=jobs, dry_run=dry_run,
                   progress=None if as_json else _progress)
    _finish(result, as_json)


@app.command("bom")
def bom_cmd(
    recipe: str = typer.Argument(..., help="Recipe name."),
    key: str | None = typer.Option(None, "--key", help="A cache entry (key prefix) instead of the last build."),
    workdir: Path | None = typer.Option(None, "--workdir", help="The bill of materials of the build of this workspace (default: the recipe's last build)."),
    as_json: bool = JsonOpt,
) -> None:
    """The bill of materials of the recipe's last build: what exactly went in."""
    from stackbuild.bom import read_bom

    if workdir is not None and key is None:
        from stackbuild.build import build
        from stackbuild.errors import StackbuildError as _E

        planned = build(_load(recipe), workdir, dry_run=True)
        if planned.key is None:
            raise _E(f"no build key for the workspace {workdir}: {planned.message}", key="--workdir")
        key = planned.key
    result = read_bom(recipe, key=key)
    _finish(result, as_json)


cache_app = typer.Typer(help="The build cache: list and garbage-collect entries.", no_args_is_help=True,
                        rich_markup_mode=None, context_settings=_CONTEXT)
app.add_typer(cache_app, name="cache")


@cache_app.command("ls")
def cache_ls_cmd(as_json: bool = JsonOpt) -> None:
    """Cached builds: key, recipe, wheel, size, age."""
    from stackbuild.buildcache import cache_ls

    result = cache_ls()
    _finish(result, as_json)


@cache_app.command("gc")
def cache_gc_cmd(
    max_age: float | None = typer.Option(None, "--max-age", help="Remove entries unused for this many days."),
    max_size: float | None = typer.Option(None, "--max-size", help="Then remove least recently used entries until the cache is under this many MB."),
    as_json: bool = JsonOpt,
) -> None:
    """Remove old build cache entries (by age of last use, then by total size)."""
    from stackbuild.buildcache import cache_gc

    result = cache_gc(max_age, max_size)
    _finish(result, as_json)


@app.command("lock")
def lock_cmd(
    recipe: str = typer.Argument(..., help="Recipe name or path."),
    resolver: str | None = typer.Option(None, "--resolver", help="pip-tools or uv (default: the recipe's [lock] resolver, else pip-tools)."),
    offline: bool = typer.Option(False, "--offline", help="Lock what resolves without the network; mark the rest as pinned by the recipe."),
    check: bool = typer.Option(False, "--check", help="No network: fail (exit 1) if pins, overrides or the series changed since the lockfile was written."),
    pins_only: bool = typer.Option(False, "--pins-only", help="Lock only the recipe's pins, not the patched source's own requirements."),
    index_url: str | None = typer.Option(None, "--index-url", help="Primary index (default: PIP_INDEX_URL, else PyPI)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Default: lockfiles/RECIPE.txt."),
    lockfile: Path | None = typer.Option(None, "--lockfile", help="--check: the lockfile to check."),
    record_first_use: bool = typer.Option(False, "--record-first-use", help="Write the sha256 of trust-on-first-use artifacts this lock downloaded into the recipe."),
    force: bool = typer.Option(False, "--force", help="Replace the lockfile even with a less complete one."),
    partial: bool = typer.Option(False, "--partial", help="Lock what the reachable indexes give; name what needs an unreachable index or URL in the header as not resolved (instead of failing)."),
    index_map: list[str] | None = typer.Option(None, "--index-map", help="REAL=LOCAL: read the index (or URL prefix) REAL from the local mirror LOCAL; the lockfile keeps REAL (repeatable; adds to STACKBUILD_INDEX_MAP)."),
    workdir: Path | None = WorkdirOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write lockfiles/RECIPE.txt with pip-tools (or uv): every package pinned with sha256 hashes."""
    from stackbuild.errors import StackbuildError as _E
    from stackbuild.lock import check_lock, default_lockfile, lock
    from stackbuild.lock.indexmap import IndexMap
    from stackbuild.manifest import read_manifest
    from stackbuild.workspace import default_workdir

    r = _load(recipe)
    if check:
        result: Any = check_lock(r, lockfile or default_lockfile(r))
        _emit(result, as_json)
        raise typer.Exit(result.exit_code)
    req_tree = None
    if not pins_only:
        wd = (workdir or default_workdir(r)).resolve()
        manifest = read_manifest(wd)
        if manifest is None:
            raise _E(f"the patched source's requirements come from the applied workspace ({wd}); run `stackbuild apply {r.name}` first, or lock --pins-only", file=r.path)
        trees = [s.tree for s in manifest.sources if s.tree]
        req_tree = wd / trees[0]
    chosen = resolver or r.lock.resolver
    if chosen not in ("pip-tools", "uv"):
        raise _E(f"must be pip-tools or uv, got {chosen!r}", key="--resolver")
    if not as_json:
        _progress(f"locking {r.name} with {chosen}{' (offline)' if offline else ''}")
    result = lock(r, requirements_from=req_tree, resolver=chosen, offline=offline, output=output, index_url=index_url,
                  force=force, index_map=IndexMap.parse(index_map or []), partial=partial)
    _emit(result, as_json)
    if record_first_use:
        from stackbuild.lock import record_first_use as _record

        for fu in result.first_use:
            if fu.sha256:
                done = _record(r.path, fu.pin, fu.sha256)
                print(done.message, file=sys.stderr)
            elif not as_json:
                _progress(f"pins.{fu.pin}: not downloaded here, nothing to record ({fu.url})")
    raise typer.Exit(result.exit_code)


@app.command()
def refresh(
    recipe: str = typer.Argument(..., help="Recipe name or path."),
    to: str | None = typer.Option(None, "--to", help="The new upstream: vllm==0.20.0; NAME@REF (a git source, or a git "
                                  "ref of a local source's checkout); NAME=PATH (a local source: another tree)."),
    sha256: str | None = typer.Option(None, "--sha256", help="The new release's sdist sha256 (default: from the index)."),
    matrix: str | None = typer.Option(None, "--matrix", help="Try several releases: vllm==0.19.0,0.20.0,0.21.0"),
    jobs: int | None = typer.Option(None, "--jobs", help="--matrix: releases tried at once (default: one per release, at most one per CPU)."),
    cont: bool = typer.Option(False, "--continue", help="Go on after resolving a conflict in the refresh worktree."),
    abort: bool = typer.Option(False, "--abort", help="Drop the refresh in progress; restore everything."),
    force: bool = typer.Option(False, "--force", help="Overwrite refreshed patch files that differ."),
    workdir: Path | None = typer.Option(None, "--workdir", help="The refresh directory (default: work/RECIPE.refresh)."),
    as_json: bool = JsonOpt,
) -> None:
    """Carry the patch series onto a new upstream release, with a verdict per patch."""
    from stackbuild import refresh as rf
    from stackbuild.errors import StackbuildError as _E

    r = _load(recipe)
    modes = [x for x in (to is not None, matrix is not None, cont, abort) if x]
    if len(modes) != 1:
        raise _E("give exactly one of --to, --matrix, --continue or --abort", key="refresh")
    progress = None if as_json else _progress
    result: Any
    if abort:
        result = rf.refresh_abort(r, workdir, progress=progress)
    elif cont:
        result = rf.refresh_continue(r, workdir, progress=progress, force=force)
    elif matrix is not None:
        if jobs is not None and jobs < 1:
            raise _E("must be >= 1", key="--jobs")
        result = rf.refresh_matrix(r, _matrix_versions(matrix), jobs=jobs, progress=progress)
    else:
        assert to is not None
        result = rf.refresh(r, to, sha256=sha256, progress=progress, force=force, workdir=workdir)
    _finish(result, as_json)


MATRIX_FORMS = "vllm==0.20.0,0.21.0 or vllm==0.20.0,vllm==0.21.0 or 0.20.0,0.21.0 (NAME@REF for a git source)"


def _matrix_versions(matrix: str) -> list[str]:
    """--matrix items: NAME==V, a bare V (of the NAME before it, else of the patched
    source), or NAME@REF. Anything else is exit 2 listing the accepted forms."""
    import re

    from packaging.version import InvalidVersion, Version

    from stackbuild.errors import StackbuildError as _E

    out: list[str] = []
    name = None
    for item in (x.strip() for x in matrix.split(",")):
        bad = _E(f"cannot read {item!r} in {matrix!r}; accepted: {MATRIX_FORMS}", key="--matrix")
        if not item:
            raise bad
        if "@" in item:
            out.append(item)
            continue
        n, sep, v = item.partition("==")
        if not sep:
            v = item
        else:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", n.strip()):
                raise bad
            name, v = n.strip(), v.strip()
        try:
            Version(v)
        except InvalidVersion:
            raise bad from None
        out.append(f"{name}=={v}" if name else v)
    return out


@app.command()
def edit(recipe: str = typer.Argument(..., help="Recipe name or path."), as_json: bool = JsonOpt) -> None:
    """The series as commits in a worktree, to edit with ordinary git."""
    from stackbuild.patchqueue import edit as _edit

    result = _edit(_load(recipe), progress=None if as_json else _progress)
    _finish(result, as_json)


@app.command()
def export(recipe: str = typer.Argument(..., help="Recipe name or path."), as_json: bool = JsonOpt) -> None:
    """Write the edited commits back to patch files (headers kept, sha256 updated in the recipe)."""
    from stackbuild.patchqueue import export as _export

    result = _export(_load(recipe))
    _finish(result, as_json)


@app.command()
def rehash(recipes: list[str] = typer.Argument(..., help="Recipe names or paths."), as_json: bool = JsonOpt) -> None:
    """Rewrite the recipes' patch sha256 lines to the patch files' current hashes (in place, comments kept)."""
    from stackbuild.patchqueue import rehash as _rehash

    _finish(_rehash(recipes), as_json)


@app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="mbox series, diff -u, .patch.gz.b64 ..."),
    into: str | None = typer.Option(None, "--into", help="Append [[patches]] entries to this recipe."),
    source: str = typer.Option("vllm", "--source", help="The source the patch applies to."),
    strip: int | None = typer.Option(None, "--strip", help="Strip level (default: detected)."),
    tree: Path | None = typer.Option(None, "--tree", help="Tree to detect the strip level against."),
    dest: Path | None = typer.Option(None, "--dest", help="Where to write the normalised patches."),
    split_per_file: bool = typer.Option(False, "--split-per-file", help="One patch per changed file."),
    as_json: bool = JsonOpt,
) -> None:
    """Normalise a patch in the form it was passed around in, and add it to a recipe."""
    from stackbuild.patchqueue import import_patch
    from stackbuild.recipe import load_recipe

    result = import_patch(file, load_recipe(into) if into else None, source=source, dest=dest, tree=tree,
                          split_per_file=split_per_file, strip=strip)
    _finish(result, as_json)


@app.command()
def snapshot(
    tree: Path = typer.Argument(..., help="A workspace or edit tree with uncommitted changes."),
    against: str = typer.Option("head", "--against", help="head (uncommitted changes) or base (everything since the pinned base)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Patch file to write."),
    into: str | None = typer.Option(None, "--into", help="Append [[patches]] entries to this recipe."),
    source: str | None = typer.Option(None, "--source", help="The source the tree is."),
    split_per_file: bool = typer.Option(False, "--split-per-file", help="One patch per changed file."),
    as_json: bool = JsonOpt,
) -> None:
    """A dirty source tree as a patch against its pinned base."""
    from stackbuild.patchqueue import snapshot as _snapshot
    from stackbuild.recipe import load_recipe

    result = _snapshot(tree, against=against, output=output, into=load_recipe(into) if into else None,
                       source=source, split_per_file=split_per_file)
    _finish(result, as_json)


def _log_crash(exc: BaseException) -> Path | None:
    """Write the traceback with versions to the cache's logs/, else the temp dir (a
    read-only or broken cache must not turn one crash into two). None if nowhere works."""
    import datetime as _dt  # the crash path's modules are not paid at every start-up
    import platform as _platform
    import tempfile
    import traceback

    text = (f"stackbuild {__version__}\npython {sys.version}\nplatform {_platform.platform()}\n"
            f"argv {sys.argv}\n\n" + "".join(traceback.format_exception(exc)))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for where in ("cache", "tmp"):
        try:
            if where == "cache":
                from stackbuild.cache import cache_dir

                d = cache_dir() / "logs"
                d.mkdir(parents=True, exist_ok=True)
            else:
                d = Path(tempfile.gettempdir())
            path = d / f"stackbuild-crash-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return path
        except Exception:  # noqa: BLE001, S112 - try the next place
            continue
    return None


def _interrupted(as_json: bool = False) -> int:
    """Ctrl-C: say truly whether a workspace was swapped in before it came."""
    ws = sys.modules.get("stackbuild.workspace")
    done = list(getattr(ws, "SWAPPED_IN", []) or [])
    if done:
        print(f"stackbuild: interrupted after the new workspace was swapped in at {done[-1]} (it is complete; "
              "anything left beside it is removed by the next run)", file=sys.stderr)
    else:
        print("stackbuild: interrupted; no workspace was replaced", file=sys.stderr)
    if as_json:
        _json_error("interrupted", ExitCode.INTERRUPTED, swapped_in=[str(p) for p in done])
    return int(ExitCode.INTERRUPTED)


def _click_exceptions() -> Any:
    """The click that typer runs on: typer >= 0.16 vendors it as typer._click."""
    import importlib

    try:
        return importlib.import_module("typer._click.exceptions")
    except ImportError:
        return importlib.import_module("click.exceptions")


def _json_error(message: str, code: ExitCode, **extra: Any) -> None:
    print(to_json({"error": message, "file": None, "key": None, "exit_code": int(code), **extra}))


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    debug = "--debug" in args
    as_json = "--json" in args  # errors are a JSON object on stdout too, for scripts
    ws = sys.modules.get("stackbuild.workspace")
    if ws is not None:
        ws.SWAPPED_IN.clear()  # what this command swaps in, for a true Ctrl-C message
    try:
        rc = app(args=argv, standalone_mode=False)
        if rc == ExitCode.INTERRUPTED:  # typer turns KeyboardInterrupt into Exit(130)
            return _interrupted(as_json)
        return int(rc) if isinstance(rc, int) else 0
    except SystemExit as e:  # typer.Exit inside standalone_mode=False
        return int(e.code or 0)
    except KeyboardInterrupt:
        return _interrupted(as_json)
    except StackbuildError as e:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"stackbuild: error: {e.render()}", file=sys.stderr)
        if as_json:
            print(to_json(e.to_dict()))
        return int(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the one place that catches everything
        import traceback

        ce = _click_exceptions()
        if isinstance(e, ce.ClickException):
            e.show()
            if as_json:
                _json_error(e.format_message(), ExitCode.BAD_INPUT, kind="UsageError")
            return int(ExitCode.BAD_INPUT)
        if isinstance(e, typer.Exit):
            return int(e.exit_code)
        if isinstance(e, typer.Abort):
            return _interrupted(as_json)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            from stackbuild.cache import not_writable  # a full or read-only disk is not a bug

            err = not_writable(Path(e.filename) if isinstance(e.filename, str) else Path.cwd(), e)
            print(f"stackbuild: error: {err.render()}", file=sys.stderr)
            if as_json:
                print(to_json(err.to_dict()))
            return int(err.exit_code)
        if debug:
            traceback.print_exc()
        log = _log_crash(e)
        where = f"details in {log}" if log else "no log could be written:\n" + "".join(traceback.format_exception(e))
        print(f"stackbuild: internal error: {type(e).__name__}: {e}\n  this is a bug; {where}", file=sys.stderr)
        if as_json:
            _json_error(f"internal error: {type(e).__name__}: {e}", ExitCode.INTERNAL, log=str(log) if log else None)
        return int(ExitCode.INTERNAL)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
