"""Human-readable and JSON views of a plan (for ``merge plan`` and ``merge validate``)."""

from __future__ import annotations

from typing import Any

from merge import architecture as arch
from merge.globaltrim import global_jobs
from merge.hub import RemoteModel, download_bytes
from merge.jobs import Input, Plan, TensorJob


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"  # pragma: no cover


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _source(aliases: dict[str, str], job: TensorJob, inp: Input) -> str:
    alias = aliases[inp.model]
    if inp.name == job.name:
        return alias
    layer = arch.layer_of(inp.name)
    if layer is not None and arch.with_layer(job.name, layer) == inp.name:
        return f"{alias}:L{layer}"
    return f"{alias}:{inp.name}"


def summary(p: Plan) -> list[str]:
    n_shards = len(p.shards.shards)
    largest = max(p.jobs, key=lambda j: j.numel, default=None)
    lines = [
        f"recipe: {p.recipe.file}",
        f"method: {p.method.name}" + (f" ({p.method.paper})" if p.method.paper else ""),
        f"seed: {p.seed}",
        f"output: {len(p.jobs)} tensors, {sum(j.numel for j in p.jobs):,} parameters, "
        f"{human_bytes(p.shards.total_bytes)} as {p.out_dtype} in {n_shards} shard"
        + ("s" if n_shards != 1 else ""),
        f"expected peak memory: {human_bytes(p.peak_bytes)} of tensor data"
        + (f" (largest tensor: {largest.name})" if largest else ""),
    ]
    remote = _remote(p)
    if remote:
        lines.append(
            f"download: {human_bytes(download_bytes(remote))} of weights, when run (planned "
            f"from their headers on the Hub: {', '.join(dict.fromkeys(m.label for m in remote))})"
        )
    if p.vocab is not None:
        lines.append(vocab_line(p))
    if p.modules:
        lines.append(
            "modules: "
            + ", ".join(
                f"{m.name} ({m.layers} layers, {m.tensors} tensors, from {m.made_of})"
                for m in p.modules
            )
        )
    if p.moe is not None:
        lines.append(moe_line(p))
    trimmed = global_jobs(p.jobs)
    if trimmed:
        lines.append(
            f"trim: global over {len(trimmed)} tensors (the whole-model top-k per model: two "
            "statistics passes over the inputs before the merge)"
        )
    return lines


def moe_line(p: Plan) -> str:
    """The MoE's family, experts and router."""
    lay = p.moe
    assert lay is not None
    fam = lay.family
    shared = ""
    if lay.shared is not None:
        shared = " + 1 shared expert" + (" (gated)" if fam.shared_gate else " (always on)")
    return (
        f"moe: {fam.title} ({fam.architecture}), {len(lay.experts)} experts{shared}, "
        f"{lay.experts_per_token} per token, gate_mode {lay.gate_mode}, {lay.num_layers} layers"
    )


def vocab_line(p: Plan) -> str:
    """The output vocabulary: its source, tokens, added tokens, rows and overrides."""
    v = p.vocab
    assert v is not None
    source = "union of the models' tokenizers" if v.source == "union" else f"from '{v.donor}'"
    sizes = ", ".join(f"{rows.rows} in '{ref}'" for ref, rows in v.models.items())
    parts = [f"{v.size} tokens ({len(v.added)} added)", f"{v.rows} rows (inputs: {sizes})"]
    if v.overrides:
        parts.append(f"{len(v.overrides)} token override(s)")
    aligned = sum(1 for j in p.jobs if j.vocab is not None)
    parts.append(f"{aligned} tensor(s) permuted into it" if aligned else "no tensor permuted")
    return f"tokenizer: {source}: " + ", ".join(parts)


def _remote(p: Plan) -> list[RemoteModel]:
    return [m.remote for m in p.models.values() if m.remote is not None]


