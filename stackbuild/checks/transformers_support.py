"""Transformers support: the pinned transformers release knows the recipe's model types.

Read from the release itself (its wheel, downloaded once into the cache, opened as a
zip, never installed): `CONFIG_MAPPING_NAMES` of models/auto/configuration_auto.py,
following where it is built (5.x imports it from the generated auto_mappings.py and
then `.update()`s it). No version table is kept here.
"""

from __future__ import annotations

import ast
import posixpath
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement

from stackbuild.checks import CheckContext, CheckResult, CheckStatus, pinned_wheel
from stackbuild.checks.wheel_api import WheelAPI
from stackbuild.errors import SourceError
from stackbuild.recipe import Pin

CHECK = "transformers"
PROJECT = "transformers"
AUTO_FILE = "transformers/models/auto/configuration_auto.py"
MAPPING = "CONFIG_MAPPING_NAMES"
SPECIAL = "SPECIAL_MODEL_TYPE_TO_MODULE_NAME"


@dataclass(frozen=True)
class ReleaseModelTypes:
    version: str
    wheel: Path
    config_mapping: dict[str, str]  # model type -> config class name
    defined_in: str  # the file whose statements built the mapping
    special_modules: dict[str, str] = field(default_factory=dict)  # model type -> models/ package


def pinned_version(pin: Pin) -> str | None:
    """The one release an exact pin names ("==5.10.2"), else None."""
    if not pin.spec:
        return None
    spec = list(Requirement(f"{pin.name}{pin.spec}").specifier)
    if len(spec) == 1 and spec[0].operator in ("==", "===") and "*" not in spec[0].version:
        return spec[0].version
    return None


def fetch_wheel(version: str, index: str | None = None) -> Path:
    """The transformers wheel of `version`, from the cache or the index (sha256 checked
    against what the index publishes)."""
    return pinned_wheel.fetch_wheel(PROJECT, version, index)


def release_model_types(wheel: Path, version: str) -> ReleaseModelTypes:
    try:
        with zipfile.ZipFile(wheel) as z:
            mapping, where = _evaluate_mapping(z, AUTO_FILE, MAPPING, set())
            special, _ = _evaluate_mapping(z, AUTO_FILE, SPECIAL, set())
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)  # a damaged cache entry is fetched again next time
        raise SourceError("not a valid wheel (removed from the cache)", file=wheel) from None
    if mapping is None:
        raise SourceError(f"cannot find {MAPPING} in {AUTO_FILE}: the layout of this release is unknown", file=wheel)
    return ReleaseModelTypes(version, wheel, mapping, where, special or {})


def run(ctx: CheckContext) -> list[CheckResult]:
    model_types = ctx.recipe.checks.model_types
    if not model_types:
        return [CheckResult(CHECK, CheckStatus.SKIP, "the recipe lists no model types ([checks] model_types)")]
    pin = ctx.recipe.pin(PROJECT)
    if pin is None:
        return [CheckResult(CHECK, CheckStatus.FAIL, "the recipe pins no transformers release ([pins] transformers)",
                            subject=mt) for mt in model_types]
    version = pinned_version(pin)
    if version is None:
        return [CheckResult(CHECK, CheckStatus.SKIP,
                            f"pin transformers {pin.spec or pin.url!r} names no single release to look into",
                            subject=mt) for mt in model_types]
    wheel = fetch_wheel(version, pin.index)
    release = release_model_types(wheel, version)
    api = WheelAPI(wheel)
    results = []
    for mt in model_types:
        cls = release.config_mapping.get(mt)
        if cls:
            # AutoConfig imports the class from transformers.models.<module>: it must be there
            module = f"transformers.models.{model_type_module(release, mt)}"
            if api.module(module) is None and api.module(module.replace(".models.", ".models.deprecated.")):
                module = module.replace(".models.", ".models.deprecated.")
            found = api.resolve(f"{module}.{cls}")
            if found is None or found.kind != "class":
                results.append(CheckResult(CHECK, CheckStatus.FAIL,
                                           f"transformers {version}: {mt} -> {cls} ({release.defined_in}), but "
                                           f"{module} defines no class {cls}",
                                           subject=mt, data={"version": version, "config_class": cls}))
                continue
            results.append(CheckResult(CHECK, CheckStatus.PASS,
                                       f"transformers {version}: {mt} -> {cls} (class at {found.where})",
                                       subject=mt, data={"version": version, "config_class": cls,
                                                         "defined_at": found.where}))
        else:
            near = sorted(k for k in release.config_mapping if k.split("_")[0] == mt.split("_")[0])[:6]
            hint = f" (it has: {', '.join(near)})" if near else ""
            results.append(CheckResult(CHECK, CheckStatus.FAIL,
                                       f"transformers {version} has no model type {mt!r} in {MAPPING}{hint}",
                                       subject=mt, data={"version": version, "similar": near}))
    return results + check_model_imports(ctx, api)


