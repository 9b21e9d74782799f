"""`stackbuild lock`: the patched source's runtime requirements with the recipe's pins
applied, resolved by pip-tools (or uv) into lockfiles/NAME.txt with a hash for every
package; and `--check`, which compares the recipe with the lockfile's header records
without touching the network.

Planning (what goes into the resolver, which declarations the recipe overrides, what
cannot be resolved here) is separate from running the resolver and writing the file.
"""

from __future__ import annotations

import contextlib
import os
import platform as _platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from stackbuild.cache import atomic_write_text
from stackbuild.lock import backends
from stackbuild.lock.errors import IndexUnreachable, LockError, ResolutionFailed
from stackbuild.lock.indexmap import IndexMap
from stackbuild.lock.lockfile import (
    COMPLETE_PREFIX,
    CONTENT_PREFIX,
    FIRST_LINE,
    UNRESOLVED_PREFIX,
    LockedPackage,
    incomplete_message,
    incompleteness,
    inputs_digest,
    parse_resolver_output,
    patch_record,
    pin_record,
    read_header,
    record_line,
    render_packages,
    seal,
)
from stackbuild.lock.requirements import (
    DeclaredRequirement,
    SourceRequirements,
    read_source_requirements,
    requirement_files_for,
)
from stackbuild.recipe import Pin, Recipe
from stackbuild.report import Table

RECIPE_LABEL = "recipe pins"


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Override:
    """A pin that replaces what the source declares (pip-tools has no override
    mechanism, so the declaration is dropped from the resolver's input)."""

    name: str
    pin: str
    replaces: tuple[str, ...]  # "transformers>=4.56.0,<5 (vllm requirements/common.txt:10)"
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pin": self.pin, "replaces": list(self.replaces), "reason": self.reason}


@dataclass(frozen=True)
class Unresolved:
    """Pinned by the recipe (or declared by the source) but not resolved by this lock."""

    name: str
    requirement: str
    origin: str  # "pins.torch", "vllm requirements/common.txt:12"
    reason: str
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "requirement": self.requirement, "origin": self.origin,
                "reason": self.reason, "sha256": self.sha256}


@dataclass(frozen=True)
class FirstUse:
    """A pin marked trust_on_first_use: its sha256 was not known before this lock."""

    pin: str
    url: str
    sha256: str | None  # recorded from the download this lock made; None: not downloaded here

    @property
    def message(self) -> str:
        if self.sha256:
            return (f"trust on first use: pins.{self.pin} had no known sha256; the first download "
                    f"({self.url}) recorded sha256 {self.sha256}. It is trusted because it was the first "
                    f"seen, not because it matched anything; record it in the recipe.")
        return (f"trust on first use: pins.{self.pin} has no known sha256 and was not downloaded here; "
                f"it stays unverified until the first download on a host that reaches {self.url} records it.")

    def to_dict(self) -> dict[str, Any]:
        return {"pin": self.pin, "url": self.url, "sha256": self.sha256, "message": self.message}


@dataclass(frozen=True)
class LockResult:
    recipe: str
    lockfile: Path
    resolver: str
    resolver_version: str
    offline: bool
    command: str  # regenerates the lockfile
    recipe_sha256: str
    inputs_sha256: str
    packages: tuple[LockedPackage, ...]
    overrides: tuple[Override, ...]
    unresolved: tuple[Unresolved, ...]
    first_use: tuple[FirstUse, ...]
    excluded: tuple[str, ...]  # "vllm: built from the patched source, installed with --no-deps"
    requirement_files: tuple[str, ...]
    indexes: tuple[str, ...]
    seconds: float
    resolver_runs: int

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "lockfile": str(self.lockfile),
            "resolver": self.resolver,
            "resolver_version": self.resolver_version,
            "offline": self.offline,
            "command": self.command,
            "recipe_sha256": self.recipe_sha256,
            "inputs_sha256": self.inputs_sha256,
            "packages": [p.to_dict() for p in self.packages],
            "overrides": [o.to_dict() for o in self.overrides],
            "unresolved": [u.to_dict() for u in self.unresolved],
            "first_use": [f.to_dict() for f in self.first_use],
            "excluded": list(self.excluded),
            "requirement_files": list(self.requirement_files),
            "indexes": list(self.indexes),
            "seconds": round(self.seconds, 3),
            "resolver_runs": self.resolver_runs,
            "exit_code": self.exit_code,
        }

    def tables(self) -> list[Table]:
        out = [Table(
            title=f"Lockfile {self.lockfile.name} ({self.resolver} {self.resolver_version})",
            columns=("package", "pinned", "hashes", "via"),
            rows=tuple((p.name, p.version or p.url or p.requirement, str(len(p.hashes)), ", ".join(p.via))
                       for p in self.packages),
            summary=f"{len(self.packages)} packages pinned with sha256 hashes in {self.seconds:.1f} s; "
                    f"regenerate with: {self.command}",
        )]
        if self.overrides:
            out.append(Table("Overrides (the recipe replaces what the source declares)",
                             ("package", "pin", "replaces", "why"),
                             tuple((o.name, o.pin, "; ".join(o.replaces) or "(not declared)", o.reason)
                                   for o in self.overrides)))
        if self.unresolved:
            out.append(Table("Not resolved by this lock (pinned by the recipe or declared by the source)",
                             ("package", "requirement", "from", "why"),
                             tuple((u.name, u.requirement, u.origin, u.reason) for u in self.unresolved)))
        if self.first_use:
            out.append(Table("Trust on first use", ("pin", "sha256", "note"),
                             tuple((f.pin, f.sha256 or "(unknown)", f.message) for f in self.first_use)))
        return out


