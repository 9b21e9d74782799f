"""hybrid-kv-page-size-lcm.patch: KV page unification for hybrid attention+Mamba
models, run on real page sizes.

One subprocess per tree (pristine 0.19.0, and 0.19.0 with the whole series) runs,
in the CPU venv of tests/checks/test_verify_dynamic.py, the real 0.19.0 code that
decides the page sizes of a Qwen3.5 / Qwen3-Next model on XPU:

- ``Qwen3_5ForConditionalGenerationConfig`` (mamba_ssm_dtype) and
  ``HybridAttentionMambaModelConfig.verify_and_update_config`` (attention block
  size aligned so one attention page holds a GDN state; the Mamba page padded to
  it), models/config.py:156;
- ``XPUPlatform.check_and_update_config``, which then sets the block size to 64
  (platforms/xpu.py:166; vLLM 0.20.0 rounds the aligned size up to 64 instead);
- the specs the layers report: ``FullAttentionSpec`` as attention.py:554 builds
  it, ``MambaSpec`` from the model class's state shape and dtype as
  mamba/abstract.py:43 does;
- ``unify_kv_cache_spec_page_size`` (v1/core/kv_cache_utils.py), compiled out of
  the tree's file: importing that module needs msgspec, which the venv lacks.

The configs are the published ones' relevant fields. The vllm_config is a
namespace holding a real CacheConfig and CompilationConfig: a real VllmConfig
validates against the engine (msgspec, ...). ``vllm_xpu_kernels._C`` and
``._xpu_C`` are empty modules: platforms/xpu.py imports them for their side
effect (op registration) only.

Before the fix (the LCM of all pages) Qwen3.5-35B-A3B got a 2x Mamba page and
PR 40128's numbers a 1.14 GiB page (97x); after it the padding is below one
attention page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checks"))
from test_verify_dynamic import target_venv  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.slow]

GDN = {  # Qwen3.5 / Qwen3.6 / Qwen3-Next linear-attention (GatedDeltaNet) fields
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
}
# name: (architecture, text-config fields, total KV heads, head_dim, TP size)
MODELS: dict[str, tuple[str, dict[str, Any], int, int, int]] = {
    "qwen3.5-35b-a3b-tp1": ("Qwen3_5MoeForConditionalGeneration", GDN, 2, 256, 1),
    "qwen3.5-35b-a3b-tp4": ("Qwen3_5MoeForConditionalGeneration", GDN, 2, 256, 4),
    "qwen3.5-9b-tp1": (
        "Qwen3_5ForConditionalGeneration",
        {**GDN, "mamba_ssm_dtype": "float32"},
        4,
        256,
        1,
    ),
    "qwen3-next-80b-a3b-tp2": ("Qwen3NextForCausalLM", GDN, 2, 256, 2),
}

SCRIPT = r"""
import ast, json, logging, math, sys, types
from dataclasses import replace
tree, models_path, out_path = sys.argv[1:4]
sys.path.insert(0, tree)
for name in ("vllm_xpu_kernels", "vllm_xpu_kernels._C", "vllm_xpu_kernels._moe_C",
             "vllm_xpu_kernels._xpu_C"):
    sys.modules.setdefault(name, types.ModuleType(name))
import torch
import vllm
from vllm.config.cache import CacheConfig
from vllm.config.compilation import CompilationConfig
from vllm.config.model import ModelConfig
import vllm.model_executor.models.config as mcfg
from vllm.model_executor.models.qwen3_next import Qwen3NextForCausalLM
from vllm.platforms.xpu import XPUPlatform
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec, MambaSpec

NS = types.SimpleNamespace
path = tree + "/vllm/v1/core/kv_cache_utils.py"
src = ast.parse(open(path).read())
node = next(n for n in src.body
            if isinstance(n, ast.FunctionDef) and n.name == "unify_kv_cache_spec_page_size")
ns = {"math": math, "replace": replace, "cdiv": cdiv, "logger": logging.getLogger("kv"),
      "KVCacheSpec": KVCacheSpec, "MambaSpec": MambaSpec}
exec(compile(ast.Module(body=[node], type_ignores=[]), path, "exec"), ns)
unify = ns["unify_kv_cache_spec_page_size"]

# Qwen3.5's get_mamba_state_shape/dtype_from_config (qwen3_5.py:708-738) are the
# same calls as Qwen3-Next's; qwen3_5.py imports torchvision, absent here.
mcfg.ModelRegistry.resolve_model_cls = lambda arch, model_config: (Qwen3NextForCausalLM, arch)

