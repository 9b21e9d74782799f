"""Whole lockfiles: the complete path through an index map (a local PEP 503 index of
tiny real wheels named torch 2.10.0+xpu, triton-xpu 3.6.0 and vllm-xpu-kernels stands
in for the PyTorch XPU index and the GitHub release), the content seal that catches
hand edits, incomplete locks that `--check` and `install-script` refuse with the same
message, no silent downgrade of a lockfile, resolver deadlines, and temp dirs."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lock.tinyindex import build_index, build_wheel, sha256
from test_lock import COMMON, GAMMA_OVERRIDE, Universe, make_recipe, make_tree

from stackbuild.errors import StackbuildError
from stackbuild.installer import render_install_script
from stackbuild.lock import IndexUnreachable, LockError, check_lock, lock
from stackbuild.lock.indexmap import IndexMap
from stackbuild.lock.lockfile import incomplete_message, read_header

XPU = "https://download.pytorch.org/whl/xpu"
RELEASE = "https://github.com/vllm-project/vllm-xpu-kernels/releases/download/v0.1.5"
KERNEL_WHEEL = "vllm_xpu_kernels-0.1.5-py3-none-any.whl"


@pytest.fixture(scope="module")
def universe(tmp_path_factory: pytest.TempPathFactory) -> Universe:
    return Universe(tmp_path_factory.mktemp("indexes"))


class Mirrors:
    """Local stand-ins for the PyTorch XPU index and the kernels' GitHub release."""

    def __init__(self, root: Path):
        self.xpu_root = root / "xpu"
        self.xpu = build_index(self.xpu_root, {
            ("torch", "2.10.0+xpu"): ("sbt-beta>=1",),
            ("torch", "2.9.0+xpu"): (),
            ("triton-xpu", "3.6.0"): (),
        })
        self.release = root / "release"
        self.kernels = build_wheel(self.release, "vllm-xpu-kernels", "0.1.5", ("torch",))
        self.map = IndexMap.parse([f"{XPU}={self.xpu}", f"{RELEASE}={self.release}"], env="")

    def xpu_wheel(self, name: str, version: str) -> Path:
        return next((self.xpu_root / "files").glob(f"{name.replace('-', '_')}-{version}-*.whl"))


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory: pytest.TempPathFactory) -> Mirrors:
    return Mirrors(tmp_path_factory.mktemp("mirrors"))


def _pins(m: Mirrors) -> str:
    return (GAMMA_OVERRIDE
            + f'torch = {{ version = "==2.10.0+xpu", index = "{XPU}" }}\n'
            + f'triton-xpu = {{ version = "==3.6.0", index = "{XPU}" }}\n'
            + f'vllm-xpu-kernels = {{ url = "{RELEASE}/{KERNEL_WHEEL}", sha256 = "{sha256(m.kernels)}" }}\n')


@pytest.fixture()
def whole(tmp_path: Path, universe: Universe, mirrors: Mirrors) -> tuple[object, Path]:
    tree = make_tree(tmp_path, COMMON)
    recipe = make_recipe(tmp_path, _pins(mirrors), target="xpu")
    out = tmp_path / "lockfiles" / "tiny.txt"
    out.parent.mkdir()
    lock(recipe, requirements_from=tree, output=out, index_url=universe.main, index_map=mirrors.map)
    return recipe, out


# ---------------------------------------------------------------- the complete path


@pytest.mark.parametrize("resolver", ["pip-tools", "uv"])
def test_a_complete_lock_through_an_index_map_keeps_the_real_urls(
        tmp_path: Path, universe: Universe, mirrors: Mirrors, resolver: str) -> None:
    tree = make_tree(tmp_path, COMMON)
    recipe = make_recipe(tmp_path, _pins(mirrors), target="xpu")
    out = tmp_path / "l.txt"
    result = lock(recipe, requirements_from=tree, output=out, index_url=universe.main, index_map=mirrors.map,
                  resolver=resolver)
    assert result.unresolved == ()
    by = {p.name: p for p in result.packages}
    assert by["torch"].version == "2.10.0+xpu"
    assert by["torch"].hashes == (sha256(mirrors.xpu_wheel("torch", "2.10.0+xpu")),)
    assert by["triton-xpu"].version == "3.6.0"
    assert by["vllm-xpu-kernels"].requirement == f"vllm-xpu-kernels @ {RELEASE}/{KERNEL_WHEEL}"
    assert by["vllm-xpu-kernels"].hashes == (sha256(mirrors.kernels),)
    assert {"sbt-alpha", "sbt-beta", "sbt-delta", "sbt-gamma"} <= set(by)  # the source's requirements too
    text = out.read_text()
    assert "# complete: yes: every pin and every requirement is in this file, with hashes" in text
    assert f"# extra index: {XPU} (pins.torch.index)" in text
    assert f"# index map: {XPU} was read from a local mirror" in text
    assert str(mirrors.release) not in text and "xpu/simple" not in text and "file://" not in text, text
    every = [ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))]
    assert len(every) == len(result.packages)  # each package line is followed by its hashes
    assert text.count("--hash=sha256:") >= len(result.packages)
    header = read_header(out)
    assert header.complete and not header.edited and incomplete_message(header) is None
    check = check_lock(recipe, out)
    assert check.exit_code == 0, check.tables()[0].render()


