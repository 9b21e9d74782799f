"""gemma4-bidirectional-vision.patch and gemma4-unified-audio.patch, run on the real
0.19.0 code (pristine, and with the whole series) in the CPU venv of
tests/checks/test_verify_dynamic.py (transformers 5.5.0).

What the gemma4_unified checkpoint asks for is read from the real transformers
5.10.2 classes (the overlay that test builds; gemma4_unified first ships there):
its text config defaults to ``use_bidirectional_attention="vision"``, it names
the end-of-audio token ``eoa_token_index`` and its audio feature extractor has
no ``fft_length``. 0.19.0's gemma4_mm cannot be imported under 5.10.2 without
torchvision, so the vLLM side runs under 5.5.0, whose Gemma4Config also has
``eoa_token_index`` only, and gets the 5.10.2 feature extractor loaded from its
file.

Bidirectional image attention, step by step as 0.19.0 runs it:
- ``ModelConfig.is_mm_prefix_lm`` (config/model.py) decides whether the runner
  marks image ranges (gpu_model_runner.py:2321 sets ``mm_prefix_range`` on every
  layer's metadata to the ``PlaceholderRange.extract_embeds_range()`` of each
  image; that loop is inside the runner's metadata builder and is reproduced
  here, the ranges come from the real PlaceholderRange);
- ``XPUPlatform.check_and_update_config`` picks the attention backend: only
  Triton reads ``mm_prefix_range`` on XPU (Flash Attention has no
  ``supports_mm_prefix``);
- ``Gemma4ForConditionalGeneration._clear_mm_prefix_for_full_attn_layers``
  (called from forward) clears it for full-attention layers, under a real
  ForwardContext, on real TritonAttentionMetadata objects whose
  ``mm_prefix_range_tensor`` is what the Triton kernel gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fixtures
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "checks"))
from test_verify_dynamic import _run as run_checked  # noqa: E402
from test_verify_dynamic import target_venv  # noqa: E402

from stackbuild.checks import transformers_support as ts  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.slow]

FACTS = r"""
import json, sys
from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedConfig
from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
    Gemma4UnifiedAudioFeatureExtractor)
c = Gemma4UnifiedConfig()
fe = Gemma4UnifiedAudioFeatureExtractor()
json.dump({"use_bidirectional_attention": c.text_config.use_bidirectional_attention,
           "layer_types": c.text_config.layer_types,
           "boa_token_id": c.boa_token_id,
           "eoa_token_index": getattr(c, "eoa_token_index", None),
           "has_eoa_token_id": hasattr(c, "eoa_token_id"),
           "fe_has_fft_length": hasattr(fe, "fft_length"),
           "fe_sampling_rate": fe.sampling_rate}, open(sys.argv[1], "w"))
"""

SCRIPT = r"""
import importlib.util, json, sys, traceback, types
tree, facts_path, fe_file, out_path = sys.argv[1:5]
sys.path.insert(0, tree)
for name in ("vllm_xpu_kernels", "vllm_xpu_kernels._C", "vllm_xpu_kernels._moe_C",
             "vllm_xpu_kernels._xpu_C"):
    sys.modules.setdefault(name, types.ModuleType(name))
import torch
import vllm
import vllm.forward_context as fc
from transformers.models.gemma4 import Gemma4AudioFeatureExtractor, Gemma4Config, Gemma4Processor
from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
from vllm.config.cache import CacheConfig
from vllm.config.compilation import CompilationConfig
from vllm.config.model import ModelConfig
from vllm.model_executor.models import gemma4_mm
from vllm.multimodal.inputs import PlaceholderRange
from vllm.multimodal.processing import BaseDummyInputsBuilder
from vllm.platforms.xpu import XPUPlatform
from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadata

NS = types.SimpleNamespace
facts = json.load(open(facts_path))
out = {"vllm_file": vllm.__file__}

def attempt(fn):
    try:
        return {"value": fn()}
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e), "trace": traceback.format_exc()[-1500:]}

# --- bidirectional image attention
layer_types = facts["layer_types"]
text = Gemma4TextConfig(num_hidden_layers=len(layer_types), layer_types=layer_types,
                        use_bidirectional_attention=facts["use_bidirectional_attention"])
model = NS(hf_config=NS(model_type="gemma4_unified", text_config=text), hf_text_config=text,
           model="gemma4-unified")
is_mm = ModelConfig.is_mm_prefix_lm.func(model)
out["is_mm_prefix_lm"] = is_mm
model.is_mm_prefix_lm = is_mm
vc = NS(model_config=model, cache_config=CacheConfig(), attention_config=NS(backend=None),
        scheduler_config=NS(is_multimodal_model=True, disable_chunked_mm_input=False),
        compilation_config=CompilationConfig(), kv_transfer_config=None,
        parallel_config=NS(world_size_across_dp=1, worker_cls="auto"))
