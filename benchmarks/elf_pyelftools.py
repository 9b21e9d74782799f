"""The kernel-wheel arch reader's ELF layer on pyelftools instead of our own header
reader: the same interface as `stackbuild.wheelarch._Elf`, for two uses. tests check our
reader's section tables against pyelftools (an independent parser) on real wheels, and
bench_wheelarch measures what switching would cost (issue 18: use pyelftools unless it
costs more than 1.5x; measured 3.4x on vllm-xpu-kernels 0.1.16.2, 16.6 s against 4.9 s,
so the walker keeps its own reader)."""

from __future__ import annotations

import io
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.enums import ENUM_E_MACHINE, ENUM_E_TYPE, ENUM_SH_TYPE_BASE

from stackbuild import wheelarch as wa


class _Window(io.RawIOBase):
    """buf[base:limit] (bytes or wheelarch's pread view) as a seekable stream."""

    def __init__(self, buf: Any, base: int, limit: int):
        self.buf, self.base, self.limit, self.pos = buf, base, limit, 0

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else self.pos + off if whence == 1 else self.limit - self.base + off
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        start = self.base + self.pos
        stop = self.limit if n is None or n < 0 else min(self.limit, start + n)
        data = bytes(self.buf[start:stop]) if stop > start else b""
        self.pos += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def _num(value: Any, table: dict[str, int]) -> int:
    return value if isinstance(value, int) else table[value]


class PyElftoolsElf(wa._Elf):
    """wheelarch._Elf with headers and section tables parsed by pyelftools."""

    def __init__(self, buf: Any, base: int = 0, limit: int | None = None):
        self.buf, self.base = buf, base
        self.limit = len(buf) if limit is None else limit
        if self.limit - base < 64 or bytes(buf[base : base + 4]) != wa.ELF_MAGIC:
            raise ValueError("not an ELF image")
        try:
            elf = ELFFile(_Window(buf, base, self.limit))
            h = elf.header
            self.is64 = elf.elfclass == 64
            self.end = "<" if elf.little_endian else ">"
            self.e_type = _num(h["e_type"], ENUM_E_TYPE)
            self.e_machine = _num(h["e_machine"], ENUM_E_MACHINE)
            self.e_shoff, self.e_shnum, self.e_shentsize = h["e_shoff"], h["e_shnum"], h["e_shentsize"]
            if self.e_shoff and base + self.e_shoff + self.e_shnum * self.e_shentsize > self.limit:
                raise ValueError("section header table beyond the image")
            self.sections = [wa._Section(s.name, _num(s["sh_type"], ENUM_SH_TYPE_BASE), s["sh_addr"],
                                         s["sh_offset"], s["sh_size"]) for s in elf.iter_sections()]
        except ELFError as e:
            raise ValueError(str(e)) from None
