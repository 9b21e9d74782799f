"""stackbuild lock: real pip-compile (and uv) runs against tiny local indexes built
from real wheels in temporary folders; one network test against the package index."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import fixtures
import pytest
from lock.tinyindex import build_index, build_wheel, sha256

from stackbuild.errors import RecipeError
from stackbuild.lock import (
    IndexUnreachable,
    LockError,
    ResolutionFailed,
    ResolverMissing,
    check_lock,
    lock,
    plan_lock,
    record_first_use,
)
from stackbuild.lock.lockfile import parse_resolver_output, read_header
from stackbuild.lock.requirements import read_source_requirements, requirement_files_for
from stackbuild.recipe import Recipe, load_recipe

DEAD_INDEX = "http://127.0.0.1:9/simple"


# ---------------------------------------------------------------- fixtures


class Universe:
    def __init__(self, root: Path):
        self.main = build_index(root / "main", {
            ("sbt-alpha", "1.0"): ("sbt-beta>=1",),
            ("sbt-beta", "1.0"): (),
            ("sbt-beta", "2.0"): (),
            ("sbt-gamma", "4.0"): (),
            ("sbt-gamma", "5.0"): (),
            ("sbt-delta", "1.0"): ("sbt-gamma>=4",),
            ("sbt-torch", "1.0"): (),  # a CPU build on the main index, like torch on PyPI
            ("sbt-vision", "1.0"): ("sbt-torch",),
            ("sbt-epsilon", "1.0"): ("sbt-gamma<5",),  # like compressed-tensors 0.14.0.1: transformers<5
        })
        self.xpu = build_index(root / "xpu", {
            ("sbt-torch", "2.9.0+xpu"): (),
            ("sbt-torch", "2.10.0+xpu"): (),
        })
        # what a machine's pip.conf might add: it must never reach the lock
        self.poison = build_index(root / "poison", {
            ("sbt-beta", "9.0"): (),
            ("sbt-gamma", "4.9"): (),
        })
        self.kernels = build_wheel(root / "release", "sbt-kernels", "0.1.5", ("sbt-beta<2",))
        self.tofu = build_wheel(root / "release", "sbt-tofu", "0.2.0")
        self.root = root


@pytest.fixture(scope="session")
def universe(tmp_path_factory: pytest.TempPathFactory) -> Universe:
    return Universe(tmp_path_factory.mktemp("indexes"))


@pytest.fixture(autouse=True)
def _machine_pip_config(tmp_path: Path, universe: Universe, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with a hostile machine configuration: a pip.conf adding an extra
    index and find-links, and a global constraints file; none of it may show."""
    constraints = tmp_path / "machine-constraints.txt"
    constraints.write_text("sbt-beta<2\nsbt-gamma<4.5\n")
    conf = tmp_path / "machine-pip.conf"
    conf.write_text(f"[global]\nextra-index-url = {universe.poison}\nfind-links = {universe.root / 'release'}\n"
                    f"constraint = {constraints}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_FIND_LINKS", str(universe.root / "release"))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", universe.poison)
    monkeypatch.setenv("PIP_CONSTRAINT", str(constraints))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)


def make_tree(root: Path, common: str, xpu: str = "") -> Path:
    tree = root / "vllm-src"
    (tree / "requirements").mkdir(parents=True, exist_ok=True)
    (tree / "requirements" / "common.txt").write_text(common)
    (tree / "requirements" / "xpu.txt").write_text("# Common dependencies\n-r common.txt\n\n" + xpu)
    return tree


PATCH_A = "a" * 64
PATCH_B = "b" * 64


def make_recipe(root: Path, pins: str = "", *, name: str = "tiny", target: str = "empty",
                patches: tuple[tuple[str, str], ...] = (("fix-a", PATCH_A), ("fix-b", PATCH_B))) -> Recipe:
    d = root / "recipes"
    d.mkdir(parents=True, exist_ok=True)
    text = (f'name = "{name}"\nplatform = "b70"\n\n[sources.vllm]\npypi = "vllm==0.19.0"\nsha256 = "{"c" * 64}"\n\n'
            f'[build]\ntarget_device = "{target}"\n\n[pins]\n{pins}\n')
    for pname, sha in patches:
        text += (f'\n[[patches]]\nfile = "patches/vllm/0.19.0/{pname}.patch"\nsource = "vllm"\n'
                 f'sha256 = "{sha}"\n')
    path = d / f"{name}.toml"
    path.write_text(text)
    return load_recipe(path)


