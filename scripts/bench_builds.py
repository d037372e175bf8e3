"""What builds cost: header-only planning of Hub models, the hash cache, the manifest.

    python scripts/bench_builds.py --preset small --repeat 3

Design: reuses the benchmark's synthetic Llama checkpoints (``_bench_models``: a base and
three fine-tunes, cached under ``--workdir``) and the tests' Hub-compatible server
(``tests/hubserver.py``, the real huggingface_hub client talking to 127.0.0.1). Every command
runs as a subprocess (``python -m merge.cli``) with its own Hugging Face cache and hash cache,
and prints one markdown table:

- ``merge plan`` of a TIES recipe over the four models as Hub ids: bytes the server sent (in
  all, and of ``.safetensors`` files) against the weights' size, and the wall time;
  ``merge run`` of it: the bytes sent then (the download, after the plan passed);
- ``merge lock`` of the same recipe over the local folders with an empty hash cache (every
  file read and hashed) and again (``--update``: every entry resolved again, from the cache),
  and ``merge outdated``;
- ``merge publish`` of the TIES output (50 MB shards) to the upload server
  (``tests/hubupload.py``): the first publish (every file), an unchanged republish (nothing
  sent, no commit) and, after one tensor of one fine-tune changed and the output was rebuilt,
  the third (only the shard holding it, and the small files): time, bytes received, commits;
- ``merge run`` with an empty hash cache (the inputs hashed on a background thread while the
  merge runs, for the manifest) and with a warm one, and ``merge verify`` of the output (every
  byte read), median of ``--repeat`` runs each.

Not done here: a comparison with mergekit (``scripts/bench.py``), or a real Hub (the local
server reads whole files to answer range requests: its times are not the Hub's; bytes are).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

from _bench_models import PRESETS, ensure_models  # noqa: E402

from hubserver import HubServer  # noqa: E402
from hubupload import Account, UploadHub  # noqa: E402

MB = 1e6


def merge(args: list[str], env: dict[str, str]) -> float:
    """Run ``merge ARGS`` quietly; its wall time in seconds (an error stops the benchmark)."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "merge.cli", *args, "-q"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return time.perf_counter() - start


def recipe(folder: Path, models: list[str]) -> Path:
    entries = [{"model": models[0]}]
    entries += [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in models[1:]]
    path = folder / "ties.yaml"
    text = {"merge_method": "ties", "base_model": models[0], "models": entries}
    path.write_text(yaml.safe_dump({**text, "dtype": "bfloat16"}, sort_keys=False))
    return path


