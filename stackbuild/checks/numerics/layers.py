"""The `layers` suite: the PATCHED vLLM quantization methods on emulated XPU kernels.

Runs inside the interpreter under test, with the applied vLLM tree importable:

    python -m stackbuild.checks.numerics.layers '{"tree": ..., "kernels": "0.1.5", ...}'

For each case it
  1. writes a throw-away vllm_xpu_kernels package at the case's kernel version
     (kernelpkg.py; ops -> emulators.py) and puts it first on sys.path,
  2. fakes the XPU platform on vLLM's current_platform instance (as vLLM's own modules
     read it: is_xpu, _enum, get_device_capability),
  3. builds the layer through vLLM: a ReplicatedLinear with GPTQMarlinConfig or
     AWQMarlinConfig (the kernel class is chosen by vLLM's choose_mp_linear_kernel), or,
     for MoE, the method object (GPTQMarlinMoEMethod, UnquantizedFusedMoEMethod,
     Fp8MoEMethod) with create_weights on a module that carries the attributes a
     FusedMoE layer gives those methods (a FusedMoE itself needs a validated VllmConfig,
     which imports the engine: msgspec, ...),
  4. loads a seeded checkpoint through the parameters' own weight_loader (linear) or by
     copying into the created parameters (MoE: FusedMoE.weight_loader needs a FusedMoE),
  5. calls process_weights_after_loading and apply, and
  6. compares with an fp64 reference made from the checkpoint tensors directly
     (GPTQ: w[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]).

A case passes when rel = ||y - ref|| / ||ref|| <= 5e-3 (fp16 output of an fp64 product
gives ~3e-4), or, for a case that declares an expected refusal, when the patched code
raises that error. Negative controls plant a kernel bug (emulators.PLANT) and must fail.
One JSON object on the last stdout line.
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time
import traceback
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REL_LIMIT = 5e-3


@dataclass(frozen=True)
class LayerCase:
    name: str
    method: str  # gptq-linear | awq-linear | ct-linear | gptq-moe | awq-moe | ct-moe | unquantized-moe | fp8-moe
    k: int  # input dim (hidden size for MoE)
    n: int  # output dim (intermediate size per partition for MoE)
    group_size: int
    kernels: str = ""  # "": the version the recipe pins (main's "kernels" argument)
    act_order: bool = False
    sym: bool = True  # ct-linear: symmetric (zero point 8) or with zero points
    experts: int = 0
    topk: int = 0
    m: int = 7  # tokens
    refusal: str = ""  # a substring of the clear error the patched code must raise instead
    seed: int = 0


DEFAULT_CASES: tuple[LayerCase, ...] = (
    LayerCase("gptq-sym-g128", "gptq-linear", 256, 192, 128),
    LayerCase("gptq-sym-g32", "gptq-linear", 128, 320, 32),
    LayerCase("gptq-actorder-g64", "gptq-linear", 256, 192, 64, act_order=True),
    LayerCase("gptq-actorder-g128", "gptq-linear", 384, 128, 128, act_order=True),
    LayerCase("awq-asym-g128", "awq-linear", 256, 192, 128),
    LayerCase("awq-asym-g64", "awq-linear", 128, 256, 64),
    LayerCase("ct-asym-g128", "ct-linear", 256, 192, 128, sym=False),
    LayerCase("ct-actorder-asym-g64", "ct-linear", 256, 128, 64, act_order=True, sym=False),
    LayerCase("ct-actorder-sym-g32", "ct-linear", 128, 96, 32, act_order=True),
    LayerCase("gptq-moe-e4-top2-g64", "gptq-moe", 128, 64, 64, experts=4, topk=2),
    LayerCase("gptq-moe-e3-top1-g32", "gptq-moe", 64, 96, 32, experts=3, topk=1),
    LayerCase("gptq-moe-actorder-refused", "gptq-moe", 128, 64, 64, act_order=True, experts=3, topk=2,
              refusal="without act-order"),
    LayerCase("ct-moe-e3-top2-g32", "ct-moe", 128, 64, 32, experts=3, topk=2),
    # AWQ MoE: the fused MoE has a fixed zero point 8; the patch folds zero points into
    # the weights where that is lossless and refuses otherwise
    LayerCase("awq-moe-z8-e3-top2-g64", "awq-moe", 128, 64, 64, experts=3, topk=2),
    LayerCase("awq-moe-asym-refused", "awq-moe", 128, 64, 64, experts=3, topk=2, sym=False,
              refusal="cannot be re-centred to zero point 8"),
    LayerCase("bf16-moe-e4-top2", "unquantized-moe", 128, 64, 0, experts=4, topk=2),
    LayerCase("fp8-moe-e3-top2", "fp8-moe", 96, 64, 0, experts=3, topk=2),
    LayerCase(
        "gptq-moe-kernels-0.1.16",
        "gptq-moe",
        128,
        64,
        64,
        kernels="0.1.16.2",
        experts=4,
        topk=2,
        refusal="vllm-xpu-kernels 0.1.16.2",
    ),
)

# (control, case it plants its bug into)
CONTROLS: tuple[tuple[str, str], ...] = (
    ("fp4-decode", "gptq-sym-g128"),
    ("skipped-transpose", "gptq-sym-g128"),
    ("zp-0", "awq-asym-g128"),
    ("fp4-decode", "gptq-moe-e4-top2-g64"),
    ("skipped-transpose", "gptq-moe-e4-top2-g64"),
)


@dataclass
class CaseResult:
    case: str
    kernels: str
    status: str  # pass | fail | skipped
    detail: str = ""
    max_abs: float | None = None
    rel: float | None = None
    control: str = ""
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


# -- environment ---------------------------------------------------------------------


class Harness:
    """One vLLM import, one faked platform, one TP group; kernel packages per version."""

    def __init__(self, tree: str, work: Path, kernels: str = "0.1.5") -> None:
        self.work = work
        self.kernels = kernels
        self.packages: dict[str, Path] = {}
        sys.path.insert(0, tree)
        import torch

        self.torch = torch
        torch.manual_seed(0)
        self._use_kernels(kernels)
        from vllm.platforms import PlatformEnum, current_platform

        # what vLLM's modules ask the platform instance (current_platform is shared)
        current_platform.is_xpu = lambda: True
        current_platform.is_cpu = lambda: False
        current_platform.is_cuda = lambda: False
        current_platform.is_rocm = lambda: False
        current_platform.is_cuda_alike = lambda: False
        current_platform._enum = PlatformEnum.XPU
        current_platform.get_device_capability = lambda device_id=0: None
        # XPUPlatform.num_compute_units reads torch.xpu device properties (Arc B580: 160)
        current_platform.num_compute_units = lambda device_id=0: 160
        import vllm

        self.vllm_file = vllm.__file__
        from vllm.distributed import parallel_state as ps

        port = 20000 + (hash(str(work)) % 20000)
        ps.init_distributed_environment(
            world_size=1,
            rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            local_rank=0,
            backend="gloo",
        )
        # initialize_model_parallel asks for a VllmConfig (which imports the engine)
        ps._TP = ps.init_model_parallel_group([[0]], 0, "gloo", group_name="tp")
        # CustomOp (the unquantized MoE method is one) reads the current config's
        # compilation_config; a VllmConfig cannot be validated without the engine
        # (msgspec, ...), so the current one holds only a CompilationConfig with
        # custom_ops ["all"] (what VllmConfig sets without inductor: eager custom ops).
        import vllm.config.vllm as vllm_config_mod
        from vllm.config import CompilationConfig

        cfg = object.__new__(vllm_config_mod.VllmConfig)
        object.__setattr__(cfg, "compilation_config", CompilationConfig(custom_ops=["all"]))
        vllm_config_mod._current_vllm_config = cfg
        vllm_config_mod.get_cached_compilation_config.cache_clear()
        # the model runner does this once per worker; the modular MoE kernel needs it
        from vllm.v1.worker.workspace import init_workspace_manager

        init_workspace_manager(torch.device("cpu"))

    def _use_kernels(self, version: str) -> None:
        from stackbuild.checks.numerics.kernelpkg import write_kernel_package

        if version not in self.packages:
            self.packages[version] = write_kernel_package(self.work / f"k-{version}", version)
        for p in self.packages.values():
            if str(p) in sys.path:
                sys.path.remove(str(p))
        sys.path.insert(0, str(self.packages[version]))
        ops_modules = ("vllm_xpu_kernels._C", "vllm_xpu_kernels._xpu_C", "vllm_xpu_kernels._moe_C")
        for mod in [m for m in sys.modules if m == "vllm_xpu_kernels" or m.startswith("vllm_xpu_kernels.")]:
            if mod not in ops_modules:  # op registrations live once per process
                del sys.modules[mod]
        importlib.invalidate_caches()
        for mod in ops_modules:  # what vllm/platforms/xpu.py imports
            if mod not in sys.modules:
                importlib.import_module(mod)

    # -- checkpoints -------------------------------------------------------------

    def gptq_checkpoint(self, k: int, n: int, g: int, act_order: bool, gen: Any) -> dict[str, Any]:
        torch = self.torch
        q = torch.randint(0, 16, (k, n), generator=gen)
        groups = k // g
        scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).to(torch.float16)
        if act_order:
            g_idx = (torch.randperm(k, generator=gen) // g).to(torch.int32)
        else:
            g_idx = (torch.arange(k) // g).to(torch.int32)
        zeros = torch.full((groups, n), 8)
        return {
            "q": q,
            "scales": scales,
            "g_idx": g_idx,
            "zeros": zeros,
            "qweight": _pack_rows(torch, q),
            "qzeros": _pack_cols(torch, zeros - 1, range(8)),  # GPTQ v1 stores z - 1
        }

    def reference(self, x: Any, ck: dict[str, Any]) -> Any:
        torch = self.torch
        gi = ck["g_idx"].to(torch.int64)
        w = (ck["q"].double() - ck["zeros"].double()[gi]) * ck["scales"].double()[gi]
        return x.double() @ w

    # -- cases -------------------------------------------------------------------

    def run_linear(self, case: LayerCase, gen: Any) -> tuple[Any, Any]:
        torch = self.torch
        from vllm.model_executor.layers.linear import ReplicatedLinear

        prefix = "model.layers.0.mlp.down_proj"
        k, n, g = case.k, case.n, case.group_size
        if case.method == "gptq-linear":
            from vllm.model_executor.layers.quantization.gptq_marlin import GPTQMarlinConfig

            qc: Any = GPTQMarlinConfig.from_config(
                {
                    "bits": 4,
                    "group_size": g,
                    "desc_act": case.act_order,
                    "sym": True,
                    "lm_head": False,
                    "modules_in_block_to_quantize": ["mlp.down_proj"],
                }
            )
            ck = self.gptq_checkpoint(k, n, g, case.act_order, gen)
            tensors = {"qweight": ck["qweight"], "scales": ck["scales"], "qzeros": ck["qzeros"], "g_idx": ck["g_idx"]}
        elif case.method == "ct-linear":
            from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
                CompressedTensorsConfig,
            )

            weights = {
                "num_bits": 4,
                "type": "int",
                "symmetric": case.sym,
                "strategy": "group",
                "group_size": g,
                "dynamic": False,
                "actorder": "group" if case.act_order else None,
            }
            qc = CompressedTensorsConfig.from_config(
                {
                    "quant_method": "compressed-tensors",
                    "format": "pack-quantized",
                    "config_groups": {"group_0": {"targets": ["re:.*down_proj"], "weights": weights}},
                    "ignore": [],
                }
            )
            ck = self.gptq_checkpoint(k, n, g, case.act_order, gen)
            if not case.sym:
                ck["zeros"] = torch.randint(0, 16, (k // g, n), generator=gen)
            # compressed-tensors pack-quantized: [N, K/8] packed along K, scales [N, K/G],
            # zero points [N/8, K/G] packed along N (all unsigned, w = (q - z) * s)
            tensors = {
                "weight_packed": _pack_cols(torch, ck["q"].t(), range(8)),
                "weight_scale": ck["scales"].t().contiguous(),
                "weight_shape": torch.tensor([n, k]),
            }
            if not case.sym:
                tensors["weight_zero_point"] = _pack_rows(torch, ck["zeros"].t())
            if case.act_order:
                tensors["weight_g_idx"] = ck["g_idx"]
        else:
            from vllm.model_executor.layers.quantization.awq_marlin import AWQMarlinConfig

            qc = AWQMarlinConfig.from_config({"bits": 4, "group_size": g, "zero_point": True, "lm_head": False})
            ck = self.gptq_checkpoint(k, n, g, False, gen)
            ck["zeros"] = torch.randint(0, 16, (k // g, n), generator=gen)
            awq = (0, 2, 4, 6, 1, 3, 5, 7)
            tensors = {
                "qweight": _pack_cols(torch, ck["q"], awq),
                "qzeros": _pack_cols(torch, ck["zeros"], awq),
                "scales": ck["scales"],
            }
        layer = ReplicatedLinear(k, n, bias=False, quant_config=qc, params_dtype=torch.float16, prefix=prefix)
        params = dict(layer.named_parameters())
        for name, t in tensors.items():
            if name not in params:
                raise RuntimeError(f"the layer has no parameter {name} (has {sorted(params)})")
            p = params[name]
            p.weight_loader(p, t)  # the parameter's own loader, as DefaultModelLoader calls it
        layer.quant_method.process_weights_after_loading(layer)
        x = (torch.randn(case.m, k, generator=gen)).to(torch.float16)
        y = layer.quant_method.apply(layer, x)
        return y, self.reference(x, ck)

    def moe_config(self, case: LayerCase, dtype: Any) -> Any:
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation
        from vllm.model_executor.layers.fused_moe.config import (
            FusedMoEConfig,
            FusedMoEParallelConfig,
            RoutingMethodType,
        )

        return FusedMoEConfig(
            num_experts=case.experts,
            experts_per_token=case.topk,
            hidden_dim=case.k,
            intermediate_size_per_partition=case.n,
            num_local_experts=case.experts,
            num_logical_experts=case.experts,
            activation=MoEActivation.SILU,
            device="cpu",
            routing_method=RoutingMethodType.TopK,
            moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
            in_dtype=dtype,
        )

    def routing(self, case: LayerCase, gen: Any) -> tuple[Any, Any]:
        torch = self.torch
        logits = torch.randn(case.m, case.experts, generator=gen)
        topk_w, topk_ids = torch.topk(torch.softmax(logits, -1), case.topk, dim=-1)
        return topk_w.to(torch.float32), topk_ids.to(torch.int32)

    def moe_reference(self, x: Any, topk_w: Any, topk_ids: Any, w13: Any, w2: Any) -> Any:
        """Per token: sum over its experts of weight * (silu(x W1^T) * (x W3^T)) W2^T, with
        w13 [E, 2I, H] (gate rows first) and w2 [E, H, I] as float64."""
        torch = self.torch
        inter = w2.shape[-1]
        ref = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
        for t in range(x.shape[0]):
            for j in range(topk_ids.shape[1]):
                ex = int(topk_ids[t, j])
                a = x[t].double() @ w13[ex].t()
                act = torch.nn.functional.silu(a[:inter]) * a[inter:]
                ref[t] += float(topk_w[t, j]) * (act @ w2[ex].t())
        return ref

    def run_unquantized_moe(self, case: LayerCase, gen: Any) -> tuple[Any, Any]:
        """UnquantizedFusedMoEMethod (bf16): vLLM's modular kernel -> XPUExperts ->
        vllm_xpu_kernels.fused_moe_interface.xpu_fused_moe."""
        torch = self.torch
        from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
            UnquantizedFusedMoEMethod,
        )

        self._bind_xpu_experts()
        e, h, inter = case.experts, case.k, case.n
        moe = self.moe_config(case, torch.bfloat16)
        method = UnquantizedFusedMoEMethod(moe)
        layer = self._moe_layer(case, moe)
        method.create_weights(layer, e, h, inter, torch.bfloat16, weight_loader=None)
        w13 = (torch.randn(e, 2 * inter, h, generator=gen) / 8).to(torch.bfloat16)
        w2 = (torch.randn(e, h, inter, generator=gen) / 8).to(torch.bfloat16)
        with torch.no_grad():
            layer.w13_weight.copy_(w13)
            layer.w2_weight.copy_(w2)
        method.process_weights_after_loading(layer)
        x = (torch.randn(case.m, h, generator=gen) / 2).to(torch.bfloat16)
        topk_w, topk_ids = self.routing(case, gen)
        y = method.apply(layer, x, topk_w, topk_ids, None)
        return y, self.moe_reference(x, topk_w, topk_ids, w13.double(), w2.double())

    def _bind_xpu_experts(self) -> None:
        import vllm.model_executor.layers.fused_moe as fused_moe_pkg
        from vllm.model_executor.layers.fused_moe import xpu_fused_moe

        # fused_moe/__init__.py exports XPUExperts only under `if HAS_TRITON:`; an XPU
        # host has triton-xpu, this CPU venv has no triton: bind what that branch binds
        for name in ("XPUExperts", "XPUExpertsFp8"):
            if not hasattr(fused_moe_pkg, name):
                setattr(fused_moe_pkg, name, getattr(xpu_fused_moe, name))

    def _moe_layer(self, case: LayerCase, moe: Any) -> Any:
        """The attributes of a FusedMoE layer the MoE methods read."""
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation

        layer: Any = self.torch.nn.Module()
        layer.moe_config = moe
        layer.activation = MoEActivation.SILU
        layer.apply_router_weight_on_input = False
        layer.global_num_experts = case.experts
        layer.local_num_experts = case.experts
        layer.intermediate_size_per_partition = case.n
        layer.expert_map = None
        layer.moe_parallel_config = moe.moe_parallel_config
        layer.expert_placement_strategy = "linear"
        layer.shared_experts = None
        from vllm.model_executor.layers.fused_moe.layer import FusedMoE

        # FusedMoE's own method (no EP: no routing tables), bound to this layer
        layer._maybe_init_expert_routing_tables = types.MethodType(
            FusedMoE._maybe_init_expert_routing_tables, layer
        )
        return layer

    def run_fp8_moe(self, case: LayerCase, gen: Any) -> tuple[Any, Any]:
        """Fp8MoEMethod (per-tensor FP8 weights, dynamic activations): the FP8 MoE oracle
        -> XPUExpertsFp8 -> xpu_fused_moe(is_fp8=True)."""
        torch = self.torch
        from vllm.model_executor.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod

        self._bind_xpu_experts()
        e, h, inter = case.experts, case.k, case.n
        moe = self.moe_config(case, torch.bfloat16)
        layer = self._moe_layer(case, moe)
        qc = Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic")
        method = Fp8MoEMethod(qc, layer)
        method.create_weights(layer, e, h, inter, torch.bfloat16, weight_loader=None)
        w13 = (torch.randn(e, 2 * inter, h, generator=gen) * 4).to(torch.float8_e4m3fn)
        w2 = (torch.randn(e, h, inter, generator=gen) * 4).to(torch.float8_e4m3fn)
        s13 = torch.rand(e, generator=gen) * 0.02 + 0.01  # one scale for w1 and w3: no requantisation
        s2 = torch.rand(e, generator=gen) * 0.02 + 0.01
        with torch.no_grad():
            layer.w13_weight.copy_(w13)
            layer.w2_weight.copy_(w2)
            layer.w13_weight_scale.copy_(s13[:, None].expand(e, 2))
            layer.w2_weight_scale.copy_(s2)
        method.process_weights_after_loading(layer)
        x = (torch.randn(case.m, h, generator=gen) / 2).to(torch.bfloat16)
        topk_w, topk_ids = self.routing(case, gen)
        y = method.apply(layer, x, topk_w, topk_ids, None)
        ref13 = w13.double() * s13.double()[:, None, None]
        ref2 = w2.double() * s2.double()[:, None, None]
        return y, self.moe_reference(x, topk_w, topk_ids, ref13, ref2)

    def dequant(self, ck: dict[str, Any]) -> Any:
        """The checkpoint's weight [K, N] in float64 (GPTQ definition)."""
        torch = self.torch
        gi = ck["g_idx"].to(torch.int64)
        return (ck["q"].double() - ck["zeros"].double()[gi]) * ck["scales"].double()[gi]

    def run_awq_moe(self, case: LayerCase, gen: Any) -> tuple[Any, Any]:
        """AWQMarlinMoEMethod: AWQ checkpoint (packed along N in AWQ order, zero points)."""
        torch = self.torch
        from vllm.model_executor.layers.quantization.awq_marlin import (
            AWQMarlinConfig,
            AWQMarlinMoEMethod,
        )

        e, h, inter, g = case.experts, case.k, case.n, case.group_size
        qc = AWQMarlinConfig.from_config({"bits": 4, "group_size": g, "zero_point": True, "lm_head": False})
        moe = self.moe_config(case, torch.float16)
        method = AWQMarlinMoEMethod(qc, moe)
        layer = self._moe_layer(case, moe)
        method.create_weights(layer, e, h, inter, torch.float16, intermediate_size_full=inter, weight_loader=None)
        w13 = [self.gptq_checkpoint(h, 2 * inter, g, False, gen) for _ in range(e)]
        w2 = [self.gptq_checkpoint(inter, h, g, False, gen) for _ in range(e)]
        if not case.sym:
            for ck in w13 + w2:
                ck["zeros"] = torch.randint(0, 16, ck["zeros"].shape, generator=gen)
        awq = (0, 2, 4, 6, 1, 3, 5, 7)
        with torch.no_grad():
            for name, cks in (("w13", w13), ("w2", w2)):
                getattr(layer, f"{name}_qweight").copy_(torch.stack([_pack_cols(torch, c["q"], awq) for c in cks]))
                getattr(layer, f"{name}_qzeros").copy_(torch.stack([_pack_cols(torch, c["zeros"], awq) for c in cks]))
                getattr(layer, f"{name}_scales").copy_(torch.stack([c["scales"] for c in cks]))
        return self._int4_moe_forward(method, layer, case, gen, w13, w2)

    def _int4_moe_forward(self, method: Any, layer: Any, case: LayerCase, gen: Any,
                          w13: list[dict[str, Any]], w2: list[dict[str, Any]]) -> tuple[Any, Any]:
        """The shared end of the INT4 MoE cases: load-time processing, one forward through
        the method, and the fp64 reference from the per-expert checkpoints."""
        torch = self.torch
        method.process_weights_after_loading(layer)
        x = torch.randn(case.m, case.k, generator=gen).to(torch.float16)
        topk_w, topk_ids = self.routing(case, gen)
        y = method.apply(layer, x, topk_w, topk_ids, None)
        ref13 = torch.stack([self.dequant(c).t() for c in w13])
        ref2 = torch.stack([self.dequant(c).t() for c in w2])
        return y, self.moe_reference(x, topk_w, topk_ids, ref13, ref2)

    def run_ct_moe(self, case: LayerCase, gen: Any) -> tuple[Any, Any]:
        """CompressedTensorsWNA16MarlinMoEMethod (pack-quantized, symmetric, group). The
        per-expert checkpoint tensors (weight_packed [N, K/8], weight_scale [N, K/G]) go
        in as FusedMoE.weight_loader puts them for this method: transposed, because its
        parameters are `is_transposed` (vLLM 0.19.0 fused_moe/layer.py:1059-1073)."""
        torch = self.torch
        from compressed_tensors.quantization import QuantizationArgs
        from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
            CompressedTensorsWNA16MarlinMoEMethod,
        )

        e, h, inter, g = case.experts, case.k, case.n, case.group_size
        wq = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=g)
        moe = self.moe_config(case, torch.float16)
        method = CompressedTensorsWNA16MarlinMoEMethod(wq, None, moe)
        layer = self._moe_layer(case, moe)
        method.create_weights(layer, e, h, inter, torch.float16, intermediate_size_full=inter, weight_loader=None)
        w13 = [self.gptq_checkpoint(h, 2 * inter, g, False, gen) for _ in range(e)]
        w2 = [self.gptq_checkpoint(inter, h, g, False, gen) for _ in range(e)]
        with torch.no_grad():
            for name, cks in (("w13", w13), ("w2", w2)):
                param = getattr(layer, f"{name}_weight_packed")
                if not getattr(param, "is_transposed", False):
                    raise RuntimeError(f"{name}_weight_packed is not is_transposed: the loader would not flip it")
                # checkpoint [N, K/8] packed along K; the loader stores its transpose
                param.copy_(torch.stack([_pack_cols(torch, c["q"].t(), range(8)).t() for c in cks]))
                getattr(layer, f"{name}_weight_scale").copy_(torch.stack([c["scales"] for c in cks]))
        return self._int4_moe_forward(method, layer, case, gen, w13, w2)

    def run_moe(self, case: LayerCase, gen: Any) -> tuple[Any, Any]:
        torch = self.torch
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation
        from vllm.model_executor.layers.fused_moe.config import (
            FusedMoEConfig,
            FusedMoEParallelConfig,
            RoutingMethodType,
        )
        from vllm.model_executor.layers.quantization.gptq_marlin import (
            GPTQMarlinConfig,
            GPTQMarlinMoEMethod,
        )

        e, h, inter, g = case.experts, case.k, case.n, case.group_size
        qc = GPTQMarlinConfig.from_config(
            {"bits": 4, "group_size": g, "desc_act": case.act_order, "sym": True, "lm_head": False}
        )
        moe = FusedMoEConfig(
            num_experts=e,
            experts_per_token=case.topk,
            hidden_dim=h,
            intermediate_size_per_partition=inter,
            num_local_experts=e,
            num_logical_experts=e,
            activation=MoEActivation.SILU,
            device="cpu",
            routing_method=RoutingMethodType.TopK,
            moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(),
            in_dtype=torch.float16,
        )
        method = GPTQMarlinMoEMethod(qc, moe)
        layer = torch.nn.Module()
        layer.activation = MoEActivation.SILU
        method.create_weights(
            layer, e, h, inter, torch.float16, intermediate_size_full=inter, weight_loader=None
        )
        w13 = [self.gptq_checkpoint(h, 2 * inter, g, False, gen) for _ in range(e)]
        w2 = [self.gptq_checkpoint(inter, h, g, False, gen) for _ in range(e)]
        with torch.no_grad():
            layer.w13_qweight.copy_(torch.stack([c["qweight"] for c in w13]))
            layer.w2_qweight.copy_(torch.stack([c["qweight"] for c in w2]))
            layer.w13_scales.copy_(torch.stack([c["scales"] for c in w13]))
            layer.w2_scales.copy_(torch.stack([c["scales"] for c in w2]))
        method.process_weights_after_loading(layer)
        x = torch.randn(case.m, h, generator=gen).to(torch.float16)
        logits = torch.randn(case.m, e, generator=gen)
        topk_w, topk_ids = torch.topk(torch.softmax(logits, -1), case.topk, dim=-1)
        y = method.apply(layer, x, topk_w.to(torch.float32), topk_ids.to(torch.int32), None)
        # reference: per token, sum over its experts of w * (silu(x W1) * (x W3)) W2
        ref = torch.zeros(case.m, h, dtype=torch.float64)
        for t in range(case.m):
            for j in range(case.topk):
                ex = int(topk_ids[t, j])
                a = self.reference(x[t : t + 1], w13[ex])
                act = torch.nn.functional.silu(a[:, :inter]) * a[:, inter:]
                ref[t] += float(topk_w[t, j]) * self.reference(act, w2[ex])[0]
        return y, ref

    def run(self, case: LayerCase, control: str = "") -> CaseResult:
        torch = self.torch
        from stackbuild.checks.numerics import emulators

        t0 = time.perf_counter()
        case = replace(case, kernels=case.kernels or self.kernels)
        self._use_kernels(case.kernels)
        emulators.PLANT = control or None
        gen = torch.Generator().manual_seed(1000 + case.seed)
        res = CaseResult(case.name, case.kernels, "fail", control=control)
        try:
            run = {"gptq-moe": self.run_moe, "awq-moe": self.run_awq_moe, "ct-moe": self.run_ct_moe,
                   "unquantized-moe": self.run_unquantized_moe,
                   "fp8-moe": self.run_fp8_moe}
            y, ref = run.get(case.method, self.run_linear)(case, gen)
        except ModuleNotFoundError as exc:
            top = (exc.name or "").partition(".")[0]
            if top in ("vllm", "vllm_xpu_kernels"):
                res.detail = f"ModuleNotFoundError: {exc}"
                res.info["trace"] = traceback.format_exc()[-2000:]
            else:  # a third-party package vLLM needs for this method, not in the target
                res.status, res.detail = "skipped", f"the target python lacks {exc.name!r}"
        except Exception as exc:  # the patched code failing in any way is this case's verdict
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            if case.refusal and not control and isinstance(exc, (RuntimeError, NotImplementedError, ValueError)) \
                    and case.refusal in str(exc):
                res.status, res.detail = "pass", f"refused clearly: {msg}"
            else:
                res.detail = msg
                res.info["trace"] = traceback.format_exc()[-2000:]
        else:
            diff = (y.double() - ref).abs()
            res.max_abs = float(diff.max())
            denom = float(ref.norm())
            res.rel = float((y.double() - ref).norm()) / denom if denom else float("inf")
            res.info["ref_max"] = float(ref.abs().max())
            if case.refusal and not control:
                res.detail = f"expected a refusal ({case.refusal!r}), got output (rel {res.rel:.3g})"
            elif res.rel <= REL_LIMIT and bool(torch.isfinite(y).all()):
                res.status, res.detail = "pass", f"rel {res.rel:.3g} <= {REL_LIMIT:g}"
            else:
                res.detail = f"rel {res.rel:.3g} > {REL_LIMIT:g} (max abs {res.max_abs:.3g} on |ref| <= {res.info['ref_max']:.3g})"
        finally:
            emulators.PLANT = None
        if control:  # a control passes when the planted bug shows in the numbers
            caught = res.status == "fail" and res.rel is not None
            res.status = "pass" if caught else "fail"
            res.detail = ("caught: " if caught else "NOT caught by the numbers (harness broken): ") + res.detail
        res.seconds = round(time.perf_counter() - t0, 3)
        return res