COMMON = """\
sbt-alpha  # pulls sbt-beta
sbt-gamma >= 4, < 5   # declared like vLLM's transformers<5
sbt-delta ; python_version >= "3"
"""

GAMMA_OVERRIDE = 'sbt-gamma = { version = "==5.0", override = "the source says <5 but its new code needs 5.0" }\n'


def body_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln and not ln.lstrip().startswith("#")]


def versions(result) -> dict[str, str | None]:  # type: ignore[no-untyped-def]
    return {p.name: p.version for p in result.packages}


# ---------------------------------------------------------------- overrides


def test_override_replaces_declared_requirement_and_is_recorded(tmp_path: Path, universe: Universe) -> None:
    tree = make_tree(tmp_path, COMMON)
    recipe = make_recipe(tmp_path, GAMMA_OVERRIDE)
    out = tmp_path / "lockfiles" / "tiny.txt"
    result = lock(recipe, requirements_from=tree, output=out, index_url=universe.main)

    assert versions(result) == {"sbt-alpha": "1.0", "sbt-beta": "2.0", "sbt-delta": "1.0", "sbt-gamma": "5.0"}
    [ov] = result.overrides
    assert ov.name == "sbt-gamma" and ov.reason.startswith("the source says <5")
    assert ov.replaces == ("sbt-gamma<5,>=4 (vllm requirements/common.txt:2)",)
    text = out.read_text()
    assert ("#   sbt-gamma==5.0 replaces sbt-gamma<5,>=4 (vllm requirements/common.txt:2): "
            "the source says <5 but its new code needs 5.0") in text
    assert "sbt-gamma==5.0 \\" in text and "sbt-delta==1.0 \\" in text
    assert "sbt-gamma==5.0 \\\n    --hash=sha256:" in text
    tables = result.tables()
    assert [t.title.split(" ")[0] for t in tables] == ["Lockfile", "Overrides"]
    assert tables[1].rows[0][0] == "sbt-gamma"
    assert json.loads(json.dumps(result.to_dict()))["overrides"][0]["reason"] == ov.reason
    assert "    # via\n    #   recipe pins\n    #   sbt-delta\n" in text


def test_pin_contradicting_the_source_without_override_is_refused(tmp_path: Path, universe: Universe) -> None:
    tree = make_tree(tmp_path, COMMON)
    recipe = make_recipe(tmp_path, 'sbt-gamma = "==5.0"\n')
    with pytest.raises(LockError) as e:
        lock(recipe, requirements_from=tree, output=tmp_path / "l.txt", index_url=universe.main)
    assert e.value.key == "pins.sbt-gamma"
    assert "requirements/common.txt:2" in str(e.value) and "override" in str(e.value)
    assert not (tmp_path / "l.txt").exists()


def test_compatible_pin_narrows_without_override(tmp_path: Path, universe: Universe) -> None:
    tree = make_tree(tmp_path, COMMON)
    recipe = make_recipe(tmp_path, 'sbt-beta = "==1.0"\n')
    result = lock(recipe, requirements_from=tree, output=tmp_path / "l.txt", index_url=universe.main)
    assert versions(result)["sbt-beta"] == "1.0" and versions(result)["sbt-gamma"] == "4.0"
    assert result.overrides == ()


# ---------------------------------------------------------------- hashes and machine-local lines


