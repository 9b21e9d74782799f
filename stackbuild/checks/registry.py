"""Model registry: each architecture the recipe lists resolves to a class.

Static (`run`): read vLLM's registry dicts from the patched tree's
vllm/model_executor/models/registry.py with the AST, follow the `_VLLM_MODELS`
composition, and check that the named module exists and defines the class. Works on
any machine, no import.

Dynamic (`run_dynamic`, needs the target interpreter): in a subprocess of that
interpreter, transformers' AutoConfig knows each model type and
`ModelRegistry.resolve_model_cls(architectures, model_config)` returns the class the
registry names.
"""

from __future__ import annotations

import ast
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stackbuild.checks import CheckContext, CheckResult, CheckStatus
from stackbuild.checks.imports import ModuleIndex
from stackbuild.checks.treefile import Unparsable, parse_python, present

CHECK = "registry"
CHECK_DYNAMIC = "registry-dynamic"
REGISTRY_FILE = "vllm/model_executor/models/registry.py"
MODELS_PACKAGE = "vllm.model_executor.models"
# The dict ModelRegistry is built from; the other dicts count only through it.
COMPOSED = "_VLLM_MODELS"


@dataclass(frozen=True)
class RegistryEntry:
    architecture: str
    module: str  # relative to vllm.model_executor.models ("gemma4_mm")
    class_name: str
    dict_name: str  # where the entry is written
    line: int


@dataclass(frozen=True)
class RegistryDicts:
    entries: dict[str, RegistryEntry]  # what ModelRegistry holds (through _VLLM_MODELS)
    unused: dict[str, RegistryEntry]  # entries in dicts that _VLLM_MODELS leaves out
    other: dict[str, tuple[str, str]]  # architecture -> (dict name, value) for non-entry dicts
    composed: tuple[str, ...]  # the dicts _VLLM_MODELS merges, in order


class RegistryUnreadable(Exception):
    """registry.py cannot be read or parsed (the compile check names file:line)."""

    def __init__(self, problem: Unparsable):
        self.problem = problem
        super().__init__(problem.render())


