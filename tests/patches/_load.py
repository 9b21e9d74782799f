"""Load single files of a patched vLLM tree without importing vllm itself."""

from __future__ import annotations

import ast
import importlib.util
import types
from pathlib import Path
from typing import Any


def load_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def function_from_file(path: Path, func: str, namespace: dict[str, Any]) -> Any:
    """Compile one top-level function of `path` into `namespace` and return it."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
    code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
    exec(code, namespace)
    return namespace[func]