@dataclass(frozen=True)
class LockChange:
    kind: str  # pin | patch | series | recipe | lockfile
    name: str
    change: str  # added | removed | changed | reordered
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "change": self.change, "detail": self.detail}


@dataclass(frozen=True)
class LockCheckResult:
    recipe: str
    lockfile: Path
    up_to_date: bool
    changes: tuple[LockChange, ...]
    notes: tuple[str, ...]
    command: str  # what to run to bring the lockfile up to date

    @property
    def exit_code(self) -> int:
        return 0 if self.up_to_date else 1

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "lockfile": str(self.lockfile), "up_to_date": self.up_to_date,
                "changes": [c.to_dict() for c in self.changes], "notes": list(self.notes),
                "command": self.command, "exit_code": self.exit_code}

    def tables(self) -> list[Table]:
        drift = [c for c in self.changes if c.change != "incomplete"]
        parts = [f"{len(drift)} change(s) since the lockfile was written; run: {self.command}"] if drift else []
        parts += [c.detail for c in self.changes if c.change == "incomplete"]
        summary = ("up to date: pins, overrides and patch series match the lockfile, its content matches its "
                   "sha256, and it is complete" if self.up_to_date else "\n".join(parts))
        if self.notes:
            summary += "\n" + "\n".join(self.notes)
        return [Table(f"Lock check {self.lockfile.name}", ("what", "name", "change", "detail"),
                      tuple((c.kind, c.name, c.change, c.detail) for c in self.changes), summary)]


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Input:
    name: str
    requirement: str  # the line given to the resolver
    origin: str  # "pins.x" or "vllm requirements/common.txt:3"
    group: str  # input file stem: "recipe-pins" or the source label
    pin: Pin | None = None
    constraint: bool = False
    remote_urls: tuple[str, ...] = ()  # indexes / URLs this input needs
    shown: str = ""  # the requirement as the lockfile records it, when an index map changed `requirement`

    def mapped(self, imap: IndexMap) -> _Input:
        """This input with its URLs fetched through the index map."""
        if not imap or not self.remote_urls:
            return self
        req = self.requirement
        for u in self.remote_urls:
            req = req.replace(u, imap.local(u))
        return replace(self, requirement=req, remote_urls=tuple(imap.local(u) for u in self.remote_urls),
                       shown=self.requirement)

    @property
    def recorded(self) -> str:
        return self.shown or self.requirement

    def unresolved(self, reason: str) -> Unresolved:
        """This input, left out of the lock for `reason`."""
        return Unresolved(self.name, self.recorded, self.origin, reason, self.pin.sha256 if self.pin else None)


def _set_aside(inputs: list[_Input], reason: Callable[[_Input], str | None],
               unresolved: list[Unresolved]) -> list[_Input]:
    """The inputs to resolve: those `reason` says nothing of. The others go to
    `unresolved` with what it says (an unreachable index, an offline run)."""
    kept = []
    for i in inputs:
        why = reason(i)
        if why is None:
            kept.append(i)
        else:
            unresolved.append(i.unresolved(why))
    return kept


@dataclass(frozen=True)
class _Plan:
    inputs: tuple[_Input, ...]
    overrides: tuple[Override, ...]
    excluded: tuple[str, ...]
    indexes: tuple[tuple[str, str], ...]  # (url, origin): extra indexes
    find_links: tuple[tuple[str, str], ...]
    source: SourceRequirements | None
    label: str


def _pin_requirement(pin: Pin, extras: set[str] | None = None) -> str:
    name = pin.name + (f"[{','.join(sorted(extras))}]" if extras else "")
    if pin.url:
        req = f"{name} @ {pin.url}"
        return f"{req} ; {pin.markers}" if pin.markers else req
    req = f"{name}{pin.spec}"
    return f"{req} ; {pin.markers}" if pin.markers else req


def _compatible(pin: Pin, decl: Requirement) -> bool | None:
    """True: the pin satisfies the declaration; False: it contradicts it; None: cannot tell."""
    if pin.url:
        if decl.url:
            return decl.url == pin.url
        return None if str(decl.specifier) else True
    if decl.url:
        return False
    spec = SpecifierSet(pin.spec)
    exact = [s for s in spec if s.operator in ("==", "===") and "*" not in s.version]
    if len(exact) == 1 and len(list(spec)) == 1:
        return decl.specifier.contains(exact[0].version, prereleases=True)
    return True if not str(decl.specifier) else None


def _source_label(recipe: Recipe) -> str:
    names = [s.name for s in recipe.sources]
    if "vllm" in names:
        return "vllm"
    return recipe.patched_sources[0] if recipe.patched_sources else "source"


def _excluded_names(recipe: Recipe, label: str) -> dict[str, str]:
    out: dict[str, str] = {canonicalize_name(label): label}
    for s in recipe.sources:
        if s.name in recipe.patched_sources:
            out[canonicalize_name(s.project or s.name)] = s.name
    return out


