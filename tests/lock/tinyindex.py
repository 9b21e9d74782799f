"""Tiny real wheels and PEP 503 simple indexes on disk, for real resolver runs with
no network. Wheels are byte-for-byte reproducible (fixed timestamps), so the same
name and version always has the same sha256."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

from packaging.utils import canonicalize_name


def build_wheel(dest: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    dist = canonicalize_name(name).replace("-", "_")
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                             + "".join(f"Requires-Dist: {r}\n" for r in requires)),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: stackbuild-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for p, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{p},sha256={digest},{len(content.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for p, content in files.items():
            z.writestr(zipfile.ZipInfo(p, (2020, 1, 1, 0, 0, 0)), content)
    return path


def build_index(root: Path, packages: dict[tuple[str, str], tuple[str, ...]]) -> str:
    """A PEP 503 simple index at root/simple with wheels in root/files; returns its file:// URL."""
    files = root / "files"
    by_name: dict[str, list[Path]] = {}
    for (name, version), requires in packages.items():
        whl = build_wheel(files, name, version, requires)
        by_name.setdefault(canonicalize_name(name), []).append(whl)
    simple = root / "simple"
    for name, wheels in by_name.items():
        d = simple / name
        d.mkdir(parents=True, exist_ok=True)
        links = "".join(
            f'<a href="../../files/{w.name}#sha256={sha256(w)}">{w.name}</a>\n' for w in sorted(wheels))
        (d / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    (simple / "index.html").write_text(
        "<!DOCTYPE html><html><body>\n"
        + "".join(f'<a href="{n}/">{n}</a>\n' for n in sorted(by_name)) + "</body></html>\n")
    return simple.as_uri()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