def test_every_package_hashed_and_no_machine_local_lines(tmp_path: Path, universe: Universe) -> None:
    tree = make_tree(tmp_path, COMMON)
    recipe = make_recipe(tmp_path, GAMMA_OVERRIDE)
    out = tmp_path / "tiny.txt"
    result = lock(recipe, requirements_from=tree, output=out, index_url=universe.main)
    text = out.read_text()

    # the hostile pip.conf/env (poison index with sbt-beta 9.0, constraint sbt-beta<2) had no effect
    assert versions(result)["sbt-beta"] == "2.0"
    assert all(len(p.hashes) >= 1 for p in result.packages)
    lines = body_lines(text)
    reqs = [ln for ln in lines if not ln.startswith(" ")]
    assert len(reqs) == 4
    for ln in reqs:
        assert ln.endswith(" \\"), ln
    for ln in lines:
        assert not ln.startswith("-"), ln
    for needle in ("--index-url", "--extra-index-url", "--find-links", "--trusted-host", "file://", "/opt/",
                   str(universe.root), str(tmp_path), "/tmp/"):
        assert needle not in text, needle
    assert "# primary index: a local index (not recorded)" in text
    # every hash is the real file's
    files = {p.name.split("-")[0].replace("_", "-"): sha256(p) for p in (universe.root / "main" / "files").glob("*.whl")}
    assert f"--hash=sha256:{sha256(universe.root / 'main' / 'files' / 'sbt_gamma-5.0-py3-none-any.whl')}" in text
    assert files


def test_lockfile_is_reproducible_byte_for_byte(tmp_path: Path, universe: Universe) -> None:
    tree = make_tree(tmp_path, COMMON)
    recipe = make_recipe(tmp_path, GAMMA_OVERRIDE)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    lock(recipe, requirements_from=tree, output=a, index_url=universe.main)
    lock(recipe, requirements_from=tree, output=b, index_url=universe.main)
    assert a.read_bytes() == b.read_bytes()
    assert "#   stackbuild lock tiny\n" in a.read_text()


# ---------------------------------------------------------------- other indexes and direct URLs


def test_pin_from_another_index(tmp_path: Path, universe: Universe) -> None:
    recipe = make_recipe(tmp_path, f'sbt-torch = {{ version = "==2.10.0+xpu", index = "{universe.xpu}" }}\n'
                                   'sbt-alpha = "==1.0"\n')
    result = lock(recipe, requirements_from=None, output=tmp_path / "l.txt", index_url=universe.main)
    assert versions(result)["sbt-torch"] == "2.10.0+xpu"
    text = (tmp_path / "l.txt").read_text()
    assert "# extra index: a local index (not recorded) (pins.sbt-torch.index)" in text
    assert "stackbuild lock tiny --pins-only" in text


def test_direct_url_pin_with_sha256(tmp_path: Path, universe: Universe) -> None:
    url = universe.kernels.as_uri()
    recipe = make_recipe(tmp_path, f'sbt-kernels = {{ url = "{url}", sha256 = "{sha256(universe.kernels)}" }}\n'
                                   'sbt-alpha = "==1.0"\n')
    out = tmp_path / "l.txt"
    result = lock(recipe, requirements_from=None, output=out, index_url=universe.main)
    text = out.read_text()
    assert f"sbt-kernels @ {url} \\\n    --hash=sha256:{sha256(universe.kernels)}\n" in text
    assert "sha256 from the recipe, checked against the download" in text
    # its own dependency (sbt-beta<2) was resolved together with sbt-alpha's (sbt-beta>=1)
    assert versions(result)["sbt-beta"] == "1.0"


def test_direct_url_with_wrong_sha256_fails_and_keeps_previous_lockfile(tmp_path: Path, universe: Universe) -> None:
    out = tmp_path / "l.txt"
    out.write_text("previous lockfile\n")
    url = universe.kernels.as_uri()
    recipe = make_recipe(tmp_path, f'sbt-kernels = {{ url = "{url}", sha256 = "{"0" * 64}" }}\n')
    with pytest.raises(LockError) as e:
        lock(recipe, requirements_from=None, output=out, index_url=universe.main)
    assert e.value.key == "pins.sbt-kernels.sha256" and "sha256 mismatch" in str(e.value)
    assert out.read_bytes() == b"previous lockfile\n"


# ---------------------------------------------------------------- unreachable and offline


