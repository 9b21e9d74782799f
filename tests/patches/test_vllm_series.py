"""The vLLM 0.19.0 series: applies in order, carries DEP-3 headers, compiles,
and gives the gemma4_unified backport every name it imports."""

from __future__ import annotations

import ast
import datetime
import re
import shutil
from pathlib import Path

import fixtures
import pytest
from conftest import PATCH_DIR, SERIES, apply_series

pytestmark = pytest.mark.network

REQUIRED_HEADERS = ("Description", "Author", "Origin", "Forwarded", "Last-Update")


def _touched(patch: Path) -> list[str]:
    return re.findall(r"^\+\+\+ b/(\S+)$", patch.read_text(), flags=re.M)


def test_series_files_are_exactly_the_listed_ones() -> None:
    assert sorted(p.name for p in PATCH_DIR.glob("*.patch")) == sorted(SERIES)


@pytest.mark.parametrize("name", SERIES)
def test_dep3_header(name: str) -> None:
    text = (PATCH_DIR / name).read_text()
    header, sep, _ = text.partition("\n\ndiff --git ")
    assert sep, f"{name}: no blank line between header and diff"
    fields = dict(
        line.split(":", 1) for line in header.splitlines() if re.match(r"^[A-Z][\w-]*:", line)
    )
    for key in REQUIRED_HEADERS:
        assert key in fields, f"{name}: missing {key}"
    assert fields["Author"].strip() == "stackbuild"
    # a real date, not in the future (a patch edited must carry its new date)
    assert datetime.date.fromisoformat(fields["Last-Update"].strip()) <= datetime.date.today()


def test_series_applies_in_order_and_not_twice(tmp_path: Path, pristine_0190: Path) -> None:
    tree = tmp_path / "v"
    shutil.copytree(pristine_0190, tree)
    apply_series(tree)
    # applying any patch a second time must fail: nothing is silently re-applied
    import subprocess

    for name in SERIES:
        r = subprocess.run(
            ["git", "apply", "--check", str(PATCH_DIR / name)], cwd=tree, capture_output=True
        )
        assert r.returncode != 0, f"{name} applies twice"


def test_every_touched_file_compiles(patched_0190: Path) -> None:
    files = sorted({f for name in SERIES for f in _touched(PATCH_DIR / name)})
    assert "vllm/model_executor/layers/quantization/utils/xpu_int4_layout.py" in files
    for rel in files:
        path = patched_0190 / rel
        compile(path.read_text(), str(path), "exec")


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Module-level statements, looking inside top-level if/try blocks."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If):
            out += _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _top_level(node.body) + _top_level(node.orelse)
            for h in node.handlers:
                out += _top_level(h.body)
    return out


def _defined_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in _top_level(ast.parse(path.read_text()).body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names.add(n.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names.add((a.asname or a.name).split(".")[0])
    return names


def _module_file(tree: Path, module: str) -> Path | None:
    base = tree / Path(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.exists():
            return cand
    return None


def unresolved_imports(tree: Path, backport: Path) -> list[str]:
    """vllm names imported by `backport` that the tree does not define."""
    pkg = "vllm.model_executor.models"
    missing = []
    for node in ast.parse(backport.read_text()).body:
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            module = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1])
            module = f"{module}.{node.module}" if node.module else module
        elif node.module and node.module.split(".")[0] == "vllm":
            module = node.module
        else:
            continue
        path = _module_file(tree, module)
        if path is None:
            missing.append(module)
            continue
        defined = _defined_names(path)
        for alias in node.names:
            if alias.name not in defined and _module_file(tree, f"{module}.{alias.name}") is None:
                missing.append(f"{module}.{alias.name}")
    return missing


BACKPORT = "vllm/model_executor/models/gemma4_unified.py"


def test_gemma4_unified_imports_resolve_only_when_patched(
    tmp_path: Path, pristine_0190: Path, patched_0190: Path
) -> None:
    source = fixtures.vllm_tree("0.23.0") / BACKPORT
    assert unresolved_imports(pristine_0190, source) == [
        "vllm.model_executor.models.gemma4_mm._SUPPORTED_SOFT_TOKENS",
        "vllm.model_executor.models.gemma4_mm._get_max_soft_tokens",
    ]
    assert unresolved_imports(patched_0190, source) == []


def test_gemma4_unified_is_registered(patched_0190: Path) -> None:
    reg = (patched_0190 / "vllm/model_executor/models/registry.py").read_text()
    m = re.search(r"_MULTIMODAL_MODELS = \{(.*?)\n\}", reg, flags=re.S)
    assert m and re.search(
        r'"Gemma4UnifiedForConditionalGeneration": \(\s*"gemma4_unified",\s*'
        r'"Gemma4UnifiedForConditionalGeneration",\s*\)',
        m.group(1),
    )
    conv = (patched_0190 / "vllm/transformers_utils/model_arch_config_convertor.py").read_text()
    assert '"gemma4_unified": Gemma4ModelArchConfigConvertor' in conv
