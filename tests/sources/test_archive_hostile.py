"""Hostile archives against all three readers of source archives (extraction, the git
import of base trees, the backport reader): link chains resolved against the stripped
tree, hard links to nothing, bombs past the limits, and corrupt compressed streams.
Each is one SourceError naming the archive (and the member), nothing is written
outside the destination, and nothing is published; through the CLI it is exit 2."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stackbuild.errors import SourceError
from stackbuild.sources.archive import (
    DEFAULT_LIMITS,
    ArchiveLimits,
    extract_tarball,
    import_tarball_to_git,
    read_members,
)

Build = Callable[[tarfile.TarFile], None]
MiB = 1 << 20


def add_file(tf: tarfile.TarFile, name: str, data: bytes = b"x\n") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def add_dir(tf: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tf.addfile(info)


def add_link(tf: tarfile.TarFile, name: str, target: str, hard: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    tf.addfile(info)


def tar_bytes(build: Build, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        add_dir(tf, "pkg-1.0")
        add_file(tf, "pkg-1.0/src/ok.py", b"OK = 1\n")
        build(tf)
    return buf.getvalue()


def make_archive(path: Path, build: Build, fmt: int = tarfile.PAX_FORMAT) -> Path:
    path.write_bytes(gzip.compress(tar_bytes(build, fmt), mtime=0))
    return path


def _extract(archive: Path, work: Path, limits: ArchiveLimits) -> None:
    extract_tarball(archive, work / "dest", limits=limits)


def _git_import(archive: Path, work: Path, limits: ArchiveLimits) -> None:
    repo = work / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "stackbuild", str(repo)], check=True)
    try:
        import_tarball_to_git(archive, repo, "stackbuild", "base", dict(os.environ), checkout=False, limits=limits)
    except SourceError:
        refs = subprocess.run(["git", "for-each-ref"], cwd=repo, capture_output=True, text=True, check=True).stdout
        assert refs == ""  # nothing was published
        raise


def _backport_read(archive: Path, work: Path, limits: ArchiveLimits) -> None:
    read_members(archive, ["src/ok.py"], limits=limits)


USERS = {"extract": _extract, "git-import": _git_import, "backport-read": _backport_read}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (but the git repo a test made) with what it holds."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if rel.startswith("work/repo.git"):
            continue
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def plant(tmp_path: Path, data_or_build: bytes | Build, user: str, limits: ArchiveLimits = DEFAULT_LIMITS) -> SourceError:
    """Run `user` on the planted archive beside a sibling folder holding a secret;
    return the error after checking nothing changed anywhere under tmp_path."""
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling" / "secret.txt").write_text("secret\n")
    work = tmp_path / "work"
    work.mkdir()
    archive = tmp_path / "hostile.tar.gz"
    if isinstance(data_or_build, bytes):
        archive.write_bytes(data_or_build)
    else:
        make_archive(archive, data_or_build)
    before = snapshot(tmp_path)
    with pytest.raises(SourceError) as ei:
        USERS[user](archive, work, limits)
    assert snapshot(tmp_path) == before
    e = ei.value
    assert e.file == str(archive)
    assert "\n" not in str(e) and "Traceback" not in str(e)
    return e


# ------------------------------------------------------------------ links


def _chain2(tf: tarfile.TarFile) -> None:
    add_dir(tf, "pkg-1.0/sub")
    add_link(tf, "pkg-1.0/sub/up1", "..")  # the stripped root: inside
    add_link(tf, "pkg-1.0/up2", "sub/up1/..")  # root/..: outside
    add_file(tf, "pkg-1.0/up2/evil.py", b"import os\n")


def _chain3(tf: tarfile.TarFile) -> None:
    add_dir(tf, "pkg-1.0/a/b")
    add_link(tf, "pkg-1.0/a/b/l1", "..")  # a
    add_link(tf, "pkg-1.0/a/l2", "b/l1/..")  # root
    add_link(tf, "pkg-1.0/l3", "a/l2/..")  # outside


def _later_redirects_earlier(tf: tarfile.TarFile) -> None:
    add_link(tf, "pkg-1.0/a", "b/..")  # root, while b is a plain name
    add_link(tf, "pkg-1.0/b", ".")  # now a = ./.. : outside


LINKS: dict[str, tuple[Build, str]] = {
    "up1-at-stripped-root": (lambda tf: add_link(tf, "pkg-1.0/up1", ".."), "'pkg-1.0/up1': link to '..' points outside"),
    "chain-of-two": (_chain2, "'pkg-1.0/up2': link to 'sub/up1/..' points outside"),
    "chain-of-three": (_chain3, "'pkg-1.0/l3': link to 'a/l2/..' points outside"),
    "later-link-redirects-earlier": (_later_redirects_earlier, "'a': link to 'b/..' points outside the archive's tree (through links later"),
    "member-below-symlink": (lambda tf: (add_link(tf, "pkg-1.0/d", "src"), add_file(tf, "pkg-1.0/d/evil.py")),
                             "'pkg-1.0/d/evil.py': it lies below 'd', which is a link"),
    "member-below-file": (lambda tf: add_file(tf, "pkg-1.0/src/ok.py/x"), "it lies below 'src/ok.py', which is a file"),
    "link-loop": (lambda tf: (add_link(tf, "pkg-1.0/a", "b"), add_link(tf, "pkg-1.0/b", "a")), "is a loop of links"),
    "link-into-git-metadata": (lambda tf: add_link(tf, "pkg-1.0/cfg", ".git/config"), "points into git metadata"),
    "symlink-replaces-file": (lambda tf: add_link(tf, "pkg-1.0/src/ok.py", "../../etc/passwd"), "appears twice (a file, then a symlink)"),
    "dir-replaced-by-symlink": (lambda tf: add_link(tf, "pkg-1.0/src", "."), "appears twice (a dir, then a symlink)"),
    "hardlink-missing-target": (lambda tf: add_link(tf, "pkg-1.0/h", "pkg-1.0/nope.py", hard=True),
                                "'pkg-1.0/h': hard link to 'pkg-1.0/nope.py', which is not an earlier file"),
    "hardlink-forward": (lambda tf: (add_link(tf, "pkg-1.0/h", "pkg-1.0/later.py", hard=True), add_file(tf, "pkg-1.0/later.py")),
                         "which is not an earlier file"),
    "hardlink-to-symlink": (lambda tf: (add_link(tf, "pkg-1.0/s", "src/ok.py"), add_link(tf, "pkg-1.0/h", "pkg-1.0/s", hard=True)),
                            "which is a symlink"),
    "hardlink-to-dir": (lambda tf: add_link(tf, "pkg-1.0/h", "pkg-1.0/src", hard=True), "which is a dir"),
    "hardlink-other-top": (lambda tf: add_link(tf, "pkg-1.0/h", "other-1.0/x", hard=True), "points outside"),
    "hardlink-through-chain": (lambda tf: (add_link(tf, "pkg-1.0/d", "src"), add_link(tf, "pkg-1.0/h", "pkg-1.0/d/ok.py", hard=True)),
                               "which is not an earlier file"),
    "git-dir-member": (lambda tf: add_file(tf, "pkg-1.0/.git/config"), "git metadata inside the archive"),
    "git-dir-any-case": (lambda tf: add_file(tf, "pkg-1.0/sub/.GiT/hooks/post-commit"), "git metadata inside the archive"),
    "control-character-name": (lambda tf: add_file(tf, "pkg-1.0/evil\nname.py"), "control character"),
    "second-top-folder": (lambda tf: add_file(tf, "other-1.0/x.py"), "outside the archive's one top folder 'pkg-1.0'"),
    "fifo": (lambda tf: tf.addfile(_typed("pkg-1.0/fifo", tarfile.FIFOTYPE)), "device or fifo"),
}


def _typed(name: str, typ: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = typ
    return info


@pytest.mark.parametrize("user", list(USERS))
@pytest.mark.parametrize("case", list(LINKS))
def test_hostile_links_and_names_are_refused(tmp_path: Path, case: str, user: str) -> None:
    build, why = LINKS[case]
    e = plant(tmp_path, build, user)
    assert why in e.message, e.message
    assert e.message.startswith("refusing member"), e.message


def test_links_inside_the_tree_are_kept_by_every_reader(tmp_path: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add_dir(tf, "pkg-1.0/docs/deep")
        add_link(tf, "pkg-1.0/docs/deep/up", "../../src/ok.py")
        add_link(tf, "pkg-1.0/alias", "docs/deep/..")  # through nothing but folders: docs
        add_link(tf, "pkg-1.0/via", "alias/deep/up")  # a chain that stays inside
        add_link(tf, "pkg-1.0/hard.py", "pkg-1.0/src/ok.py", hard=True)

    archive = make_archive(tmp_path / "ok.tar.gz", build)
    dest = extract_tarball(archive, tmp_path / "dest")
    assert (dest / "via").read_text() == "OK = 1\n"
    assert (dest / "hard.py").read_text() == "OK = 1\n" and not (dest / "hard.py").is_symlink()
    assert (dest / "hard.py").stat().st_ino != (dest / "src/ok.py").stat().st_ino
    assert read_members(archive, ["hard.py", "src/ok.py"]) == {"hard.py": b"OK = 1\n", "src/ok.py": b"OK = 1\n"}
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    import_tarball_to_git(archive, repo, "stackbuild", "base", dict(os.environ))
    assert os.readlink(repo / "via") == "alias/deep/up"
    assert (repo / "hard.py").read_text() == "OK = 1\n"
    with pytest.raises(SourceError, match=r"not a regular file in the release: via \(symlink\)"):
        read_members(archive, ["via"])


# ------------------------------------------------------------------ limits


def sparse_bomb() -> bytes:
    """A tar.gz of ~200 bytes declaring one 2 GiB (sparse) member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("pkg-1.0/sparse.bin")
        info.pax_headers = {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.size": str(2 << 30),
                            "GNU.sparse.map": f"{(2 << 30) - 1},1", "GNU.sparse.name": "pkg-1.0/sparse.bin"}
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    return gzip.compress(buf.getvalue(), compresslevel=9, mtime=0)


