"""The command line: `main(argv)` returns the exit code; user errors are one line on
stderr with no traceback (unless --debug); bugs exit 3 with a pointer to a log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_workspace import ORIG, Project, edit, git_diff, sha256

from stackbuild import workspace
from stackbuild.cli import main


@pytest.fixture
def proj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    """A project with two recipes (one extending the other); the cwd is its root."""
    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    p = Project(tmp_path / "proj")
    files = {"pkg/a.py": ORIG}
    patch = git_diff(files, {"pkg/a.py": edit(ORIG, "line 5\n", "line five\n")}, tmp_path / "g", "Spell out five")
    tree = p.add_tree("pkg", files)
    rel = p.add_patch("five.patch", patch)
    p.write_recipe("base", {"pkg": {"path": str(tree)}}, [{"file": rel, "source": "pkg", "sha256": sha256(patch)}],
                   platform="lunar-lake")
    (p.root / "recipes/base.toml").write_text('description = "the base"\n' + (p.root / "recipes/base.toml").read_text())
    (p.root / "recipes/child.toml").write_text('extends = "base"\nplatform = "b70"\ndescription = "for the B70"\n')
    monkeypatch.chdir(p.root)
    return p


def test_list(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["recipe", "platform", "patched", "patches", "description"]
    base = next(ln for ln in lines if ln.startswith("base "))
    child = next(ln for ln in lines if ln.startswith("child "))
    assert "lunar-lake" in base and "the base" in base
    assert "b70" in child and "for the B70" in child


def test_list_json(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["platform"], r["patches"]) for r in rows] == [("base", "lunar-lake", 1), ("child", "b70", 1)]


def test_show_json_is_the_resolved_recipe(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "child", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["name"] == "child" and d["extends"] == ["base"]
    assert d["platform"]["name"] == "b70"
    assert [p["name"] for p in d["patches"]] == ["five"]
    assert len(d["sha256"]) == 64


def test_show_human(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "child"]) == 0
    out = capsys.readouterr().out
    assert "extends: base" in out and "five" in out and "patches (series order)" in out


def test_apply_json(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    wd = proj.root / "ws"
    assert main(["apply", "base", "--workdir", str(wd), "--json"]) == 0
    captured = capsys.readouterr()
    d = json.loads(captured.out)  # stdout is nothing but the JSON document
    assert d["ok"] is True and d["changed"] is True
    assert [(p["name"], p["verdict"]) for p in d["patches"]] == [("five", "applied")]
    assert (wd / "pkg/pkg/a.py").read_text() == edit(ORIG, "line 5\n", "line five\n")
    # again: unchanged
    assert main(["apply", "base", "--workdir", str(wd), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["changed"] is False and "unchanged" in d["message"]


def test_apply_human_table(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "base"]) == 0
    captured = capsys.readouterr()
    header = next(ln for ln in captured.out.splitlines() if ln.startswith("patch"))
    assert header.split() == ["patch", "verdict", "detail"]
    assert any(ln.split()[:2] == ["five", "applied"] for ln in captured.out.splitlines())
    assert "stackbuild: " in captured.err  # progress goes to stderr
    assert (proj.root / "work/base/manifest.json").exists()


def test_apply_dry_run(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "base", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "apply five to pkg" in out
    assert not (proj.root / "work").exists()


def test_apply_conflict_exits_1_naming_it(proj: Project, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A conflict is a verdict about the world (exit 1, like a failed check); exit 2
    stays for bad input (a malformed patch, a broken recipe)."""
    (proj.root / "upstream/pkg/pkg/a.py").write_text(edit(ORIG, "line 5\n", "line 5 changed upstream\n"))
    assert main(["apply", "base"]) == 1
    captured = capsys.readouterr()
    assert "conflict" in captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("stackbuild: error: five (patches/five.patch): conflict")
    assert "Traceback" not in captured.err


