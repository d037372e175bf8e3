"""Multi-stage recipes (mergekit-multi's syntax): stages in dependency order, content keys,
rebuilds of what changed only, every stage checked before any is built, one-line errors; one
lock over every stage, manifests naming earlier stages, and ``merge rebuild`` of a multi-stage
recipe.

The recipes name local tiny llamas (``conftest``): ``first`` merges base and ft1, ``second``
slerps ``first`` with ``mid`` (a per-test copy of ft2, so a test can rewrite it), and the final
stage dare-ties ``second`` with ft1 on base (seeded randomness, so reproducibility shows).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from merge.build.lockfile import read_lock
from merge.build.manifest import MANIFEST_NAME, read_manifest
from merge.build.stages import load, load_stages
from merge.cli import app
from merge.errors import RecipeError
from tiny import assert_loads_and_generates, make_tiny

runner = CliRunner()

FIRST = """\
name: first
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.5}}
"""
SECOND = """\
name: second
merge_method: slerp
base_model: first
models:
  - model: {mid}
parameters:
  t: {t}
"""
FINAL = """\
# the final output: no name
merge_method: dare_ties
base_model: {base}
models:
  - model: second
    parameters: {{density: 0.6, weight: 0.5}}
  - model: {ft1}
    parameters: {{density: 0.8, weight: 0.5}}
