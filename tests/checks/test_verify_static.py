"""The static verify checks on the real vLLM 0.19.0 tree with 0.23.0's
gemma4_unified.py backported into it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import vllm_backport as vb

from stackbuild.checks import CheckStatus, imports, registry
from stackbuild.checks import compile as compile_check
from stackbuild.checks.imports import ModuleIndex, check_files

PY310 = Path("/root/.pyenv/versions/3.10.13/bin/python")
MM = "vllm/model_executor/models/gemma4_mm.py"


NETWORK_FIXTURES = frozenset({"workspace"})  # built from the real vLLM 0.19.0 release


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = tmp_path_factory.mktemp("verify-ws")
    vb.backport_tree(ws)
    return ws


@pytest.fixture()
def models_ws(tmp_path: Path, workspace: Path) -> Path:
    """A small changeable copy: the vllm package's models directory and its parents."""
    src, dst = workspace / "vllm", tmp_path / "vllm"
    for rel in ("vllm/__init__.py", "vllm/model_executor/__init__.py"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    shutil.copytree(src / "vllm/model_executor/models", dst / "vllm/model_executor/models")
    return tmp_path


# ---------------------------------------------------------------- import closure


def test_backport_without_helper_patch_fails_naming_the_missing_helpers(workspace: Path) -> None:
    ctx = vb.context(workspace, [vb.BACKPORT])
    [r] = imports.run(ctx)
    assert r.status is CheckStatus.FAIL
    assert f"{vb.BACKPORT}:46: name '_get_max_soft_tokens' is not defined in vllm.model_executor.models.gemma4_mm" in r.detail
    # assigned inside a function in 0.19.0, which does not make it a module attribute
    assert "'_SUPPORTED_SOFT_TOKENS'" in r.detail
    names = {u["what"].split("'")[1] for u in r.data["unresolved"]}
    assert names == {"_get_max_soft_tokens", "_SUPPORTED_SOFT_TOKENS"}


def test_pristine_files_resolve(workspace: Path) -> None:
    files = [MM, "vllm/model_executor/models/registry.py", "vllm/__init__.py", "vllm/config/__init__.py"]
    results = check_files(workspace / "vllm", files)
    assert [r.status for r in results] == [CheckStatus.PASS] * 4, [r.detail for r in results]
    assert results[0].data["imports"] > 20


def test_known_upstream_bug_in_019_is_found(workspace: Path) -> None:
    # vLLM 0.19.0's musicflamingo.py imports a name vllm.multimodal.inputs lacks
    [r] = check_files(workspace / "vllm", ["vllm/model_executor/models/musicflamingo.py"])
    assert r.status is CheckStatus.FAIL
    assert "name 'MultiModalDataDict' is not defined in vllm.multimodal.inputs" in r.detail


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_reexports_star_imports_getattr_and_submodules(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.core import Engine as Engine\n",
        "pkg/core.py": "class Engine: ...\nfrom pkg.starred import *\n",
        "pkg/starred.py": "__all__ = ['exported', '_private_but_listed']\nexported = 1\n_private_but_listed = 2\nhidden = 3\n",
        "pkg/lazy.py": "def __getattr__(name):\n    raise AttributeError(name)\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/leaf.py": "if True:\n    try:\n        X = 1\n    except Exception:\n        X = 2\nfor LOOPVAR in range(2): pass\n",
        "pkg/user.py": (
            "from pkg import Engine, sub\n"
            "from pkg.core import exported, _private_but_listed\n"
            "from pkg.core import hidden\n"          # line 3: not in starred.__all__
            "from pkg.lazy import anything\n"
            "from .sub import leaf\n"
            "from .sub.leaf import X, LOOPVAR\n"
            "import pkg.sub.leaf\n"
            "import pkg.nowhere\n"                   # line 8
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from pkg.gone import T\n"
            "try:\n"
            "    from pkg.optional import fast\n"
            "except ImportError:\n"
            "    fast = None\n"
            "def f():\n"
            "    from ..outside import y\n"       # line 17: climbs out of the tree
            "    from pkg.core import Missing\n"  # line 18: inside a function still counts
            "import contextlib\n"
            "with contextlib.suppress(ImportError):\n"
            "    import pkg._ext_gone\n"          # line 21: guarded as try/except is
            "with open('x') as fh:\n"
            "    import pkg.not_guarded\n"        # line 23: any other with guards nothing
        ),
    })
    [r] = check_files(tmp_path, ["pkg/user.py"], ModuleIndex(tmp_path))
    assert r.status is CheckStatus.FAIL
    hard = sorted((u["line"], u["what"]) for u in r.data["unresolved"] if not u["guard"])
    assert hard == [
        (3, "name 'hidden' is not defined in pkg.core"),
        (8, "module pkg.nowhere does not exist (no pkg/nowhere.py or pkg/nowhere/__init__.py)"),
        (17, "relative import climbs out of the tree: from ..outside import y"),
        (18, "name 'Missing' is not defined in pkg.core"),
        (23, "module pkg.not_guarded does not exist (no pkg/not_guarded.py or pkg/not_guarded/__init__.py)"),
    ]
    soft = sorted((u["line"], u["guard"]) for u in r.data["unresolved"] if u["guard"])
    assert soft == [(11, "if TYPE_CHECKING"), (13, "try/except ImportError"), (21, "with suppress(ImportError)")]
    assert any("__getattr__" in n for n in r.data["notes"])


