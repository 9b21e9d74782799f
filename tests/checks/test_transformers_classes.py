"""The transformers check resolves what it names in the pinned release: the config class
of each model type, and the transformers imports of the registered model files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import vllm_backport as vb

from stackbuild.checks import CheckStatus
from stackbuild.checks import transformers_support as ts

TINY_TRANSFORMERS = {
    "transformers/__init__.py": "from .models import *\n",
    "transformers/models/__init__.py": "from .foo import *\nfrom .bar import *\n",
    "transformers/models/auto/__init__.py": "",
    "transformers/models/auto/configuration_auto.py":
        'CONFIG_MAPPING_NAMES = OrderedDict([("foo", "FooConfig"), ("bar", "BarConfig")])\n',
    "transformers/models/foo/__init__.py": "from .configuration_foo import *\n",
    "transformers/models/foo/configuration_foo.py": 'class FooConfig:\n    pass\n\n__all__ = ["FooConfig"]\n',
    "transformers/models/bar/__init__.py": "",  # names BarConfig in the mapping, defines nothing
}


def _tiny_release(cache: Path, version: str = "9.9.9") -> None:
    dest = cache / "wheels" / "transformers" / version / f"transformers-{version}-py3-none-any.whl"
    dest.parent.mkdir(parents=True)
    with zipfile.ZipFile(dest, "w") as z:
        for name, text in TINY_TRANSFORMERS.items():
            z.writestr(name, text)


def _tree(ws: Path, model_code: str) -> None:
    models = ws / "vllm" / "vllm" / "model_executor" / "models"
    models.mkdir(parents=True)
    (models / "registry.py").write_text('_VLLM_MODELS = {"FooForCausalLM": ("foo", "FooForCausalLM")}\n')
    (models / "foo.py").write_text(model_code)


def test_a_config_class_the_mapping_names_must_exist_in_the_release(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    _tiny_release(tmp_path / "cache")
    results = ts.run(vb.context(tmp_path, [], model_types=("foo", "bar"), transformers="==9.9.9"))
    by = {r.subject: r for r in results}
    assert by["foo"].status is CheckStatus.PASS
    assert "transformers/models/foo/configuration_foo.py:1" in by["foo"].detail
    assert by["bar"].status is CheckStatus.FAIL
    assert "transformers.models.bar defines no class BarConfig" in by["bar"].detail


def test_the_registered_model_files_transformers_imports_resolve(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    _tiny_release(tmp_path / "cache")
    _tree(tmp_path, "from transformers import FooConfig\nfrom transformers.models.foo import FooMissing\n"
                    "import transformers.models.baz\n")
    results = ts.run(vb.context(tmp_path, [], registry=("FooForCausalLM",), model_types=("foo",),
                                transformers="==9.9.9"))
    [model] = [r for r in results if r.subject == "vllm/model_executor/models/foo.py"]
    assert model.status is CheckStatus.FAIL
    assert "foo.py:2: cannot import name 'FooMissing' from transformers.models.foo in transformers 9.9.9" in model.detail
    assert "foo.py:3: module transformers.models.baz does not exist" in model.detail
    assert "foo.py:1" not in model.detail  # found through two star imports


@pytest.mark.network
def test_the_gemma4_unified_backport_needs_a_newer_transformers_than_5_5_0(
        tmp_path: Path, seeded_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(seeded_cache))
    out = vb.applied_tree(tmp_path)
    if out is None:
        pytest.skip(f"the Gemma 4 patch series is not complete in {vb.PATCH_DIR}")
    archs = ("Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration")
    old = ts.run(vb.context(tmp_path, out[1], registry=archs, model_types=("gemma4",), transformers="==5.5.0"))
    by = {r.subject: r for r in old}
    unified = by["vllm/model_executor/models/gemma4_unified.py"]
    assert unified.status is CheckStatus.FAIL
    assert "gemma4_unified.py:23: module transformers.models.gemma4_unified.configuration_gemma4_unified " \
           "does not exist in transformers 5.5.0" in unified.detail
    assert by["vllm/model_executor/models/gemma4_mm.py"].status is CheckStatus.PASS
    new = ts.run(vb.context(tmp_path, out[1], registry=archs, model_types=("gemma4",), transformers="==5.10.2"))
    assert all(r.status is CheckStatus.PASS for r in new), [r.detail for r in new]
