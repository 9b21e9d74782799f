"""Shared test fixtures: real vLLM source releases (downloaded once per run into a
cache, sha256 checked) and real git upstreams made with gitpython."""

from __future__ import annotations

import os
import shutil
import tarfile
import urllib.request
from pathlib import Path

import git

from stackbuild.cache import sha256_file

# sha256 of the real sdists on the package index
VLLM_SDISTS = {
    "0.19.0": "81e59cf87175e7a62eb8d9acf5989484bbd17089d5eface353f89067bda282d9",
    "0.20.0": "a6d50152936ee292455af3ffbe359f7a284ac43bf3b68caccf29f368e196cc72",
    "0.21.0": "05ff89c3e926b88b77d7878e317a659ffba678afc21c1d48952037aa5457f058",
    "0.23.0": "760269db3d9611e12e524681df1bca0977d5d2f5fcb4481cc34d33efc4ae7ff5",
    "0.33.0": "f4c33c2503d52bb411146afa9618a4f48bed68912f617e6803ac8d76e4c74112",
}


def test_cache_dir() -> Path:  # noqa: D103 - not a test (see __test__ below)
    d = Path(os.environ.get("STACKBUILD_TEST_CACHE", Path.home() / ".cache" / "stackbuild-tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# set by conftest for each test: whether it is marked `network`
NETWORK_ALLOWED = True


def _needs_network(what: str) -> None:
    if not NETWORK_ALLOWED:
        raise AssertionError(f"{what} comes from the package index: mark the test `network`")


def vllm_sdist(version: str) -> Path:
    """The real vLLM sdist from the package index, downloaded once into the test cache."""
    _needs_network(f"vllm-{version}")
    sha = VLLM_SDISTS[version]
    dest = test_cache_dir() / f"vllm-{version}.tar.gz"
    if dest.exists() and sha256_file(dest) == sha:
        return dest
    import json

    req = urllib.request.Request(
        "https://pypi.org/simple/vllm/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    url = next(f["url"] for f in files if f["filename"] == f"vllm-{version}.tar.gz")
    tmp = dest.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as out:
        shutil.copyfileobj(r, out)
    if sha256_file(tmp) != sha:
        tmp.unlink()
        raise RuntimeError(f"sha256 mismatch for vllm-{version}.tar.gz")
    tmp.replace(dest)
    return dest


def vllm_tree(version: str) -> Path:
    """The extracted pristine vLLM source release (read-only by convention: copy it
    before changing anything)."""
    _needs_network(f"vllm-{version}")
    root = test_cache_dir() / "trees"
    tree = root / f"vllm-{version}"
    if (tree / "pyproject.toml").exists():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".vllm-{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with tarfile.open(vllm_sdist(version)) as tf:
        tf.extractall(tmp, filter="data")
    (tmp / f"vllm-{version}").rename(tree)
    shutil.rmtree(tmp, ignore_errors=True)
    return tree


def make_upstream_repo(path: Path, files: dict[str, str], tag: str | None = "v1.0") -> git.Repo:
    """A real git repository with one commit holding `files` (and `tag` on it)."""
    path.mkdir(parents=True, exist_ok=True)
    repo = git.Repo.init(path, initial_branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Upstream")
        cw.set_value("user", "email", "upstream@example.com")
    for rel, text in files.items():
        p = path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    repo.index.add(list(files))
    repo.index.commit("initial")
    if tag:
        repo.create_tag(tag)
    return repo


def commit_files(repo: git.Repo, files: dict[str, str], message: str) -> str:
    root = Path(repo.working_tree_dir or ".")
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    repo.index.add(list(files))
    return repo.index.commit(message).hexsha


REPO_ROOT = Path(__file__).resolve().parent.parent


def seed_cache(cache: Path, versions: tuple[str, ...] = ("0.19.0", "0.23.0")) -> Path:
    """A stackbuild cache (STACKBUILD_CACHE) that already holds the real vLLM sdists,
    so tests never download a release twice in one run. Hard links where possible."""
    for v in versions:
        sha = VLLM_SDISTS[v]
        d = cache / "sdists" / sha
        dest = d / f"vllm-{v}.tar.gz"
        if dest.exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        src = vllm_sdist(v)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
    return cache


def apply_shipped(recipe_name: str, workdir: Path, cache: Path):  # type: ignore[no-untyped-def]
    """`stackbuild apply` of a recipe shipped in recipes/, into `workdir`."""
    from stackbuild.recipe import load_recipe
    from stackbuild.workspace import apply_recipe

    old = os.environ.get("STACKBUILD_CACHE")
    os.environ["STACKBUILD_CACHE"] = str(seed_cache(cache))
    try:
        return apply_recipe(load_recipe(REPO_ROOT / "recipes" / f"{recipe_name}.toml"), workdir)
    finally:
        if old is None:
            os.environ.pop("STACKBUILD_CACHE", None)
        else:
            os.environ["STACKBUILD_CACHE"] = old


test_cache_dir.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test
