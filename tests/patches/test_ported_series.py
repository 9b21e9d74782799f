"""The series ported to vLLM 0.23.0 and 0.33.0 (patches/vllm/0.23.0, patches/vllm/0.33.0):
each patch's code run from the real release, patched and pristine.

- xpu-unified-memory-integrated-gpu: MemorySnapshot.measure (the release's own
  vllm/utils/mem_utils.py) on a faked XPU whose is_integrated_gpu is the one the
  release's platforms/xpu.py defines (or, pristine, the one it inherits from
  platforms/interface.py), with the release's vllm/envs.py.
- xpu-autoround-awq-moe (0.23.0) and xpu-autoround-awq-asym (0.33.0):
  INCConfig.get_quant_method on a faked XPU, the whole release imported (patched
  tree first on the path) in a CPU venv (torch 2.13.0 CPU linked in, transformers
  5.20.2, which both releases accept). The MoE layer carries a real FusedMoEConfig,
  so the upstream WNA16 MoE backend selection runs too."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import types
from collections import namedtuple
from pathlib import Path
from typing import Any

import fixtures
import psutil
import pytest
import torch
from _load import load_file

pytestmark = pytest.mark.network

PATCHES = Path(__file__).resolve().parents[2] / "patches" / "vllm"
# series order, as the recipes list them
SERIES = {
    "0.23.0": ("xpu-unified-memory-integrated-gpu.patch", "xpu-autoround-awq-moe.patch"),
    "0.33.0": ("xpu-unified-memory-integrated-gpu.patch", "xpu-autoround-awq-asym.patch"),
}
RELEASES = tuple(SERIES)

GiB = 1 << 30
DEVICE_FREE = 2 * GiB  # what the iGPU's own query reports (page cache left out)
DEVICE_TOTAL = 28 * GiB


def _apply(tree: Path, version: str) -> None:
    for name in SERIES[version]:
        subprocess.run(["git", "apply", "-p1", "--whitespace=nowarn", str(PATCHES / version / name)],
                       cwd=tree, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(version, "pristine" | "patched") -> a tree whose vllm/ is that release's package."""
    out: dict[tuple[str, str], Path] = {}
    for v in RELEASES:
        pristine = fixtures.vllm_tree(v)
        patched = tmp_path_factory.mktemp(f"vllm-{v}-ported")
        shutil.copytree(pristine / "vllm", patched / "vllm")
        _apply(patched, v)
        out[(v, "pristine")] = pristine
        out[(v, "patched")] = patched
    return out


NETWORK_FIXTURES = frozenset({"trees"})


# ---------------------------------------------------------------- unified memory

