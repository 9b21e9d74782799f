"""`apply_recipe`: a git workspace per patched source, one commit per patch, a
manifest, idempotent re-runs, and a failed or interrupted apply that leaves the
previous workspace byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import git
import pytest
from filelock import FileLock

from stackbuild.errors import PatchError, StackbuildError
from stackbuild.manifest import read_manifest
from stackbuild.recipe import Recipe, load_recipe
from stackbuild.series import PatchVerdict
from stackbuild.workspace import BASE_TAG, ApplyResult, apply_recipe

# ------------------------------------------------------------------ helpers (also used by test_series, test_cli)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@dataclass
class Project:
    """A stackbuild project in a temporary directory: recipes/, patches/, and local
    upstream trees under upstream/."""

    root: Path

    def __post_init__(self) -> None:
        (self.root / "recipes").mkdir(parents=True, exist_ok=True)
        (self.root / "patches").mkdir(exist_ok=True)

    @property
    def workdir(self) -> Path:
        return self.root / "work"

    def add_patch(self, rel: str, data: bytes | str) -> str:
        p = self.root / "patches" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return f"patches/{rel}"

    def add_tree(self, name: str, files: dict[str, str | bytes]) -> Path:
        d = self.root / "upstream" / name
        for rel, content in files.items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content.encode() if isinstance(content, str) else content)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_recipe(
        self,
        name: str,
        sources: dict[str, dict[str, Any]],
        patches: Iterable[dict[str, Any]] = (),
        platform: str = "b70",
        extra: str = "",
    ) -> Path:
        lines = [f"platform = {toml_value(platform)}", ""]
        for sname, table in sources.items():
            lines.append(f"[sources.{sname}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
            lines.append("")
        for entry in patches:
            lines.append("[[patches]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in entry.items()]
            lines.append("")
        path = self.root / "recipes" / f"{name}.toml"
        path.write_text("\n".join(lines) + extra)
        return path

    def simple(
        self,
        files: dict[str, str | bytes],
        patches: Iterable[tuple[str, bytes | str] | tuple[str, bytes | str, dict[str, Any]]],
        name: str = "r",
    ) -> Recipe:
        """A recipe with one local source `pkg` holding `files`, and the patches (name,
        bytes[, extra recipe keys]) in series order."""
        tree = self.add_tree("pkg", files)
        entries = []
        for p in patches:
            pname, data = p[0], p[1]
            opts = p[2] if len(p) > 2 else {}  # type: ignore[misc]
            rel = self.add_patch(f"{pname}.patch", data)
            entries.append({"file": rel, "source": "pkg", "sha256": sha256(self.root.joinpath(rel).read_bytes()), **opts})
        return load_recipe(self.write_recipe(name, {"pkg": {"path": str(tree)}}, entries))

    def apply(self, recipe: Recipe, **kw: Any) -> ApplyResult:
        return apply_recipe(recipe, self.workdir, **kw)


def git_diff(files_before: dict[str, str], files_after: dict[str, str], tmp: Path, message: str = "change") -> str:
    """A real `git format-patch` of one commit taking files_before to files_after."""
    repo = git.Repo.init(tmp, initial_branch="main")
    with repo.config_writer() as cw:
        cw.set_value("user", "name", "Dev")
        cw.set_value("user", "email", "dev@example.com")
    for rel, text in files_before.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    repo.index.add(list(files_before))
    repo.index.commit("base")
    for rel, text in files_after.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    repo.index.add(list(files_after))
    repo.index.commit(message)
    return str(repo.git.format_patch("--stdout", "HEAD~1")) + "\n"


def snapshot(root: Path) -> dict[str, str]:
    """Every file (and symlink) under `root`, .git included, by content hash."""
    out: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            rel = str(p.relative_to(root))
            out[rel] = "link:" + os.readlink(p) if p.is_symlink() else sha256(p.read_bytes())
    return out


def log_messages(tree: Path) -> list[str]:
    repo = git.Repo(tree)
    return [str(c.message).split("\n")[0] for c in repo.iter_commits("HEAD")][::-1]


ORIG = "".join(f"line {i}\n" for i in range(1, 21))


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


# ------------------------------------------------------------------ tests


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("STACKBUILD_CACHE", str(d))
    return d


@pytest.fixture
def two_patch_project(tmp_path: Path, cache: Path) -> tuple[Project, Recipe]:
    proj = Project(tmp_path / "proj")
    files = {"pkg/a.py": ORIG, "pkg/b.py": ORIG}
    p1 = git_diff(files, {"pkg/a.py": edit(ORIG, "line 3\n", "line three\n")}, tmp_path / "g1", "Spell out three in a.py")
    p2 = git_diff(files, {"pkg/b.py": edit(ORIG, "line 17\n", "line seventeen\n")}, tmp_path / "g2", "Spell out seventeen in b.py")
    recipe = proj.simple(files, [("first", p1), ("second", p2)])
    return proj, recipe


def test_apply_commits_each_patch_and_records_a_manifest(two_patch_project: tuple[Project, Recipe]) -> None:
    proj, recipe = two_patch_project
    progress: list[str] = []
    r = proj.apply(recipe, progress=progress.append)
    assert r.ok and r.changed and r.exit_code == 0
    assert [(p.name, p.verdict) for p in r.patches] == [("first", PatchVerdict.APPLIED), ("second", PatchVerdict.APPLIED)]
    assert any("first" in m for m in progress)

    tree = proj.workdir / "pkg"
    assert "line three\n" in (tree / "pkg/a.py").read_text()
    assert "line seventeen\n" in (tree / "pkg/b.py").read_text()
    repo = git.Repo(tree)
    assert not repo.is_dirty(untracked_files=True)
    base = repo.tags[BASE_TAG].commit
    assert [c.hexsha for c in repo.iter_commits(f"{BASE_TAG}..HEAD")][::-1] == [p.commit for p in r.patches]
    assert log_messages(tree)[1:] == ["Spell out three in a.py", "Spell out seventeen in b.py"]
    # the base is the pristine upstream
    assert (base.tree / "pkg/a.py").data_stream.read().decode() == ORIG

    m = read_manifest(proj.workdir)
    assert m is not None and m == r.manifest
    assert m.recipe == "r" and m.recipe_sha256 == recipe.sha256
    (src,) = m.sources
    assert src.kind == "local" and src.tree == "pkg"
    assert src.base_commit == base.hexsha and src.head_commit == repo.head.commit.hexsha
    # a local folder that is not a git checkout is keyed by a digest of its files
    assert src.sha256 and src.sha256.startswith("files-") and len(src.sha256) == len("files-") + 64
    shas = {p.name: sha256((proj.root / p.file).read_bytes()) for p in recipe.patches if p.file}
    assert [(p.name, p.sha256, p.verdict, p.files) for p in m.patches] == [
        ("first", shas["first"], "applied", ("pkg/a.py",)),
        ("second", shas["second"], "applied", ("pkg/b.py",)),
    ]
    # the manifest on disk is JSON with the same facts
    d = json.loads((proj.workdir / "manifest.json").read_text())
    assert d["patches"][0]["verdict"] == "applied" and d["recipe_sha256"] == recipe.sha256
    # the result renders as a table: patch, verdict, detail
    (table,) = r.tables()
    assert table.columns == ("patch", "verdict", "detail")
    assert [row[:2] for row in table.rows] == [("first", "applied"), ("second", "applied")]
    assert json.loads(json.dumps(r.to_dict()))["patches"][1]["verdict"] == "applied"


def test_rerun_with_unchanged_inputs_changes_nothing(two_patch_project: tuple[Project, Recipe]) -> None:
    proj, recipe = two_patch_project
    first = proj.apply(recipe)
    a = proj.workdir / "pkg" / "pkg" / "a.py"
    st = a.stat()
    before = snapshot(proj.workdir)
    again = proj.apply(load_recipe(recipe.path))
    assert again.ok and not again.changed
    assert "unchanged" in again.message
    assert [p.verdict for p in again.patches] == [p.verdict for p in first.patches]
    st2 = a.stat()
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert snapshot(proj.workdir) == before


def test_force_rebuilds_with_identical_commits(two_patch_project: tuple[Project, Recipe]) -> None:
    proj, recipe = two_patch_project
    first = proj.apply(recipe)
    ino = (proj.workdir / "pkg" / "pkg" / "a.py").stat().st_ino
    forced = proj.apply(recipe, force=True)
    assert forced.changed
    assert (proj.workdir / "pkg" / "pkg" / "a.py").stat().st_ino != ino
    # deterministic commits: same inputs, same commit ids
    assert [p.commit for p in forced.patches] == [p.commit for p in first.patches]


def test_changed_patch_rebuilds(two_patch_project: tuple[Project, Recipe], tmp_path: Path) -> None:
    proj, recipe = two_patch_project
    proj.apply(recipe)
    files = {"pkg/a.py": ORIG, "pkg/b.py": ORIG}
    p1 = git_diff(files, {"pkg/a.py": edit(ORIG, "line 3\n", "line THREE\n")}, tmp_path / "g3", "Shout three")
    proj.add_patch("first.patch", p1)
    text = recipe.path.read_text().replace(recipe.patches[0].sha256 or "", sha256(p1))
    recipe.path.write_text(text)
    r = proj.apply(load_recipe(recipe.path))
    assert r.ok and r.changed
    assert "line THREE\n" in (proj.workdir / "pkg/pkg/a.py").read_text()
    assert log_messages(proj.workdir / "pkg")[1] == "Shout three"


def test_changed_local_source_rebuilds(two_patch_project: tuple[Project, Recipe]) -> None:
    proj, recipe = two_patch_project
    proj.apply(recipe)
    (proj.root / "upstream/pkg/NEWS").write_text("new upstream file\n")
    r = proj.apply(load_recipe(recipe.path))
    assert r.changed
    assert (proj.workdir / "pkg/NEWS").read_text() == "new upstream file\n"


def test_hand_edited_workspace_is_refused_then_rebuilt_with_force(two_patch_project: tuple[Project, Recipe]) -> None:
    proj, recipe = two_patch_project
    proj.apply(recipe)
    (proj.workdir / "pkg/pkg/a.py").write_text("scribbled\n")
    (proj.workdir / "pkg/pkg/new.py").write_text("mine\n")
    before = snapshot(proj.workdir)
    with pytest.raises(StackbuildError) as ei:
        proj.apply(recipe)
    assert ei.value.exit_code == 2
    assert "pkg/a.py" in ei.value.message and "pkg/new.py" in ei.value.message
    assert "stackbuild snapshot" in ei.value.message and "--force" in ei.value.message
    assert snapshot(proj.workdir) == before  # nothing lost
    r = proj.apply(recipe, force=True)
    assert r.changed
    assert "line three\n" in (proj.workdir / "pkg/pkg/a.py").read_text()
    assert not (proj.workdir / "pkg/pkg/new.py").exists()


def test_failing_patch_leaves_previous_workspace_byte_for_byte(two_patch_project: tuple[Project, Recipe], tmp_path: Path) -> None:
    proj, recipe = two_patch_project
    proj.apply(recipe)
    before = snapshot(proj.workdir)
    files = {"pkg/b.py": edit(ORIG, "line 10\n", "something else\n")}
    bad = git_diff(files, {"pkg/b.py": edit(files["pkg/b.py"], "something else\n", "x\n")}, tmp_path / "g4", "Does not fit")
    rel = proj.add_patch("third.patch", bad)
    text = recipe.path.read_text() + f'\n[[patches]]\nfile = "{rel}"\nsource = "pkg"\nsha256 = "{sha256(bad)}"\n'
    recipe.path.write_text(text)
    r = proj.apply(load_recipe(recipe.path))
    assert not r.ok and not r.changed and r.exit_code == 1  # a conflict is a verdict about the world, not bad input
    assert r.failed is not None and r.failed.name == "third"
    assert r.failed.verdict is PatchVerdict.CONFLICT
    assert "third" in r.message and rel in r.message and "left as it was" in r.message
    assert snapshot(proj.workdir) == before
    assert _staging_left(proj) == []


def _staging_left(proj: Project) -> list[str]:
    return [p.name for p in proj.workdir.parent.iterdir() if p.name.startswith((".work.new-", ".work.old-"))]


def test_failure_stops_the_series_and_marks_the_rest_not_attempted(tmp_path: Path, cache: Path) -> None:
    proj = Project(tmp_path / "proj")
    files = {"a.txt": ORIG}
    good = git_diff(files, {"a.txt": edit(ORIG, "line 2\n", "two\n")}, tmp_path / "g1", "good")
    bad = git_diff({"a.txt": "other\n"}, {"a.txt": "changed\n"}, tmp_path / "g2", "bad")
    recipe = proj.simple(files, [("good", good), ("bad", bad), ("later", good)])
    r = proj.apply(recipe)
    assert [p.verdict for p in r.patches] == [PatchVerdict.APPLIED, PatchVerdict.CONFLICT, PatchVerdict.NOT_ATTEMPTED]
    assert "bad" in r.patches[2].detail
    assert not proj.workdir.exists()  # nothing swapped in, no half-patched tree
    assert _staging_left(proj) == []


def test_keyboard_interrupt_mid_series_leaves_old_workspace(two_patch_project: tuple[Project, Recipe]) -> None:
    proj, recipe = two_patch_project
    proj.apply(recipe)
    before = snapshot(proj.workdir)

    def interrupt(msg: str) -> None:
        if msg.startswith("[2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        proj.apply(recipe, force=True, progress=interrupt)
    assert snapshot(proj.workdir) == before
    assert _staging_left(proj) == []
    lock = proj.root / ".work.lock"
    # the lock was released: another run goes ahead
    assert proj.apply(recipe).ok
    assert not FileLock(str(lock)).is_locked


def test_lock_keeps_two_runs_apart(two_patch_project: tuple[Project, Recipe]) -> None:
    proj, recipe = two_patch_project
    lock = FileLock(str(proj.root / ".work.lock"))
    with lock, pytest.raises(StackbuildError) as ei:
        proj.apply(recipe)
    assert "in use by another stackbuild run" in str(ei.value)
    assert str(proj.workdir) in str(ei.value)
    assert not proj.workdir.exists()


def test_missing_patch_file_names_recipe_and_key(tmp_path: Path, cache: Path) -> None:
    proj = Project(tmp_path / "proj")
    tree = proj.add_tree("pkg", {"a.txt": "a\n"})
    path = proj.write_recipe("r", {"pkg": {"path": str(tree)}},
                             [{"file": "patches/nope.patch", "source": "pkg", "sha256": "0" * 64}])
    with pytest.raises(PatchError) as ei:
        proj.apply(load_recipe(path))
    e = ei.value
    assert e.file == str(path) and e.key == "patches[0].file"
    assert "patches/nope.patch" in e.message


def test_tampered_patch_file_is_refused(two_patch_project: tuple[Project, Recipe]) -> None:
    proj, recipe = two_patch_project
    f = proj.root / "patches/first.patch"
    f.write_bytes(f.read_bytes() + b"\n")
    with pytest.raises(PatchError) as ei:
        proj.apply(recipe)
    assert ei.value.key == "patches[0].sha256" and "sha256 mismatch" in ei.value.message
    assert not proj.workdir.exists()


def test_missing_local_source_is_a_user_error(tmp_path: Path, cache: Path) -> None:
    proj = Project(tmp_path / "proj")
    path = proj.write_recipe("r", {"pkg": {"path": str(tmp_path / "nowhere")}},
                             [{"file": "patches/x.patch", "source": "pkg", "sha256": "0" * 64}])
    with pytest.raises(StackbuildError) as ei:
        proj.apply(load_recipe(path))
    assert ei.value.key == "sources.pkg.path"


def test_relative_local_source_resolves_against_the_project_root(tmp_path: Path, cache: Path) -> None:
    proj = Project(tmp_path / "proj")
    proj.add_tree("pkg", {"a.txt": "a\n"})
    patch = "--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-a\n+b\n"
    rel = proj.add_patch("p.patch", patch)
    path = proj.write_recipe("r", {"pkg": {"path": "upstream/pkg"}},
                             [{"file": rel, "source": "pkg", "sha256": sha256(patch)}])
    r = proj.apply(load_recipe(path))
    assert r.ok and (proj.workdir / "pkg/a.txt").read_text() == "b\n"
    # the local source itself is never touched
    assert (proj.root / "upstream/pkg/a.txt").read_text() == "a\n"


def test_dry_run_fetches_and_writes_nothing(two_patch_project: tuple[Project, Recipe], cache: Path) -> None:
    proj, recipe = two_patch_project
    r = proj.apply(recipe, dry_run=True)
    assert r.ok and not r.changed and r.patches == ()
    assert any("first" in step for step in r.plan) and any("pkg" in step for step in r.plan)
    assert not proj.workdir.exists()


def test_default_workdir_is_work_under_the_project(two_patch_project: tuple[Project, Recipe], monkeypatch: pytest.MonkeyPatch) -> None:
    proj, recipe = two_patch_project
    r = apply_recipe(recipe)
    assert r.workdir == (proj.root / "work" / "r").resolve()
    assert (r.workdir / "manifest.json").exists()


# ------------------------------------------------------------------ the real vLLM release (network: the sdists)


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stackbuild cache pre-seeded with the real vLLM sdists, which tests/fixtures.py
    downloads once per run (sha256 checked)."""
    import shutil

    import fixtures

    cache = tmp_path_factory.mktemp("real-cache")
    for version in ("0.19.0", "0.23.0"):
        sha = fixtures.VLLM_SDISTS[version]
        dest = cache / "sdists" / sha / f"vllm-{version}.tar.gz"
        dest.parent.mkdir(parents=True)
        shutil.copyfile(fixtures.vllm_sdist(version), dest)
    return cache


