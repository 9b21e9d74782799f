"""Recipes: schema, `extends`, and an error naming the file and the key for each
kind of bad input."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stackbuild.errors import RecipeError
from stackbuild.platforms import B70, LUNAR_LAKE
from stackbuild.recipe import PatchKind, SourceKind, list_recipe_names, load_recipe

SHA_A = "a" * 64
SHA_B = "b" * 64


def write(root: Path, name: str, text: str) -> Path:
    d = root / "recipes"
    d.mkdir(parents=True, exist_ok=True)
    (root / "patches").mkdir(exist_ok=True)
    p = d / f"{name}.toml"
    p.write_text(textwrap.dedent(text))
    return p


BASE = f"""
    platform = "b70"
    description = "shared base"

    [sources.vllm]
    pypi = "vllm==0.19.0"
    sha256 = "{SHA_A}"

    [[patches]]
    file = "patches/base-fix.patch"
    source = "vllm"
    sha256 = "{SHA_A}"

    [pins]
    transformers = "==5.5.0"
    numpy = "==2.0.0"

    [environment.vars]
    FROM_BASE = "1"
    SHARED = "base"

    [checks]
    registry = ["Gemma4ForConditionalGeneration"]
"""


def load_error(path: Path) -> RecipeError:
    with pytest.raises(RecipeError) as ei:
        load_recipe(path)
    return ei.value


def test_minimal_recipe_loads(tmp_path: Path) -> None:
    p = write(tmp_path, "base", BASE)
    r = load_recipe(p)
    assert r.name == "base"
    assert r.platform is B70
    (src,) = r.sources
    assert src.kind is SourceKind.PYPI
    assert (src.project, src.version, src.sha256) == ("vllm", "0.19.0", SHA_A)
    (patch,) = r.patches
    assert (patch.name, patch.kind, patch.strip, patch.fuzz) == ("base-fix", PatchKind.FILE, 1, 0)
    assert r.sha256 == hashlib.sha256(r.raw.encode()).hexdigest()


def test_loading_by_name_from_project_root(tmp_path: Path) -> None:
    write(tmp_path, "base", BASE)
    write(tmp_path, "other", BASE)
    assert list_recipe_names(tmp_path) == ["base", "other"]
    assert load_recipe("other", root=tmp_path).name == "other"
    with pytest.raises(RecipeError, match="no recipe named 'nope'.*known: base, other"):
        load_recipe("nope", root=tmp_path)


def test_extends_merges_tables_and_concatenates_patches(tmp_path: Path) -> None:
    write(tmp_path, "base", BASE)
    child = write(tmp_path, "child", f"""
        extends = "base"
        platform = "lunar-lake"

        [sources.llm-scaler]
        git = "https://github.com/intel/llm-scaler"
        tag = "v1.0"

        [[patches]]
        file = "patches/child-fix.patch"
        source = "vllm"
        sha256 = "{SHA_B}"

        [pins]
        transformers = "==5.10.2"

        [environment.vars]
        SHARED = "child"
    """)
    r = load_recipe(child)
    assert r.extends == ("base",)
    assert r.platform is LUNAR_LAKE  # child wins on a scalar
    assert r.description == ""  # a base's name and description describe the base only
    assert [s.name for s in r.sources] == ["vllm", "llm-scaler"]  # tables merge
    assert [p.name for p in r.patches] == ["base-fix", "child-fix"]  # base's series first
    pins = {p.name: p.spec for p in r.pins}
    assert pins == {"transformers": "==5.10.2", "numpy": "==2.0.0"}
    env = dict(r.environment.vars)
    assert env["FROM_BASE"] == "1" and env["SHARED"] == "child"
    assert r.checks.registry == ("Gemma4ForConditionalGeneration",)
    # the hash covers the resolved recipe: changing the base changes the child
    before = r.sha256
    write(tmp_path, "base", BASE.replace("numpy = \"==2.0.0\"", "numpy = \"==2.1.0\""))
    assert load_recipe(child).sha256 != before


def test_extends_chain_of_three(tmp_path: Path) -> None:
    write(tmp_path, "base", BASE)
    write(tmp_path, "mid", 'extends = "base"\n[environment.vars]\nMID = "1"\n')
    top = write(tmp_path, "top", 'extends = "mid"\n')
    r = load_recipe(top)
    assert r.extends == ("mid", "base")
    assert dict(r.environment.vars)["MID"] == "1"


def test_extends_cycle_is_rejected_naming_the_chain(tmp_path: Path) -> None:
    write(tmp_path, "a", 'extends = "b"\nplatform = "b70"\n')
    write(tmp_path, "b", 'extends = "c"\n')
    write(tmp_path, "c", 'extends = "a"\n')
    e = load_error(tmp_path / "recipes" / "a.toml")
    assert "cycle in extends: a -> b -> c -> a" in e.message
    assert e.key == "extends"
    assert e.file is not None and e.file.endswith("c.toml")


def test_extends_itself_is_a_cycle(tmp_path: Path) -> None:
    p = write(tmp_path, "self", 'extends = "self"\nplatform = "b70"\n')
    assert "cycle in extends: self -> self" in load_error(p).message


def test_extends_unknown_recipe(tmp_path: Path) -> None:
    p = write(tmp_path, "child", 'extends = "ghost"\nplatform = "b70"\n')
    e = load_error(p)
    assert e.key == "extends" and "ghost" in e.message and e.file == str(p)


def test_unknown_top_level_key_names_file_and_key(tmp_path: Path) -> None:
    p = write(tmp_path, "r", 'platfrom = "b70"\n' + BASE)
    e = load_error(p)
    assert e.file == str(p)
    assert e.key == "platfrom"
    assert "unknown key" in e.message
    assert str(p) in str(e) and "platfrom" in str(e)


def test_unknown_key_in_a_source_and_in_a_patch(tmp_path: Path) -> None:
    p = write(tmp_path, "r", BASE.replace('pypi = "vllm==0.19.0"', 'pypi = "vllm==0.19.0"\nsha = "x"'))
    assert load_error(p).key == "sources.vllm.sha"
    p = write(tmp_path, "r", BASE.replace('source = "vllm"', 'source = "vllm"\nfuz = 1'))
    e = load_error(p)
    assert e.key == "patches[0].fuz" and e.file == str(p)


def test_unknown_key_in_an_extended_base_names_the_base_file(tmp_path: Path) -> None:
    base = write(tmp_path, "base", BASE.replace('source = "vllm"', 'source = "vllm"\nstirp = 1'))
    child = write(tmp_path, "child", 'extends = "base"\n')
    e = load_error(child)
    assert e.key == "patches[0].stirp"
    assert e.file == str(base)  # the file the bad entry lives in, not the child


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('platform = "b70"', "platform = 70", "platform"),
        ('file = "patches/base-fix.patch"', 'file = "patches/base-fix.patch"\nstrip = "1"', "patches[0].strip"),
        ('file = "patches/base-fix.patch"', 'file = "patches/base-fix.patch"\nfuzz = true', "patches[0].fuzz"),
        ('registry = ["Gemma4ForConditionalGeneration"]', 'registry = "Gemma4ForConditionalGeneration"', "checks.registry"),
        ('registry = ["Gemma4ForConditionalGeneration"]', "registry = [1]", "checks.registry[0]"),
        ('pypi = "vllm==0.19.0"', "pypi = 19", "sources.vllm.pypi"),
    ],
)
def test_wrong_type_names_the_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    assert old in BASE
    p = write(tmp_path, "r", BASE.replace(old, new))
    e = load_error(p)
    assert e.key == key
    assert e.file == str(p)
    assert "must be" in e.message


def test_patches_must_be_an_array_of_tables(tmp_path: Path) -> None:
    p = write(tmp_path, "r", 'platform = "b70"\npatches = "x.patch"\n')
    assert load_error(p).key == "patches"


def test_pypi_source_without_sha256(tmp_path: Path) -> None:
    p = write(tmp_path, "r", 'platform = "b70"\n[sources.vllm]\npypi = "vllm==0.19.0"\n')
    e = load_error(p)
    assert e.key == "sources.vllm.sha256" and "missing" in e.message


@pytest.mark.parametrize("bad", ["abc", "A" * 64, "g" * 64, "a" * 63, "a" * 65])
def test_malformed_sha256(tmp_path: Path, bad: str) -> None:
    p = write(tmp_path, "r", f'platform = "b70"\n[sources.vllm]\npypi = "vllm==0.19.0"\nsha256 = "{bad}"\n')
    e = load_error(p)
    assert e.key == "sources.vllm.sha256"
    assert "64 lowercase hex" in e.message


@pytest.mark.parametrize("req", ["vllm", "vllm>=0.19", "vllm==0.19.*", "vllm==0.19.0,!=0.19.1", "not a req ("])
def test_pypi_source_must_pin_one_exact_version(tmp_path: Path, req: str) -> None:
    p = write(tmp_path, "r", f'platform = "b70"\n[sources.vllm]\npypi = "{req}"\nsha256 = "{SHA_A}"\n')
    assert load_error(p).key == "sources.vllm.pypi"


def test_git_branch_without_float_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "r", 'platform = "b70"\n[sources.s]\ngit = "https://github.com/intel/llm-scaler"\nbranch = "main"\n')
    e = load_error(p)
    assert e.key == "sources.s.branch"
    assert "float = true" in e.message


def test_git_floating_branch_is_allowed(tmp_path: Path) -> None:
    p = write(tmp_path, "r", 'platform = "b70"\n[sources.s]\ngit = "https://github.com/intel/llm-scaler"\nbranch = "main"\nfloat = true\n')
    (s,) = load_recipe(p).sources
    assert (s.kind, s.branch, s.float) == (SourceKind.GIT, "main", True)


def test_git_source_needs_a_ref_and_a_full_commit(tmp_path: Path) -> None:
    p = write(tmp_path, "r", 'platform = "b70"\n[sources.s]\ngit = "https://x/y"\n')
    assert load_error(p).key == "sources.s"
    p = write(tmp_path, "r", 'platform = "b70"\n[sources.s]\ngit = "https://x/y"\ncommit = "deadbeef"\n')
    e = load_error(p)
    assert e.key == "sources.s.commit" and "40-digit" in e.message


def test_source_needs_exactly_one_kind(tmp_path: Path) -> None:
    p = write(tmp_path, "r", f'platform = "b70"\n[sources.s]\npypi = "vllm==0.19.0"\nsha256 = "{SHA_A}"\npath = "/tmp"\n')
    assert load_error(p).key == "sources.s"


def test_unknown_platform(tmp_path: Path) -> None:
    p = write(tmp_path, "r", BASE.replace('platform = "b70"', 'platform = "a770"'))
    e = load_error(p)
    assert e.key == "platform"
    assert "a770" in e.message and "b70" in e.message and "lunar-lake" in e.message


def test_missing_platform(tmp_path: Path) -> None:
    p = write(tmp_path, "r", BASE.replace('platform = "b70"', ""))
    assert load_error(p).key == "platform"


def test_patch_naming_an_unknown_source(tmp_path: Path) -> None:
    p = write(tmp_path, "r", BASE.replace('source = "vllm"', 'source = "vlm"'))
    e = load_error(p)
    assert e.key == "patches[0].source"
    assert "'vlm'" in e.message and "vllm" in e.message


def test_from_patch_naming_an_unknown_holder_source(tmp_path: Path) -> None:
    p = write(tmp_path, "r", BASE + '\n[[patches]]\nfrom = "llm-scaler"\npath = "x.patch"\nsource = "vllm"\n')
    assert load_error(p).key == "patches[1].from"


def test_patch_file_without_sha256(tmp_path: Path) -> None:
    p = write(tmp_path, "r", BASE + '\n[[patches]]\nfile = "patches/x.patch"\nsource = "vllm"\n')
    e = load_error(p)
    assert e.key == "patches[1].sha256" and "missing" in e.message


def test_two_patches_with_one_name(tmp_path: Path) -> None:
    p = write(tmp_path, "r", BASE + f'\n[[patches]]\nfile = "other/base-fix.patch"\nsource = "vllm"\nsha256 = "{SHA_B}"\n')
    e = load_error(p)
    assert e.key == "patches" and "base-fix" in e.message


def test_backport_files_must_stay_inside_the_tree(tmp_path: Path) -> None:
    p = write(tmp_path, "r", BASE + f'\n[[patches]]\nbackport = "vllm==0.23.0"\nsha256 = "{SHA_B}"\nsource = "vllm"\nfiles = ["../../etc/passwd"]\n')
    assert load_error(p).key == "patches[1].files[0]"


def test_name_must_match_the_file_name(tmp_path: Path) -> None:
    p = write(tmp_path, "b70-gemma4", 'name = "b70-gemma"\n' + BASE)
    e = load_error(p)
    assert e.key == "name"
    assert "b70-gemma4" in e.message and "b70-gemma" in e.message


def test_not_toml(tmp_path: Path) -> None:
    p = write(tmp_path, "r", "platform = \n")
    e = load_error(p)
    assert e.file == str(p) and "TOML" in e.message


def test_pin_forms(tmp_path: Path) -> None:
    p = write(tmp_path, "r", BASE + f"""
        [pins.torch]
        version = "==2.10.0+xpu"
        index = "https://download.pytorch.org/whl/xpu"
        [pins.vllm-xpu-kernels]
        url = "https://example.invalid/k.whl"
        sha256 = "{SHA_B}"
    """)
    r = load_recipe(p)
    torch = r.pin("torch")
    assert torch is not None and torch.index == "https://download.pytorch.org/whl/xpu"
    k = r.pin("vllm-xpu-kernels")
    assert k is not None and k.requirement() == "vllm-xpu-kernels @ https://example.invalid/k.whl"
    bad = write(tmp_path, "r", BASE + '\n[pins.k]\nurl = "https://example.invalid/k.whl"\n')
    assert load_error(bad).key == "pins.k.sha256"


# ------------------------------------------------------------------ hostile and broken input (issue 13 item 1, issue 12 items 3 and 5)


def test_non_utf8_recipe_names_the_file_and_the_byte_offset(tmp_path: Path) -> None:
    p = write(tmp_path, "r", 'platform = "b70"\n')
    p.write_bytes(b'platform = "b70"\ndescription = "caf\xe9"\n')
    e = load_error(p)
    assert e.file == str(p)
    assert "not UTF-8" in e.message and "0xe9" in e.message and "offset 35" in e.message


def test_non_utf8_extended_base_names_the_base(tmp_path: Path) -> None:
    base = write(tmp_path, "base", BASE)
    base.write_bytes(base.read_bytes() + b"# \xff\n")
    child = write(tmp_path, "child", 'extends = "base"\n')
    assert load_error(child).file == str(base)


@pytest.mark.parametrize("ext", ["sub/../child", "./child", "../recipes/child", "/etc/passwd", "child.toml/..", "Child", ""])
def test_path_like_extends_is_refused_not_followed(tmp_path: Path, ext: str) -> None:
    (tmp_path / "recipes" / "sub").mkdir(parents=True)
    child = write(tmp_path, "child", f'extends = "{ext}"\nplatform = "b70"\n')
    e = load_error(child)
    assert e.key == "extends" and e.file == str(child)
    assert "not a path" in e.message


def test_extends_cycle_through_two_files_is_named(tmp_path: Path) -> None:
    write(tmp_path, "a", 'extends = "b"\nplatform = "b70"\n')
    b = write(tmp_path, "b", 'extends = "a"\n')
    e = load_error(tmp_path / "recipes" / "a.toml")
    assert "cycle" in e.message and e.file == str(b)


def test_extends_through_a_symlink_leaving_the_project_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "evil.toml"
    outside.parent.mkdir()
    outside.write_text(BASE)
    child = write(tmp_path / "proj", "child", 'extends = "base"\n')
    (tmp_path / "proj" / "recipes" / "base.toml").symlink_to(outside)
    e = load_error(child)
    assert e.key == "extends" and "outside the project" in e.message


@pytest.mark.parametrize(("patches", "key"), [("5", "patches"), ('"abc"', "patches"), ("{ file = 'x' }", "patches"),
                                             ("[1, 2]", "patches[0]"), ('["x.patch"]', "patches[0]")])
def test_bad_patches_under_extends_names_the_file_and_key(tmp_path: Path, patches: str, key: str) -> None:
    write(tmp_path, "base", BASE)  # one patch of its own: the child's entries are counted in the child
    child = write(tmp_path, "child", f'extends = "base"\npatches = {patches}\n')
    e = load_error(child)
    assert e.file == str(child) and e.key == key
    assert "'a'" not in e.message  # never split into characters


def test_bad_patches_in_the_base_names_the_base(tmp_path: Path) -> None:
    base = write(tmp_path, "base", 'platform = "b70"\npatches = "abc"\n')
    child = write(tmp_path, "child", 'extends = "base"\n')
    e = load_error(child)
    assert e.file == str(base) and e.key == "patches"


def test_a_nested_key_named_patches_merges_as_a_table_not_a_list(tmp_path: Path) -> None:
    write(tmp_path, "base", BASE + '\n[environment.vars.patches]\n')
    child = write(tmp_path, "child", 'extends = "base"\n[environment.vars]\npatches = "2"\n')
    # the nested key is an environment variable like any other: the child's string wins
    r = load_recipe(child)
    assert dict(r.environment.vars)["patches"] == "2"
    assert [p.name for p in r.patches] == ["base-fix"]


@pytest.mark.parametrize(("table", "value"), [("environment.vars", "true"), ("environment.vars", "1"),
                                              ("build.env", "false"), ("build.env", "4"), ("environment.vars", "1.5")])
def test_non_string_variables_are_refused_naming_the_key(tmp_path: Path, table: str, value: str) -> None:
    p = write(tmp_path, "r", f'platform = "b70"\n[{table}]\nFLAG = {value}\n')
    e = load_error(p)
    assert e.key == f"{table}.FLAG" and "a string" in e.message


def test_error_in_an_extended_base_table_names_the_base(tmp_path: Path) -> None:
    base = write(tmp_path, "base", BASE.replace('SHARED = "base"', "SHARED = true"))
    child = write(tmp_path, "child", 'extends = "base"\n[environment.vars]\nOTHER = "x"\n')
    e = load_error(child)
    assert e.key == "environment.vars.SHARED" and e.file == str(base)
    base = write(tmp_path, "base", 'platform = "b70"\n[sources.vllm]\npypi = "vllm==0.19.0"\nsha256 = "xyz"\n')
    e = load_error(child)
    assert e.key == "sources.vllm.sha256" and e.file == str(base)
    # the child overriding the bad value makes the recipe good: the error followed the value
    write(tmp_path, "child", f'extends = "base"\n[sources.vllm]\nsha256 = "{SHA_B}"\n')
    assert load_recipe(child).source("vllm").sha256 == SHA_B


@pytest.mark.parametrize("name", ["R", "a b", "r$(touch x)", "_r", "-r", "r;x", "ré"])
def test_recipe_and_source_names_are_plain(tmp_path: Path, name: str) -> None:
    (tmp_path / "recipes").mkdir()
    p = tmp_path / "recipes" / f"{name}.toml"
    p.write_text('platform = "b70"\n')
    (tmp_path / "patches").mkdir()
    assert load_error(p).key == "name"
    src = name.replace('"', "")
    q = write(tmp_path, "ok", f'platform = "b70"\n[sources."{src}"]\npypi = "vllm==0.19.0"\nsha256 = "{SHA_A}"\n')
    assert load_error(q).key == f"sources.{src}"


@pytest.mark.parametrize("value", ["a\\nb", "x\\rEOF", "tab\\there", "nul\\u0000", "esc\\u001b[31m", "del\\u007f", "ls\\u2028x"])
@pytest.mark.parametrize("where", ["description", "environment.vars.X", "pins.torch.index", "sources.vllm.pypi", "patches[0].description"])
def test_control_characters_are_refused_at_load_naming_the_key(tmp_path: Path, value: str, where: str) -> None:
    text = {
        "description": f'description = "{value}"\n',
        "environment.vars.X": f'[environment.vars]\nX = "{value}"\n',
        "pins.torch.index": f'[pins.torch]\nversion = "==2.0"\nindex = "{value}"\n',
        "sources.vllm.pypi": f'[sources.vllm]\npypi = "{value}"\nsha256 = "{SHA_A}"\n',
        "patches[0].description": f'[[patches]]\nfile = "patches/x.patch"\nsource = "vllm"\nsha256 = "{SHA_A}"\ndescription = "{value}"\n',
    }[where]
    p = write(tmp_path, "r", 'platform = "b70"\n' + text)
    e = load_error(p)
    assert e.key == where and "control character" in e.message


def test_bad_environment_variable_name_is_refused(tmp_path: Path) -> None:
    p = write(tmp_path, "r", 'platform = "b70"\n[environment.vars]\n"A;touch x" = "1"\n')
    assert load_error(p).key == "environment.vars.A;touch x"


@pytest.mark.parametrize("rel", ["/etc/passwd", "../../outside.patch", "patches/../../outside.patch", "patches/link.patch"])
def test_patch_files_outside_the_project_are_refused_without_reading_them(tmp_path: Path, rel: str) -> None:
    proj = tmp_path / "proj"
    (tmp_path / "outside.patch").write_text("secret\n")
    p = write(proj, "r", f'platform = "b70"\n[sources.vllm]\npypi = "vllm==0.19.0"\nsha256 = "{SHA_A}"\n'
                         f'[[patches]]\nfile = "{rel}"\nsource = "vllm"\nsha256 = "{SHA_A}"\n')
    (proj / "patches" / "link.patch").symlink_to(tmp_path / "outside.patch")
    e = load_error(p)
    assert e.key == "patches[0].file" and "outside the project" in e.message
    secret_sha = hashlib.sha256(b"secret\n").hexdigest()
    assert secret_sha not in e.render() and "secret" not in e.render()


def test_allow_dirs_lets_a_recipe_name_an_outside_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proj = tmp_path / "proj"
    shared = tmp_path / "shared-patches"
    shared.mkdir()
    p = write(proj, "r", f'platform = "b70"\n[sources.vllm]\npath = "{tmp_path / "fork"}"\n'
                         f'[[patches]]\nfile = "{shared / "x.patch"}"\nsource = "vllm"\nsha256 = "{SHA_A}"\n')
    assert load_error(p).key == "sources.vllm.path"
    monkeypatch.setenv("STACKBUILD_ALLOW_DIRS", str(tmp_path / "fork"))
    assert load_error(p).key == "patches[0].file"
    monkeypatch.setenv("STACKBUILD_ALLOW_DIRS", f"{tmp_path / 'fork'}:{shared}")
    r = load_recipe(p)
    assert r.source("vllm").path == str(tmp_path / "fork")


def test_local_source_path_is_relative_to_the_project_root(tmp_path: Path) -> None:
    from stackbuild.recipe import local_source_dir

    p = write(tmp_path, "r", 'platform = "b70"\n[sources.vllm]\npath = "forks/vllm"\n')
    r = load_recipe(p)
    assert local_source_dir(r, r.source("vllm")) == (tmp_path / "forks" / "vllm").resolve()
    q = write(tmp_path, "q", 'platform = "b70"\n[sources.vllm]\npath = "../my-vllm-fork"\n')
    assert "outside the project" in load_error(q).message


def test_deeply_nested_toml_is_a_recipe_error(tmp_path: Path) -> None:
    p = write(tmp_path, "r", 'platform = "b70"\n')
    p.write_text('platform = "b70"\nx = ' + "[" * 5000 + "]" * 5000 + "\n")
    assert "nested too deeply" in load_error(p).message


def test_a_byte_order_mark_is_not_content(tmp_path: Path) -> None:
    p = write(tmp_path, "r", 'platform = "b70"\n')
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    assert load_recipe(p).platform is B70


@pytest.mark.parametrize(("pin", "key"), [
    ('"x; touch /tmp/p" = "==1.0"', "pins.x; touch /tmp/p"),
    ('numpy = "==1.0; os_name == \'nt\'"', "pins.numpy.version"),
    ('numpy = "==1.0 $(id)"', "pins.numpy.version"),
    ('numpy = { version = "==1.0", markers = "python_version >= \'3.10\' and $(id)" }', "pins.numpy.markers"),
    ('"-e" = "==1.0"', "pins.-e"),
])
def test_pins_are_package_names_specifiers_and_markers(tmp_path: Path, pin: str, key: str) -> None:
    p = write(tmp_path, "r", f'platform = "b70"\n[pins]\n{pin}\n')
    assert load_error(p).key == key


@pytest.mark.parametrize("name", ["../../evil", "a/b", ".hidden", "with space", "-x"])
def test_patch_names_cannot_become_paths(tmp_path: Path, name: str) -> None:
    p = write(tmp_path, "r", f'platform = "b70"\n[sources.vllm]\npypi = "vllm==0.19.0"\nsha256 = "{SHA_A}"\n'
                         f'[[patches]]\nname = "{name}"\nfile = "patches/x.patch"\nsource = "vllm"\nsha256 = "{SHA_A}"\n')
    assert load_error(p).key == "patches[0].name"


_SPEC_PARTS = ["==", "!=", ">=", "<=", ">", "<", "~=", "===", "=", " ", ",", "1", "0", ".", "+", "xpu", "*",
               "post1", "rc2", "!", "a", "-", ";"]


@given(st.lists(st.sampled_from(_SPEC_PARTS), max_size=8).map("".join))
@settings(max_examples=400, deadline=None)
def test_pin_fast_path_never_accepts_what_packaging_rejects(spec: str) -> None:
    """The start-up fast path for pin versions (packaging.specifiers not imported) agrees
    with packaging on every spec it accepts: it may only hand a spec on, never pass a bad one."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    from stackbuild.recipe import _is_simple_version_spec

    if _is_simple_version_spec(spec):
        try:
            SpecifierSet(spec)
        except InvalidSpecifier:
            raise AssertionError(f"fast path accepted {spec!r}, which packaging rejects") from None


