"""Recipes: schema, loading, `extends`, validation.

A recipe is a TOML file in recipes/. Every error names the file and the key. The
result of loading is a frozen `Recipe` with `extends` resolved and platform defaults
applied; nothing downstream reads TOML.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from stackbuild.errors import RecipeError
from stackbuild.inputs import read_user_text
from stackbuild.platforms import PLATFORMS, Platform
from stackbuild.sources.limits import ArchiveLimits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Recipe and source names reach file names, shell scripts and git refs: keep them plain.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
NAME_RULE = "lowercase letters, digits, '.', '_' and '-', starting with a letter or digit"
PIN_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")  # PEP 508 names
# patch names become file names (refresh writes patches/SOURCE/VERSION/NAME.patch) and git trailers
PATCH_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# newlines and other control characters (C0, DEL, C1, Unicode line separators) end a
# shell line or a heredoc wherever a value is rendered; no recipe value needs one
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
ALLOW_DIRS_ENV = "STACKBUILD_ALLOW_DIRS"


_EXACT_PIN = re.compile(r"([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==([^\s,;@\[\]*]+)")


def exact_pin(text: str) -> tuple[str, str]:
    """(name, version) of a release pinned as NAME==VERSION (a pypi source, a backport).

    The plain form, the one recipes use, is read here; anything else goes through
    packaging's requirement parser, imported only then: it costs about 20 ms, paid by
    every command's start-up when imported with this module. Raises ValueError with the
    reason when the text is not one exact pin."""
    m = _EXACT_PIN.fullmatch(text)
    if m:
        try:
            Version(m.group(2))
            return m.group(1), m.group(2)
        except InvalidVersion:
            pass  # let the full parser word the error
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        req = Requirement(text)
    except InvalidRequirement as e:
        raise ValueError(f"not a requirement: {e}") from None
    specs = list(req.specifier)
    if req.extras or req.marker or req.url or len(specs) != 1 or specs[0].operator != "==" \
            or "*" in specs[0].version:
        raise ValueError(f"must pin one exact version (name==version), got {text!r}")
    return req.name, specs[0].version


class SourceKind(str, Enum):
    PYPI = "pypi"
    GIT = "git"
    LOCAL = "local"


@dataclass(frozen=True)
class Source:
    name: str
    kind: SourceKind
    # pypi
    requirement: str | None = None  # "vllm==0.19.0"
    sha256: str | None = None
    # git
    url: str | None = None
    tag: str | None = None
    commit: str | None = None
    branch: str | None = None
    float: bool = False
    # local
    path: str | None = None
    # pypi: what its archive may expand to ([sources.NAME.limits]); None: the defaults
    limits: ArchiveLimits | None = None

    @property
    def project(self) -> str | None:
        return exact_pin(self.requirement)[0] if self.requirement else None

    @property
    def version(self) -> str | None:
        return exact_pin(self.requirement)[1] if self.requirement else None

    def describe(self) -> str:
        if self.kind is SourceKind.PYPI:
            return f"{self.requirement} (sdist sha256 {self.sha256[:12] if self.sha256 else '?'})"
        if self.kind is SourceKind.GIT:
            ref = self.commit or self.tag or f"branch {self.branch}"
            return f"{self.url} @ {ref}"
        return f"local {self.path}"


class PatchKind(str, Enum):
    FILE = "file"  # a patch file in this repository
    FROM_SOURCE = "from-source"  # a patch file inside another pinned source
    BACKPORT = "backport"  # whole files taken from a newer upstream release


@dataclass(frozen=True)
class PatchEntry:
    name: str
    kind: PatchKind
    source: str  # the source it applies to
    sha256: str | None
    strip: int = 1
    fuzz: int = 0  # max fuzz lines allowed; 0 refuses fuzz
    file: str | None = None  # FILE: path relative to the repo root
    from_source: str | None = None  # FROM_SOURCE: the source holding the patch
    path: str | None = None  # FROM_SOURCE: path inside that source
    release: str | None = None  # BACKPORT: "vllm==0.23.0"
    files: tuple[str, ...] = ()  # BACKPORT: files to take from the release
    description: str | None = None
    test: str | None = None  # the test that exercises this patch
    # set by `stackbuild refresh` on an entry a person must decide on ("obsolete: ..."):
    # apply refuses the series while any entry has it
    refresh_verdict: str | None = None


@dataclass(frozen=True)
class Pin:
    name: str
    spec: str = ""  # "==5.10.2"; empty for a direct URL
    index: str | None = None
    url: str | None = None
    sha256: str | None = None
    # True: the sha256 is not known yet and is recorded on first download (said as such)
    trust_on_first_use: bool = False
    override: str | None = None  # why this pin overrides what a patched package declares
    markers: str | None = None

    def requirement(self) -> str:
        if self.url:
            return f"{self.name} @ {self.url}"
        req = f"{self.name}{self.spec}"
        return f"{req}; {self.markers}" if self.markers else req


@dataclass(frozen=True)
class BuildSettings:
    target_device: str = "xpu"
    max_jobs: int | None = None
    kernels_from_source: bool = False
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class EnvironmentSettings:
    vars: tuple[tuple[str, str], ...] = ()
    forbid: tuple[tuple[str, str], ...] = ()  # (package, reason)
    python: str = ">=3.10,<3.13"


@dataclass(frozen=True)
class LockSettings:
    resolver: str = "pip-tools"  # pip-tools | uv: uv applies overrides to transitive requirements too


@dataclass(frozen=True)
class Checks:
    registry: tuple[str, ...] = ()  # architectures that must resolve
    model_types: tuple[str, ...] = ()  # transformers model types that must exist
    numerics: tuple[str, ...] = ()  # numerics suites: int4-linear, int4-moe
    thresholds: tuple[tuple[str, float], ...] = ()  # e.g. ("bf16.rel", 1e-2)
    registry_source: str = "vllm"


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    platform: Platform
    description: str = ""
    extends: tuple[str, ...] = ()  # the chain, nearest first
    sources: tuple[Source, ...] = ()
    patches: tuple[PatchEntry, ...] = ()
    pins: tuple[Pin, ...] = ()
    build: BuildSettings = field(default_factory=BuildSettings)
    environment: EnvironmentSettings = field(default_factory=EnvironmentSettings)
    checks: Checks = field(default_factory=Checks)
    lock: LockSettings = field(default_factory=LockSettings)
    raw: str = ""  # canonical JSON of the resolved data, for hashing

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    def pin(self, name: str) -> Pin | None:
        for p in self.pins:
            if p.name == name:
                return p
        return None

    @property
    def is_base(self) -> bool:
        """A base (such as xpu-base) only exists to be extended: it has no sources, so
        there is nothing to apply, build, lock or verify."""
        return not self.sources

    @property
    def root(self) -> Path:
        """The project the recipe belongs to: recipes/ and patches/, work/, lockfiles/ beside it."""
        return project_of(self.path)

    @property
    def sha256(self) -> str:
        import hashlib  # not paid at start-up (OpenSSL load, ~3 ms)

        return hashlib.sha256(self.raw.encode()).hexdigest()

    @property
    def patched_sources(self) -> tuple[str, ...]:
        seen: list[str] = []
        for p in self.patches:
            if p.source not in seen:
                seen.append(p.source)
        return tuple(seen)

    def to_dict(self) -> dict[str, Any]:
        d = json.loads(self.raw)
        d["name"] = self.name
        d["path"] = str(self.path)
        d["extends"] = list(self.extends)
        d["platform"] = self.platform.to_dict()
        d["sha256"] = self.sha256
        return d


# ---------------------------------------------------------------- loading


TOP_KEYS = {
    "name", "description", "extends", "platform", "sources", "patches", "pins",
    "build", "environment", "checks", "lock",
}
SOURCE_KEYS = {"pypi", "sha256", "git", "tag", "commit", "branch", "float", "path", "limits"}
LIMIT_KEYS = {"max_total_mb", "max_members", "max_member_mb"}
PATCH_KEYS = {
    "name", "file", "from", "path", "backport", "files", "source", "sha256", "strip",
    "fuzz", "description", "test", "refresh_verdict",
}
PIN_KEYS = {"version", "index", "url", "sha256", "trust_on_first_use", "override", "markers"}
BUILD_KEYS = {"target_device", "max_jobs", "kernels_from_source", "env"}
ENV_KEYS = {"vars", "forbid", "python"}
LOCK_KEYS = {"resolver"}
CHECK_KEYS = {"registry", "model_types", "numerics", "thresholds", "registry_source"}


def project_of(recipe_path: Path) -> Path:
    """The project a recipe file belongs to: the folder holding its recipes/ folder."""
    return recipe_path.parent.parent


def recipes_dir(root: Path | None = None) -> Path:
    return (root or project_root()) / "recipes"


def project_root() -> Path:
    """The stackbuild checkout holding recipes/ and patches/: the current directory or
    one of its parents, else the directory this package was installed from."""
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "recipes").is_dir() and (d / "patches").is_dir():
            return d
    pkg_root = Path(__file__).resolve().parent.parent
    return pkg_root


def find_recipe(name_or_path: str, root: Path | None = None) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.exists():
        return p.resolve()
    candidate = recipes_dir(root) / f"{name_or_path}.toml"
    if candidate.exists():
        return candidate.resolve()
    known = ", ".join(list_recipe_names(root)) or "none"
    raise RecipeError(f"no recipe named {name_or_path!r} (known: {known})", file=candidate)


def list_recipe_names(root: Path | None = None) -> list[str]:
    d = recipes_dir(root)
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def _read_toml(path: Path) -> dict[str, Any]:
    text = read_user_text(path, "recipe", RecipeError)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"not valid TOML: {e}", file=path) from None
    except RecursionError:
        raise RecipeError("not a recipe: arrays or tables nested too deeply", file=path) from None


Origins = dict[str, Path]  # dotted key ("sources.vllm.sha256") -> the file that set it


def _patch_list(value: Any, path: Path) -> list[Any]:
    """The top-level `patches` of one file: an array of tables, checked before any merge
    (a string would otherwise be concatenated character by character)."""
    if not isinstance(value, list):
        raise RecipeError(f"must be an array of tables ([[patches]]), got {type(value).__name__} {value!r}",
                          file=path, key="patches")
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise RecipeError(f"must be a table ([[patches]]), got {type(entry).__name__} {entry!r}",
                              file=path, key=f"patches[{i}]")
    return value


def _merge(base: dict[str, Any], child: dict[str, Any], top: bool = True) -> dict[str, Any]:
    """Tables merge key by key (child wins); the top-level patch series concatenates.
    A table that merely has a key called `patches` merges like any other table."""
    out = dict(base)
    for k, v in child.items():
        if top and k == "patches":
            out[k] = list(base.get(k, [])) + list(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, top=False)
        else:
            out[k] = v
    return out


def _origins(data: dict[str, Any], path: Path, prefix: str = "") -> Origins:
    out: Origins = {}
    for k, v in data.items():
        if k.startswith("__"):
            continue
        key = f"{prefix}{k}"
        out[key] = path
        if isinstance(v, dict):
            out.update(_origins(v, path, key + "."))
    return out


def _check_text(value: Any, path: Path, key: str) -> None:
    """Refuse control characters (newlines included) in every string and key of one file."""
    if isinstance(value, str):
        m = CONTROL_RE.search(value)
        if m:
            raise RecipeError(f"holds a control character ({m.group()!r}); recipe values are single-line text",
                              file=path, key=key)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k.startswith("__"):
                continue
            _check_text(k, path, f"{key}.{k}" if key else k)
            _check_text(v, path, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, path, f"{key}[{i}]")


def allowed_dirs() -> tuple[Path, ...]:
    """Directories outside the project that a recipe may name (patch files, local
    sources, extended recipes): STACKBUILD_ALLOW_DIRS, separated by os.pathsep."""
    raw = os.environ.get(ALLOW_DIRS_ENV, "")
    return tuple(Path(d).expanduser().resolve() for d in raw.split(os.pathsep) if d.strip())


def contained_path(root: Path, rel: str, *, file: Path, key: str, what: str) -> Path:
    """`rel` (relative to the project `root`, or absolute) resolved through every link;
    it must land inside the project or a directory in STACKBUILD_ALLOW_DIRS. The error
    names the recipe key and the location, never anything read from the file."""
    p = Path(rel).expanduser()
    try:
        real = (p if p.is_absolute() else root / p).resolve()
    except (OSError, RuntimeError) as e:  # a link loop
        raise RecipeError(f"{what} {rel!r} cannot be resolved: {e}", file=file, key=key) from None
    for d in (root.resolve(), *allowed_dirs()):
        if real == d or d in real.parents:
            return real
    raise RecipeError(
        f"{what} {rel!r} resolves to {real}, outside the project {root}; a recipe may only name files "
        f"inside its project (add the directory to {ALLOW_DIRS_ENV} to allow it)", file=file, key=key)


def local_source_dir(recipe: Recipe, src: Source) -> Path:
    """A local source's directory: relative to the project root (not to recipes/),
    checked again at use so a link swapped in after loading cannot lead outside."""
    assert src.path is not None
    return contained_path(recipe.root, src.path, file=recipe.path, key=f"sources.{src.name}.path", what="local source")


def patch_file_path(recipe: Recipe, entry: PatchEntry, key: str) -> Path:
    """A FILE patch's location (checked against the project as at load)."""
    assert entry.file is not None
    return contained_path(recipe.root, entry.file, file=recipe.path, key=f"{key}.file", what="patch file")