def plan_lock(recipe: Recipe, requirements_from: Path | None) -> _Plan:
    """What goes into the resolver: pure, no network."""
    label = _source_label(recipe)
    source = (read_source_requirements(Path(requirements_from), requirement_files_for(recipe.build.target_device))
              if requirements_from is not None else None)
    excluded_names = _excluded_names(recipe, label)
    pins: dict[str, Pin] = {canonicalize_name(p.name): p for p in recipe.pins}
    for cname, pin in pins.items():
        if cname in excluded_names:
            raise LockError(f"{pin.name} is built from the patched source {excluded_names[cname]!r} and "
                            "installed from its wheel with --no-deps; it cannot also be pinned",
                            file=recipe.path, key=f"pins.{pin.name}")

    excluded: list[str] = [f"{label}: built from the patched source; install its wheel with --no-deps"]
    declared_by_name: dict[str, list[DeclaredRequirement]] = {}
    inputs: list[_Input] = []
    for d in source.requirements if source else ():
        if d.name in excluded_names:
            excluded.append(f"{d.text} ({label} {d.where}): built from the patched source")
            continue
        declared_by_name.setdefault(d.name, []).append(d)

    overrides: list[Override] = []
    kept_declared: list[DeclaredRequirement] = []
    extras_for_pin: dict[str, set[str]] = {}
    for dname, decls in declared_by_name.items():
        maybe_pin = pins.get(dname)
        if maybe_pin is None:
            kept_declared += decls
            continue
        pin = maybe_pin
        cname = dname
        replaced: list[DeclaredRequirement] = []
        for d in decls:
            req = d.parsed()
            verdict = _compatible(pin, req)
            if pin.override:
                replaced.append(d)
            elif verdict is True:
                replaced.append(d)  # the pin stands in for it and satisfies it
            elif verdict is None:
                kept_declared.append(d)  # both go in; the resolver intersects them
                continue
            else:
                raise LockError(
                    f"{_pin_requirement(pin)} contradicts {label}'s `{d.text}` ({d.where}); add "
                    "override = \"why\" to the pin to replace the declaration",
                    file=recipe.path, key=f"pins.{pin.name}")
            extras_for_pin.setdefault(cname, set()).update(req.extras)
        if pin.override and replaced:
            overrides.append(Override(cname, _pin_requirement(pin),
                                      tuple(f"{d.text} ({label} {d.where})" for d in replaced), pin.override))
    for cname, pin in pins.items():
        if pin.override and not any(o.name == cname for o in overrides):
            overrides.append(Override(cname, _pin_requirement(pin), (), pin.override))

    for cname, pin in pins.items():
        remote = tuple(u for u in (pin.index, pin.url) if u)
        inputs.append(_Input(cname, _pin_requirement(pin, extras_for_pin.get(cname)), f"pins.{pin.name}",
                             "recipe-pins", pin=pin, remote_urls=remote))
    for d in kept_declared:
        req = d.parsed()
        inputs.append(_Input(d.name, d.text, f"{label} {d.where}", label, constraint=d.constraint,
                             remote_urls=(req.url,) if req.url else ()))

    indexes: list[tuple[str, str]] = []
    find_links: list[tuple[str, str]] = []
    for pin in recipe.pins:
        if pin.index and pin.index not in [u for u, _ in indexes]:
            indexes.append((pin.index, f"pins.{pin.name}.index"))
    for ix in source.indexes if source else ():
        target = find_links if ix.find_links else indexes
        if ix.url not in [u for u, _ in target]:
            target.append((ix.url, f"{label} {ix.file}:{ix.line}"))
    return _Plan(tuple(inputs), tuple(sorted(overrides, key=lambda o: o.name)), tuple(excluded),
                 tuple(indexes), tuple(find_links), source, label)


# ---------------------------------------------------------------- locking


def default_lockfile(recipe: Recipe) -> Path:
    return recipe.root / "lockfiles" / f"{recipe.name}.txt"


def regenerate_command(recipe: Recipe, *, resolver: str, offline: bool, pins_only: bool,
                       index_url: str | None, partial: bool = False) -> str:
    parts = ["stackbuild", "lock", recipe.name]
    if resolver != "pip-tools":
        parts += ["--resolver", resolver]
    if offline:
        parts.append("--offline")
    if partial:
        parts.append("--partial")
    if pins_only:
        parts.append("--pins-only")
    if index_url and not backends.is_local(index_url):
        parts += ["--index-url", index_url]
    return " ".join(parts)


def _primary_index(index_url: str | None) -> str:
    # An index the user asked for explicitly (argument, or PIP_INDEX_URL in the
    # environment) is honoured; the machine's pip.conf is not.
    return index_url or os.environ.get("PIP_INDEX_URL") or backends.DEFAULT_INDEX


def _available_locally(name: str, local_indexes: list[str], local_links: list[str]) -> bool:
    for ix in local_indexes:
        root = backends.local_path(ix)
        if (root / name).is_dir() or any(canonicalize_name(p.name) == name for p in root.glob("*/")
                                         if p.is_dir()):
            return True
    for fl in local_links:
        d = backends.local_path(fl)
        for p in d.glob("*") if d.is_dir() else ():
            stem = p.name.split("-")[0]
            if canonicalize_name(stem) == name:
                return True
    return False


