"""The layers suite on the real patched 0.19.0 tree: the series' INT4 linear and MoE methods
run on emulated kernels (stackbuild/checks/numerics/layers.py) in the CPU venv of
tests/checks/test_verify_dynamic.py, and through `verify`'s check function.

The same suite on the series as it was before the act-order and MoE-API fixes (read from
git history) must fail those cases: that is what the fixes are proven against."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import fixtures
import pytest
from conftest import PATCH_DIR, SERIES

from stackbuild.cache import sha256_file
from stackbuild.checks.numerics.layers_check import results_from_output

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checks"))
from test_verify_dynamic import target_venv  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PRE_FIX = "89b51dc"  # the last commit with xpu-int4-linear/-moe as the review found them
FIXED_PATCHES = ("xpu-int4-linear.patch", "xpu-int4-moe.patch")
NEW_PATCHES = ("xpu-moe-kernel-layout.patch",)  # not in the series at PRE_FIX


# Pure-Python packages vLLM's compressed-tensors method imports, absent from the CPU venv:
# their wheels (zip-importable) go on the worker's PYTHONPATH. sha256 from the index.
EXTRA_WHEELS = {
    "compressed_tensors-0.14.0.1-py3-none-any.whl": (
        "compressed-tensors==0.14.0.1",
        "46c4940a3a779d3d97108c294bfcd9acf4bd0491f7c6737c320f0e815ec732e4",
    ),
    "loguru-0.7.3-py3-none-any.whl": (
        "loguru==0.7.3",
        "31a33c10c8e1e10422bfd431aeb5d351c7cf7fa671e3c4df004162264b28220c",
    ),
}


def extra_wheels() -> list[Path]:
    dest_dir = fixtures.test_cache_dir() / "wheels"
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, (req, sha) in EXTRA_WHEELS.items():
        dest = dest_dir / name
        if not (dest.exists() and sha256_file(dest) == sha):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            req, "-d", str(dest_dir)], check=True, capture_output=True)
            if sha256_file(dest) != sha:
                dest.unlink()
                raise RuntimeError(f"sha256 mismatch for {name}")
        out.append(dest)
    return out


def run_layers(tree: Path, cases: list[str] | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"tree": str(tree), "kernels": "0.1.5"}
    if cases:
        args["cases"] = cases
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    path = os.pathsep.join([str(REPO), *(str(w) for w in extra_wheels())])
    env.update(PYTHONPATH=path, HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="ERROR")
    proc = subprocess.run(
        [str(target_venv() / "bin/python"), "-m", "stackbuild.checks.numerics.layers", json.dumps(args)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    assert Path(out["vllm_file"]).resolve() == (tree / "vllm" / "__init__.py").resolve()
    out["by_case"] = {r["case"]: r for r in out["results"] if not r["control"]}
    out["controls"] = [r for r in out["results"] if r["control"]]
    out["proc"] = proc
    return out


@pytest.fixture(scope="module")
def fixed(patched_0190: Path) -> dict[str, Any]:
    return run_layers(patched_0190)


@pytest.fixture(scope="module")
def pre_fix(tmp_path_factory: pytest.TempPathFactory, pristine_0190: Path) -> dict[str, Any]:
    """The series as it was at PRE_FIX: xpu-int4-linear/-moe from then, no new patches."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("needs this repository's git history")
    work = tmp_path_factory.mktemp("pre-fix")
    patches = work / "patches"
    patches.mkdir()
    series = [n for n in SERIES if n not in NEW_PATCHES]
    for name in series:
        src = PATCH_DIR / name
        if name in FIXED_PATCHES:
            blob = subprocess.run([git, "show", f"{PRE_FIX}:patches/vllm/0.19.0/{name}"], cwd=REPO,
                                  capture_output=True, check=False)
            if blob.returncode:
                pytest.skip(f"commit {PRE_FIX} is not in this clone")
            (patches / name).write_bytes(blob.stdout)
        else:
            shutil.copy(src, patches / name)
    tree = work / "vllm-0.19.0"
    shutil.copytree(pristine_0190, tree)
    for name in series:
        subprocess.run([git, "apply", "-p1", "--whitespace=nowarn", str(patches / name)], cwd=tree, check=True)
    return run_layers(tree, ["gptq-actorder-g64", "gptq-actorder-g128", "gptq-sym-g128", "gptq-moe-kernels-0.1.16",
                             "bf16-moe-e4-top2", "fp8-moe-e3-top2", "ct-actorder-asym-g64", "ct-actorder-sym-g32"])


def test_every_case_passes_on_the_series(fixed: dict[str, Any]) -> None:
    bad = {n: r["detail"] for n, r in fixed["by_case"].items() if r["status"] != "pass"}
    assert not bad
    assert len(fixed["by_case"]) >= 18


@pytest.mark.parametrize(
    "case", ["gptq-actorder-g64", "gptq-actorder-g128", "ct-actorder-asym-g64", "ct-actorder-sym-g32"]
)
def test_act_order_gptq_linear_matches_the_fp64_reference(fixed: dict[str, Any], pre_fix: dict[str, Any],
                                                          case: str) -> None:
    now, before = fixed["by_case"][case], pre_fix["by_case"][case]
    assert now["status"] == "pass" and now["rel"] < 5e-3
    # the patch as the review found it: the checkpoint's g_idx went to the kernel as-is
    assert before["status"] == "fail" and before["rel"] > 0.5, before


def test_int4_moe_refuses_kernels_without_xpu_fused_moe(fixed: dict[str, Any], pre_fix: dict[str, Any]) -> None:
    now = fixed["by_case"]["gptq-moe-kernels-0.1.16"]
    assert now["status"] == "pass" and now["detail"].startswith("refused clearly: RuntimeError: vllm-xpu-kernels 0.1.16.2")
    before = pre_fix["by_case"]["gptq-moe-kernels-0.1.16"]
    assert before["status"] == "fail" and "unexpected keyword argument 'is_int4'" in before["detail"]


@pytest.mark.parametrize("case", ["bf16-moe-e4-top2", "fp8-moe-e3-top2"])
def test_bf16_and_fp8_moe_run_on_kernels_0_1_5(fixed: dict[str, Any], pre_fix: dict[str, Any], case: str) -> None:
    """Issue 15.3: 0.1.5 reads non-4-bit MoE weights as [E, K, N]; 0.19.0 did not transpose."""
    now = fixed["by_case"][case]
    assert now["status"] == "pass" and now["rel"] < 5e-3
    before = pre_fix["by_case"][case]
    assert before["status"] == "fail" and "ptr_A.size(1) must match ptr_B.size(1)" in before["detail"]


def test_pre_fix_series_still_passes_what_was_right(pre_fix: dict[str, Any]) -> None:
    assert pre_fix["by_case"]["gptq-sym-g128"]["status"] == "pass"


def test_negative_controls_are_caught(fixed: dict[str, Any]) -> None:
    controls = {(r["control"], r["case"]): r for r in fixed["controls"]}
    assert {c for c, _ in controls} == {"fp4-decode", "skipped-transpose", "zp-0"}
    for key, r in controls.items():
        assert r["status"] == "pass" and r["rel"] > 0.1, (key, r["detail"])


def test_verify_rows_from_the_worker(fixed: dict[str, Any]) -> None:
    proc = fixed["proc"]
    rows = results_from_output(proc.stdout, proc.stderr, proc.returncode)
    assert len(rows) == len(fixed["results"])
    assert all(r.check == "layers" for r in rows)
    assert any(r.subject == "gptq-actorder-g64@0.1.5" and r.status.value == "pass" for r in rows)