def run_unify(specs):
    try:
        out = unify(specs)
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"pages": sorted({s.page_size_bytes for s in out.values()}),
            "blocks": {k: s.block_size for k, s in out.items()},
            "padded": {k: getattr(s, "page_size_padded", None) for k, s in out.items()},
            "same_objects": [k for k in out if out[k] is specs[k]]}

results = {"vllm_file": vllm.__file__, "models": {}, "specs": {}}
for name, (arch, fields, kv_heads, head_dim, tp) in json.load(open(models_path)).items():
    cache = CacheConfig()
    model = NS(dtype=torch.bfloat16, use_mla=False, architecture=arch, model=name,
               is_mm_prefix_lm=False,
               hf_text_config=NS(**fields), max_model_len=262144,
               supports_mamba_prefix_caching=False,
               get_total_num_kv_heads=lambda kv=kv_heads: kv,
               get_head_size=lambda hd=head_dim: hd)
    model.get_num_kv_heads = types.MethodType(ModelConfig.get_num_kv_heads, model)
    vc = NS(cache_config=cache, model_config=model, attention_config=NS(backend=None),
            parallel_config=NS(tensor_parallel_size=tp, world_size_across_dp=1, worker_cls="auto"),
            scheduler_config=NS(enable_chunked_prefill=True), speculative_config=None,
            compilation_config=CompilationConfig(), kv_transfer_config=None)
    if arch in mcfg.MODELS_CONFIG_MAP:
        mcfg.MODELS_CONFIG_MAP[arch].verify_and_update_config(vc)
    mcfg.HybridAttentionMambaModelConfig.verify_and_update_config(vc)
    aligned = cache.block_size
    XPUPlatform.check_and_update_config(vc)
    attn = FullAttentionSpec(block_size=cache.block_size,
                             num_kv_heads=model.get_num_kv_heads(vc.parallel_config),
                             head_size=head_dim, dtype=torch.bfloat16)
    mamba = MambaSpec(shapes=Qwen3NextForCausalLM.get_mamba_state_shape_from_config(vc),
                      dtypes=Qwen3NextForCausalLM.get_mamba_state_dtype_from_config(vc),
                      block_size=cache.mamba_block_size,
                      page_size_padded=cache.mamba_page_size_padded)
    res = {"aligned_block": aligned, "xpu_block": cache.block_size,
           "attn_page": attn.page_size_bytes,
           "attn_page_per_token": attn.page_size_bytes // attn.block_size,
           "mamba_state": replace(mamba, page_size_padded=None).page_size_bytes,
           "mamba_page": mamba.page_size_bytes}
    res.update(run_unify({"model.layers.3.self_attn": attn, "model.layers.0.linear_attn": mamba}))
    results["models"][name] = res

