"""Lock benchmark (issue 6): `stackbuild lock` on the same input with each resolver
backend (pip-tools, uv), against the raw resolver command on that input measured in
the same run (`pip-compile --generate-hashes ...` / `uv pip compile --generate-hashes`,
same clean environment, same index).

Input: the recipe pin `transformers==5.5.0` (BENCH_LOCK_INPUT to change it) against
the package index; `--local` locks the test suite's tiny local index instead (no
network). Each command runs once untimed first, so both see warm caches.

Target: stackbuild's overhead over the raw command <= 1.5x + 2 s (probes, parsing,
rendering) for each backend. Exit 1 when missed. The pip-tools/uv ratio is reported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from stackbuild.lock import DEFAULT_INDEX, lock  # noqa: E402
from stackbuild.lock.backends import clean_env, find_uv  # noqa: E402
from stackbuild.recipe import load_recipe  # noqa: E402

INPUT = os.environ.get("BENCH_LOCK_INPUT", "transformers==5.5.0")


def _has_uv() -> bool:
    """uv as stackbuild finds it (the venv's uv first), not only on PATH."""
    try:
        find_uv()
    except Exception:  # noqa: BLE001 - ResolverMissing
        return False
    return True


def raw(resolver: str, req_file: Path, out: Path, index: str) -> float:
    if resolver == "pip-tools":
        argv = [sys.executable, "-m", "piptools", "compile", "--quiet", "--no-header", "--generate-hashes",
                "--allow-unsafe", "--strip-extras", "--no-emit-index-url", "--no-emit-find-links",
                "--no-emit-trusted-host", "--index-url", index, "-o", str(out), str(req_file)]
    else:
        argv = [find_uv(), "pip", "compile", "--quiet", "--no-config", "--no-header", "--generate-hashes",
                "--python", sys.executable, "--index-url", index, "-o", str(out), str(req_file)]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=clean_env(), stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    local = "--local" in sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="bench-lock-") as tmp_s:
        tmp = Path(tmp_s)
        if local:
            from test_lock import Universe

            index = Universe(tmp / "universe").main
            pins = ['sbt-alpha = "==1.0"', 'sbt-delta = "==1.0"']
            what = "sbt-alpha, sbt-delta (tiny local index)"
        else:
            index = DEFAULT_INDEX
            name, _, ver = INPUT.partition("==")
            pins = [f'{name} = "=={ver}"']
            what = f"{INPUT} from {index}"
        (tmp / "recipes").mkdir()
        (tmp / "recipes" / "bench.toml").write_text('name = "bench"\nplatform = "b70"\n\n[pins]\n'
                                                    + "\n".join(pins) + "\n")
        recipe = load_recipe(tmp / "recipes" / "bench.toml")
        req_file = tmp / "in.txt"
        req_file.write_text("\n".join(p.requirement() for p in recipe.pins) + "\n")

        backends = ["pip-tools"] + (["uv"] if _has_uv() else [])
        figures: dict[str, tuple[float, float, int]] = {}
        print(f"lock input: {what}")
        for b in backends:
            raw(b, req_file, tmp / f"warm-{b}.txt", index)  # untimed: warm the caches
            t_raw = raw(b, req_file, tmp / f"raw-{b}.txt", index)
            t0 = time.perf_counter()
            result = lock(recipe, requirements_from=None, resolver=b, output=tmp / f"sb-{b}.txt",
                          index_url=index)
            t_sb = time.perf_counter() - t0
            figures[b] = (t_raw, t_sb, len(result.packages))
            print(f"  {b:10s} raw {t_raw:7.2f} s   stackbuild lock {t_sb:7.2f} s   "
                  f"({t_sb / t_raw:.2f}x raw; {len(result.packages)} packages)")
        ok = True
        for b, (t_raw, t_sb, _) in figures.items():
            if t_sb > 1.5 * t_raw + 2.0:
                print(f"  MISSED: stackbuild lock with {b} took {t_sb:.2f} s > 1.5 x {t_raw:.2f} s + 2 s")
                ok = False
        if "uv" in figures:
            pt, uv = figures["pip-tools"][1], figures["uv"][1]
            print(f"  pip-tools / uv (stackbuild lock, same input): {pt / uv:.1f}x")
            if figures["pip-tools"][2] != figures["uv"][2]:
                print(f"  note: package counts differ (pip-tools {figures['pip-tools'][2]}, uv {figures['uv'][2]})")
        else:
            print("  uv not installed (pip install uv): pip-tools only")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