def lock(
    recipe: Recipe,
    *,
    requirements_from: Path | None,
    resolver: str = "pip-tools",
    offline: bool = False,
    output: Path | None = None,
    index_url: str | None = None,
    probe_timeout: float = backends.PROBE_TIMEOUT_S,
    force: bool = False,
    index_map: IndexMap | None = None,
    partial: bool = False,
) -> LockResult:
    """Resolve the recipe's pins plus the source's own requirements into a lockfile.

    `index_url`: the primary index (default: PIP_INDEX_URL if set, else PyPI). Extra
    indexes come only from the recipe's pins and the source's requirement files.
    `index_map`: local mirrors that stand in for real index URLs (default: from
    STACKBUILD_INDEX_MAP); the lockfile records only the real URLs.
    `partial`: online, but what needs an unreachable extra index or URL (and what
    depends on it) is left unresolved and named in the header, instead of failing.
    On any failure the previous lockfile is left byte-for-byte as it was, and so it is
    when the new lock would be less complete than it (unless `force`)."""
    started = time.monotonic()
    imap = index_map if index_map is not None else IndexMap.parse()
    if resolver not in backends.RESOLVERS:
        raise LockError(f"unknown resolver {resolver!r} (one of: {', '.join(backends.RESOLVERS)})",
                        key="--resolver")
    if resolver == "uv":
        backends.find_uv()  # fail before doing anything else
    out_path = Path(output) if output is not None else default_lockfile(recipe)
    plan = plan_lock(recipe, requirements_from)
    primary = _primary_index(index_url)

    # ---- reachability: fail fast, naming what does not answer
    unresolved: list[Unresolved] = []
    first_use: list[FirstUse] = []
    inputs = [i.mapped(imap) for i in plan.inputs]
    index_urls = [(imap.local(u), o) for u, o in
                  [(primary, "--index-url" if index_url else "the default index"), *plan.indexes]]
    find_links = [(imap.local(u), o) for u, o in plan.find_links]
    if not offline:
        probes = [(u, False) for u, _ in index_urls] + [(u, False) for u, _ in find_links]
        probes += [(u, True) for i in inputs if i.pin is not None and i.pin.url for u in i.remote_urls
                   if u == imap.local(i.pin.url)]
        probes += [(u, True) for i in inputs if i.pin is None for u in i.remote_urls]
        results = backends.probe_all(list(dict.fromkeys(probes)), probe_timeout)
        failed: list[tuple[str, str, str]] = []
        origins = {u: o for u, o in (*index_urls, *find_links)}
        origins.update({u: i.origin for i in inputs for u in i.remote_urls})
        for url, why in results.items():
            if why is not None:
                failed.append((url, origins.get(url, "?"), why))
        dead = {url: why for url, _, why in failed}
        if failed and partial and index_urls[0][0] not in dead:
            def unreachable(i: _Input) -> str | None:
                bad = [u for u in i.remote_urls if u in dead]
                return f"partial: {imap.real(bad[0])} unreachable ({dead[bad[0]]})" if bad else None

            inputs = _set_aside(inputs, unreachable, unresolved)
            index_urls = [(u, o) for u, o in index_urls if u not in dead]
            find_links = [(u, o) for u, o in find_links if u not in dead]
            failed = []
        if failed:
            index_set = {u for u, _ in (*index_urls, *find_links)}
            what = "; ".join(f"{'index' if url in index_set else 'URL'} {url} ({origin}) unreachable: {why}"
                             for url, origin, why in failed)
            raise IndexUnreachable(f"{what}; nothing was resolved (use --partial to lock the rest from the "
                                   "reachable indexes, or --offline to lock without the network; both mark "
                                   "these as not resolved)", file=recipe.path,
                                   key=failed[0][1])
        active_indexes = [u for u, _ in index_urls[1:]]
        links = [u for u, _ in find_links]
        resolver_primary: str | None = index_urls[0][0]
    else:
        # Offline: nothing remote is contacted. Pins that need a remote index or URL are
        # recorded as pinned by the recipe; the rest comes from local indexes (and uv's cache).
        def remote(i: _Input) -> str | None:
            urls = [u for u in i.remote_urls if not backends.is_local(u)]
            return f"offline: {urls[0]} not contacted" if urls else None

        inputs = _set_aside(inputs, remote, unresolved)
        local_ix = [u for u, _ in index_urls if backends.is_local(u)]
        links = [u for u, _ in find_links if backends.is_local(u)]
        if resolver == "uv":
            resolver_primary = index_urls[0][0]
            active_indexes = [u for u, _ in index_urls[1:]]
        else:
            resolver_primary = local_ix[0] if local_ix else None
            active_indexes = local_ix[1:]
            def not_local(i: _Input) -> str | None:
                if i.pin is not None and i.pin.url or _available_locally(i.name, local_ix, links):
                    return None
                return "offline: in no local index"

            inputs = _set_aside(inputs, not_local, unresolved)

    kept_names = {(i.name, i.origin) for i in inputs}
    for i in plan.inputs:
        if i.pin is not None and i.pin.trust_on_first_use and (i.name, i.origin) not in kept_names:
            first_use.append(FirstUse(i.pin.name, i.pin.url or "", None))

    # ---- resolve
    mode = "offline" if offline else "partial"
    packages: list[LockedPackage] = []
    runs = 0
    version = backends.pip_tools_version() if resolver == "pip-tools" else backends.uv_version(backends.find_uv())
    _remove_stale_tempdirs()
    with _term_as_interrupt(), tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp_s:
        tmp = Path(tmp_s)
        labels = {"recipe-pins.in": RECIPE_LABEL, f"{plan.label}.in": plan.label,
                  f"{plan.label}-constraints.in": f"{plan.label} constraints", "overrides.txt": RECIPE_LABEL}
        replacements = {str(tmp) + os.sep: "", str(tmp): ""}
        for name, lab in labels.items():
            replacements[name] = lab
        while inputs:
            runs += 1
            req = _write_inputs(tmp, inputs, plan.label, resolver_primary, active_indexes, links, offline,
                                resolver == "uv")
            run = backends.run_resolver(resolver, req)
            if run.ok:
                packages = [_unmap(p, imap) for p in parse_resolver_output(run.output, labels)]
                version = run.version
                clash = _pulled_in_unresolved(packages, inputs, unresolved)
                if not clash:
                    break
                # Offline: something resolved here depends on a pin that could not be
                # resolved (torchvision on the XPU torch); locking it would pull another
                # build of that pin in. Leave those inputs to the recipe too, and retry.
                for i, needs in clash:
                    unresolved.append(i.unresolved(f"{mode}: depends on {needs}, which is not resolved here"))
                dropped = {i for i, _ in clash}
                inputs = [i for i in inputs if i not in dropped]
                packages = []
                continue
            missing = {_req_name(n) for n in backends.unavailable_requirements(run.stderr)}
            top = [i for i in inputs if i.name in missing]
            if (offline or partial) and top:  # each retry drops at least one input, so this ends
                for i in top:
                    unresolved.append(i.unresolved("partial: not resolvable from the reachable indexes" if not offline
                                                   else "offline: not resolvable from local indexes"
                                                   + (" or the uv cache" if resolver == "uv" else "")))
                inputs = [i for i in inputs if i not in top]
                continue
            raise ResolutionFailed(_explain_failure(resolver, run.stderr, inputs, plan.label, replacements),
                                   file=recipe.path)
        leaked = [p.requirement for p in packages if str(tmp) in p.requirement]
        if leaked:
            raise LockError(f"resolver output names a temporary path: {leaked[0]}", file=recipe.path)

    packages, notes = _verify(recipe, plan, packages, inputs, first_use)
    pins_rec = [pin_record(p) for p in recipe.pins]
    patches_rec = [patch_record(n, p) for n, p in enumerate(recipe.patches, start=1)]
    digest = inputs_digest(pins_rec, patches_rec)
    command = regenerate_command(recipe, resolver=resolver, offline=offline, partial=partial,
                                 pins_only=requirements_from is None, index_url=index_url)
    result = LockResult(
        recipe=recipe.name,
        lockfile=out_path,
        resolver=resolver,
        resolver_version=version,
        offline=offline,
        command=command,
        recipe_sha256=recipe.sha256,
        inputs_sha256=digest,
        packages=tuple(packages),
        overrides=plan.overrides,
        unresolved=tuple(sorted(unresolved, key=lambda u: u.name)),
        first_use=tuple(first_use),
        excluded=plan.excluded,
        requirement_files=plan.source.files if plan.source else (),
        indexes=tuple(u for u, _ in plan.indexes),
        seconds=0.0,
        resolver_runs=runs,
    )
    text = render_lockfile(result, plan, pins_rec, patches_rec, primary, notes, mirrored=imap)
    for local in imap.locals():
        if local in text:
            raise LockError(f"the lockfile would name the local mirror {local}; nothing was written",
                            file=out_path)
    if not force:
        _refuse_less_complete(out_path, result)
    atomic_write_text(out_path, text)
    return _replace_seconds(result, time.monotonic() - started)


