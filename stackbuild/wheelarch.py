"""Which Intel GPUs a kernel wheel carries device code for, read without a GPU.

A SYCL shared object keeps its device code in dedicated sections of the host ELF:
`__CLANG_OFFLOAD_BUNDLE__sycl-spir64_gen` (older DPC++), `OFFLOAD_DEVICE_CODE` (newer
DPC++) or `.llvm.offloading`. The `.tgtimg` section lists the images as (address,
size) pairs. An ahead-of-time image is an ocloc "fat binary": an `ar` archive with one
member per target (`64.20.2.0`, ...) and a `generic_ir` member (SPIR-V for JIT). Each
target member is a zebin: an ELF with e_machine EM_INTEL_GEN (205) whose
`.note.intelgt.compat` section holds NT_INTELGT_PRODUCT_CONFIG, the GMD ID
(architecture.release.revision) the code was compiled for.

Only what those structures say counts. A string such as "20.2.0" or "bmg" elsewhere
in the file (oneDNN and IGC tables name every architecture) is ignored, which is why
`strings | grep` cannot answer this question.

Large files are never read into Python objects: a wheel member is streamed to a
temporary file and mapped; only headers and note sections are decoded.

The ELF header reader is our own rather than pyelftools: on vllm-xpu-kernels 0.1.16.2
(150 MB, thousands of embedded zebins) the same walker on pyelftools took 3.4x as long
(16.6 s against 4.9 s; `make bench`, bench_wheelarch). pyelftools stays the oracle: a
test checks that both readers give the same report on a real wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stackbuild.errors import StackbuildError
from stackbuild.platforms import KNOWN_IP_VERSIONS
from stackbuild.report import Table

EM_INTEL_GEN = 205
ET_SPIRV_CONTAINER = 0xFF02  # ocloc's "generic_ir" ELF holding a SPIR-V section
SHT_NOTE = 7
NOTE_OWNER = b"IntelGT"
NT_INTELGT_PRODUCT_FAMILY = 1
NT_INTELGT_GFXCORE_FAMILY = 2
NT_INTELGT_PRODUCT_CONFIG = 6

AR_MAGIC = b"!<arch>\n"
ELF_MAGIC = b"\x7fELF"
SPIRV_MAGIC_LE = b"\x03\x02\x23\x07"
CLANG_BUNDLE_MAGIC = b"__CLANG_OFFLOAD_BUNDLE__"
OFFLOAD_BINARY_MAGIC = b"\x10\xff\x10\xad"

DEVICE_SECTION_PREFIXES = ("__CLANG_OFFLOAD_BUNDLE__", "OFFLOAD_DEVICE_CODE", ".llvm.offloading")
AR_MEMBER_TARGET = re.compile(r"^(?:32|64)\.(\d+\.\d+\.\d+)$")
MAX_NESTING = 4


class WheelArchError(StackbuildError):
    """A wheel or shared object cannot be read."""


def decode_gmd_id(value: int) -> str:
    """GMD ID (NT_INTELGT_PRODUCT_CONFIG) -> "architecture.release.revision"."""
    arch = (value >> 22) & 0x3FF
    release = (value >> 14) & 0xFF
    revision = value & 0x3F
    return f"{arch}.{release}.{revision}"


def encode_gmd_id(ip_version: str) -> int:
    arch, release, revision = (int(x) for x in ip_version.split("."))
    return (arch << 22) | (release << 14) | revision


def ip_label(ip_version: str) -> str:
    name = KNOWN_IP_VERSIONS.get(ip_version)
    return f"{ip_version} ({name})" if name else ip_version


# ---------------------------------------------------------------- result objects


@dataclass(frozen=True)
class SharedObjectArchs:
    """Device code found in one shared object."""

    name: str  # path inside the wheel / package
    size: int
    device_sections: tuple[str, ...]  # host sections that held device code
    native: tuple[tuple[str, int], ...]  # (IP version, number of zebin images), sorted
    spirv_images: int  # generic SPIR-V images (JIT-compiled at first use)
    problems: tuple[str, ...] = ()  # parts that did not parse, name/note disagreements

    @property
    def ip_versions(self) -> tuple[str, ...]:
        return tuple(ip for ip, _ in self.native)

    @property
    def has_device_code(self) -> bool:
        return bool(self.native) or self.spirv_images > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "device_sections": list(self.device_sections),
            "ip_versions": {ip: n for ip, n in self.native},
            "spirv_images": self.spirv_images,
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class WheelArchReport:
    source: str  # the wheel file or installed package directory
    project: str
    version: str
    objects: tuple[SharedObjectArchs, ...] = field(default_factory=tuple)

    @property
    def ip_versions(self) -> tuple[str, ...]:
        found = {ip for o in self.objects for ip in o.ip_versions}
        return tuple(sorted(found, key=_ip_sort_key))

    def carries(self, ip_version: str) -> bool:
        return ip_version in self.ip_versions

    def objects_without(self, ip_version: str) -> tuple[str, ...]:
        """Objects with native device code, but none for this IP version."""
        return tuple(o.name for o in self.objects if o.native and ip_version not in o.ip_versions)

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(f"{o.name}: {p}" for o in self.objects for p in o.problems)

    def describe(self) -> str:
        ips = ", ".join(ip_label(ip) for ip in self.ip_versions) or "no native device code"
        return f"{self.project} {self.version}: {ips}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "project": self.project,
            "version": self.version,
            "ip_versions": list(self.ip_versions),
            "names": {ip: KNOWN_IP_VERSIONS.get(ip, "") for ip in self.ip_versions},
            "objects": [o.to_dict() for o in self.objects],
        }

    def tables(self) -> list[Table]:
        rows = []
        for o in self.objects:
            native = ", ".join(f"{ip_label(ip)} x{n}" for ip, n in o.native) or "-"
            rows.append((o.name, native, str(o.spirv_images), "; ".join(o.problems)))
        return [
            Table(
                title=f"Device code in {self.project} {self.version}",
                columns=("shared object", "native (IP version x images)", "SPIR-V", "problems"),
                rows=tuple(rows),
                summary=f"IP versions: {', '.join(ip_label(i) for i in self.ip_versions) or 'none'}",
            )
        ]


def _ip_sort_key(ip: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in ip.split("."))
    except ValueError:
        return (1 << 30,)


# ---------------------------------------------------------------- ELF reading


class _FileView:
    """A file as a read-only byte sequence: slices are read with pread on demand, so
    scanning a 300 MB shared object keeps only headers and notes in memory."""

    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(self.size)
        return os.pread(self.fd, max(0, stop - start), start) if stop > start else b""


@dataclass(frozen=True)
class _Section:
    name: str
    type: int
    addr: int
    offset: int
    size: int


class _Elf:
    """Minimal ELF reader over anything sliceable to bytes (bytes, a `_FileView`);
    reads headers and note sections, never the code."""

    def __init__(self, buf: Any, base: int = 0, limit: int | None = None):
        self.buf = buf
        self.base = base
        self.limit = len(buf) if limit is None else limit
        if self.limit - base < 64 or bytes(buf[base : base + 4]) != ELF_MAGIC:
            raise ValueError("not an ELF image")
        ident = buf[base + 4 : base + 6]
        ei_class, ei_data = ident[0], ident[1]
        if ei_class not in (1, 2) or ei_data not in (1, 2):
            raise ValueError("bad ELF class or byte order")
        self.is64 = ei_class == 2
        self.end = "<" if ei_data == 1 else ">"
        if self.is64:
            (self.e_type, self.e_machine, _, _, _, self.e_shoff, _, _, _, _,
             self.e_shentsize, self.e_shnum, self.e_shstrndx) = struct.unpack(
                self.end + "HHIQQQIHHHHHH", buf[base + 16 : base + 64])
        else:
            (self.e_type, self.e_machine, _, _, _, self.e_shoff, _, _, _, _,
             self.e_shentsize, self.e_shnum, self.e_shstrndx) = struct.unpack(
                self.end + "HHIIIIIHHHHHH", buf[base + 16 : base + 52])
        if self.e_shoff and self.base + self.e_shoff + self.e_shnum * self.e_shentsize > self.limit:
            raise ValueError("section header table beyond the image")
        self.sections = self._read_sections()

    def _read_sections(self) -> list[_Section]:
        raw: list[tuple[int, int, int, int, int]] = []
        start = self.base + self.e_shoff
        table = self.buf[start : start + self.e_shnum * self.e_shentsize]
        fmt = self.end + ("IIQQQQ" if self.is64 else "IIIIII")
        for i in range(self.e_shnum):
            name, typ, _, addr, offset, size = struct.unpack_from(fmt, table, i * self.e_shentsize)
            raw.append((name, typ, addr, offset, size))
        names = b""
        if raw and 0 < self.e_shstrndx < len(raw):
            _, _, _, s_off, s_size = raw[self.e_shstrndx]
            if self.base + s_off + s_size <= self.limit:
                names = bytes(self.buf[self.base + s_off : self.base + s_off + s_size])
        out = []
        for name, typ, addr, offset, size in raw:
            end = names.find(b"\0", name)
            text = names[name:end if end >= 0 else None].decode("utf-8", "replace") if names else ""
            out.append(_Section(text, typ, addr, offset, size))
        return out

    @property
    def image_size(self) -> int:
        ends = [self.e_shoff + self.e_shnum * self.e_shentsize]
        ends += [s.offset + s.size for s in self.sections if s.type != 8]  # 8: NOBITS
        return max(ends)

    def section(self, name: str) -> _Section | None:
        return next((s for s in self.sections if s.name == name), None)

    def data(self, s: _Section) -> bytes:
        start = self.base + s.offset
        if s.type == 8 or start + s.size > self.limit:
            return b""
        return bytes(self.buf[start : start + s.size])

    def file_offset(self, addr: int) -> _Section | None:
        for s in self.sections:
            if s.addr and s.type != 8 and s.addr <= addr < s.addr + s.size:
                return s
        return None

    def notes(self, s: _Section) -> Iterator[tuple[bytes, int, bytes]]:
        d = self.data(s)
        p = 0
        while p + 12 <= len(d):
            namesz, descsz, ntype = struct.unpack_from(self.end + "III", d, p)
            p += 12
            name = bytes(d[p : p + namesz]).rstrip(b"\0")
            p += (namesz + 3) & ~3
            desc = d[p : p + descsz]
            p += (descsz + 3) & ~3
            if p > len(d):
                return
            yield name, ntype, desc


# ---------------------------------------------------------------- device image walking


class _Tally:
    def __init__(self) -> None:
        self.native: Counter[str] = Counter()
        self.spirv = 0
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        if text not in self.problems and len(self.problems) < 20:
            self.problems.append(text)


def _zebin_ip(elf: _Elf) -> tuple[str | None, str]:
    """The IP version a zebin was built for, from its compat notes."""
    compat = elf.section(".note.intelgt.compat")
    if compat is None:
        return None, "zebin without .note.intelgt.compat"
    family = None
    for owner, ntype, desc in elf.notes(compat):
        if owner != NOTE_OWNER or len(desc) < 4:
            continue
        value = struct.unpack_from(elf.end + "I", desc)[0]
        if ntype == NT_INTELGT_PRODUCT_CONFIG and value:
            return decode_gmd_id(value), ""
        if ntype == NT_INTELGT_PRODUCT_FAMILY:
            family = value
    return None, f"zebin without a product config note (product family {family})"


def _walk(buf: Any, start: int, end: int, where: str, tally: _Tally, depth: int = 0,
          expect: str | None = None) -> None:
    """Parse device containers laid end to end in buf[start:end]."""
    if depth > MAX_NESTING:
        tally.problem(f"{where}: nested too deep")
        return
    p = start
    while p < end:
        # images are aligned; padding between them is zeros
        while p < end:
            chunk = bytes(buf[p : min(p + 4096, end)])
            skip = len(chunk) - len(chunk.lstrip(b"\0"))
            p += skip
            if skip < len(chunk):
                break
        if p >= end:
            return
        head = bytes(buf[p : min(p + 26, end)])
        if head.startswith(AR_MAGIC):
            p = _walk_ar(buf, p, end, where, tally, depth)
        elif head.startswith(ELF_MAGIC):
            p = _walk_elf(buf, p, end, where, tally, depth, expect)
        elif head.startswith(CLANG_BUNDLE_MAGIC):
            p = _walk_clang_bundle(buf, p, end, where, tally, depth)
        elif head.startswith(OFFLOAD_BINARY_MAGIC):
            p = _walk_offload_binary(buf, p, end, where, tally, depth)
        elif head.startswith(SPIRV_MAGIC_LE) or head.startswith(SPIRV_MAGIC_LE[::-1]):
            tally.spirv += 1
            return  # a bare SPIR-V module has no length header: it runs to the end
        else:
            tally.problem(f"{where}: unrecognised data at +{p - start:#x} ({head[:8].hex()})")
            return


def _walk_ar(buf: Any, p: int, end: int, where: str, tally: _Tally, depth: int) -> int:
    p += len(AR_MAGIC)
    long_names = b""
    while p + 60 <= end:
        hdr = bytes(buf[p : p + 60])
        if hdr[58:60] != b"`\n":
            break
        raw_name = hdr[:16].decode("ascii", "replace").rstrip()
        try:
            size = int(hdr[48:58].decode("ascii").strip())
        except ValueError:
            tally.problem(f"{where}: bad ar member size")
            return end
        body = p + 60
        if body + size > end:
            tally.problem(f"{where}: ar member {raw_name!r} runs past its container")
            return end
        if raw_name == "//":
            long_names = bytes(buf[body : body + size])
        elif raw_name not in ("/", "/SYM64/"):
            name = raw_name.rstrip("/")
            if raw_name.startswith("/") and raw_name[1:].isdigit() and long_names:
                i = int(raw_name[1:])
                name = long_names[i : long_names.find(b"\n", i)].decode("ascii", "replace").rstrip("/")
            m = AR_MEMBER_TARGET.match(name)
            if not name.startswith("pad_"):
                _walk(buf, body, body + size, f"{where}/{name}", tally, depth + 1,
                      expect=m.group(1) if m else None)
        p = body + size + (size & 1)
    return p


def _walk_elf(buf: Any, p: int, end: int, where: str, tally: _Tally, depth: int,
              expect: str | None) -> int:
    try:
        elf = _Elf(buf, p, end)
    except (ValueError, struct.error) as e:
        tally.problem(f"{where}: bad embedded ELF ({e})")
        return end
    if elf.e_machine == EM_INTEL_GEN:
        ip, why = _zebin_ip(elf)
        if ip is None:
            ip = expect
            tally.problem(f"{where}: {why}" + (f"; counted as {expect} from its archive name" if expect else ""))
        elif expect and expect != ip:
            tally.problem(f"{where}: archive names {expect} but the zebin notes say {ip}")
        if ip:
            tally.native[ip] += 1
    elif elf.e_type == ET_SPIRV_CONTAINER or any("SPIRV" in s.name for s in elf.sections):
        tally.spirv += 1
    else:
        tally.problem(f"{where}: embedded ELF with machine {elf.e_machine}, not Intel GPU code")
    return p + elf.image_size


def _walk_clang_bundle(buf: Any, p: int, end: int, where: str, tally: _Tally, depth: int) -> int:
    """clang-offload-bundler binary format: magic, count, then (offset, size, triple)."""
    q = p + len(CLANG_BUNDLE_MAGIC)
    (count,) = struct.unpack("<Q", buf[q : q + 8])
    q += 8
    last = p
    for _ in range(count):
        off, size, tlen = struct.unpack("<QQQ", buf[q : q + 24])
        q += 24
        triple = bytes(buf[q : q + tlen]).decode("ascii", "replace")
        q += tlen
        if size and not triple.startswith("host-"):
            _walk(buf, p + off, min(p + off + size, end), f"{where}[{triple}]", tally, depth + 1)
        last = max(last, p + off + size)
    return max(last, q)


def _walk_offload_binary(buf: Any, p: int, end: int, where: str, tally: _Tally, depth: int) -> int:
    """LLVM OffloadBinary (.llvm.offloading): header, entries, string table."""
    _, _, size, entry_off, _ = struct.unpack("<IIQQQ", buf[p : p + 32])
    image_off, image_size = struct.unpack("<QQ", buf[p + entry_off + 24 : p + entry_off + 40])
    _walk(buf, p + image_off, min(p + image_off + image_size, end), f"{where}[offload]", tally,
          depth + 1)
    return p + max(size, 1)


def _scan_shared_object(buf: Any, name: str) -> SharedObjectArchs:
    tally = _Tally()
    try:
        host = _Elf(buf)
    except (ValueError, struct.error) as e:
        return SharedObjectArchs(name, len(buf), (), (), 0, (f"not an ELF shared object ({e})",))
    device = [s for s in host.sections if s.name.startswith(DEVICE_SECTION_PREFIXES)]
    images: list[tuple[str, int, int]] = []
    tgtimg = host.section(".tgtimg")
    if tgtimg is not None and tgtimg.size % 16 == 0:
        for i, (addr, size) in enumerate(struct.iter_unpack(host.end + "QQ", host.data(tgtimg))):
            s = host.file_offset(addr)
            if s is None or not s.name.startswith(DEVICE_SECTION_PREFIXES) or addr + size > s.addr + s.size:
                images = []  # the table did not resolve (relocated at load time): walk the sections
                break
            off = s.offset + (addr - s.addr)
            images.append((f"{s.name}#{i}", off, off + size))
    covered = {w.split("#")[0] for w, _, _ in images}
    for s in device:
        if s.name not in covered and s.type != 8:
            images.append((s.name, s.offset, s.offset + s.size))
    for where, start, end in images:
        _walk(buf, start, min(end, len(buf)), where, tally)
    native = tuple(sorted(tally.native.items(), key=lambda kv: _ip_sort_key(kv[0])))
    return SharedObjectArchs(name, len(buf), tuple(s.name for s in device), native, tally.spirv,
                             tuple(tally.problems))


def read_shared_object_archs(path: Path, name: str | None = None) -> SharedObjectArchs:
    """Device code in one .so file on disk (headers read on demand, not the file)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _scan_shared_object(_FileView(f.fileno(), size), name or path.name)
    except OSError as e:
        raise WheelArchError(f"cannot read shared object: {e.strerror}", file=path) from None


