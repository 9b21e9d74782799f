"""Transformers support, read from the real release wheels on the package index."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import vllm_backport as vb

from stackbuild.checks import CheckStatus
from stackbuild.checks import transformers_support as ts
from stackbuild.errors import SourceError
from stackbuild.recipe import Pin


@pytest.mark.network
def test_5_10_2_has_gemma4_unified_and_5_5_0_does_not(tmp_path: Path) -> None:
    new = ts.run(vb.context(tmp_path, [], model_types=("gemma4", "gemma4_unified"), transformers="==5.10.2"))
    assert [r.status for r in new] == [CheckStatus.PASS, CheckStatus.PASS], [r.detail for r in new]
    assert new[1].data["config_class"] == "Gemma4UnifiedConfig"
    old = ts.run(vb.context(tmp_path, [], model_types=("gemma4", "gemma4_unified"), transformers="==5.5.0"))
    assert old[0].status is CheckStatus.PASS and old[0].data["config_class"] == "Gemma4Config"
    assert old[1].status is CheckStatus.FAIL
    assert "transformers 5.5.0 has no model type 'gemma4_unified'" in old[1].detail


@pytest.mark.network
def test_mapping_follows_generated_file_and_updates() -> None:
    # 5.10.2 imports CONFIG_MAPPING_NAMES from auto_mappings.py, then .update()s and rebuilds it
    wheel = ts.fetch_wheel("5.10.2")
    release = ts.release_model_types(wheel, "5.10.2")
    assert release.config_mapping["gemma4_unified"] == "Gemma4UnifiedConfig"
    assert release.config_mapping["gpt-sw3"] == "GPT2Config"  # OrderedDict(**{...}, **CONFIG_MAPPING_NAMES)
    assert release.config_mapping["EvollaModel"] == "EvollaConfig"  # CONFIG_MAPPING_NAMES.update({...})
    assert len(release.config_mapping) > 600
    assert wheel.name == "transformers-5.10.2-py3-none-any.whl"
    assert ts.fetch_wheel("5.10.2") == wheel  # cached: no second download


def test_unreachable_index_is_one_error_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    index = "http://127.0.0.1:9/simple"
    with pytest.raises(SourceError) as e:
        ts.fetch_wheel("5.10.2", index)
    assert e.value.file == index and "unreachable" in e.value.render()


def test_non_exact_pin_is_skipped_not_passed(tmp_path: Path) -> None:
    [r] = ts.run(vb.context(tmp_path, [], model_types=("gemma4",), transformers=">=5.5"))
    assert r.status is CheckStatus.SKIP and "names no single release" in r.detail
    assert ts.pinned_version(Pin("transformers", "==5.10.2")) == "5.10.2"


def test_no_pin_fails(tmp_path: Path) -> None:
    [r] = ts.run(vb.context(tmp_path, [], model_types=("gemma4",)))
    assert r.status is CheckStatus.FAIL and "pins no transformers release" in r.detail


@pytest.mark.parametrize("body", ["CONFIG_MAPPING_NAMES = (", "CONFIG_MAPPING_NAMES = " + "+".join(["x"] * 6000)])
def test_a_wheel_whose_mapping_file_does_not_parse_is_one_error(tmp_path: Path, body: str) -> None:
    """The wheel is input: a mapping file that is not Python, or nested past the parser's
    recursion, is 'layout unknown' (exit 2 naming the wheel), not an internal error."""
    wheel = tmp_path / "transformers-9.9.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(ts.AUTO_FILE, body + "\n")
    with pytest.raises(SourceError, match="layout of this release is unknown"):
        ts.release_model_types(wheel, "9.9.9")
