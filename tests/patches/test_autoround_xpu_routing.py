"""xpu-autoround-gptq-awq.patch: INCConfig.get_quant_method on a faked XPU.

The real patched 0.19.0 tree (whole series) and the pristine one are imported in
turn, first on PYTHONPATH, by the interpreter of the CPU venv that
tests/checks/test_verify_dynamic.py builds (torch 2.13.0 CPU, transformers 5.5.0).
One subprocess per tree runs every routing case and writes JSON; the tests compare.

The layer handed to get_quant_method is a real ReplicatedLinear made without
LinearBase.__init__: that __init__ (and the weight Parameters create_weights makes)
asks for the tensor-parallel group, which needs a VllmConfig, whose validation
imports the engine (msgspec, ...), none of which the routing code touches. The
routing only looks at the layer's type (LinearBase / ParallelLMHead / FusedMoE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# target_venv lives beside the dynamic registry check (tests/checks, not a package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checks"))
from test_verify_dynamic import target_venv  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.slow]

O_PROJ = "model.layers.0.self_attn.o_proj"
DOWN_PROJ = "model.layers.0.mlp.down_proj"
MIGRATION = "INC quantization is not supported during xpu kernel migration."

# The routing cases: (name, platform, quantization_config overrides, layer prefix).
CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("gptq_sym4", "xpu", {"packing_format": "auto_round:auto_gptq", "sym": True}, O_PROJ),
    ("awq4", "xpu", {"packing_format": "auto_round:auto_awq", "sym": False}, O_PROJ),
    # AutoRound's default sym=True: AWQ packing still carries qzeros (all 8)
    ("awq4_sym", "xpu", {"packing_format": "auto_round:auto_awq", "sym": True}, O_PROJ),
    ("gptq_asym4", "xpu", {"packing_format": "auto_round:auto_gptq", "sym": False}, O_PROJ),
    ("gptq_8bit", "xpu", {"packing_format": "auto_round:auto_gptq", "bits": 8}, O_PROJ),
    ("awq_8bit", "xpu", {"packing_format": "auto_round:auto_awq", "bits": 8, "sym": False}, O_PROJ),
    # a 4-bit checkpoint with one 8-bit layer: the per-layer bits decide, not the global ones
    (
        "gptq_mixed_8bit_layer",
        "xpu",
        {"packing_format": "auto_round:auto_gptq", "extra_config": {DOWN_PROJ: {"bits": 8}}},
        DOWN_PROJ,
    ),
    # the patch is XPU-only: the CPU route is unchanged
    ("gptq_sym4_on_cpu", "cpu", {"packing_format": "auto_round:auto_gptq", "sym": True}, O_PROJ),
]

# What an AutoRound export writes into config.json's quantization_config (keys
# INCConfig.from_config does not read are part of the real thing and stay).
AUTOROUND_CONFIG: dict[str, Any] = {
    "quant_method": "auto-round",
    "autoround_version": "0.5.1",
    "bits": 4,
    "group_size": 128,
    "sym": True,
    "data_type": "int",
    "packing_format": "auto_round:auto_gptq",
    "iters": 200,
    "nsamples": 128,
    "seqlen": 2048,
    "enable_minmax_tuning": True,
    "enable_quanted_input": True,
}

SCRIPT = r"""
import json, sys, traceback
tree, cases_path, out_path = sys.argv[1:4]
sys.path.insert(0, tree)
import torch
import vllm
from vllm.platforms import current_platform
from vllm.model_executor.layers.linear import LinearBase, ReplicatedLinear
from vllm.model_executor.layers.quantization.inc import INCConfig

calls = []
def spy(name):
    real = getattr(INCConfig, name)
    def wrapper(self, layer, prefix, *args, **kwargs):
        calls.append([name, kwargs.get("backend", args[0] if args else None)])
        return real(self, layer, prefix, *args, **kwargs)
    setattr(INCConfig, name, wrapper)
for name in ("apply_gptq_quant_layer", "apply_awq_quant_layer", "apply_ipex_quant_layer"):
    spy(name)

def fake_platform(kind):
    # on the instance every module imported as `current_platform` (inc, marlin_utils, ...)
    current_platform.is_xpu = lambda: kind == "xpu"
    current_platform.is_cpu = lambda: kind == "cpu"
    current_platform.is_cuda = lambda: False
    current_platform.is_rocm = lambda: False

layer = ReplicatedLinear.__new__(ReplicatedLinear)
torch.nn.Module.__init__(layer)

results = {"vllm_file": vllm.__file__, "layer_is_linear_base": isinstance(layer, LinearBase),
           "cases": {}}
for name, platform, config, prefix in json.load(open(cases_path)):
    fake_platform(platform)
    calls.clear()
    res = {"method": None, "error": None}
    try:
        method = INCConfig.from_config(config).get_quant_method(layer, prefix)
        res["method"] = type(method).__module__ + "." + type(method).__qualname__
        qc = getattr(method, "quant_config", None)
        res["quant_type"] = str(getattr(qc, "quant_type", None))
        res["group_size"] = getattr(qc, "group_size", None)
        res["zero_point"] = getattr(qc, "zero_point", None)
    except Exception as e:
        res["error"] = {"type": type(e).__name__, "message": str(e),
                        "trace": traceback.format_exc()[-1500:]}
    res["calls"] = list(calls)
    results["cases"][name] = res