# ---------------------------------------------------------------- wheels and packages


def _wheel_name_version(wheel: Path) -> tuple[str, str]:
    parts = wheel.name.split("-")
    if len(parts) >= 2:
        return parts[0].replace("_", "-"), parts[1]
    return wheel.stem, ""


def read_wheel_archs(wheel: Path) -> WheelArchReport:
    """Per .so in the wheel, the Intel GPU IP versions it carries device code for."""
    project, version = _wheel_name_version(wheel)
    objects: list[SharedObjectArchs] = []
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise WheelArchError(f"not a readable wheel: {e}", file=wheel) from None
    with zf, tempfile.TemporaryDirectory(prefix="stackbuild-wheelarch-") as tmp:
        for info in zf.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if info.is_dir() or not (base.endswith(".so") or ".so." in base):
                continue
            target = Path(tmp) / "member.so"
            # Stream: never hold a 300 MB member in memory.
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            objects.append(read_shared_object_archs(target, info.filename))
            target.unlink()
    return WheelArchReport(str(wheel), project, version, tuple(objects))


def read_package_archs(package_dir: Path, project: str = "", version: str = "") -> WheelArchReport:
    """The same report for an installed package directory (site-packages/vllm_xpu_kernels)."""
    if not package_dir.is_dir():
        raise WheelArchError("not a directory", file=package_dir)
    objects = [
        read_shared_object_archs(p, str(p.relative_to(package_dir.parent)))
        for p in sorted(package_dir.rglob("*.so*"))
        if p.is_file() and (p.name.endswith(".so") or ".so." in p.name)
    ]
    return WheelArchReport(str(package_dir), project or package_dir.name, version, tuple(objects))