def plan_text(p: Plan) -> str:
    aliases = {ref: f"m{i}" for i, ref in enumerate(p.models)}
    lines = summary(p)
    lines.append("models:")
    for ref, alias in aliases.items():
        role = []
        if ref == p.recipe.base_model:
            role.append("base")
        if ref == p.donor:
            role.append("config")
        if ref == p.tokenizer_donor:
            role.append("tokenizer")
        if p.moe is not None:
            role += [f"expert {i}" for i, e in enumerate(p.moe.experts) if e.model == ref]
            if p.moe.shared is not None and p.moe.shared.model == ref:
                role.append("shared expert")
        extra = f" ({', '.join(role)})" if role else ""
        lines.append(f"  {alias} = {ref}{extra}  [{p.models[ref].directory}]")
    lines.append("shards:")
    for shard in p.shards.shards:
        lines.append(
            f"  {shard.filename}: {len(shard.tensors)} tensors, {human_bytes(shard.nbytes)}"
        )
    lines.append("tensors:")
    for job in p.jobs:
        lines.append("  " + job_line(aliases, job))
    return "\n".join(lines)


def job_line(aliases: dict[str, str], job: TensorJob) -> str:
    shape = "x".join(str(d) for d in job.shape) or "scalar"
    if job.computed is not None:
        how = job.computed
    elif job.copy:
        how = f"copy {_source(aliases, job, job.inputs[0])}"
        if job.noise:
            how += f" + noise {_fmt(job.noise)}"
        if job.scale != 1.0:
            how += f" * {_fmt(job.scale)}"
    else:
        srcs = " ".join(_source(aliases, job, i) for i in job.inputs)
        base = f" base={_source(aliases, job, job.base)}" if job.base else ""
        params = " ".join(f"{k}={_fmt(v)}" for k, v in job.params.items())
        how = f"{srcs}{base}  {params}".rstrip()
    if job.vocab is not None:
        extra = "".join(f", override rows from {_source(aliases, job, i)}" for i in job.vocab.extra)
        how += f"  (rows permuted into the output vocabulary{extra})"
    return f"{job.name}  [{shape}]  {how}"


def plan_json(p: Plan) -> dict[str, Any]:
    return {
        "recipe": str(p.recipe.file),
        "method": p.method.name,
        "seed": p.seed,
        "out_dtype": p.out_dtype,
        "models": {ref: str(m.directory) for ref, m in p.models.items()},
        "output_bytes": p.shards.total_bytes,
        "download_bytes": download_bytes(_remote(p)),
        "peak_bytes": p.peak_bytes,
        "shards": [
            {"file": s.filename, "bytes": s.nbytes, "tensors": [t.name for t in s.tensors]}
            for s in p.shards.shards
        ],
        "tensors": [
            {
                "name": j.name,
                "shape": list(j.shape),
                "dtype": str(j.dtype).removeprefix("torch."),
                "inputs": [[i.model, i.name] for i in j.inputs],
                "base": [j.base.model, j.base.name] if j.base else None,
                "params": j.params,
                "copy": j.copy,
                "vocab_aligned": j.vocab is not None,
                "computed": j.computed,
                "noise": j.noise,
                "scale": j.scale,
            }
            for j in p.jobs
        ],
        "vocab": _vocab_json(p),
        "moe": _moe_json(p),
        "modules": [
            {"name": m.name, "layers": m.layers, "tensors": m.tensors, "made_of": m.made_of}
            for m in p.modules
        ],
    }


def _moe_json(p: Plan) -> dict[str, Any] | None:
    lay = p.moe
    if lay is None:
        return None
    return {
        "family": lay.family.name,
        "architecture": lay.family.architecture,
        "gate_mode": lay.gate_mode,
        "experts_per_token": lay.experts_per_token,
        "experts": [e.model for e in lay.experts],
        "shared_expert": lay.shared.model if lay.shared else None,
        "layers": lay.num_layers,
    }


def _vocab_json(p: Plan) -> dict[str, Any] | None:
    if p.vocab is None:
        return None
    return {
        "source": p.vocab.source,
        "donor": p.vocab.donor,
        "tokens": p.vocab.size,
        "rows": p.vocab.rows,
        "added": [token.content for _, token in p.vocab.added],
        "model_rows": {ref: v.rows for ref, v in p.vocab.models.items()},
    }