json.dump(results, open(out_path, "w"), indent=1)
"""


def _route(tree: Path, work: Path) -> dict[str, Any]:
    """Run every case against `tree` in the CPU venv; the JSON the subprocess wrote."""
    python = target_venv() / "bin" / "python"
    cases = [
        [name, platform, {**AUTOROUND_CONFIG, **over}, prefix]
        for name, platform, over, prefix in CASES
    ]
    (work / "cases.json").write_text(json.dumps(cases))
    (work / "route.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        PYTHONPATH=str(tree),
        HF_HUB_OFFLINE="1",
        VLLM_LOGGING_LEVEL="ERROR",
        VLLM_NO_USAGE_STATS="1",
    )
    proc = subprocess.run(
        [
            str(python),
            str(work / "route.py"),
            str(tree),
            str(work / "cases.json"),
            str(work / "out.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"routing script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    result: dict[str, Any] = json.loads((work / "out.json").read_text())
    # the tree under test was imported, not the vllm the venv may hold
    assert Path(result["vllm_file"]).resolve() == (tree / "vllm" / "__init__.py").resolve()
    assert result["layer_is_linear_base"]
    return result


@pytest.fixture(scope="module")
def patched_routes(patched_0190: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _route(patched_0190, tmp_path_factory.mktemp("route-patched"))["cases"]


@pytest.fixture(scope="module")
def pristine_routes(
    pristine_0190: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    return _route(pristine_0190, tmp_path_factory.mktemp("route-pristine"))["cases"]


def _ok(case: dict[str, Any]) -> str:
    assert case["error"] is None, case["error"]["trace"]
    return str(case["method"])


def test_gptq_sym_4bit_gets_the_gptq_marlin_method_on_xpu(patched_routes: dict[str, Any]) -> None:
    case = patched_routes["gptq_sym4"]
    assert _ok(case) == "vllm.model_executor.layers.quantization.gptq_marlin.GPTQMarlinLinearMethod"
    assert case["calls"] == [["apply_gptq_quant_layer", "xpu"]]
    assert case["quant_type"] == "uint4b8" and case["group_size"] == 128


def test_awq_4bit_gets_the_awq_marlin_method_on_xpu(patched_routes: dict[str, Any]) -> None:
    case = patched_routes["awq4"]
    assert _ok(case) == "vllm.model_executor.layers.quantization.awq_marlin.AWQMarlinLinearMethod"
    assert case["calls"] == [["apply_awq_quant_layer", "xpu"]]
    assert (
        case["quant_type"] == "uint4" and case["group_size"] == 128 and case["zero_point"] is True
    )


def test_awq_exported_symmetric_loads_its_zero_points_on_xpu(patched_routes: dict[str, Any]) -> None:
    case = patched_routes["awq4_sym"]
    assert _ok(case) == "vllm.model_executor.layers.quantization.awq_marlin.AWQMarlinLinearMethod"
    assert case["calls"] == [["apply_awq_quant_layer", "xpu"]]
    assert case["quant_type"] == "uint4" and case["zero_point"] is True


def test_asymmetric_gptq_raises_naming_the_layer(patched_routes: dict[str, Any]) -> None:
    case = patched_routes["gptq_asym4"]
    assert case["method"] is None
    assert case["error"]["type"] == "NotImplementedError"
    assert "symmetric quantization only" in case["error"]["message"]
    assert f"layer {O_PROJ} is asymmetric" in case["error"]["message"]
    assert ["apply_ipex_quant_layer", None] not in case["calls"]


@pytest.mark.parametrize("name", ["gptq_8bit", "awq_8bit"])
def test_8bit_raises_naming_the_bits(patched_routes: dict[str, Any], name: str) -> None:
    case = patched_routes[name]
    assert case["method"] is None
    assert case["error"]["type"] == "NotImplementedError"
    assert f"supports 4-bit weights only; layer {O_PROJ} has 8 bits" in case["error"]["message"]
    assert case["calls"] == []  # refused before any method is built


def test_the_layer_s_own_bits_decide(patched_routes: dict[str, Any]) -> None:
    case = patched_routes["gptq_mixed_8bit_layer"]
    assert case["error"]["type"] == "NotImplementedError"
    assert f"layer {DOWN_PROJ} has 8 bits" in case["error"]["message"]


def test_cpu_route_is_unchanged(
    patched_routes: dict[str, Any], pristine_routes: dict[str, Any]
) -> None:
    for routes in (patched_routes, pristine_routes):
        case = routes["gptq_sym4_on_cpu"]
        assert case["calls"] == [["apply_ipex_quant_layer", None]]
        assert case["error"]["message"] == MIGRATION


@pytest.mark.parametrize("name", [n for n, platform, _, _ in CASES if platform == "xpu"])
def test_pristine_xpu_goes_to_ipex_and_raises(pristine_routes: dict[str, Any], name: str) -> None:
    # what the patch fixes: every AutoRound layer on XPU dies in apply_ipex_quant_layer
    case = pristine_routes[name]
    assert case["calls"] == [["apply_ipex_quant_layer", None]]
    assert case["method"] is None
    assert case["error"]["type"] == "NotImplementedError"
    assert case["error"]["message"] == MIGRATION
