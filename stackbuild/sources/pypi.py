"""PyPI source releases: found through the index's JSON simple API (PEP 691; the
HTML form of PEP 503 as a fallback, which local `file://` indexes serve), downloaded
into the cache, checked against the recipe's sha256 before use."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from stackbuild import net
from stackbuild.cache import cache_dir, locked, sha256_file
from stackbuild.errors import SourceError

if TYPE_CHECKING:
    from stackbuild.sources.limits import ArchiveLimits

DEFAULT_INDEX = "https://pypi.org/simple"
JSON_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"

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


def _page_url(url: str) -> str:
    """A `file://` index is a directory per project holding index.json or index.html."""
    if url.startswith("file://"):
        path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path))
        for name in ("index.json", "index.html"):
            if (path / name).is_file():
                return (path / name).as_uri()
    return url


def list_files(project: str, index: str | None = None) -> list[IndexFile]:
    """The files the index lists for `project`. The answer is untrusted: anything that
    is not a well-formed PEP 691 JSON or PEP 503 HTML page is refused, naming the URL."""
    index = (index or configured_index()).rstrip("/")
    url = f"{index}/{canonicalize_name(project)}/"
    try:
        r = net.get(_page_url(url), accept=JSON_ACCEPT)
    except net.NetError as e:
        if e.status == 404:
            raise SourceError(f"project {project!r} not found on the index", file=index) from None
        if e.status is not None:
            raise SourceError(f"index answered HTTP {e.status} for {url}", file=index) from None
        raise SourceError(f"{e.message} (requesting {url})", file=index) from None
    if "json" in r.content_type:
        return _json_files(url, r.body)
    parser = _Links()
    parser.feed(r.body.decode("utf-8", "replace"))
    files: list[IndexFile] = []
    for text, href in parser.links:
        full = urllib.parse.urljoin(url, href)
        m = re.search(r"#sha256=([0-9a-f]{64})", full)
        files.append(IndexFile(text or Path(urllib.parse.urlparse(full).path).name, full.split("#")[0], m.group(1) if m else None))
    return files


def _json_files(url: str, body: bytes) -> list[IndexFile]:
    def bad(why: str) -> SourceError:
        return SourceError(f"malformed index answer (PEP 691 JSON): {why}", file=url)

    try:
        doc = json.loads(body)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise bad(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict) or "files" not in doc:
        raise bad("no 'files' list")
    if not isinstance(doc["files"], list):
        raise bad(f"'files' is {type(doc['files']).__name__}, not a list")
    files: list[IndexFile] = []
    for i, f in enumerate(doc["files"]):
        if not isinstance(f, dict):
            raise bad(f"files[{i}] is {type(f).__name__}, not an object")
        for key in ("filename", "url"):
            if not isinstance(f.get(key), str) or not f[key]:
                raise bad(f"files[{i}] has no {key!r} string")
        hashes = f.get("hashes", {})
        if not isinstance(hashes, dict):
            raise bad(f"files[{i}].hashes is {type(hashes).__name__}, not an object")
        sha = hashes.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise bad(f"files[{i}].hashes.sha256 is not 64 hex digits")
        files.append(IndexFile(f["filename"], urllib.parse.urljoin(url, f["url"]), sha))
    return files


def sdist_filename_candidates(project: str, version: str) -> list[str]:
    norm = canonicalize_name(project)
    names = {project, norm, norm.replace("-", "_"), project.replace("-", "_")}
    return [f"{n}-{version}.tar.gz" for n in names]


def fetch_sdist(requirement: str, sha256: str, progress: Progress | None = None, index: str | None = None,
                limits: ArchiveLimits | None = None) -> Path:
    """The sdist of an exactly pinned requirement, from the cache or the index,
    verified against `sha256` before it is returned. A fresh download is also read to
    the end of its compressed stream (within `limits`) before it is cached."""
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
        from stackbuild.sources.archive import DEFAULT_LIMITS, verify_compressed

        # a corrupt stream (bad CRC, truncated) is never cached, even when its hash is pinned
        download_verified(match.url, dest, sha256, label=match.filename,
                          check=lambda f: verify_compressed(f, match.url, limits or DEFAULT_LIMITS))
    return dest


def download_verified(url: str, dest: Path, sha256: str, check: Callable[[BinaryIO], None] | None = None,
                      label: str | None = None) -> None:
    """Download `url` to `dest` through the network door (deadline, size limit,
    progress), which keeps `dest` only if its sha256 matches (and `check` passes)."""
    net.download(url, dest, sha256=sha256, check=check, label=label)
