"""Benchmark `merge run` (and optionally mergekit) on synthetic Llama checkpoints.

    python scripts/bench.py --preset small --repeat 3 \\
        --compare mergekit --mergekit-python /path/to/mergekit-venv/bin/python \\
        --out bench.json --markdown bench.md

Design: ``_bench_models`` generates a base and three fine-tunes of a preset (``tiny``, ``small``
~134M, ``1b`` ~1.1B, ``7b`` ~7.2B parameters; cached under ``--workdir``), this module writes
one recipe per benchmarked method with absolute model paths, and runs each recipe ``--repeat``
times per tool as a subprocess (ours: ``merge run RECIPE OUT -q``; mergekit:
``mergekit-yaml``/``mergekit-moe`` of the given python's environment), interleaved with the I/O
floor of the same recipe (``_bench_measure``: a bare python reading the recipe's inputs once and
writing as many bytes as our output). Runs are warm: the inputs are read once before a recipe's
first run. Every measured run starts after an ``os.sync()`` and each output is deleted once
measured (``--keep-outputs`` keeps the last), so no run pays for writing back an earlier run's
output, and old outputs never push the inputs out of the page cache (at the ``1b`` preset they
would). It reports min and median wall time, peak RSS and peak anonymous memory, CPU utilisation
and output size, and the ratios ours/mergekit and ours/floor, as JSON and as a markdown table
with the machine and versions.

``--device cuda[:N]`` adds a third tool, ``ours_gpu``: ``merge run --device DEVICE`` (with
``--max-vram``), not quiet, so its last stderr line gives the device memory peak (the
allocator's ``max_memory_allocated``), reported as ``vram_peak`` with the ratio
``gpu_over_cpu`` of median wall times. The ``7b`` preset (Mistral-7B's shape) needs about 58 GB
of disk for its four models (14.5 GB each, generated one tensor at a time) plus an output.

The floor also reports its read and write times separately (on a virtual machine the writes,
which make the kernel find fresh page-cache pages, can vary several times from run to run), and
the ratios include ``ours_over_floor_min``, of the minimum times (noise only ever slows a run).
``--profile`` adds one more run of ours per recipe under ``py-spy`` (installed with the ``dev``
extra), summarized by ``_bench_profile`` into where the samples of every thread went (start-up,
reads, the method, checks, writes, hashing, waiting), kept in the JSON and the markdown.

``--offline`` runs another scenario instead (``_bench_offline``): ``merge validate`` of a recipe
with ``--hub-models`` Hub models while the Hub (``--endpoint``) cannot be reached, timed as a
subprocess, printed as one line (wall time, number of models) and written to ``--out``.

Not done here: checking that outputs agree between tools (the test suite does that for the
methods; on a GPU, tests/test_gpu_cuda.py), or cold-cache runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_measure as bm  # noqa: E402
import _bench_profile as bp  # noqa: E402
from _bench_models import PRESETS, ensure_models, parameter_count  # noqa: E402
from _bench_offline import UNREACHABLE, offline_line, run_offline  # noqa: E402
from _bench_report import to_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TA = {"weight": 0.5, "density": 0.5}
RECIPES: dict[str, dict[str, object]] = {
    "linear": {"method": "linear", "models": [1, 2, 3], "params": {"weight": 1.0}},
    "slerp": {"method": "slerp", "models": [0, 1], "base": True, "global": {"t": 0.5}},
    "task_arithmetic": {
        "method": "task_arithmetic",
        "models": [0, 1, 2, 3],
        "base": True,
        "params": {"weight": 0.3},
    },
    "ties": {"method": "ties", "models": [0, 1, 2, 3], "base": True, "params": TA},
    "dare_ties": {"method": "dare_ties", "models": [0, 1, 2, 3], "base": True, "params": TA},
    "breadcrumbs": {
        "method": "breadcrumbs",
        "models": [0, 1, 2, 3],
        "base": True,
        "params": {"weight": 0.5, "density": 0.9, "gamma": 0.01},
    },
    "della": {
        "method": "della",
        "models": [0, 1, 2, 3],
        "base": True,
        "params": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
    },
    "moe": {"method": "moe", "models": [0, 1, 2]},
}
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def recipe_dict(name: str, models: list[Path]) -> dict[str, object]:
    """The mergekit-syntax recipe of benchmark ``name`` over ``models`` (0 = base)."""
    spec = RECIPES[name]
    used = [str(models[i]) for i in spec["models"]]  # type: ignore[attr-defined]
    if spec["method"] == "moe":
        experts = [{"source_model": m} for m in used[1:]]
        return {
            "base_model": used[0],
            "gate_mode": "random",
            "experts_per_token": 2,
            "dtype": "bfloat16",
            "experts": experts,
        }
    entries: list[dict[str, object]] = []
    for i, path in enumerate(used):
        is_base = spec.get("base") and i == 0
        params = spec.get("params")
        entries.append(
            {"model": path} if is_base or not params else {"model": path, "parameters": params}
        )
    recipe: dict[str, object] = {"models": entries, "merge_method": spec["method"]}
    if spec.get("base"):
        recipe["base_model"] = used[0]
    if spec.get("global"):
        recipe["parameters"] = spec["global"]
    recipe["dtype"] = "bfloat16"
    return recipe


def input_files(name: str, models: list[Path]) -> list[Path]:
    dirs = [models[i] for i in RECIPES[name]["models"]]  # type: ignore[attr-defined]
    return [f for d in dirs for f in sorted(d.glob("*.safetensors"))]


def _merge_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("merge")
    found = str(exe) if exe.exists() else shutil.which("merge")
    if not found:
        raise SystemExit("error: the `merge` command is not installed (pip install -e .)")
    return [found]


def _mergekit_cmd(python: str, moe: bool) -> list[str]:
    script = Path(python).with_name("mergekit-moe" if moe else "mergekit-yaml")
    if script.exists():
        cmd = [str(script)]
    else:
        cmd = [python, "-m", "mergekit.scripts." + ("moe" if moe else "run_yaml")]
    return cmd + (["--i-understand-this-is-not-useful-without-training"] if moe else [])


def _command(tool: str, args: argparse.Namespace, recipe: Path, out: Path, moe: bool) -> list[str]:
    if tool == "ours_gpu":  # not -q: the run's last stderr line is its device memory peak
        vram = ["--max-vram", args.max_vram] if args.max_vram else []
        dev = ["--device", args.device, *vram]
        return _merge_cmd() + ["run", str(recipe), str(out), *dev] + shlex.split(args.merge_args)
    if tool == "ours":
        return _merge_cmd() + ["run", str(recipe), str(out), "-q"] + shlex.split(args.merge_args)
    extra = shlex.split(args.mergekit_args)
    return _mergekit_cmd(args.mergekit_python, moe) + [str(recipe), str(out)] + extra


def _sample_dict(s: bm.Sample) -> dict[str, object]:
    return {
        "wall_s": round(s.wall_s, 4),
        "cpu_s": round(s.cpu_s, 4),
        "cpu_util": round(s.cpu_util, 3),
        "peak_rss": s.peak_rss,
        "peak_anon": s.peak_anon,
        "returncode": s.returncode,
        **({"error": s.error} if s.error else {}),
        **(s.parts or {}),
    }


def summarize(samples: list[bm.Sample], output_bytes: int = 0) -> dict[str, object]:
    """Min and median wall time, worst peaks and median CPU use over the successful runs."""
    ok = [s for s in samples if s.returncode == 0]
    summary: dict[str, object] = {"runs": [_sample_dict(s) for s in samples], "ok": bool(ok)}
    if not ok:
        summary["error"] = samples[-1].error if samples else "not run"
        return summary
    summary.update(
        wall_min_s=round(min(s.wall_s for s in ok), 4),
        wall_median_s=round(statistics.median(s.wall_s for s in ok), 4),
        cpu_util=round(statistics.median(s.cpu_util for s in ok), 3),
        peak_rss=max(s.peak_rss for s in ok),
        peak_anon=max(s.peak_anon for s in ok),
        output_bytes=output_bytes,
        cpu_median_s=round(statistics.median(s.cpu_s for s in ok), 4),
    )
    parts = [s.parts for s in ok if s.parts]
    for key in sorted({k for p in parts for k in p}):
        summary[f"{key[:-2]}_median_s"] = round(statistics.median(p[key] for p in parts), 4)
    return summary


def _run_tool(
    tool: str, args: argparse.Namespace, recipe: Path, name: str
) -> tuple[bm.Sample, int]:
    out = args.workdir / "out" / tool / name
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = _command(tool, args, recipe, out, RECIPES[name]["method"] == "moe")
    log = args.workdir / "logs" / f"{tool}-{name}.log"
    os.sync()  # no run pays for writing back an earlier one's output
    sample = bm.measure(cmd, log, env={**os.environ, **ENV}, timeout=args.timeout)
    size = bm.dir_bytes(out) if sample.returncode == 0 and out.exists() else 0
    if not args.keep_outputs:  # old outputs would push the inputs out of the page cache
        shutil.rmtree(out, ignore_errors=True)
    return sample, size


VRAM_LINE = re.compile(r"device memory peak: .*\((\d+) bytes\)")


def vram_peak(log: Path) -> int | None:
    """The device memory peak that ``merge run --device cuda`` printed into ``log``."""
    found = VRAM_LINE.findall(log.read_text(errors="replace")) if log.exists() else []
    return int(found[-1]) if found else None


def bench_recipe(name: str, models: list[Path], args: argparse.Namespace) -> dict[str, object]:
    """Run one recipe ``args.repeat`` times per tool, each repetition followed by its floor."""
    recipe = args.workdir / "recipes" / f"{name}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(json.dumps(recipe_dict(name, models), indent=2))  # JSON is valid YAML
    files = input_files(name, models)
    tools = ["ours"] + (["ours_gpu"] if args.device != "cpu" else [])
    tools += ["mergekit"] if args.compare == "mergekit" else []
    vram: list[int] = []
    scratch = args.workdir / "out" / "floor"
    bm.floor(files, 0, scratch, args.workdir / "logs" / "warmup.log")  # warm the page cache
    samples: dict[str, list[bm.Sample]] = {t: [] for t in ["floor"] + tools}
    sizes: dict[str, int] = {}
    for _ in range(args.repeat):
        for tool in tools:
            sample, size = _run_tool(tool, args, recipe, name)
            samples[tool].append(sample)
            sizes[tool] = sizes.get(tool) or size
            peak = vram_peak(args.workdir / "logs" / f"{tool}-{name}.log")
            if tool == "ours_gpu" and peak is not None:
                vram.append(peak)
        out_bytes = sizes.get("ours") or sizes.get("mergekit") or 0
        log = args.workdir / "logs" / f"floor-{name}.log"
        os.sync()
        samples["floor"].append(bm.floor(files, out_bytes, scratch, log))
    row: dict[str, object] = {
        "recipe": name,
        "models": len(RECIPES[name]["models"]),  # type: ignore[arg-type]
        "input_bytes": sum(f.stat().st_size for f in files),
    }
    for tool, runs in samples.items():
        row[tool] = summarize(runs, sizes.get(tool, sizes.get("ours", 0)))
    if vram:
        row["ours_gpu"]["vram_peak"] = max(vram)  # type: ignore[index]
    row["ratios"] = _ratios(row)
    if args.profile:
        row["profile"] = _profile(args, recipe, name)
    return row


def _profile(args: argparse.Namespace, recipe: Path, name: str) -> dict[str, object]:
    """One more run of ours under py-spy, summarized (``_bench_profile``)."""
    out = args.workdir / "out" / "profile" / name
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.workdir / "logs" / f"profile-{name}.txt"
    os.sync()
    try:
        return bp.profile(
            _command("ours", args, recipe, out, False), raw, env={**os.environ, **ENV}
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _ratios(row: dict[str, object]) -> dict[str, float]:
    def median(tool: str) -> float | None:
        s = row.get(tool)
        return s.get("wall_median_s") if isinstance(s, dict) and s.get("ok") else None  # type: ignore[return-value]

    ours, mk, floor = median("ours"), median("mergekit"), median("floor")
    ratios = {}
    gpu = median("ours_gpu")
    if ours and gpu:
        ratios["gpu_over_cpu"] = round(gpu / ours, 3)
    if ours and mk:
        ratios["ours_over_mergekit"] = round(ours / mk, 3)
    if ours and floor:
        ratios["ours_over_floor"] = round(ours / floor, 3)
    low = [row.get(t, {}).get("wall_min_s") for t in ("ours", "floor")]  # type: ignore[attr-defined]
    if all(low):
        ratios["ours_over_floor_min"] = round(low[0] / low[1], 3)
    return ratios


def _version(module: str, python: str | None = None) -> str:
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    try:
        got = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return got.stdout.strip() or "unknown"


def versions(args: argparse.Namespace) -> dict[str, str]:
    got = {m: _version(m) for m in ("mergesmith", "torch", "safetensors")}
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    got["commit"] = commit.stdout.strip() or "unknown"
    if args.compare == "mergekit":
        got["mergekit"] = _version("mergekit", args.mergekit_python)
    return got


def run_bench(args: argparse.Namespace) -> dict[str, object]:
    """Generate (or reuse) the models, run every selected recipe, and return the result."""
    names = args.recipes.split(",") if args.recipes else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise SystemExit(f"error: unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    models = ensure_models(args.workdir, args.preset, args.seed, 4)
    rows = []
    for name in names:
        rows.append(bench_recipe(name, models, args))
        if not args.quiet:
            print(_progress_line(rows[-1]), file=sys.stderr)
    return {
        "command": args.command_line,
        "preset": args.preset,
        "parameters_per_model": parameter_count(PRESETS[args.preset]),
        "seed": args.seed,
        "repeat": args.repeat,
        "machine": bm.machine(),
        "versions": versions(args),
        "merge_args": args.merge_args,
        "device": args.device,
        "max_vram": args.max_vram or None,
        "mergekit_args": args.mergekit_args if args.compare else None,
        "results": rows,
    }


def _progress_line(row: dict[str, object]) -> str:
    parts = [str(row["recipe"])]
    for tool in ("ours", "mergekit", "floor"):
        s = row.get(tool)
        if isinstance(s, dict):
            parts.append(f"{tool} {s.get('wall_median_s', 'failed')}s")
    return "  ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--recipes", default="", help=f"comma-separated subset of {list(RECIPES)}")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic models")
    p.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    p.add_argument("--compare", choices=["mergekit"], default=None)
    p.add_argument("--mergekit-python", default="", help="python of a venv with mergekit")
    p.add_argument("--merge-args", default="", help="extra options for `merge run`")
    p.add_argument("--mergekit-args", default="", help="extra options for mergekit")
    p.add_argument(
        "--device",
        default="cpu",
        help="cuda or cuda:N: also time `merge run --device DEVICE` (ratio gpu_over_cpu)",
    )
    p.add_argument("--max-vram", default="", help="--max-vram of the --device runs")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    p.add_argument(
        "--keep-outputs",
        action="store_true",
        help="keep each tool's last output under WORKDIR/out (default: deleted once measured)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more run of ours per recipe under py-spy: where its time goes",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    p.add_argument("--markdown", type=Path, default=None, help="markdown table file")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--offline",
        action="store_true",
        help="instead: time `merge validate` of --hub-models Hub models, the Hub unreachable",
    )
    p.add_argument("--hub-models", type=int, default=4, help="Hub models of --offline")
    p.add_argument("--endpoint", default=UNREACHABLE, help="unreachable HF_ENDPOINT of --offline")
    args = p.parse_args(argv)
    if args.compare and not args.mergekit_python:
        p.error("--compare mergekit needs --mergekit-python PATH")
    if args.repeat < 1 or args.hub_models < 1:
        p.error("--repeat and --hub-models must be at least 1")
    args.workdir = args.workdir.resolve()
    given = sys.argv[1:] if argv is None else argv
    args.command_line = shlex.join(["python", "scripts/bench.py", *given])
    return args


def main_offline(args: argparse.Namespace) -> dict[str, object]:
    result = run_offline(args.workdir, args.hub_models, args.repeat, args.endpoint, args.timeout)
    result = {"command": args.command_line, **result}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.quiet:
        print(offline_line(result))
    return result


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if args.offline:
        return main_offline(args)
    result = run_bench(args)
    table = to_markdown(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    if not args.quiet:
        print(table)
    return result


if __name__ == "__main__":
    main()