@pytest.mark.parametrize("spec", [">=1.0+xpu", "==1.0,>=2.0+x", "==bad!", "<1.0;", "=1.0"])
def test_pin_with_a_bad_version_is_refused_naming_the_key(tmp_path: Path, spec: str) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes/r.toml").write_text(f'platform = "b70"\n[pins]\ntorch = {{ version = "{spec}" }}\n')
    with pytest.raises(RecipeError, match=r"pins\.torch\.version"):
        load_recipe(tmp_path / "recipes/r.toml", tmp_path)


def test_refresh_verdict_is_a_one_line_string_on_a_patch(tmp_path: Path) -> None:
    """`refresh_verdict` (the mark refresh leaves on an undecided entry) is read as it
    is; anything but a non-empty single-line string is refused naming the key."""
    entry = f'[sources.vllm]\npypi = "vllm==0.19.0"\nsha256 = "{SHA_A}"\n\n[[patches]]\nfile = "patches/x.patch"\nsource = "vllm"\nsha256 = "{SHA_A}"\n'
    p = write(tmp_path, "ok", 'platform = "b70"\n' + entry + 'refresh_verdict = "obsolete: \\"x.py\\" is gone"\n')
    (patch,) = load_recipe(p).patches
    assert patch.refresh_verdict == 'obsolete: "x.py" is gone'
    assert load_recipe(write(tmp_path, "plain", 'platform = "b70"\n' + entry)).patches[0].refresh_verdict is None
    for bad, why in (("1", "str"), ('""', "is empty"), ('"conflict\\nrm -rf"', "control character")):
        e = load_error(write(tmp_path, "bad", 'platform = "b70"\n' + entry + f"refresh_verdict = {bad}\n"))
        assert e.key == "patches[0].refresh_verdict" and why in e.message, e.render()
