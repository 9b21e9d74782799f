"""Tar extraction: a hostile archive is refused with the member and the archive named,
nothing lands outside the destination, and the archive's owner is not kept."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from stackbuild.errors import SourceError
from stackbuild.sources.archive import extract_tarball, read_members


def add_file(tf: tarfile.TarFile, name: str, data: bytes = b"x\n", uid: int = 0, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.uid = info.gid = uid
    info.uname = info.gname = "someone" if uid else "root"
    info.mode = mode
    tf.addfile(info, io.BytesIO(data))


def add_link(tf: tarfile.TarFile, name: str, target: str, hard: bool = False) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    tf.addfile(info)


def make_tar(path: Path, build) -> Path:  # type: ignore[no-untyped-def]
    with tarfile.open(path, "w:gz") as tf:
        add_file(tf, "pkg-1.0/README", b"readme\n")
        build(tf)
    return path


def everything_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


HOSTILE = {
    "dotdot": (lambda tf: add_file(tf, "pkg-1.0/../../escaped.txt"), "pkg-1.0/../../escaped.txt", "'..'"),
    "absolute": (lambda tf: add_file(tf, "/tmp/stackbuild-absolute-member.txt"), "/tmp/stackbuild-absolute-member.txt", "absolute"),
    "symlink-dotdot": (lambda tf: add_link(tf, "pkg-1.0/link", "../../outside"), "pkg-1.0/link", "points outside"),
    "symlink-absolute": (lambda tf: add_link(tf, "pkg-1.0/etc", "/etc"), "pkg-1.0/etc", "points outside"),
    "hardlink-escaping": (lambda tf: add_link(tf, "pkg-1.0/hard", "../../outside/secret", hard=True), "pkg-1.0/hard", "points outside"),
    "hardlink-absolute": (lambda tf: add_link(tf, "pkg-1.0/hard", "/etc/passwd", hard=True), "pkg-1.0/hard", "points outside"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_member_is_refused(tmp_path: Path, case: str) -> None:
    build, member, why = HOSTILE[case]
    outer = tmp_path / "box"
    outer.mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret\n")
    archive = make_tar(tmp_path / f"{case}.tar.gz", build)
    dest = outer / "a" / "b" / "dest"
    before = everything_under(tmp_path)
    with pytest.raises(SourceError) as ei:
        extract_tarball(archive, dest)
    e = ei.value
    assert e.file == str(archive)
    assert repr(member) in e.message and why in e.message
    assert str(archive) in str(e)
    # nothing extracted anywhere: not the destination, not beside it, not outside
    after = everything_under(tmp_path)
    assert after - before <= {"box/a", "box/a/b"}
    assert not dest.exists()
    assert not Path("/tmp/stackbuild-absolute-member.txt").exists()
    assert (tmp_path / "outside" / "secret").read_text() == "secret\n"


def test_link_chain_through_a_symlinked_dir_is_refused(tmp_path: Path) -> None:
    # "d -> ." then "d/../../x": each link alone looks inside, together they escape
    def build(tf: tarfile.TarFile) -> None:
        add_link(tf, "pkg-1.0/d", ".")
        add_link(tf, "pkg-1.0/d/x", "../../outside")

    archive = make_tar(tmp_path / "chain.tar.gz", build)
    with pytest.raises(SourceError):
        extract_tarball(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_links_inside_the_archive_are_kept(tmp_path: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "pkg-1.0/src/real.py", b"print(1)\n")
        add_link(tf, "pkg-1.0/src/alias.py", "real.py")
        add_link(tf, "pkg-1.0/docs/up.py", "../src/real.py")

    archive = make_tar(tmp_path / "ok.tar.gz", build)
    dest = extract_tarball(archive, tmp_path / "dest")
    assert os.readlink(dest / "src/alias.py") == "real.py"
    assert (dest / "docs/up.py").read_text() == "print(1)\n"


def test_device_file_is_refused(tmp_path: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("pkg-1.0/null")
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = 1, 3
        tf.addfile(info)

    archive = make_tar(tmp_path / "dev.tar.gz", build)
    with pytest.raises(SourceError, match="'pkg-1.0/null'.*device"):
        extract_tarball(archive, tmp_path / "dest")


def test_owner_is_not_kept(tmp_path: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "pkg-1.0/owned.py", b"x = 1\n", uid=12345, mode=0o4755)

    archive = make_tar(tmp_path / "uid.tar.gz", build)
    with tarfile.open(archive) as tf:
        assert tf.getmember("pkg-1.0/owned.py").uid == 12345
    dest = extract_tarball(archive, tmp_path / "dest")
    st = (dest / "owned.py").stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert not st.st_mode & 0o6000  # no setuid/setgid from the archive
    for p in [dest, *dest.rglob("*")]:
        assert p.lstat().st_uid == os.getuid()


def test_single_top_folder_is_stripped(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", lambda tf: add_file(tf, "pkg-1.0/src/m.py"))
    dest = extract_tarball(archive, tmp_path / "dest")
    assert everything_under(dest) == {"README", "src", "src/m.py"}
    kept = extract_tarball(archive, tmp_path / "kept", strip_top=False)
    assert (kept / "pkg-1.0" / "README").exists()
    # nothing left behind beside the destination
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "dest", "kept"]


def test_existing_destination_is_refused(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", lambda tf: None)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "mine").write_text("keep\n")
    with pytest.raises(SourceError, match="already exists"):
        extract_tarball(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "mine").read_text() == "keep\n"


def test_corrupt_archive_is_a_source_error(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tar.gz", lambda tf: add_file(tf, "pkg-1.0/big", os.urandom(50_000)))
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError) as ei:
        extract_tarball(archive, tmp_path / "dest")
    assert ei.value.file == str(archive) and "corrupt archive: truncated" in ei.value.message
    assert not (tmp_path / "dest").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar.gz"]


def test_read_members(tmp_path: Path) -> None:
    def build(tf: tarfile.TarFile) -> None:
        add_file(tf, "pkg-1.0/src/a.py", b"a\n")
        add_file(tf, "pkg-1.0/src/b.py", b"b\n")

    archive = make_tar(tmp_path / "a.tar.gz", build)
    assert read_members(archive, ["src/b.py", "README"]) == {"src/b.py": b"b\n", "README": b"readme\n"}
    with pytest.raises(SourceError, match="not in the release: src/c.py") as ei:
        read_members(archive, ["src/a.py", "src/c.py"])
    assert ei.value.file == str(archive)
