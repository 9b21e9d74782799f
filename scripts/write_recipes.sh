#!/usr/bin/env bash
# Regenerates the shipped recipes with the current sha256 of each patch file.
set -euo pipefail
cd "$(dirname "$0")/.."
P=patches/vllm/0.19.0
sha() { sha256sum "$P/$1.patch" | cut -c1-64; }
V019=81e59cf87175e7a62eb8d9acf5989484bbd17089d5eface353f89067bda282d9
V021=05ff89c3e926b88b77d7878e317a659ffba678afc21c1d48952037aa5457f058
V023=760269db3d9611e12e524681df1bca0977d5d2f5fcb4481cc34d33efc4ae7ff5

patch() { # name description test
cat <<EOF

[[patches]]
file = "$P/$1.patch"
source = "vllm"
sha256 = "$(sha "$1")"
description = "$2"
test = "$3"
EOF
}
backport() {
cat <<EOF

[[patches]]
name = "gemma4-unified-backport"
backport = "vllm==0.23.0"
sha256 = "$V023"
files = ["vllm/model_executor/models/gemma4_unified.py"]
source = "vllm"
description = "gemma4_unified.py taken from the vLLM 0.23.0 source release at apply time"
test = "tests/checks/test_verify_applied.py"
EOF
}

cat > recipes/xpu-base.toml <<EOF
# Shared base of the XPU recipes: the torch XPU stack and what must never be installed.
description = "Shared base: torch XPU stack, kernel wheel, forbidden packages"
platform = "b70"

[pins]
torch = { version = "==2.10.0+xpu", index = "https://download.pytorch.org/whl/xpu" }
triton-xpu = { version = "==3.6.0", index = "https://download.pytorch.org/whl/xpu" }
# 0.1.5 is a GitHub release wheel: its sha256 is recorded on first download (trust on first use).
vllm-xpu-kernels = { url = "https://github.com/vllm-project/vllm-xpu-kernels/releases/download/v0.1.5/vllm_xpu_kernels-0.1.5-cp38-abi3-manylinux_2_28_x86_64.whl", trust_on_first_use = true, override = "vLLM 0.19.0 pins 0.1.4, which leaves Lunar Lake out of its Xe2 list and decodes INT4 weights as FP4 E2M1" }

[environment]
python = ">=3.10,<3.13"

[environment.forbid]
intel-extension-for-pytorch = "archived; left installed it silently changed benchmark results on vLLM 0.19"
intel_extension_for_pytorch = "archived; left installed it silently changed benchmark results on vLLM 0.19"
EOF

{ cat <<EOF
# Gemma 4 (12B INT4 AutoRound, and the unified multimodal model) on 4x Arc Pro B70, TP 4.
name = "b70-gemma4"
description = "Gemma 4 on 4x Arc Pro B70 (BMG-G31), vLLM 0.19.0 + gemma4_unified backport, INT4 AutoRound"
extends = "xpu-base"
platform = "b70"

[sources.vllm]
pypi = "vllm==0.19.0"
sha256 = "$V019"

[pins]
transformers = { version = "==5.10.2", override = "vLLM 0.19.0 declares transformers<5; its Gemma 4 code needs >=5.5.0 and gemma4_unified >=5.10.1 (5.10.0 is yanked)" }

[lock]
# compressed-tensors 0.14.0.1 (pinned by vLLM 0.19.0) declares transformers<5: only uv applies
# the transformers override to dependencies of dependencies; pip-tools cannot.
resolver = "uv"

[checks]
registry = ["Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration"]
model_types = ["gemma4", "gemma4_unified"]
numerics = ["int4-linear"]
EOF
patch gemma4-unified-prereqs "gemma4_mm: _SUPPORTED_SOFT_TOKENS and _get_max_soft_tokens for the backport" "tests/patches/test_vllm_series.py"
patch gemma4-mm-embedder-prenorm "gemma4_mm: RMSNorm before the embedder projection, as gemma4_unified expects" "tests/patches/test_vllm_series.py"
backport
patch gemma4-unified-register "register Gemma4UnifiedForConditionalGeneration" "tests/patches/test_vllm_series.py"
patch gemma4-bidirectional-vision "Gemma 4: image tokens attend bidirectionally (use_bidirectional_attention=vision); Triton attention on XPU" "tests/patches/test_gemma4_unified_fixes.py"
patch gemma4-unified-audio "gemma4_mm: eoa_token_index fallback and dummy audio without fft_length (gemma4_unified)" "tests/patches/test_gemma4_unified_fixes.py"
patch xpu-autoround-gptq-awq "AutoRound GPTQ/AWQ checkpoints on XPU" "tests/patches/test_vllm_series.py::test_every_touched_file_compiles"
patch xpu-int4-linear "INT4 GPTQ/AWQ linear on XPU via int4_gemm_w4a16" "tests/patches/test_xpu_int4_layout.py"
patch xpu-moe-kernel-layout "bf16/FP8 MoE weights transposed for vllm-xpu-kernels >= 0.1.5" "tests/patches/test_layers_numerics.py"
} > recipes/b70-gemma4.toml

