"""scripts/bench.py: synthetic checkpoints, measurement, and the JSON and markdown results.

Runs the ``tiny`` preset through the script's own functions (our tool only, never mergekit), so
the benchmark cannot silently rot; the timings themselves are not checked.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import _bench_measure as bm  # noqa: E402
import _bench_profile as bp  # noqa: E402
import _bench_report as br  # noqa: E402
import bench  # noqa: E402
from _bench_models import PRESETS, ensure_models, parameter_count, tensor_shapes  # noqa: E402

from tiny import assert_loads_and_generates  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / shard), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    assert sorted(tensors) == sorted(index["weight_map"])
    return tensors


def test_preset_sizes_match_the_models_they_imitate() -> None:
    # SmolLM-135M and TinyLlama-1.1B, counted by hand from their configs.
    assert parameter_count(PRESETS["small"]) == 134_515_008
    assert parameter_count(PRESETS["1b"]) == 1_100_048_384


def test_synthetic_models_are_sharded_deterministic_and_load(workdir: Path) -> None:
    base, ft1, *_ = ensure_models(workdir, "tiny", 7, 4)
    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) >= 2
    with open(shards[0], "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        assert length % 8 == 0 and json.loads(f.read(length))["__metadata__"] == {"format": "pt"}
    a, b = _read_all(base), _read_all(ft1)
    shapes = sorted((k, tuple(v.shape)) for k, v in a.items())
    assert shapes == sorted(tensor_shapes(PRESETS["tiny"]))
    assert all(v.dtype == torch.bfloat16 for v in a.values())
    for name in a:
        diff = (b[name].float() - a[name].float()).abs()
        assert 0 < diff.max() < 0.05, name  # a fine-tune: base + small noise
    mtime = shards[0].stat().st_mtime_ns
    assert ensure_models(workdir, "tiny", 7, 2)[0] == base  # reused, not rewritten
    assert shards[0].stat().st_mtime_ns == mtime
    again = ensure_models(workdir / "again", "tiny", 7, 1)[0]
    assert all(torch.equal(v, _read_all(again)[k]) for k, v in a.items())
    assert not torch.equal(_read_all(ensure_models(workdir, "tiny", 8, 1)[0])[name], a[name])
    assert_loads_and_generates(base)


def test_measure_sees_memory_cpu_and_failures(tmp_path: Path) -> None:
    code = "import time; b = bytearray(300 * 2**20); t = time.time()\n"
    code += "while time.time() - t < 0.3: pass"
    s = bm.measure([sys.executable, "-c", code], tmp_path / "a.log")
    assert s.returncode == 0 and s.error == ""
    assert 300 * 2**20 <= s.peak_anon <= s.peak_rss < 400 * 2**20
    assert 0.6 < s.cpu_util <= 1.1 and s.wall_s >= 0.3
    bad = bm.measure([sys.executable, "-c", "raise SystemExit('boom')"], tmp_path / "b.log")
    assert bad.returncode == 1 and "boom" in bad.error


def test_floor_reads_inputs_and_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "in.bin"
    data.write_bytes(b"x" * 3_000_000)
    s = bm.floor([data], 5_000_000, tmp_path / "scratch", tmp_path / "f.log")
    assert s.returncode == 0 and s.cpu_s > 0
    assert s.parts is not None and set(s.parts) == {"read_s", "write_s"}
    assert 0 < s.parts["read_s"] + s.parts["write_s"] < s.wall_s
    assert list((tmp_path / "scratch").iterdir()) == []
    missing = bm.floor([tmp_path / "nope"], 1, tmp_path / "scratch", tmp_path / "g.log")
    assert missing.returncode != 0


def test_bench_tiny_writes_json_markdown_and_outputs(workdir: Path, tmp_path: Path) -> None:
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["--preset", "tiny", "--recipes", "dare_ties,moe", "--repeat", "1", "--quiet"]
    argv += ["--workdir", str(workdir), "--out", str(out), "--markdown", str(md)]
    result = bench.main([*argv, "--keep-outputs"])
    assert json.loads(out.read_text()) == result
    assert result["preset"] == "tiny" and result["repeat"] == 1
    assert result["machine"]["cores"] >= 1 and result["versions"]["torch"] == torch.__version__
    assert [r["recipe"] for r in result["results"]] == ["dare_ties", "moe"]
    for row in result["results"]:
        ours, floor = row["ours"], row["floor"]
        assert ours["ok"] and floor["ok"], row
        assert len(ours["runs"]) == 1 and ours["wall_min_s"] == ours["wall_median_s"] > 0
        assert ours["peak_anon"] > 0 and ours["peak_rss"] >= ours["peak_anon"]
        produced = workdir / "out" / "ours" / row["recipe"]
        assert ours["output_bytes"] == bm.dir_bytes(produced) > 0
        assert floor["output_bytes"] == ours["output_bytes"]
        assert row["ratios"]["ours_over_floor"] == round(
            ours["wall_median_s"] / floor["wall_median_s"], 3
        )
        assert "mergekit" not in row and "ours_over_mergekit" not in row["ratios"]
    assert_loads_and_generates(workdir / "out" / "ours" / "moe")
    table = md.read_text()
    assert f"Command: `{result['command']}`" in table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`dare_ties`", "`moe`"]
    assert "mergekit" not in table.split("Command:")[1]


def test_bench_deletes_each_output_once_measured(workdir: Path, tmp_path: Path) -> None:
    argv = ["--preset", "tiny", "--recipes", "linear", "--repeat", "1", "--quiet"]
    result = bench.main([*argv, "--workdir", str(workdir), "--out", str(tmp_path / "r.json")])
    (row,) = result["results"]
    assert row["ours"]["ok"] and row["ours"]["output_bytes"] > 0  # measured before deleting
    assert not (workdir / "out" / "ours" / "linear").exists()


def test_failed_runs_are_reported_not_hidden() -> None:
    failed = bm.Sample(1.0, 0.5, 10, 5, returncode=2, error="error: x.yaml:3: bad")
    summary = bench.summarize([failed])
    assert summary["ok"] is False and summary["error"] == "error: x.yaml:3: bad"
    row = {"recipe": "ties", "models": 4, "input_bytes": 10**6, "ours": summary}
    row["floor"] = bench.summarize([bm.Sample(0.1, 0.1, 1, 1, 0)], 10)
    row["ratios"] = bench._ratios(row)
    assert row["ratios"] == {}
    result = {"results": [row], "preset": "tiny", "parameters_per_model": 1, "repeat": 1}
    result |= {"command": "c", "machine": bm.machine(), "versions": {"torch": "x"}}
    table = bench.to_markdown(result)
    assert "| `ties` | 4 | 1.00 | failed |" in table
    assert "- `ties` ours: error: x.yaml:3: bad" in table


def test_recipes_are_mergekit_syntax() -> None:
    models = [Path(f"/m/{i}") for i in range(4)]
    ties = bench.recipe_dict("ties", models)
    assert ties["base_model"] == "/m/0" and ties["models"][0] == {"model": "/m/0"}
    assert ties["models"][1] == {"model": "/m/1", "parameters": {"weight": 0.5, "density": 0.5}}
    linear = bench.recipe_dict("linear", models)
    assert [m["model"] for m in linear["models"]] == ["/m/1", "/m/2", "/m/3"]
    moe = bench.recipe_dict("moe", models)
    assert moe["gate_mode"] == "random" and len(moe["experts"]) == 2
    assert set(bench.RECIPES) >= {"linear", "slerp", "ties", "dare_ties", "della", "moe"}


def test_offline_scenario_times_validate_against_an_unreachable_hub(tmp_path: Path) -> None:
    closed = socket.create_server(("127.0.0.1", 0))  # a port nothing listens on once closed
    endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    argv = ["--offline", "--hub-models", "3", "--repeat", "1", "--quiet", "--endpoint", endpoint]
    result = bench.main([*argv, "--workdir", str(tmp_path), "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert result["ok"] and result["models"] == 3 and result["endpoint"] == endpoint
    (run,) = result["runs"]
    assert run["returncode"] == 2 and run["error_lines"] == 3 and run["retry_lines"] == 0
    assert result["wall_median_s"] == run["wall_s"] > 0
    assert "3 Hub models" in bench.offline_line(result)


def test_bench_device_runs_ours_on_the_gpu_and_reports_vram(tmp_path: Path) -> None:
    """--device cuda: the GPU tool's command, its VRAM peak from the run's log, the ratio and
    the table's GPU columns (without a GPU: on a made-up result)."""
    from _bench_report import to_markdown

    args = bench.parse_args(["--device", "cuda:1", "--max-vram", "4GB", "--merge-args", "-t 2"])
    cmd = bench._command("ours_gpu", args, Path("r.yaml"), Path("o"), False)
    assert cmd[1:] == ["run", "r.yaml", "o", "--device", "cuda:1", "--max-vram", "4GB", "-t", "2"]
    log = tmp_path / "ours_gpu-linear.log"
    log.write_text("note\ndevice memory peak: 1.23 GB on cuda:1, --max-vram 4.00 GB (1234 bytes)\n")
    assert bench.vram_peak(log) == 1234 and bench.vram_peak(tmp_path / "none.log") is None
    ok = {"ok": True, "wall_median_s": 2.0, "wall_min_s": 1.0, "peak_rss": 1, "peak_anon": 1}
    row = {"recipe": "linear", "models": 2, "input_bytes": 10, "ours": {**ok, "cpu_util": 1.0}}
    row["ours_gpu"] = {**ok, "wall_median_s": 1.0, "vram_peak": 50 * 2**20, "cpu_util": 1.0}
    row["floor"] = ok
    row["ratios"] = bench._ratios(row)
    assert row["ratios"]["gpu_over_cpu"] == 0.5
    result = {"results": [row], "preset": "7b", "repeat": 1, "command": "c", "seed": 0}
    result |= {
        "parameters_per_model": parameter_count(PRESETS["7b"]),
        "machine": bm.machine(),
        "versions": {},
    }
    assert 7.0e9 < result["parameters_per_model"] < 7.5e9  # Mistral-7B's shape
    table = to_markdown(result)
    assert "GPU/CPU" in table and "| 0.50 | 52 |" in table