# vLLM PR 40128's own numbers: TurboQuant k8v4 attention page 16 x 2 heads x 388 B
# (here 2 x 16 x 2 x 194 uint8) next to a 12648448 B DeltaNet state.
results["specs"]["pr40128"] = run_unify({
    "attn": FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=194, dtype=torch.uint8),
    "gdn": MambaSpec(shapes=((193, 65536),), dtypes=(torch.uint8,), block_size=262144),
})
# stock behaviour kept: a page that divides the largest one only grows its block
results["specs"]["divisible"] = run_unify({
    "small": FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=128, dtype=torch.bfloat16),
    "big": FullAttentionSpec(block_size=16, num_kv_heads=4, head_size=128, dtype=torch.bfloat16),
})
results["specs"]["uniform"] = run_unify({
    "a": FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=128, dtype=torch.bfloat16),
    "m": MambaSpec(shapes=((16, 512),), dtypes=(torch.bfloat16,), block_size=16),
})
# a Mamba page smaller than the attention page is padded, not "grown" (its page
# does not scale with block_size)
results["specs"]["small_mamba"] = run_unify({
    "attn": FullAttentionSpec(block_size=64, num_kv_heads=2, head_size=256, dtype=torch.bfloat16),
    "gdn": MambaSpec(shapes=((64, 256),), dtypes=(torch.bfloat16,), block_size=64),
})
json.dump(results, open(out_path, "w"), indent=1)
"""


def _run(tree: Path, work: Path) -> dict[str, Any]:
    python = target_venv() / "bin" / "python"
    (work / "models.json").write_text(json.dumps(MODELS))
    (work / "pages.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="ERROR", VLLM_NO_USAGE_STATS="1")
    proc = subprocess.run(
        [str(python), str(work / "pages.py"), str(tree), str(work / "models.json"),
         str(work / "out.json")],
        capture_output=True, text=True, env=env, cwd=work, timeout=300,
    )
    assert proc.returncode == 0, f"page script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads((work / "out.json").read_text())
    assert Path(result["vllm_file"]).resolve() == (tree / "vllm" / "__init__.py").resolve()
    return result


@pytest.fixture(scope="module")
def patched(patched_0190: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(patched_0190, tmp_path_factory.mktemp("pages-patched"))


@pytest.fixture(scope="module")
def pristine(pristine_0190: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(pristine_0190, tmp_path_factory.mktemp("pages-pristine"))


def test_xpu_overwrites_the_aligned_block_size_and_stock_unify_raises(
    pristine: dict[str, Any],
) -> None:
    # the trigger, in the real 0.19.0 code: 35B-A3B at TP 1 aligns to 544 tokens
    # (one 2048 B/token attention page >= the 1097728 B GDN state), XPU sets 64
    m = pristine["models"]["qwen3.5-35b-a3b-tp1"]
    assert (m["aligned_block"], m["xpu_block"]) == (544, 64)
    assert (m["attn_page"], m["mamba_state"], m["mamba_page"]) == (131072, 1097728, 1114112)
    for name, m in pristine["models"].items():
        assert m["xpu_block"] == 64, name
        assert m["mamba_page"] % m["attn_page"] != 0, name
        assert m["error"] == "NotImplementedError", name


@pytest.mark.parametrize("name", list(MODELS))
def test_hybrid_pages_unify_with_less_than_one_attention_page_of_padding(
    patched: dict[str, Any], name: str
) -> None:
    m = patched["models"][name]
    assert "error" not in m, m
    [page] = m["pages"]
    # the padding the unification adds is less than one attention page
    assert m["mamba_page"] <= page < m["mamba_page"] + m["attn_page"]
    attn_block = m["blocks"]["model.layers.3.self_attn"]
    assert attn_block * m["attn_page_per_token"] == page and attn_block % 64 == 0
    # the attention block vLLM 0.20.0 picks on XPU: the aligned size rounded up to 64
    assert attn_block == -(-m["aligned_block"] // 64) * 64
    assert m["padded"]["model.layers.0.linear_attn"] == page
    # total Mamba padding over the real GDN state stays under one 64-token block
    assert page - m["mamba_state"] < 64 * m["attn_page_per_token"]


def test_qwen35_35b_numbers(patched: dict[str, Any]) -> None:
    m = patched["models"]["qwen3.5-35b-a3b-tp1"]
    assert m["pages"] == [1179648]  # 576 tokens x 2048 B; the LCM gave 2228224 (2x)
    assert (m["pages"][0] - m["mamba_page"]) / m["mamba_page"] < 0.06
    assert m["blocks"]["model.layers.3.self_attn"] == 576


def test_pr40128_numbers_pad_by_a_fraction_of_a_percent(patched: dict[str, Any]) -> None:
    r = patched["specs"]["pr40128"]
    [page] = r["pages"]
    assert page == 12651904  # 1019 x 12416; the LCM of all pages was 1226899456 (97x)
    assert (page - 12648448) / 12648448 < 0.001
    assert r["blocks"]["attn"] == 16 * 1019 and r["padded"]["gdn"] == page
    assert r["blocks"]["gdn"] == 262144  # Mamba keeps its block size


def test_pristine_raises_on_pr40128_numbers(pristine: dict[str, Any]) -> None:
    assert pristine["specs"]["pr40128"]["error"] == "NotImplementedError"


def test_divisible_and_uniform_cases_behave_as_stock(
    patched: dict[str, Any], pristine: dict[str, Any]
) -> None:
    for run in (patched, pristine):
        d = run["specs"]["divisible"]
        assert d["pages"] == [16 * 4 * 128 * 2 * 2]
        assert d["blocks"] == {"small": 64, "big": 16} and d["same_objects"] == ["big"]
        assert run["specs"]["uniform"]["same_objects"] == ["a", "m"]


def test_a_smaller_mamba_page_is_padded(patched: dict[str, Any], pristine: dict[str, Any]) -> None:
    r = patched["specs"]["small_mamba"]
    assert r["pages"] == [64 * 2 * 256 * 2 * 2]
    assert r["blocks"]["gdn"] == 64 and r["padded"]["gdn"] == 131072
    # stock "grows" the Mamba block, which does not change its page: a bare assert
    assert pristine["specs"]["small_mamba"]["error"] == "AssertionError"
