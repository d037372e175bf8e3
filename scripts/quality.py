"""Merge-quality benchmark: do merged fine-tunes keep their tasks?

    python scripts/quality.py --out .quality/quality.json --markdown .quality/quality.md

Design: ``_quality_train`` trains, on CPU in a few minutes, a tiny Llama base on a short mixture
of four synthetic digit-string tasks (copy, reverse, sort, add) and one fine-tune per task from
that base; the models are cached under ``--workdir`` in a folder keyed by a hash of the training
settings, so a rerun only merges and scores. This module writes one recipe per merge method
(our recipe syntax, mergekit-compatible, absolute model paths), merges with ``merge.api.run``,
and scores the base, each fine-tune and each merge with ``merge.eval`` (``generate:`` tasks,
greedy decoding, exact match) on every task's test split. Each method but linear (the plain
average) is merged at each task-vector scale ``lambda`` of ``LAMBDAS`` and reported at the one
with the best mean accuracy on the validation splits, as the papers tune it; the validation
means of every scale are reported too. It reports each task's accuracy and
their mean, as a markdown table (stdout, ``--markdown``) and as JSON (``--out``), with the
machine, the versions and the command.

``--evolve`` (the default) adds a ``merge evolve`` row when that command exists: a genome in
mergekit-evolve syntax over the four fine-tunes (``task_arithmetic``, one weight each), its
fitness the validation splits (never the test splits), the best recipe it finds merged and
scored like the others. Without the command the row says "evolve: not available".

Not done here: GPU runs, confidence intervals (200 test examples a task: one standard error is
up to 3.5 points), or a search over each method's other parameters (density, epsilon): each
runs at the settings listed in ``RECIPES``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _quality_train as qt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVOLVE = [sys.executable, "-m", "merge.cli", "evolve"]
EVOLVE_ARGS = "--max-evals 48 --seed 0 --threads 1 --batch-size 100 --quiet"
FT = {"weight": 1.0}
SPARSE = {"weight": 1.0, "density": 0.5}
# name -> (method, per-model parameters, global parameters); every one but linear has the base.
RECIPES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "linear": ("linear", FT, {}),
    "task_arithmetic": ("task_arithmetic", FT, {}),
    "ties": ("ties", SPARSE, {"normalize": True}),
    "dare_ties": ("dare_ties", SPARSE, {"normalize": True}),
    "della": ("della", {**SPARSE, "epsilon": 0.15}, {"normalize": True}),
}
# The scale of the merged task vector, chosen per method on the validation splits (as the
# task arithmetic, TIES and DARE papers tune it); linear, the plain average, has none.
LAMBDAS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)


def settings_key(s: qt.Settings) -> str:
    text = json.dumps(s.as_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_models(workdir: Path, s: qt.Settings) -> tuple[Path, dict[str, Path], dict[str, Any]]:
    """(folder, {name: model folder}, training record); trains only what the cache lacks."""
    folder = workdir / f"models-{settings_key(s)}"
    names = ["base", *qt.TASKS]
    paths = {n: folder / n for n in names}
    record_path = folder / "training.json"
    qt.write_splits(folder / "data", s)
    if record_path.is_file():
        return folder, paths, {**json.loads(record_path.read_text()), "cached": True}
    tokenizer = qt.make_tokenizer()
    record: dict[str, Any] = {"settings": s.as_dict(), "runs": {}}
    start = time.perf_counter()
    log(f"training base on {'+'.join(qt.TASKS)} ({s.base_steps} steps)")
    base = qt.make_model(s, tokenizer)
    run = qt.Run(qt.TASKS, s.base_steps, seed=s.seed, lr=s.lr)
    qt.train(base, tokenizer, run, s, log=log)
    qt.save(base, tokenizer, paths["base"])
    record["runs"]["base"] = {"steps": run.steps, "final_loss": run.losses[-1]}
    for i, task in enumerate(qt.TASKS, start=1):
        log(f"fine-tuning on {task} ({s.finetune_steps} steps)")
        tuned = copy.deepcopy(base)
        run = qt.Run((task,), s.finetune_steps, seed=s.seed + i, lr=s.finetune_lr)
        qt.train(tuned, tokenizer, run, s, log=log)
        qt.save(tuned, tokenizer, paths[task])
        record["runs"][task] = {"steps": run.steps, "final_loss": run.losses[-1]}
    record["train_seconds"] = round(time.perf_counter() - start, 1)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return folder, paths, {**record, "cached": False}


def make_recipe(
    name: str, paths: dict[str, Path], seed: int = 0, scale: float | None = None
) -> dict[str, Any]:
    """The recipe of ``RECIPES[name]`` over the four fine-tunes (and the base), with
    ``lambda: scale`` when given."""
    method, per_model, global_params = RECIPES[name]
    models: list[dict[str, Any]] = [
        {"model": str(paths[t]), "parameters": dict(per_model)} for t in qt.TASKS
    ]
    recipe: dict[str, Any] = {"merge_method": method, "dtype": "float32", "seed": seed}
    if method != "linear":
        models.insert(0, {"model": str(paths["base"])})
        recipe["base_model"] = str(paths["base"])
    recipe["models"] = models
    params = dict(global_params) | ({} if scale is None else {"lambda": scale})
    if params:
        recipe["parameters"] = params
    return recipe


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def merge_recipe(recipe_file: Path, out: Path, threads: int) -> Path:
    from merge import api

    return api.run(
        recipe_file, out, overwrite=True, progress=False, threads=threads, warn=lambda _: None
    )


def score(model_dir: Path, specs: list[str], batch_size: int, limit: int | None) -> dict:
    """{task: exact_match} of a model folder on the ``generate:`` specs (one per task)."""
    from merge.eval import evaluate_loaded, load_model

    model, tokenizer, _ = load_model(model_dir)
    results = evaluate_loaded(model, tokenizer, specs, batch_size=batch_size, limit=limit)
    return {
        task: r.metrics["exact_match"] for task, r in zip(qt.TASKS, results.results, strict=True)
    }


def row(name: str, kind: str, accuracy: dict[str, float] | None, note: str = "") -> dict:
    average = None if accuracy is None else sum(accuracy.values()) / len(accuracy)
    return {"name": name, "kind": kind, "accuracy": accuracy, "mean": average, "note": note}


def evolve_available(command: list[str]) -> bool:
    done = subprocess.run([*command, "--help"], capture_output=True, cwd=ROOT)
    return done.returncode == 0


def genome(paths: dict[str, Path], validation: dict[str, Path]) -> dict[str, Any]:
    """A mergekit-evolve config over the fine-tunes, scored on the validation splits: one
    task_arithmetic weight per fine-tune, not normalized, so the search sets each task
    vector's scale (it starts at 1/4 each: the average)."""
    return {
        "genome": {
            "models": [str(paths[t]) for t in qt.TASKS],
            "merge_method": "task_arithmetic",
            "base_model": str(paths["base"]),
            "layer_granularity": 0,
            "normalize": False,
            "allow_negative_weights": False,
        },
        "tasks": [
            {"name": f"generate:{validation[t]}", "weight": 1, "metric": "exact_match"}
            for t in qt.TASKS
        ],
    }


