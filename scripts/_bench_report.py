"""The benchmark result as a markdown table, with the machine, versions and command line.

Design: a pure function of the JSON result written by ``scripts/bench.py`` (so a table can be
rebuilt from a saved result: ``python scripts/_bench_report.py result.json``). Times are medians
with the minimum in parentheses (ours/floor: the ratio of the medians, then of the minima);
memory is the worst peak over the runs, in MB (10^6 bytes); CPU is CPU time over wall time
(1.0 = one core busy throughout). A failed run shows as ``failed``. Below the table: the floor's
read and write times, and the ``--profile`` summaries as a table of shares.

Not done here: plots, or comparisons between result files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MB = 1e6


def _time(s: object) -> str:
    if not isinstance(s, dict):
        return "-"
    if not s.get("ok"):
        return "failed"
    return f"{s['wall_median_s']:.2f} ({s['wall_min_s']:.2f})"


def _mem(s: object, key: str) -> str:
    return f"{s[key] / MB:.0f}" if isinstance(s, dict) and s.get("ok") else "-"


def _size(size: object) -> str:
    if not isinstance(size, int) or not size:
        return "-"
    return f"{size / MB:.0f}" if size >= 10 * MB else f"{size / MB:.2f}"


def _pair(row: dict, key: str, fmt) -> str:  # type: ignore[type-arg]
    values = [fmt(row.get(t), key) for t in ("ours", "mergekit") if isinstance(row.get(t), dict)]
    return " / ".join(values)


def _cpu(s: object, key: str) -> str:
    return f"{s[key]:.2f}" if isinstance(s, dict) and s.get("ok") else "-"


def _ratio(row: dict, key: str) -> str:  # type: ignore[type-arg]
    value = row.get("ratios", {}).get(key)
    return f"{value:.2f}" if value is not None else "-"


def header(result: dict) -> str:  # type: ignore[type-arg]
    m, v = result["machine"], result["versions"]
    ram = m["ram_bytes"] / 2**30
    versions = ", ".join(f"{k} {val}" for k, val in v.items())
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {ram:.1f} GiB RAM; {m['os']}; "
        f"Python {m['python']}.  \n"
        f"Versions: {versions}.  \n"
        f"Preset `{result['preset']}`: {result['parameters_per_model'] / 1e6:.1f}M parameters "
        f"per model, bf16, sharded safetensors; {result['repeat']} runs per tool, warm page "
        f"cache.  \n"
        f"Command: `{result['command']}`\n"
    )


def to_markdown(result: dict) -> str:  # type: ignore[type-arg]
    """The header lines and one table row per recipe."""
    compare = any(isinstance(r.get("mergekit"), dict) for r in result["results"])
    tools = "ours / mergekit" if compare else "ours"
    cols = ["recipe", "models", "input MB", "ours s", "mergekit s", "I/O floor s", "ours/mergekit"]
    cols += ["ours/floor", f"peak RSS MB ({tools})", f"peak anon MB ({tools})"]
    cols += [f"CPU ({tools})", "output MB"]
    if not compare:
        cols = [c for c in cols if "mergekit s" not in c and c != "ours/mergekit"]
    gpu = any(isinstance(r.get("ours_gpu"), dict) for r in result["results"])
    if gpu:
        cols += ["GPU s", "GPU/CPU", "VRAM peak MB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in result["results"]:
        ours = row.get("ours")
        cells = [f"`{row['recipe']}`", str(row["models"]), _size(row["input_bytes"])]
        cells.append(_time(ours))
        if compare:
            cells.append(_time(row.get("mergekit")))
        cells.append(_time(row.get("floor")))
        if compare:
            cells.append(_ratio(row, "ours_over_mergekit"))
        low = _ratio(row, "ours_over_floor_min")
        cells.append(_ratio(row, "ours_over_floor") + (f" ({low})" if low != "-" else ""))
        cells += [_pair(row, "peak_rss", _mem), _pair(row, "peak_anon", _mem)]
        cells.append(_pair(row, "cpu_util", _cpu))
        size = ours.get("output_bytes") if isinstance(ours, dict) else None
        cells.append(_size(size))
        if gpu:
            on_gpu = row.get("ours_gpu")
            cells += [_time(on_gpu), _ratio(row, "gpu_over_cpu")]
            cells.append(_size(on_gpu.get("vram_peak") if isinstance(on_gpu, dict) else None))
        lines.append("| " + " | ".join(cells) + " |")
    failures = [
        f"- `{row['recipe']}` {tool}: {row[tool].get('error', '')}"
        for row in result["results"]
        for tool in ("ours", "ours_gpu", "mergekit")
        if isinstance(row.get(tool), dict) and not row[tool].get("ok")
    ]
    notes = "\nFailed runs:\n" + "\n".join(failures) + "\n" if failures else ""
    return (
        header(result)
        + "\n"
        + "\n".join(lines)
        + "\n"
        + notes
        + _floor_parts(result)
        + (profile_table(result))
    )


def _floor_parts(result: dict) -> str:  # type: ignore[type-arg]
    """One line: the floor's median read and write times per recipe."""
    got = [
        f"`{r['recipe']}` {f['read_median_s']:.2f} + {f['write_median_s']:.2f}"
        for r in result["results"]
        if isinstance(f := r.get("floor"), dict) and "read_median_s" in f
    ]
    return "\nI/O floor, read + write s (medians): " + ", ".join(got) + ".\n" if got else ""


def profile_table(result: dict) -> str:  # type: ignore[type-arg]
    """The ``--profile`` summaries: share of samples per category, one column per recipe."""
    rows = [r for r in result["results"] if isinstance(r.get("profile"), dict)]
    rows = [r for r in rows if "categories" in r["profile"]]
    if not rows:
        return ""
    names: list[str] = []
    for r in rows:
        names += [c["name"] for c in r["profile"]["categories"] if c["name"] not in names]
    cols = ["where the samples went"] + [f"`{r['recipe']}`" for r in rows]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name in names:
        cells = [name]
        for r in rows:
            found = [c for c in r["profile"]["categories"] if c["name"] == name]
            cells.append(f"{found[0]['share'] * 100:.1f}%" if found else "-")
        lines.append("| " + " | ".join(cells) + " |")
    seconds = ", ".join(
        f"`{r['recipe']}` {r['profile']['samples'] / r['profile']['rate']:.1f} s" for r in rows
    )
    return (
        f"\nProfile of one more run of ours per recipe (py-spy, {rows[0]['profile']['rate']} "
        f"samples/s of every busy thread; thread-seconds sampled: {seconds}):\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    print(to_markdown(json.loads(Path(sys.argv[1]).read_text())), end="")
