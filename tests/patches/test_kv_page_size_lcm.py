"""hybrid-kv-page-size-lcm.patch: unify_kv_cache_spec_page_size pads to the LCM.

The patched function is compiled out of the patched kv_cache_utils.py (vllm's
import chain needs ~36 packages) and run on synthetic specs that compute their
page sizes the way vLLM's AttentionSpec (page grows with block_size) and
MambaSpec (fixed state page, paddable) do."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from _load import function_from_file

pytestmark = pytest.mark.network

KV_UTILS = "vllm/v1/core/kv_cache_utils.py"


@dataclass(frozen=True)
class AttnSpec:
    block_size: int
    bytes_per_token: int
    page_size_padded: int | None = None

    @property
    def page_size_bytes(self) -> int:
        real = self.block_size * self.bytes_per_token
        if self.page_size_padded is not None:
            assert self.page_size_padded >= real
            return self.page_size_padded
        return real


@dataclass(frozen=True)
class MambaLikeSpec:
    block_size: int
    state_bytes: int
    page_size_padded: int | None = None

    @property
    def page_size_bytes(self) -> int:
        if self.page_size_padded is not None:
            assert self.page_size_padded >= self.state_bytes
            return self.page_size_padded
        return self.state_bytes


@dataclass(frozen=True)
class FixedSpec:  # a page that neither scales nor pads
    block_size: int
    page: int

    @property
    def page_size_bytes(self) -> int:
        return self.page


def _unify(tree: Path):
    ns = {
        "math": math,
        "replace": replace,
        "logger": logging.getLogger("test"),
        "KVCacheSpec": object,
    }
    return function_from_file(tree / KV_UTILS, "unify_kv_cache_spec_page_size", ns)


def test_pristine_raises_where_patched_unifies(pristine_0190: Path, patched_0190: Path) -> None:
    # attention page 16*4096 = 65536, Mamba state 98304 = 1.5 * 65536:
    # the largest page (Mamba) is not a multiple of the attention page
    specs = {
        "attn.0": AttnSpec(block_size=16, bytes_per_token=4096),
        "mamba.1": MambaLikeSpec(block_size=16, state_bytes=98304),
    }
    with pytest.raises(NotImplementedError):
        _unify(pristine_0190)(specs)

    out = _unify(patched_0190)(specs)
    lcm = math.lcm(65536, 98304)  # 196608
    assert {s.page_size_bytes for s in out.values()} == {lcm}
    assert out["attn.0"].block_size == 16 * lcm // 65536  # 48 tokens, not padded
    assert out["attn.0"].page_size_padded is None
    assert out["mamba.1"].block_size == 16  # Mamba keeps its block size
    assert out["mamba.1"].page_size_padded == lcm


def test_multiple_case_unchanged_from_upstream(patched_0190: Path) -> None:
    specs = {
        "a": AttnSpec(block_size=16, bytes_per_token=1024),
        "b": AttnSpec(block_size=16, bytes_per_token=4096),
    }
    out = _unify(patched_0190)(specs)
    assert out["b"] is specs["b"]
    assert out["a"].block_size == 64 and out["a"].page_size_bytes == 65536


def test_uniform_pages_returned_as_is(patched_0190: Path) -> None:
    specs = {"a": AttnSpec(16, 1024), "b": MambaLikeSpec(16, 16384)}
    assert _unify(patched_0190)(specs) is specs


def test_padded_attention_is_padded_not_grown(patched_0190: Path) -> None:
    specs = {
        "a": AttnSpec(block_size=16, bytes_per_token=1000, page_size_padded=24000),
        "m": MambaLikeSpec(block_size=16, state_bytes=36000),
    }
    out = _unify(patched_0190)(specs)
    assert out["a"].block_size == 16 and out["a"].page_size_bytes == 72000
    assert out["m"].page_size_bytes == 72000


def test_unpaddable_fixed_page_is_refused_with_layer_name(patched_0190: Path) -> None:
    specs = {"a": AttnSpec(16, 4096), "weird.3": FixedSpec(16, 98304)}
    with pytest.raises(NotImplementedError, match="weird.3"):
        _unify(patched_0190)(specs)