def test_bad_recipe_is_one_line_exit_2(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    bad = proj.root / "recipes/bad.toml"
    bad.write_text('platform = "b70"\nplatfrom = "b70"\n')
    assert main(["show", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"stackbuild: error: {bad}: platfrom: unknown key")
    assert "Traceback" not in err


def test_missing_patch_file_exit_2_naming_file_and_key(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    (proj.root / "patches/five.patch").unlink()
    assert main(["apply", "base"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"stackbuild: error: {proj.root / 'recipes/base.toml'}: patches[0].file: patch file patches/five.patch does not exist"
    )
    assert not any("Traceback" in ln for ln in err)


def test_unknown_recipe(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no recipe named 'nope'" in err and "known: base, child" in err


def test_debug_shows_the_traceback(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    (proj.root / "recipes/bad.toml").write_text('platform = "x"\n')
    assert main(["--debug", "show", "bad"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RecipeError" in err
    assert err.strip().splitlines()[-1].startswith("stackbuild: error: ")


def test_internal_error_exits_3_with_a_log(proj: Project, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(*a: object, **kw: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(workspace, "apply_recipe", boom)
    assert main(["apply", "base"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "internal error: RuntimeError: simulated bug" in err
    log = Path(err.rsplit("details in ", 1)[1].strip())
    assert log.is_relative_to(tmp_path / "cache")
    text = log.read_text()
    assert "simulated bug" in text and "Traceback" in text and "stackbuild " in text


def test_keyboard_interrupt_exits_130(proj: Project, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*a: object, **kw: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(workspace, "apply_recipe", interrupted)
    assert main(["apply", "base"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_usage_error_exits_2(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply"]) == 2
    assert main(["frobnicate"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from stackbuild import __version__

    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"stackbuild {__version__}"


# ---------------------------------------------------------------- conventions


def _base_project(proj: Project) -> None:
    """Add a base recipe with no sources (like xpu-base) that `child2` extends."""
    (proj.root / "recipes/shared.toml").write_text('description = "shared pins"\nplatform = "b70"\n'
                                                   '[pins]\nnumpy = "==2.0.0"\n')
    body = (proj.root / "recipes/base.toml").read_text().replace('description = "the base"\n', "")
    (proj.root / "recipes/child2.toml").write_text('extends = "shared"\n' + body)


def test_list_marks_bases_and_apply_refuses_them(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    _base_project(proj)
    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["shared"]["base"] is True and rows["child"]["base"] is False
    assert main(["list"]) == 0
    shared = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("shared "))
    assert "(base)" in shared
    for argv in (["apply", "shared"], ["lock", "shared", "--check"], ["build", "shared", "--dry-run"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "shared is a base recipe" in err and "child2" in err and "Traceback" not in err
    assert not (proj.root / "work" / "shared").exists()


def test_errors_under_json_are_a_json_object(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "nosuch", "--json"]) == 2
    d = json.loads(capsys.readouterr().out)
    assert d["exit_code"] == 2 and "no recipe named 'nosuch'" in d["error"]
    assert d["file"].endswith("nosuch.toml") and d["key"] is None
    assert main(["apply", "child", "--json", "--no-such-option"]) == 2
    d = json.loads(capsys.readouterr().out)
    assert d["exit_code"] == 2 and "--no-such-option" in d["error"]


def test_short_help_version_and_plain_text_help(capsys: pytest.CaptureFixture[str]) -> None:
    from stackbuild import __version__

    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    assert "--version" in out and "--install-completion" in out and "Commands:" in out
    assert main(["import", "-h"]) == 0
    assert "Append [[patches]] entries" in capsys.readouterr().out  # not eaten as markup
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"stackbuild {__version__}"


def test_tables_fit_the_terminal_width() -> None:
    from stackbuild.report import Table

    long = "a detail that goes on " * 12
    t = Table("t", ("check", "status", "detail"), (("compile", "pass", long), ("registry", "fail", "short")))
    text = t.render(width=80)
    assert max(len(ln) for ln in text.splitlines()) <= 80
    assert " ".join(text.split()).count("a detail that goes on") == 12  # wrapped, nothing lost
    assert t.render(width=None).splitlines()[3].endswith(long.rstrip())  # a pipe gets whole lines


def test_rehash_command_updates_the_sha_line_and_reports_json(proj: Project, capsys: pytest.CaptureFixture[str]) -> None:
    patch = next((proj.root / "patches").rglob("five.patch"))
    patch.write_text(patch.read_text().replace("Spell out five", "Spell out the number five"))
    assert main(["rehash", "base", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [e["action"] for e in out["entries"]] == ["updated"]
    assert f'sha256 = "{sha256(patch.read_text())}"' in (proj.root / "recipes/base.toml").read_text()
    assert main(["rehash", "base"]) == 0 and "already right" in capsys.readouterr().out
    patch.unlink()
    assert main(["rehash", "base"]) == 2


def _console(args: list[str], cwd: Path, extra_code: str = "") -> subprocess.CompletedProcess[str]:
    """The console entry (launch.main) in a fresh interpreter, as `stackbuild ARGS` runs it;
    `extra_code` runs first (to plant a fault), and the modules loaded are printed to stderr."""
    code = (f"import sys\n{extra_code}\nsys.argv = ['stackbuild', *{args!r}]\n"
            "from stackbuild.launch import main\nrc = main()\n"
            "print('MODULES', 'typer' in sys.modules, file=sys.stderr)\nsys.exit(rc)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


@pytest.mark.parametrize("args", [["list"], ["list", "--json"]])
def test_console_list_skips_typer_and_prints_what_the_cli_prints(
        proj: Project, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """The start-up fast path of the console entry: same bytes and exit code as the typer
    command, without importing typer."""
    _base_project(proj)
    (proj.root / "recipes/broken.toml").write_text('platform = "b70"\n[sources.x]\npath = "/etc"\n')
    assert main(args) == 2
    want = capsys.readouterr().out
    r = _console(args, proj.root)
    assert (r.returncode, r.stdout) == (2, want)
    assert "MODULES False" in r.stderr
    assert "broken" in want and "outside the project" in want


def test_console_list_hands_a_crash_to_the_full_cli(proj: Project) -> None:
    """A fault inside the fast path is not swallowed: the full CLI runs `list` again and
    reports the crash its usual way (exit 3 and a log), with typer loaded."""
    plant = ("import stackbuild.recipe as r\n"
             "def boom(*a, **k):\n    raise RuntimeError('planted')\n"
             "r.list_recipe_names = boom\nimport stackbuild.listing as l\nl.list_recipe_names = boom\n")
    r = _console(["list"], proj.root, plant)
    assert r.returncode == 3, r.stderr
    assert "internal error: RuntimeError: planted" in r.stderr and "MODULES True" in r.stderr
    assert r.stdout == ""
