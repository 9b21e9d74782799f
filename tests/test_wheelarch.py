from __future__ import annotations

import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import fixtures
import pytest

from stackbuild.cache import sha256_file
from stackbuild.wheelarch import (
    EM_INTEL_GEN,
    WheelArchError,
    decode_gmd_id,
    encode_gmd_id,
    read_package_archs,
    read_shared_object_archs,
    read_wheel_archs,
)

# ---------------------------------------------------------------- real wheels

# sha256 of the real wheels on the package index
KERNEL_WHEELS = {
    "0.1.3.1": "ddbc1b5597fd68127d043692a204c2ba62991fbd5cc812c2f2170a581801fdba",
    "0.1.12.1": "3e5ce76de22e766ef85d898c234f86c3ccc4314e2d77f9e458f203420e6c0e4e",
    "0.1.16.2": "86bfa26abbb605fab485236a386e6de07f76320177c456fa96e55c27502af17a",
}


def kernel_wheel(version: str) -> Path:
    """A real vllm-xpu-kernels wheel, downloaded once into the test cache."""
    dest_dir = fixtures.test_cache_dir() / "wheels"
    dest_dir.mkdir(parents=True, exist_ok=True)
    name = f"vllm_xpu_kernels-{version}-cp38-abi3-manylinux_2_28_x86_64.whl"
    dest = dest_dir / name
    if dest.exists() and sha256_file(dest) == KERNEL_WHEELS[version]:
        return dest
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--platform", "manylinux_2_28_x86_64", "--python-version", "3.12",
         f"vllm-xpu-kernels=={version}", "-d", str(dest_dir)],
        check=True,
    )
    if sha256_file(dest) != KERNEL_WHEELS[version]:
        dest.unlink()
        raise RuntimeError(f"sha256 mismatch for {name}")
    return dest


BASE_IPS = ("12.60.7", "20.1.0", "20.2.0")


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("0.1.3.1", BASE_IPS),
        ("0.1.12.1", BASE_IPS),
        ("0.1.16.2", (*BASE_IPS, "35.11.0")),
    ],
)
def test_real_kernel_wheels(version: str, expected: tuple[str, ...]) -> None:
    report = read_wheel_archs(kernel_wheel(version))
    assert report.project == "vllm-xpu-kernels"
    assert report.version == version
    assert report.ip_versions == expected
    # None of the released wheels carries Lunar Lake (Xe2-LPG, 20.4.0) code.
    assert not report.carries("20.4.0")
    assert report.carries("20.2.0")
    assert report.problems == ()
    names = {o.name.rsplit("/", 1)[-1]: o for o in report.objects}
    # every object holds ahead-of-time code next to a generic SPIR-V image
    for o in report.objects:
        assert o.native, o.name
        assert o.spirv_images >= 1, o.name
    assert names["_C.abi3.so"].ip_versions == expected


@pytest.mark.network
@pytest.mark.slow
def test_xe3_attention_library_has_only_xe3_code() -> None:
    report = read_wheel_archs(kernel_wheel("0.1.16.2"))
    names = {o.name.rsplit("/", 1)[-1]: o for o in report.objects}
    assert names["libattn_kernels_xe_3.so"].ip_versions == ("35.11.0",)
    assert names["libattn_kernels_xe_2.so"].ip_versions == BASE_IPS
    # "64.bmg" members are compiled for BMG-G21, counted from their notes
    assert dict(names["_vllm_fa2_C.abi3.so"].native)["20.1.0"] == 2
    assert report.objects_without("20.2.0") == ("vllm_xpu_kernels/libattn_kernels_xe_3.so",)


@pytest.mark.network
@pytest.mark.slow
def test_our_elf_reader_agrees_with_pyelftools_on_a_real_wheel() -> None:
    """wheelarch keeps its own header reader (pyelftools measured 3.4x slower, see
    benchmarks/elf_pyelftools.py); pyelftools is the independent oracle for it: the
    same report, object by object, from the same walker on either reader."""
    sys.path.insert(0, str(fixtures.REPO_ROOT / "benchmarks"))
    from elf_pyelftools import PyElftoolsElf

    import stackbuild.wheelarch as wa

    wheel = kernel_wheel("0.1.3.1")
    ours = read_wheel_archs(wheel)
    own = wa._Elf
    wa._Elf = PyElftoolsElf  # type: ignore[misc]
    try:
        theirs = read_wheel_archs(wheel)
    finally:
        wa._Elf = own  # type: ignore[misc]
    assert ours.objects and ours.to_dict() == theirs.to_dict()


# ---------------------------------------------------------------- synthetic ELF


def _align(b: bytes, n: int = 8) -> bytes:
    return b + b"\0" * (-len(b) % n)


