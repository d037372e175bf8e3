"""mergekit's published recipes, unchanged: they validate, run, load and generate.

``tests/data/mergekit`` holds recipes with the keys and structure of mergekit's examples and
docs; ``tests/data/compat`` recipes as users write them. Their Hub ids resolve offline to tiny
stand-ins (``tests/standins.py``) that keep what the recipes depend on: layer counts for
``layer_range`` and the real vocabulary quirks (WizardMath's extra ``[PAD]``, OpenHermes' ChatML
tokens, Hermes-2-Pro's 32 added tokens). The multi-stage recipe (mergekit-multi) runs with its
documented command, ``--intermediate-dir`` included.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from merge.cli import app
from merge.recipe import load_recipe
from merge.sources import ModelRef
from standins import SPECS, StandIns
from tiny import assert_loads_and_generates, load_state

DATA = Path(__file__).resolve().parent / "data"
EXAMPLES = DATA / "mergekit"
COMPAT = DATA / "compat"
NOT_RECIPES = {"multimerge.yml", "evolve.yml"}
RECIPES = [
    *(p for p in sorted(EXAMPLES.glob("*.yml")) if p.name not in NOT_RECIPES),
    *sorted(COMPAT.glob("*.yaml")),
]
runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # peft, making the adapters


@pytest.fixture(scope="session")
def standins(tmp_path_factory: pytest.TempPathFactory) -> StandIns:
    return StandIns(tmp_path_factory.mktemp("standins"))


def hub_ids(recipe: Path) -> list[str]:
    """Every Hub repo a recipe names (both sides of base+adapter)."""
    ids = []
    for text in load_recipe(recipe).model_refs():
        ref = ModelRef.parse(text)
        ids += [side.path for side in (ref.base, ref.lora) if side is not None]
    return [i for i in dict.fromkeys(ids) if i in SPECS]


@pytest.fixture
def offline_hub(
    standins: StandIns, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Path], None]:
    """Point the HF cache at the stand-ins of a recipe's models; run from ``tmp_path``."""

    def use(recipe: Path) -> None:
        monkeypatch.setenv("HF_HUB_CACHE", str(standins.cache(*hub_ids(recipe))))
        monkeypatch.chdir(tmp_path)

    return use


