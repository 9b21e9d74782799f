"""Resolver backends (pip-tools, uv) run as subprocesses in a clean environment, and
the reachability probes that make an unreachable index fail fast.

The machine's pip configuration (extra indexes, find-links, a global constraints
file) never reaches the resolver: `PIP_CONFIG_FILE=/dev/null` and no `PIP_*`/`UV_*`
variables that change what is resolved. Only the indexes the caller names are used.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from stackbuild.lock.errors import IndexUnreachable, LockError, ResolutionFailed, ResolverMissing

RESOLVERS = ("pip-tools", "uv")
DEFAULT_INDEX = "https://pypi.org/simple"
PROBE_TIMEOUT_S = 5.0

# Kept for the resolver: where to find certificates, proxies, caches. Everything else
# named PIP_* or UV_* (index URLs, find-links, constraints, config files) is dropped.
_KEEP_ENV = {
    "PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_CACHE_DIR", "PIP_DEFAULT_TIMEOUT",
    "UV_CACHE_DIR", "UV_NATIVE_TLS", "UV_HTTP_TIMEOUT",
}


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for k in list(env):
        if (k.startswith("PIP_") or k.startswith("UV_")) and k not in _KEEP_ENV:
            del env[k]
    env["PIP_CONFIG_FILE"] = os.devnull  # no global/user/site pip.conf, no constraint= from it
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["UV_NO_CONFIG"] = "1"
    if "PIP_CERT" in env and "SSL_CERT_FILE" not in env:
        env["SSL_CERT_FILE"] = env["PIP_CERT"]
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def is_local(url: str) -> bool:
    return url.startswith("file:") or "://" not in url


def local_path(url: str) -> Path:
    if url.startswith("file:"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    return Path(url)


def probe(url: str, timeout: float = PROBE_TIMEOUT_S, *, artifact: bool = False) -> str | None:
    """None when `url` answers; else why not. For an index any HTTP answer counts (a 404
    on the index root still means the host serves); for an artifact it must exist."""
    if is_local(url):
        p = local_path(url)
        ok = p.is_file() if artifact else p.exists()
        return None if ok else f"{p} does not exist"
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https"):
        return f"unsupported URL scheme {scheme!r}"
    from stackbuild.net import NetError, head

    try:
        head(url, timeout=timeout)
        return None
    except NetError as e:
        if e.status is not None:  # the host answered
            return f"HTTP {e.status} (no such file)" if artifact and e.status in (404, 410) else None
        return e.message.removeprefix("unreachable: ")


def probe_all(urls: list[tuple[str, bool]], timeout: float = PROBE_TIMEOUT_S) -> dict[str, str | None]:
    """Probe (url, is_artifact) pairs in parallel; url -> None or the reason it failed."""
    if not urls:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as ex:
        results = list(ex.map(lambda u: probe(u[0], timeout, artifact=u[1]), urls))
    return {u: r for (u, _), r in zip(urls, results, strict=True)}


@dataclass(frozen=True)
class ResolveRequest:
    inputs: tuple[Path, ...]  # requirement files (in a temp dir)
    output: Path
    index_url: str | None  # None: --no-index
    extra_index_urls: tuple[str, ...]
    find_links: tuple[str, ...]
    overrides: Path | None  # uv only: pins that replace declarations anywhere in the graph
    offline: bool


@dataclass(frozen=True)
class ResolveRun:
    ok: bool
    output: str  # the resolver's lockfile text when ok
    stderr: str
    argv: tuple[str, ...]
    version: str


def pip_tools_version() -> str:
    try:
        from importlib.metadata import version

        return version("pip-tools")
    except Exception:  # noqa: BLE001 - not installed is reported when it runs
        return "?"


def find_uv() -> str:
    """The uv installed beside stackbuild (the `uv` package) first, then one on PATH."""
    try:
        import uv

        return str(uv.find_uv_bin())
    except Exception:  # noqa: BLE001 - not installed as a package: try PATH
        pass
    exe = shutil.which("uv")
    if exe:
        return exe
    raise ResolverMissing(
        "the uv resolver is not installed: `pip install uv` (or see https://docs.astral.sh/uv/), "
        "or use --resolver pip-tools", key="--resolver")


def uv_version(exe: str) -> str:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.split()[1] if len(out.split()) > 1 else out.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def resolve_timeout() -> float:
    """Seconds one resolver run may take in all (`STACKBUILD_RESOLVE_TIMEOUT`, default
    1800: pip-compile with hashes takes 50-70 s for transformers here)."""
    raw = os.environ.get("STACKBUILD_RESOLVE_TIMEOUT", "")
    try:
        value = float(raw) if raw else 1800.0
    except ValueError:
        value = -1.0
    if value <= 0:
        raise LockError(f"STACKBUILD_RESOLVE_TIMEOUT={raw!r} must be a positive number of seconds",
                        key="STACKBUILD_RESOLVE_TIMEOUT")
    return value


def _run_bounded(argv: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run the resolver in its own process group, so that a timeout or Ctrl-C ends it
    and everything it started (pip's build subprocesses), not only the first process."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def run_resolver(resolver: str, req: ResolveRequest, timeout_s: float | None = None) -> ResolveRun:
    """Run `resolver` on `req` within `timeout_s` seconds in all (default
    `resolve_timeout()`); each of its network reads is limited by STACKBUILD_NET_TIMEOUT."""
    from stackbuild.net import request_timeout

    timeout_s = timeout_s if timeout_s is not None else resolve_timeout()
    read_s = request_timeout()
    env = clean_env()
    # The resolver's own temp files live in the lock's temp dir, so they go with it
    # even when the resolver is killed.
    own_tmp = req.output.parent / "tmp"
    own_tmp.mkdir(exist_ok=True)
    env.update(TMPDIR=str(own_tmp), TEMP=str(own_tmp), TMP=str(own_tmp))
    if resolver == "pip-tools":
        argv = [sys.executable, "-m", "piptools", "compile", "--no-header", "--generate-hashes",
                "--allow-unsafe", "--strip-extras", "--no-emit-index-url", "--no-emit-find-links",
                "--no-emit-trusted-host", "--output-file", str(req.output)]
        # Retries belong to the probes; a dead mirror must not cost pip's 16 s of retries.
        argv += ["--pip-args", f"--retries 1 --timeout {read_s:g}"]
        version = pip_tools_version()
    elif resolver == "uv":
        exe = find_uv()
        argv = [exe, "pip", "compile", "--no-config", "--no-header", "--generate-hashes",
                "--python", sys.executable, "--output-file", str(req.output)]
        if req.offline:
            argv.append("--offline")
        if req.overrides is not None:
            argv += ["--overrides", str(req.overrides)]
        version = uv_version(exe)
        env.setdefault("UV_HTTP_TIMEOUT", f"{max(1, round(read_s))}")
    else:
        raise ResolverMissing(f"unknown resolver {resolver!r} (one of: {', '.join(RESOLVERS)})",
                              key="--resolver")
    if req.index_url is None:
        argv.append("--no-index")
    else:
        argv += ["--index-url", req.index_url]
    for u in req.extra_index_urls:
        argv += ["--extra-index-url", u]
    for f in req.find_links:
        argv += ["--find-links", f]
    argv += [str(p) for p in req.inputs]
    try:
        proc = _run_bounded(argv, env, req.output.parent, timeout_s)
    except FileNotFoundError as e:
        raise ResolverMissing(f"cannot run {resolver}: {e.strerror}", key="--resolver") from None
    except subprocess.TimeoutExpired:
        indexes = ([req.index_url] if req.index_url else ["no index"]) + list(req.extra_index_urls)
        raise ResolutionFailed(
            f"{resolver} did not finish within {timeout_s:g} s resolving against {', '.join(indexes)} "
            "(stopped; STACKBUILD_RESOLVE_TIMEOUT sets the limit)") from None
    if proc.returncode == 0 and req.output.exists():
        return ResolveRun(True, req.output.read_text(encoding="utf-8"), proc.stderr, tuple(argv), version)
    if resolver == "pip-tools" and "No module named piptools" in proc.stderr:
        raise ResolverMissing("pip-tools is not installed: `pip install pip-tools`", key="--resolver")
    out = proc.stderr + proc.stdout
    if _TIMEOUT_RE.search(out):
        raise IndexUnreachable(f"{resolver}: an index did not answer within {read_s:g} s "
                               f"(STACKBUILD_NET_TIMEOUT): {failure_summary(out, {})}; nothing was written",
                               key="STACKBUILD_NET_TIMEOUT")
    return ResolveRun(False, "", out, tuple(argv), version)


_TIMEOUT_RE = re.compile(r"timed out|timeout|ReadTimeoutError", re.IGNORECASE)


_NOT_FOUND_PATTERNS = (
    re.compile(r"Could not find a version that satisfies the requirement ([A-Za-z0-9._-]+)"),
    re.compile(r"No matching distribution found for ([A-Za-z0-9._-]+)"),
    re.compile(r"Because ([A-Za-z0-9._-]+) was not found in the (?:cache|package registry)"),
    re.compile(r"([A-Za-z0-9._-]+) was not found in the (?:cache|package registry)"),
    re.compile(r"you require ([A-Za-z0-9._-]+)"),  # uv names a top-level requirement this way
)


def unavailable_requirements(stderr: str) -> list[str]:
    """Names the resolver could not satisfy (empty: another failure), first-named first."""
    found: list[str] = []
    for pat in _NOT_FOUND_PATTERNS:
        for m in pat.finditer(stderr):
            if m.group(1) not in found:
                found.append(m.group(1))
    return found


def failure_summary(stderr: str, replacements: dict[str, str]) -> str:
    """One line: the resolver's own words for why it failed, temp paths replaced."""
    keep: list[str] = []
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if ln.startswith("pip._") or "for help visit" in low:
            continue  # the traceback's last words repeat what ERROR: said
        if ln.startswith(("ERROR:", "error:", "Could not find", "Tried:", "Skipped", "cause:",
                          "hint:", "╰─▶", "Because", "And because", "Cannot install", "The conflict")) \
                or "conflict" in low or "no matching distribution" in low:
            keep.append(ln.removeprefix("ERROR: ").removeprefix("╰─▶ "))
    if not keep:
        keep = lines[-1:] or ["no output"]
    msg = "; ".join(dict.fromkeys(keep))
    for old, new in replacements.items():
        msg = msg.replace(old, new)
    return msg if len(msg) <= 600 else msg[:597] + "..."
