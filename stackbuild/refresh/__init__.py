"""`stackbuild refresh`: carry a recipe's patch series onto a new upstream release.

The series is first applied to its own (old) base by `stackbuild apply` (a no-op when
the workspace is up to date), then carried patch by patch onto the new release in the
refresh worktree work/<recipe>.refresh/<source> (carry.py), each with a verdict
decided from the evidence in verdict.py. Nothing outside the refresh worktree is
written until the whole series is through; then results.py writes the refreshed
patches to patches/<source>/<new version>/ and a new recipe beside the old one.

Verdicts: clean, offset, merged (3-way), resolved by hand, already upstream (proven),
possibly upstream (evidence for a person), needs porting (the code moved: where),
conflict, obsolete (the changed code is gone and nothing replaced it). A refresh exits 1
when any patch is not clean, offset, merged, resolved or already upstream, and the new
recipe keeps every such patch, marked.

Where the pieces live:
- verdict.py: deciding (normalised comparison, moved files, names upstream);
- target.py: the release `--to` names, for each source kind, and its files;
- carry.py: the refresh worktree and carrying each patch;
- results.py: the verdict and result types, the refreshed patch files, the new recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from stackbuild.errors import PatchError, StackbuildError
from stackbuild.recipe import Recipe, load_recipe
from stackbuild.refresh.carry import OLD_BASE_TAG, STATE_FILE, Carrier, old_base_names, prepare
from stackbuild.refresh.results import (
    Evidence,
    MatrixResult,
    RefreshedPatch,
    RefreshResult,
    RefreshVerdict,
    counts,
    new_recipe_name,
    write_outputs,
)
from stackbuild.refresh.target import Progress, index_sha256, make_target, target_source_name
from stackbuild.workspace import apply_recipe, default_workdir

__all__ = [
    "OLD_BASE_TAG", "STATE_FILE", "Evidence", "MatrixResult", "RefreshResult", "RefreshVerdict", "RefreshedPatch",
    "index_sha256", "new_recipe_name", "refresh", "refresh_abort", "refresh_continue", "refresh_dir",
    "refresh_in_progress", "refresh_matrix",
]


def refresh_dir(recipe: Recipe, workdir: Path | None = None) -> Path:
    if workdir is not None:
        return Path(workdir).resolve()
    ws = default_workdir(recipe).resolve()
    return ws.parent / f"{ws.name}.refresh"


def refresh_in_progress(recipe: Recipe, workdir: Path | None = None) -> str | None:
    """What an unfinished refresh of this recipe waits for, or None."""
    f = refresh_dir(recipe, workdir) / STATE_FILE
    if not f.exists():
        return None
    st = json.loads(f.read_text())
    if st.get("state") == "done":
        return None
    c = st.get("conflict")
    return (f"a refresh to {st['new']} is stopped at a conflict in {c['entry']}" if c
            else f"a refresh to {st['new']} did not finish")


def _applied_workspace(recipe: Recipe, source: str, base_workspace: Path | None, progress: Progress) -> tuple[Path, Any]:
    res = apply_recipe(recipe, base_workspace, progress=progress)
    if not res.ok:
        raise PatchError(f"the series does not apply to its own base, so it cannot be refreshed: {res.message}", file=recipe.path)
    return res.workdir / source, res.manifest


def refresh(
    recipe: Recipe,
    to: str,
    sha256: str | None = None,
    workdir: Path | None = None,
    progress: Progress | None = None,
    *,
    base_workspace: Path | None = None,
    force: bool = False,
) -> RefreshResult:
    """Carry the series onto `to` ("vllm==0.20.0"; "name@tag" for a git source or a
    git ref of a local source's checkout; "name=PATH" for a local source). `workdir`
    is the refresh directory (default work/<recipe>.refresh)."""
    progress = progress or (lambda _m: None)
    rdir = refresh_dir(recipe, workdir)
    if (rdir / STATE_FILE).exists():
        st = json.loads((rdir / STATE_FILE).read_text())
        if st.get("conflict"):
            raise StackbuildError(f"a refresh to {st['new']} stopped at a conflict in {st['conflict']['entry']}; "
                                  "finish it with --continue or drop it with --abort", file=rdir)
    target = make_target(recipe, to, sha256)
    ws_tree, manifest = _applied_workspace(recipe, target.source.name, base_workspace, progress)
    if rdir.exists():
        shutil.rmtree(rdir)
    carrier = prepare(recipe, target, rdir, ws_tree, manifest, True, progress)
    carrier.run()
    return _conclude(carrier, write=True, force=force)


def _load(recipe: Recipe, workdir: Path | None, progress: Progress | None) -> Carrier:
    rdir = refresh_dir(recipe, workdir)
    f = rdir / STATE_FILE
    if not f.exists():
        raise StackbuildError("no refresh in progress", file=rdir)
    return Carrier(recipe, json.loads(f.read_text()), rdir, progress or (lambda _m: None))


def refresh_continue(recipe: Recipe, workdir: Path | None = None, progress: Progress | None = None, *,
                     force: bool = False) -> RefreshResult:
    carrier = _load(recipe, workdir, progress)
    if not carrier.st.get("conflict"):
        raise StackbuildError(f"the refresh to {carrier.st['new']} is not stopped at a conflict; nothing to continue",
                              file=carrier.rdir)
    carrier.resume()
    return _conclude(carrier, write=True, force=force)


def refresh_abort(recipe: Recipe, workdir: Path | None = None, progress: Progress | None = None) -> RefreshResult:
    """Drop an unfinished refresh: the refresh worktree goes; nothing else was written."""
    carrier = _load(recipe, workdir, progress)
    st = carrier.st
    if st.get("state") == "done":
        raise StackbuildError(f"the refresh to {st['new']} finished; its files are written (remove them with git)",
                              file=carrier.rdir)
    shutil.rmtree(carrier.rdir)
    patches = tuple(RefreshedPatch.from_dict(d) for d in carrier.results)
    return RefreshResult(recipe.name, st["source"], st["old"], st["new"], st["new_sha256"], carrier.rdir,
                         "aborted", patches, message=f"aborted; removed {carrier.rdir}; nothing else was changed")


def _pending(carrier: Carrier) -> list[RefreshedPatch]:
    out = []
    c = carrier.st.get("conflict")
    for i, e in enumerate(carrier.st["entries"]):
        if i < carrier.st["position"]:
            continue
        if c and e["name"] == c["entry"]:
            out.append(RefreshedPatch(e["name"], e["kind"], RefreshVerdict.CONFLICT,
                                      f"{c['detail']}: resolve in {carrier.tree}, then `refresh --continue` (or --abort)",
                                      old_sha256=e.get("sha256")))
        else:
            out.append(RefreshedPatch(e["name"], e["kind"], RefreshVerdict.NOT_ATTEMPTED,
                                      "waits for the conflict above", old_sha256=e.get("sha256")))
    return out


def _conclude(carrier: Carrier, write: bool, force: bool) -> RefreshResult:
    st = carrier.st
    done = [RefreshedPatch.from_dict(d) for d in carrier.results]
    head = (carrier.recipe.name, st["source"], st["old"], st["new"], st["new_sha256"], carrier.tree)
    if st.get("conflict"):
        c = st["conflict"]
        msg = f"conflict in {c['entry']}: {c['detail']}; resolve in {carrier.tree}, then --continue (or --abort)"
        return RefreshResult(*head, "conflict", tuple(done + _pending(carrier)), message=msg)
    if not write:
        return RefreshResult(*head, "checked", tuple(done), message=counts(done))
    final, new_recipe, written = write_outputs(carrier.recipe, st, carrier.tree, done, force)
    st["state"] = "done"
    carrier.save()
    msg = counts(final) + f"; new recipe {new_recipe.name}; {len(written)} file(s) written"
    undecided = [p.name for p in final if not p.verdict.ok]
    if undecided:
        msg += f"; kept and marked in the new recipe for a person to decide: {', '.join(undecided)}"
    return RefreshResult(*head, "done", tuple(final), new_recipe, tuple(written), msg)


# ------------------------------------------------------------------ matrix


def _matrix_worker(recipe_path: str, to: str, sha256: str | None, rdir: str, ws_tree: str, manifest_dir: str,
                   old_names: dict[str, list[str]] | None = None) -> RefreshResult:
    """One release of a matrix: what `refresh --to` does after its apply, except that a
    conflict is recorded and skipped and nothing is written. `old_names`: read once by
    the matrix for every release (without it the run reads them itself, as a refresh does)."""
    from stackbuild.manifest import read_manifest

    recipe = load_recipe(recipe_path)
    target = make_target(recipe, to, sha256)
    carrier = prepare(recipe, target, Path(rdir), Path(ws_tree), read_manifest(Path(manifest_dir)), False,
                      lambda _m: None, old_names)
    carrier.run()
    return _conclude(carrier, write=False, force=False)


def matrix_jobs(jobs: int | None, releases: int) -> int:
    """Processes for a matrix: one per release, at most one per CPU this process may use."""
    if jobs is not None:
        return max(1, min(jobs, releases))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, releases))


def refresh_matrix(
    recipe: Recipe,
    versions: list[str],
    jobs: int | None = None,
    progress: Progress | None = None,
    *,
    sha256s: dict[str, str] | None = None,
    base_workspace: Path | None = None,
) -> MatrixResult:
    """Try the series on several releases at once (a process and a temporary directory
    per release, `matrix_jobs` at a time); nothing is written. A conflict is recorded and
    the series goes on without that patch, so the grid shows every patch on every
    release. What every release would repeat is done once here: applying the series to
    its old base, and looking up at the old base the names the series adds."""
    from concurrent.futures import Future, ProcessPoolExecutor

    progress = progress or (lambda _m: None)
    t0 = time.perf_counter()
    source = None
    tos = []
    for v in versions:
        to = v
        if "==" not in v and "@" not in v and "=" not in v:
            src = next((s for s in recipe.sources if s.name in recipe.patched_sources), None)
            if src is None or not src.project:
                raise StackbuildError(f"give {v!r} as NAME==VERSION", key="--matrix")
            to = f"{src.project}=={v}"
        tos.append(to)
        source = target_source_name(recipe, to)
    assert source is not None
    ws_tree, _manifest = _applied_workspace(recipe, source, base_workspace, progress)
    old_names = old_base_names(recipe, source, ws_tree)
    base = Path(tempfile.mkdtemp(prefix=f"stackbuild-matrix-{recipe.name}-"))
    results: list[RefreshResult | None] = [None] * len(tos)
    errors: list[str | None] = [None] * len(tos)
    n = matrix_jobs(jobs, len(tos))

    def args(i: int) -> tuple[Any, ...]:
        sha = (sha256s or {}).get(tos[i]) or (sha256s or {}).get(versions[i])
        return (str(recipe.path), tos[i], sha, str(base / str(i)), str(ws_tree), str(ws_tree.parent), old_names)

    def collect(i: int, get: Any) -> None:
        try:
            r = get()
            results[i] = r
            progress(f"{tos[i]}: {r.message}")
        except StackbuildError as e:
            errors[i] = e.render()

    try:
        if n == 1:  # one at a time: in this process, no worker to start
            for i in range(len(tos)):
                collect(i, lambda i=i: _matrix_worker(*args(i)))
        else:
            with ProcessPoolExecutor(max_workers=n) as ex:
                futs: dict[int, Future[RefreshResult]] = {i: ex.submit(_matrix_worker, *args(i)) for i in range(len(tos))}
                for i, f in futs.items():
                    collect(i, f.result)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return MatrixResult(recipe.name, tuple(versions), tuple(results), tuple(errors), time.perf_counter() - t0)