def environment(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_XET": "1"}
    env.update(HF_HUB_CACHE=str(tmp / "hf"), MERGE_CACHE_DIR=str(tmp / "hashes"), **extra)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(key, None)
    return env


def hub_rows(models: list[Path], tmp: Path) -> list[tuple[str, str]]:
    weights = sum(f.stat().st_size for m in models for f in m.glob("*.safetensors"))
    repos = {f"bench/m{i}": {"main": m} for i, m in enumerate(models)}
    with HubServer(repos) as server:
        env = environment(tmp / "hub", HF_ENDPOINT=server.endpoint)
        path = recipe(tmp, list(repos))
        seconds = merge(["plan", str(path)], env)
        sent, weights_sent = server.bytes_served(), server.bytes_served(".safetensors")
        merge(["run", str(path), str(tmp / "hub-out")], env)
        downloaded = server.bytes_served(".safetensors") - weights_sent
    shards = sum(len(list(m.glob("*.safetensors"))) for m in models)
    return [
        ("models, shards, weights", f"{len(models)}, {shards}, {weights / MB:.0f} MB"),
        ("`merge plan` of Hub ids: bytes sent", f"{sent / MB:.2f} MB"),
        ("  of which .safetensors (header range reads)", f"{weights_sent / MB:.2f} MB"),
        ("  per shard", f"{weights_sent / shards / 1e3:.0f} kB"),
        ("  wall time", f"{seconds:.2f} s"),
        ("`merge run`: .safetensors bytes downloaded", f"{downloaded / MB:.0f} MB"),
    ]


def local_rows(models: list[Path], tmp: Path, repeat: int) -> list[tuple[str, str]]:
    path = recipe(tmp, [str(m) for m in models])
    env = environment(tmp / "local")
    cold_lock = merge(["lock", str(path)], env)
    warm_lock = merge(["lock", "--update", str(path)], env)
    outdated = merge(["outdated", str(path)], env)
    (tmp / "ties.lock").unlink()
    cold, warm, verify = [], [], []
    for i in range(repeat):
        shutil.rmtree(tmp / "local" / "hashes", ignore_errors=True)
        out = tmp / f"out{i}"
        cold.append(merge(["run", str(path), str(out)], env))
        warm.append(merge(["run", str(path), str(out), "--overwrite"], env))
        verify.append(merge(["verify", str(out)], env))
        shutil.rmtree(out)
    med = statistics.median
    return [
        ("`merge lock`, empty hash cache", f"{cold_lock:.2f} s"),
        ("`merge lock --update`, warm hash cache", f"{warm_lock:.2f} s"),
        ("`merge outdated`, warm hash cache", f"{outdated:.2f} s"),
        ("`merge run`, empty hash cache (inputs hashed meanwhile)", f"{med(cold):.2f} s"),
        ("`merge run`, warm hash cache", f"{med(warm):.2f} s"),
        ("`merge verify` of the output", f"{med(verify):.2f} s"),
    ]


def publish_rows(models: list[Path], tmp: Path) -> list[tuple[str, str]]:
    from safetensors.torch import load_file, save_file

    token = "hf_bench_write"
    path = recipe(tmp, [str(m) for m in models])
    out = tmp / "pub-out"
    shards = ["--out-shard-size", "50MB"]  # several output shards, as a large model has
    with UploadHub({}, tmp / "hub-store", {token: Account("bench")}) as server:
        env = environment(tmp / "pub", HF_ENDPOINT=server.endpoint, HF_TOKEN=token)
        merge(["run", str(path), str(out), *shards], env)
        total = sum(f.stat().st_size for f in out.iterdir()) / MB
        rows = []
        for label in ("first publish", "unchanged republish"):
            sent, commits = server.bytes_received, len(server.commits)
            seconds = merge(["publish", str(out), "bench/merged"], env)
            mb = (server.bytes_received - sent) / MB
            made = sum(c.message != "initial commit" for c in server.commits[commits:])
            rows.append(
                (f"`merge publish`, {label}", f"{seconds:.2f} s, {mb:.1f} MB, {made} commit")
            )
        moved = Path(shutil.copytree(models[3], tmp / "ft3-moved"))
        shard = sorted(moved.glob("model-*.safetensors"))[-1]
        state = load_file(shard)
        name = sorted(state)[0]
        state[name] = state[name] * 1.5  # one tensor of the last shard
        save_file(state, shard, metadata={"format": "pt"})
        recipe(tmp, [str(m) for m in models[:3]] + [str(moved)])
        merge(["run", str(path), str(out), "--overwrite", *shards], env)
        sent = server.bytes_received
        seconds = merge(["publish", str(out), "bench/merged"], env)
        mb = (server.bytes_received - sent) / MB
        label = "`merge publish` after one input tensor changed"
        rows.append((label, f"{seconds:.2f} s, {mb:.1f} of {total:.0f} MB"))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--workdir", type=Path, default=ROOT / ".bench")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    models = ensure_models(args.workdir, args.preset, 0, 4)
    with tempfile.TemporaryDirectory(prefix="bench-builds-", dir=args.workdir) as name:
        tmp = Path(name)
        rows = hub_rows(models, tmp) + local_rows(models, tmp, args.repeat)
        rows += publish_rows(models, tmp)
    print(f"| preset `{args.preset}`, TIES of 4 models | |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")


if __name__ == "__main__":
    main()