def test_edited_file_is_parsed_again(tmp_path: Path) -> None:
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "A = 1\n", "pkg/b.py": "from pkg.a import B\n"})
    assert check_files(tmp_path, ["pkg/b.py"])[0].status is CheckStatus.FAIL
    (tmp_path / "pkg/a.py").write_text("A = 1\nB = 2  # now defined\n")
    assert check_files(tmp_path, ["pkg/b.py"])[0].status is CheckStatus.PASS


# ---------------------------------------------------------------- registry (static)


def test_registry_passes_for_an_architecture_019_registers(workspace: Path) -> None:
    ctx = vb.context(workspace, [], registry=("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM"))
    results = registry.run(ctx)
    assert [r.status for r in results] == [CheckStatus.PASS, CheckStatus.PASS], [r.detail for r in results]
    assert results[0].data["module"] == "vllm.model_executor.models.gemma4_mm"
    assert results[0].data["dict"] == "_MULTIMODAL_MODELS"


def test_registry_fails_naming_the_unregistered_backport(workspace: Path) -> None:
    ctx = vb.context(workspace, [], registry=("Gemma4UnifiedForConditionalGeneration",))
    [r] = registry.run(ctx)
    assert r.status is CheckStatus.FAIL
    assert r.subject == "Gemma4UnifiedForConditionalGeneration"
    assert r.detail.startswith("Gemma4UnifiedForConditionalGeneration: not registered")


def test_every_architecture_019_registers_resolves_statically(workspace: Path) -> None:
    reg = registry.read_registry(workspace / "vllm" / registry.REGISTRY_FILE)
    assert "_MULTIMODAL_MODELS" in reg.composed and len(reg.entries) > 300
    index = ModuleIndex(workspace / "vllm")
    bad = [r.detail for a in reg.entries if (r := registry.check_architecture(index, reg, a)).status is not CheckStatus.PASS]
    assert bad == []


def test_registry_fails_when_the_entry_is_deleted(models_ws: Path) -> None:
    path = models_ws / "vllm" / registry.REGISTRY_FILE
    text = path.read_text()
    line = '    "Gemma4ForConditionalGeneration": ("gemma4_mm", "Gemma4ForConditionalGeneration"),\n'
    assert line in text
    path.write_text(text.replace(line, ""))
    [r] = registry.run(vb.context(models_ws, [], registry=("Gemma4ForConditionalGeneration",)))
    assert r.status is CheckStatus.FAIL and "Gemma4ForConditionalGeneration: not registered" in r.detail