def elf64(sections: list[tuple[str, int, bytes, int]], *, e_type: int, machine: int) -> bytes:
    """A little-endian ELF64 with the given (name, sh_type, data, addr) sections, then
    .shstrtab (the last section header)."""
    shstr = b"\0"
    name_off = []
    for name in [n for n, *_ in sections] + [".shstrtab"]:
        name_off.append(len(shstr))
        shstr += name.encode() + b"\0"
    body = b""
    entries = []
    for (_, typ, data, addr), no in zip([*sections, ("", 3, shstr, 0)], name_off, strict=True):
        entries.append(struct.pack("<IIQQQQIIQQ", no, typ, 0, addr, 64 + len(body), len(data), 0, 0, 8, 0))
        body = _align(body + data)
    shoff = 64 + len(body)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", e_type, machine, 1, 0, 0, shoff, 0, 64, 0, 0, 64,
        len(sections) + 2, len(sections) + 1,
    )
    return header + body + b"\0" * 64 + b"".join(entries)


def _note(ntype: int, desc: bytes, owner: bytes = b"IntelGT") -> bytes:
    name = owner + b"\0"
    return struct.pack("<III", len(name), len(desc), ntype) + _align(name, 4) + _align(desc, 4)


def zebin(ip: str | None, *, family: int = 0x4FA) -> bytes:
    notes = _note(1, struct.pack("<I", family)) + _note(2, struct.pack("<I", 0xC09))
    notes += _note(4, b"1.60\0")
    if ip is not None:
        notes += _note(6, struct.pack("<I", encode_gmd_id(ip)))
    return elf64(
        [(".text._ZTS6kernel", 1, b"\x61\x00" * 64, 0), (".note.intelgt.compat", 7, notes, 0)],
        e_type=1, machine=EM_INTEL_GEN,
    )


def spirv_container() -> bytes:
    spirv = b"\x03\x02\x23\x07" + b"\0" * 60
    return elf64([("SPIRV Object", 0xFF000009, spirv, 0)],
                 e_type=0xFF02, machine=0)