XPUPlatform.check_and_update_config(vc)
out["backend"] = vc.attention_config.backend.name
out["disable_chunked_mm_input"] = vc.scheduler_config.disable_chunked_mm_input

# one request: 3 text tokens, a 5-token image, 2 text tokens; one metadata object
# per KV cache group (sliding, full), as the runner hands them to the layers
image = PlaceholderRange(offset=3, length=5)
def metadata():
    return TritonAttentionMetadata(
        num_actual_tokens=10, max_query_len=10, query_start_loc=torch.tensor([0, 10]),
        max_seq_len=10, seq_lens=torch.tensor([10]), block_table=torch.zeros(1, 1, dtype=torch.int32),
        slot_mapping=torch.arange(10), seq_threshold_3D=0, num_par_softmax_segments=0,
        softmax_segm_output=None, softmax_segm_max=None, softmax_segm_expsum=None,
        use_cascade=False, common_prefix_len=0, cu_prefix_query_lens=None,
        prefix_kv_lens=None, suffix_kv_lens=None)
groups = {"sliding_attention": metadata(), "full_attention": metadata()}
attn_metadata = {f"language_model.model.layers.{i}.self_attn.attn": groups[lt]
                 for i, lt in enumerate(layer_types)}
if is_mm:  # gpu_model_runner.py:2321-2340
    for md in attn_metadata.values():
        md.mm_prefix_range = {0: image.extract_embeds_range()}
# what gemma4_mm.__init__ (and gemma4_unified.__init__ in 0.23.0) precompute
full_idxs = frozenset(i for i, lt in enumerate(layer_types) if lt != "sliding_attention")
clear = getattr(gemma4_mm.Gemma4ForConditionalGeneration, "_clear_mm_prefix_for_full_attn_layers", None)
out["has_clear"] = clear is not None
if clear is not None:
    fc._forward_context = fc.ForwardContext(no_compile_layers={}, attn_metadata=attn_metadata,
                                            slot_mapping={})
    clear(NS(_full_attn_layer_idxs=full_idxs))
    fc._forward_context = None
def ranges(md):
    t = md.mm_prefix_range_tensor
    return None if t is None else t.tolist()
out["kernel_ranges"] = {lt: ranges(md) for lt, md in groups.items()}
out["full_layers"] = sorted(full_idxs)

# --- audio
spec = importlib.util.spec_from_file_location(
    "transformers.models.gemma4_unified.feature_extraction_gemma4_unified", fe_file)
pkg = types.ModuleType("transformers.models.gemma4_unified"); pkg.__path__ = []
sys.modules[pkg.__name__] = pkg
fe_mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = fe_mod
spec.loader.exec_module(fe_mod)
unified_fe = fe_mod.Gemma4UnifiedAudioFeatureExtractor()

def processor(fe):
    p = NS(feature_extractor=fe, audio_token_id=258881, audio_token="<|audio|>",
           audio_seq_length=750, audio_ms_per_token=40, image_processor=NS(size=None),
           image_token="<|image|>", video_token="<|video|>")
    p._compute_audio_num_tokens = types.MethodType(Gemma4Processor._compute_audio_num_tokens, p)
    return p

config = Gemma4Config()
out["gemma4_config_has_eoa_token_id"] = hasattr(config, "eoa_token_id")
info = NS(get_hf_config=lambda: config)
out["audio_repl"] = attempt(lambda: gemma4_mm.Gemma4ProcessingInfo.get_audio_repl(
    info, audio_len=16000, processor=processor(unified_fe)).full)
out["eoa_token_index"] = config.eoa_token_index
out["boa_token_id"] = config.boa_token_id

def dummy_audio(fe):
    proc = processor(fe)
    builder = NS(info=NS(get_hf_processor=lambda: proc))
    for name in ("_get_dummy_images", "_get_dummy_audios", "_get_dummy_videos"):
        setattr(builder, name, types.MethodType(getattr(BaseDummyInputsBuilder, name), builder))
    data = gemma4_mm.Gemma4DummyInputsBuilder.get_dummy_mm_data(
        builder, seq_len=8192, mm_counts={"image": 0, "audio": 1, "video": 0})
    return [len(a) for a in data["audio"]]
