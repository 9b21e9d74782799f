"""Parser benchmark (issue 13 item 10): a hunk followed by a long run of blank lines
and then more hunk lines (editors eat the leading space of empty context lines).
Parsing was quadratic in the run's length: a 40 KB patch took 77 s.

Baseline, measured in the same run: parsing a patch with the same number of lines,
all ordinary context lines. Targets: the blank-run patch parses within 3x the baseline, and
doubling the run at most ~doubles the time (ratio <= 3; quadratic would be 4). Exit 1 when a target is
missed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stackbuild.series import parse_patch  # noqa: E402


def blank_run(n: int) -> str:
    return "--- a/f.py\n+++ b/f.py\n@@ -1,2 +1,3 @@\n a\n" + "\n" * n + "+new\n"


def ordinary(n_lines: int) -> str:
    lines = [" x" for _ in range(n_lines)]
    return f"--- a/f.py\n+++ b/f.py\n@@ -1,{len(lines)} +1,{len(lines) + 1} @@\n" + "\n".join(lines) + "\n+new\n"


def best_of(text: str, runs: int = 9) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        parse_patch(text)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    n = 40_000  # a 40 KB patch, as in the report
    blank = blank_run(n)
    base = ordinary(n + 1)
    t_base = best_of(base)
    t_blank = best_of(blank)
    t_half = best_of(blank_run(n // 2))
    ratio = t_blank / t_base
    scaling = t_blank / t_half
    print(f"   ordinary patch, {n + 1} context lines (baseline): {t_base * 1000:.1f} ms")
    print(f"   blank-run {len(blank) / 1000:.0f} KB patch: {t_blank * 1000:.1f} ms  ({ratio:.2f}x baseline; target <= 3x)")
    print(f"   blank run 20k -> 40k lines: {scaling:.2f}x time (linear ~2x; target <= 3x; quadratic is 4x)")
    ok = ratio <= 3.0 and scaling <= 3.0
    if not ok:
        print("   TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
