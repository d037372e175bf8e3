"""What an evolve run shows: ``best.yaml``, ``progress.png`` and the per-generation line.

``write_best`` writes the best candidate's recipe (a normal recipe: ``merge run DIR/best.yaml
OUT`` makes the model that candidate was scored on) atomically, with a comment giving its
score, generation and the command that made it. ``write_plot`` draws the best-so-far and mean
score per generation with matplotlib (Agg backend, imported only here); without matplotlib
it returns a warning naming the extra instead. ``generation_line`` is the terminal line.

What it does not do: read the storage directory (``merge.evolve.store`` does).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from merge.evolve.store import atomic_write


def write_best(directory: Path, recipe: dict[str, Any], record: dict[str, Any]) -> Path:
    head = (
        f"# merge evolve: best candidate so far, score {record['score']:.6g} (generation "
        f"{record['generation']}, candidate {record['index']})\n"
        f"# make it with: merge run {directory / 'best.yaml'} OUT\n"
    )
    path = directory / "best.yaml"
    atomic_write(path, (head + yaml.safe_dump(recipe, sort_keys=False)).encode())
    return path


def per_generation(history: Sequence[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """``(generation, best so far, mean of the generation)`` for each generation."""
    gens: dict[int, list[float]] = {}
    for r in history:
        gens.setdefault(int(r["generation"]), []).append(float(r["score"]))
    out, best = [], float("-inf")
    for g in sorted(gens):
        best = max(best, *gens[g])
        out.append((g, best, sum(gens[g]) / len(gens[g])))
    return out


def write_plot(directory: Path, history: Sequence[dict[str, Any]]) -> str | None:
    """Write ``progress.png``; a warning (and no file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "progress.png not drawn: matplotlib is missing (pip install 'mergesmith[evolve]')"
    rows = per_generation(history)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label="best so far")
    ax.plot([r[0] for r in rows], [r[2] for r in rows], marker=".", label="generation mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("score")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(directory / "progress.png", buf.getvalue())
    return None


def _short(values: Sequence[float], most: int = 8) -> str:
    shown = ", ".join(f"{v:.3g}" for v in values[:most])
    return f"[{shown}{', ...' if len(values) > most else ''}]"


def generation_line(gen: int, records: Sequence[dict[str, Any]], best: dict[str, Any]) -> str:
    mean = sum(r["score"] for r in records) / max(1, len(records))
    params = " ".join(f"{k}={_short(v)}" for k, v in best["values"].items())
    return f"gen {gen}: best {best['score']:.6g} (mean {mean:.6g}) {params}"
