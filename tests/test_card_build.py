"""The model card of real builds: front matter fields, license inference, `merge card`.

Hub inputs are tiny models laid out in a Hugging Face cache (offline), each with its own
model card; the output's card is parsed back with huggingface_hub.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from merge.card.facts import infer_license, pipeline_tag
from merge.cli import app

SHA = "c0ffee" + "0" * 34
runner = CliRunner()
CARDS = {
    "org/base": (
        "license: apache-2.0\nlanguage: en\ndatasets: [d/one]\npipeline_tag: text-generation"
    ),
    "org/ft1": "license: apache-2.0\nlanguage: [en]",
    "org/ft2": "license: mit",
    "org/ad": "license: apache-2.0\nlibrary_name: peft",
}


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def cache_repo(hub: Path, repo_id: str, source: Path, card: str | None) -> None:
    """``source`` (plus a README.md with ``card`` as front matter) as huggingface_hub caches
    it, at commit SHA on main."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SHA
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    files = {f.name: f.read_bytes() for f in sorted(source.iterdir()) if f.is_file()}
    if card is not None:
        files["README.md"] = f"---\n{card}\n---\n\n# {repo_id}\n".encode()
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snapshot / name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, llama_base: Path) -> Path:
    from test_lora import make_adapter

    return make_adapter(tmp_path_factory.mktemp("ad") / "ad", llama_base, seed=3, r=2)


@pytest.fixture
def hub(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    llama_base: Path,
    llama_ft1: Path,
    llama_ft2: Path,
    adapter: Path,
) -> Path:
    cache = tmp_path / "hub"
    sources = {"org/base": llama_base, "org/ft1": llama_ft1, "org/ft2": llama_ft2}
    sources |= {"org/nocard": llama_ft2, "org/ad": adapter}
    for repo_id, source in sources.items():
        cache_repo(cache, repo_id, source, CARDS.get(repo_id))
    monkeypatch.chdir(tmp_path)  # no local folder named org/... shadows the Hub ids
    return cache