def run_evolve(
    run_dir: Path, paths: dict[str, Path], validation: dict[str, Path], args: argparse.Namespace
) -> tuple[Path | None, str]:
    """(best recipe, note): ``merge evolve`` on the genome, or None and why not."""
    evolve = shlex.split(args.evolve_command) if args.evolve_command else EVOLVE
    if not evolve_available(evolve):
        return None, "evolve: not available"
    evolve_dir = run_dir / "evolve"
    evolve_dir.mkdir(parents=True, exist_ok=True)
    genome_file = evolve_dir / "genome.yaml"
    genome_file.write_text(yaml.safe_dump(genome(paths, validation), sort_keys=False))
    command = [*evolve, str(genome_file)]
    command += ["--storage-path", str(evolve_dir / "storage"), *shlex.split(args.evolve_args)]
    log("$ " + shlex.join(command))
    done = subprocess.run(command, cwd=ROOT, stdout=sys.stderr)  # stdout is the table
    if done.returncode != 0:
        return None, f"evolve: failed (exit {done.returncode})"
    found = sorted((evolve_dir / "storage").rglob("best*.yaml"))
    if not found:
        return None, "evolve: finished, but no best*.yaml recipe in its storage path"
    return found[0], f"fitness on validation; {args.evolve_args}".strip("; ")


def machine() -> dict[str, Any]:
    import transformers

    from merge import __version__

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "merge": __version__,
    }


def to_markdown(report: dict[str, Any]) -> str:
    head = "| model | kind | lambda | " + " | ".join(qt.TASKS) + " | mean |"
    lines = [head, "|" + "---|" * (len(qt.TASKS) + 4)]
    for r in report["rows"]:
        acc = r["accuracy"]
        scale = "–" if r.get("lambda") is None else f"{r['lambda']}"
        if acc is None:
            cells = ["–"] * len(qt.TASKS) + [r["note"]]
        else:
            cells = [f"{100 * acc[t]:.1f}" for t in qt.TASKS] + [f"**{100 * r['mean']:.1f}**"]
        lines.append(f"| {r['name']} | {r['kind']} | {scale} | " + " | ".join(cells) + " |")
    swept = [r for r in report["rows"] if r.get("lambda") is not None]
    if swept:
        lines += ["", "| validation mean | " + " | ".join(f"lambda {x}" for x in LAMBDAS) + " |"]
        lines.append("|" + "---|" * (len(LAMBDAS) + 1))
        for r in swept:
            v = r["validation"]
            cells = [f"{100 * v[str(x)]:.1f}" if str(x) in v else "–" for x in LAMBDAS]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += evolve_lines(report["rows"])
    m = report["machine"]
    s = report["settings"]
    lines += [
        "",
        f"Exact match (%) on {s['test']} test examples a task, greedy decoding; each merge at "
        f"the lambda with the best mean on the validation splits ({s['validation']} a task). "
        f"Llama, hidden {s['hidden']}, {s['layers']} layers; base {s['base_steps']} steps "
        f"on the mixture (lr {s['lr']}), each fine-tune {s['finetune_steps']} steps on its "
        f"task (lr {s['finetune_lr']}, batch {s['batch']}); training {report['train_seconds']} s"
        f"{' (cached this run)' if report['cached'] else ''}, "
        f"merging and scoring {report['eval_seconds']} s.",
        f"Machine: {m['processor']}, {m['cpus']} CPUs, torch threads: {m['torch_threads']}, "
        f"python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"merge {m['merge']}.",
        f"Command: `{report['command']}`",
    ]
    return "\n".join(lines) + "\n"