def test_unreachable_index_fails_fast_naming_it(tmp_path: Path, universe: Universe) -> None:
    out = tmp_path / "l.txt"
    out.write_text("previous\n")
    recipe = make_recipe(tmp_path, f'sbt-torch = {{ version = "==2.10.0+xpu", index = "{DEAD_INDEX}" }}\n'
                                   'sbt-alpha = "==1.0"\n')
    with pytest.raises(IndexUnreachable) as e:
        lock(recipe, requirements_from=None, output=out, index_url=universe.main, probe_timeout=2)
    msg = str(e.value)
    assert DEAD_INDEX in msg and "pins.sbt-torch" in msg and "--offline" in msg
    assert str(recipe.path) in msg and "\n" not in msg
    assert out.read_bytes() == b"previous\n"


def test_source_declared_unreachable_index_is_named(tmp_path: Path, universe: Universe) -> None:
    tree = make_tree(tmp_path, "sbt-alpha\n", xpu=f"--extra-index-url={DEAD_INDEX}\nsbt-gamma==4.0\n")
    recipe = make_recipe(tmp_path, target="xpu")
    with pytest.raises(IndexUnreachable) as e:
        lock(recipe, requirements_from=tree, output=tmp_path / "l.txt", index_url=universe.main, probe_timeout=2)
    assert f"index {DEAD_INDEX} (vllm requirements/xpu.txt:4)" in str(e.value)


def test_offline_locks_the_rest_and_marks_remote_pins(tmp_path: Path, universe: Universe) -> None:
    tree = make_tree(tmp_path, COMMON)
    recipe = make_recipe(tmp_path, GAMMA_OVERRIDE
                         + f'sbt-torch = {{ version = "==2.10.0+xpu", index = "{DEAD_INDEX}" }}\n'
                         + 'sbt-kernels = { url = "http://127.0.0.1:9/sbt_kernels-0.1.5-py3-none-any.whl", '
                           f'sha256 = "{sha256(universe.kernels)}" }}\n')
    out = tmp_path / "l.txt"
    result = lock(recipe, requirements_from=tree, output=out, index_url=universe.main, offline=True)
    assert set(versions(result)) == {"sbt-alpha", "sbt-beta", "sbt-delta", "sbt-gamma"}
    assert {u.name for u in result.unresolved} == {"sbt-torch", "sbt-kernels"}
    text = out.read_text()
    assert "# not resolved by this lock" in text
    assert (f"#   sbt-torch==2.10.0+xpu  (pinned by the recipe, not resolved: pins.sbt-torch; "
            f"offline: {DEAD_INDEX} not contacted)") in text
    assert f"sha256 {sha256(universe.kernels)}" in text
    assert len(read_header(out).unresolved) == 2
    assert "stackbuild lock tiny --offline" in text


def test_offline_never_swaps_an_unresolved_pin_for_another_build(tmp_path: Path, universe: Universe) -> None:
    tree = make_tree(tmp_path, "sbt-alpha\nsbt-vision\nsbt-nowhere>=1\n")
    recipe = make_recipe(tmp_path, f'sbt-torch = {{ version = "==2.10.0+xpu", index = "{DEAD_INDEX}" }}\n')
    result = lock(recipe, requirements_from=tree, output=tmp_path / "l.txt", index_url=universe.main, offline=True)
    assert set(versions(result)) == {"sbt-alpha", "sbt-beta"}  # no sbt-torch 1.0 from the main index
    reasons = {u.name: u.reason for u in result.unresolved}
    assert reasons == {"sbt-torch": f"offline: {DEAD_INDEX} not contacted",
                       "sbt-vision": "offline: depends on sbt-torch, which is not resolved here",
                       "sbt-nowhere": "offline: in no local index"}
    text = (tmp_path / "l.txt").read_text()
    assert ("#   sbt-nowhere>=1  (declared by vllm requirements/common.txt:3, not resolved; "
            "offline: in no local index)") in text


def test_offline_with_no_local_index_marks_everything(tmp_path: Path, universe: Universe) -> None:
    recipe = make_recipe(tmp_path, 'sbt-alpha = "==1.0"\n')
    result = lock(recipe, requirements_from=None, output=tmp_path / "l.txt", index_url=DEAD_INDEX, offline=True)
    assert result.packages == () and [u.name for u in result.unresolved] == ["sbt-alpha"]
    assert result.resolver_runs == 0