def _class_method(path: Path, cls: str, name: str, namespace: dict[str, Any]) -> Any | None:
    """Compile method `name` of class `cls` in `path` into `namespace` (decorators
    dropped); None when the class does not define it."""
    tree = ast.parse(path.read_text())
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    fn = next((n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if fn is None:
        return None
    fn.decorator_list = []
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def _snapshot(tree: Path, monkeypatch: pytest.MonkeyPatch, unified: str | None, available: int) -> Any:
    if unified is None:
        monkeypatch.delenv("VLLM_XPU_UNIFIED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("VLLM_XPU_UNIFIED_MEMORY", unified)
    envs = load_file(tree / "vllm/envs.py", f"stackbuild_test_envs_{abs(hash(str(tree)))}")
    ns: dict[str, Any] = {"envs": envs}
    # XPUPlatform's own is_integrated_gpu, else the one it inherits from Platform
    method = (_class_method(tree / "vllm/platforms/xpu.py", "XPUPlatform", "is_integrated_gpu", ns)
              or _class_method(tree / "vllm/platforms/interface.py", "Platform", "is_integrated_gpu", ns))
    assert method is not None

    class FakeXPU:
        is_integrated_gpu = classmethod(method)

        def is_xpu(self) -> bool:
            return True

        def is_cuda(self) -> bool:
            return False

        def current_device(self) -> int:
            return 0

        def mem_get_info(self, device: object) -> tuple[int, int]:
            return DEVICE_FREE, DEVICE_TOTAL

    vllm = types.ModuleType("vllm")
    vllm.__path__ = []  # type: ignore[attr-defined]
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = FakeXPU()  # type: ignore[attr-defined]
    utils = types.ModuleType("vllm.utils")
    utils.__path__ = [str(tree / "vllm" / "utils")]  # type: ignore[attr-defined]
    logger = types.ModuleType("vllm.logger")
    logger.init_logger = lambda name: __import__("logging").getLogger(name)  # type: ignore[attr-defined]
    vllm.envs = envs  # type: ignore[attr-defined]
    for name, mod in {"vllm": vllm, "vllm.platforms": platforms, "vllm.utils": utils,
                      "vllm.envs": envs, "vllm.logger": logger}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.accelerator, "memory_stats", lambda d=None: {}, raising=False)
    monkeypatch.setattr(torch.accelerator, "memory_reserved", lambda d=None: GiB, raising=False)
    monkeypatch.setattr(torch.accelerator, "get_memory_info", lambda d=None: (DEVICE_FREE, DEVICE_TOTAL),
                        raising=False)
    vm = namedtuple("vm", "available total")(available, 32 * GiB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm)
    mem_utils = load_file(tree / "vllm/utils/mem_utils.py", "vllm.utils.mem_utils")
    return mem_utils.MemorySnapshot(device="cpu")


@pytest.mark.parametrize("version", RELEASES)
def test_unified_memory_reports_available_system_memory(
    trees: dict[tuple[str, str], Path], monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    snap = _snapshot(trees[(version, "patched")], monkeypatch, "1", available=20 * GiB)
    assert snap.free_memory == 20 * GiB
    assert snap.cuda_memory == DEVICE_TOTAL - 20 * GiB


@pytest.mark.parametrize("unified", [None, "0"])
@pytest.mark.parametrize("version", RELEASES)
def test_unified_memory_off_keeps_the_device_query(
    trees: dict[tuple[str, str], Path], monkeypatch: pytest.MonkeyPatch, version: str, unified: str | None
) -> None:
    snap = _snapshot(trees[(version, "patched")], monkeypatch, unified, available=20 * GiB)
    assert snap.free_memory == DEVICE_FREE


@pytest.mark.parametrize("version", RELEASES)
def test_pristine_under_reports(
    trees: dict[tuple[str, str], Path], monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    # what the port fixes: XPUPlatform inherits is_integrated_gpu() -> False
    snap = _snapshot(trees[(version, "pristine")], monkeypatch, "1", available=20 * GiB)
    assert snap.free_memory == DEVICE_FREE


def _ignored_factors(envs_py: Path) -> set[str]:
    tree = ast.parse(envs_py.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compile_factors")
    for node in ast.walk(fn):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "ignored_factors":
            assert isinstance(node.value, ast.Set)
            return {ast.literal_eval(e) for e in node.value.elts}
    raise AssertionError("compile_factors has no ignored_factors set")


@pytest.mark.parametrize("version", RELEASES)
def test_env_var_registered_default_off_and_out_of_the_compile_hash(
    trees: dict[tuple[str, str], Path], monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    envs_py = trees[(version, "patched")] / "vllm/envs.py"
    monkeypatch.delenv("VLLM_XPU_UNIFIED_MEMORY", raising=False)
    envs = load_file(envs_py, f"stackbuild_test_envs_reg_{version.replace('.', '_')}")
    assert envs.VLLM_XPU_UNIFIED_MEMORY is False
    monkeypatch.setenv("VLLM_XPU_UNIFIED_MEMORY", "1")
    assert envs.VLLM_XPU_UNIFIED_MEMORY is True
    assert "VLLM_XPU_UNIFIED_MEMORY" in _ignored_factors(envs_py)
    pristine = load_file(trees[(version, "pristine")] / "vllm/envs.py", f"stackbuild_test_envs_pr_{version[2:4]}")
    with pytest.raises(AttributeError):
        pristine.VLLM_XPU_UNIFIED_MEMORY  # noqa: B018


# ---------------------------------------------------------------- AutoRound routing on XPU

# packages the releases import on the way to INCConfig, beside torch (linked) and these;
# xgrammar without its dependencies: it would bring a 1 GB triton the import never uses
RUNTIME = ["transformers==5.20.2", "psutil", "pyzmq", "urllib3", "cbor2", "gguf", "aiohttp", "pillow",
           "einops", "pybase64", "cachetools", "openai-harmony", "openai", "msgspec", "cloudpickle",
           "uvloop", "py-cpuinfo", "prometheus-client", "fastapi", "partial-json-parser", "llguidance",
           "apache-tvm-ffi", "compressed-tensors==0.17.0"]
NO_DEPS = ["xgrammar"]


def routing_venv() -> Path:
    """A CPU venv for importing vLLM 0.23.0 / 0.33.0 source trees, made once and cached."""
    import hashlib

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checks"))
    from test_verify_dynamic import _link_torch, _run

    key = hashlib.sha256("\n".join([sys.version, "torch-linked", *RUNTIME, "--no-deps", *NO_DEPS]).encode())
    venv = fixtures.test_cache_dir() / "venvs" / f"vllm-ported-cpu-{key.hexdigest()[:12]}"
    if (venv / ".complete").exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(venv)])
    _link_torch(venv)
    _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", *RUNTIME])
    _run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", *NO_DEPS])
    (venv / ".complete").write_text("\n".join(RUNTIME + NO_DEPS))
    return venv


O_PROJ = "model.layers.0.self_attn.o_proj"
EXPERTS = "model.layers.0.mlp.experts"

AUTOROUND: dict[str, Any] = {
    "quant_method": "auto-round", "autoround_version": "0.5.1", "bits": 4, "group_size": 128,
    "sym": True, "data_type": "int", "packing_format": "auto_round:auto_gptq", "iters": 200,
}
GPTQ_SYM = {"packing_format": "auto_round:auto_gptq", "sym": True}
GPTQ_ASYM = {"packing_format": "auto_round:auto_gptq", "sym": False}
AWQ_SYM = {"packing_format": "auto_round:auto_awq", "sym": True}
AWQ_ASYM = {"packing_format": "auto_round:auto_awq", "sym": False}
# (name, quantization_config overrides, layer kind)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("gptq_sym_linear", GPTQ_SYM, "linear"),
    ("gptq_asym_linear", GPTQ_ASYM, "linear"),
    ("awq_sym_linear", AWQ_SYM, "linear"),
    ("awq_asym_linear", AWQ_ASYM, "linear"),
    ("gptq_sym_moe", GPTQ_SYM, "moe"),
    ("gptq_asym_moe", GPTQ_ASYM, "moe"),
    ("awq_sym_moe", AWQ_SYM, "moe"),
]

# modules a release has (those it lacks are skipped) that the routing reaches
PREIMPORT = [
    "vllm.model_executor.layers.fused_moe.experts.xpu_moe",
    "vllm.model_executor.layers.fused_moe.oracle.int_wna16",
    "vllm.model_executor.layers.quantization.auto_gptq",
    "vllm.model_executor.layers.quantization.auto_awq",
    "vllm.model_executor.layers.quantization.awq_marlin",
    "vllm.model_executor.layers.quantization.moe_wna16",
    "vllm.model_executor.layers.quantization.inc.schemes.inc_wna16_linear",
    "vllm.model_executor.layers.quantization.inc.schemes.inc_wna16_moe",
    "vllm.model_executor.layers.quantization.inc.schemes.inc_ark_ops",
    "vllm.model_executor.layers.quantization.inc.schemes.inc_w4a8_linear",
    "vllm.model_executor.kernels.linear",
]

SCRIPT = "PREIMPORT = " + repr(PREIMPORT) + r"""
import dataclasses, json, sys, traceback
tree, cases_path, out_path = sys.argv[1:4]
sys.path.insert(0, tree)
import importlib
import torch
import vllm
from vllm.platforms import current_platform
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (
    FusedMoEConfig, FusedMoEParallelConfig, RoutingMethodType)
from vllm.model_executor.layers.quantization import get_quantization_config

INCConfig = get_quantization_config("inc")
# imported on the CPU platform: on XPU these modules import the kernel package
# (vllm_xpu_kernels), whose device code cannot load here; the routing only needs
# their classes
for name in PREIMPORT:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if not (e.name and name.startswith(e.name)):
            raise
# the platform is faked on the instance every module imported as `current_platform`
current_platform.is_xpu = lambda: True
current_platform.is_cpu = lambda: False
current_platform.is_cuda = lambda: False
current_platform.is_rocm = lambda: False
current_platform.is_cuda_alike = lambda: False

def linear():
    layer = ReplicatedLinear.__new__(ReplicatedLinear)
    torch.nn.Module.__init__(layer)
    return layer

def moe():
    layer = RoutedExperts.__new__(RoutedExperts)
    torch.nn.Module.__init__(layer)
    args = dict(
        num_experts=8, experts_per_token=2, hidden_dim=256, intermediate_size_per_partition=512,
        intermediate_size=512, num_local_experts=8, num_logical_experts=8,
        activation=MoEActivation.SILU, device="cpu", routing_method=RoutingMethodType.Renormalize,
        moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=torch.bfloat16)
    known = {f.name for f in dataclasses.fields(FusedMoEConfig)}  # 0.33.0 added intermediate_size
    layer.moe_config = FusedMoEConfig(**{k: v for k, v in args.items() if k in known})
    return layer

def describe(obj, depth=0):
    d = {"type": type(obj).__module__ + "." + type(obj).__qualname__}
    qc = getattr(obj, "quant_config", None)
    if qc is not None:
        d["zero_point"] = getattr(qc, "zero_point", None)
        d["quant_type"] = str(getattr(qc, "quant_type", None))
    for attr in ("wna16_moe_backend", "experts_cls"):
        if hasattr(obj, attr):
            v = getattr(obj, attr)
            d[attr] = getattr(v, "__name__", None) or getattr(v, "value", None) or str(v)
    for attr in ("scheme", "linear_method"):
        if depth < 3 and getattr(obj, attr, None) is not None:
            d[attr] = describe(getattr(obj, attr), depth + 1)
    return d

results = {"vllm_file": vllm.__file__, "cases": {}}
for name, config, kind in json.load(open(cases_path)):
    res = {"method": None, "error": None}
    try:
        method = INCConfig.from_config(config).get_quant_method(linear() if kind == "linear" else moe(),
                                                               "model.layers.0.self_attn.o_proj"
                                                               if kind == "linear" else
                                                               "model.layers.0.mlp.experts")
        res["method"] = None if method is None else describe(method)
    except Exception as e:
        res["error"] = {"type": type(e).__name__, "message": str(e), "trace": traceback.format_exc()[-2000:]}
    results["cases"][name] = res
json.dump(results, open(out_path, "w"), indent=1)
"""


def _route(tree: Path, work: Path) -> dict[str, Any]:
    python = routing_venv() / "bin" / "python"
    (work / "cases.json").write_text(json.dumps([[n, {**AUTOROUND, **over}, kind] for n, over, kind in CASES]))
    (work / "route.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="ERROR", VLLM_NO_USAGE_STATS="1")
    proc = subprocess.run([str(python), str(work / "route.py"), str(tree), str(work / "cases.json"),
                           str(work / "out.json")], capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert proc.returncode == 0, f"routing script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads((work / "out.json").read_text())
    assert Path(result["vllm_file"]).resolve() == (tree / "vllm" / "__init__.py").resolve()
    return result["cases"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def routes(trees: dict[tuple[str, str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Any]:
    return {key: _route(tree, tmp_path_factory.mktemp(f"route-{key[0]}-{key[1]}")) for key, tree in trees.items()}


def _outcome(case: dict[str, Any]) -> tuple[Any, ...]:
    """What a route decided, without the traceback (its line numbers move with a patch)."""
    err = case["error"]
    return case["method"], err and (err["type"], err["message"])


def _method(case: dict[str, Any]) -> dict[str, Any]:
    assert case["error"] is None, case["error"]["trace"]
    assert case["method"] is not None
    return case["method"]  # type: ignore[no-any-return]


Q = "vllm.model_executor.layers.quantization"


@pytest.mark.slow
def test_0230_moe_layers_get_the_gptq_moe_method_with_the_xpu_experts(routes: dict[tuple[str, str], Any]) -> None:
    m = _method(routes[("0.23.0", "patched")]["gptq_sym_moe"])
    assert m["type"] == f"{Q}.auto_gptq.AutoGPTQMoEMethod"
    assert m["wna16_moe_backend"] == "XPU" and m["experts_cls"] == "XPUExpertsWNA16"
    # pristine: INC returns no method for MoE layers on XPU
    assert routes[("0.23.0", "pristine")]["gptq_sym_moe"] == {"method": None, "error": None}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "what"), [("gptq_asym_moe", "asymmetric"), ("awq_sym_moe", "AWQ-packed")])
def test_0230_moe_layers_the_xpu_experts_cannot_take_raise_naming_the_layer(
    routes: dict[tuple[str, str], Any], name: str, what: str
) -> None:
    case = routes[("0.23.0", "patched")][name]
    assert case["error"]["type"] == "NotImplementedError"
    assert f"layer {EXPERTS} is {what}" in case["error"]["message"]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "zero_point"), [("awq_sym_linear", False), ("awq_asym_linear", True)])
def test_0230_awq_linear_gets_the_awq_method(
    routes: dict[tuple[str, str], Any], name: str, zero_point: bool
) -> None:
    m = _method(routes[("0.23.0", "patched")][name])
    assert m["type"] == f"{Q}.awq_marlin.AWQMarlinLinearMethod"
    assert m["zero_point"] is zero_point
    # pristine: the GPTQ-layout INC method (sym) or a refusal (asym)
    pristine = routes[("0.23.0", "pristine")][name]
    assert pristine["method"] is None or pristine["method"]["type"] != m["type"]


@pytest.mark.slow
def test_0230_gptq_linear_keeps_upstream_s_route(routes: dict[tuple[str, str], Any]) -> None:
    for case in ("gptq_sym_linear", "gptq_asym_linear"):
        assert _outcome(routes[("0.23.0", "patched")][case]) == _outcome(routes[("0.23.0", "pristine")][case])
    assert _method(routes[("0.23.0", "patched")]["gptq_sym_linear"])["type"].startswith(f"{Q}.inc.INC")


@pytest.mark.slow
def test_0330_asymmetric_awq_linear_gets_the_awq_method_with_zero_points(
    routes: dict[tuple[str, str], Any]
) -> None:
    m = _method(routes[("0.33.0", "patched")]["awq_asym_linear"])
    assert m["type"] == f"{Q}.inc.inc_linear.INCLinearMethod"
    inner = m["scheme"]["linear_method"]
    assert inner["type"] == f"{Q}.auto_awq.AutoAWQMarlinLinearMethod" and inner["zero_point"] is True
    pristine = routes[("0.33.0", "pristine")]["awq_asym_linear"]
    assert pristine["method"] is None
    assert pristine["error"]["message"].startswith("INC on XPU: unsupported config")


@pytest.mark.slow
def test_0330_everything_else_keeps_upstream_s_route(routes: dict[tuple[str, str], Any]) -> None:
    for name, _, _ in CASES:
        if name != "awq_asym_linear":
            assert _outcome(routes[("0.33.0", "patched")][name]) == _outcome(routes[("0.33.0", "pristine")][name]), name
    # upstream 0.33.0 already routes symmetric AutoRound MoE on XPU to the XPU experts
    m = _method(routes[("0.33.0", "pristine")]["gptq_sym_moe"])
    assert "XPUExpertsWNA16" in json.dumps(m)