def _load_raw(
    path: Path, chain: tuple[Path, ...], root: Path
) -> tuple[dict[str, Any], tuple[str, ...], Origins]:
    real = path.resolve()
    if real in chain:
        cycle = " -> ".join(p.stem for p in (*chain, real))
        raise RecipeError(f"cycle in extends: {cycle}", file=chain[-1], key="extends")
    data = _read_toml(path)
    _check_text(data, path, "")
    # Record where each patch entry came from, so relative paths and errors resolve.
    if "patches" in data:
        for i, entry in enumerate(_patch_list(data["patches"], path)):
            entry["__file__"] = str(path)
            entry["__index__"] = i
    origins = _origins(data, path)
    ext = data.get("extends")
    if ext is None:
        return data, (), origins
    if not isinstance(ext, str):
        raise RecipeError(f"must be a recipe name (string), got {type(ext).__name__}", file=path, key="extends")
    if not NAME_RE.match(ext):
        raise RecipeError(f"must be the name of a recipe beside this one ({NAME_RULE}), not a path: {ext!r}",
                          file=path, key="extends")
    base_path = path.parent / f"{ext}.toml"
    if not base_path.exists():
        raise RecipeError(f"extends unknown recipe {ext!r} ({base_path} does not exist)", file=path, key="extends")
    contained_path(root, str(base_path), file=path, key="extends", what="extended recipe")
    base, base_chain, base_origins = _load_raw(base_path, (*chain, real), root)
    base = {k: v for k, v in base.items() if k not in ("name", "description")}  # never inherited
    base_origins = {k: f for k, f in base_origins.items() if k.split(".")[0] not in ("name", "description")}
    merged = _merge(base, {k: v for k, v in data.items() if k != "extends"})
    origins = {**base_origins, **{k: f for k, f in origins.items() if k != "extends"}}
    if "patches" not in data and "patches" in base_origins:
        origins["patches"] = base_origins["patches"]
    return merged, (ext, *base_chain), origins


