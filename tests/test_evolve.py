"""``merge evolve``: the genome syntax, CMA-ES finding a known optimum, resume after kill -9,
Ray workers giving the same history, best.yaml making the candidate's bytes.

The task with a known optimum: two fine-tunes A and B far apart (noise 0.5), a target model
T = 0.7 A + 0.3 B (a linear merge), and a perplexity file of text sampled from T over words
that tokenize back to the same ids. The perplexity of ``linear`` merges of A and B
(normalised) is lowest near A's share 0.7 (measured: 97 at 0.7, 212 at 0.65, 251 at 0.75).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from merge import api
from merge.cli import app
from merge.errors import MergeError, OutputError, RecipeError
from merge.evolve import InMemoryMerger
from merge.evolve.config import load_config
from merge.evolve.search import TEST_HOOK, evolve
from merge.evolve.store import Store
from support import run_recipe
from tiny import load_state, make_tiny

ROOT = Path(__file__).resolve().parents[1]
SHARE = 0.7
RUN = {"max_evals": 48, "popsize": 6, "threads": 1, "seed": 0}
FLAGS = ["--max-evals", "48", "--popsize", "6", "--threads", "1", "--seed", "0"]


def _sample(model_dir: Path, out: Path, rows: int = 32, length: int = 48) -> None:
    """Text sampled from the model over space-prefixed words that re-tokenize exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    allowed = [
        i
        for t, i in tok.get_vocab().items()
        if t.startswith("Ġ")
        and t[1:].isalpha()
        and tok.encode(tok.decode([i]), add_special_tokens=False) == [i]
    ]
    mask = torch.full((model.config.vocab_size,), float("-inf"))
    mask[allowed] = 0
    g = torch.Generator().manual_seed(0)
    ids = torch.full((rows, 1), tok.bos_token_id)
    with torch.no_grad():
        for _ in range(length):
            logits = model(ids).logits[:, -1].float() + mask
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=g)], 1)
    texts = [tok.decode(r[1:]) for r in ids]
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with models a, b, the target and text.jsonl, and genome.yaml over them."""
    root = tmp_path_factory.mktemp("evolve")
    base = make_tiny(root / "base", "llama", seed=0, layers=2)
    a = make_tiny(root / "a", seed=1, noise_from=base, noise=0.5)
    b = make_tiny(root / "b", seed=2, noise_from=base, noise=0.5)
    target = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": SHARE}},
            {"model": str(b), "parameters": {"weight": 1 - SHARE}},
        ],
    }
    _sample(run_recipe(root, target, name="target"), root / "text.jsonl")
    (root / "genome.yaml").write_text(
        "genome:\n  models: [a, b]\n  merge_method: linear\n"
        "tasks:\n  - name: perplexity:text.jsonl\n    weight: -1.0\n"
    )
    return root


@pytest.fixture(scope="module")
def full_run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, list]:
    """One uninterrupted in-process run: its storage, result and terminal lines."""
    storage = tmp_path_factory.mktemp("run") / "store"
    lines: list[str] = []
    result = evolve(world / "genome.yaml", storage, echo=lines.append, **RUN)  # type: ignore[arg-type]
    return storage, result, lines


def _share(record: dict[str, Any]) -> float:
    wa, wb = record["values"]["weight"]
    return float(wa / (wa + wb))


def test_evolve_finds_the_known_optimum(full_run: tuple[Path, Any, list]) -> None:
    storage, result, lines = full_run
    history = [json.loads(x) for x in (storage / "history.jsonl").read_text().splitlines()]
    assert len(history) == result.evals == 48 and result.generations == 8
    start = history[0]["score"]  # not the start itself: its first sample; compare the mean
    first_mean = sum(r["score"] for r in history[:6]) / 6
    assert result.best["score"] > max(start, first_mean)
    assert abs(_share(result.best) - SHARE) < 0.02, _share(result.best)
    assert result.stopped == "--max-evals 48 reached"
    assert len(lines) == 8 and lines[0].startswith("gen 0: best ") and "weight=[" in lines[-1]
    assert (storage / "progress.png").read_bytes()[:4] == b"\x89PNG"


def test_starting_point_is_worse_than_the_best(world: Path, full_run: tuple) -> None:
    """The genome's start (equal weights) scores below what the search found."""
    cfg = load_config(world / "genome.yaml")
    from merge.evolve.workers import Scorer

    scorer = Scorer(
        base_recipe=cfg.genome.probe_recipe(),
        genome_file=str(cfg.file),
        tasks=cfg.tasks,
        limit=None,
        batch_size=8,
        device="cpu",
        threads=1,
    )
    genome = cfg.genome.with_layers(scorer.layers, "x")
    start = scorer.score(genome.recipe(genome.initial(None)))["score"]
    assert full_run[1].best["score"] > start + 100