def _stack(*frames: tuple[str, str]) -> str:
    return ";".join(f"{func} ({file}:1)" for func, file in frames)


def test_profile_samples_go_to_what_the_innermost_merge_frame_does() -> None:
    """Raw py-spy lines (``stack count``): imports win, then a waiting leaf, then the
    innermost frame of the merge package; the table shows each category's share."""
    run = ("run", "merge/cli.py")
    job = ("_stream_job", "merge/execute.py")
    chunks = ("merge_chunks", "merge/methods/stream.py")
    raw = "\n".join(
        [
            _stack(run, ("_find_and_load", "<frozen importlib._bootstrap>"), ("x", "torch/a.py"))
            + " 30",
            _stack(job, chunks, ("linear", "merge/methods/linear.py")) + " 40",
            _stack(job, chunks, ("read", "merge/reads.py"), ("_pread", "merge/checkpoint.py"))
            + " 20",
            _stack(job, ("emit", "merge/execute.py"), ("_pwrite_all", "merge/writer.py")) + " 5",
            _stack(("_loop", "merge/shardhash.py"), ("_next", "merge/shardhash.py"))
            + ";Condition.wait (threading.py:320) 4",
            _stack(("_loop", "merge/shardhash.py")) + " 1",
            "garbage line",
        ]
    )
    got = bp.summarize(raw, rate=100)
    shares = {c["name"]: c["samples"] for c in got["categories"]}  # type: ignore[index]
    assert got["samples"] == 100
    assert shares == {
        bp.IMPORTS: 30,
        "method math": 40,
        "reading (preadv)": 20,
        "writing (pwrite)": 5,
        bp.WAITING: 4,
        "hashing: shard sha256 (manifest)": 1,
    }
    result = {"results": [{"recipe": "linear", "profile": got}]}
    table = br.profile_table(result)
    assert "| method math | 40.0% |" in table and "`linear` 1.0 s" in table