def _trailing_zeros() -> bytes:
    # a few kB of gzip that inflate to 40 MiB of zeros after the tar's end
    return gzip.compress(tar_bytes(lambda tf: None) + b"\0" * (40 * MiB), compresslevel=9, mtime=0)


def _many(n: int, size: int = 10) -> Build:
    return lambda tf: [add_file(tf, f"pkg-1.0/m/{i}.py", b"x" * size) for i in range(n)]  # type: ignore[func-returns-value]


def _pax_bomb(tf: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("pkg-1.0/p.py")
    info.pax_headers = {"comment": "x" * (2 * MiB)}
    tf.addfile(info, io.BytesIO(b""))


LIMITS: dict[str, tuple[bytes | Build, ArchiveLimits, str]] = {
    "sparse-2GiB-member": (sparse_bomb(), DEFAULT_LIMITS, "'pkg-1.0/sparse.bin': 2,147,483,648 bytes, over the limit of 256 MiB per member (limit max_member_mb)"),
    "member-size": (lambda tf: add_file(tf, "pkg-1.0/big", b"\0" * (2 * MiB)), ArchiveLimits(max_member_mb=1), "(limit max_member_mb)"),
    "member-count": (_many(30), ArchiveLimits(max_members=20), "more than 20 members (limit max_members)"),
    "total-size": (_many(3, 400_000), ArchiveLimits(max_total_mb=1), "more than 1 MiB (limit max_total_mb), reached at member 'pkg-1.0/m/2.py'"),
    "hardlink-amplification": (lambda tf: (add_file(tf, "pkg-1.0/a", b"\0" * 600_000), add_link(tf, "pkg-1.0/b", "pkg-1.0/a", hard=True)),
                               ArchiveLimits(max_total_mb=1), "(limit max_total_mb), reached at member 'pkg-1.0/b'"),
    "pax-header-bomb": (_pax_bomb, DEFAULT_LIMITS, "an extended header of"),
    "zeros-after-the-tar": (_trailing_zeros(), ArchiveLimits(max_total_mb=1, max_members=10), "expands to more than"),
}


@pytest.mark.parametrize("user", list(USERS))
@pytest.mark.parametrize("case", list(LIMITS))
def test_limits_are_enforced_naming_the_limit(tmp_path: Path, case: str, user: str) -> None:
    data, limits, why = LIMITS[case]
    t0 = time.monotonic()
    e = plant(tmp_path, data, user, limits)
    assert why in e.message, e.message
    assert time.monotonic() - t0 < 10


def test_sparse_bomb_is_small_and_refused_fast_with_little_memory(tmp_path: Path) -> None:
    bomb = sparse_bomb()
    assert len(bomb) < 300
    (tmp_path / "bomb.tar.gz").write_bytes(bomb)
    # a fresh interpreter, so the peak RSS is this refusal's alone
    code = (
        "import os, resource, subprocess, sys, time\n"
        "from pathlib import Path\n"
        "from stackbuild.errors import SourceError\n"
        "from stackbuild.sources.archive import extract_tarball, import_tarball_to_git, read_members\n"
        "a = Path(sys.argv[1]); t = time.monotonic(); n = 0\n"
        "subprocess.run(['git', 'init', '-q', '--bare', str(a.parent / 'r.git')], check=True)\n"
        "for f in (lambda: extract_tarball(a, a.parent / 'd'), lambda: read_members(a, ['sparse.bin']),\n"
        "          lambda: import_tarball_to_git(a, a.parent / 'r.git', 'b', 'm', dict(os.environ), checkout=False)):\n"
        "    try:\n        f()\n    except SourceError as e:\n        n += 'max_member_mb' in e.message\n"
        "print(n, time.monotonic() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.tar.gz")],
                         capture_output=True, text=True, check=True).stdout.split()
    refused, seconds, rss_mib = int(out[0]), float(out[1]), int(out[2])
    assert refused == 3
    assert seconds < 5, seconds
    assert rss_mib < 200, rss_mib  # the old reader held the whole 2 GiB member in memory
    assert not (tmp_path / "d").exists()


