"""The network door against a hostile HTTP server on 127.0.0.1: broken index answers,
a server that drips one byte at a time, a wrong hash, an oversized body. Each is one
clear error naming the URL, exit 2 through the CLI, and no temporary file is left."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stackbuild import net
from stackbuild.cli import main
from stackbuild.errors import SourceError
from stackbuild.sources.pypi import fetch_sdist, list_files


def tiny_sdist() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = b"VALUE = 1\n"
        info = tarfile.TarInfo("tinypkg-1.0/tinypkg/__init__.py")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SDIST = tiny_sdist()
SDIST_SHA = hashlib.sha256(SDIST).hexdigest()
JSON_TYPE = "application/vnd.pypi.simple.v1+json"


def _json(doc: object) -> tuple[str, bytes]:
    return JSON_TYPE, json.dumps(doc).encode()


# project page -> (content type, body): every way an index answer can be malformed
BAD_INDEX = {
    "broken-json": ((JSON_TYPE, b'{"files": [{"filename": '), "not valid JSON"),
    "not-utf8": ((JSON_TYPE, b'{"files": ["\xff\xfe"]}'), "not valid JSON"),
    "no-files": (_json({"meta": {"api-version": "1.0"}, "name": "x"}), "no 'files' list"),
    "files-not-list": (_json({"files": "tinypkg-1.0.tar.gz"}), "'files' is str, not a list"),
    "file-not-object": (_json({"files": ["tinypkg-1.0.tar.gz"]}), "files[0] is str, not an object"),
    "no-filename": (_json({"files": [{"url": "../../f/x.tar.gz"}]}), "files[0] has no 'filename' string"),
    "no-url": (_json({"files": [{"filename": "tinypkg-1.0.tar.gz"}]}), "files[0] has no 'url' string"),
    "filename-int": (_json({"files": [{"filename": 7, "url": "x"}]}), "files[0] has no 'filename' string"),
    "hashes-list": (_json({"files": [{"filename": "a", "url": "a", "hashes": ["sha256"]}]}), "files[0].hashes is list"),
    "sha256-not-hex": (_json({"files": [{"filename": "a", "url": "a", "hashes": {"sha256": 5}}]}), "not 64 hex digits"),
    "json-array": (_json([1, 2]), "no 'files' list"),
}


class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, Callable[[Handler], None]] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        try:
            self.routes[self.path](self)
        except KeyError:
            self.send_error(404)
        except OSError:  # the client hung up (its deadline): expected here
            pass

    do_HEAD = do_GET

    def answer(self, ctype: str, body: bytes, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)


def drip(length: int, interval: float = 0.3) -> Callable[[Handler], None]:
    def route(h: Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(length))
        h.end_headers()
        for _ in range(length):
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(interval)
    return route


def drip_headers(h: Handler) -> None:
    for b in b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nX-Slow: " + b"y" * 200:
        h.wfile.write(bytes([b]))
        h.wfile.flush()
        time.sleep(0.3)


def endless(h: Handler) -> None:
    # no Content-Length: the size limit must trip on the bytes read
    h.send_response(200)
    h.send_header("Content-Type", "application/octet-stream")
    h.end_headers()
    for _ in range(10_000):
        h.wfile.write(b"z" * 65536)


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, Callable[[Handler], None]]]]:
    routes: dict[str, Callable[[Handler], None]] = {}

    class H(Handler):
        pass

    H.routes = routes
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    srv.block_on_close = False  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", routes
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("STACKBUILD_CACHE", str(d))
    for var in ("PIP_INDEX_URL", "STACKBUILD_NET_TIMEOUT", "STACKBUILD_DOWNLOAD_TIMEOUT", "STACKBUILD_DOWNLOAD_MAX_MB"):
        monkeypatch.delenv(var, raising=False)
    return d


def pypi_project(root: Path, sha: str):  # type: ignore[no-untyped-def]
    """A project whose recipe patches the tinypkg sdist (only patched sources are fetched)."""
    from test_workspace import Project, sha256

    proj = Project(root)
    patch = "--- a/tinypkg/__init__.py\n+++ b/tinypkg/__init__.py\n@@ -1 +1 @@\n-VALUE = 1\n+VALUE = 2\n"
    rel = proj.add_patch("value.patch", patch)
    proj.write_recipe("r", {"tinypkg": {"pypi": "tinypkg==1.0", "sha256": sha}},
                      [{"file": rel, "source": "tinypkg", "sha256": sha256(patch)}])
    return proj


def files_in(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


@pytest.mark.parametrize("case", list(BAD_INDEX))
def test_malformed_index_answer_is_one_error_naming_the_url(server, cache: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    base, routes = server
    (ctype, body), why = BAD_INDEX[case]
    routes["/simple/tinypkg/"] = lambda h: h.answer(ctype, body)
    with pytest.raises(SourceError) as ei:
        list_files("tinypkg", f"{base}/simple")
    e = ei.value
    assert e.file == f"{base}/simple/tinypkg/"
    assert e.message.startswith("malformed index answer") and why in e.message, e.message
    assert "\n" not in str(e)


def test_malformed_index_exits_2_through_the_cli(server, cache: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    base, routes = server
    routes["/simple/tinypkg/"] = lambda h: h.answer(JSON_TYPE, b'{"meta": {}}')
    monkeypatch.setenv("STACKBUILD_INDEX_URL", f"{base}/simple")
    proj = pypi_project(tmp_path / "proj", SDIST_SHA)
    monkeypatch.chdir(proj.root)
    assert main(["apply", "r"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"stackbuild: error: {base}/simple/tinypkg/: malformed index answer (PEP 691 JSON): no 'files' list")
    assert files_in(cache / "sdists") == []


def test_slow_drip_index_trips_the_overall_deadline(server, cache: Path,  # type: ignore[no-untyped-def]
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base, routes = server
    routes["/simple/tinypkg/"] = drip(1000)
    # each byte comes well within the per-read timeout: only an overall deadline trips
    monkeypatch.setenv("STACKBUILD_NET_TIMEOUT", "1.5")
    t0 = time.monotonic()
    with pytest.raises(SourceError) as ei:
        list_files("tinypkg", f"{base}/simple")
    elapsed = time.monotonic() - t0
    assert "overall deadline of 1.5 s" in ei.value.message
    assert f"{base}/simple/tinypkg/" in ei.value.message and ei.value.file == f"{base}/simple"
    assert 1.4 < elapsed < 4, elapsed


def test_slow_drip_headers_trip_the_deadline(server, cache: Path) -> None:  # type: ignore[no-untyped-def]
    base, routes = server
    routes["/page"] = drip_headers
    t0 = time.monotonic()
    with pytest.raises(net.NetError) as ei:
        net.get(f"{base}/page", timeout=1.2)
    assert "overall deadline of 1.2 s" in ei.value.message and ei.value.file == f"{base}/page"
    assert time.monotonic() - t0 < 4


def test_slow_drip_download_trips_its_deadline_and_leaves_nothing(server, cache: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    base, routes = server
    routes["/f/x.tar.gz"] = drip(500)
    monkeypatch.setenv("STACKBUILD_DOWNLOAD_TIMEOUT", "1.2")
    dest = tmp_path / "dl" / "x.tar.gz"
    t0 = time.monotonic()
    with pytest.raises(net.NetError) as ei:
        net.download(f"{base}/f/x.tar.gz", dest, sha256=None)
    assert "overall deadline of 1.2 s" in ei.value.message and ei.value.file == f"{base}/f/x.tar.gz"
    assert time.monotonic() - t0 < 4
    assert files_in(tmp_path / "dl") == []


def test_wrong_hash_is_refused_and_nothing_is_kept(server, cache: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    base, routes = server
    wrong = "0" * 64
    # the index agrees with the recipe, the file it serves does not
    routes["/simple/tinypkg/"] = lambda h: h.answer(*_json(
        {"files": [{"filename": "tinypkg-1.0.tar.gz", "url": "../../f/tinypkg-1.0.tar.gz", "hashes": {"sha256": wrong}}]}))
    routes["/f/tinypkg-1.0.tar.gz"] = lambda h: h.answer("application/gzip", SDIST)
    monkeypatch.setenv("STACKBUILD_INDEX_URL", f"{base}/simple")
    proj = pypi_project(tmp_path / "proj", wrong)
    monkeypatch.chdir(proj.root)
    assert main(["apply", "r"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stackbuild: error: {base}/f/tinypkg-1.0.tar.gz: sha256 mismatch: expected {wrong}")
    assert SDIST_SHA in last
    assert [p for p in files_in(cache / "sdists") if not p.endswith(wrong)] == []
    assert not (proj.workdir / "r" / "tinypkg").exists()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "no-length"])
def test_oversized_body_is_refused(server, cache: Path, tmp_path: Path, declared: bool) -> None:  # type: ignore[no-untyped-def]
    base, routes = server
    routes["/big"] = (lambda h: h.answer("application/octet-stream", b"z" * 4096)) if declared else endless
    dest = tmp_path / "dl" / "big"
    with pytest.raises(net.NetError) as ei:
        net.download(f"{base}/big", dest, sha256=None, max_bytes=1000)
    assert "over the limit of 1,000 bytes" in ei.value.message and ei.value.file == f"{base}/big"
    assert files_in(tmp_path / "dl") == []
    with pytest.raises(net.NetError, match="over the limit"):
        net.get(f"{base}/big", max_bytes=1000)


def test_short_body_is_refused(server, cache: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, routes = server
    routes["/short"] = lambda h: h.answer("application/octet-stream", b"a" * 50, length=100)
    with pytest.raises(net.NetError, match="closed after 50 of 100 bytes"):
        net.download(f"{base}/short", tmp_path / "dl" / "s", sha256=None)
    assert files_in(tmp_path / "dl") == []


def test_corrupt_gzip_with_a_pinned_hash_is_not_cached(server, cache: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, routes = server
    bad = bytearray(SDIST)
    bad[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    sha = hashlib.sha256(bad).hexdigest()
    routes["/simple/tinypkg/"] = lambda h: h.answer(*_json(
        {"files": [{"filename": "tinypkg-1.0.tar.gz", "url": "../../f/tinypkg-1.0.tar.gz", "hashes": {"sha256": sha}}]}))
    routes["/f/tinypkg-1.0.tar.gz"] = lambda h: h.answer("application/gzip", bytes(bad))
    with pytest.raises(SourceError) as ei:
        fetch_sdist("tinypkg==1.0", sha, index=f"{base}/simple")
    assert "corrupt archive" in ei.value.message and "CRC" in ei.value.message
    assert ei.value.file == f"{base}/f/tinypkg-1.0.tar.gz"
    assert [p for p in files_in(cache / "sdists") if "/" in p] == []


def test_good_download_and_progress_off_without_a_tty(server, cache: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    base, routes = server
    routes["/f/x.tar.gz"] = lambda h: h.answer("application/gzip", SDIST)
    dest = tmp_path / "dl" / "x.tar.gz"
    net.download(f"{base}/f/x.tar.gz", dest, sha256=SDIST_SHA)
    assert dest.read_bytes() == SDIST
    assert files_in(tmp_path / "dl") == ["x.tar.gz"]
    assert capsys.readouterr().err == ""  # stderr is not a terminal here


def test_progress_on_a_terminal_shows_size_and_rate(server, cache: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    base, routes = server
    routes["/f/x.tar.gz"] = lambda h: h.answer("application/gzip", SDIST)
    master, slave = os.openpty()
    tty = os.fdopen(slave, "w")
    monkeypatch.setattr("sys.stderr", tty)
    try:
        net.download(f"{base}/f/x.tar.gz", tmp_path / "x.tar.gz", sha256=SDIST_SHA, label="x.tar.gz")
        tty.flush()
        out = os.read(master, 65536).decode(errors="replace")
    finally:
        tty.close()
        os.close(master)
    assert "downloaded x.tar.gz: 0.0 MiB in" in out


def test_bad_timeout_setting_is_bad_input(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_NET_TIMEOUT", "soon")
    with pytest.raises(SourceError, match="STACKBUILD_NET_TIMEOUT='soon' is not a number"):
        net.get("http://127.0.0.1:9/x")


def test_lock_probe_goes_through_the_door_and_its_deadline(server) -> None:  # type: ignore[no-untyped-def]
    from stackbuild.lock.backends import probe

    base, routes = server
    routes["/slow"] = drip_headers
    routes["/there"] = lambda h: h.answer("text/html", b"")
    t0 = time.monotonic()
    assert probe(f"{base}/slow", timeout=1.0) == "no complete answer within the overall deadline of 1 s"
    assert time.monotonic() - t0 < 4
    assert probe(f"{base}/there", timeout=1.0) is None
    assert probe(f"{base}/missing", timeout=1.0) is None  # an index host that answers at all
    assert probe(f"{base}/missing", timeout=1.0, artifact=True) == "HTTP 404 (no such file)"
    assert probe("http://127.0.0.1:9/x", timeout=1.0) == "Connection refused"


def stall(h: Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "100")
    h.end_headers()
    h.wfile.write(b"s" * 10)
    h.wfile.flush()
    time.sleep(3)


def to_ftp(h: Handler) -> None:
    h.send_response(302)
    h.send_header("Location", "ftp://127.0.0.1:9/x.tar.gz")
    h.send_header("Content-Length", "0")
    h.end_headers()


def test_stalled_download_and_ftp_redirect(server, cache: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    base, routes = server
    routes["/stall"], routes["/ftp"] = stall, to_ftp
    monkeypatch.setenv("STACKBUILD_NET_TIMEOUT", "1")
    with pytest.raises(net.NetError, match="no data for 1 s after 10 bytes"):
        net.download(f"{base}/stall", tmp_path / "dl" / "s", sha256=None)
    with pytest.raises(net.NetError, match="refusing a redirect to ftp://"):
        net.download(f"{base}/ftp", tmp_path / "dl" / "f", sha256=None)
    assert files_in(tmp_path / "dl") == []
