"""The install script fuzzer: recipes full of shell metacharacters are rendered into
scripts that are then RUN (dry run, and a full run on a fake host with a real Python),
and no planted command may run.

Every payload plants `touch MARKER` in its own way (command substitution, backticks,
`;`, quotes, newlines with the old heredoc terminators, activate-block markers, line
continuations, carriage returns). The hostile text goes where a recipe can put text:
the recipe name, an `[environment] vars` value, a pin's `index` URL, and lockfile
comment lines. The recipe loader refuses control characters on its own; these tests
build the hostile Recipe with dataclasses.replace so the script's quoting is tested
by itself (defence in depth). Besides "no marker", each run checks that the text
round-trips: the plan prints it verbatim, and `source bin/activate` gives back the
exact value.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lock.sealed import sealed_lockfile

from stackbuild.errors import StackbuildError
from stackbuild.installer import render_install_script, sh_quote
from stackbuild.recipe import Pin, Recipe

sys.path.insert(0, str(Path(__file__).parent / "checks"))
import test_installer  # noqa: E402
from test_environment import build_wheel, write_recipe  # noqa: E402
from test_installer import SHELLCHECK, FakeHost, _hash  # noqa: E402

host = test_installer.host  # the fake-host fixture, shared with test_installer

PAYLOADS = (
    "$(touch {m})",
    "`touch {m}`",
    "; touch {m}; #",
    "'; touch {m}; '",
    '"; touch {m}; "',
    '"$(touch {m})"',
    "\nSTACKBUILD_PLAN_EOF\ntouch {m}\n",
    "\nSTACKBUILD_LOCKFILE_EOF\ntouch {m}\n",
    "x\nSTACKBUILD_ENV_EOF\ntouch {m}\nfalse",
    "\n# <<< stackbuild environment <<<\ntouch {m}\n# >>> stackbuild environment >>>\n",
    "$'\\n'touch {m}",
    "${IFS}$(touch${IFS}{m})",
    "\\'$(touch {m})",
    "x\r$(touch {m})",
    "&& touch {m} &",
    "| touch {m}",
    "$(touch {m})\\",
    "\\\ntouch {m}",
    "%s%n%b\\n$(touch {m})",
    "\x1b[2J$(touch {m})",
    "é–$(touch {m}) ☃",
    "<(touch {m})",
    "$((0))$(touch {m})",
    "*",
)
FRAGMENTS = ("touch {m}", "$(", ")", "`", ";", "'", '"', "\\", "\n", "\r", "$", "{", "}", "|", "&", "#",
             "STACKBUILD_PLAN_EOF", "STACKBUILD_LOCKFILE_EOF", "STACKBUILD_ENV_EOF",
             "# <<< stackbuild environment <<<", " ", "\t", "!", "*", "%s", "<", ">")


NAME_MARK = "NAMEPWNED"  # the name's payload touches this bare name (a name holds no "/")


def _plant(template: str, marker: Path | str) -> str:
    return template.replace("{m}", str(marker))


def _hostile_recipe(base: Recipe, template: str, marker: Path, *, in_name: bool) -> Recipe:
    payload = _plant(template, marker)
    env = base.environment
    env = dataclasses.replace(env, vars=(("SB_FUZZ", payload), *env.vars))
    pins = (Pin(name="tinypkg", spec="==1.0", index="https://example.invalid/" + payload),)
    name = ("r" + _plant(template, NAME_MARK).replace("/", "_")) if in_name else base.name
    return dataclasses.replace(base, name=name, environment=env, pins=pins)


def _lockfile(dest: Path, wheel: Path, payload: str) -> Path:
    comment = "# " + payload.replace("\r", "\n").replace("\n", "\n# ")
    return sealed_lockfile(dest, "fuzz", f"{comment}\ntinypkg==1.0 \\\n    --hash=sha256:{_hash(wheel)}\n")


def _render(tmp: Path, recipe: Recipe, payload: str, wheelhouse: Path) -> tuple[Path, Path]:
    tiny = build_wheel(wheelhouse, "tinypkg", "1.0", {"tinypkg/__init__.py": "X = 1\n"})
    out = tmp / "out"
    (out / "wheels").mkdir(parents=True, exist_ok=True)
    vllm = build_wheel(out / "wheels", "vllm", "0.19.0", {"vllm/__init__.py": "V = 1\n"})
    lock = _lockfile(tmp / "lock.txt", tiny, payload)
    script = render_install_script(recipe, lock, [vllm])
    path = out / "install.sh"
    script.write(path)
    return path, lock


def _text(s: str) -> str:
    """As subprocess's text mode reads it back (universal newlines)."""
    return s.replace("\r\n", "\n").replace("\r", "\n")


def _markers(d: Path, *roots: Path) -> list[str]:
    """Planted files: anything in the marker folder, and the name's bare marker anywhere
    under the given roots (the fake host's working directory, home, script folder)."""
    found = sorted(p.name for p in d.iterdir())
    for r in roots:
        found += [str(p) for p in r.rglob(NAME_MARK)]
    return found


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Recipe:
    return write_recipe(tmp_path_factory.mktemp("fuzzrecipe"), "fuzz", 'platform = "lunar-lake"\n')


# ---------------------------------------------------------------- dry run: every payload, every place


