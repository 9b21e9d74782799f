"""The one reader for user files: every failure is one error naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from stackbuild.errors import StackbuildError
from stackbuild.inputs import read_user_text
from stackbuild.lock.errors import LockError
from stackbuild.lock.lockfile import read_header
from stackbuild.manifest import read_manifest


@pytest.mark.parametrize(("data", "offset", "byte"), [(b"\xff", 0, "ff"), (b"ok\n\xc3(", 3, "c3"), (b"a" * 100 + b"\x80", 100, "80")])
def test_non_utf8_names_file_offset_and_byte(tmp_path: Path, data: bytes, offset: int, byte: str) -> None:
    p = tmp_path / "f.txt"
    p.write_bytes(data)
    with pytest.raises(StackbuildError) as ei:
        read_user_text(p, "recipe")
    assert ei.value.file == str(p) and f"offset {offset}" in ei.value.message and f"0x{byte}" in ei.value.message


def test_missing_directory_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(StackbuildError, match="does not exist"):
        read_user_text(tmp_path / "nope", "recipe")
    with pytest.raises(StackbuildError, match="is a directory"):
        read_user_text(tmp_path, "recipe")


def test_non_utf8_lockfile_is_a_lock_error_naming_it(tmp_path: Path) -> None:
    p = tmp_path / "r.txt"
    p.write_bytes(b"# stackbuild lockfile\nfoo==1 \xfe\n")
    with pytest.raises(LockError) as ei:
        read_header(p)
    assert ei.value.file == str(p) and "not UTF-8" in ei.value.message


@pytest.mark.parametrize("data", [b"{\xff}", b"{not json", b"[]", b'{"recipe": 1}'])
def test_damaged_manifest_is_one_error_naming_it(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "manifest.json").write_bytes(data)
    with pytest.raises(StackbuildError) as ei:
        read_manifest(tmp_path)
    assert ei.value.file == str(tmp_path / "manifest.json")


def test_non_utf8_mirror_map_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stackbuild.errors import SourceError
    from stackbuild.sources.git import mirror_map

    f = tmp_path / "mirrors.toml"
    f.write_bytes(b'[mirrors]\n"https://github.com/" = "/srv/\xe9"\n')
    monkeypatch.setenv("STACKBUILD_MIRRORS_FILE", str(f))
    with pytest.raises(SourceError) as ei:
        mirror_map()
    assert ei.value.file == str(f) and "not UTF-8" in ei.value.message
