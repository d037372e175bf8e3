"""Peak memory of one ``merge run`` per method family on the ``1b`` benchmark models, under a
memory budget: every method, plus vocabulary-aligned embeddings (a token added, padded),
LoRA-updated weights (two rank-16 adapters on every linear layer and the embeddings) and an MoE
with ``noise_scale`` (issue #16). Models from ``scripts/bench.py``'s cache (``--workdir``,
generated if missing); each run is measured by ``_bench_measure.measure`` (peak RSS and
anonymous memory of the process tree) and its output deleted.

    python scripts/bench_families.py [--workdir .bench] [--max-memory 512MB] [--recipes a,b]

``ROOT`` (environment) runs the ``merge`` package found there instead (a before/after pair).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml
from _bench_measure import measure
from _bench_models import ensure_models
from safetensors.torch import save_file

ap = argparse.ArgumentParser()
ap.add_argument("--workdir", type=Path, default=Path(".bench"))
ap.add_argument("--max-memory", default="512MB")
ap.add_argument("--recipes", default="")
args = ap.parse_args()
W = args.workdir / "families"
base, ft1, ft2, ft3 = ensure_models(args.workdir, "1b", 0, 4)


def adapter(path: Path, seed: int) -> Path:
    if (path / "adapter_model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    hidden, inter, layers, r = 2048, 5632, 22, 16
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (256, hidden),
        "v_proj": (256, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    t = {}
    for layer in range(layers):
        for m, (o, i) in shapes.items():
            part = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            k = f"base_model.model.model.layers.{layer}.{part}.{m}"
            t[f"{k}.lora_A.weight"] = torch.randn(r, i, generator=g) * 0.01
            t[f"{k}.lora_B.weight"] = torch.randn(o, r, generator=g) * 0.01
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = (
        torch.randn(r, 32000, generator=g) * 0.01
    )
    t["base_model.model.model.embed_tokens.lora_embedding_B"] = (
        torch.randn(hidden, r, generator=g) * 0.01
    )
    save_file(t, str(path / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 32,
        "target_modules": [*shapes, "embed_tokens"],
        "bias": "none",
        "base_model_name_or_path": str(base),
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


ad1, ad2 = adapter(W / "ad1", 1), adapter(W / "ad2", 2)
RECIPES = {
    "vocab-ties": {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}}
            for m in (ft1, ft2, ft3)
        ],
        "tokenizer": {"source": "base", "tokens": {"<|new|>": {}}, "pad_to_multiple_of": 64},
        "dtype": "bfloat16",
    },
    "lora-task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": f"{base}+{ad1}", "parameters": {"weight": 0.5}},
            {"model": f"{base}+{ad2}", "parameters": {"weight": 0.7}},
        ],
        "dtype": "bfloat16",
    },
    "moe-noise": {
        "base_model": str(base),
        "gate_mode": "random",
        "experts_per_token": 2,
        "dtype": "bfloat16",
        "experts": [
            {"source_model": str(ft1), "noise_scale": 0.01},
            {"source_model": str(ft2), "noise_scale": 0.01, "residual_scale": 0.5},
        ],
    },
}


def plain(method, models, params=None, base_=True, glob=None):
    r = {
        "merge_method": method,
        "models": [{"model": str(m), **({"parameters": params} if params else {})} for m in models],
        "dtype": "bfloat16",
    }
    if base_:
        r["base_model"] = str(base)
    if glob:
        r["parameters"] = glob
    return r


RECIPES.update(
    {
        "linear": plain("linear", (base, ft1, ft2, ft3), {"weight": 0.25}, base_=False),
        "slerp": plain("slerp", (ft1,), None, glob={"t": 0.4}),
        "nuslerp": plain("nuslerp", (ft1, ft2), {"weight": 0.5}),
        "multislerp": plain("multislerp", (ft1, ft2, ft3), {"weight": 0.3}, base_=False),
        "karcher": plain("karcher", (ft1, ft2, ft3), None, base_=False),
        "ties": plain("ties", (ft1, ft2, ft3), {"weight": 0.5, "density": 0.5}),
        "dare_ties": plain("dare_ties", (ft1, ft2, ft3), {"weight": 0.5, "density": 0.5}),
        "della": plain("della", (ft1, ft2, ft3), {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
        "breadcrumbs": plain(
            "breadcrumbs", (ft1, ft2, ft3), {"weight": 0.5, "density": 0.9, "gamma": 0.01}
        ),
        "model_stock": plain("model_stock", (ft1, ft2, ft3)),
        "sce": plain("sce", (ft1, ft2, ft3), None, glob={"select_topk": 0.5}),
        "ram": plain("ram", (ft1, ft2, ft3)),
        "arcee_fusion": plain("arcee_fusion", (ft1,)),
    }
)
names = args.recipes.split(",") if args.recipes else list(RECIPES)
for name in names:
    rec = W / f"{name}.yaml"
    rec.write_text(yaml.safe_dump(RECIPES[name], sort_keys=False))
    out = W / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    root = os.environ.get("ROOT", str(Path(__file__).resolve().parents[1]))
    env = {**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = (
        f"import sys, merge; assert merge.__file__.startswith({root!r}), merge.__file__; "
        "from merge.cli import app; sys.argv[0] = 'merge'; app()"
    )
    cmd = [sys.executable, "-c", code]
    s = measure(
        [*cmd, "run", str(rec), str(out), "-q", "--max-memory", args.max_memory],
        W / f"{name}.log",
        env=env,
        timeout=900,
    )
    mb = 1e6
    print(
        f"{name}: {s.wall_s:.1f} s, peak RSS {s.peak_rss / mb:.0f} MB, "
        f"peak anonymous {s.peak_anon / mb:.0f} MB, exit {s.returncode} {s.error}",
        flush=True,
    )
    shutil.rmtree(out, ignore_errors=True)
