"""Safe extraction of source archives. A hostile tarball (absolute paths, `..`,
links pointing outside, device files) is refused with the member named; the
archive's owner is never kept (git refuses trees with "dubious ownership")."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from stackbuild.errors import SourceError


def _check_member(archive: Path, m: tarfile.TarInfo) -> None:
    name = m.name
    p = PurePosixPath(name)
    if name.startswith("/") or p.is_absolute():
        raise SourceError(f"refusing member {name!r}: absolute path", file=archive)
    if ".." in p.parts:
        raise SourceError(f"refusing member {name!r}: '..' escapes the destination", file=archive)
    if m.isdev() or m.isfifo():
        raise SourceError(f"refusing member {name!r}: device or fifo", file=archive)
    if m.issym() or m.islnk():
        target = PurePosixPath(m.linkname)
        if m.linkname.startswith("/") or target.is_absolute():
            raise SourceError(f"refusing link {name!r} -> {m.linkname!r}: points outside the archive", file=archive)
        base = p.parent if m.issym() else PurePosixPath()
        depth = 0
        for part in (*base.parts, *target.parts):
            depth = depth - 1 if part == ".." else depth + (0 if part == "." else 1)
            if depth < 0:
                raise SourceError(f"refusing link {name!r} -> {m.linkname!r}: points outside the archive", file=archive)


def extract_tarball(archive: Path, dest: Path, strip_top: bool = True) -> Path:
    """Extract `archive` into the new directory `dest` (which must not exist). With
    `strip_top`, a single top-level folder (`vllm-0.19.0/`) is removed."""
    if dest.exists():
        raise SourceError(f"destination {dest} already exists", file=archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    _check_member(archive, m)
                # the 'data' filter also drops owner/group and unsafe modes
                tf.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise SourceError(f"cannot extract: {e}", file=archive) from None
        top = list(tmp.iterdir())
        root = top[0] if strip_top and len(top) == 1 and top[0].is_dir() else tmp
        root.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def read_members(archive: Path, names: list[str], strip_top: bool = True) -> dict[str, bytes]:
    """Read only the named files (paths relative to the archive's top folder)."""
    wanted = set(names)
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive) as tf:
            for m in tf:
                rel = m.name.split("/", 1)[1] if strip_top and "/" in m.name else m.name
                if rel in wanted and m.isfile():
                    _check_member(archive, m)
                    f = tf.extractfile(m)
                    assert f is not None
                    found[rel] = f.read()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, OSError) as e:
        raise SourceError(f"cannot read: {e}", file=archive) from None
    missing = sorted(wanted - set(found))
    if missing:
        raise SourceError(f"not in the release: {', '.join(missing)}", file=archive)
    return found
