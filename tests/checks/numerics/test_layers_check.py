"""The layers check's decisions that need no vLLM: the pinned kernel version, skips, rows."""

from __future__ import annotations

import json
from pathlib import Path

from stackbuild.checks import CheckContext, CheckStatus
from stackbuild.checks.numerics.layers_check import pinned_kernels, results_from_output, run_layers
from stackbuild.recipe import load_recipe


def test_the_shipped_recipe_pins_kernels_0_1_5() -> None:
    ctx = CheckContext(load_recipe("lunar-lake-moe"), Path("/nonexistent"))
    assert pinned_kernels(ctx) == "0.1.5"


def test_no_applied_tree_is_a_skip_naming_it(tmp_path: Path) -> None:
    [row] = run_layers(CheckContext(load_recipe("lunar-lake-moe"), tmp_path))
    assert row.status is CheckStatus.SKIP and str(tmp_path / "vllm") in row.detail


def test_a_target_without_vllm_dependencies_is_a_skip_naming_the_package() -> None:
    err = "Traceback...\nModuleNotFoundError: No module named 'msgspec'\n"
    [row] = results_from_output("", err, 1)
    assert row.status is CheckStatus.SKIP and "'msgspec'" in row.detail


def test_a_worker_crash_is_a_fail() -> None:
    [row] = results_from_output("", "Segmentation fault\n", -11)
    assert row.status is CheckStatus.FAIL and "Segmentation fault" in row.detail


def test_rows_keep_status_and_name_the_control() -> None:
    results = [
        {"case": "a", "kernels": "0.1.5", "status": "fail", "detail": "rel 2", "control": "", "rel": 2.0},
        {"case": "a", "kernels": "0.1.5", "status": "pass", "detail": "caught", "control": "zp-0", "rel": 1.0},
    ]
    rows = results_from_output(json.dumps({"results": results}), "", 0)
    assert [(r.subject, r.status) for r in rows] == [("a@0.1.5", CheckStatus.FAIL), ("control:zp-0/a", CheckStatus.PASS)]


def test_a_vllm_release_the_harness_is_not_written_for_is_a_skip(tmp_path: Path) -> None:
    (tmp_path / "vllm" / "vllm").mkdir(parents=True)
    (tmp_path / "vllm" / "vllm" / "__init__.py").write_text("")
    [row] = run_layers(CheckContext(load_recipe("b70-llm-scaler"), tmp_path))
    assert row.status is CheckStatus.SKIP and "this recipe builds vLLM 0.21.0" in row.detail