# ---------------------------------------------------------------- trust on first use


def test_trust_on_first_use_records_and_says_so(tmp_path: Path, universe: Universe) -> None:
    url = universe.tofu.as_uri()
    recipe = make_recipe(tmp_path, f'sbt-tofu = {{ url = "{url}", trust_on_first_use = true }}\n')
    out = tmp_path / "l.txt"
    result = lock(recipe, requirements_from=None, output=out, index_url=universe.main)
    [fu] = result.first_use
    assert fu.sha256 == sha256(universe.tofu)
    assert "trust on first use" in fu.message and "first download" in fu.message
    text = out.read_text()
    assert f"--hash=sha256:{sha256(universe.tofu)}" in text
    assert "# trust on first use: sha256 recorded from the first download, not checked against a known value" in text

    rec = record_first_use(recipe.path, "sbt-tofu", fu.sha256)
    assert "trust on first use" in rec.message
    again = load_recipe(recipe.path)
    pin = again.pin("sbt-tofu")
    assert pin is not None and pin.sha256 == sha256(universe.tofu) and not pin.trust_on_first_use
    # the recipe changed: the lock is now stale, and --check says which pin changed
    check = check_lock(again, out)
    assert check.exit_code == 1
    assert any(c.name == "sbt-tofu" and "sha256" in c.detail for c in check.changes)


def test_record_first_use_in_a_table_section(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path)
    text = recipe.path.read_text().replace(
        "[pins]\n", '[pins]\n\n[pins.sbt-tofu]\nurl = "https://example.invalid/x.whl"\ntrust_on_first_use = true\n')
    recipe.path.write_text(text)
    record_first_use(recipe.path, "sbt-tofu", "d" * 64)
    pin = load_recipe(recipe.path).pin("sbt-tofu")
    assert pin is not None and pin.sha256 == "d" * 64
    with pytest.raises(RecipeError) as e:
        record_first_use(recipe.path, "sbt-tofu", "d" * 64)  # nothing left to record
    assert e.value.key == "pins.sbt-tofu"


def test_unreachable_trust_on_first_use_is_explicit_offline(tmp_path: Path, universe: Universe) -> None:
    url = "http://127.0.0.1:9/sbt_tofu-0.2.0-py3-none-any.whl"
    recipe = make_recipe(tmp_path, f'sbt-tofu = {{ url = "{url}", trust_on_first_use = true }}\nsbt-alpha = "==1.0"\n')
    out = tmp_path / "l.txt"
    result = lock(recipe, requirements_from=None, output=out, index_url=universe.main, offline=True)
    [fu] = result.first_use
    assert fu.sha256 is None
    text = out.read_text()
    assert "has no known sha256 and was not downloaded here" in text
    assert f"#   sbt-tofu @ {url}  (pinned by the recipe, not resolved: pins.sbt-tofu; offline:" in text


# ---------------------------------------------------------------- --check


