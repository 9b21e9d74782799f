"""Layers-suite benchmark (issue 14): the default `layers` matrix (every case and negative
control of stackbuild/checks/numerics/layers.py) on the real 0.19.0 tree with the whole series applied, in the CPU venv of
tests/checks/test_verify_dynamic.py, pinned to 2 CPU cores (taskset where available).
Reports the worker's wall time (process start, vLLM import, distributed init, cases)
and the in-worker time; the raw baseline is a bare `python -c "import vllm"` in the
same venv, measured in the same run.

Target: <= 60 s wall. Exit 1 when missed or when a case or control fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "checks"))
sys.path.insert(0, str(ROOT / "tests" / "patches"))

import fixtures  # noqa: E402
from conftest import apply_series  # noqa: E402
from test_layers_numerics import extra_wheels  # noqa: E402
from test_verify_dynamic import target_venv  # noqa: E402

TARGET_S = 60.0


def _cmd(argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", "0,1", *argv] if taskset and (os.cpu_count() or 1) >= 2 else argv


def main() -> int:
    python = str(target_venv() / "bin/python")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "vllm-0.19.0"
        shutil.copytree(fixtures.vllm_tree("0.19.0"), tree)
        apply_series(tree)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        path = os.pathsep.join([str(ROOT), str(tree), *(str(w) for w in extra_wheels())])
        env.update(PYTHONPATH=path, HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="ERROR")
        t0 = time.perf_counter()
        subprocess.run(_cmd([python, "-c", "import vllm.model_executor.layers.linear"]), env=env, check=True)
        baseline = time.perf_counter() - t0
        t1 = time.perf_counter()
        proc = subprocess.run(
            _cmd([python, "-m", "stackbuild.checks.numerics.layers", json.dumps({"tree": str(tree)})]),
            env=env, capture_output=True, text=True, check=False,
        )
        wall = time.perf_counter() - t1
    if proc.returncode:
        print(proc.stderr[-2000:])
        return 1
    out = json.loads(proc.stdout.splitlines()[-1])
    failed = [r for r in out["results"] if r["status"] != "pass"]
    for r in out["results"]:
        name = f"{r['control'] + '/' if r['control'] else ''}{r['case']}@{r['kernels']}"
        rel = "-" if r["rel"] is None else f"{r['rel']:.3g}"
        print(f"   {name:48s} {r['status']:5s} rel {rel:>9s}  {r['seconds']:.3f} s")
    print(f"   layers suite: {wall:.1f} s wall on 2 cores ({out['wall_s']:.1f} s in the worker); "
          f"baseline `import vllm...linear`: {baseline:.1f} s (x{wall / baseline:.2f}); target <= {TARGET_S:g} s")
    if failed:
        print(f"   FAILED: {', '.join(r['case'] for r in failed)}")
    return 0 if wall <= TARGET_S and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
