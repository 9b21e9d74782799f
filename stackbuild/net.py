"""The one network door: every HTTP(S) GET stackbuild makes (index pages, sdists,
wheels) goes through `get` (a small document, in memory) or `download` (streamed to a
temporary file beside its destination, hash-checked, renamed into place).

Guards that live here, so no caller can forget one:
- an overall deadline per request, enforced by a watchdog that shuts the socket down,
  so a server that drips one byte every few seconds (headers or body) cannot hold a
  run; the per-operation socket timeout alone never trips on a drip;
- a maximum size, checked against Content-Length first and against the bytes read;
- the sha256 of a download, checked before the file gets its final name;
- progress with size, rate and ETA on stderr when stderr is a terminal;
- one error type, `NetError`, naming the URL and the cause.

`file://` URLs are read through the same door (local indexes in tests and mirrors).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from stackbuild.cache import atomic_file
from stackbuild.errors import SourceError

USER_AGENT = "stackbuild"
CHUNK = 1 << 16
MiB = 1 << 20


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SourceError(f"{name}={raw!r} is not a number of seconds", key=name) from None
    if value <= 0:
        raise SourceError(f"{name}={raw!r} must be positive", key=name)
    return value


def request_timeout() -> float:
    """Seconds an index request may take from connect to its last byte
    (`STACKBUILD_NET_TIMEOUT`, default 30); also the limit on each socket operation."""
    return _env_float("STACKBUILD_NET_TIMEOUT", 30.0)


def download_timeout() -> float:
    """Seconds one download may take in all (`STACKBUILD_DOWNLOAD_TIMEOUT`, default
    1800: a 150 MB kernel wheel at 100 kB/s)."""
    return _env_float("STACKBUILD_DOWNLOAD_TIMEOUT", 1800.0)


def download_max_bytes() -> int:
    """Largest download accepted (`STACKBUILD_DOWNLOAD_MAX_MB`, default 2048)."""
    return int(_env_float("STACKBUILD_DOWNLOAD_MAX_MB", 2048.0) * MiB)


DOCUMENT_MAX_BYTES = 64 * MiB  # an index page; PyPI's largest JSON pages are a few MB


class NetError(SourceError):
    """A request failed: unreachable host, HTTP error status, deadline passed, body too
    large, hash mismatch. `file` is the URL; `status` the HTTP status when there was one."""

    def __init__(self, url: str, cause: str, *, status: int | None = None) -> None:
        self.url = url
        self.status = status
        super().__init__(cause, file=url)


@dataclass(frozen=True)
class Response:
    url: str  # after redirects
    body: bytes
    content_type: str


class _Deadline:
    """Shuts down every socket of one request when its time is up. A blocked read then
    returns at once, whatever the server is (slowly) sending."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.op_timeout = seconds  # the limit on each socket operation
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()

    def watch(self, sock: socket.socket) -> None:
        # a duplicate of the descriptor: shutdown acts on the connection, and the copy
        # outlives the TLS wrapper detaching the original object
        dup = sock.dup()
        with self._lock:
            self._socks.append(dup)
            if self.expired:
                self._shutdown(dup)

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                self._shutdown(s)

    @staticmethod
    def _shutdown(s: socket.socket) -> None:
        with suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib (proxies from the environment, redirects, TLS as usual) whose connections
    register their socket with the deadline as soon as it exists."""

    def watched(create: Callable[..., socket.socket]) -> Callable[..., socket.socket]:
        def create_connection(*a: Any, **kw: Any) -> socket.socket:
            sock = create(*a, **kw)
            deadline.watch(sock)
            return sock
        return create_connection

    class HTTPConn(http.client.HTTPConnection):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self._create_connection = watched(self._create_connection)  # type: ignore[has-type]

    class HTTPSConn(http.client.HTTPSConnection):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self._create_connection = watched(self._create_connection)  # type: ignore[has-type]

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(HTTPConn, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(HTTPSConn, req, context=self._context)  # type: ignore[attr-defined]

    class NoFTP(urllib.request.FTPHandler):
        # urllib follows redirects to ftp://, where this door's guards do not reach
        def ftp_open(self, req: urllib.request.Request) -> Any:
            raise urllib.error.URLError("refusing a redirect to ftp://")

    return urllib.request.build_opener(HTTPHandler(), HTTPSHandler(), NoFTP())


class _Source:
    """An open response: `read1` returns what one receive brought (never waits to fill
    a buffer, so the deadline is checked between small reads)."""

    def __init__(self, stream: Any, length: int | None, content_type: str, url: str, status: int = 200) -> None:
        self.stream = stream
        self.length = length
        self.content_type = content_type
        self.url = url
        self.status = status

    def read1(self) -> bytes:
        return bytes(self.stream.read1(CHUNK))


@contextmanager
def _open(url: str, accept: str | None, timeout: float, method: str = "GET") -> Iterator[tuple[_Source, _Deadline]]:
    scheme = urllib.parse.urlparse(url).scheme
    if scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise NetError(url, f"cannot read: {e.strerror or e}") from None
        with _Deadline(timeout) as d, f:
            size = os.fstat(f.fileno()).st_size
            ctype = "application/json" if path.suffix == ".json" else "text/html"
            yield _Source(f, size, ctype, url), d
        return
    if scheme not in ("http", "https"):
        raise NetError(url, f"unsupported URL scheme {scheme!r} (http, https or file)")
    headers = {"User-Agent": USER_AGENT}
    if accept:
        headers["Accept"] = accept
    req = urllib.request.Request(url, headers=headers, method=method)
    with _Deadline(timeout) as d:
        d.op_timeout = min(timeout, request_timeout())
        try:
            r = _opener(d).open(req, timeout=d.op_timeout)
        except urllib.error.HTTPError as e:
            e.close()
            raise NetError(url, f"HTTP {e.code} {e.reason}", status=e.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise NetError(url, _why(e, d)) from None
        with r:
            length = r.headers.get("Content-Length")
            n = int(length) if length and length.isdigit() else None
            yield _Source(r, n, r.headers.get("Content-Type", ""), r.geturl(), r.status), d


def _why(e: BaseException, d: _Deadline) -> str:
    if d.expired:
        return f"no complete answer within the overall deadline of {d.seconds:g} s"
    reason: Any = getattr(e, "reason", e)
    if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason):
        return f"no answer within {d.op_timeout:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return f"unreachable: {reason.strerror}"
    return f"unreachable: {reason}" if isinstance(e, urllib.error.URLError) else f"{type(e).__name__}: {e}"


def _stream(url: str, src: _Source, d: _Deadline, max_bytes: int, sink: Callable[[bytes], None],
            advance: Callable[[int], None] | None = None) -> int:
    if src.length is not None and src.length > max_bytes:
        raise NetError(url, f"answer of {src.length:,} bytes is over the limit of {max_bytes:,} bytes")
    got = 0
    while True:
        if d.expired:
            raise NetError(url, _why(TimeoutError(), d))
        try:
            chunk = src.read1()
        except (OSError, http.client.HTTPException, ValueError) as e:
            if d.expired:
                raise NetError(url, _why(e, d)) from None
            if isinstance(e, TimeoutError):
                raise NetError(url, f"no data for {d.op_timeout:g} s after {got:,} bytes") from None
            raise NetError(url, f"connection broke after {got:,} bytes: {e}") from None
        if not chunk:
            break
        got += len(chunk)
        if got > max_bytes:
            raise NetError(url, f"answer is over the limit of {max_bytes:,} bytes")
        sink(chunk)
        if advance:
            advance(len(chunk))
    if d.expired:  # the watchdog's shutdown reads as an end of file
        raise NetError(url, _why(TimeoutError(), d))
    if src.length is not None and got != src.length:
        raise NetError(url, f"connection closed after {got:,} of {src.length:,} bytes")
    return got


def get(url: str, *, accept: str | None = None, timeout: float | None = None,
        max_bytes: int = DOCUMENT_MAX_BYTES) -> Response:
    """A small document (an index page) in memory, within `timeout` seconds overall."""
    timeout = timeout if timeout is not None else request_timeout()
    parts: list[bytes] = []
    with _open(url, accept, timeout) as (src, d):
        _stream(url, src, d, max_bytes, parts.append)
        return Response(src.url, b"".join(parts), src.content_type)


def head(url: str, *, timeout: float) -> int:
    """The HTTP status of a HEAD request (an error status raises NetError with `status`)."""
    with _open(url, None, timeout, method="HEAD") as (src, _):
        return src.status


def download(url: str, dest: Path, *, sha256: str | None, timeout: float | None = None,
             max_bytes: int | None = None, check: Callable[[BinaryIO], None] | None = None,
             label: str | None = None) -> None:
    """Stream `url` to `dest`. The bytes go to a temporary file beside `dest`; it gets
    its final name only when the download is whole, within `timeout` seconds overall,
    at most `max_bytes`, matches `sha256` (when given) and passes `check` (called with
    a reader of the downloaded bytes). On any failure nothing is left behind."""
    timeout = timeout if timeout is not None else download_timeout()
    max_bytes = max_bytes if max_bytes is not None else download_max_bytes()
    h = hashlib.sha256()
    try:
        with atomic_file(dest) as out, _open(url, None, timeout) as (src, d), \
                _progress(label or Path(urllib.parse.urlparse(url).path).name, src.length) as advance:
            def sink(chunk: bytes) -> None:
                h.update(chunk)
                out.write(chunk)
            _stream(url, src, d, max_bytes, sink, advance)
            if sha256 is not None and h.hexdigest() != sha256:
                raise NetError(url, f"sha256 mismatch: expected {sha256}, the download has {h.hexdigest()}")
            if check is not None:
                out.flush()
                check(io.BufferedReader(_PreadFile(out.fileno()), CHUNK))
    except OSError as e:  # writing the temporary file: disk full, permissions
        raise NetError(url, f"cannot write {dest}: {e.strerror or e}") from None


@contextmanager
def _progress(what: str, total: int | None) -> Iterator[Callable[[int], None] | None]:
    """A progress bar (size, rate, ETA) on stderr while it is a terminal; else nothing."""
    if not _stderr_is_tty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        started = time.monotonic()
        yield lambda n: bar.advance(task, n)
        done = bar.tasks[0].completed
    elapsed = max(time.monotonic() - started, 1e-6)
    print(f"downloaded {what}: {done / MiB:.1f} MiB in {elapsed:.1f} s", file=sys.stderr)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _PreadFile(io.RawIOBase):
    """Reads a file being written through its descriptor with pread, leaving the
    writer's position alone."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
        elif whence == io.SEEK_CUR:
            self.pos += offset
        else:
            self.pos = os.fstat(self.fd).st_size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        data = os.pread(self.fd, len(b), self.pos)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)