# ---------------------------------------------------------------- the seal catches hand edits


@pytest.mark.parametrize(("what", "edit"), [
    ("changed version", lambda t: t.replace("sbt-alpha==1.0", "sbt-alpha==1.1", 1)),
    ("zeroed hash", lambda t: t.replace("--hash=sha256:" + t.split("--hash=sha256:")[1][:64],
                                        "--hash=sha256:" + "0" * 64, 1)),
    ("appended package", lambda t: t + "evil==6.6.6 \\\n    --hash=sha256:" + "1" * 64 + "\n"),
    ("dropped package", lambda t: t.replace("sbt-delta==1.0", "sbt-delta>=0", 1)),
])
def test_check_catches_a_hand_edit_of_the_body(whole: tuple[object, Path], what: str, edit: object) -> None:
    recipe, out = whole
    before = out.read_text()
    out.write_text(edit(before))  # type: ignore[operator]
    assert out.read_text() != before
    result = check_lock(recipe, out)  # type: ignore[arg-type]
    assert result.exit_code == 1, what
    [change] = result.changes
    assert (change.kind, change.change) == ("lockfile", "changed")
    assert "does not match its content sha256 (edited by hand?)" in change.detail


def test_install_script_refuses_a_hand_edited_lockfile(whole: tuple[object, Path], tmp_path: Path) -> None:
    recipe, out = whole
    out.write_text(out.read_text().replace("sbt-alpha==1.0", "sbt-alpha==1.1", 1))
    vllm = build_wheel(tmp_path / "w", "vllm", "0.19.0")
    with pytest.raises(StackbuildError) as e:
        render_install_script(recipe, out, [vllm])  # type: ignore[arg-type]
    assert e.value.exit_code == 2 and "edited by hand" in e.value.render()


# ---------------------------------------------------------------- incomplete locks


def test_an_incomplete_lock_fails_check_and_install_script_with_one_message(
        tmp_path: Path, universe: Universe, mirrors: Mirrors) -> None:
    tree = make_tree(tmp_path, COMMON)
    recipe = make_recipe(tmp_path, _pins(mirrors), target="xpu")
    out = tmp_path / "l.txt"
    result = lock(recipe, requirements_from=tree, output=out, index_url=universe.main, offline=True,
                  index_map=IndexMap())
    assert {u.name for u in result.unresolved} == {"torch", "triton-xpu", "vllm-xpu-kernels"}
    want = ("incomplete lockfile: 3 requirement(s) not resolved in it (torch, triton-xpu, vllm-xpu-kernels); "
            f"complete it on a host that reaches {XPU}, {RELEASE}/{KERNEL_WHEEL} with: stackbuild lock tiny")
    text = out.read_text()
    assert f"# complete: NO: {want}" in text
    check = check_lock(recipe, out)
    assert check.exit_code == 1
    assert [(c.kind, c.change, c.detail) for c in check.changes] == [("lockfile", "incomplete", want)]
    assert want in check.tables()[0].summary
    vllm = build_wheel(tmp_path / "w", "vllm", "0.19.0")
    with pytest.raises(StackbuildError) as e:
        render_install_script(recipe, out, [vllm])
    assert e.value.exit_code == 2
    assert e.value.render() == f"{out}: {want}"


