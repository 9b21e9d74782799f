"""Apply benchmark (issue 2): the recipe's series onto the real vLLM 0.19.0 release,
with stackbuild and with the raw sequence (tar xzf; git init/add/commit; git apply and
commit per patch) in the same run.

"Cold" is a new workspace with the release in the cache (its sdist and the base
repository stackbuild imports it into the first time; that first import is printed
too). Targets: cold apply <= 1.3x raw; re-apply with unchanged inputs <= 0.5 s and <= 10% of
cold; peak memory <= 300 MB. Exit 1 when a target is missed.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import vllm_sdist  # noqa: E402

from stackbuild.recipe import PatchKind, load_recipe  # noqa: E402
from stackbuild.workspace import GIT_ENV  # noqa: E402

RECIPE = os.environ.get("BENCH_RECIPE", "b70-gemma4")


def sh(cmd: list[str], cwd: Path | None = None) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, env={**os.environ, **GIT_ENV}, stdout=subprocess.DEVNULL)


def raw_apply(work: Path, recipe_path: Path) -> float:
    recipe = load_recipe(recipe_path)
    src = recipe.source("vllm")
    sdist = vllm_sdist(src.version or "")
    t0 = time.perf_counter()
    sh(["tar", "xzf", str(sdist), "-C", str(work), "--no-same-owner"])
    tree = next(work.iterdir())
    sh(["git", "init", "-q"], tree)
    sh(["git", "add", "-A"], tree)
    sh(["git", "commit", "-q", "-m", "base"], tree)
    for p in recipe.patches:
        if p.kind is PatchKind.FILE:
            sh(["git", "apply", f"-p{p.strip}", str(ROOT / (p.file or ""))], tree)
        elif p.kind is PatchKind.BACKPORT:
            ver = (p.release or "").split("==")[1]
            members = [f"vllm-{ver}/{f}" for f in p.files]
            sh(["tar", "xzf", str(vllm_sdist(ver)), "-C", str(work), "--no-same-owner", *members])
            for f in p.files:
                dest = tree / f
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(work / f"vllm-{ver}" / f, dest)
        else:
            continue
        sh(["git", "add", "-A"], tree)
        sh(["git", "commit", "-q", "-m", p.name], tree)
    return time.perf_counter() - t0


def seed_cache(cache: Path, recipe_path: Path) -> None:
    recipe = load_recipe(recipe_path)
    shas = {s.sha256: s.requirement for s in recipe.sources if s.sha256 and s.requirement}
    shas.update({p.sha256: p.release for p in recipe.patches if p.kind is PatchKind.BACKPORT})
    for sha, req in shas.items():
        ver = (req or "").split("==")[1]
        d = cache / "sdists" / str(sha)
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(vllm_sdist(ver), d / f"vllm-{ver}.tar.gz")


def stackbuild(args: list[str], cache: Path) -> tuple[float, int]:
    env = {**os.environ, "STACKBUILD_CACHE": str(cache)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "stackbuild.cli", *args], cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"stackbuild {' '.join(args)} failed:\n{r.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return dt, max(peak, before)


def main() -> int:
    recipe_path = ROOT / "recipes" / f"{RECIPE}.toml"
    with tempfile.TemporaryDirectory(prefix="bench-apply-") as tmp:
        tmpd = Path(tmp)
        cache = tmpd / "cache"
        seed_cache(cache, recipe_path)
        raws, colds = [], []
        peak_kb = 0
        # the first apply of a release imports its tarball into the cache's base repository
        first, peak_kb = stackbuild(["apply", RECIPE, "--workdir", str(tmpd / "first")], cache)
        for i in range(3):
            raw_dir = tmpd / f"raw{i}"
            raw_dir.mkdir()
            raws.append(raw_apply(raw_dir, recipe_path))
            wd = tmpd / f"ws{i}"
            dt, peak_kb = stackbuild(["apply", RECIPE, "--workdir", str(wd)], cache)
            colds.append(dt)
        reapply = min(stackbuild(["apply", RECIPE, "--workdir", str(tmpd / "ws0")], cache)[0] for _ in range(3))
    raw, cold = min(raws), min(colds)
    peak_mb = peak_kb / 1024
    ok_cold = cold <= 1.3 * raw
    ok_re = reapply <= 0.5 and reapply <= 0.1 * cold
    ok_mem = peak_mb <= 300
    print(f"recipe {RECIPE}: best of 3")
    print(f"  raw sequence (tar, git init/add/commit, git apply+commit): {raw:6.2f} s")
    print("  stackbuild apply, first of a release (sdist cached, imported into the cache's base repo):")
    print(f"                                                             {first:6.2f} s  ratio {first / raw:.2f}x  (once per release; no target)")
    print(f"  stackbuild apply, cold (new workspace, release cached):    {cold:6.2f} s  ratio {cold / raw:.2f}x  (target <= 1.30x) {'ok' if ok_cold else 'MISSED'}")
    print(f"  stackbuild apply, unchanged inputs:                        {reapply:6.2f} s  {reapply / cold:.1%} of cold  (target <= 0.5 s and <= 10%) {'ok' if ok_re else 'MISSED'}")
    print(f"  peak memory (largest process):                             {peak_mb:6.0f} MB  (target <= 300 MB) {'ok' if ok_mem else 'MISSED'}")
    return 0 if (ok_cold and ok_re and ok_mem) else 1


if __name__ == "__main__":
    sys.exit(main())
