"""`stackbuild doctor`: it runs the install script's own preflight, so on the same fake
host each failure the script stops at is the failure doctor reports, word for word;
and its own checks (git, cache, disk, indexes) fail truthfully."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "checks"))
import test_installer  # noqa: E402
from test_environment import write_recipe  # noqa: E402
from test_installer import LNL_PACKAGES, LNL_RECIPE, FakeHost, _script  # noqa: E402

from stackbuild.cli import main  # noqa: E402
from stackbuild.doctor import (  # noqa: E402
    check_cache,
    check_disk,
    check_git,
    check_indexes,
    doctor,
    run_preflight,
)
from stackbuild.recipe import load_recipe  # noqa: E402

host = test_installer.host  # the fake-host fixture, shared with test_installer

# (what the host lacks, extra environment) -> the check that fails
SCENARIOS = {
    "root": ("user", {"FAKE_UID": "0"}),
    "sudo": ("user", {"FAKE_UID": "0", "SUDO_USER": "alice"}),
    "no render node": ("render-node", {"FAKE_GROUPS": "alice video", "STACKBUILD_RENDER_NODE_GLOB": "/nonexistent/renderD*"}),
    "not in the group": ("render-node", {"FAKE_GROUPS": "alice", "FAKE_DB_GROUPS": "alice"}),
    "group not in this session": ("render-node", {"FAKE_GROUPS": "alice", "FAKE_DB_GROUPS": "alice video"}),
    "wrong python": ("python", {"FAKE_GROUPS": "alice video", "STACKBUILD_PYTHON": "/bin/false"}),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_doctor_reports_exactly_what_the_install_script_stops_at(
        tmp_path: Path, host: FakeHost, scenario: str) -> None:
    check, extra = SCENARIOS[scenario]
    recipe = write_recipe(tmp_path, "doc", LNL_RECIPE)
    script = _script(host, tmp_path, recipe)
    env = {**host.env, "FAKE_INSTALLED": " ".join(LNL_PACKAGES), **extra}
    proc = host.run(script, **{**extra, "FAKE_INSTALLED": " ".join(LNL_PACKAGES)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # the same words; only $0 differs (doctor cannot know where the script will be)
    script_says = proc.stderr.strip().splitlines()[-1].removeprefix("install: error: ").replace(str(script),
                                                                                              "install.sh")
    reported = {c.name: c for c in run_preflight(recipe, env=env, cwd=host.work)}
    assert set(reported) == {"user", "render-node", "python", "oneapi"}
    assert reported[check].status == "fail"
    assert reported[check].detail == script_says
    assert reported[check].source == "install-script preflight"


def test_on_a_good_fake_host_doctor_and_the_script_both_pass_preflight(tmp_path: Path, host: FakeHost) -> None:
    recipe = write_recipe(tmp_path, "doc", LNL_RECIPE)
    env = {**host.env, "FAKE_GROUPS": "alice video", "STACKBUILD_PYTHON": sys.executable}
    reported = run_preflight(recipe, env=env, cwd=host.work)
    assert [(c.name, c.status) for c in reported] == [("user", "ok"), ("render-node", "ok"), ("python", "ok"),
                                                      ("oneapi", "ok")]
    assert reported[1].detail == f"render node {host.node} (group video) is usable"
    assert reported[3].detail == "oneAPI from /opt/intel/oneapi"


def test_a_recipe_that_builds_kernels_needs_oneapi(tmp_path: Path, host: FakeHost) -> None:
    recipe = write_recipe(tmp_path, "src", 'platform = "b70"\n[build]\nkernels_from_source = true\n')
    env = {**host.env, "FAKE_GROUPS": "alice video", "STACKBUILD_ONEAPI_SETVARS": "/nonexistent/setvars.sh"}
    oneapi = {c.name: c for c in run_preflight(recipe, env=env, cwd=host.work)}["oneapi"]
    assert oneapi.status == "fail" and "builds kernels from source" in oneapi.detail


def test_old_git_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stub = tmp_path / "git"
    stub.write_text("#!/bin/sh\necho 'git version 2.20.1'\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    c = check_git()
    assert c.status == "fail" and "needs git >= 2.28" in c.detail
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert check_git().status == "fail"


def test_unwritable_cache_is_a_failed_check_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("STACKBUILD_CACHE", str(blocker / "cache"))
    c, where = check_cache()
    assert c.status == "fail" and where is None and "STACKBUILD_CACHE" in c.detail
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "ok"))
    c, where = check_cache()
    assert c.status == "ok" and where == tmp_path / "ok"


def test_disk_thresholds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stackbuild.doctor as d

    [ok] = check_disk({"here": tmp_path / "not" / "yet"})
    assert ok.status in ("ok", "warn", "fail") and str(tmp_path) in ok.detail
    monkeypatch.setattr(d, "DISK_FAIL_GB", 1e12)
    [full] = check_disk({"here": tmp_path})
    assert full.status == "fail"


def test_unreachable_index_fails_naming_the_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "index").as_uri())
    (tmp_path / "index").mkdir()
    recipe = write_recipe(tmp_path, "ix", 'platform = "b70"\n[pins]\n'
                                          'torch = { version = "==2.10.0+xpu", index = "http://127.0.0.1:9/xpu" }\n')
    checks = {c.name: c for c in check_indexes(recipe, timeout=2)}
    assert checks["index (the package index)"].status == "ok"
    assert checks["index (pins.torch.index)"].status == "fail"
    assert "http://127.0.0.1:9/xpu unreachable" in checks["index (pins.torch.index)"].detail


def test_cli_doctor_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "index").as_uri())
    (tmp_path / "index").mkdir()
    monkeypatch.setenv("STACKBUILD_RENDER_NODE_GLOB", str(tmp_path / "none" / "renderD*"))
    monkeypatch.chdir(tmp_path)
    rc = main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1 == report["exit_code"]  # no render node here
    names = [c["name"] for c in report["checks"]]
    assert names[:4] == ["user", "render-node", "python", "oneapi"]
    assert {"git", "cache", "disk (working directory)", "index (the package index)"} <= set(names)
    node = next(c for c in report["checks"] if c["name"] == "render-node")
    assert node["status"] == "fail" and "no GPU render node" in node["detail"]
    assert (tmp_path / "cache").is_dir()  # the cache check wrote (and removed) its probe there
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.network
def test_doctor_for_a_shipped_recipe_checks_its_pin_indexes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    result = doctor(load_recipe("b70-gemma4"), probe_timeout=0.5)
    assert result.recipe == "b70-gemma4"
    names = {c.name for c in result.checks}
    assert {"index (pins.torch.index)", "index (pins.vllm-xpu-kernels.url)"} <= names