def cli(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr


def _ties(out: Path, stderr: str) -> None:
    # WizardMath's extra [PAD] row: the output keeps the base's 512-token vocabulary
    assert (
        "model 'WizardLM/WizardMath-13B-V1.0' has 1 row(s) the output lacks, dropped: '[PAD]'"
        in stderr
    )
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 512


def _layers(n: int) -> Callable[[Path, str], None]:
    def check(out: Path, stderr: str) -> None:
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == n

    return check


def _moe(family: str) -> Callable[[Path, str], None]:
    def check(out: Path, stderr: str) -> None:
        assert json.loads((out / "config.json").read_text())["architectures"] == [family]

    return check


def _union(out: Path, stderr: str) -> None:
    # 512 + the two ChatML tokens + the two named tokens, padded to a multiple of 64
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 576
    assert load_state(out)["model.embed_tokens.weight"].shape[0] == 576


def _hermes_slerp(out: Path, stderr: str) -> None:
    # Hermes-2-Pro (32 added tokens) is the base: its tokenizer; OpenHermes lacks 30 of them
    assert "takes the tokenizer of 'NousResearch/Hermes-2-Pro-Mistral-7B' (544 rows)" in stderr
    assert "'teknium/OpenHermes-2.5-Mistral-7B' lacks 30 of the output's rows" in stderr


CHECKS: dict[str, Callable[[Path, str], None]] = {
    "ties.yml": _ties,
    "gradient-slerp.yml": _layers(40),
    "orcamini-platy-44layer.yml": _layers(44),
    "moe-hidden.yml": _moe("MixtralForCausalLM"),
    "moe-random.yml": _moe("MixtralForCausalLM"),
    "moe-qwen-shared.yml": _moe("Qwen2MoeForCausalLM"),
    "tokenizer-union.yml": _union,
    "gradient_slerp.yaml": _hermes_slerp,
    "passthrough_frankenmerge.yaml": _layers(48),
}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_validates_runs_loads_and_generates(
    recipe: Path,
    tmp_path: Path,
    standins: StandIns,
    offline_hub: Callable[[Path], None],
) -> None:
    offline_hub(recipe)
    if recipe.name == "arcee_fusion.yml":  # it names local folders, relative to the CWD
        (tmp_path / "model_a").symlink_to(standins.folder("mistralai/Mistral-7B-v0.1"))
        (tmp_path / "model_b").symlink_to(standins.folder("BioMistral/BioMistral-7B"))
    code, stderr = cli("validate", recipe)
    assert code == 0, stderr
    code, stderr = cli("run", recipe, tmp_path / "out")
    assert code == 0, stderr
    assert "error" not in stderr
    out = tmp_path / "out"
    assert_loads_and_generates(out)
    if recipe.name in CHECKS:
        CHECKS[recipe.name](out, stderr)


def test_every_example_is_covered() -> None:
    names = {p.name for p in EXAMPLES.glob("*.yml")}
    assert len(names) >= 12 and NOT_RECIPES <= names
    assert len(RECIPES) == len(names) - len(NOT_RECIPES) + len(list(COMPAT.glob("*.yaml")))


MULTI_IDS = [
    "mistralai/Mistral-7B-v0.1",
    "BioMistral/BioMistral-7B",
    "NousResearch/Hermes-2-Pro-Mistral-7B",
    "teknium/OpenHermes-2.5-Mistral-7B",
]


def test_multistage_recipe_runs(
    tmp_path: Path, standins: StandIns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/multimerge.md's command, as ``merge run``: every stage, then an unchanged rerun."""
    recipe = EXAMPLES / "multimerge.yml"
    monkeypatch.setenv("HF_HUB_CACHE", str(standins.cache(*MULTI_IDS)))  # every stage's models
    monkeypatch.chdir(tmp_path)
    code, stderr = cli("run", recipe, tmp_path / "out", "--intermediate-dir", "intermediates")
    assert code == 0, stderr
    assert "error" not in stderr
    inter = tmp_path / "intermediates"
    assert sorted(p.name for p in inter.iterdir()) == ["first-merge", "second-merge"]
    # the stages mix vocabularies: Hermes-2-Pro's 32 added tokens leave the second stage
    assert (
        "warning: stage second-merge: vocabulary sizes differ (512 in model 'first-merge', "
        "544 in model 'NousResearch/Hermes-2-Pro-Mistral-7B')" in stderr
    )
    for out in (inter / "first-merge", inter / "second-merge", tmp_path / "out"):
        assert_loads_and_generates(out)
    code, stderr = cli("run", recipe, tmp_path / "out", "--intermediate-dir", "intermediates")
    assert code == 0, stderr
    assert stderr.splitlines()[:3] == [
        f"stage first-merge: up to date ({inter / 'first-merge'})",
        f"stage second-merge: up to date ({inter / 'second-merge'})",
        f"final stage: up to date ({tmp_path / 'out'})",
    ]


def test_multistage_recipe_validates_every_stage(
    standins: StandIns, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = EXAMPLES / "multimerge.yml"
    monkeypatch.setenv("HF_HUB_CACHE", str(standins.cache(*MULTI_IDS)))
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.stderr
    heads = [line for line in result.stdout.splitlines() if not line.startswith("    ")]
    assert heads == [
        f"{recipe}: ok, 3 stages",
        "  stage first-merge (line 2): linear",
        "  stage second-merge (line 10): slerp",
        "  final stage (line 18): dare_ties",
    ]


def test_evolve_config_is_named_and_parses_for_merge_evolve() -> None:
    recipe = EXAMPLES / "evolve.yml"
    code, stderr = cli("validate", recipe)
    assert code == 2
    assert stderr == (
        f"error: {recipe}:2: genome: a mergekit-evolve config (genome:, tasks:): run it with "
        "merge evolve; this file is not a merge recipe\n"
    )
    from merge.evolve.config import load_config

    cfg = load_config(recipe)
    g = cfg.genome.with_layers(32, "x")
    assert g.shape == (4, 2, 3, 2) and g.size == 48  # groups, models, filter sets, params
    assert [(t.spec, t.weight, t.metric) for t in cfg.tasks] == [("lm_eval:hellaswag", 1.0, "acc")]
    r = g.recipe(g.initial(None))
    assert r["parameters"] == {"normalize": False} and len(r["slices"]) == 4
    assert r["slices"][3]["sources"][2] == {
        "model": "mistralai/Mistral-7B-v0.1",
        "layer_range": [24, 32],
    }