def test_best_yaml_runs_and_makes_the_candidate(full_run: tuple, tmp_path: Path) -> None:
    storage, result, _ = full_run
    best = storage / "best.yaml"
    recipe = yaml.safe_load(best.read_text())
    assert recipe["merge_method"] == "linear" and recipe["parameters"] == {"normalize": True}
    out = api.run(best, tmp_path / "out", progress=False)
    written = load_state(out)
    with InMemoryMerger(recipe, threads=1) as merger:
        state = merger.merge(recipe).state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name].view(torch.uint8), tensor.view(torch.uint8)), name


def _cli(world: Path, storage: Path, *extra: str, env: dict | None = None) -> Any:
    cmd = [sys.executable, "-m", "merge.cli", "evolve", str(world / "genome.yaml")]
    cmd += ["--storage-path", str(storage), *FLAGS, *extra]
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full, cwd=ROOT, timeout=300)


def test_kill_mid_run_then_resume_gives_the_same_history(
    world: Path, full_run: tuple, tmp_path: Path
) -> None:
    storage = tmp_path / "store"
    killed = _cli(world, storage, env={TEST_HOOK: "3"})
    assert killed.returncode == -9, killed.stderr
    history = storage / "history.jsonl"
    assert len(history.read_text().splitlines()) == 18
    # as if the kill also hit between appending generation 3 and saving its state
    with open(history, "a") as f:
        f.write(json.dumps({"generation": 3, "index": 0, "score": 0.0}) + "\n" + '{"gener')
    again = _cli(world, storage)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr and "gen 3: best" in again.stderr
    assert history.read_bytes() == (full_run[0] / "history.jsonl").read_bytes()
    assert (storage / "best.yaml").read_text() == (full_run[0] / "best.yaml").read_text().replace(
        str(full_run[0]), str(storage)
    )