def read_registry(path: Path, rel: str = REGISTRY_FILE) -> RegistryDicts:
    """The registry dicts of one registry.py, by AST; RegistryUnreadable when it does
    not parse or cannot be read."""
    tree = parse_python(path, rel)
    if isinstance(tree, Unparsable):
        raise RegistryUnreadable(tree)
    dicts: dict[str, dict[str, RegistryEntry]] = {}
    merges: dict[str, list[str]] = {}
    other: dict[str, tuple[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name, value = node.target.id, node.value
        else:
            continue
        if not isinstance(value, ast.Dict):
            continue
        entries: dict[str, RegistryEntry] = {}
        parts: list[str] = []
        for k, v in zip(value.keys, value.values, strict=True):
            if k is None:  # **_OTHER_DICT
                if isinstance(v, ast.Name):
                    parts.append(v.id)
                continue
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                continue
            pair = _str_pair(v)
            if pair is not None:
                entries[k.value] = RegistryEntry(k.value, pair[0], pair[1], name, k.lineno)
            elif isinstance(v, ast.Constant) and isinstance(v.value, str):
                other.setdefault(k.value, (name, v.value))
        if entries or parts:
            dicts[name] = entries
            merges[name] = parts
    composed: list[str] = []

    def expand(name: str, seen: frozenset[str]) -> dict[str, RegistryEntry]:
        out: dict[str, RegistryEntry] = {}
        for part in merges.get(name, []):
            if part in dicts and part not in seen:
                if part not in composed:
                    composed.append(part)
                out.update(expand(part, seen | {part}))
        out.update(dicts.get(name, {}))
        return out

    if COMPOSED in dicts:
        registered = expand(COMPOSED, frozenset({COMPOSED}))
    else:  # an older or newer layout: every entry dict counts
        registered = {}
        for entries in dicts.values():
            registered.update(entries)
    unused = {
        arch: e for d in dicts.values() for arch, e in d.items() if arch not in registered
    }
    return RegistryDicts(registered, unused, other, tuple(composed))


def check_architecture(index: ModuleIndex, reg: RegistryDicts, arch: str) -> CheckResult:
    entry = reg.entries.get(arch)
    if entry is None:
        if arch in reg.unused:
            u = reg.unused[arch]
            why = f"listed in {u.dict_name} (line {u.line}), which {COMPOSED} does not include"
        elif arch in reg.other:
            d, val = reg.other[arch]
            why = f"not registered (listed in {d} with {val!r})"
        else:
            why = f"not registered in any registry dict ({', '.join(reg.composed) or 'none found'})"
        return CheckResult(CHECK, CheckStatus.FAIL, f"{arch}: {why} in {REGISTRY_FILE}", subject=arch)
    module = f"{MODELS_PACKAGE}.{entry.module}"
    data = {"module": module, "class": entry.class_name, "dict": entry.dict_name, "line": entry.line}
    where = f"{entry.dict_name} (line {entry.line}) -> ({entry.module!r}, {entry.class_name!r})"
    mod = index.module(module)
    if mod is None or mod.path is None:
        return CheckResult(CHECK, CheckStatus.FAIL,
                           f"{arch}: {where}, but module {module} does not exist in the patched tree",
                           subject=arch, data=data)
    found = index.origin(module, entry.class_name)
    if found is None:
        return CheckResult(CHECK, CheckStatus.FAIL,
                           f"{arch}: {where}, but {mod.path.relative_to(index.root)} does not define {entry.class_name}",
                           subject=arch, data=data)
    origin_mod, b = found
    data["defined_in"] = origin_mod
    if b.kind == "unparsable":
        return CheckResult(CHECK, CheckStatus.SKIP,
                           f"{arch}: {where}; not checked: {b.source_name} (see the compile check)",
                           subject=arch, data=data)
    if b.kind == "def":
        return CheckResult(CHECK, CheckStatus.FAIL,
                           f"{arch}: {entry.class_name} in {origin_mod} (line {b.line}) is a function, not a class",
                           subject=arch, data=data)
    detail = f"{entry.dict_name} -> {origin_mod}.{entry.class_name}"
    if b.kind == "class":
        detail += f" (class at line {b.line})"
    else:
        detail += f" (bound by {b.kind} at line {b.line}{'; ' + b.note if b.note else ''})"
    return CheckResult(CHECK, CheckStatus.PASS, detail, subject=arch, data=data)


def run(ctx: CheckContext) -> list[CheckResult]:
    archs = ctx.recipe.checks.registry
    if not archs:
        return [CheckResult(CHECK, CheckStatus.SKIP, "the recipe lists no architectures ([checks] registry)")]
    tree = ctx.tree(ctx.recipe.checks.registry_source)
    path = tree / REGISTRY_FILE
    if not present(path):
        return [CheckResult(CHECK, CheckStatus.FAIL, f"{path} does not exist", subject=arch) for arch in archs]
    try:
        reg = read_registry(path)
    except RegistryUnreadable as e:
        return [CheckResult(CHECK, CheckStatus.SKIP, f"not checked: {e.problem.render()} (see the compile check)",
                            subject=arch) for arch in archs]
    index = ModuleIndex(tree)
    return [check_architecture(index, reg, arch) for arch in archs]


# ---------------------------------------------------------------- dynamic

# Runs inside the target interpreter; prints one JSON document. Plain Python only.
_PROBE = r'''
import importlib, json, sys, traceback, types

req = json.loads(sys.argv[1])
out = {"python": sys.version.split()[0], "model_types": {}, "architectures": {}}

def missing_package(e):
    # transformers' lazy modules re-raise a missing dependency as a new ImportError
    # without a name ("Could not import module 'Gemma4Processor'"): name the root cause
    name, cur, seen = None, e, set()
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ImportError) and getattr(cur, "name", None):
            name = cur.name
        cur = cur.__cause__ or cur.__context__
    return name or str(e)

def torchvision_state():
    try:
        import torchvision  # noqa: F401
        import torch
        torch.ops.torchvision.nms  # the native ops: fail when built for another torch
        from torchvision.transforms.v2 import functional  # noqa: F401
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]

try:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    out["transformers"] = transformers.__version__
    for mt in req["model_types"]:
        out["model_types"][mt] = CONFIG_MAPPING_NAMES.get(mt)
except ImportError as e:
    out["import_error"] = {"what": "transformers", "package": missing_package(e), "error": str(e)}

tv = torchvision_state()
out["torchvision_unusable"] = tv

try:
    from vllm.model_executor.models.registry import ModelRegistry
    import vllm
    out["vllm"] = getattr(vllm, "__version__", "?")
except ImportError as e:
    out["registry_import_error"] = {"package": missing_package(e), "error": str(e)}
    print(json.dumps(out)); sys.exit(0)
except Exception as e:
    out["registry_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    print(json.dumps(out)); sys.exit(0)

# ModelConfig needs a model (a hub id or a folder with config.json, tokenizer, ...)
# and reaches the hub; resolve_model_cls reads only these attributes of it.
model_config = types.SimpleNamespace(
    model_impl="auto", convert_type="none", runner_type="generate",
    hf_config=types.SimpleNamespace(auto_map=None), trust_remote_code=False,
)
for arch, (module, cls) in req["architectures"].items():
    r = {"expected": f"{module}.{cls}"}
    try:
        importlib.import_module(module)
    except ImportError as e:
        root = missing_package(e)
        r["import_error"] = {"package": root, "error": str(e).splitlines()[0]
                             + ("" if root in str(e) else f" (root cause: no module {root!r})")}
    except Exception as e:
        r["load_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        r["traceback_mentions_torchvision"] = "torchvision" in traceback.format_exc()
    if "import_error" not in r and "load_error" not in r:
        try:
            got, resolved = ModelRegistry.resolve_model_cls([arch], model_config)
            r["got"] = f"{got.__module__}.{got.__qualname__}"
            r["resolved_arch"] = resolved
        except Exception as e:
            r["resolve_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    out["architectures"][arch] = r
print(json.dumps(out))
'''


def run_dynamic(ctx: CheckContext, timeout: float = 600) -> list[CheckResult]:
    archs = ctx.recipe.checks.registry
    model_types = ctx.recipe.checks.model_types
    if ctx.python is None:
        return [CheckResult(CHECK_DYNAMIC, CheckStatus.SKIP, "needs the target interpreter (--python PATH)")]
    if not archs and not model_types:
        return [CheckResult(CHECK_DYNAMIC, CheckStatus.SKIP,
                            "the recipe lists no architectures or model types ([checks])")]
    tree = ctx.tree(ctx.recipe.checks.registry_source)
    path = tree / REGISTRY_FILE
    expected: dict[str, tuple[str, str]] = {}
    results: list[CheckResult] = []
    try:
        reg = read_registry(path) if present(path) else None
    except RegistryUnreadable as bad:
        why = f"not checked: {bad.problem.render()} (see the compile check)"
        return [CheckResult(CHECK_DYNAMIC, CheckStatus.SKIP, why, subject=arch) for arch in archs] \
            or [CheckResult(CHECK_DYNAMIC, CheckStatus.SKIP, why)]
    for arch in archs:
        entry = reg.entries.get(arch) if reg else None
        if entry is None:
            results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL,
                                       f"{arch} is not in the patched tree's registry, so nothing to expect",
                                       subject=arch))
        else:
            expected[arch] = (f"{MODELS_PACKAGE}.{entry.module}", entry.class_name)
    req = json.dumps({"architectures": expected, "model_types": list(model_types)})
    try:
        proc = subprocess.run([str(ctx.python), "-c", _PROBE, req], capture_output=True, text=True,
                              timeout=timeout, cwd="/")
    except FileNotFoundError:
        return [CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL, f"interpreter {ctx.python} does not exist")]
    except subprocess.TimeoutExpired:
        return [CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL, f"{ctx.python} did not answer within {timeout:.0f} s")]
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL, f"{ctx.python} exited {proc.returncode}: {tail}")]
    env = f"python {out.get('python')}, transformers {out.get('transformers', 'missing')}, vllm {out.get('vllm', '?')}"

    for mt in model_types:
        if "import_error" in out:
            e = out["import_error"]
            results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL,
                                       f"module {e['package']!r} is missing in {ctx.python}: {e['error']}",
                                       subject=f"model type {mt}"))
        elif out["model_types"].get(mt):
            results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.PASS,
                                       f"AutoConfig knows {mt} -> {out['model_types'][mt]} ({env})",
                                       subject=f"model type {mt}"))
        else:
            results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL,
                                       f"transformers {out.get('transformers')} in {ctx.python} does not know model type {mt!r}",
                                       subject=f"model type {mt}"))
    for arch in expected:
        if "registry_import_error" in out:
            e = out["registry_import_error"]
            results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL,
                                       f"importing vLLM's model registry: module {e['package']!r} is missing ({e['error']})",
                                       subject=arch))
            continue
        if "registry_error" in out:
            results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL,
                                       f"importing vLLM's model registry failed: {out['registry_error']}", subject=arch))
            continue
        r = out["architectures"][arch]
        tv = out.get("torchvision_unusable")
        if "import_error" in r:
            e = r["import_error"]
            if e["package"].split(".")[0] == "torchvision":
                results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.SKIP,
                                           f"{r['expected']} needs torchvision, which is missing here ({e['error']})",
                                           subject=arch, data=r))
            else:
                results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL,
                                           f"importing {r['expected'].rpartition('.')[0]}: module {e['package']!r} is missing ({e['error']})",
                                           subject=arch, data=r))
        elif "load_error" in r:
            if tv and r.get("traceback_mentions_torchvision"):
                results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.SKIP,
                                           f"needs torchvision, which is unusable here ({tv}); import failed: {r['load_error']}",
                                           subject=arch, data=r))
            else:
                results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL,
                                           f"importing {r['expected'].rpartition('.')[0]} failed: {r['load_error']}",
                                           subject=arch, data=r))
        elif "resolve_error" in r:
            results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL,
                                       f"resolve_model_cls failed: {r['resolve_error']}", subject=arch, data=r))
        elif r.get("got") != r["expected"]:
            results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.FAIL,
                                       f"resolve_model_cls returned {r.get('got')}, expected {r['expected']}",
                                       subject=arch, data=r))
        else:
            results.append(CheckResult(CHECK_DYNAMIC, CheckStatus.PASS,
                                       f"resolve_model_cls -> {r['got']} ({env})", subject=arch, data=r))
    return results


def _str_pair(node: ast.expr) -> tuple[str, str] | None:
    if isinstance(node, ast.Tuple) and len(node.elts) == 2 and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
    ):
        a, b = node.elts
        assert isinstance(a, ast.Constant) and isinstance(b, ast.Constant)
        return str(a.value), str(b.value)
    return None