class _V:
    """Validation helpers bound to one file."""

    def __init__(self, file: Path, origins: Origins | None = None, root: Path | None = None):
        self.file = file
        self.origins = origins or {}
        self.root = root if root is not None else project_of(file)

    def where(self, key: str) -> Path:
        """The file that set `key` (an extended base, or the recipe itself)."""
        best = ""
        for k in self.origins:
            if len(k) > len(best) and (key == k or key.startswith((k + ".", k + "["))):
                best = k
        return self.origins[best] if best else self.file

    def err(self, key: str, msg: str) -> RecipeError:
        return RecipeError(msg, file=self.where(key), key=key)

    def keys(self, table: dict[str, Any], allowed: set[str], where: str) -> None:
        for k in table:
            if k.startswith("__"):
                continue
            if k not in allowed:
                hint = ", ".join(sorted(allowed))
                raise self.err(f"{where}{'.' if where else ''}{k}", f"unknown key (allowed: {hint})")

    def typed(self, value: Any, typ: type | tuple[type, ...], key: str) -> Any:
        if isinstance(value, bool) and typ in (int, (int, float)):
            raise self.err(key, f"must be {_tname(typ)}, got bool")
        if not isinstance(value, typ):
            raise self.err(key, f"must be {_tname(typ)}, got {type(value).__name__} {value!r}")
        return value

    def sha(self, value: Any, key: str) -> str:
        self.typed(value, str, key)
        if not SHA256_RE.match(value):
            raise self.err(key, f"must be 64 lowercase hex digits, got {value!r}")
        return str(value)

    def str_list(self, value: Any, key: str) -> tuple[str, ...]:
        self.typed(value, list, key)
        for i, v in enumerate(value):
            self.typed(v, str, f"{key}[{i}]")
        return tuple(value)


