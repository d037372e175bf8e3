"""The benchmark's offline scenario: `merge validate` of N Hub models when the Hub is unreachable.

    python scripts/bench.py --offline --hub-models 4 --repeat 3

Design: ``run_offline`` writes a linear recipe naming N Hub ids that no cache holds
(``bench/offline-1`` ...) and runs ``python -m merge.cli validate RECIPE`` ``--repeat`` times as
a subprocess, with ``PYTHONPATH`` at the repository root (this checkout is measured, not an
installed ``merge``), ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` unset, ``HF_ENDPOINT`` at
``--endpoint`` (default ``https://hub.invalid``, a name that never resolves) and an empty
``HF_HUB_CACHE``. A run is as expected when it exits 2 with one ``error:`` line per model and no
huggingface_hub ``Retrying in`` line; the result gives min and median wall time and the median
per model.

Not done here: a Hub that accepts connections and never answers (the tests cover that probe
timeout), proxies, or a reachable Hub.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import _bench_measure as bm

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = "https://hub.invalid"


def recipe_text(n: int) -> str:
    lines = ["merge_method: linear", "models:"]
    for i in range(1, n + 1):
        lines += [f"  - model: bench/offline-{i}", "    parameters: {weight: 1}"]
    return "\n".join(lines) + "\n"


def offline_env(endpoint: str, cache: Path) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    path = [str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_CACHE=str(cache),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join(path),
    )
    return env


def run_offline(workdir: Path, n: int, repeat: int, endpoint: str, timeout: float) -> dict:
    """Time ``repeat`` runs of `merge validate` on ``n`` Hub models with ``endpoint`` down."""
    work = workdir / "offline"
    cache = work / "empty-hf-cache"
    cache.mkdir(parents=True, exist_ok=True)
    recipe = work / "recipe.yaml"
    recipe.write_text(recipe_text(n))
    cmd = [sys.executable, "-m", "merge.cli", "validate", str(recipe)]
    runs = []
    for i in range(repeat):
        log = work / f"validate-{i}.log"
        sample = bm.measure(cmd, log, env=offline_env(endpoint, cache), timeout=timeout)
        lines = log.read_text(errors="replace").splitlines()
        errors = sum(line.startswith("error: ") for line in lines)
        retries = sum("Retrying in" in line for line in lines)
        ok = sample.returncode == 2 and errors == n and retries == 0
        runs.append(
            {"wall_s": round(sample.wall_s, 4), "returncode": sample.returncode}
            | {"error_lines": errors, "retry_lines": retries, "as_expected": ok}
        )
    walls = [r["wall_s"] for r in runs]
    median = statistics.median(walls)
    return {
        "scenario": "offline",
        "endpoint": endpoint,
        "models": n,
        "repeat": repeat,
        "ok": all(r["as_expected"] for r in runs),
        "wall_min_s": min(walls),
        "wall_median_s": median,
        "per_model_median_s": round(median / n, 4),
        "runs": runs,
        "machine": bm.machine(),
    }


def offline_line(result: dict) -> str:
    state = "as expected" if result["ok"] else f"NOT as expected: {result['runs']}"
    return (
        f"offline: `merge validate` of {result['models']} Hub models, {result['endpoint']} "
        f"unreachable: wall min {result['wall_min_s']:.2f} s, median "
        f"{result['wall_median_s']:.2f} s ({result['per_model_median_s']:.2f} s per model); "
        f"{state}"
    )
