"""xpu-unified-memory-free-check.patch: MemorySnapshot.measure on a faked XPU.

The patched vllm/utils/mem_utils.py is loaded by path with a fake
vllm.platforms.current_platform and a fake vllm.envs; torch.accelerator's
memory queries are replaced because there is no device here."""

from __future__ import annotations

import sys
import types
from collections import namedtuple
from pathlib import Path

import psutil
import pytest
import torch
from _load import load_file

pytestmark = pytest.mark.network

GiB = 1 << 30
DEVICE_FREE = 2 * GiB  # what the iGPU's own query reports (page cache left out)
DEVICE_TOTAL = 28 * GiB


class FakePlatform:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def is_xpu(self) -> bool:
        return self.kind == "xpu"

    def current_device(self) -> int:
        return 0

    def mem_get_info(self, device: object) -> tuple[int, int]:
        return DEVICE_FREE, DEVICE_TOTAL

    def get_device_capability(self, index: object) -> None:
        return None


def _snapshot(
    tree: Path, monkeypatch: pytest.MonkeyPatch, kind: str, unified: str | None, available: int
):
    if unified is None:
        monkeypatch.delenv("VLLM_XPU_UNIFIED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("VLLM_XPU_UNIFIED_MEMORY", unified)
    vllm = types.ModuleType("vllm")
    vllm.__path__ = []  # type: ignore[attr-defined]
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = FakePlatform(kind)  # type: ignore[attr-defined]
    utils = types.ModuleType("vllm.utils")
    utils.__path__ = [str(tree / "vllm" / "utils")]  # type: ignore[attr-defined]
    envs = types.ModuleType("vllm.envs")
    envs.VLLM_XPU_UNIFIED_MEMORY = bool(int(unified or "0"))  # type: ignore[attr-defined]
    vllm.envs = envs  # type: ignore[attr-defined]
    for name, mod in {
        "vllm": vllm,
        "vllm.platforms": platforms,
        "vllm.utils": utils,
        "vllm.envs": envs,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.accelerator, "memory_stats", lambda d=None: {}, raising=False)
    monkeypatch.setattr(torch.accelerator, "memory_reserved", lambda d=None: GiB, raising=False)
    vm = namedtuple("vm", "available total")(available, 32 * GiB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: vm)
    mem_utils = load_file(tree / "vllm/utils/mem_utils.py", "vllm.utils.mem_utils")
    return mem_utils.MemorySnapshot(device="cpu")


def test_env_var_registered_default_off(
    patched_0190: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VLLM_XPU_UNIFIED_MEMORY", raising=False)
    text = (patched_0190 / "vllm/envs.py").read_text()
    assert "VLLM_XPU_UNIFIED_MEMORY: bool = False" in text
    envs = load_file(patched_0190 / "vllm/envs.py", "stackbuild_test_vllm_envs")
    assert envs.VLLM_XPU_UNIFIED_MEMORY is False
    monkeypatch.setenv("VLLM_XPU_UNIFIED_MEMORY", "1")
    assert envs.VLLM_XPU_UNIFIED_MEMORY is True


def test_xpu_unified_uses_available_system_memory(
    patched_0190: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = _snapshot(patched_0190, monkeypatch, "xpu", "1", available=20 * GiB)
    assert snap.free_memory == 20 * GiB
    assert snap.cuda_memory == DEVICE_TOTAL - 20 * GiB


def test_xpu_unified_capped_at_device_total(
    patched_0190: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = _snapshot(patched_0190, monkeypatch, "xpu", "1", available=31 * GiB)
    assert snap.free_memory == DEVICE_TOTAL


@pytest.mark.parametrize(("kind", "unified"), [("xpu", None), ("xpu", "0"), ("cuda", "1")])
def test_device_query_kept_otherwise(
    patched_0190: Path, monkeypatch: pytest.MonkeyPatch, kind: str, unified: str | None
) -> None:
    snap = _snapshot(patched_0190, monkeypatch, kind, unified, available=20 * GiB)
    assert snap.free_memory == DEVICE_FREE


def test_pristine_under_reports(pristine_0190: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the bug the patch fixes: without it the page cache never counts as free
    snap = _snapshot(pristine_0190, monkeypatch, "xpu", "1", available=20 * GiB)
    assert snap.free_memory == DEVICE_FREE