def _tname(typ: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "an array",
             dict: "a table", float: "a number"}
    if isinstance(typ, tuple):
        return " or ".join(names.get(t, t.__name__) for t in typ)
    return names.get(typ, typ.__name__)


def _parse_source(v: _V, name: str, t: Any) -> Source:
    key = f"sources.{name}"
    if not NAME_RE.match(name):
        raise v.err(key, f"source names are {NAME_RULE}, got {name!r}")
    v.typed(t, dict, key)
    v.keys(t, SOURCE_KEYS, key)
    kinds = [k for k in ("pypi", "git", "path") if k in t]
    if len(kinds) != 1:
        raise v.err(key, "needs exactly one of pypi, git or path")
    kind = kinds[0]
    if "limits" in t and kind != "pypi":
        raise v.err(f"{key}.limits", "limits apply to the archive of a pypi source")
    if kind == "pypi":
        req_s = v.typed(t["pypi"], str, f"{key}.pypi")
        try:
            project, version = exact_pin(req_s)
        except ValueError as e:
            raise v.err(f"{key}.pypi", str(e)) from None
        if "sha256" not in t:
            raise v.err(f"{key}.sha256", "missing: a pypi source is checked against its sdist's sha256")
        return Source(name, SourceKind.PYPI, requirement=f"{project}=={version}", sha256=v.sha(t["sha256"], f"{key}.sha256"),
                      limits=_parse_limits(v, t["limits"], f"{key}.limits") if "limits" in t else None)
    if kind == "git":
        url = v.typed(t["git"], str, f"{key}.git")
        tag = v.typed(t["tag"], str, f"{key}.tag") if "tag" in t else None
        commit = v.typed(t["commit"], str, f"{key}.commit") if "commit" in t else None
        branch = v.typed(t["branch"], str, f"{key}.branch") if "branch" in t else None
        floating = v.typed(t.get("float", False), bool, f"{key}.float")
        if commit is not None and not COMMIT_RE.match(commit):
            raise v.err(f"{key}.commit", f"must be a full 40-digit commit, got {commit!r}")
        if branch is not None and not floating:
            raise v.err(f"{key}.branch", "a branch moves; pin a tag or a full commit, or set float = true to allow it")
        if not (tag or commit or branch):
            raise v.err(key, "a git source needs tag or commit (or branch with float = true)")
        return Source(name, SourceKind.GIT, url=url, tag=tag, commit=commit, branch=branch,
                      float=floating, sha256=v.sha(t["sha256"], f"{key}.sha256") if "sha256" in t else None)
    p = v.typed(t["path"], str, f"{key}.path")
    contained_path(v.root, p, file=v.where(f"{key}.path"), key=f"{key}.path", what="local source")
    return Source(name, SourceKind.LOCAL, path=p)


