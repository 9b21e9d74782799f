"""Shared helpers of the numerics tests: the real layout module from our patch, a broken
stand-in of it, and workspaces holding either."""

from __future__ import annotations

from pathlib import Path

from unidiff import PatchSet

from stackbuild.checks.numerics.adapters import PATCH_LAYOUT_RELPATH

ROOT = Path(__file__).resolve().parents[3]
LAYOUT_PATCH = ROOT / "patches/vllm/0.19.0/xpu-int4-linear.patch"
LAYOUT_IN_TREE = "vllm/model_executor/layers/quantization/utils/xpu_int4_layout.py"

# A wrong layout module with the real API: ignores asymmetric zero points and swaps the
# two nibbles of each MoE byte. The patch-layout adapter must fail it.
BROKEN_LAYOUT = """
import torch

def _unpack_rows(packed):
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4).view(1, 8, 1)
    return ((words.unsqueeze(1) >> shifts) & 0xF).reshape(-1, packed.shape[-1])

def unpack_int4_rows(packed):
    return _unpack_rows(packed)

def pack_int4_rows(q):
    k, n = q.shape
    q = q.to(torch.int64).reshape(k // 8, 8, n)
    w = (q << torch.arange(0, 32, 4).view(1, 8, 1)).sum(1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)

def awq_to_gptq(qweight, qzeros):
    raise NotImplementedError("stand-in")

def gptq_linear_to_xpu(qweight, scales, zeros=None):
    return qweight, scales, torch.tensor([8], dtype=torch.int8)   # zeros dropped: wrong

def xpu_linear_dequant(b, b_scale, b_zp, group_size):
    q = _unpack_rows(b).double()
    g = torch.arange(q.shape[0]) // group_size
    return (q - 8.0) * b_scale.double()[g]

def gptq_moe_to_xpu(w_q, scales, zeros=None):
    q = torch.stack([_unpack_rows(w) for w in w_q]).transpose(1, 2)
    w = (q[..., 1::2] | (q[..., 0::2] << 4)).to(torch.uint8)   # nibbles swapped: wrong
    return w.contiguous(), scales.transpose(1, 2).contiguous(), None

def xpu_moe_dequant(w, scales, zp, group_size):
    lo, hi = (w & 0xF).double(), (w >> 4).double()
    q = torch.stack((lo, hi), dim=-1).reshape(*w.shape[:-1], w.shape[-1] * 2)
    g = torch.arange(q.shape[-1]) // group_size
    return (q - 8.0) * scales.double()[..., g]
"""


def real_layout_source() -> str | None:
    """xpu_int4_layout.py as our patch adds it (None when the patch is not in the tree)."""
    if not LAYOUT_PATCH.is_file():
        return None
    for f in PatchSet(LAYOUT_PATCH.read_text()):
        if f.path == LAYOUT_IN_TREE and f.is_added_file:
            return "".join(line.value for hunk in f for line in hunk if line.is_added)
    return None


def workspace_with(tmp: Path, source: str) -> Path:
    target = tmp / PATCH_LAYOUT_RELPATH
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source)
    return tmp