def _pack_rows(torch: Any, q: Any) -> Any:
    """[R, C] in 0..15 -> int32 [R/8, C]; nibble i of row r is row 8r+i (GPTQ qweight)."""
    r, c = q.shape
    g = q.to(torch.int64).reshape(r // 8, 8, c)
    word = sum(g[:, i, :] << (4 * i) for i in range(8))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _pack_cols(torch: Any, q: Any, order: Any) -> Any:
    """[R, C] in 0..15 -> int32 [R, C/8]; nibble i of column c holds column 8c + order[i]."""
    r, c = q.shape
    g = q.to(torch.int64).reshape(r, c // 8, 8)
    word = sum(g[:, :, o] << (4 * i) for i, o in enumerate(order))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def select_cases(names: list[str] | None) -> list[LayerCase]:
    if not names:
        return list(DEFAULT_CASES)
    by_name = {c.name: c for c in DEFAULT_CASES}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise KeyError(f"unknown layers case {unknown[0]!r} (known: {', '.join(by_name)})")
    return [by_name[n] for n in names]


def main(argv: list[str]) -> int:
    args = json.loads(argv[0]) if argv else {}
    t0 = time.perf_counter()
    try:
        cases = select_cases(args.get("cases"))
    except KeyError as exc:
        print(json.dumps({"error": str(exc.args[0])}))
        return 2
    import torch

    torch.set_num_threads(int(args.get("threads", 1)))
    with tempfile.TemporaryDirectory(prefix="stackbuild-layers-") as tmp:
        h = Harness(args["tree"], Path(tmp), args.get("kernels") or "0.1.5")
        results = [h.run(c) for c in cases]
        by_name = {c.name: c for c in DEFAULT_CASES}
        if args.get("controls", True):
            for control, name in CONTROLS:
                if name in by_name:
                    results.append(h.run(by_name[name], control))
    out = {
        "vllm_file": h.vllm_file,
        "torch": torch.__version__,
        "rel_limit": REL_LIMIT,
        "kernels": h.kernels,
        "cases": [asdict(c) for c in cases],
        "results": [asdict(r) for r in results],
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