def _parse_limits(v: _V, t: Any, key: str) -> ArchiveLimits:
    v.typed(t, dict, key)
    v.keys(t, LIMIT_KEYS, key)
    values = {k: v.typed(t[k], int, f"{key}.{k}") for k in LIMIT_KEYS if k in t}
    for k, n in values.items():
        if n <= 0:
            raise v.err(f"{key}.{k}", f"must be a positive integer, got {n}")
    return ArchiveLimits(**values)


def _parse_patch(v: _V, i: int, t: Any, source_names: set[str]) -> PatchEntry:
    key = f"patches[{i}]"
    v = _V(Path(t.get("__file__", v.file)), root=v.root) if isinstance(t, dict) else v
    if isinstance(t, dict) and "__index__" in t:
        key = f"patches[{t['__index__']}]"
    v.typed(t, dict, key)
    v.keys(t, PATCH_KEYS, key)
    kinds = [k for k in ("file", "from", "backport") if k in t]
    if len(kinds) != 1:
        raise v.err(key, "needs exactly one of file, from (+ path) or backport (+ files)")
    src = v.typed(t.get("source", ""), str, f"{key}.source")
    if not src:
        raise v.err(f"{key}.source", "missing: which source does this patch apply to?")
    if src not in source_names:
        raise v.err(f"{key}.source", f"unknown source {src!r} (declared: {', '.join(sorted(source_names)) or 'none'})")
    strip = v.typed(t.get("strip", 1), int, f"{key}.strip")
    fuzz = v.typed(t.get("fuzz", 0), int, f"{key}.fuzz")
    if strip < 0 or fuzz < 0:
        raise v.err(f"{key}.strip" if strip < 0 else f"{key}.fuzz", "must be >= 0")
    sha = v.sha(t["sha256"], f"{key}.sha256") if "sha256" in t else None
    desc = v.typed(t["description"], str, f"{key}.description") if "description" in t else None
    test = v.typed(t["test"], str, f"{key}.test") if "test" in t else None
    mark = v.typed(t["refresh_verdict"], str, f"{key}.refresh_verdict") if "refresh_verdict" in t else None
    if mark is not None and not mark.strip():
        raise v.err(f"{key}.refresh_verdict", "is empty: delete the key once a person has decided on the patch")
    kind = kinds[0]
    if kind == "file":
        f = v.typed(t["file"], str, f"{key}.file")
        contained_path(v.root, f, file=v.file, key=f"{key}.file", what="patch file")
        if sha is None:
            raise v.err(f"{key}.sha256", "missing: every patch file is pinned by its sha256")
        name = v.typed(t.get("name", Path(f).name.removesuffix(".patch")), str, f"{key}.name")
        _patch_name(v, name, key)
        return PatchEntry(name, PatchKind.FILE, src, sha, strip, fuzz, file=f, description=desc, test=test,
                          refresh_verdict=mark)
    if kind == "from":
        frm = v.typed(t["from"], str, f"{key}.from")
        if frm not in source_names:
            raise v.err(f"{key}.from", f"unknown source {frm!r}")
        path = v.typed(t.get("path", ""), str, f"{key}.path")
        if not path:
            raise v.err(f"{key}.path", "missing: the patch's path inside source " + repr(frm))
        name = v.typed(t.get("name", Path(path).name.removesuffix(".patch")), str, f"{key}.name")
        _patch_name(v, name, key)
        return PatchEntry(name, PatchKind.FROM_SOURCE, src, sha, strip, fuzz,
                          from_source=frm, path=path, description=desc, test=test, refresh_verdict=mark)
    release = v.typed(t["backport"], str, f"{key}.backport")
    try:
        project, version = exact_pin(release)
    except ValueError as e:
        raise v.err(f"{key}.backport", str(e).replace("must pin one exact version", "must name one exact release")) from None
    if sha is None:
        raise v.err(f"{key}.sha256", "missing: the backport's source release is pinned by its sha256")
    files = v.str_list(t.get("files", []), f"{key}.files")
    if not files:
        raise v.err(f"{key}.files", "missing: which files to take from the release")
    for j, f in enumerate(files):
        if f.startswith("/") or ".." in Path(f).parts:
            raise v.err(f"{key}.files[{j}]", f"must be a relative path inside the tree, got {f!r}")
    name = v.typed(t.get("name", f"backport-{project}-{version}"), str, f"{key}.name")
    _patch_name(v, name, key)
    return PatchEntry(name, PatchKind.BACKPORT, src, sha, 0, 0, release=f"{project}=={version}", files=files,
                      description=desc, test=test, refresh_verdict=mark)


