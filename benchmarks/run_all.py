"""`make bench`: run every benchmarks/bench_*.py in its own process, in order, and
print each one's figures (ratios against the raw baseline measured in the same run)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    here = Path(__file__).parent
    only = set(sys.argv[1:])
    failed = []
    for script in sorted(here.glob("bench_*.py")):
        if only and script.stem.removeprefix("bench_") not in only:
            continue
        print(f"== {script.stem}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(script)])
        print(f"   ({script.stem}: {time.perf_counter() - t0:.1f} s, exit {rc})\n", flush=True)
        if rc != 0:
            failed.append(script.stem)
    if failed:
        print("benchmarks that missed a target or failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