out["dummy_audio_unified"] = attempt(lambda: dummy_audio(unified_fe))
out["dummy_audio_gemma4"] = attempt(lambda: dummy_audio(Gemma4AudioFeatureExtractor()))
json.dump(out, open(out_path, "w"), indent=1)
"""


def _overlay(python: Path) -> Path:
    overlay = fixtures.test_cache_dir() / "overlays" / "transformers-5.10.2"
    if not (overlay / "transformers").is_dir():
        run_checked([str(python), "-m", "pip", "install", "-q", "--no-deps", "--target",
                     str(overlay), str(ts.fetch_wheel("5.10.2"))])
    return overlay


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="ERROR", VLLM_NO_USAGE_STATS="1", **extra)
    return env


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = target_venv() / "bin" / "python"
    overlay = _overlay(python)
    work = tmp_path_factory.mktemp("g4u-facts")
    (work / "facts.py").write_text(FACTS)
    proc = subprocess.run([str(python), str(work / "facts.py"), str(work / "facts.json")],
                          capture_output=True, text=True, cwd=work, timeout=300,
                          env=_clean_env(PYTHONPATH=str(overlay)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads((work / "facts.json").read_text())
    return result


def _run(tree: Path, facts: dict[str, Any], work: Path) -> dict[str, Any]:
    python = target_venv() / "bin" / "python"
    fe_file = (_overlay(python) / "transformers/models/gemma4_unified"
               / "feature_extraction_gemma4_unified.py")
    (work / "facts.json").write_text(json.dumps(facts))
    (work / "g4u.py").write_text(SCRIPT)
    proc = subprocess.run(
        [str(python), str(work / "g4u.py"), str(tree), str(work / "facts.json"), str(fe_file),
         str(work / "out.json")],
        capture_output=True, text=True, env=_clean_env(), cwd=work, timeout=300,
    )
    assert proc.returncode == 0, f"script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads((work / "out.json").read_text())
    assert Path(result["vllm_file"]).resolve() == (tree / "vllm" / "__init__.py").resolve()
    return result


@pytest.fixture(scope="module")
def patched(
    patched_0190: Path, facts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    return _run(patched_0190, facts, tmp_path_factory.mktemp("g4u-patched"))


@pytest.fixture(scope="module")
def pristine(
    pristine_0190: Path, facts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    return _run(pristine_0190, facts, tmp_path_factory.mktemp("g4u-pristine"))


def test_what_the_unified_checkpoint_asks_for(facts: dict[str, Any]) -> None:
    assert facts["use_bidirectional_attention"] == "vision"
    assert "sliding_attention" in facts["layer_types"] and "full_attention" in facts["layer_types"]
    assert facts["eoa_token_index"] is not None and not facts["has_eoa_token_id"]
    assert not facts["fe_has_fft_length"]


def test_image_tokens_attend_bidirectionally_in_sliding_layers(patched: dict[str, Any]) -> None:
    assert patched["is_mm_prefix_lm"] is True
    assert patched["backend"] == "TRITON_ATTN"  # the XPU backend that reads the ranges
    assert patched["disable_chunked_mm_input"] is True
    # the Triton kernel gets the image's [first, last] token range for sliding layers
    assert patched["kernel_ranges"]["sliding_attention"] == [[[3, 7]]]
    # full-attention layers stay causal, as transformers and vLLM >= 0.20 do
    assert patched["kernel_ranges"]["full_attention"] is None
    assert patched["full_layers"]


def test_stock_0190_attends_causally(pristine: dict[str, Any]) -> None:
    assert pristine["is_mm_prefix_lm"] is False
    assert pristine["backend"] == "FLASH_ATTN" and pristine["disable_chunked_mm_input"] is False
    assert pristine["kernel_ranges"] == {"sliding_attention": None, "full_attention": None}
    assert pristine["has_clear"] is False


def test_audio_prompt_ends_with_eoa_token_index(
    patched: dict[str, Any], pristine: dict[str, Any]
) -> None:
    assert patched["gemma4_config_has_eoa_token_id"] is False
    repl = patched["audio_repl"]["value"]
    assert repl[0] == patched["boa_token_id"] and repl[-1] == patched["eoa_token_index"]
    assert set(repl[1:-1]) == {258881} and len(repl) - 2 == 25  # 1 s of audio, 40 ms/token
    assert pristine["audio_repl"]["error"] == "AttributeError"
    assert "eoa_token_id" in pristine["audio_repl"]["message"]


def test_dummy_audio_for_the_unified_feature_extractor(
    patched: dict[str, Any], pristine: dict[str, Any]
) -> None:
    # 750 tokens x 40 ms at 16 kHz: the worst case the processor allows
    assert patched["dummy_audio_unified"]["value"] == [750 * 40 * 16]
    assert patched["dummy_audio_gemma4"]["value"] == [512]  # unchanged: its fft_length
    assert pristine["dummy_audio_unified"]["error"] == "AttributeError"
    assert "fft_length" in pristine["dummy_audio_unified"]["message"]