def test_check_passes_unchanged_and_names_changed_pin_and_patch(
        tmp_path: Path, universe: Universe, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree(tmp_path, COMMON)
    recipe = make_recipe(tmp_path, GAMMA_OVERRIDE)
    out = tmp_path / "l.txt"
    lock(recipe, requirements_from=tree, output=out, index_url=universe.main)

    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("--check touched the network")

    monkeypatch.setattr(socket, "socket", no_network)
    ok = check_lock(recipe, out)
    assert ok.exit_code == 0 and ok.up_to_date and ok.changes == ()
    assert ok.command == "stackbuild lock tiny"

    changed_pin = make_recipe(tmp_path, GAMMA_OVERRIDE.replace("==5.0", "==5.1"))
    r = check_lock(changed_pin, out)
    assert r.exit_code == 1
    assert [(c.kind, c.name, c.detail) for c in r.changes] == [("pin", "sbt-gamma", "spec: ==5.0 -> ==5.1")]

    changed_reason = make_recipe(tmp_path, GAMMA_OVERRIDE.replace("new code", "gemma code"))
    [c] = check_lock(changed_reason, out).changes
    assert c.kind == "override" and "gemma code" in c.detail

    changed_patch = make_recipe(tmp_path, GAMMA_OVERRIDE, patches=(("fix-a", PATCH_A), ("fix-b", "e" * 64)))
    [c] = check_lock(changed_patch, out).changes
    assert (c.kind, c.name, c.change) == ("patch", "fix-b", "changed") and "e" * 64 in c.detail

    reordered = make_recipe(tmp_path, GAMMA_OVERRIDE, patches=(("fix-b", PATCH_B), ("fix-a", PATCH_A)))
    kinds = {(c.kind, c.change) for c in check_lock(reordered, out).changes}
    assert ("series", "reordered") in kinds

    added = make_recipe(tmp_path, GAMMA_OVERRIDE + 'sbt-beta = "==1.0"\n',
                        patches=(("fix-a", PATCH_A), ("fix-b", PATCH_B), ("fix-c", "f" * 64)))
    changes = {(c.kind, c.name, c.change) for c in check_lock(added, out).changes}
    assert changes == {("pin", "sbt-beta", "added"), ("patch", "fix-c", "added")}
    assert check_lock(added, out).tables()[0].rows


def test_check_without_lockfile_names_it(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path)
    with pytest.raises(LockError) as e:
        check_lock(recipe, tmp_path / "lockfiles" / "tiny.txt")
    assert "lockfiles/tiny.txt" in str(e.value) and "stackbuild lock" in str(e.value)


# ---------------------------------------------------------------- failures


def test_resolution_failure_keeps_previous_lockfile_byte_for_byte(tmp_path: Path, universe: Universe) -> None:
    tree = make_tree(tmp_path, COMMON)
    out = tmp_path / "l.txt"
    lock(make_recipe(tmp_path, GAMMA_OVERRIDE), requirements_from=tree, output=out, index_url=universe.main)
    before = out.read_bytes()
    broken = make_recipe(tmp_path, GAMMA_OVERRIDE.replace("==5.0", "==7.0"))
    with pytest.raises(ResolutionFailed) as e:
        lock(broken, requirements_from=tree, output=out, index_url=universe.main)
    msg = str(e.value)
    assert "sbt-gamma" in msg and "\n" not in msg and "stackbuild-lock-" not in msg
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".l.txt")] == []


def test_source_constraint_files_limit_versions(tmp_path: Path, universe: Universe) -> None:
    tree = make_tree(tmp_path, "-c constraints.txt\nsbt-alpha\n")
    (tree / "requirements" / "constraints.txt").write_text("sbt-beta<2\n")
    result = lock(make_recipe(tmp_path), requirements_from=tree, output=tmp_path / "l.txt", index_url=universe.main)
    assert versions(result) == {"sbt-alpha": "1.0", "sbt-beta": "1.0"}


def test_check_notices_a_hand_edited_header(tmp_path: Path, universe: Universe) -> None:
    recipe = make_recipe(tmp_path, 'sbt-beta = "==1.0"\n')
    out = tmp_path / "l.txt"
    lock(recipe, requirements_from=None, output=out, index_url=universe.main)
    out.write_text(out.read_text().replace('"spec":"==1.0"', '"spec":"==2.0"'))
    kinds = {(c.kind, c.change) for c in check_lock(recipe, out).changes}
    assert kinds == {("pin", "changed"), ("lockfile", "changed")}


def test_missing_requirement_file_names_it(tmp_path: Path, universe: Universe) -> None:
    tree = tmp_path / "empty-tree"
    tree.mkdir()
    with pytest.raises(LockError) as e:
        lock(make_recipe(tmp_path), requirements_from=tree, output=tmp_path / "l.txt", index_url=universe.main)
    assert str(tree / "requirements" / "common.txt") in str(e.value)


# ---------------------------------------------------------------- requirement files


