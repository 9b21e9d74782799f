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


def import_tarball_to_git(
    archive: Path, repo_dir: Path, branch: str, message: str, env: dict[str, str], strip_top: bool = True,
    checkout: bool = True,
) -> None:
    """Stream the archive's files straight into a new commit of the (initialised) git
    repository at `repo_dir` with `git fast-import`, then check it out.

    One decompression and no Python-side file writes: git hashes the blobs as they
    arrive and writes the work tree and index in one pass. Members are checked exactly
    as for `extract_tarball`; nothing from the archive's ownership is kept."""
    import subprocess

    proc = subprocess.Popen(
        ["git", "fast-import", "--quiet", "--done"],
        cwd=repo_dir, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    assert proc.stdin is not None
    out = proc.stdin
    entries: list[tuple[str, int, str]] = []
    try:
        try:
            with tarfile.open(archive) as tf:
                mark = 0
                for m in tf:
                    _check_member(archive, m)
                    name = m.name
                    if strip_top:
                        if "/" not in name:
                            continue  # the top folder itself
                        name = name.split("/", 1)[1]
                    name = name.rstrip("/")
                    if not name or m.isdir():
                        continue
                    if name == ".git" or name.startswith(".git/") or "/.git/" in name:
                        raise SourceError(f"refusing member {m.name!r}: git metadata inside the archive", file=archive)
                    if m.issym():
                        data, mode = m.linkname.encode(), "120000"
                    elif m.isfile():
                        f = tf.extractfile(m)
                        assert f is not None
                        data, mode = f.read(), ("100755" if m.mode & 0o111 else "100644")
                    elif m.islnk():
                        f = tf.extractfile(m)  # tarfile resolves hard links to their target's data
                        assert f is not None
                        data, mode = f.read(), "100644"
                    else:
                        continue
                    mark += 1
                    out.write(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)))
                    out.write(data)
                    out.write(b"\n")
                    entries.append((name, mark, mode))
        except (tarfile.TarError, EOFError, OSError) as e:
            raise SourceError(f"cannot extract: {e}", file=archive) from None
        msg = message.encode()
        out.write(f"commit refs/heads/{branch}\n".encode())
        out.write(b"committer stackbuild <stackbuild@localhost> 946684800 +0000\n")
        out.write(b"data %d\n%s\n" % (len(msg), msg))
        for name, mk, mode in entries:
            quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"' if (" " in name or '"' in name) else name
            out.write(f"M {mode} :{mk} {quoted}\n".encode())
        out.write(b"\ndone\n")
        out.close()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.wait() != 0:
        raise SourceError(f"git fast-import failed: {err.strip()}", file=archive)
    if not checkout:
        return
    r = subprocess.run(["git", "checkout", "-q", "-f", branch], cwd=repo_dir, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SourceError(f"checking out the imported tree failed: {r.stderr.strip()}", file=archive)
