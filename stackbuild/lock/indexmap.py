"""Index maps: resolve against a local mirror while the lockfile keeps the real URL.

    STACKBUILD_INDEX_MAP="https://download.pytorch.org/whl/xpu=/srv/mirror/xpu/simple"
    stackbuild lock NAME --index-map REAL=LOCAL      (repeatable; adds to the variable)

A URL that equals REAL, or starts with REAL followed by "/", is fetched from LOCAL
(a folder or a file:// URL) instead; whatever the resolver says about it is mapped
back, so the lockfile names only the real URLs. Used where the real index cannot be
reached (an air-gapped lab with a mirror; tests with a local PEP 503 index).
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from stackbuild.lock.errors import LockError

ENV = "STACKBUILD_INDEX_MAP"


def _as_url(local: str) -> str:
    if "://" in local:
        return local.rstrip("/")
    return Path(local).expanduser().resolve().as_uri()


@dataclass(frozen=True)
class IndexMap:
    pairs: tuple[tuple[str, str], ...] = ()  # (real, local URL), longest real first

    @classmethod
    def parse(cls, specs: list[str] | tuple[str, ...] = (), env: str | None = None) -> IndexMap:
        """From `--index-map` values and the STACKBUILD_INDEX_MAP variable (entries
        separated by whitespace)."""
        raw = (os.environ.get(ENV, "") if env is None else env).split()
        pairs: list[tuple[str, str]] = []
        for where, items in ((ENV, raw), ("--index-map", list(specs))):
            for item in items:
                real, sep, local = item.partition("=")
                real, local = real.strip().rstrip("/"), local.strip()
                if not sep or not real or not local or "://" not in real:
                    raise LockError(f"expected REAL=LOCAL (an http(s) URL = a folder or file:// URL), got {item!r}",
                                    key=where)
                pairs.append((real, _as_url(local)))
        pairs.sort(key=lambda p: len(p[0]), reverse=True)
        return cls(tuple(pairs))

    def __bool__(self) -> bool:
        return bool(self.pairs)

    @staticmethod
    def _swap(url: str, old: str, new: str) -> str | None:
        if url == old or url.rstrip("/") == old:
            return new + ("/" if url.endswith("/") else "")
        if url.startswith(old + "/"):
            return new + url[len(old):]
        return None

    def local(self, url: str) -> str:
        for real, local in self.pairs:
            got = self._swap(url, real, local)
            if got is not None:
                return got
        return url

    def real(self, url: str) -> str:
        """The real URL for a local one the resolver reported (file:// spellings vary)."""
        norm = url
        if url.startswith("file:"):
            norm = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)).as_uri()
        for real, local in self.pairs:
            for cand in (url, norm):
                got = self._swap(cand, local, real)
                if got is not None:
                    return got
        return url

    def locals(self) -> tuple[str, ...]:
        out: list[str] = []
        for _, local in self.pairs:
            out.append(local)
            if local.startswith("file:"):
                out.append(urllib.request.url2pathname(urllib.parse.urlparse(local).path))
        return tuple(out)