def test_requirement_files_includes_continuations_and_options(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, "a-pkg >= 1 \\\n    , < 2  # comment\n# only a comment\nb_pkg @ https://x.invalid/b.whl#sha=1\n",
                     xpu="--extra-index-url https://download.example/xpu\n-r more.txt\nc-pkg==1\n")
    (tree / "requirements" / "more.txt").write_text("-c constraints.txt\nd-pkg\n")
    (tree / "requirements" / "constraints.txt").write_text("d-pkg<3\n")
    src = read_source_requirements(tree, requirement_files_for("xpu"))
    assert src.files == ("requirements/xpu.txt", "requirements/common.txt", "requirements/more.txt",
                         "requirements/constraints.txt")
    got = [(r.name, r.text, r.where, r.constraint) for r in src.requirements]
    assert got == [
        ("a-pkg", "a-pkg<2,>=1", "requirements/common.txt:1", False),
        ("b-pkg", "b_pkg @ https://x.invalid/b.whl#sha=1", "requirements/common.txt:4", False),
        ("d-pkg", "d-pkg<3", "requirements/constraints.txt:1", True),
        ("d-pkg", "d-pkg", "requirements/more.txt:2", False),
        ("c-pkg", "c-pkg==1", "requirements/xpu.txt:6", False),
    ]
    assert [(i.url, i.line) for i in src.indexes] == [("https://download.example/xpu", 4)]


def test_requirement_file_errors_name_file_and_line(tmp_path: Path) -> None:
    tree = make_tree(tmp_path, "-e ./local\n")
    with pytest.raises(LockError) as e:
        read_source_requirements(tree, ("requirements/common.txt",))
    assert "common.txt: line 1: option '-e'" in str(e.value)
    (tree / "requirements" / "common.txt").write_text("-r common.txt\n")
    with pytest.raises(LockError, match="include cycle"):
        read_source_requirements(tree, ("requirements/common.txt",))


@pytest.mark.network
def test_plan_for_real_vllm_0_19_overrides_transformers(tmp_path: Path) -> None:
    vllm_019 = fixtures.vllm_tree("0.19.0")
    kernels = "https://github.com/vllm-project/vllm-xpu-kernels/releases/download/v0.1.5/vllm_xpu_kernels-0.1.5-cp38-abi3-manylinux_2_28_x86_64.whl"
    pins = ('transformers = { version = "==5.10.2", override = "vLLM 0.19.0 declares <5 but its Gemma 4 code needs >= 5.5.0" }\n'
            'torch = { version = "==2.10.0+xpu", index = "https://download.pytorch.org/whl/xpu" }\n'
            f'vllm-xpu-kernels = {{ url = "{kernels}", trust_on_first_use = true, override = "0.1.5 has the int4 MoE fix" }}\n')
    recipe = make_recipe(tmp_path, pins, name="lunar-lake-moe", target="xpu")
    plan = plan_lock(recipe, vllm_019)
    by_name = {o.name: o for o in plan.overrides}
    assert by_name["transformers"].replaces == ("transformers<5,>=4.56.0 (vllm requirements/common.txt:10)",)
    assert by_name["vllm-xpu-kernels"].replaces[0].startswith("vllm_xpu_kernels @ https://github.com/")
    inputs = {i.name: i for i in plan.inputs}
    assert inputs["transformers"].requirement == "transformers==5.10.2"
    assert inputs["torch"].origin == "pins.torch"  # the declared torch==2.10.0+xpu is satisfied, not overridden
    assert "torch" not in by_name and "vllm" not in inputs
    assert ("https://download.pytorch.org/whl/xpu", "pins.torch.index") in plan.indexes
    assert len([i for i in plan.inputs if i.group == "vllm"]) > 50

    without = make_recipe(tmp_path, pins.replace(', override = "vLLM 0.19.0 declares <5 but its Gemma 4 code needs >= 5.5.0"', ""),
                          name="lunar-lake-moe", target="xpu")
    with pytest.raises(LockError, match=r"contradicts vllm's `transformers<5,>=4.56.0` \(requirements/common.txt:10\)"):
        plan_lock(without, vllm_019)


def test_vllm_itself_cannot_be_pinned(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, 'vllm = "==0.19.0"\n')
    with pytest.raises(LockError) as e:
        plan_lock(recipe, None)
    assert e.value.key == "pins.vllm" and "--no-deps" in str(e.value)


