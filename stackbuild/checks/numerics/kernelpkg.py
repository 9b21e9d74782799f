"""A throw-away `vllm_xpu_kernels` distribution whose ops run the CPU emulators.

write_kernel_package(dest, version) makes, under `dest` (a directory to put first on
sys.path of the interpreter under test):

    vllm_xpu_kernels/__init__.py
    vllm_xpu_kernels/_C.py                 registers torch.ops._C.static_scaled_fp8_quant
    vllm_xpu_kernels/_moe_C.py             empty (vllm/platforms/xpu.py imports all three)
    vllm_xpu_kernels/_xpu_C.py             registers torch.ops._xpu_C.int4_gemm_w4a16
                                           (the kernel's own schema) -> emulators
    vllm_xpu_kernels/fused_moe_interface.py  the names that version exports -> emulators
    vllm_xpu_kernels/flash_attn_interface.py  flash_attn_varlen_func (vllm/_xpu_ops.py imports
                                           it at import time); calling it raises: not emulated
    vllm_xpu_kernels-<version>.dist-info/METADATA  so importlib.metadata sees the version

The ops module imports stackbuild.checks.numerics.emulators, so stackbuild must be
importable there too (the layers worker runs with it on PYTHONPATH). Torch-free: this
module only writes text, into a fresh temporary directory (no atomic writes needed:
nothing else reads it before it is complete).
"""

from __future__ import annotations

import re
from pathlib import Path

# v0.1.5:csrc/xpu/torch_bindings.cpp:22-24, unchanged through 0.1.16
INT4_GEMM_W4A16_SCHEMA = (
    "int4_gemm_w4a16(Tensor A, Tensor B, Tensor? bias, Tensor B_scale, "
    "Tensor B_zp, int group_size, Tensor? g_idx) -> Tensor"
)

_XPU_C = f'''"""Emulated torch.ops._xpu_C (stackbuild layers suite; not the real kernels)."""
import torch

from stackbuild.checks.numerics import emulators

_LIB = torch.library.Library("_xpu_C", "DEF")
_LIB.define({INT4_GEMM_W4A16_SCHEMA!r})
_LIB.impl("int4_gemm_w4a16", emulators.int4_gemm_w4a16, "CompositeExplicitAutograd")
'''

_C = '''"""Emulated torch.ops._C (stackbuild layers suite; not the real kernels)."""
import torch

from stackbuild.checks.numerics import emulators

_LIB = torch.library.Library("_C", "DEF")
_LIB.define(emulators.STATIC_SCALED_FP8_QUANT_SCHEMA)
_LIB.impl("static_scaled_fp8_quant", emulators.static_scaled_fp8_quant, "CompositeExplicitAutograd")
'''

_FUSED_MOE = '''"""Emulated fused MoE API of vllm-xpu-kernels {version} (stackbuild layers suite)."""
from stackbuild.checks.numerics import emulators

globals().update(emulators.fused_moe_api({version!r}))
'''

_FLASH_ATTN = '''"""vllm-xpu-kernels' flash attention: imported by vllm/_xpu_ops.py, not emulated."""


def flash_attn_varlen_func(*args, **kwargs):
    raise NotImplementedError("stackbuild layers suite: flash_attn_varlen_func is not emulated")
'''

_VERSION_RE = re.compile(r"^\d+(\.\d+){1,3}$")


def write_kernel_package(dest: Path, version: str) -> Path:
    """Write the package for `version` under dest; returns dest."""
    if not _VERSION_RE.match(version):
        raise ValueError(f"not a vllm-xpu-kernels release version: {version!r}")
    pkg = dest / "vllm_xpu_kernels"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f'"""Emulated vllm-xpu-kernels {version}."""\n')
    (pkg / "_C.py").write_text(_C)
    (pkg / "_moe_C.py").write_text("")
    (pkg / "_xpu_C.py").write_text(_XPU_C)
    (pkg / "flash_attn_interface.py").write_text(_FLASH_ATTN)
    (pkg / "fused_moe_interface.py").write_text(_FUSED_MOE.format(version=version))
    info = dest / f"vllm_xpu_kernels-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm-xpu-kernels\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    return dest