def test_cli_check_exits_1_on_an_incomplete_lock(tmp_path: Path, universe: Universe, mirrors: Mirrors) -> None:
    recipe = make_recipe(tmp_path, _pins(mirrors), target="xpu")
    out = tmp_path / "lockfiles" / "tiny.txt"
    out.parent.mkdir()
    lock(recipe, requirements_from=None, output=out, index_url=universe.main, offline=True, index_map=IndexMap())
    exe = Path(sys.executable).parent / "stackbuild"
    proc = subprocess.run([str(exe), "lock", str(recipe.path), "--check", "--json"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["exit_code"] == 1 and not report["up_to_date"]
    [change] = report["changes"]
    assert change["change"] == "incomplete" and change["detail"].startswith("incomplete lockfile: 3 requirement(s)")
    assert f"host that reaches {XPU}" in change["detail"]


# ---------------------------------------------------------------- no silent downgrade


def test_a_less_complete_lock_never_replaces_a_whole_one_without_force(
        whole: tuple[object, Path], universe: Universe) -> None:
    recipe, out = whole
    before = out.read_bytes()
    # the case: the header's command run where the XPU index and GitHub are unreachable
    with pytest.raises(LockError) as e:
        lock(recipe, requirements_from=None, output=out, index_url=universe.main, offline=True,  # type: ignore[arg-type]
             index_map=IndexMap())
    msg = e.value.render()
    assert "refusing to replace it with a less complete lockfile" in msg
    assert "torch" in msg and "--force" in msg
    assert out.read_bytes() == before
    forced = lock(recipe, requirements_from=None, output=out, index_url=universe.main, offline=True,  # type: ignore[arg-type]
                  index_map=IndexMap(), force=True)
    assert forced.unresolved and read_header(out).unresolved


def test_a_complete_lock_replaces_an_incomplete_one(tmp_path: Path, universe: Universe, mirrors: Mirrors) -> None:
    tree = make_tree(tmp_path, COMMON)
    recipe = make_recipe(tmp_path, _pins(mirrors), target="xpu")
    out = tmp_path / "l.txt"
    lock(recipe, requirements_from=tree, output=out, index_url=universe.main, offline=True, index_map=IndexMap())
    assert not read_header(out).complete
    lock(recipe, requirements_from=tree, output=out, index_url=universe.main, index_map=mirrors.map)
    assert read_header(out).complete


# ---------------------------------------------------------------- index map parsing


def test_index_map_refuses_malformed_entries() -> None:
    for bad in ("no-equals", "=/x", "https://a=", "relative=/x"):
        with pytest.raises(LockError, match="expected REAL=LOCAL"):
            IndexMap.parse([bad], env="")
    m = IndexMap.parse([], env=f"{XPU}=/srv/xpu https://github.com/o=/srv/gh")
    assert m.local(f"{XPU}/torch/") == "file:///srv/xpu/torch/"
    assert m.local("https://download.pytorch.org/whl/xpu2") == "https://download.pytorch.org/whl/xpu2"
    assert m.real("file:///srv/gh/r/x.whl") == "https://github.com/o/r/x.whl"


# ---------------------------------------------------------------- deadlines and temp dirs


class _Hang(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 - the probe gets its answer at once
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - the resolver's request never does
        time.sleep(20)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture()
def hanging_index() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hang)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/simple"
    srv.shutdown()


@pytest.mark.parametrize("resolver", ["pip-tools", "uv"])
def test_an_index_that_never_answers_is_one_clear_error(
        tmp_path: Path, hanging_index: str, monkeypatch: pytest.MonkeyPatch, resolver: str) -> None:
    monkeypatch.setenv("STACKBUILD_NET_TIMEOUT", "1")
    monkeypatch.setenv("STACKBUILD_RESOLVE_TIMEOUT", "15")
    recipe = make_recipe(tmp_path, 'sbt-alpha = "==1.0"\n')
    out = tmp_path / "l.txt"
    started = time.monotonic()
    with pytest.raises(LockError) as e:
        lock(recipe, requirements_from=None, output=out, index_url=hanging_index, resolver=resolver)
    assert time.monotonic() - started < 20
    msg = e.value.render()
    # the per-request limit trips first: one IndexUnreachable naming it (the whole-run
    # deadline, STACKBUILD_RESOLVE_TIMEOUT, is the backstop)
    assert isinstance(e.value, IndexUnreachable), msg
    assert "STACKBUILD_NET_TIMEOUT" in msg and "\n" not in msg
    assert "nothing was written" in msg and not out.exists()


def test_temp_dirs_are_removed_on_success_failure_and_after_a_kill(
        tmp_path: Path, universe: Universe, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp / f"stackbuild-lock-{dead.pid}-abc"  # left by a run that was killed
    stale.mkdir()
    (stale / "recipe-pins.in").write_text("x\n")
    live = tmp / f"stackbuild-lock-{os.getppid()}-def"  # a run still going: left alone
    live.mkdir()
    recipe = make_recipe(tmp_path, 'sbt-alpha = "==1.0"\n')
    lock(recipe, requirements_from=None, output=tmp_path / "l.txt", index_url=universe.main)
    assert sorted(p.name for p in tmp.iterdir()) == [live.name]
    with pytest.raises(LockError):
        lock(make_recipe(tmp_path, 'sbt-alpha = "==9.0"\n'), requirements_from=None,
             output=tmp_path / "l.txt", index_url=universe.main)
    assert sorted(p.name for p in tmp.iterdir()) == [live.name]


# ---------------------------------------------------------------- --partial


def test_partial_locks_what_the_reachable_indexes_give_and_names_the_rest(
        tmp_path: Path, universe: Universe, mirrors: Mirrors) -> None:
    """This machine's case: the package index answers, the XPU index and GitHub do not."""
    from test_lock import DEAD_INDEX

    tree = make_tree(tmp_path, COMMON + "sbt-vision\n")
    pins = _pins(mirrors).replace(XPU, DEAD_INDEX).replace(RELEASE, "http://127.0.0.1:9/rel")
    recipe = make_recipe(tmp_path, pins, target="xpu")
    out = tmp_path / "l.txt"
    with pytest.raises(IndexUnreachable, match="use --partial"):
        lock(recipe, requirements_from=tree, output=out, index_url=universe.main, index_map=IndexMap())
    assert not out.exists()
    result = lock(recipe, requirements_from=tree, output=out, index_url=universe.main, index_map=IndexMap(),
                  partial=True)
    reasons = {u.name: u.reason for u in result.unresolved}
    assert set(reasons) == {"torch", "triton-xpu", "vllm-xpu-kernels"}
    assert reasons["torch"].startswith(f"partial: {DEAD_INDEX} unreachable")
    assert {"sbt-alpha", "sbt-beta", "sbt-delta", "sbt-gamma", "sbt-vision", "sbt-torch"} <= {
        p.name for p in result.packages}
    text = out.read_text()
    assert "#   stackbuild lock tiny --partial" in text
    assert "# complete: NO: incomplete lockfile: 3 requirement(s) not resolved in it" in text
    assert f"host that reaches {DEAD_INDEX}, http://127.0.0.1:9/rel/{KERNEL_WHEEL} with: stackbuild lock tiny" in text
    assert check_lock(recipe, out).exit_code == 1


def test_recipe_text_with_newlines_cannot_add_lines_to_the_lockfile(tmp_path: Path, universe: Universe) -> None:
    """The recipe loader refuses control characters; the lockfile writer does not rely
    on it: an override reason is escaped, so it cannot start a requirement line."""
    import dataclasses

    recipe = make_recipe(tmp_path, GAMMA_OVERRIDE)
    evil = "why\nevil==6.6.6 \\\n    --hash=sha256:" + "1" * 64 + "\r# stackbuild-unresolved {}"
    pins = tuple(dataclasses.replace(p, override=evil) if p.override else p for p in recipe.pins)
    out = tmp_path / "l.txt"
    lock(dataclasses.replace(recipe, pins=pins), requirements_from=make_tree(tmp_path, COMMON), output=out,
         index_url=universe.main, index_map=IndexMap())
    text = out.read_text()
    assert "\nevil==" not in text and "why\\x0aevil==6.6.6" in text
    assert read_header(out).unresolved == () and "evil" not in read_header(out).packages


def test_sigterm_while_resolving_removes_the_temp_dir_and_writes_nothing(
        tmp_path: Path, hanging_index: str) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    recipe = make_recipe(tmp_path, 'sbt-alpha = "==1.0"\n')
    out = tmp_path / "l.txt"
    exe = Path(sys.executable).parent / "stackbuild"
    proc = subprocess.Popen([str(exe), "lock", str(recipe.path), "--pins-only", "--index-url", hanging_index,
                             "-o", str(out)], env={**os.environ, "TMPDIR": str(tmp), "STACKBUILD_NET_TIMEOUT": "60"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not list(tmp.glob(f"stackbuild-lock-{proc.pid}-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(tmp.glob(f"stackbuild-lock-{proc.pid}-*")), "the lock never started resolving"
    time.sleep(1)  # the resolver is waiting on the index now
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert list(tmp.iterdir()) == [] and not out.exists()