def model_type_module(release: ReleaseModelTypes, model_type: str) -> str:
    """transformers' `model_type_to_module_name`: the models/ package of a model type
    (a few types live in another's package: SPECIAL_MODEL_TYPE_TO_MODULE_NAME)."""
    special = release.special_modules.get(model_type)
    return special if special else model_type.replace("-", "_")


def check_model_imports(ctx: CheckContext, api: WheelAPI) -> list[CheckResult]:
    """The transformers names the registered architectures' model files (and the files the
    series touches) import exist in the pinned release."""
    from stackbuild.checks.api_closure import check_tree
    from stackbuild.checks.registry import (
        MODELS_PACKAGE,
        REGISTRY_FILE,
        RegistryUnreadable,
        read_registry,
    )

    source = ctx.recipe.checks.registry_source
    tree = ctx.tree(source)
    files: list[str] = []
    registry = tree / REGISTRY_FILE
    if ctx.recipe.checks.registry and registry.is_file():
        try:
            reg = read_registry(registry)
        except RegistryUnreadable:
            reg = None  # the compile and registry checks say why
        for arch in ctx.recipe.checks.registry:
            entry = reg.entries.get(arch) if reg else None
            if entry is not None:
                rel = f"{MODELS_PACKAGE.replace('.', '/')}/{entry.module.replace('.', '/')}.py"
                if (tree / rel).is_file() and rel not in files:
                    files.append(rel)
    touched = [t for t in ctx.touched.get(source, ()) if t.endswith(".py")]
    files += [t for t in touched if t not in files]
    if not files:
        return []
    return check_tree(api, tree, files, set(touched), package=PROJECT, dist=PROJECT, check=CHECK,
                      check_calls=False)


# ---------------------------------------------------------------- reading the mapping


def _evaluate_mapping(z: zipfile.ZipFile, file: str, name: str, seen: set[tuple[str, str]]) -> tuple[dict[str, str] | None, str]:
    """The value `name` has after the module-level statements of `file` run, for the
    few forms transformers uses (literal dicts and pair lists, OrderedDict(...),
    `**` merges, `.update(...)`, `from .x import name`)."""
    if (file, name) in seen:
        return None, file
    seen.add((file, name))
    try:
        source = z.read(file)
    except KeyError:
        return None, file
    try:
        tree = ast.parse(source, filename=file)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # the wheel's file is input: unreadable, not a crash
        return None, file
    env: dict[str, dict[str, str]] = {}
    where = file
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level and any((a.asname or a.name) == name for a in node.names):
            alias = next(a for a in node.names if (a.asname or a.name) == name)
            base = posixpath.dirname(file)
            for _ in range(node.level - 1):
                base = posixpath.dirname(base)
            target = posixpath.join(base, *(node.module or "").split(".")) + ".py"
            value, where = _evaluate_mapping(z, target, alias.name, seen)
            if value is not None:
                env[name] = value
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if node.value is not None and any(isinstance(t, ast.Name) and t.id == name for t in targets):
                value = _eval(node.value, env)
                if value is not None:
                    env[name] = value
                    where = file
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            f = node.value.func
            if (isinstance(f, ast.Attribute) and f.attr == "update" and isinstance(f.value, ast.Name)
                    and f.value.id == name and name in env):
                for arg in node.value.args:
                    extra = _eval(arg, env)
                    if extra:
                        env[name].update(extra)
    return env.get(name), where


def _eval(node: ast.expr, env: dict[str, dict[str, str]]) -> dict[str, str] | None:
    if isinstance(node, ast.Name):
        return dict(env[node.id]) if node.id in env else None
    if isinstance(node, ast.Dict):
        out: dict[str, str] = {}
        for k, v in zip(node.keys, node.values, strict=True):
            if k is None:
                part = _eval(v, env)
                if part:
                    out.update(part)
            elif isinstance(k, ast.Constant) and isinstance(v, ast.Constant):
                out[str(k.value)] = str(v.value)
        return out
    if isinstance(node, ast.List | ast.Tuple):
        out = {}
        for e in node.elts:
            if (isinstance(e, ast.Tuple) and len(e.elts) == 2 and isinstance(e.elts[0], ast.Constant)
                    and isinstance(e.elts[1], ast.Constant)):
                out[str(e.elts[0].value)] = str(e.elts[1].value)
        return out
    if not isinstance(node, ast.Call):
        return None
    callee = node.func.value if isinstance(node.func, ast.Subscript) else node.func  # OrderedDict[str, str](...)
    if isinstance(callee, ast.Name) and callee.id in ("OrderedDict", "dict"):
        out = {}
        for arg in node.args:
            part = _eval(arg, env)
            if part:
                out.update(part)
        for kw in node.keywords:
            if kw.arg is None:
                part = _eval(kw.value, env)
                if part:
                    out.update(part)
            elif isinstance(kw.value, ast.Constant):
                out[kw.arg] = str(kw.value.value)
        return out
    return None