{ cat <<EOF
# INT4 MoE models (e.g. Qwen3.5-35B-A3B AutoRound) on a Lunar Lake laptop's Arc 140V iGPU.
name = "lunar-lake-moe"
description = "INT4 MoE on Lunar Lake (Arc 140V, 32 GB shared), vLLM 0.19.0"
extends = "xpu-base"
platform = "lunar-lake"

[sources.vllm]
pypi = "vllm==0.19.0"
sha256 = "$V019"

[pins]
transformers = { version = "==5.5.0", override = "vLLM 0.19.0 declares transformers<5; Qwen3.5 and its Gemma 4 code need >=5.5.0" }

[build]
max_jobs = 4

[lock]
# compressed-tensors 0.14.0.1 (pinned by vLLM 0.19.0) declares transformers<5: only uv applies
# the transformers override to dependencies of dependencies; pip-tools cannot.
resolver = "uv"

[checks]
registry = ["Qwen3_5MoeForConditionalGeneration"]
model_types = ["qwen3_5_moe"]
numerics = ["int4-linear", "int4-moe"]
EOF
patch xpu-unified-memory-free-check "free-memory check from available system memory on iGPUs (VLLM_XPU_UNIFIED_MEMORY=1)" "tests/patches/test_xpu_free_memory.py"
patch hybrid-kv-page-size-lcm "hybrid attention+Mamba page sizes: the largest page padded to a multiple of the attention pages" "tests/patches/test_kv_page_size_lcm.py"
patch xpu-autoround-gptq-awq "AutoRound GPTQ/AWQ checkpoints on XPU" "tests/patches/test_vllm_series.py::test_every_touched_file_compiles"
patch xpu-int4-linear "INT4 GPTQ/AWQ linear on XPU via int4_gemm_w4a16" "tests/patches/test_xpu_int4_layout.py"
patch xpu-int4-moe "INT4 MoE on XPU (GPTQ, AWQ, compressed-tensors)" "tests/patches/test_xpu_int4_layout.py"
patch xpu-moe-kernel-layout "bf16/FP8 MoE weights transposed for vllm-xpu-kernels >= 0.1.5" "tests/patches/test_layers_numerics.py"
} > recipes/lunar-lake-moe.toml

{ cat <<EOF
# Intel's llm-scaler multi-Arc patch (targets vLLM 0.21.0), then the gemma4_unified backport.
# The llm-scaler patch is read from the pinned llm-scaler commit, never copied here.
name = "b70-llm-scaler"
description = "Intel llm-scaler's vllm_for_multi_arc.patch on vLLM 0.21.0 + gemma4_unified backport, 4x B70"
extends = "xpu-base"
platform = "b70"

[sources.vllm]
pypi = "vllm==0.21.0"
sha256 = "$V021"

[sources.llm-scaler]
git = "https://github.com/intel/llm-scaler"
commit = "b18beee317d7211ea0a8b2f814594ccf74d458e6"

[pins]
transformers = { version = "==5.10.2", override = "gemma4_unified needs >=5.10.1 (5.10.0 is yanked)" }

[lock]
# compressed-tensors 0.14.0.1 (pinned by vLLM 0.19.0) declares transformers<5: only uv applies
# the transformers override to dependencies of dependencies; pip-tools cannot.
resolver = "uv"

[checks]
registry = ["Gemma4UnifiedForConditionalGeneration"]
model_types = ["gemma4_unified"]

[[patches]]
name = "llm-scaler-multi-arc"
from = "llm-scaler"
path = "vllm/patches/vllm_for_multi_arc.patch"
source = "vllm"
strip = 1
description = "Intel llm-scaler: vLLM for multi-Arc (one headerless git diff over 103 files)"
EOF
backport
} > recipes/b70-llm-scaler.toml
echo "recipes written"
