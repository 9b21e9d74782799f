"""Start-up of the CLI: `stackbuild --help` and `stackbuild list` against `python -c pass`
(the interpreter's own start-up, measured in the same run). Target: at most 4x, which
holds while heavy modules are imported only by the commands that use them."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = 15
# bytecode as a user's install has it: with PYTHONDONTWRITEBYTECODE (set in some CI and
# sandbox images) every run compiles stackbuild's modules from source again
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
TARGET = 4.0


def best_of(cmd: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run: the median of the quiet half of RUNS runs (noise
    only adds). CPU (user + system of the child) is the steadier figure on a shared box."""
    walls, cpus = [], []
    for _ in range(RUNS):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=ENV)
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    half = RUNS // 2 + 1
    return statistics.median(sorted(walls)[:half]), statistics.median(sorted(cpus)[:half])


def main() -> int:
    base, base_cpu = best_of([sys.executable, "-c", "pass"])
    print(f"python -c pass: {base * 1000:.0f} ms wall, {base_cpu * 1000:.0f} ms CPU")
    worst = 0.0
    for args in (["--help"], ["list"]):
        t, cpu = best_of([str(Path(sys.executable).parent / "stackbuild"), *args])
        ratio, cpu_ratio = t / base, cpu / base_cpu
        worst = max(worst, min(ratio, cpu_ratio))
        print(f"stackbuild {' '.join(args)}: {t * 1000:.0f} ms wall {ratio:.1f}x, "
              f"{cpu * 1000:.0f} ms CPU {cpu_ratio:.1f}x (target <= {TARGET:.0f}x)")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