TMP_PREFIX = "stackbuild-lock-"


@contextlib.contextmanager
def _term_as_interrupt() -> Iterator[None]:
    """SIGTERM while the resolver runs unwinds like Ctrl-C (the resolver is killed, the
    temp dir removed, nothing written) instead of ending the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_stale_tempdirs() -> None:
    """Temp dirs of lock runs that were killed (kill -9 skips every cleanup): named with
    their process id, removed once that process is gone."""
    for d in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*-*"):
        pid_s = d.name[len(TMP_PREFIX):].split("-", 1)[0]
        if not pid_s.isdigit() or int(pid_s) == os.getpid():
            continue
        try:
            os.kill(int(pid_s), 0)
            continue  # still running
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            continue  # another user's live process


def _unmap(p: LockedPackage, imap: IndexMap) -> LockedPackage:
    if not imap or not p.url:
        return p
    real = imap.real(p.url)
    return p if real == p.url else replace(p, url=real, requirement=p.requirement.replace(p.url, real))


def _refuse_less_complete(path: Path, new: LockResult) -> None:
    """Never replace a lockfile with one that resolves less: a lock made where an index
    is unreachable must not silently wipe out one made where it was reachable."""
    try:
        old = read_header(path)
    except LockError:
        return  # nothing there, or not a stackbuild lockfile: nothing to lose
    now_missing = {u.name for u in new.unresolved}
    lost = sorted(n for n in now_missing if n in set(old.packages))
    if not lost and not (old.complete and new.unresolved):
        return
    what = (f"it resolves {', '.join(lost[:8])}{' and more' if len(lost) > 8 else ''}, which this lock could not"
            if lost else "it is complete and this lock is not")
    raise LockError(f"refusing to replace it with a less complete lockfile: {what} ({len(old.packages)} packages "
                    f"there, {len(new.packages)} here, {len(now_missing)} not resolved here). Lock where the "
                    "indexes are reachable, or pass --force to replace it anyway", file=path)


def _pulled_in_unresolved(packages: list[LockedPackage], inputs: list[_Input],
                          unresolved: list[Unresolved]) -> list[tuple[_Input, str]]:
    """Inputs whose resolution pulled in a package that is pinned but unresolved."""
    missing = {u.name for u in unresolved}
    parents = {p.name: set(p.via) for p in packages}
    by_name = {i.name: i for i in inputs}
    out: list[tuple[_Input, str]] = []
    for p in packages:
        if p.name not in missing:
            continue
        seen: set[str] = set()
        todo = [p.name]
        while todo:
            n = todo.pop()
            for parent in parents.get(n, ()):
                if parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        culprits = [by_name[n] for n in sorted(seen) if n in by_name]
        if not culprits:
            raise LockError(f"{p.name} is pinned by the recipe but not resolved here, and the resolver pulled "
                            f"in {p.requirement} for it; lock where the pin's index is reachable")
        out += [(c, p.name) for c in culprits if all(c is not o for o, _ in out)]
    return out


_INPUT_LINE_RE = re.compile(r"-r (\S+?)\.in \(line (\d+)\)")
_PARENT_RE = re.compile(r"SpecifierRequirement\('([^']+)'\), parent=\w+\('([^']+)'")


def _input_origins(inputs: list[_Input], label: str) -> dict[tuple[str, int], str]:
    """(input file stem, line) -> where that requirement came from; mirrors _write_inputs."""
    out: dict[tuple[str, int], str] = {}
    pins = [i for i in inputs if i.group == "recipe-pins" and not i.constraint]
    src = [i for i in inputs if i.group != "recipe-pins" and not i.constraint]
    offset = 1 if any(i.constraint for i in inputs) else 0
    for n, i in enumerate(pins, start=1):
        out[("recipe-pins", n)] = i.origin
    for n, i in enumerate(src, start=1 + offset):
        out[(label, n)] = i.origin
    return out


def _explain_failure(resolver: str, stderr: str, inputs: list[_Input], label: str,
                     replacements: dict[str, str]) -> str:
    origins = _input_origins(inputs, label)

    def where(m: re.Match[str]) -> str:
        return origins.get((Path(m.group(1)).name, int(m.group(2))), m.group(0))

    text = _INPUT_LINE_RE.sub(where, stderr)
    because: list[str] = []
    for req, parent in _PARENT_RE.findall(text):
        fname = urllib.parse.unquote(parent.split("#")[0].split(" ")[0].rsplit("/", 1)[-1])
        parts = fname.split("-")
        who = f"{canonicalize_name(parts[0])} {parts[1]}" if len(parts) >= 2 else fname
        because.append(f"{who} requires {req}")
    msg = f"{resolver} found no solution: {backends.failure_summary(text, replacements)}"
    if because:
        msg += "; because " + ", ".join(dict.fromkeys(because))
    overridden = {i.name for i in inputs if i.pin is not None and i.pin.override}
    hit = sorted(n for n in overridden
                 if any(_req_name(req) == n for req, _ in _PARENT_RE.findall(text)))
    if resolver == "pip-tools" and hit:
        msg += (f"; pip-tools cannot override what a dependency declares about {', '.join(hit)} "
                "(only the source's own declaration is replaced): use --resolver uv, which applies the "
                "recipe's overrides through the whole dependency graph, or pin that dependency too")
    return msg


def _req_name(text: str) -> str:
    try:
        return canonicalize_name(Requirement(text).name)
    except Exception:  # noqa: BLE001 - resolver wording varies
        return canonicalize_name(text.split("==")[0].split("[")[0])


def _write_inputs(tmp: Path, inputs: list[_Input], label: str, primary: str | None, extra: list[str],
                  links: list[str], offline: bool, uv: bool) -> backends.ResolveRequest:
    groups: dict[str, list[str]] = {"recipe-pins": [], label: [], f"{label}-constraints": []}
    overrides: list[str] = []
    for i in inputs:
        key = f"{label}-constraints" if i.constraint else i.group
        groups[key].append(i.requirement)
        if uv and i.pin is not None and i.pin.override:
            overrides.append(i.requirement)
    files: list[Path] = []
    constraints = groups.pop(f"{label}-constraints")
    if constraints:
        cpath = tmp / f"{label}-constraints.in"
        cpath.write_text("\n".join(constraints) + "\n")
        groups[label].insert(0, f"-c {cpath.name}")
    for stem, lines in groups.items():
        if lines and not all(ln.startswith("-c ") for ln in lines):
            p = tmp / f"{stem}.in"
            p.write_text("\n".join(lines) + "\n")
            files.append(p)
    opath = None
    if overrides:
        opath = tmp / "overrides.txt"
        opath.write_text("\n".join(overrides) + "\n")
    out = tmp / "resolved.txt"
    if out.exists():
        out.unlink()
    return backends.ResolveRequest(tuple(files), out, primary, tuple(extra), tuple(links), opath, offline)


def _verify(recipe: Recipe, plan: _Plan, packages: list[LockedPackage], inputs: list[_Input],
            first_use: list[FirstUse]) -> tuple[list[LockedPackage], dict[str, str]]:
    """Every package hashed; direct URLs match the recipe's sha256; first downloads said so."""
    notes: dict[str, str] = {}
    excluded = _excluded_names(recipe, plan.label)
    kept: list[LockedPackage] = []
    for p in packages:
        if p.name in excluded:
            continue  # pulled in by something else; it is installed from the built wheel
        if not p.hashes:
            raise LockError(f"the resolver gave no sha256 for {p.requirement}; refusing to write a lock "
                            "that cannot be verified", file=recipe.path)
        kept.append(p)
    by_name = {p.name: p for p in kept}
    for i in inputs:
        pin = i.pin
        if pin is None or not pin.url:
            continue
        locked = by_name.get(canonicalize_name(pin.name))
        if locked is None:
            raise LockError(f"{pin.url} was locked under another name (the wheel's metadata does not "
                            f"name {pin.name!r})", file=recipe.path, key=f"pins.{pin.name}.url")
        if pin.sha256:
            if pin.sha256 not in locked.hashes:
                raise LockError(f"sha256 mismatch for {pin.url}: the recipe says {pin.sha256}, the file has "
                                f"{', '.join(locked.hashes)}", file=recipe.path, key=f"pins.{pin.name}.sha256")
            by_name[locked.name] = _with_hashes(locked, (pin.sha256,))
            notes[locked.name] = "sha256 from the recipe, checked against the download"
        elif pin.trust_on_first_use:
            sha = locked.hashes[0]
            first_use.append(FirstUse(pin.name, pin.url, sha))
            notes[locked.name] = ("trust on first use: sha256 recorded from the first download, "
                                  "not checked against a known value")
    return [by_name[p.name] for p in kept], notes