@pytest.mark.parametrize("in_name", [False, True], ids=["values", "values+name"])
@pytest.mark.parametrize("template", PAYLOADS)
def test_planted_command_never_runs_in_a_dry_run(tmp_path: Path, host: FakeHost, base: Recipe,
                                                 template: str, in_name: bool) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    payload = _plant(template, marks / "PWNED")
    recipe = _hostile_recipe(base, template, marks / "PWNED", in_name=in_name)
    path, _ = _render(tmp_path, recipe, payload, host.wheelhouse)
    proc = host.run(path, STACKBUILD_DRY_RUN="1")
    assert _markers(marks, tmp_path) == [], proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the plan prints the hostile text back verbatim: quoted, not lost or split
    assert _text("https://example.invalid/" + payload) in proc.stdout
    assert _text(f"SB_FUZZ={sh_quote(payload)}") in proc.stdout
    syntax = subprocess.run(["/bin/bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


@settings(max_examples=150, deadline=None, database=None,  # no .hypothesis/ folder in the tree
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=12), in_name=st.booleans())
def test_generated_payloads_never_run(host: FakeHost, base: Recipe, parts: list[str], in_name: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="sbfuzz-") as t:
        tmp = Path(t)
        marks = tmp / "marks"
        marks.mkdir()
        template = "".join(parts)
        payload = _plant(template, marks / "PWNED")
        recipe = _hostile_recipe(base, template, marks / "PWNED", in_name=in_name)
        path, _ = _render(tmp, recipe, payload, host.wheelhouse)
        proc = host.run(path, STACKBUILD_DRY_RUN="1")
        assert _markers(marks, tmp, host.work, host.home) == [], proc.stdout + proc.stderr
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert _text("https://example.invalid/" + payload) in proc.stdout


def test_nul_is_refused_not_passed(tmp_path: Path, host: FakeHost, base: Recipe) -> None:
    with pytest.raises(StackbuildError, match="NUL"):
        _render(tmp_path, _hostile_recipe(base, "a\x00$(touch {m})", tmp_path / "x", in_name=False), "ok",
                host.wheelhouse)


@pytest.mark.skipif(not SHELLCHECK.is_file(), reason=f"shellcheck is not in the venv ({SHELLCHECK})")
@pytest.mark.parametrize("template", PAYLOADS[:12])
def test_hostile_scripts_are_shellcheck_clean(tmp_path: Path, host: FakeHost, base: Recipe, template: str) -> None:
    payload = _plant(template, tmp_path / "PWNED")
    recipe = _hostile_recipe(base, template, tmp_path / "PWNED", in_name=True)
    path, _ = _render(tmp_path, recipe, payload, host.wheelhouse)
    proc = subprocess.run([str(SHELLCHECK), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------- full run on a fake host


FULL_RUN = (
    "$(touch {m})",
    "`touch {m}`",
    "'; touch {m}; '",
    "\nSTACKBUILD_ENV_EOF\ntouch {m}\n",
    "\n# <<< stackbuild environment <<<\ntouch {m}\n# >>> stackbuild environment >>>\n",
    "x\r$(touch {m})\\",
)


@pytest.mark.slow
@pytest.mark.parametrize("template", FULL_RUN)
def test_full_run_on_a_fake_host_runs_nothing_planted(tmp_path: Path, host: FakeHost, base: Recipe,
                                                      template: str) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    payload = _plant(template, marks / "PWNED")
    recipe = _hostile_recipe(base, template, marks / "PWNED", in_name=False)
    path, lock = _render(tmp_path, recipe, payload, host.wheelhouse)
    run_env = {"STACKBUILD_PYTHON": sys.executable, "FAKE_GROUPS": "alice video", "STACKBUILD_SKIP_PACKAGES": "1"}
    proc = host.run(path, **run_env)
    assert _markers(marks, tmp_path) == [], proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    venv = host.home / ".local/share/stackbuild/venvs" / recipe.name
    assert (venv / "bin" / "python").exists()
    # the embedded lockfile round-trips byte for byte
    assert (venv / f"stackbuild-{recipe.name}.lock.txt").read_bytes() == lock.read_bytes()
    # activate still parses, and gives back the exact value; sourcing it runs nothing
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    got = subprocess.run(["/bin/bash", "-c", 'source "$1/bin/activate" && printf %s "$SB_FUZZ"', "_", str(venv)],
                         capture_output=True, text=True, cwd=cwd,
                         env={"PATH": os.defpath, "HOME": str(host.home)})
    assert got.returncode == 0, got.stderr
    assert got.stdout == _text(payload)
    assert _markers(marks, tmp_path) == []
    # a second run replaces the block instead of breaking or doubling it
    again = host.run(path, **run_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (venv / "bin" / "activate").read_text().splitlines().count("# >>> stackbuild environment >>>") == 1
    assert _markers(marks, tmp_path) == []


@pytest.mark.parametrize("template", FULL_RUN)
def test_a_hostile_name_stops_before_the_venv_is_made(tmp_path: Path, host: FakeHost, base: Recipe,
                                                      template: str) -> None:
    """The venv's path carries the recipe name, and Python's venv (before the
    CVE-2024-9287 fix; 3.11.7 here) writes that path unquoted into bin/activate: this
    fuzzer planted `$(touch ...)` through it. The script refuses such a path up front."""
    marks = tmp_path / "marks"
    marks.mkdir()
    payload = _plant(template, marks / "PWNED")
    recipe = _hostile_recipe(base, template, marks / "PWNED", in_name=True)
    path, _ = _render(tmp_path, recipe, payload, host.wheelhouse)
    proc = host.run(path, STACKBUILD_PYTHON=sys.executable, FAKE_GROUPS="alice video", STACKBUILD_SKIP_PACKAGES="1")
    assert _markers(marks, tmp_path) == [], proc.stdout + proc.stderr
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "holds shell metacharacters" in proc.stderr
    assert not (host.home / ".local/share/stackbuild/venvs").exists()