def build(tmp_path: Path, hub: Path, recipe: dict[str, Any], *args: str) -> tuple[Path, str]:
    """Run ``recipe`` into tmp_path/out; (out, stderr)."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "out"
    code, _, stderr = cli("run", path, out, "--transformers-cache", hub, *args)
    assert code == 0, stderr
    return out, stderr


def linear(*models: str) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
    }


def on_base(base: str, *models: str) -> dict[str, Any]:
    return {**linear(*models), "merge_method": "task_arithmetic", "base_model": base}


def meta(out: Path) -> dict[str, Any]:
    return ModelCard.load(out / "README.md").data.to_dict()


# --- the rules --------------------------------------------------------------------------------


def test_license_agreeing_inputs() -> None:
    assert infer_license({"a/x": "mit", "b/y": "mit"}) == ("mit", None)
    assert infer_license({"a/x": "mit", "./local": None}) == ("mit", None)  # states none


def test_license_disagreeing_inputs_named_in_the_warning() -> None:
    value, warning = infer_license({"a/x": "mit", "b/y": "apache-2.0", "c/z": None})
    assert value is None
    assert warning == (
        "license: the input cards disagree (a/x: mit, b/y: apache-2.0); the card states no "
        "license; set one with --license"
    )


def test_license_missing_everywhere() -> None:
    assert infer_license({"a/x": None, "b/y": None}) == (None, None)
    assert infer_license({}) == (None, None)


def test_pipeline_tag_from_the_donor_card_else_the_architecture() -> None:
    assert pipeline_tag("text2text-generation", ["LlamaForCausalLM"], False) == (
        "text2text-generation"
    )
    assert pipeline_tag(None, ["LlamaForCausalLM"], False) == "text-generation"
    assert pipeline_tag(None, ["LlavaForConditionalGeneration"], True) == "image-text-to-text"
    assert pipeline_tag(None, ["BertModel"], False) is None


# --- real builds ------------------------------------------------------------------------------


def test_plain_hub_merge_card(tmp_path: Path, hub: Path) -> None:
    out, stderr = build(tmp_path, hub, on_base("org/base", "org/ft1"))
    assert "warning: license" not in stderr
    assert meta(out) == {
        "base_model": ["org/base", "org/ft1"],
        "base_model_relation": "merge",
        "language": ["en"],  # both say en (one as a string); datasets: org/ft1 states none
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["merge", "mergesmith", "task_arithmetic"],
    }
    card = (out / "README.md").read_text()
    assert f"[org/ft1](https://huggingface.co/org/ft1), commit `{SHA}`" in card
    assert "[task_arithmetic](https://arxiv.org/abs/2212.04089) merge method" in card
    assert (out / "merge-recipe.yaml").read_text() in card
    assert "merge run merge-recipe.yaml" in card  # no lock: no --locked promise
    code, stdout, _ = cli("card", out)
    assert code == 0 and stdout == card
    facts = json.loads((out / "merge-card.json").read_text())
    assert facts["input_cards"]["org/ft1"]["license"] == "apache-2.0"
    assert cli("verify", out)[0] == 0


def test_disagreeing_licenses_then_merge_card_write(tmp_path: Path, hub: Path) -> None:
    out, stderr = build(tmp_path, hub, linear("org/base", "org/ft2", "org/nocard"))
    assert (
        "warning: license: the input cards disagree (org/base: apache-2.0, org/ft2: mit)" in stderr
    )
    data = meta(out)
    assert "license" not in data
    assert "language" not in data  # only org/base states one: the merge's is not known
    before = (out / "model.safetensors").read_bytes()
    code, stdout, _ = cli("card", out, "--license", "mit")  # prints, changes nothing
    assert code == 0 and "license: mit" in stdout.split("---")[1]
    assert "license" not in meta(out) and cli("verify", out)[0] == 0
    code, _, stderr = cli("card", out, "--write", "--license", "mit")
    assert code == 0 and "manifest updated" in stderr
    assert meta(out)["license"] == "mit"
    assert json.loads((out / "merge-card.json").read_text())["license"] == "mit"
    assert cli("verify", out) == (
        0,
        "",
        f"{out}: ok, {len(list(out.iterdir())) - 1} files match the manifest\n",
    )
    assert (out / "model.safetensors").read_bytes() == before
    assert cli("card", out)[1] == (out / "README.md").read_text()  # the override is kept


def test_license_at_build_time(tmp_path: Path, hub: Path) -> None:
    out, stderr = build(tmp_path, hub, linear("org/base", "org/ft2"), "--license", "other")
    assert "warning: license" not in stderr
    assert meta(out)["license"] == "other"


def test_lora_input_card(tmp_path: Path, hub: Path) -> None:
    out, _ = build(tmp_path, hub, linear("org/base+org/ad", "org/ft1"))
    data = meta(out)
    assert data["base_model"] == ["org/base", "org/ad", "org/ft1"]
    assert data["tags"] == ["merge", "mergesmith", "linear", "lora"]
    assert data["license"] == "apache-2.0"
    card = (out / "README.md").read_text()
    assert "with the LoRA adapter [org/ad](https://huggingface.co/org/ad)" in card


def test_moe_card(tmp_path: Path, hub: Path) -> None:
    recipe = {
        "base_model": "org/base",
        "gate_mode": "random",
        "experts": [{"source_model": "org/ft1"}, {"source_model": "org/nocard"}],
    }
    out, _ = build(tmp_path, hub, recipe)
    data = meta(out)
    assert data["base_model"] == ["org/base", "org/ft1", "org/nocard"]
    assert data["tags"] == ["merge", "mergesmith", "moe", "mixtral"]
    assert data["license"] == "apache-2.0" and data["pipeline_tag"] == "text-generation"
    card = (out / "README.md").read_text()
    assert "## Mixture of experts" in card and "## Experts" in card
    assert cli("card", out)[1] == card


def test_downloaded_output_rebuilds_from_its_lock(
    tmp_path: Path, hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OUT carries the lock: `merge run --locked OUT/merge-recipe.yaml` gives the same bytes."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))  # merge lock: what the cache holds
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(yaml.safe_dump(on_base("org/base", "org/ft1", "org/ft2")))
    env = ("--transformers-cache", hub)
    code, _, stderr = cli("lock", recipe)
    assert code == 0, stderr
    out = tmp_path / "out"
    code, _, stderr = cli("run", "--locked", recipe, out, *env)
    assert code == 0, stderr
    assert (out / "merge-recipe.lock").read_bytes() == (tmp_path / "ties.lock").read_bytes()
    assert "merge run --locked merge-recipe.yaml" in (out / "README.md").read_text()
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    for name in ("merge-recipe.yaml", "merge-recipe.lock"):
        shutil.copy(out / name, downloaded / name)
    again = tmp_path / "again"
    code, _, stderr = cli("run", "--locked", downloaded / "merge-recipe.yaml", again, *env)
    assert code == 0, stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
