"""PyPI source releases: found through the index's JSON simple API (PEP 691; the
HTML form of PEP 503 as a fallback, which local `file://` indexes serve), downloaded
into the cache, checked against the recipe's sha256 before use."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from stackbuild.cache import atomic_file, cache_dir, locked, sha256_file
from stackbuild.errors import SourceError

DEFAULT_INDEX = "https://pypi.org/simple"
JSON_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
TIMEOUT = float(os.environ.get("STACKBUILD_NET_TIMEOUT", "30"))

Progress = Callable[[str], None]


@dataclass(frozen=True)
class IndexFile:
    filename: str
    url: str
    sha256: str | None


def configured_index() -> str:
    """The index the user configured: STACKBUILD_INDEX_URL, PIP_INDEX_URL, pip's
    config `global.index-url`, else PyPI."""
    for var in ("STACKBUILD_INDEX_URL", "PIP_INDEX_URL"):
        if os.environ.get(var):
            return os.environ[var].rstrip("/")
    # `pip config get` reads only the user file; `list` merges every file pip reads
    # (/etc/pip.conf, the user's, PIP_CONFIG_FILE) in pip's own order of precedence
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_INDEX
    values: dict[str, str] = {}
    for line in out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.endswith(".index-url"):
            try:
                values[key] = str(ast.literal_eval(value))
            except (ValueError, SyntaxError):
                values[key] = value.strip("'\"")
    for key in ("global.index-url", "install.index-url", "download.index-url"):
        if values.get(key):
            return values[key].rstrip("/")
    return DEFAULT_INDEX


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


def _get(url: str) -> tuple[bytes, str]:
    if url.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        if path.is_dir():
            for name in ("index.json", "index.html"):
                if (path / name).exists():
                    path = path / name
                    break
        return path.read_bytes(), "application/json" if path.suffix == ".json" else "text/html"
    req = urllib.request.Request(url, headers={"Accept": JSON_ACCEPT, "User-Agent": "stackbuild"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return r.read(), r.headers.get("Content-Type", "")


def list_files(project: str, index: str | None = None) -> list[IndexFile]:
    index = (index or configured_index()).rstrip("/")
    url = f"{index}/{canonicalize_name(project)}/"
    try:
        body, ctype = _get(url)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise SourceError(f"project {project!r} not found on the index", file=index) from None
        raise SourceError(f"index answered HTTP {e.code} for {url}", file=index) from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise SourceError(f"index unreachable: {reason}", file=index) from None
    files: list[IndexFile] = []
    if "json" in ctype:
        for f in json.loads(body)["files"]:
            files.append(IndexFile(f["filename"], urllib.parse.urljoin(url, f["url"]), f.get("hashes", {}).get("sha256")))
        return files
    parser = _Links()
    parser.feed(body.decode("utf-8", "replace"))
    for text, href in parser.links:
        full = urllib.parse.urljoin(url, href)
        m = re.search(r"#sha256=([0-9a-f]{64})", full)
        files.append(IndexFile(text or Path(urllib.parse.urlparse(full).path).name, full.split("#")[0], m.group(1) if m else None))
    return files


def sdist_filename_candidates(project: str, version: str) -> list[str]:
    norm = canonicalize_name(project)
    names = {project, norm, norm.replace("-", "_"), project.replace("-", "_")}
    return [f"{n}-{version}.tar.gz" for n in names]


def fetch_sdist(requirement: str, sha256: str, progress: Progress | None = None, index: str | None = None) -> Path:
    """The sdist of an exactly pinned requirement, from the cache or the index,
    verified against `sha256` before it is returned."""
    req = Requirement(requirement)
    version = next(iter(req.specifier)).version
    dest_dir = cache_dir() / "sdists" / sha256
    existing = [p for p in dest_dir.glob("*.tar.gz")] if dest_dir.is_dir() else []
    for cached in existing:
        if sha256_file(cached) == sha256:
            return cached
        cached.unlink()  # damaged or tampered with since it was written: fetch again
    files = list_files(req.name, index)
    wanted = set(sdist_filename_candidates(req.name, version))
    match = next((f for f in files if f.filename in wanted), None)
    if match is None:
        raise SourceError(f"no source release {requirement} on the index (looked for {sorted(wanted)[0]})", file=index or configured_index())
    if match.sha256 and match.sha256 != sha256:
        raise SourceError(
            f"sha256 mismatch for {match.filename}: recipe pins {sha256}, the index says {match.sha256}",
            file=match.url,
        )
    dest = dest_dir / match.filename
    with locked(cache_dir() / "locks" / f"{sha256}.lock", f"cache entry {match.filename}", timeout=600):
        if dest.exists():
            return dest
        if progress:
            progress(f"downloading {match.filename}")
        download_verified(match.url, dest, sha256)
    return dest


def download_verified(url: str, dest: Path, sha256: str) -> None:
    h = hashlib.sha256()
    try:
        with atomic_file(dest) as out:
            if url.startswith("file://"):
                src = open(urllib.parse.unquote(urllib.parse.urlparse(url).path), "rb")  # noqa: SIM115
            else:
                req = urllib.request.Request(url, headers={"User-Agent": "stackbuild"})
                src = urllib.request.urlopen(req, timeout=TIMEOUT)  # noqa: SIM115
            with src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != sha256:
                raise SourceError(
                    f"sha256 mismatch: recipe pins {sha256}, downloaded file has {h.hexdigest()}", file=url
                )
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise SourceError(f"download failed: {getattr(e, 'reason', e)}", file=url) from None