def test_ray_two_workers_give_the_same_history(
    world: Path, full_run: tuple, tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    storage = tmp_path / "store"
    result = evolve(world / "genome.yaml", storage, workers=2, **{**RUN, "max_evals": 12})  # type: ignore[arg-type]
    assert result.evals == 12
    want = (full_run[0] / "history.jsonl").read_text().splitlines()[:12]
    assert (storage / "history.jsonl").read_text().splitlines() == want


def test_rerun_with_other_options_is_refused(world: Path, full_run: tuple) -> None:
    r = CliRunner().invoke(
        app,
        ["evolve", str(world / "genome.yaml"), "--storage-path", str(full_run[0]), "--seed", "5"],
    )
    assert r.exit_code == 2
    assert "holds a run of another genome or other options" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_finished_run_reruns_as_a_no_op(world: Path, full_run: tuple) -> None:
    before = (full_run[0] / "history.jsonl").read_bytes()
    result = evolve(world / "genome.yaml", full_run[0], **RUN)  # type: ignore[arg-type]
    assert result.evals == 48 and (full_run[0] / "history.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    "genome, message",
    [
        ("  models: [a, b]\n  merge_method: linear\n  smoth: true\n",
         "genome.yaml:4: genome.smoth: unknown key; did you mean 'smooth'? (allowed: models,"),
        ("  models: [a, b]\n  merge_method: tiez\n",
         "genome.yaml:3: genome.merge_method: unknown merge method 'tiez'; did you mean 'ties'? "
         "(allowed: linear, task_arithmetic, ties, dare_ties, slerp)"),
        ("  models: [a, b]\n  merge_method: ties\n",
         "genome.yaml:3: genome.merge_method: ties needs a base_model"),
        ("  models: [a, nowhere/zzz]\n  merge_method: linear\n",
         "genome.yaml:2: genome.models[1]: model 'nowhere/zzz': "),
        ("  models: [a, b]\n  merge_method: linear\n  layer_granularity: 3\n",
         "genome.yaml:4: genome.layer_granularity: 3 does not divide the models' 2 layers"),
    ],
)  # fmt: skip
def test_genome_errors_are_one_line_at_their_place(
    world: Path, tmp_path: Path, genome: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = world / f"bad{abs(hash(genome))}.yaml"
    path.write_text("genome:\n" + genome + "tasks:\n  - name: perplexity:text.jsonl\n")
    r = CliRunner().invoke(app, ["evolve", str(path), "--storage-path", str(tmp_path / "s")])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {world}/bad"), lines
    assert message.split(":", 1)[1] in lines[0], lines[0]


def test_task_errors(world: Path) -> None:
    path = world / "badtask.yaml"
    path.write_text(
        "genome: {models: [a, b], merge_method: linear}\n"
        "tasks:\n  - {name: choice:x.jsonl, wieght: 2}\n"
        "shuffle: true\n"
    )
    with pytest.raises(RecipeError) as e:
        load_config(path)
    assert e.value.problems == [
        f"{path}:4: shuffle: only False is supported by merge evolve",
        f"{path}:3: tasks[0].wieght: unknown key; did you mean 'weight'? (allowed: name, weight, "
        "metric)",
    ]


def _planned(world: Path, genome: dict[str, Any]) -> dict[str, Any]:
    """The recipe of a random candidate of ``genome``, checked by the planner."""
    import numpy as np

    path = world / "g.yaml"
    path.write_text(yaml.safe_dump({"genome": genome, "tasks": ["perplexity:text.jsonl"]}))
    cfg = load_config(path)
    g = cfg.genome.with_layers(2, "x")
    recipe = g.recipe(list(np.random.default_rng(0).normal(0.4, 0.3, g.size)))
    with InMemoryMerger(g.probe_recipe(), threads=1) as merger:
        merger.plan(recipe)
    return recipe


def test_every_method_and_layout_makes_recipes_the_planner_accepts(world: Path) -> None:
    ab = [str(world / "a"), str(world / "b")]
    base = str(world / "base")
    ties = _planned(world, {"models": ab, "merge_method": "ties", "base_model": base,
                            "layer_granularity": 1, "filters": ["self_attn", "mlp"]})  # fmt: skip
    assert len(ties["slices"]) == 2 and ties["slices"][0]["sources"][2] == {
        "model": base,
        "layer_range": [0, 1],
    }
    density = ties["slices"][1]["sources"][0]["parameters"]["density"]
    assert [d.get("filter") for d in density] == ["self_attn", "mlp", None]
    assert all(0.001 <= d["value"] <= 1 for d in density)
    smooth = _planned(world, {"models": ab, "merge_method": "dare_ties", "base_model": base,
                              "layer_granularity": 1, "smooth": True})  # fmt: skip
    assert len(smooth["models"][0]["parameters"]["weight"]) == 2
    neg = _planned(world, {"models": ab, "merge_method": "task_arithmetic", "base_model": base,
                           "allow_negative_weights": True})  # fmt: skip
    assert "parameters" in neg
    slerp = _planned(world, {"models": ab, "merge_method": "slerp", "layer_granularity": 1})
    assert [s["base_model"] for s in slerp["slices"]] and 0 < slerp["slices"][0]["parameters"][
        "t"
    ] < 1


def test_store_drops_lines_after_the_saved_state(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", "k", tmp_path / "g.yaml")
    assert store.open() is None
    store.append([{"generation": 0, "index": 0}, {"generation": 1, "index": 0}])
    assert store.open() is None and store.history() == []  # no state: nothing counts
    with pytest.raises(OutputError, match="another genome or other options"):
        Store(tmp_path / "s", "other", tmp_path / "g.yaml").open()


def test_without_cma_the_error_names_the_extra(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cma", None)
    with pytest.raises(MergeError, match=r"pip install 'mergesmith\[evolve\]'"):
        evolve(world / "genome.yaml", tmp_path / "s", **RUN)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()


def test_without_ray_workers_1_runs_and_more_need_the_extra(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    result = evolve(world / "genome.yaml", tmp_path / "one", **{**RUN, "max_evals": 6})  # type: ignore[arg-type]
    assert result.evals == 6
    with pytest.raises(MergeError, match=r"need Ray: pip install 'mergesmith\[evolve\]'"):
        evolve(world / "genome.yaml", tmp_path / "two", workers=2, **RUN)  # type: ignore[arg-type]


def test_time_limit_stops_between_generations_and_bad_values_are_one_line(
    world: Path, tmp_path: Path
) -> None:
    result = evolve(world / "genome.yaml", tmp_path / "s", time_limit=1e-9, **RUN)  # type: ignore[arg-type]
    assert result.stopped == "--time-limit reached" and result.generations == 0
    r = CliRunner().invoke(
        app, ["evolve", str(world / "genome.yaml"), "--storage-path", str(tmp_path / "t"),
              "--time-limit", "soon", "--popsize", "1"],
    )  # fmt: skip
    assert r.exit_code == 2
    assert r.output == "error: --time-limit: expected seconds or like 30m, 2h, got 'soon'\n"
    from merge.clievolve import parse_duration

    assert [parse_duration(t) for t in ("90", "90s", "30m", "1.5h")] == [90, 90, 1800, 5400]
