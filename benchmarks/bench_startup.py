"""Start-up of the CLI: `stackbuild --help` and `stackbuild list` against `python -c pass`
(the interpreter's own start-up, measured in the same run). Target: at most 4x, which
holds while heavy modules are imported only by the commands that use them."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = 15
TARGET = 4.0


def best_of(cmd: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(sorted(times)[: RUNS // 2 + 1])  # the quiet half: noise only adds


def main() -> int:
    base = best_of([sys.executable, "-c", "pass"])
    print(f"python -c pass: {base * 1000:.0f} ms")
    worst = 0.0
    for args in (["--help"], ["list"]):
        t = best_of([sys.executable, "-m", "stackbuild.cli", *args])
        ratio = t / base
        worst = max(worst, ratio)
        print(f"stackbuild {' '.join(args)}: {t * 1000:.0f} ms, {ratio:.1f}x (target <= {TARGET:.0f}x)")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