_SIMPLE_CLAUSE = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*([^\s,;*]+)\s*")


def _is_simple_version_spec(spec: str) -> bool:
    """True for the forms pins use: clauses "==V", "!=V", ">=V", "<=V", ">V", "<V", joined by
    commas, each V a valid PEP 440 version (a local label only after == and !=, as PEP 440
    says). Checking them needs only packaging.version; packaging.specifiers (~4 ms of
    import) is left for the other forms ("~=", wildcards, "==="), which it validates."""
    for clause in spec.split(","):
        m = _SIMPLE_CLAUSE.fullmatch(clause)
        if not m:
            return False
        op, ver = m.groups()
        if "+" in ver and op not in ("==", "!="):
            return False
        try:
            Version(ver)
        except InvalidVersion:
            return False
    return True


def _parse_pin(v: _V, name: str, t: Any) -> Pin:
    key = f"pins.{name}"
    if isinstance(t, str):
        t = {"version": t}
    v.typed(t, dict, key)
    v.keys(t, PIN_KEYS, key)
    spec = v.typed(t.get("version", ""), str, f"{key}.version")
    url = v.typed(t["url"], str, f"{key}.url") if "url" in t else None
    if not spec and not url:
        raise v.err(key, "needs a version (\"==1.2.3\") or a url")
    if spec and url:
        raise v.err(key, "give either version or url, not both")
    if not PIN_NAME_RE.match(name):
        raise v.err(key, f"not a package name (letters, digits, '.', '_', '-'), got {name!r}")
    if spec and not _is_simple_version_spec(spec):
        # rare: not paid at start-up
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        try:
            SpecifierSet(spec)
        except InvalidSpecifier:
            raise v.err(f"{key}.version", f"not a version specifier such as '==1.2.3': {spec!r}") from None
    if "markers" in t:
        from packaging.markers import InvalidMarker, Marker  # rare: not paid at start-up

        try:
            Marker(v.typed(t["markers"], str, f"{key}.markers"))
        except InvalidMarker as e:
            raise v.err(f"{key}.markers", f"not an environment marker: {e}") from None
    if spec and not spec.lstrip().startswith(("==", ">=", "<=", "~=", "!=", "<", ">")):
        raise v.err(f"{key}.version", f"must be a version specifier such as '==1.2.3', got {spec!r}")
    sha = v.sha(t["sha256"], f"{key}.sha256") if "sha256" in t else None
    tofu = v.typed(t.get("trust_on_first_use", False), bool, f"{key}.trust_on_first_use")
    if url and not sha and not tofu:
        raise v.err(f"{key}.sha256", "a direct URL needs its sha256, or trust_on_first_use = true to record it on first download")
    if sha and tofu:
        raise v.err(f"{key}.trust_on_first_use", "the sha256 is already known; drop trust_on_first_use")
    return Pin(
        name=name,
        spec=spec,
        index=v.typed(t["index"], str, f"{key}.index") if "index" in t else None,
        url=url,
        sha256=sha,
        trust_on_first_use=tofu,
        override=v.typed(t["override"], str, f"{key}.override") if "override" in t else None,
        markers=v.typed(t["markers"], str, f"{key}.markers") if "markers" in t else None,
    )