"""


def cli(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def models(tmp_path: Path, llama_base: Path, llama_ft1: Path, llama_ft2: Path) -> dict[str, Path]:
    mid = Path(shutil.copytree(llama_ft2, tmp_path / "mid"))
    return {"base": llama_base, "ft1": llama_ft1, "mid": mid}


def write_multi(
    tmp_path: Path, models: dict[str, Path], t: float = 0.5, name: str = "multi"
) -> Path:
    text = "---\n".join(
        [FIRST.format(**models), SECOND.format(t=t, **models), FINAL.format(**models)]
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def stats(*roots: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file under ``roots``."""
    return {
        str(p): (p.stat().st_ino, p.stat().st_mtime_ns)
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def build(recipe: Path, tmp_path: Path, *more: object) -> tuple[int, str]:
    code, _, stderr = cli(
        "run", recipe, tmp_path / "out", "--intermediate-dir", tmp_path / "st", *more
    )
    return code, stderr


def stage_lines(stderr: str) -> list[str]:
    """``LABEL: built`` or ``LABEL: up to date`` for each stage line of a run."""
    found = (re.match(r"(.*?): (built|up to date) ", line) for line in stderr.splitlines())
    return [f"{m[1]}: {m[2]}" for m in found if m]


def test_the_stages_load_in_dependency_order(tmp_path: Path, models: dict[str, Path]) -> None:
    path = tmp_path / "m.yaml"
    docs = [FINAL.format(**models), SECOND.format(t=0.5, **models), FIRST.format(**models)]
    path.write_text("---\n".join(docs))  # the file lists them backwards
    stages = load_stages(path)
    assert [s.name for s in stages.stages] == ["first", "second", None]
    assert stages.names == {"first", "second"}
    assert stages.final.name is None and stages.final.line == 2
    assert stages.stage("second").uses == {"first": ("base_model",)}
    assert stages.stage("second").recipe.text == "---\n" + SECOND.format(t=0.5, **models)
    assert stages.stage("second").line == 10  # the file's line, not the document's


def test_a_single_document_is_one_recipe_as_before(tmp_path: Path, models: dict[str, Path]) -> None:
    path = tmp_path / "one.yaml"
    path.write_text(FIRST.format(**models) + "---\n# nothing else\n")
    recipe = load(path)
    assert not hasattr(recipe, "stages")
    assert recipe.warnings == [
        f"{path}:1: name: names a stage of a mergekit-multi recipe; a single recipe ignores it"
    ]


def test_the_final_output_equals_the_three_merges_run_by_hand(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    recipe = write_multi(tmp_path, models)
    code, stderr = build(recipe, tmp_path)
    assert code == 0, stderr
    assert stage_lines(stderr) == [
        "stage first: built",
        "stage second: built",
        "final stage: built",
    ]
    assert stderr.splitlines()[-1].startswith(f"wrote {tmp_path / 'out'} (built 3 of 3 stages) in ")
    hand = tmp_path / "hand"
    hand.mkdir()
    texts = [
        FIRST.format(**models),
        SECOND.format(t=0.5, **models).replace("base_model: first", f"base_model: {hand / '1'}"),
        FINAL.format(**models).replace("model: second", f"model: {hand / '2'}"),
    ]
    for i, text in enumerate(texts, 1):
        (hand / f"{i}.yaml").write_text(text)
        code, _, stderr = cli("run", hand / f"{i}.yaml", hand / str(i))
        assert code == 0, stderr
    for mine, theirs in [
        (tmp_path / "st/first", hand / "1"),
        (tmp_path / "st/second", hand / "2"),
        (tmp_path / "out", hand / "3"),
    ]:
        assert (mine / "model.safetensors").read_bytes() == (
            theirs / "model.safetensors"
        ).read_bytes()
        assert (mine / "config.json").read_text() == (theirs / "config.json").read_text()
    assert (tmp_path / "out/merge-recipe.yaml").read_text() == "---\n" + FINAL.format(**models)
    assert_loads_and_generates(tmp_path / "out")
    manifest = read_manifest(tmp_path / "st/second")
    assert manifest is not None and len(manifest["build_key"]) == 64
    code, _, stderr = cli("verify", tmp_path / "st/second")
    assert code == 0, stderr


def test_an_unchanged_rerun_rebuilds_nothing(tmp_path: Path, models: dict[str, Path]) -> None:
    recipe = write_multi(tmp_path, models)
    assert build(recipe, tmp_path)[0] == 0
    before = stats(tmp_path / "st", tmp_path / "out")
    code, stderr = build(recipe, tmp_path)
    assert code == 0, stderr
    assert stderr.splitlines() == [
        f"stage first: up to date ({tmp_path / 'st/first'})",
        f"stage second: up to date ({tmp_path / 'st/second'})",
        f"final stage: up to date ({tmp_path / 'out'})",
        stderr.splitlines()[-1],
    ]
    assert stderr.splitlines()[-1].startswith(f"{tmp_path / 'out'} is up to date (3 stages) in ")
    assert stats(tmp_path / "st", tmp_path / "out") == before


@pytest.mark.parametrize("change", ["input", "text"])
def test_a_change_to_the_middle_stage_rebuilds_it_and_the_final_only(
    tmp_path: Path, models: dict[str, Path], llama_base: Path, change: str
) -> None:
    recipe = write_multi(tmp_path, models)
    assert build(recipe, tmp_path)[0] == 0
    first = stats(tmp_path / "st/first")
    keys = {n: read_manifest(tmp_path / "st" / n)["build_key"] for n in ("first", "second")}
    final_key = read_manifest(tmp_path / "out")["build_key"]
    old_final = (tmp_path / "out/model.safetensors").read_bytes()
    if change == "input":  # the folder only the middle stage reads, rewritten
        shutil.rmtree(models["mid"])
        make_tiny(models["mid"], seed=7, noise_from=llama_base)
    else:
        write_multi(tmp_path, models, t=0.3)
    code, stderr = build(recipe, tmp_path, "--overwrite")
    assert code == 0, stderr
    assert stage_lines(stderr) == [
        "stage first: up to date",
        "stage second: built",
        "final stage: built",
    ]
    assert stats(tmp_path / "st/first") == first
    assert read_manifest(tmp_path / "st/first")["build_key"] == keys["first"]
    assert read_manifest(tmp_path / "st/second")["build_key"] != keys["second"]
    assert read_manifest(tmp_path / "out")["build_key"] != final_key
    assert (tmp_path / "out/model.safetensors").read_bytes() != old_final


def test_the_final_output_is_replaced_only_with_overwrite(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    recipe = write_multi(tmp_path, models)
    assert build(recipe, tmp_path)[0] == 0
    before = stats(tmp_path / "st", tmp_path / "out")
    write_multi(tmp_path, models, t=0.3)  # second and final are out of date
    code, stderr = build(recipe, tmp_path)
    assert code == 2
    assert (
        stderr
        == f"error: output '{tmp_path / 'out'}' already exists; pass --overwrite to replace it\n"
    )
    assert stats(tmp_path / "st", tmp_path / "out") == before  # checked before building


def test_no_lazy_rebuilds_every_stage(tmp_path: Path, models: dict[str, Path]) -> None:
    recipe = write_multi(tmp_path, models)
    assert build(recipe, tmp_path)[0] == 0
    weights = (tmp_path / "out/model.safetensors").read_bytes()
    before = stats(tmp_path / "st", tmp_path / "out")
    code, stderr = build(recipe, tmp_path, "--no-lazy", "--overwrite")
    assert code == 0, stderr
    assert stage_lines(stderr) == [
        "stage first: built",
        "stage second: built",
        "final stage: built",
    ]
    after = stats(tmp_path / "st", tmp_path / "out")
    assert set(after) == set(before) and all(after[k] != before[k] for k in before)
    assert (tmp_path / "out/model.safetensors").read_bytes() == weights  # deterministic


def test_the_defaults_are_beside_the_recipe_stem_in_the_current_directory(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_multi(tmp_path, models, name="chain")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, stderr = cli("run", recipe)
    assert code == 0, stderr
    assert sorted(p.name for p in work.iterdir()) == ["chain-merged", "chain-stages"]
    assert sorted(p.name for p in (work / "chain-stages").iterdir()) == ["first", "second"]


def test_every_named_stage_makes_the_last_document_the_final_output(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    recipe = tmp_path / "named.yaml"
    recipe.write_text(FIRST.format(**models) + "---\n" + SECOND.format(t=0.5, **models))
    code, stderr = build(recipe, tmp_path)
    assert code == 0, stderr
    assert stage_lines(stderr) == ["stage first: built", "stage second (final): built"]
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["first"]
    assert (tmp_path / "out/model.safetensors").is_file()


def test_a_folder_in_the_intermediate_dir_that_is_no_merge_output_is_refused(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    recipe = write_multi(tmp_path, models)
    (tmp_path / "st/second").mkdir(parents=True)
    (tmp_path / "st/second/notes.txt").write_text("mine")
    code, stderr = build(recipe, tmp_path)
    assert code == 2
    assert stderr == (
        f"error: stage second: '{tmp_path / 'st/second'}' exists and is not a merge output (no "
        "merge-manifest.json); remove it or choose another --intermediate-dir\n"
    )
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["second"]
    assert not (tmp_path / "out").exists()


def test_a_shape_error_in_the_last_stage_stops_the_run_before_any_stage_is_built(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    wide = make_tiny(tmp_path / "wide", seed=9, layers=4, hidden=64)
    recipe = tmp_path / "bad.yaml"
    final = FINAL.format(**models).replace(f"model: {models['ft1']}", f"model: {wide}")
    recipe.write_text(
        FIRST.format(**models) + "---\n" + SECOND.format(t=0.5, **models) + "---\n" + final
    )
    for command in ("validate", "plan"):
        code, stdout, stderr = cli(command, recipe)
        assert code == 2 and stdout == ""
        assert stderr.startswith(
            f"error: {recipe}:18: final stage: tensor 'model.embed_tokens.weight' and 1 other "
            "tensor: "
        )
    code, stderr = build(recipe, tmp_path)
    assert code == 2
    assert stderr.startswith(
        f"error: {recipe}:18: final stage: tensor 'model.embed_tokens.weight' and 1 other tensor: "
    )
    assert not (tmp_path / "st").exists() and not (tmp_path / "out").exists()


def test_validate_and_plan_show_every_stage(tmp_path: Path, models: dict[str, Path]) -> None:
    recipe = write_multi(tmp_path, models)
    code, stdout, stderr = cli("validate", recipe)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0] == f"{recipe}: ok, 3 stages"
    assert lines[1] == "  stage first (line 1): linear"
    assert lines[2] == f"    models: {models['base']}, {models['ft1']}"
    assert "  stage second (line 9): slerp" in lines
    assert f"    models: first (stage), {models['mid']}" in lines
    assert "  final stage (line 18): dare_ties" in lines
    assert f"    models: {models['base']}, second (stage), {models['ft1']}" in lines
    code, stdout, stderr = cli("plan", recipe, "--json", "--intermediate-dir", tmp_path / "st")
    assert code == 0, stderr
    plans = json.loads(stdout)
    assert [(p["stage"], p["final"], p["uses"]) for p in plans] == [
        ("first", False, []),
        ("second", False, ["first"]),
        (None, True, ["second"]),
    ]
    assert plans[2]["models"]["second"] == str(tmp_path / "st/second")
    assert plans[2]["method"] == "dare_ties" and len(plans[2]["tensors"]) == 39
    code, stdout, stderr = cli("plan", recipe)
    assert code == 0, stderr
    assert stdout.startswith("== stage first (line 1): linear\nrecipe: ")
    assert "\n== final stage (line 18): dare_ties\n" in stdout
    code, stdout, stderr = cli("plan", recipe, "--device", "cuda", "--max-vram", "2GB")
    assert code == 0, stderr
    assert stdout.count("VRAM budget: 2.00 GB on cuda: expected peak") == 3  # each stage
    code, stdout, stderr = cli("plan", recipe, "--json", "--device", "cuda", "--max-vram", "2GB")
    assert code == 0 and all(p["vram"]["budget_bytes"] == 2 * 10**9 for p in json.loads(stdout))
    assert not any(tmp_path.glob("*-stages")) and not (tmp_path / "st").exists()


def stage_doc(other: str) -> str:
    return (
        "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {other}\n    parameters: {{{{weight: 1}}}}\n"
    )


@pytest.mark.parametrize(
    ("docs", "expected"),
    [
        (
            [("a", "{ft1}"), ("a", "{ft1}"), (None, "a")],
            "{f}:9: name: stage name 'a' is given twice (first on line 1); each stage needs "
            "a name of its own",
        ),
        (
            [("a", "{ft1}"), (None, "a"), (None, "a")],
            "{f}:16: a second stage without a name (the first starts on line 9): only the "
            "final stage may leave out name:",
        ),
        (
            [("a", "b"), ("b", "a"), (None, "b")],
            "{f}:6: models[1].model: stages form a cycle: 'a' -> 'b' -> 'a'; a stage can use "
            "only stages built before it",
        ),
        (
            [("a", "{ft1}"), ("b", "b"), (None, "b")],
            "{f}:14: models[1].model: stage 'b' uses itself; a stage can use only the "
            "outputs of other stages",
        ),
        (
            [("first-merge", "{ft1}"), (None, "frist-merge")],
            "{f}:13: models[1].model: unknown stage 'frist-merge' (nor a local folder or a "
            "Hub repo id); did you mean 'first-merge'? (stages: first-merge)",
        ),
        (
            [("a", "{ft1}"), (None, "a@main")],
            "{f}:13: models[1].model: 'a@main' names stage 'a': a revision (@main) applies "
            "only to Hub models",
        ),
        (
            [("a", "b"), ("b", "{ft1}")],
            "{f}:6: models[1].model: stage 'b' is the final output (every stage has a name, "
            "so the last one is final) and no stage can use it; leave out the name: of the "
            "stage that is the final output",
        ),
        (
            [("a/b", "{ft1}"), (None, "{ft1}")],
            "{f}:1: name: a stage name is a folder name (letters, digits, '.', '_' and '-', "
            "starting with a letter or digit), got 'a/b'",
        ),
    ],
    ids=["duplicate", "two-unnamed", "cycle", "self", "unknown", "revision", "final-used", "name"],
)
def test_a_structural_error_is_one_line_with_file_and_line(
    tmp_path: Path, models: dict[str, Path], docs: list[tuple[str | None, str]], expected: str
) -> None:
    parts = []
    for name, other in docs:
        head = f"name: {name}\n" if name else ""
        parts.append(head + stage_doc(other).format(**models))
    recipe = tmp_path / "s.yaml"
    recipe.write_text("---\n".join(parts))
    message = expected.format(f=recipe)
    for command in ("validate", "plan"):
        assert cli(command, recipe)[::2] == (2, f"error: {message}\n")
    code, stderr = build(recipe, tmp_path)
    assert (code, stderr) == (2, f"error: {message}\n")
    assert not (tmp_path / "st").exists() and not (tmp_path / "out").exists()
    with pytest.raises(RecipeError) as e:
        load_stages(recipe)
    assert e.value.problems == [message]


def test_a_recipe_error_in_a_stage_names_the_line_of_the_file(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    recipe = write_multi(tmp_path, models)
    recipe.write_text(recipe.read_text().replace("t: 0.5", "t: 1.5"))
    code, _, stderr = cli("validate", recipe)
    assert code == 2
    assert stderr.startswith(f"error: {recipe}:15: parameters.t: ")


def test_an_moe_stage_takes_an_earlier_stage_as_an_expert(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    moe = (
        "base_model: first\ngate_mode: random\nexperts:\n"
        f"  - source_model: first\n  - source_model: {models['ft1']}\n"
    )
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(FIRST.format(**models) + "---\n" + moe)
    code, stderr = build(recipe, tmp_path)
    assert code == 0, stderr
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (
        build(recipe, tmp_path)[1].splitlines()[1]
        == f"final stage: up to date ({tmp_path / 'out'})"
    )


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")  # peft
def test_a_stage_takes_an_adapter_as_a_model_does(
    tmp_path: Path, models: dict[str, Path], llama_base: Path
) -> None:
    from test_lora import make_adapter

    adapter = make_adapter(tmp_path / "ad", llama_base, target_modules=["q_proj", "v_proj"])
    final = stage_doc("first+{ad}").format(ad=adapter, **models)
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(FIRST.format(**models) + "---\n" + final)
    code, stderr = build(recipe, tmp_path)
    assert code == 0, stderr
    (tmp_path / "h1.yaml").write_text(FIRST.format(**models))
    (tmp_path / "h2.yaml").write_text(final.replace("first+", f"{tmp_path / 'h1'}+"))
    for name in ("h1", "h2"):
        code, _, stderr = cli("run", tmp_path / f"{name}.yaml", tmp_path / name)
        assert code == 0, stderr
    weights = (tmp_path / "out/model.safetensors").read_bytes()
    assert weights == (tmp_path / "h2/model.safetensors").read_bytes()


def test_an_intermediate_dir_overlapping_the_output_is_refused(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    recipe = write_multi(tmp_path, models)
    out = tmp_path / "out"
    code, _, stderr = cli("run", recipe, out, "-I", out / "stages")
    assert code == 2
    assert stderr == (
        f"error: the intermediate dir '{out / 'stages'}' and the output '{out}' overlap; "
        "choose another --intermediate-dir or output\n"
    )
    assert not out.exists()


def test_mergekit_multis_out_path_is_out(tmp_path: Path, models: dict[str, Path]) -> None:
    recipe = write_multi(tmp_path, models)
    code, _, stderr = cli("run", recipe, "--out-path", tmp_path / "a", "-I", tmp_path / "st")
    assert code == 0, stderr
    assert (tmp_path / "a/model.safetensors").is_file()
    code, _, stderr = cli("run", recipe, tmp_path / "b", "--out-path", tmp_path / "a")
    assert (code, stderr) == (
        2,
        f"error: give the output once: OUT ({tmp_path / 'b'}) or --out-path ({tmp_path / 'a'})\n",
    )


# --- locks, manifests and rebuilds across stages ---------------------------------------------


def test_one_lock_covers_every_stage(tmp_path: Path, models: dict[str, Path]) -> None:
    recipe = write_multi(tmp_path, models)
    code, stdout, stderr = cli("lock", recipe)
    assert code == 0, stderr
    lock = read_lock(tmp_path / "multi.lock", recipe)
    assert sorted(m.ref for m in lock.models) == sorted(str(p) for p in models.values())
    assert "first" not in stdout and "second" not in stdout  # stages are not models
    code, stderr = build(recipe, tmp_path, "--locked")
    assert code == 0, stderr
    assert stage_lines(stderr) == [
        "stage first: built",
        "stage second: built",
        "final stage: built",
    ]
    lock_sha = (tmp_path / "multi.lock").read_bytes()
    for out in (tmp_path / "st" / "first", tmp_path / "st" / "second", tmp_path / "out"):
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        assert manifest["lock_sha256"] == hashlib.sha256(lock_sha).hexdigest()
        assert cli("verify", out)[0] == 0
    final = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    second = next(i for i in final["inputs"] if i["ref"] == "second")
    assert second["source"] == "stage" and second["stage"] == "second"
    built = json.loads((tmp_path / "st" / "second" / MANIFEST_NAME).read_text())
    listed = {f["path"]: f for f in built["files"]}
    used = [f for f in second["files"] if f["path"] != MANIFEST_NAME]
    assert "model.safetensors" in {f["path"] for f in used}
    assert all(listed[f["path"]] == f for f in used)


def test_locked_refuses_a_changed_input_of_any_stage(
    tmp_path: Path,
    llama_base: Path,
    models: dict[str, Path],
) -> None:
    recipe = write_multi(tmp_path, models)
    assert cli("lock", recipe)[0] == 0
    shutil.rmtree(models["mid"])
    make_tiny(models["mid"], seed=77, noise_from=llama_base)  # the middle stage's input
    code, stderr = build(recipe, tmp_path, "--locked")
    mid = models["mid"]
    assert (code, stderr) == (
        2,
        f"error: {recipe}:9: stage second: {tmp_path / 'multi.lock'}:9: models[0] ({mid}): "
        "content differs from the lock (changed: model.safetensors); run `merge lock --update "
        f"{recipe} {mid}` to lock it as it is now\n",
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "st").exists()


def test_rebuild_rebuilds_only_downstream_of_what_moved(
    tmp_path: Path,
    llama_base: Path,
    models: dict[str, Path],
) -> None:
    recipe = write_multi(tmp_path, models)
    out, st = tmp_path / "out", tmp_path / "st"
    code, stdout, stderr = cli("rebuild", recipe, out, "--intermediate-dir", st)
    assert code == 0, stderr
    assert stdout.startswith(f"rebuilt {out} (no lock yet")
    first = stats(st / "first")
    code, stdout, stderr = cli("rebuild", recipe, out, "--intermediate-dir", st)
    assert (code, stdout.split(":")[0]) == (0, f"{out} is up to date"), stderr

    shutil.rmtree(models["mid"])
    make_tiny(models["mid"], seed=77, noise_from=llama_base)  # the middle stage's input moves
    assert cli("outdated", recipe)[0] == 1
    code, stdout, stderr = cli("rebuild", recipe, out, "--intermediate-dir", st)
    assert code == 0, stderr
    assert stdout.startswith(f"rebuilt {out} ({models['mid']}: the local directory changed")
    assert stage_lines(stderr) == [
        "stage first: up to date",
        "stage second: built",
        "final stage: built",
    ]
    assert stats(st / "first") == first
    assert cli("verify", out)[0] == 0 and cli("outdated", recipe)[0] == 0


def test_the_final_output_reproduces_from_its_own_copy_of_the_file_and_lock(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    recipe = write_multi(tmp_path, models)
    assert cli("lock", recipe)[0] == 0
    code, stderr = build(recipe, tmp_path, "--locked")
    assert code == 0, stderr
    out = tmp_path / "out"
    assert (out / "merge-stages.yaml").read_text() == recipe.read_text()
    assert (out / "merge-stages.lock").read_bytes() == (tmp_path / "multi.lock").read_bytes()
    assert not (out / "merge-recipe.lock").exists()  # merge-recipe.yaml is one stage's text
    card = (out / "README.md").read_text()
    assert "pip install mergesmith==" in card and "merge run --locked merge-stages.yaml" in card
    assert recipe.read_text() in card  # the whole file is the recipe shown
    # a downloader with the inputs at the same paths: the two files rebuild every stage
    again = tmp_path / "download"
    again.mkdir()
    for name in ("merge-stages.yaml", "merge-stages.lock"):
        (again / name).write_bytes((out / name).read_bytes())
    code, _, stderr = cli(
        "run", "--locked", again / "merge-stages.yaml", again / "out", "-I", again / "st"
    )
    assert code == 0, stderr
    for name in ("model.safetensors", "README.md", "merge-stages.lock", "config.json"):
        assert (again / "out" / name).read_bytes() == (out / name).read_bytes(), name
    assert cli("verify", again / "out")[0] == 0


def test_a_change_outside_the_final_stage_refreshes_its_copy_of_the_file(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    recipe = write_multi(tmp_path, models)
    extra = "name: extra\nmerge_method: linear\nmodels:\n  - model: {ft1}\n"
    extra += "    parameters: {{weight: {w}}}\n"  # a stage that no other stage uses
    recipe.write_text(recipe.read_text() + "---\n" + extra.format(w=1.0, **models))
    assert build(recipe, tmp_path)[0] == 0
    final = read_manifest(tmp_path / "out")["build_key"]
    recipe.write_text(recipe.read_text().replace("{weight: 1.0}", "{weight: 0.5}"))
    code, stderr = build(recipe, tmp_path, "--overwrite")
    assert code == 0, stderr
    assert stage_lines(stderr) == [
        "stage first: up to date",
        "stage second: up to date",
        "final stage: built",  # its merge-stages.yaml is the file, which changed
        "stage extra: built",
    ]
    assert read_manifest(tmp_path / "out")["build_key"] != final
    assert (tmp_path / "out" / "merge-stages.yaml").read_text() == recipe.read_text()
