"""The resolvers (uv, pip-compile) against an index that drips one byte at a time: each
read is quick, so only an overall limit stops them. The run ends within that limit,
with one error naming the resolver and the index, and no resolver process survives."""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stackbuild.lock import backends
from stackbuild.lock.errors import LockError, ResolutionFailed


class Drip(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100000):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass


@pytest.fixture
def drip_index() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    srv.daemon_threads = True
    srv.block_on_close = False  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/simple"
    finally:
        srv.shutdown()
        srv.server_close()


def _children() -> set[int]:
    """Live processes whose parent is this one."""
    kids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                kids.add(int(d.name))
    return kids


@pytest.mark.parametrize(("resolver", "limit"), [("uv", 3.0), ("pip-tools", 12.0)])
def test_dripping_index_stops_the_resolver_at_its_limit(tmp_path: Path, drip_index: str, resolver: str,
                                                        limit: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.setenv("STACKBUILD_RESOLVE_TIMEOUT", str(limit))
    reqs = tmp_path / "in.txt"
    reqs.write_text("tinypkg\n")
    req = backends.ResolveRequest((reqs,), tmp_path / "out.txt", drip_index, (), (), None, False)
    before = _children()
    t0 = time.monotonic()
    with pytest.raises(ResolutionFailed) as ei:
        backends.run_resolver(resolver, req)
    elapsed = time.monotonic() - t0
    assert limit <= elapsed < limit + 8, elapsed
    msg = ei.value.message
    assert msg.startswith(f"{resolver} did not finish within {limit:g} s resolving against {drip_index}"), msg
    assert "STACKBUILD_RESOLVE_TIMEOUT" in msg and "\n" not in msg
    assert _children() <= before
    assert not (tmp_path / "out.txt").exists()


def test_bad_resolve_timeout_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_RESOLVE_TIMEOUT", "later")
    with pytest.raises(LockError, match="STACKBUILD_RESOLVE_TIMEOUT='later' must be a positive number"):
        backends.resolve_timeout()