@pytest.mark.network
@pytest.mark.slow
def test_real_vllm_release_with_a_patch_a_backport_and_a_site_packages_diff(
    tmp_path: Path, real_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import subprocess

    import fixtures

    monkeypatch.setenv("STACKBUILD_CACHE", str(real_cache))
    # everything comes from the seeded cache: an index lookup would fail loudly
    monkeypatch.setenv("STACKBUILD_INDEX_URL", "http://127.0.0.1:9/simple")
    repo_root = Path(__file__).resolve().parent.parent
    proj = Project(tmp_path / "proj")
    series = []
    for name in ("gemma4-unified-prereqs", "gemma4-unified-register"):
        data = (repo_root / "patches/vllm/0.19.0" / f"{name}.patch").read_bytes()
        series.append((name, proj.add_patch(f"{name}.patch", data), sha256(data)))
    # a diff someone made against an installed vLLM: extra leading path components
    pristine = fixtures.vllm_tree("0.19.0")
    site = tmp_path / "venv/lib/python3.11/site-packages/vllm"
    site.mkdir(parents=True)
    envs = (pristine / "vllm/envs.py").read_text()
    assert "import os\n" in envs
    shutil.copyfile(pristine / "vllm/envs.py", site / "envs.py.orig")
    (site / "envs.py").write_text(envs.replace("import os\n", "import os  # patched in site-packages\n", 1))
    diff = subprocess.run(["diff", "-u", "venv/lib/python3.11/site-packages/vllm/envs.py.orig",
                           "venv/lib/python3.11/site-packages/vllm/envs.py"], cwd=tmp_path, capture_output=True, text=True).stdout
    site_rel = proj.add_patch("site-packages.patch", diff)

    sha_19, sha_23 = fixtures.VLLM_SDISTS["0.19.0"], fixtures.VLLM_SDISTS["0.23.0"]
    backport_file = "vllm/model_executor/models/gemma4_unified.py"
    entries = [
        {"file": series[0][1], "source": "vllm", "sha256": series[0][2]},
        {"name": "gemma4-unified-backport", "backport": "vllm==0.23.0", "sha256": sha_23,
         "files": [backport_file], "source": "vllm", "description": "gemma4_unified from 0.23.0"},
        {"file": series[1][1], "source": "vllm", "sha256": series[1][2]},
        {"file": site_rel, "source": "vllm", "sha256": sha256(diff), "strip": 0},
    ]
    path = proj.write_recipe("real", {"vllm": {"pypi": "vllm==0.19.0", "sha256": sha_19}}, entries)
    recipe = load_recipe(path)
    r = proj.apply(recipe)
    assert r.ok, r.message
    assert [(p.name, p.verdict) for p in r.patches] == [
        ("gemma4-unified-prereqs", PatchVerdict.APPLIED),
        ("gemma4-unified-backport", PatchVerdict.APPLIED),
        ("gemma4-unified-register", PatchVerdict.APPLIED),
        ("site-packages", PatchVerdict.APPLIED),
    ], [p.detail for p in r.patches]
    assert "vllm/envs.py" in r.patches[3].detail  # said how the path was repaired

    tree = proj.workdir / "vllm"
    assert (tree / backport_file).read_bytes() == (fixtures.vllm_tree("0.23.0") / backport_file).read_bytes()
    assert not (pristine / backport_file).exists()
    assert "Gemma4UnifiedForConditionalGeneration" in (tree / "vllm/model_executor/models/registry.py").read_text()
    assert "_SUPPORTED_SOFT_TOKENS = (" in (tree / "vllm/model_executor/models/gemma4_mm.py").read_text()
    assert "# patched in site-packages" in (tree / "vllm/envs.py").read_text()
    ws = git.Repo(tree)
    assert not ws.is_dirty(untracked_files=True)
    assert len(list(ws.iter_commits(f"{BASE_TAG}..HEAD"))) == 4
    # the base commit is the pristine release, file for file
    base_files = set(ws.git.ls_tree("-r", "--name-only", BASE_TAG).splitlines())
    pristine_files = {str(p.relative_to(pristine)) for p in pristine.rglob("*") if p.is_file() or p.is_symlink()}
    assert base_files == pristine_files

    m = read_manifest(proj.workdir)
    assert m is not None and m.recipe_sha256 == recipe.sha256
    (src,) = m.sources
    assert (src.kind, src.ref, src.sha256) == ("pypi", "vllm==0.19.0", sha_19)
    assert src.base_commit == ws.tags[BASE_TAG].commit.hexsha and src.head_commit == ws.head.commit.hexsha
    assert [p.verdict for p in m.patches] == ["applied"] * 4
    assert m.patches[0].sha256 == series[0][2]
    assert m.patches[1].files == (backport_file,)

    again = proj.apply(load_recipe(path))
    assert again.ok and not again.changed


@pytest.mark.network
@pytest.mark.slow
def test_a_release_is_imported_once_then_cloned_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fixtures

    cache = fixtures.seed_cache(tmp_path / "cache", ("0.19.0",))
    monkeypatch.setenv("STACKBUILD_CACHE", str(cache))
    monkeypatch.setenv("STACKBUILD_INDEX_URL", "http://127.0.0.1:9/simple")
    sha_19 = fixtures.VLLM_SDISTS["0.19.0"]
    proj = Project(tmp_path / "proj")
    new_file = "diff --git a/NOTES b/NOTES\nnew file mode 100644\n--- /dev/null\n+++ b/NOTES\n@@ -0,0 +1 @@\n+ours\n"
    rel = proj.add_patch("notes.patch", new_file)
    path = proj.write_recipe("rel", {"vllm": {"pypi": "vllm==0.19.0", "sha256": sha_19}},
                             [{"file": rel, "source": "vllm", "sha256": sha256(new_file)}])
    first = apply_recipe(load_recipe(path), tmp_path / "ws1")
    assert first.ok
    base = cache / "bases" / f"{sha_19}.git"
    assert (base / "refs" / "heads" / "stackbuild").exists()
    # without the sdist, a second workspace can only come from the imported base
    for sdist in (cache / "sdists" / sha_19).iterdir():
        sdist.unlink()
    second = apply_recipe(load_recipe(path), tmp_path / "ws2")
    assert second.ok
    t1, t2 = git.Repo(tmp_path / "ws1" / "vllm"), git.Repo(tmp_path / "ws2" / "vllm")
    assert t1.tags[BASE_TAG].commit.hexsha == t2.tags[BASE_TAG].commit.hexsha  # deterministic
    assert not t2.remotes  # the workspace does not point into the cache
    assert (tmp_path / "ws2" / "vllm" / "vllm" / "envs.py").read_bytes() == (fixtures.vllm_tree("0.19.0") / "vllm/envs.py").read_bytes()


def test_cached_base_workspace_equals_a_full_checkout_of_its_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release or local source is patched on a sparse checkout and the other files are
    written out after the series: the workspace must still be, byte for byte and mode
    for mode, a full checkout of its HEAD (line-ending attributes, links, executables,
    deep folders), and clean."""
    import subprocess

    monkeypatch.setenv("STACKBUILD_CACHE", str(tmp_path / "cache"))
    proj = Project(tmp_path / "proj")
    files: dict[str, str | bytes] = {"pkg/a.py": ORIG, "pkg/b.py": ORIG, "deep/x/y/z.txt": b"z\r\n",
                                     "run.sh": "echo hi\n", ".gitattributes": "*.txt text eol=crlf\n"}
    patch = ("--- a/pkg/a.py\n+++ b/pkg/a.py\n@@ -1,3 +1,3 @@\n line 1\n-line 2\n+line two\n line 3\n"
             "--- /dev/null\n+++ b/pkg/new.py\n@@ -0,0 +1 @@\n+x = 1\n"
             "--- a/pkg/b.py\n+++ /dev/null\n@@ -1,20 +0,0 @@\n" + "".join(f"-{x}\n" for x in ORIG.splitlines()))
    recipe = proj.simple(files, [("p", patch)])
    (proj.root / "upstream/pkg/run.sh").chmod(0o755)
    (proj.root / "upstream/pkg/link").symlink_to("pkg")
    r = proj.apply(recipe)
    assert r.ok, r.message
    ws = proj.workdir / "pkg"
    full = tmp_path / "full"
    subprocess.run(["git", "clone", "-q", str(ws), str(full)], check=True, capture_output=True)

    def tree(root: Path) -> dict[str, tuple[str, int]]:
        return {k: (v, os.lstat(root / k).st_mode) for k, v in snapshot(root).items() if not k.startswith(".git/")}

    assert tree(ws) == tree(full)
    assert (ws / "pkg/a.py").read_text() == edit(ORIG, "line 2\n", "line two\n") and not (ws / "pkg/b.py").exists()
    assert os.readlink(ws / "link") == "pkg" and os.access(ws / "run.sh", os.X_OK)
    st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ws, capture_output=True, text=True)
    assert st.returncode == 0 and st.stdout == ""
    parent = subprocess.run(["git", "rev-parse", "HEAD~1", BASE_TAG], cwd=ws, capture_output=True, text=True).stdout.split()
    assert parent[0] == parent[1]