def _with_hashes(p: LockedPackage, hashes: tuple[str, ...]) -> LockedPackage:
    return LockedPackage(p.name, p.requirement, p.version, p.url, hashes, p.via)


def _replace_seconds(r: LockResult, seconds: float) -> LockResult:
    from dataclasses import replace

    return replace(r, seconds=seconds)


def render_lockfile(result: LockResult, plan: _Plan, pins_rec: list[dict[str, Any]],
                    patches_rec: list[dict[str, Any]], primary: str, notes: dict[str, str],
                    mirrored: IndexMap | None = None) -> str:
    import json

    shown_primary = primary if not backends.is_local(primary) else "a local index (not recorded)"
    missing = incompleteness(result.recipe, result.command, pins_rec, [u.to_dict() for u in result.unresolved],
                             shown_primary)
    h: list[str] = [
        f"{FIRST_LINE}{result.recipe}. Do not edit; regenerate with:",
        f"#   {result.command}",
        *([f"# (after `stackbuild apply {result.recipe}`: the source's requirements are read from its workspace)"]
          if plan.source is not None else []),
        f"# recipe sha256: {result.recipe_sha256}",
        f"# inputs sha256: {result.inputs_sha256}  (pins, overrides, patch series: `--check` compares them)",
        f"{CONTENT_PREFIX}(filled in by seal)",
        COMPLETE_PREFIX + ("yes: every pin and every requirement is in this file, with hashes" if missing is None
                           else f"NO: {missing}"),
        f"# resolver: {result.resolver} {result.resolver_version}, for Python "
        f"{sys.version_info.major}.{sys.version_info.minor} on {sys.platform} {_platform.machine()}"
        + (" (offline)" if result.offline else ""),
        f"# primary index: {shown_primary}",
    ]
    for url, origin in plan.indexes:
        shown = url if not backends.is_local(url) else "a local index (not recorded)"
        h.append(f"# extra index: {shown} ({origin})")
    for real, _local in (mirrored.pairs if mirrored else ()):
        h.append(f"# index map: {real} was read from a local mirror (STACKBUILD_INDEX_MAP / --index-map)")
    if plan.source is not None:
        h.append(f"# requirements of {plan.label}: {', '.join(plan.source.files)} "
                 f"(sha256 {plan.source.sha256[:16]})")
    else:
        h.append("# requirements: the recipe's pins only (no source requirements)")
    for e in result.excluded:
        h.append(f"# not in this file: {e}")
    if result.overrides:
        h.append("#")
        scope = ("uv applies them through the whole dependency graph" if result.resolver == "uv" else
                 "pip-tools: the source's own declarations are left out of the resolver's input")
        h.append(f"# overrides (the recipe replaces what the source declares; {scope}):")
        for o in result.overrides:
            what = ", ".join(o.replaces) if o.replaces else f"nothing ({plan.label} does not declare it)"
            h.append(f"#   {o.pin} replaces {what}: {o.reason}")
    if result.first_use:
        h.append("#")
        for f in result.first_use:
            h.append(f"# {f.message}")
    h.append("#")
    h += [record_line("pin", r) for r in pins_rec]
    h += [record_line("patch", r) for r in patches_rec]
    h.append("#")
    body = render_packages(list(result.packages), notes)
    tail: list[str] = []
    if result.unresolved:
        tail.append("#")
        tail.append("# not resolved by this lock (install these separately; their dependencies are not "
                    "in this file):")
        for u in result.unresolved:
            whose = (f"pinned by the recipe, not resolved: {u.origin}" if u.origin.startswith("pins.")
                     else f"declared by {u.origin}, not resolved")
            tail.append(f"#   {u.requirement}  ({whose}; {u.reason}"
                        + (f"; sha256 {u.sha256})" if u.sha256 else ")"))
        for u in result.unresolved:
            tail.append(UNRESOLVED_PREFIX + json.dumps(u.to_dict(), sort_keys=True, separators=(",", ":")))
    # Each header and tail entry is one comment line; recipe text (URLs, reasons) with a
    # control character must not start another line (a requirement, a fake record).
    h = [_one_line(x) for x in h]
    tail = [_one_line(x) for x in tail]
    text = "\n".join(h) + "\n" + body + ("\n".join(tail) + "\n" if tail else "")
    for line in text.splitlines():
        if line.startswith("-"):
            raise LockError(f"refusing to write a machine-local option line: {line!r}", file=result.lockfile)
    return seal(text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def _one_line(line: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line)


# ---------------------------------------------------------------- --check


def _describe(rec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(rec.items()) if k not in ("name", "position"))


def check_lock(recipe: Recipe, lockfile: Path) -> LockCheckResult:
    """Compare the recipe's pins, overrides and patch series with the records in the
    lockfile's header. No network; exit_code 1 when anything changed."""
    header = read_header(Path(lockfile))
    changes: list[LockChange] = []
    notes: list[str] = []
    pins_now = {r["name"]: r for r in (pin_record(p) for p in recipe.pins)}
    pins_then = {r.get("name", "?"): r for r in header.pins}
    for name in sorted(set(pins_now) | set(pins_then)):
        now, then = pins_now.get(name), pins_then.get(name)
        if then is None and now is not None:
            changes.append(LockChange("pin", name, "added", _describe(now)))
        elif now is None and then is not None:
            changes.append(LockChange("pin", name, "removed", _describe(then)))
        elif now != then and now is not None and then is not None:
            for key in sorted(set(now) | set(then)):
                if now.get(key) != then.get(key):
                    kind = "override" if key == "override" else "pin"
                    changes.append(LockChange(kind, name, "changed",
                                              f"{key}: {then.get(key, '(none)')} -> {now.get(key, '(none)')}"))
    patches_now = [patch_record(n, p) for n, p in enumerate(recipe.patches, start=1)]
    by_now = {r["name"]: r for r in patches_now}
    by_then = {r.get("name", "?"): r for r in header.patches}
    for r in patches_now:
        then = by_then.get(r["name"])
        if then is None:
            changes.append(LockChange("patch", r["name"], "added", f"at position {r['position']}"))
            continue
        for key in sorted((set(r) | set(then)) - {"position"}):
            if r.get(key) != then.get(key):
                changes.append(LockChange("patch", r["name"], "changed",
                                          f"{key}: {then.get(key, '(none)')} -> {r.get(key, '(none)')}"))
    for name, then in by_then.items():
        if name not in by_now:
            changes.append(LockChange("patch", name, "removed", f"was at position {then.get('position')}"))
    order_then = [r.get("name") for r in header.patches if r.get("name") in by_now]
    order_now = [r["name"] for r in patches_now if r["name"] in by_then]
    if order_then != order_now:
        changes.append(LockChange("series", "patches", "reordered",
                                  f"{' -> '.join(map(str, order_then))}  now  {' -> '.join(order_now)}"))
    if header.recipe != recipe.name:
        changes.append(LockChange("recipe", recipe.name, "changed",
                                  f"the lockfile was written for recipe {header.recipe!r}"))
    digest_then = inputs_digest(list(header.pins), list(header.patches))
    if digest_then != header.inputs_sha256:
        changes.append(LockChange("lockfile", str(lockfile), "changed",
                                  "its header records do not match its inputs sha256 (edited by hand?)"))
    if header.content_sha256 is None:
        changes.append(LockChange("lockfile", str(lockfile), "unverifiable",
                                  "no content sha256 in its header (written by an older stackbuild): regenerate it"))
    elif header.edited:
        changes.append(LockChange("lockfile", str(lockfile), "changed",
                                  f"its content does not match its content sha256 (edited by hand?): it is "
                                  f"{header.content_actual[:16]}..., the header says {header.content_sha256[:16]}..."))
    missing = incomplete_message(header)
    if missing is not None:
        changes.append(LockChange("lockfile", str(lockfile), "incomplete", missing))
    if not changes and header.recipe_sha256 != recipe.sha256:
        notes.append("the recipe changed elsewhere (its sha256 differs) but not in pins, overrides "
                     "or the patch series")
    command = header.command.replace(f"lock {header.recipe}", f"lock {recipe.name}", 1) \
        if header.command else f"stackbuild lock {recipe.name}"
    return LockCheckResult(recipe.name, Path(lockfile), not changes, tuple(changes), tuple(notes), command)


# ---------------------------------------------------------------- trust on first use


@dataclass(frozen=True)
class FirstUseRecorded:
    recipe: Path
    pin: str
    sha256: str
    message: str = field(default="")

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": str(self.recipe), "pin": self.pin, "sha256": self.sha256, "message": self.message}

    def tables(self) -> list[Table]:
        return [Table("Trust on first use", ("recipe", "pin", "sha256"),
                      ((str(self.recipe), self.pin, self.sha256),), self.message)]


def record_first_use(recipe_path: Path, pin_name: str, sha256: str) -> FirstUseRecorded:
    """Write the sha256 the first download produced into the recipe, replacing
    `trust_on_first_use = true`. From now on the artifact is checked against it."""
    from stackbuild.lock.tofu import write_first_use

    write_first_use(Path(recipe_path), pin_name, sha256)
    msg = (f"trust on first use: recorded sha256 {sha256} for pins.{pin_name} in {recipe_path}; it was "
           "trusted because it was the first download seen, and every later download is checked against it")
    return FirstUseRecorded(Path(recipe_path), pin_name, sha256, msg)