def test_parse_resolver_output_normalises_paths() -> None:
    text = ("--index-url file:///opt/pypi/simple\n--find-links /opt/wheels\n"
            "x==1 \\\n    --hash=sha256:" + "b" * 64 + " \\\n    --hash=sha256:" + "a" * 64 + "\n"
            "    # via\n    #   -r /tmp/stackbuild-lock-1/recipe-pins.in\n    #   Some_Pkg\n")
    [p] = parse_resolver_output(text, {"recipe-pins.in": "recipe pins"})
    assert p.hashes == ("a" * 64, "b" * 64) and p.via == ("recipe pins", "some-pkg")


# ---------------------------------------------------------------- uv


def test_uv_gives_the_same_lock_as_pip_tools(tmp_path: Path, universe: Universe) -> None:
    tree = make_tree(tmp_path, COMMON)
    url = universe.kernels.as_uri()
    recipe = make_recipe(tmp_path, GAMMA_OVERRIDE
                         + f'sbt-kernels = {{ url = "{url}", sha256 = "{sha256(universe.kernels)}" }}\n')
    a, b = tmp_path / "pip-tools.txt", tmp_path / "uv.txt"
    ra = lock(recipe, requirements_from=tree, output=a, index_url=universe.main)
    rb = lock(recipe, requirements_from=tree, output=b, index_url=universe.main, resolver="uv")
    assert [p.to_dict() for p in ra.packages] == [p.to_dict() for p in rb.packages]
    strip = lambda t: [ln for ln in t.splitlines()  # noqa: E731
                       if not ln.startswith(("# resolver:", "#   stackbuild lock", "# overrides", "# content sha256:"))]
    assert strip(a.read_text()) == strip(b.read_text())
    assert "--resolver uv" in b.read_text()


def test_transitive_declaration_pip_tools_explains_uv_overrides(tmp_path: Path, universe: Universe) -> None:
    # vLLM 0.19.0 pins compressed-tensors==0.14.0.1, which itself requires transformers<5.0.0
    tree = make_tree(tmp_path, "sbt-epsilon==1.0\nsbt-gamma>=4,<5\n")
    recipe = make_recipe(tmp_path, GAMMA_OVERRIDE)
    with pytest.raises(ResolutionFailed) as e:
        lock(recipe, requirements_from=tree, output=tmp_path / "l.txt", index_url=universe.main)
    msg = str(e.value)
    assert "vllm requirements/common.txt:1" in msg and "sbt-epsilon 1.0 requires sbt-gamma<5" in msg
    assert "--resolver uv" in msg and "pip._" not in msg
    result = lock(recipe, requirements_from=tree, output=tmp_path / "l.txt", index_url=universe.main, resolver="uv")
    assert versions(result) == {"sbt-epsilon": "1.0", "sbt-gamma": "5.0"}
    assert "uv applies them through the whole dependency graph" in (tmp_path / "l.txt").read_text()


def test_uv_missing_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "uv", None)  # `import uv` fails as if not installed
    with pytest.raises(ResolverMissing, match="pip install uv"):
        lock(make_recipe(tmp_path), requirements_from=None, output=tmp_path / "l.txt", resolver="uv")
    assert not (tmp_path / "l.txt").exists()


# ---------------------------------------------------------------- network


@pytest.mark.network
def test_lock_against_the_package_index(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, 'six = "==1.16.0"\n')
    out = tmp_path / "l.txt"
    result = lock(recipe, requirements_from=None, output=out)
    [six] = result.packages
    assert six.version == "1.16.0"
    # the wheel and the sdist on the index
    assert "8abb2f1d86890a2dfb989f9a77cfcfd3e47c2a354b01111771326f8aa26e0254" in six.hashes
    assert "1e61c37477a1626458e36f7b1d82aa5c9b094fa4802892072e49de9c60c4c926" in six.hashes
    assert "# primary index: https://pypi.org/simple" in out.read_text()
    assert os.environ["PIP_FIND_LINKS"] not in out.read_text()
