"""Onto benchmark (issue 16 item 5): one patch onto a vLLM 0.19.0 tree the user already
has, with stackbuild and with raw git in the same run.

The tree is a clean git checkout of the real 0.19.0 release (4,438 files). Measured,
best of 5 each, every one a real command line (process start included):
- raw: `git apply PATCH && git add -A && git commit` in the checkout (reset after);
- cached local source: `stackbuild apply RECIPE --force` of a recipe whose `kind local`
  source is that checkout, after a first apply filled the base cache (printed too);
- onto: `stackbuild apply RECIPE --onto CHECKOUT --branch ...` (one commit on a new
  branch; the checkout itself untouched);
- apply-patch: `stackbuild apply-patch PATCH --onto CHECKOUT` (the dry verdict).
Target: cached local source and onto within 3x raw. Exit 1 when a target is missed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fixtures import vllm_tree  # noqa: E402

from stackbuild.gitrun import GIT_ENV  # noqa: E402

TARGET = 3.0
RUNS = 5
STACKBUILD = [sys.executable, "-m", "stackbuild.cli"] if not (Path(sys.executable).parent / "stackbuild").exists() \
    else [str(Path(sys.executable).parent / "stackbuild")]


def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, env={**os.environ, **GIT_ENV, **(env or {})}, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def best(fn, runs: int = RUNS) -> float:  # type: ignore[no-untyped-def]
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-onto-"))
    try:
        co = work / "vllm"
        shutil.copytree(vllm_tree("0.19.0"), co, symlinks=True)
        sh(["git", "init", "-q", "-b", "main"], co)
        sh(["git", "add", "-A", "-f"], co)
        sh(["git", "commit", "-q", "-m", "vllm 0.19.0"], co)
        reg = co / "vllm/model_executor/models/registry.py"
        text = reg.read_text()
        reg.write_text(text.replace("_TEXT_GENERATION_MODELS = {", "# bench\n_TEXT_GENERATION_MODELS = {", 1))
        patch = work / "one.patch"
        patch.write_text(sh(["git", "diff"], co))
        sh(["git", "checkout", "-q", "--", "."], co)

        proj = work / "proj"
        (proj / "recipes").mkdir(parents=True)
        (proj / "patches").mkdir()
        shutil.copyfile(patch, proj / "patches/one.patch")
        sha = hashlib.sha256(patch.read_bytes()).hexdigest()
        recipe = proj / "recipes/onto-bench.toml"
        recipe.write_text(f'platform = "b70"\n\n[sources.vllm]\npath = "{co}"\n\n'
                          f'[[patches]]\nfile = "patches/one.patch"\nsource = "vllm"\nsha256 = "{sha}"\n')
        env = {"STACKBUILD_CACHE": str(work / "cache"), "STACKBUILD_ALLOW_DIRS": str(co)}

        def raw(_i: int) -> None:
            sh(["git", "apply", str(patch)], co)
            sh(["git", "add", "-A"], co)
            sh(["git", "commit", "-q", "-m", "one"], co)

        def raw_timed(i: int) -> float:
            t0 = time.perf_counter()
            raw(i)
            dt = time.perf_counter() - t0
            sh(["git", "reset", "-q", "--hard", "HEAD~1"], co)
            return dt

        t_raw = min(raw_timed(i) for i in range(RUNS))

        wd = work / "ws"
        t0 = time.perf_counter()
        sh([*STACKBUILD, "apply", str(recipe), "--workdir", str(wd)], proj, env)
        t_first = time.perf_counter() - t0
        t_cached = best(lambda _i: sh([*STACKBUILD, "apply", str(recipe), "--workdir", str(wd), "--force"], proj, env))
        t_onto = best(lambda i: sh([*STACKBUILD, "apply", str(recipe), "--onto", str(co), "--branch", f"bench/{i}"], proj, env))
        t_dry = best(lambda _i: sh([*STACKBUILD, "apply-patch", str(patch), "--onto", str(co)], proj, env))
        t_start = best(lambda _i: sh([*STACKBUILD, "--version"], proj, env))
        assert sh(["git", "status", "--porcelain"], co) == "", "the checkout changed"

        print(f"vLLM 0.19.0 clean checkout, one patch; best of {RUNS}, wall clock, process start included")
        print(f"  raw git apply + add + commit:             {t_raw * 1000:7.0f} ms")
        print(f"  first apply of the local source (import): {t_first * 1000:7.0f} ms")
        rows = [("apply --force, cached local base", t_cached), ("apply --onto (new branch)", t_onto),
                ("apply-patch --onto (dry verdict)", t_dry)]
        missed = []
        for name, t in rows:
            ratio = t / t_raw
            ok = ratio <= TARGET
            print(f"  {name + ':':41} {t * 1000:7.0f} ms  {ratio:5.1f}x raw  (target <= {TARGET:.0f}x: {'ok' if ok else 'MISSED'})")
            if not ok:
                missed.append(name)
        print(f"  (stackbuild --version alone: {t_start * 1000:.0f} ms)")
        return 1 if missed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