def fat_binary(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for i, (name, data) in enumerate(members.items()):
        for n, d in ((f"pad_{i}/", b" " * 8), (f"{name}/", data)):
            out += f"{n:<16}{0:<12}{0:<6}{0:<6}{644:<8}{len(d):<10}`\n".encode() + d
            out += b"\n" if len(d) % 2 else b""
    return out


def host_so(images: list[bytes], *, rodata: bytes = b"", tgtimg: bool = True,
            section: str = "OFFLOAD_DEVICE_CODE") -> bytes:
    """An x86-64 shared object holding device images the way DPC++ lays them out."""
    dev_addr = 0x10000
    device = b""
    table = b""
    for img in images:
        device = _align(device, 16)
        table += struct.pack("<QQ", dev_addr + len(device), len(img))
        device += img
    sections = [(".rodata", 1, rodata or b"\0" * 16, 0x1000), (section, 1, device, dev_addr)]
    if tgtimg:
        sections.append((".tgtimg", 1, table, 0x90000))
    return elf64(sections, e_type=3, machine=62)


def write_so(tmp_path: Path, data: bytes, name: str = "lib.so") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_gmd_id_decoding_matches_real_notes() -> None:
    # values read from the real 0.1.3.1 wheel's zebin notes
    assert decode_gmd_id(0x05008000) == "20.2.0"
    assert decode_gmd_id(0x05004000) == "20.1.0"
    assert decode_gmd_id(0x030F0007) == "12.60.7"
    for ip in ("20.4.0", "35.11.0", "30.0.4"):
        assert decode_gmd_id(encode_gmd_id(ip)) == ip


def test_fat_binary_members_are_read_from_zebin_notes(tmp_path: Path) -> None:
    fat = fat_binary({"64.20.2.0": zebin("20.2.0"), "64.20.4.0": zebin("20.4.0"),
                      "generic_ir": spirv_container()})
    so = read_shared_object_archs(write_so(tmp_path, host_so([fat, fat])))
    assert so.ip_versions == ("20.2.0", "20.4.0")
    assert so.native == (("20.2.0", 2), ("20.4.0", 2))
    assert so.spirv_images == 2
    assert so.device_sections == ("OFFLOAD_DEVICE_CODE",)
    assert so.problems == ()


def test_string_table_mentions_do_not_count(tmp_path: Path) -> None:
    """oneDNN-style tables name every architecture; only device code counts, and a
    zebin lying in .rodata (not in a device-code section) is not device code either."""
    table = b"\0".join([b"xe_lp", b"xe_hpg", b"xe_hpc", b"xe2", b"lnl", b"LNL", b"bmg",
                        b"20.4.0", b"64.20.4.0", b"12.60.7", b"!<arch>\n64.12.60.7/"])
    rodata = table + b"\0" * 8 + zebin("12.60.7") + fat_binary({"64.20.4.0": zebin("20.4.0")})
    data = host_so([fat_binary({"64.20.2.0": zebin("20.2.0")})], rodata=rodata)
    path = write_so(tmp_path, data)
    # a strings/grep reading would claim LNL and PVC support
    assert b"20.4.0" in data and b"12.60.7" in data and b"lnl" in data
    so = read_shared_object_archs(path)
    assert so.ip_versions == ("20.2.0",)
    assert so.problems == ()


def test_archive_name_disagreeing_with_notes_is_reported(tmp_path: Path) -> None:
    fat = fat_binary({"64.20.4.0": zebin("20.1.0")})
    so = read_shared_object_archs(write_so(tmp_path, host_so([fat])))
    assert so.ip_versions == ("20.1.0",)  # the notes win
    assert any("archive names 20.4.0 but the zebin notes say 20.1.0" in p for p in so.problems)


def test_zebin_without_product_config_falls_back_to_archive_name(tmp_path: Path) -> None:
    fat = fat_binary({"64.12.60.7": zebin(None, family=0x4F7), "bmg": zebin(None)})
    so = read_shared_object_archs(write_so(tmp_path, host_so([fat])))
    assert so.ip_versions == ("12.60.7",)
    assert any("counted as 12.60.7" in p for p in so.problems)
    assert any("/bmg: zebin without a product config note" in p for p in so.problems)


def test_sections_are_walked_without_an_image_table(tmp_path: Path) -> None:
    """Old DPC++ (__CLANG_OFFLOAD_BUNDLE__ sections): images end to end, zero padded."""
    a = fat_binary({"64.12.60.7": zebin("12.60.7")})
    b = fat_binary({"64.20.1.0": zebin("20.1.0")})
    raw_spirv = b"\x03\x02\x23\x07" + b"\0" * 32
    data = host_so([a, b], tgtimg=False, section="__CLANG_OFFLOAD_BUNDLE__sycl-spir64_gen")
    so = read_shared_object_archs(write_so(tmp_path, data))
    assert so.ip_versions == ("12.60.7", "20.1.0")
    assert so.problems == ()
    spirv_only = host_so([raw_spirv], tgtimg=False, section="__CLANG_OFFLOAD_BUNDLE__sycl-spir64")
    so2 = read_shared_object_archs(write_so(tmp_path, spirv_only, "b.so"))
    assert so2.ip_versions == () and so2.spirv_images == 1 and so2.has_device_code


def test_clang_offload_bundle_format(tmp_path: Path) -> None:
    inner = zebin("20.4.0")
    triple = b"sycl-spir64_gen-unknown-unknown"
    header_len = 24 + 8 + 24 + len(triple)
    bundle = b"__CLANG_OFFLOAD_BUNDLE__" + struct.pack("<Q", 1)
    bundle += struct.pack("<QQQ", header_len, len(inner), len(triple)) + triple + inner
    so = read_shared_object_archs(write_so(tmp_path, host_so([bundle])))
    assert so.ip_versions == ("20.4.0",)


def test_unrecognised_device_data_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    so = read_shared_object_archs(write_so(tmp_path, host_so([b"garbage!" * 4])))
    assert so.ip_versions == ()
    assert any("unrecognised data" in p for p in so.problems)
    not_elf = read_shared_object_archs(write_so(tmp_path, b"just text", "x.so"))
    assert not_elf.problems and "not an ELF" in not_elf.problems[0]


def test_plain_host_library_has_no_device_code(tmp_path: Path) -> None:
    so = read_shared_object_archs(write_so(tmp_path, elf64([(".text", 1, b"\x90" * 32, 0x1000)],
                                                          e_type=3, machine=62)))
    assert not so.has_device_code and so.device_sections == () and so.problems == ()


def test_wheel_and_package_reports(tmp_path: Path) -> None:
    fat = fat_binary({"64.20.2.0": zebin("20.2.0"), "generic_ir": spirv_container()})
    wheel = tmp_path / "vllm_xpu_kernels-9.9.9-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("vllm_xpu_kernels/__init__.py", "")
        zf.writestr("vllm_xpu_kernels/_C.abi3.so", host_so([fat]))
        zf.writestr("vllm_xpu_kernels/libhost.so", elf64([(".text", 1, b"\x90", 0)], e_type=3, machine=62))
    report = read_wheel_archs(wheel)
    assert (report.project, report.version) == ("vllm-xpu-kernels", "9.9.9")
    assert [o.name for o in report.objects] == ["vllm_xpu_kernels/_C.abi3.so", "vllm_xpu_kernels/libhost.so"]
    assert report.ip_versions == ("20.2.0",)
    assert report.carries("20.2.0") and not report.carries("20.4.0")
    assert report.objects_without("20.4.0") == ("vllm_xpu_kernels/_C.abi3.so",)
    d = report.to_dict()
    assert d["names"] == {"20.2.0": "BMG-G31"}
    assert "20.2.0 (BMG-G31) x1" in report.tables()[0].render()

    pkg = tmp_path / "site" / "vllm_xpu_kernels"
    pkg.mkdir(parents=True)
    (pkg / "_C.abi3.so").write_bytes(host_so([fat]))
    installed = read_package_archs(pkg, "vllm-xpu-kernels", "9.9.9")
    assert installed.ip_versions == ("20.2.0",)
    assert installed.objects[0].name == "vllm_xpu_kernels/_C.abi3.so"


def test_unreadable_wheel_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "x-1.0-py3-none-any.whl"
    bad.write_text("not a zip")
    with pytest.raises(WheelArchError) as e:
        read_wheel_archs(bad)
    assert str(bad) in str(e.value)