def test_registry_fails_when_the_class_or_module_is_missing(models_ws: Path) -> None:
    path = models_ws / "vllm" / registry.REGISTRY_FILE
    text = path.read_text().replace(
        "_MULTIMODAL_MODELS = {\n",
        "_MULTIMODAL_MODELS = {\n"
        '    "Gemma4UnifiedForConditionalGeneration": ("gemma4_mm", "Gemma4UnifiedForConditionalGeneration"),\n'
        '    "NoSuchModule": ("gemma9_mm", "Gemma9"),\n'
        '    "FunctionNotClass": ("gemma4_mm", "_get_max_soft_tokens_v2"),\n', 1)
    path.write_text(text)
    with (models_ws / "vllm/vllm/model_executor/models/gemma4_mm.py").open("a") as f:
        f.write("\ndef _get_max_soft_tokens_v2(): ...\n")
    ctx = vb.context(models_ws, [], registry=("Gemma4UnifiedForConditionalGeneration", "NoSuchModule", "FunctionNotClass"))
    unified, nomod, func = registry.run(ctx)
    assert unified.status is CheckStatus.FAIL
    assert "gemma4_mm.py does not define Gemma4UnifiedForConditionalGeneration" in unified.detail
    assert nomod.status is CheckStatus.FAIL and "module vllm.model_executor.models.gemma9_mm does not exist" in nomod.detail
    assert func.status is CheckStatus.FAIL and "is a function, not a class" in func.detail


# ---------------------------------------------------------------- compile


def test_compile_fails_naming_file_and_line(workspace: Path, tmp_path: Path) -> None:
    ws = tmp_path
    _write(ws / "vllm", {"vllm/ok.py": "x = 1\n", "vllm/broken.py": "x = 1\ndef f(:\n    pass\n"})
    results = compile_check.run(vb.context(ws, ["vllm/ok.py", "vllm/broken.py", "README.md", "vllm/deleted.py"]))
    by = {r.subject: r for r in results}
    assert by["vllm/ok.py"].status is CheckStatus.PASS
    assert by["vllm/broken.py"].status is CheckStatus.FAIL
    assert by["vllm/broken.py"].detail.startswith("vllm/broken.py:2: SyntaxError")
    assert by["vllm/deleted.py"].status is CheckStatus.SKIP
    assert "README.md" not in by
    assert not list((ws / "vllm").rglob("*.pyc")), "compiling must not write into the tree"


def test_compile_backport_passes(workspace: Path) -> None:
    r, read = compile_check.run(vb.context(workspace, [vb.BACKPORT]))
    assert r.subject == vb.BACKPORT and r.status is CheckStatus.PASS
    assert r.data["python"] == sys.version.split()[0]
    # the in-tree modules it imports (and vLLM's own kernel users) compile too
    assert read.subject == "files read by the checks" and read.status is CheckStatus.PASS
    assert read.data["files"] >= 10


@pytest.mark.skipif(not PY310.exists(), reason="needs a Python 3.10 interpreter")
def test_compile_uses_the_target_interpreter(tmp_path: Path) -> None:
    # except* is Python 3.11 syntax: fine here, a SyntaxError for a 3.10 target
    _write(tmp_path / "vllm", {"vllm/new_syntax.py": "try:\n    pass\nexcept* ValueError:\n    pass\n"})
    here = compile_check.run(vb.context(tmp_path, ["vllm/new_syntax.py"]))
    there = compile_check.run(vb.context(tmp_path, ["vllm/new_syntax.py"], python=PY310))
    assert here[0].status is CheckStatus.PASS
    assert there[0].status is CheckStatus.FAIL
    assert there[0].detail.startswith("vllm/new_syntax.py:3: SyntaxError") and "Python 3.10.13" in there[0].detail


def test_compile_with_a_missing_interpreter_fails(tmp_path: Path) -> None:
    _write(tmp_path / "vllm", {"vllm/a.py": "x = 1\n"})
    [r] = compile_check.run(vb.context(tmp_path, ["vllm/a.py"], python=tmp_path / "no-python"))
    assert r.status is CheckStatus.FAIL and "does not exist" in r.detail
