"""Git sources through gitpython, with a mirror map.

The mirror map works like git's `url.<base>.insteadOf`: a URL starting with a
configured prefix is fetched from the replacement instead, so air-gapped hosts (and
the tests) serve real upstream URLs such as https://github.com/intel/llm-scaler from
local clones. Entries come from `STACKBUILD_GIT_MIRRORS` ("PREFIX=REPLACEMENT"
pairs separated by ';' or newlines) and from the file named by
`STACKBUILD_MIRRORS_FILE` (default: ~/.config/stackbuild/mirrors.toml, a `[mirrors]`
table); the longest matching prefix wins.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stackbuild.cache import cache_dir, locked
from stackbuild.errors import SourceError
from stackbuild.inputs import read_user_text
from stackbuild.recipe import Source

if TYPE_CHECKING:
    import git

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class GitCheckout:
    repo: Path  # a bare mirror in the cache
    commit: str
    url: str  # the URL actually fetched (after the mirror map)


def mirror_map() -> dict[str, str]:
    mirrors: dict[str, str] = {}
    f = os.environ.get("STACKBUILD_MIRRORS_FILE")
    if f:
        path = Path(f)
    else:
        import platformdirs  # only here: importing the module must stay cheap

        path = Path(platformdirs.user_config_dir("stackbuild")) / "mirrors.toml"
    if path.exists():
        try:
            data = tomllib.loads(read_user_text(path, "mirror map", SourceError))
        except tomllib.TOMLDecodeError as e:
            raise SourceError(f"cannot read mirror map: {e}", file=path) from None
        table = data.get("mirrors", {})
        if not isinstance(table, dict):
            raise SourceError("must be a table of prefix = replacement", file=path, key="mirrors")
        mirrors.update({str(k): str(v) for k, v in table.items()})
    for entry in os.environ.get("STACKBUILD_GIT_MIRRORS", "").replace("\n", ";").split(";"):
        if entry.strip():
            if "=" not in entry:
                raise SourceError(f"entry {entry!r} is not PREFIX=REPLACEMENT", key="STACKBUILD_GIT_MIRRORS")
            k, v = entry.split("=", 1)
            mirrors[k.strip()] = v.strip()
    return mirrors


def apply_mirrors(url: str, mirrors: dict[str, str] | None = None) -> str:
    mirrors = mirror_map() if mirrors is None else mirrors
    best = max((p for p in mirrors if url.startswith(p)), key=len, default=None)
    return url if best is None else mirrors[best] + url[len(best):]


def fetch_git(source: Source) -> GitCheckout:
    """A bare mirror of the source in the cache holding the pinned commit."""
    assert source.url
    import git  # gitpython is slow to import; only git sources need it

    url = apply_mirrors(source.url)
    key = hashlib.sha256(source.url.encode()).hexdigest()[:24]
    bare = cache_dir() / "git" / f"{key}.git"
    with locked(cache_dir() / "locks" / f"git-{key}.lock", f"git cache for {source.url}", timeout=600):
        try:
            if not bare.exists():
                repo = git.Repo.init(bare, bare=True)
                repo.create_remote("origin", url)
            repo = git.Repo(bare)
            repo.remote("origin").set_url(url)
            commit = _resolve(repo, source, fetch=False)
            if commit is None:
                repo.git.fetch("origin", "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", "--prune")
                commit = _resolve(repo, source, fetch=True)
        except git.GitCommandError as e:
            msg = (e.stderr or str(e)).strip().splitlines()
            raise SourceError(f"git fetch from {url} failed: {msg[-1] if msg else e}", file=source.url) from None
    if commit is None:
        ref = source.commit or source.tag or source.branch
        raise SourceError(f"{ref!r} not found in {url}", file=source.url)
    if source.commit and source.tag:
        tag_commit = _rev(repo, f"refs/tags/{source.tag}^{{commit}}")
        if tag_commit and tag_commit != source.commit:
            raise SourceError(f"tag {source.tag} is {tag_commit[:12]}, the recipe pins {source.commit[:12]}: the tag moved", file=source.url)
    return GitCheckout(bare, commit, url)


def _rev(repo: git.Repo, ref: str) -> str | None:
    import git

    try:
        return str(repo.git.rev_parse("--verify", "--quiet", ref))
    except git.GitCommandError:
        return None


def _resolve(repo: git.Repo, source: Source, fetch: bool) -> str | None:
    if source.commit:
        return _rev(repo, f"{source.commit}^{{commit}}")
    if source.tag:
        return _rev(repo, f"refs/tags/{source.tag}^{{commit}}")
    if source.branch:
        # a floating branch is only trusted after a fetch
        return _rev(repo, f"refs/heads/{source.branch}^{{commit}}") if fetch else None
    return None


def read_file_at(checkout: GitCheckout, path: str) -> bytes:
    import git

    repo = git.Repo(checkout.repo)
    try:
        blob = repo.commit(checkout.commit).tree / path
    except KeyError:
        raise SourceError(f"{path} not found at commit {checkout.commit[:12]}", file=checkout.url) from None
    return bytes(blob.data_stream.read())


def export_tree(checkout: GitCheckout, dest: Path) -> None:
    """Write the pinned commit's files into `dest` (no .git). A private index file keeps
    the shared bare mirror untouched."""
    import tempfile

    from stackbuild.gitrun import git_process

    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="stackbuild-index-") as tmp:
        r = git_process(dest, f"--git-dir={checkout.repo}", f"--work-tree={dest}", "checkout", "-f", checkout.commit,
                        "--", ".", env={"GIT_INDEX_FILE": str(Path(tmp) / "index")})
    if r.returncode != 0:
        raise SourceError(f"exporting {checkout.commit[:12]} failed: {r.stderr.strip()}", file=checkout.url)
