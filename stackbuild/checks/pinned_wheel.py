"""The wheel of one pinned release, read by the static checks (never installed).

One door for both the transformers check and the API closure check: a release on the
package index is downloaded once into the cache (`wheels/PROJECT/VERSION/`), its sha256
checked against the recipe's pin when the recipe gives one, else against what the
index publishes; an unverified download is refused.
"""

from __future__ import annotations

from pathlib import Path

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from stackbuild.cache import cache_dir, locked, sha256_file
from stackbuild.errors import SourceError
from stackbuild.sources.pypi import configured_index, download_verified, list_files


def cached_wheel_dir(project: str, version: str) -> Path:
    return cache_dir() / "wheels" / canonicalize_name(project) / version


def fetch_wheel(project: str, version: str, index: str | None = None, sha256: str | None = None) -> Path:
    """A wheel of `project==version` from the cache or the index. Any wheel of that
    release serves (their Python files are the same); a pure one is preferred."""
    dest_dir = cached_wheel_dir(project, version)
    cached = sorted(dest_dir.glob("*.whl")) if dest_dir.is_dir() else []
    for c in cached:
        if sha256 is None or sha256_file(c) == sha256:
            return c
        c.unlink()  # not the pinned artifact (damaged, or another build): fetch again
    idx = index or configured_index()
    wheels = []
    for f in list_files(project, idx):
        try:
            _, v, _, tags = parse_wheel_filename(f.filename)
        except InvalidWheelFilename:
            continue
        try:
            same = v == Version(version)
        except InvalidVersion:
            same = False
        if same and (sha256 is None or f.sha256 in (None, sha256)):
            pure = any(t.abi == "none" and t.platform == "any" for t in tags)
            wheels.append((not pure, f.filename, f))
    if not wheels:
        what = f" with sha256 {sha256}" if sha256 else ""
        raise SourceError(f"no wheel of {project}=={version}{what} on the index", file=idx)
    _, _, match = min(wheels, key=lambda w: (w[0], w[1]))
    expected = sha256 or match.sha256
    if not expected:
        raise SourceError(f"the index publishes no sha256 for {match.filename}; refusing an unverified wheel", file=idx)
    dest = dest_dir / match.filename
    with locked(cache_dir() / "locks" / f"{expected}.lock", f"cache entry {match.filename}", timeout=600):
        if not dest.exists():
            download_verified(match.url, dest, expected)
    return dest