def load_recipe(name_or_path: str | Path, root: Path | None = None) -> Recipe:
    path = find_recipe(str(name_or_path), root)
    project = project_of(path)
    data, chain, origins = _load_raw(path, (), project)
    v = _V(path, origins, project)
    v.keys(data, TOP_KEYS, "")

    name = v.typed(data.get("name", path.stem), str, "name")
    if name != path.stem:
        raise v.err("name", f"must match the file name {path.stem!r}, got {name!r}")
    if not NAME_RE.match(name):
        raise v.err("name", f"recipe names are {NAME_RULE}, got {name!r} (rename the file)")
    plat_name = data.get("platform")
    if plat_name is None:
        raise v.err("platform", f"missing (one of: {', '.join(PLATFORMS)})")
    v.typed(plat_name, str, "platform")
    if plat_name not in PLATFORMS:
        raise v.err("platform", f"unknown platform {plat_name!r} (one of: {', '.join(PLATFORMS)})")
    platform = PLATFORMS[plat_name]

    srcs_t = v.typed(data.get("sources", {}), dict, "sources")
    sources = tuple(_parse_source(v, n, t) for n, t in srcs_t.items())
    names = {s.name for s in sources}

    patches_t = v.typed(data.get("patches", []), list, "patches")
    patches = tuple(_parse_patch(v, i, t, names) for i, t in enumerate(patches_t))
    seen: set[str] = set()
    for p in patches:
        if p.name in seen:
            raise v.err("patches", f"two patches are named {p.name!r}; give one a distinct name")
        seen.add(p.name)

    pins_t = v.typed(data.get("pins", {}), dict, "pins")
    pins = tuple(_parse_pin(v, n, t) for n, t in pins_t.items())

    b = v.typed(data.get("build", {}), dict, "build")
    v.keys(b, BUILD_KEYS, "build")
    benv = v.typed(b.get("env", {}), dict, "build.env")
    target = v.typed(b.get("target_device", "xpu"), str, "build.target_device")
    if target not in ("xpu", "empty", "cpu"):
        raise v.err("build.target_device", f"must be xpu, empty or cpu, got {target!r}")
    max_jobs = b.get("max_jobs")
    if max_jobs is not None:
        v.typed(max_jobs, int, "build.max_jobs")
        if max_jobs < 1:
            raise v.err("build.max_jobs", "must be >= 1")
    build = BuildSettings(
        target_device=target,
        max_jobs=max_jobs if max_jobs is not None else platform.build_max_jobs,
        kernels_from_source=v.typed(b.get("kernels_from_source", False), bool, "build.kernels_from_source"),
        env=tuple((_env_name(v, k, "build.env"), v.typed(val, str, f"build.env.{k}")) for k, val in benv.items()),
    )

    e = v.typed(data.get("environment", {}), dict, "environment")
    v.keys(e, ENV_KEYS, "environment")
    evars = dict(platform.environment)
    for k, val in v.typed(e.get("vars", {}), dict, "environment.vars").items():
        evars[_env_name(v, k, "environment.vars")] = v.typed(val, str, f"environment.vars.{k}")
    forbid = tuple(
        (k, v.typed(val, str, f"environment.forbid.{k}"))
        for k, val in v.typed(e.get("forbid", {}), dict, "environment.forbid").items()
    )
    environment = EnvironmentSettings(
        vars=tuple(sorted(evars.items())),
        forbid=forbid,
        python=v.typed(e.get("python", ">=3.10,<3.13"), str, "environment.python"),
    )

    c = v.typed(data.get("checks", {}), dict, "checks")
    v.keys(c, CHECK_KEYS, "checks")
    thr = v.typed(c.get("thresholds", {}), dict, "checks.thresholds")
    checks = Checks(
        registry=v.str_list(c.get("registry", []), "checks.registry"),
        model_types=v.str_list(c.get("model_types", []), "checks.model_types"),
        numerics=v.str_list(c.get("numerics", []), "checks.numerics"),
        thresholds=tuple((k, float(v.typed(x, (int, float), f"checks.thresholds.{k}"))) for k, x in thr.items()),
        registry_source=v.typed(c.get("registry_source", "vllm"), str, "checks.registry_source"),
    )

    lk = v.typed(data.get("lock", {}), dict, "lock")
    v.keys(lk, LOCK_KEYS, "lock")
    resolver = v.typed(lk.get("resolver", "pip-tools"), str, "lock.resolver")
    if resolver not in ("pip-tools", "uv"):
        raise v.err("lock.resolver", f"must be pip-tools or uv, got {resolver!r}")
    lock = LockSettings(resolver=resolver)

    canonical = {
        "platform": plat_name,
        "description": data.get("description", ""),
        # a source without a limits table hashes as before limits existed
        "sources": [_clean({k: x for k, x in asdict(s).items() if k != "limits" or x is not None}) for s in sources],
        "patches": [_clean(asdict(p)) for p in patches],
        "pins": [_clean(asdict(p)) for p in pins],
        "build": _clean(asdict(build)),
        "environment": _clean(asdict(environment)),
        "checks": _clean(asdict(checks)),
        "lock": _clean(asdict(lock)),
    }
    raw = json.dumps(canonical, sort_keys=True, default=str)
    return Recipe(
        name=name,
        path=path,
        platform=platform,
        description=v.typed(data.get("description", ""), str, "description"),
        extends=chain,
        sources=sources,
        patches=patches,
        pins=pins,
        build=build,
        environment=environment,
        checks=checks,
        lock=lock,
        raw=raw,
    )


def _patch_name(v: _V, name: str, key: str) -> None:
    if not PATCH_NAME_RE.match(name):
        raise v.err(f"{key}.name", f"patch names are letters, digits, '.', '_', '+' and '-' (they become file names), "
                                   f"got {name!r}; set name = \"...\"")


def _env_name(v: _V, name: str, table: str) -> str:
    if not ENV_NAME_RE.match(name):
        raise v.err(f"{table}.{name}", "an environment variable name is letters, digits and '_', not starting with a digit")
    return name


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, val in d.items():
        if isinstance(val, Enum):
            val = val.value
        elif isinstance(val, tuple):
            val = [list(x) if isinstance(x, tuple) else x for x in val]
        out[k] = val
    return out
