"""PyPI sdists through a package index made here: file:// PEP 503 HTML and PEP 691 JSON
indexes, and an HTTP index that answers JSON only to clients that ask for it."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stackbuild.errors import SourceError
from stackbuild.sources import pypi
from stackbuild.sources.pypi import configured_index, fetch_sdist, list_files


def make_sdist(path: Path, top: str, files: dict[str, bytes]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for rel, data in files.items():
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Index:
    """A tiny index in a directory: files/ holds the sdists, simple/ the project pages
    (index.html, index.json or both)."""

    def __init__(self, root: Path, html: bool = True, json_api: bool = True, hashes: bool = True) -> None:
        self.root = root
        self.html, self.json_api, self.hashes = html, json_api, hashes
        self.projects: dict[str, list[tuple[str, str]]] = {}

    @property
    def url(self) -> str:
        return (self.root / "simple").as_uri()

    def add(self, project: str, filename: str, files: dict[str, bytes]) -> tuple[Path, str]:
        path = self.root / "files" / filename
        top = filename.removesuffix(".tar.gz")
        sha = make_sdist(path, top, files)
        self.projects.setdefault(project, []).append((filename, sha))
        self.write()
        return path, sha

    def write(self) -> None:
        for project, files in self.projects.items():
            d = self.root / "simple" / project
            d.mkdir(parents=True, exist_ok=True)
            if self.html:
                links = "\n".join(
                    f'<a href="../../files/{f}{"#sha256=" + s if self.hashes else ""}">{f}</a><br/>' for f, s in files
                )
                (d / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}\n</body></html>\n")
            if self.json_api:
                doc = {
                    "meta": {"api-version": "1.0"},
                    "name": project,
                    "files": [
                        {"filename": f, "url": f"../../files/{f}", "hashes": {"sha256": s} if self.hashes else {}}
                        for f, s in files
                    ],
                }
                (d / "index.json").write_text(json.dumps(doc))


TINY = {"PKG-INFO": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n", "tinypkg/__init__.py": b"VALUE = 1\n"}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("STACKBUILD_CACHE", str(d))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    return d


@pytest.mark.parametrize(("html", "json_api"), [(True, False), (False, True)], ids=["pep503-html", "pep691-json"])
def test_fetch_sdist_finds_and_caches(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, html: bool, json_api: bool) -> None:
    index = Index(tmp_path / "index", html=html, json_api=json_api)
    src, sha = index.add("tinypkg", "tinypkg-1.0.tar.gz", TINY)
    index.add("tinypkg", "tinypkg-0.9.tar.gz", {"PKG-INFO": b"old\n"})
    monkeypatch.setenv("STACKBUILD_INDEX_URL", index.url)
    seen: list[str] = []
    got = fetch_sdist("tinypkg==1.0", sha, progress=seen.append)
    assert got == cache / "sdists" / sha / "tinypkg-1.0.tar.gz"
    assert got.read_bytes() == src.read_bytes()
    assert seen == ["downloading tinypkg-1.0.tar.gz"]
    # cached: the index is not needed any more
    shutil.rmtree(index.root / "simple")
    seen.clear()
    assert fetch_sdist("tinypkg==1.0", sha, progress=seen.append) == got
    assert seen == []
    # no temporary files left in the cache entry
    assert [p.name for p in got.parent.iterdir()] == ["tinypkg-1.0.tar.gz"]


def test_list_files_reads_both_forms(tmp_path: Path) -> None:
    index = Index(tmp_path / "index")
    _, sha = index.add("tinypkg", "tinypkg-1.0.tar.gz", TINY)
    files = list_files("tinypkg", index.url)
    (f,) = files
    assert (f.filename, f.sha256) == ("tinypkg-1.0.tar.gz", sha)
    assert f.url == (index.root / "files" / "tinypkg-1.0.tar.gz").as_uri()
    (index.root / "simple/tinypkg/index.json").unlink()
    (f2,) = list_files("tinypkg", index.url)
    assert f2 == f


def test_project_names_are_normalised(tmp_path: Path, cache: Path) -> None:
    index = Index(tmp_path / "index")
    _, sha = index.add("tiny-pkg", "tiny_pkg-2.0.tar.gz", TINY)
    got = fetch_sdist("Tiny_Pkg==2.0", sha, index=index.url)
    assert got.name == "tiny_pkg-2.0.tar.gz"


def test_tampered_sha256_in_recipe_is_refused_naming_both(tmp_path: Path, cache: Path) -> None:
    index = Index(tmp_path / "index")
    _, sha = index.add("tinypkg", "tinypkg-1.0.tar.gz", TINY)
    wrong = "0" * 64
    with pytest.raises(SourceError) as ei:
        fetch_sdist("tinypkg==1.0", wrong, index=index.url)
    msg = str(ei.value)
    assert "sha256 mismatch" in msg and "tinypkg-1.0.tar.gz" in msg
    assert wrong in msg and sha in msg
    assert not (cache / "sdists" / wrong).exists() or not any((cache / "sdists" / wrong).iterdir())


def test_index_without_hashes_still_checks_the_download(tmp_path: Path, cache: Path) -> None:
    index = Index(tmp_path / "index", hashes=False)
    _, sha = index.add("tinypkg", "tinypkg-1.0.tar.gz", TINY)
    wrong = "1" * 64
    with pytest.raises(SourceError) as ei:
        fetch_sdist("tinypkg==1.0", wrong, index=index.url)
    assert "sha256 mismatch" in ei.value.message and sha in ei.value.message
    assert ei.value.file is not None and ei.value.file.endswith("tinypkg-1.0.tar.gz")
    entry = cache / "sdists" / wrong
    assert not entry.exists() or list(entry.iterdir()) == []  # nothing half-written kept
    assert fetch_sdist("tinypkg==1.0", sha, index=index.url).exists()


def test_tampered_cached_file_is_detected_and_fetched_again(tmp_path: Path, cache: Path) -> None:
    index = Index(tmp_path / "index")
    src, sha = index.add("tinypkg", "tinypkg-1.0.tar.gz", TINY)
    got = fetch_sdist("tinypkg==1.0", sha, index=index.url)
    got.write_bytes(b"tampered with")
    seen: list[str] = []
    again = fetch_sdist("tinypkg==1.0", sha, progress=seen.append, index=index.url)
    assert again.read_bytes() == src.read_bytes()
    assert seen == ["downloading tinypkg-1.0.tar.gz"]


def test_version_not_on_the_index(tmp_path: Path, cache: Path) -> None:
    index = Index(tmp_path / "index")
    _, sha = index.add("tinypkg", "tinypkg-1.0.tar.gz", TINY)
    with pytest.raises(SourceError) as ei:
        fetch_sdist("tinypkg==3.0", sha, index=index.url)
    assert "no source release tinypkg==3.0" in ei.value.message
    assert ei.value.file == index.url


def test_project_not_on_the_index(tmp_path: Path, cache: Path) -> None:
    index = Index(tmp_path / "index")
    index.add("tinypkg", "tinypkg-1.0.tar.gz", TINY)
    with pytest.raises(SourceError) as ei:
        fetch_sdist("otherpkg==1.0", "2" * 64, index=index.url)
    assert ei.value.file == index.url


def test_unreachable_index_fails_once_and_clearly(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://127.0.0.1:9/simple"
    monkeypatch.setenv("STACKBUILD_INDEX_URL", url)
    t0 = time.monotonic()
    with pytest.raises(SourceError) as ei:
        fetch_sdist("tinypkg==1.0", "3" * 64)
    elapsed = time.monotonic() - t0
    assert ei.value.file == url
    assert "unreachable" in ei.value.message
    assert "\n" not in str(ei.value)
    # a refused connection is answered at once: no retry loop (pip-compile retries 16 s)
    assert elapsed < 10, elapsed


def test_configured_index_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://pip-config.example/simple/\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("STACKBUILD_INDEX_URL", raising=False)
    assert configured_index() == "https://pip-config.example/simple"
    monkeypatch.setenv("PIP_INDEX_URL", "https://pip-env.example/simple/")
    assert configured_index() == "https://pip-env.example/simple"
    monkeypatch.setenv("STACKBUILD_INDEX_URL", "https://stackbuild.example/simple")
    assert configured_index() == "https://stackbuild.example/simple"


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[tuple[str, str]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        accept = self.headers.get("Accept", "")
        type(self).requests.append((self.path, accept))
        local = Path(self.translate_path(self.path))
        if local.is_dir() and "application/vnd.pypi.simple.v1+json" in accept and (local / "index.json").exists():
            body = (local / "index.json").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


@pytest.fixture
def http_index(tmp_path: Path) -> Iterator[tuple[Index, str, list[tuple[str, str]]]]:
    index = Index(tmp_path / "index", html=False, json_api=True)
    root = str(index.root)

    class Handler(_Handler):
        requests: list[tuple[str, str]] = []

        def __init__(self, *a, **kw) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*a, directory=root, **kw)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield index, f"http://127.0.0.1:{server.server_address[1]}/simple", Handler.requests
    finally:
        server.shutdown()
        server.server_close()


def test_http_index_json_api(http_index: tuple[Index, str, list[tuple[str, str]]], cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index, url, requests = http_index
    src, sha = index.add("tinypkg", "tinypkg-1.0.tar.gz", TINY)
    monkeypatch.setenv("PIP_INDEX_URL", url + "/")
    got = fetch_sdist("tinypkg==1.0", sha)
    assert got.read_bytes() == src.read_bytes()
    assert pypi.configured_index() == url
    page, accept = requests[0]
    assert page == "/simple/tinypkg/" and "application/vnd.pypi.simple.v1+json" in accept
    assert requests[1][0] == "/files/tinypkg-1.0.tar.gz"


def test_http_index_404_names_the_project(http_index: tuple[Index, str, list[tuple[str, str]]], cache: Path) -> None:
    index, url, _ = http_index
    index.add("tinypkg", "tinypkg-1.0.tar.gz", TINY)
    with pytest.raises(SourceError) as ei:
        fetch_sdist("nosuchpkg==1.0", "4" * 64, index=url)
    assert "'nosuchpkg' not found" in ei.value.message and ei.value.file == url


def test_apply_a_recipe_with_a_pypi_source(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_workspace import Project, sha256

    from stackbuild.recipe import load_recipe
    from stackbuild.series import PatchVerdict
    from stackbuild.workspace import apply_recipe

    index = Index(tmp_path / "index")
    _, sha = index.add("tinypkg", "tinypkg-1.0.tar.gz", TINY)
    monkeypatch.setenv("STACKBUILD_INDEX_URL", index.url)
    proj = Project(tmp_path / "proj")
    patch = "--- a/tinypkg/__init__.py\n+++ b/tinypkg/__init__.py\n@@ -1 +1 @@\n-VALUE = 1\n+VALUE = 2\n"
    rel = proj.add_patch("value.patch", patch)
    path = proj.write_recipe("r", {"tinypkg": {"pypi": "tinypkg==1.0", "sha256": sha}},
                             [{"file": rel, "source": "tinypkg", "sha256": sha256(patch)}])
    r = apply_recipe(load_recipe(path), proj.workdir)
    assert [p.verdict for p in r.patches] == [PatchVerdict.APPLIED]
    tree = proj.workdir / "tinypkg"
    assert (tree / "tinypkg/__init__.py").read_text() == "VALUE = 2\n"
    assert (tree / "PKG-INFO").exists()  # the sdist's top folder was stripped
    assert r.manifest is not None
    (s,) = r.manifest.sources
    assert (s.kind, s.ref, s.sha256) == ("pypi", "tinypkg==1.0", sha)