def test_limits_from_the_recipe(tmp_path: Path) -> None:
    from test_workspace import Project

    from stackbuild.errors import RecipeError
    from stackbuild.recipe import load_recipe

    proj = Project(tmp_path / "proj")
    path = proj.write_recipe("r", {"p": {"pypi": "p==1.0", "sha256": "a" * 64}},
                             extra="[sources.p.limits]\nmax_members = 5\nmax_total_mb = 2\n")
    recipe = load_recipe(path)
    (src,) = recipe.sources
    assert src.limits == ArchiveLimits(max_total_mb=2, max_members=5, max_member_mb=DEFAULT_LIMITS.max_member_mb)
    assert '"limits"' in recipe.raw
    # without a limits table the recipe hashes as before (lockfile headers carry that hash)
    proj.write_recipe("r", {"p": {"pypi": "p==1.0", "sha256": "a" * 64}})
    assert '"limits"' not in load_recipe(path).raw
    for extra, key, why in [
        ("[sources.p.limits]\nmax_files = 5\n", "sources.p.limits.max_files", "unknown key"),
        ("[sources.p.limits]\nmax_members = 0\n", "sources.p.limits.max_members", "positive"),
        ('[sources.p.limits]\nmax_members = "5"\n', "sources.p.limits.max_members", "an integer"),
    ]:
        proj.write_recipe("r", {"p": {"pypi": "p==1.0", "sha256": "a" * 64}}, extra=extra)
        with pytest.raises(RecipeError) as ei:
            load_recipe(path)
        assert ei.value.key == key and why in ei.value.message
    proj.write_recipe("r", {"p": {"path": "x"}}, extra="[sources.p.limits]\nmax_members = 5\n")
    with pytest.raises(RecipeError, match="limits apply to the archive of a pypi source"):
        load_recipe(path)


