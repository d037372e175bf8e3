"""Human-readable and JSON views of a plan (for ``merge plan`` and ``merge validate``)."""

from __future__ import annotations

from typing import Any

from merge import architecture as arch
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
    return lines


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
    if job.copy:
        how = f"copy {_source(aliases, job, job.inputs[0])}"
    else:
        srcs = " ".join(_source(aliases, job, i) for i in job.inputs)
        base = f" base={_source(aliases, job, job.base)}" if job.base else ""
        params = " ".join(f"{k}={_fmt(v)}" for k, v in job.params.items())
        how = f"{srcs}{base}  {params}".rstrip()
    return f"{job.name}  [{shape}]  {how}"


def plan_json(p: Plan) -> dict[str, Any]:
    return {
        "recipe": str(p.recipe.file),
        "method": p.method.name,
        "seed": p.seed,
        "out_dtype": p.out_dtype,
        "models": {ref: str(m.directory) for ref, m in p.models.items()},
        "output_bytes": p.shards.total_bytes,
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
            }
            for j in p.jobs
        ],
    }