def evolve_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A line on the evolve row's recipe: its method and the weights it found."""
    found = [r for r in rows if r.get("recipe")]
    if not found:
        return []
    recipe = found[0]["recipe"]
    weights = ", ".join(
        f"{Path(m['model']).name} {m['parameters']['weight']:.3f}"
        for m in recipe["models"]
        if "weight" in (m.get("parameters") or {})
    )
    return ["", f"merge evolve ({found[0]['note']}): {recipe['merge_method']}, weights {weights}."]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workdir", type=Path, default=ROOT / ".quality")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    p.add_argument("--markdown", type=Path, help="write the table as markdown")
    p.add_argument("--evolve", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--evolve-args",
        default=EVOLVE_ARGS,
        help=f"options for `merge evolve` (default: {EVOLVE_ARGS})",
    )
    p.add_argument(
        "--evolve-command",
        help="the evolve command to run (default: this python's `-m merge.cli evolve`)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--batch-size", type=int, default=100, help="evaluation batch size")
    p.add_argument("--limit", type=int, help="score only each test split's first N")
    p.add_argument("--methods", help="comma-separated subset of: " + ", ".join(RECIPES))
    return p.parse_args(argv)


def mean(accuracy: dict[str, float]) -> float:
    return sum(accuracy.values()) / len(accuracy)


def merge_row(
    run_dir: Path, paths: dict[str, Path], name: str, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """Merge ``name`` at each scale of ``LAMBDAS`` (linear: once), keep the one with the best
    mean validation accuracy (the smaller scale on a tie) and score it on the test splits."""
    scales: list[float | None] = [None] if RECIPES[name][0] == "linear" else list(LAMBDAS)
    tried: dict[float | None, tuple[float, Path]] = {}
    for scale in scales:
        tag = slug(name) + ("" if scale is None else f"-lambda{scale}")
        recipe_file = run_dir / f"{tag}.yaml"
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe = make_recipe(name, paths, seed, scale)
        recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
        log(f"merging {tag}")
        out = merge_recipe(recipe_file, run_dir / tag, args.threads)
        tried[scale] = (mean(score(out, args.validation, args.batch_size, args.limit)), out)
    best = max(scales, key=lambda sc: (tried[sc][0], -(sc or 0.0)))
    r = row(name, "merge", score(tried[best][1], args.test, args.batch_size, args.limit))
    r["lambda"] = best
    r["validation"] = {str(sc): v for sc, (v, _) in tried.items()}
    return r


def evolve_row(
    run_dir: Path, paths: dict[str, Path], validation: dict[str, Path], args: argparse.Namespace
) -> dict[str, Any]:
    best, note = run_evolve(run_dir, paths, validation, args)
    if best is None:
        log(note)
        return row("merge evolve", "merge", None, note)
    out = merge_recipe(best, run_dir / "evolve-best", args.threads)
    r = row("merge evolve", "merge", score(out, args.test, args.batch_size, args.limit), note)
    r["recipe"] = yaml.safe_load(best.read_text())
    return r


def command_line(argv: list[str] | None) -> str:
    words = [os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)]
    return "python " + shlex.join(words)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = qt.Settings()
    folder, paths, record = ensure_models(args.workdir, s)
    data = folder / "data"
    args.test = [f"generate:{data / f'{t}-test.jsonl'}" for t in qt.TASKS]
    validation = {t: data / f"{t}-validation.jsonl" for t in qt.TASKS}
    args.validation = [f"generate:{validation[t]}" for t in qt.TASKS]
    start = time.perf_counter()
    rows = [row("base", "base", score(paths["base"], args.test, args.batch_size, args.limit))]
    for t in qt.TASKS:
        rows.append(row(t, "fine-tune", score(paths[t], args.test, args.batch_size, args.limit)))
    names = args.methods.split(",") if args.methods else list(RECIPES)
    rows += [merge_row(folder / "merges", paths, n, args, s.seed) for n in names]
    if args.evolve:
        rows.append(evolve_row(folder / "merges", paths, validation, args))
    report = {
        "command": command_line(argv),
        "settings": s.as_dict(),
        "train_seconds": record["train_seconds"],
        "cached": record["cached"],
        "eval_seconds": round(time.perf_counter() - start, 1),
        "training": record,
        "machine": machine(),
        "rows": rows,
    }
    text = to_markdown(report)
    print(text, end="")
    for path, content in ((args.markdown, text), (args.out, json.dumps(report, indent=2) + "\n")):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    return report


if __name__ == "__main__":
    main()