# ------------------------------------------------------------------ corrupt streams


def _good() -> bytes:
    return gzip.compress(tar_bytes(lambda tf: add_file(tf, "pkg-1.0/more.py", os.urandom(3000))), mtime=0)


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


CORRUPT: dict[str, tuple[bytes, str]] = {
    "bad-crc": (_flip(_good(), -8), "CRC check failed"),
    "bad-length": (_flip(_good(), -1), "Incorrect length"),
    "truncated-trailer": (_good()[:-5], "truncated"),
    "truncated-data": (_good()[: len(_good()) // 2], "truncated"),
    "garbage-after-stream": (_good() + b"garbage!", "Not a gzipped file"),
}


@pytest.mark.parametrize("user", list(USERS))
@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_stream_is_refused_before_anything_is_published(tmp_path: Path, case: str, user: str) -> None:
    data, why = CORRUPT[case]
    e = plant(tmp_path, data, user)
    assert e.message.startswith("corrupt archive") and why in e.message, e.message


def _index(root: Path, files: dict[str, bytes]) -> str:
    """A file:// PEP 503 index of tinypkg with the given sdists."""
    (root / "files").mkdir(parents=True)
    links = []
    for name, data in files.items():
        (root / "files" / name).write_bytes(data)
        links.append(f'<a href="../../files/{name}#sha256={hashlib.sha256(data).hexdigest()}">{name}</a>')
    (root / "simple/tinypkg").mkdir(parents=True)
    (root / "simple/tinypkg/index.html").write_text("<html><body>" + "".join(links) + "</body></html>")
    return (root / "simple").as_uri()


def _sdist(build: Build, version: str = "1.0") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        add_file(tf, f"tinypkg-{version}/tinypkg/__init__.py", b"VALUE = 1\n")
        build(tf)
    return gzip.compress(buf.getvalue(), mtime=0)


def _project(tmp_path: Path, sha: str, backport: dict[str, object] | None = None):  # type: ignore[no-untyped-def]
    from test_workspace import Project, sha256

    proj = Project(tmp_path / "proj")
    patch = "--- a/tinypkg/__init__.py\n+++ b/tinypkg/__init__.py\n@@ -1 +1 @@\n-VALUE = 1\n+VALUE = 2\n"
    rel = proj.add_patch("value.patch", patch)
    patches: list[dict[str, object]] = [{"file": rel, "source": "tinypkg", "sha256": sha256(patch)}]
    if backport:
        patches.insert(0, backport)
    proj.write_recipe("r", {"tinypkg": {"pypi": "tinypkg==1.0", "sha256": sha}}, patches)
    return proj


def test_cached_sdist_with_a_bad_crc_never_becomes_a_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from stackbuild.cli import main

    bad = _flip(_sdist(lambda tf: add_file(tf, "tinypkg-1.0/data.bin", os.urandom(5000))), -8)
    sha = hashlib.sha256(bad).hexdigest()
    cache = tmp_path / "cache"
    monkeypatch.setenv("STACKBUILD_CACHE", str(cache))
    # as an older stackbuild, or a hand copy, may have left it: the pinned hash matches
    (cache / "sdists" / sha).mkdir(parents=True)
    (cache / "sdists" / sha / "tinypkg-1.0.tar.gz").write_bytes(bad)
    proj = _project(tmp_path, sha)
    monkeypatch.chdir(proj.root)
    assert main(["apply", "r"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "corrupt archive: CRC check failed" in err.strip().splitlines()[-1]
    bases = cache / "bases"
    assert not (bases / f"{sha}.git").exists()
    assert not bases.exists() or list(bases.iterdir()) == []  # no half-imported litter either
    assert not (proj.workdir / "r" / "tinypkg").exists()


def test_backport_from_a_hostile_release_exits_2_and_writes_nothing_outside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from stackbuild.cli import main

    def chain(tf: tarfile.TarFile) -> None:
        add_dir(tf, "tinypkg-1.1/sub")
        add_link(tf, "tinypkg-1.1/sub/up1", "..")
        add_link(tf, "tinypkg-1.1/up2", "sub/up1/..")
        add_file(tf, "tinypkg-1.1/up2/planted.py", b"import os\n")

    base, hostile = _sdist(lambda tf: None), _sdist(chain, "1.1")
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("STACKBUILD_INDEX_URL", _index(tmp_path / "index", {"tinypkg-1.0.tar.gz": base,
                                                                          "tinypkg-1.1.tar.gz": hostile}))
    proj = _project(tmp_path, hashlib.sha256(base).hexdigest(),
                    {"backport": "tinypkg==1.1", "sha256": hashlib.sha256(hostile).hexdigest(),
                     "files": ["up2/planted.py"], "source": "tinypkg"})
    monkeypatch.chdir(proj.root)
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling" / "keep.txt").write_text("keep\n")
    before = snapshot(tmp_path / "sibling")
    assert main(["apply", "r"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "tinypkg-1.1.tar.gz: refusing member 'tinypkg-1.1/up2': link to 'sub/up1/..' points outside" in last
    assert snapshot(tmp_path / "sibling") == before
    assert not list(tmp_path.rglob("planted.py"))
    assert not (tmp_path / "cache" / "backports").exists() or not list((tmp_path / "cache" / "backports").rglob("*.py"))


def test_recipe_limits_reach_the_base_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from stackbuild.cli import main

    sdist = _sdist(lambda tf: [add_file(tf, f"tinypkg-1.0/m{i}.py") for i in range(5)])  # type: ignore[func-returns-value]
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("STACKBUILD_INDEX_URL", _index(tmp_path / "index", {"tinypkg-1.0.tar.gz": sdist}))
    proj = _project(tmp_path, hashlib.sha256(sdist).hexdigest())
    recipe = proj.root / "recipes/r.toml"
    recipe.write_text(recipe.read_text() + "\n[sources.tinypkg.limits]\nmax_members = 3\n")
    monkeypatch.chdir(proj.root)
    assert main(["apply", "r"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refusing archive: more than 3 members (limit max_members)" in last
    recipe.write_text(recipe.read_text().replace("max_members = 3", "max_members = 10"))
    assert main(["apply", "r"]) == 0
    assert (proj.workdir / "r/tinypkg/tinypkg/__init__.py").read_text() == "VALUE = 2\n"


def _sparse_sdist() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        add_file(tf, "tinypkg-1.0/tinypkg/__init__.py", b"VALUE = 1\n")
        info = tarfile.TarInfo("tinypkg-1.0/sparse.bin")
        info.pax_headers = {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.size": str(2 << 30),
                            "GNU.sparse.map": f"{(2 << 30) - 1},1", "GNU.sparse.name": "tinypkg-1.0/sparse.bin"}
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    return gzip.compress(buf.getvalue(), mtime=0)


CLI_CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "hardlink-missing-target": (lambda: _sdist(lambda tf: add_link(tf, "tinypkg-1.0/h", "tinypkg-1.0/gone.py", hard=True)),
                                "refusing member 'tinypkg-1.0/h': hard link to 'tinypkg-1.0/gone.py', which is not an earlier file"),
    "link-chain": (lambda: _sdist(lambda tf: (add_dir(tf, "tinypkg-1.0/sub"), add_link(tf, "tinypkg-1.0/sub/up1", ".."),
                                              add_link(tf, "tinypkg-1.0/up2", "sub/up1/.."))),
                   "refusing member 'tinypkg-1.0/up2': link to 'sub/up1/..' points outside"),
    "sparse-2GiB-member": (_sparse_sdist, "(limit max_member_mb)"),
    "bad-crc-download": (lambda: _flip(_sdist(lambda tf: add_file(tf, "tinypkg-1.0/d.bin", os.urandom(3000))), -8),
                         "corrupt archive: CRC check failed"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_hostile_sdist_through_the_cli_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str], case: str) -> None:
    from stackbuild.cli import main

    make, why = CLI_CASES[case]
    data = make()
    sha = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    monkeypatch.setenv("STACKBUILD_CACHE", str(cache))
    monkeypatch.setenv("STACKBUILD_INDEX_URL", _index(tmp_path / "index", {"tinypkg-1.0.tar.gz": data}))
    proj = _project(tmp_path, sha)
    monkeypatch.chdir(proj.root)
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling" / "keep.txt").write_text("keep\n")
    before = snapshot(tmp_path / "sibling")
    assert main(["apply", "r"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stackbuild: error: ") and "tinypkg-1.0.tar.gz" in last and why in last, last
    assert snapshot(tmp_path / "sibling") == before
    assert not (cache / "bases").exists() or list((cache / "bases").iterdir()) == []
    assert not (proj.workdir / "r" / "tinypkg").exists()


TOKENS = ["..", ".", "a", "b", "c", "a/b", "b/..", "../a", "x/../..", "/etc"]


def _random_archive(rng: random.Random, path: Path) -> None:
    with tarfile.open(path, "w:gz") as tf:
        add_dir(tf, "pkg-1.0")
        names: list[str] = []
        for _ in range(rng.randint(1, 7)):
            name = "/".join(rng.choice(["a", "b", "c", "d"]) for _ in range(rng.randint(1, 3)))
            kind = rng.choice(["file", "dir", "symlink", "symlink", "hardlink"])
            full = f"pkg-1.0/{name}"
            if kind == "file":
                add_file(tf, full, b"data\n")
                names.append(full)
            elif kind == "dir":
                add_dir(tf, full)
            elif kind == "symlink":
                add_link(tf, full, "/".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 3))))
            else:
                add_link(tf, full, rng.choice([*names, "pkg-1.0/../x", "pkg-1.0/zz"]), hard=True)


def test_random_link_archives_never_reach_outside(tmp_path: Path) -> None:
    """Seeded random archives of files, folders, symlinks and hard links: each is either
    refused with a SourceError, or every path of the extracted tree, resolved by the
    real file system, stays inside it; nothing beside it changes."""
    rng = random.Random(20261201)
    (tmp_path / "sibling").mkdir()
    (tmp_path / "sibling" / "secret.txt").write_text("secret\n")
    before = snapshot(tmp_path / "sibling")
    refused = accepted = 0
    for i in range(300):
        archive = tmp_path / f"r{i}.tar.gz"
        _random_archive(rng, archive)
        dest = tmp_path / "out" / f"d{i}"
        try:
            extract_tarball(archive, dest)
        except SourceError as e:
            assert e.file == str(archive) and "\n" not in str(e)
            assert not dest.exists()
            refused += 1
            # the git import and the backport reader refuse it too
            with pytest.raises(SourceError):
                read_members(archive, [])
            repo = tmp_path / "out" / f"g{i}.git"
            subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
            with pytest.raises(SourceError):
                import_tarball_to_git(archive, repo, "stackbuild", "base", dict(os.environ), checkout=False)
            continue
        accepted += 1
        root = dest.resolve()
        for p in dest.rglob("*"):
            real = Path(os.path.realpath(p))
            assert real == root or root in real.parents, (archive, p, os.readlink(p) if p.is_symlink() else None)
        # the same archive through the git import and the backport reader: same verdict
        assert read_members(archive, []) == {}
        repo = tmp_path / "out" / f"g{i}.git"
        subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
        import_tarball_to_git(archive, repo, "stackbuild", "base", dict(os.environ), checkout=False)
    assert snapshot(tmp_path / "sibling") == before
    assert refused > 50 and accepted > 50, (refused, accepted)
    print(f"random archives: {refused} refused, {accepted} accepted")
