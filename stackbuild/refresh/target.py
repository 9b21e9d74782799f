"""The release a refresh goes to: parsing `--to` for each source kind, and where the new
release's files come from (the cache's base repository, as for `apply`; git for git
sources and refs of a local checkout).

`--to` forms: NAME==VERSION (a pypi source), NAME@REF (a git source, or a git ref of a
local source's checkout, read through a private index so the checkout is not touched),
NAME=PATH (a local source: another tree).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from stackbuild import localbase
from stackbuild.errors import SourceError, StackbuildError
from stackbuild.patchqueue import git_out
from stackbuild.recipe import Recipe, Source, SourceKind, local_source_dir
from stackbuild.sources.git import GitCheckout, export_tree, fetch_git
from stackbuild.sources.pypi import configured_index, list_files, sdist_filename_candidates

Progress = Callable[[str], None]
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class Target:
    source: Source  # the recipe's source as it is
    new_source: Source  # the same source at the new release
    label_old: str
    label_new: str
    new_version: str
    local_repo: Path | None = None  # a local source moved to a git ref of its checkout

    def new_src_state(self) -> dict[str, Any]:
        """How the new recipe pins the new source."""
        n = self.new_source
        if self.local_repo is not None:
            return {"kind": SourceKind.GIT.value, "url": str(self.local_repo), "tag": None, "commit": n.commit,
                    "ref": self.label_new}
        return {"kind": n.kind.value, "requirement": n.requirement, "sha256": n.sha256, "url": n.url,
                "tag": n.tag, "commit": n.commit, "path": n.path, "ref": self.label_new}


def find_source(recipe: Recipe, name: str) -> Source:
    for s in recipe.sources:
        if s.name == name or (s.project and s.project.lower() == name.lower()):
            return s
    raise StackbuildError(f"recipe has no source {name!r} (sources: {', '.join(s.name for s in recipe.sources)})",
                          file=recipe.path, key="sources")


def index_sha256(requirement: str) -> str:
    """The sdist's sha256 as the index's JSON states it."""
    req = Requirement(requirement)
    version = next(iter(req.specifier)).version
    wanted = set(sdist_filename_candidates(req.name, version))
    for f in list_files(req.name):
        if f.filename in wanted:
            if not f.sha256:
                raise SourceError(f"the index gives no sha256 for {f.filename}; pass --sha256", file=f.url)
            return f.sha256
    raise SourceError(f"no source release {requirement} on the index {configured_index()}")


def _local_dir(recipe: Recipe, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (recipe.path.parent / p).resolve()


_FORMS = ("NAME==VERSION (a pypi source), NAME@REF (a git source, or a git ref of a local source's checkout) "
          "or NAME=PATH (a local source: another tree)")


def target_source_name(recipe: Recipe, to: str) -> str:
    if "==" in to:
        return find_source(recipe, Requirement(to).name).name
    name = re.split(r"[=@]", to, maxsplit=1)[0]
    return find_source(recipe, name).name


def make_target(recipe: Recipe, to: str, sha256: str | None) -> Target:
    if "==" in to:
        req = Requirement(to)
        src = find_source(recipe, req.name)
        if src.kind is not SourceKind.PYPI:
            raise StackbuildError(f"source {src.name} is a {src.kind.value} source, not a pypi one; give --to "
                                  + (f"{src.name}@<tag or commit>" if src.kind is SourceKind.GIT
                                     else f"{src.name}=<path> or {src.name}@<git ref of {src.path}>"), key="--to")
        version = next(iter(req.specifier)).version
        new_req = f"{src.project}=={version}"
        try:
            sha = sha256 or index_sha256(new_req)
        except SourceError as e:  # name the recipe and the option too, not only the index
            raise SourceError(f"--to {to}: {e.render()}", file=recipe.path) from None
        new = dataclasses.replace(src, requirement=new_req, sha256=sha)
        return Target(src, new, src.requirement or "", new_req, version)
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)([=@])(.+)$", to)
    if not m:
        raise StackbuildError(f"--to must be {_FORMS}; got {to!r}", key="--to")
    name, sep, ref = m.groups()
    src = find_source(recipe, name)
    if src.kind is SourceKind.PYPI:
        raise StackbuildError(f"source {src.name} is a pypi source; give --to {src.project}==<version>", key="--to")
    if sep == "=":
        if src.kind is not SourceKind.LOCAL:
            raise StackbuildError(f"source {src.name} is a git source; give --to {src.name}@<tag or commit>", key="--to")
        new_dir = _local_dir(recipe, ref)
        if not new_dir.is_dir():
            raise SourceError(f"--to {to}: {new_dir} is not a directory", key="--to")
        new = dataclasses.replace(src, path=ref)
        return Target(src, new, f"{src.name}={src.path}", f"{src.name}={ref}", new_dir.name)
    if src.kind is SourceKind.LOCAL:
        assert src.path is not None
        repo = local_source_dir(recipe, src)
        r = git_out(repo, "rev-parse", "--verify", "-q", f"{ref}^{{commit}}", check=False)
        if r.returncode != 0:
            raise SourceError(f"--to {to}: {ref!r} is not a commit of the git checkout {repo}", key="--to")
        local_commit: str = r.stdout.strip()
        new = dataclasses.replace(src, commit=local_commit)
        label = ref if not _HEX40.match(ref) else ref[:12]
        return Target(src, new, f"{src.name}={src.path}", f"{src.name}@{ref}", label, local_repo=repo)
    commit = ref if _HEX40.match(ref) else None
    new = dataclasses.replace(src, tag=None if commit else ref, commit=commit, branch=None, float=False, sha256=None)
    old_label = f"{src.name}@{src.commit or src.tag or src.branch}"
    return Target(src, new, old_label, f"{src.name}@{ref}", ref if not commit else ref[:12])


def new_base_repo(recipe: Recipe, target: Target, progress: Progress, rebuild: bool = False) -> Path | None:
    """The cache's bare base repository holding the new release (branch `stackbuild`,
    one commit), made by the importer `stackbuild apply` uses: a release's sdist goes
    through the archive scanner into `git fast-import` once (workspace._source_base),
    a local tree through localbase. A release that apply or an earlier refresh already
    imported costs a fetch. None where the new tree comes from git (a git source, a ref
    of a local checkout): `materialise_new` exports it. `rebuild` imports it again (a
    fetch from the cached one failed: the cache is damaged)."""
    src = target.new_source
    if target.local_repo is not None:
        return None
    if src.kind is SourceKind.PYPI:
        from stackbuild.workspace import _Ctx, _source_base

        return _source_base(_Ctx(recipe, recipe.root, progress), src, rebuild=rebuild)
    if src.kind is SourceKind.LOCAL:
        assert src.path is not None
        return localbase.base_repo(localbase.identify(_local_dir(recipe, src.path)), rebuild=rebuild)
    return None


def materialise_new(target: Target, dest: Path) -> str | None:
    """Write the new release's files into `dest` where they come from git (see
    `new_base_repo`); the upstream commit for git sources."""
    src = target.new_source
    if target.local_repo is not None:
        assert src.commit is not None
        export_tree(GitCheckout(target.local_repo / ".git", src.commit, str(target.local_repo)), dest)
        return None
    assert src.kind is SourceKind.GIT, src.kind
    co = fetch_git(src)
    export_tree(co, dest)
    return co.commit
