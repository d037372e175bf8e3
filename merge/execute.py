"""Run a plan: read each job's inputs, apply the method in float32, cast once, write.

Vocabulary tensors (jobs with ``vocab``: embeddings and lm_head under a tokenizer setting)
get one extra step between reading and the method: every input and the base is moved into the
output vocabulary's rows (``merge.vocab.align``), so methods only ever see equal shapes.

Jobs merged with ``trim: global`` (TIES over the whole model) first go through two statistics
passes (``merge.globaltrim``) that find each model's exact magnitude threshold; each job's
parameters then carry the thresholds.

Jobs run in parallel (``merge.pipeline``): a pool of ``--threads`` workers each reads a job's
inputs and runs the method, within the ``--max-memory`` budget of estimated bytes in flight
(``merge.memory``); results reach the writer strictly in plan order. Torch runs one intra-op
thread per job and each random job gets its own generator seeded from (seed, output tensor
name), so outputs are bit-identical whatever the thread count or budget. Global trim's
per-job step takes its turn in plan order. With ``--device cuda`` the inputs are moved to the
GPU as stored, the method runs there in float32 and the cast result comes back for writing.

MoE plans have two more kinds of job: expert copies with ``noise``/``scale`` (seeded by the
output tensor's name) and ``computed`` tensors (the router's gates), which ``execute`` takes
ready-made in ``computed`` (name -> float32 tensor) and only casts.

What it does not do: split one tensor into chunks (a tensor over the budget runs alone), or
run copies, MoE noise and the global-trim statistics passes on the GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from merge.errors import CheckpointError, MergeError
from merge.globaltrim import GlobalTrim, global_jobs, trims_globally
from merge.jobs import Plan, TensorJob, tensor_seed
from merge.memory import (
    DEFAULT_FRACTION,
    available_memory,
    default_threads,
    hoisted,
    job_peak_bytes,
)
from merge.pipeline import Mover, Sequencer, run_ordered, single_intra_op
from merge.vocab import align
from merge.writer import ShardWriter, parse_size


def _read(plan: Plan, model: str, name: str) -> torch.Tensor:
    try:
        return plan.models[model].checkpoint.read(name)
    except CheckpointError:
        raise
    except Exception as e:  # a corrupt file that passed header checks
        raise CheckpointError(f"model '{model}': cannot read tensor '{name}': {e}") from None


# --- vocabulary alignment (embeddings, lm_head; see merge.vocab) ------------------------------


def _align_vocab(
    plan: Plan, job: TensorJob, tensors: list[torch.Tensor], base: torch.Tensor | None
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Move the inputs and the base into the output vocabulary's rows (reading the rows that
    overrides take from models outside the job), before the method sees them."""
    assert job.vocab is not None
    by_model = {i.model: t for i, t in zip(job.inputs, tensors, strict=True)}
    if job.base is not None and base is not None:
        by_model[job.base.model] = base
    for extra in job.vocab.extra:
        by_model[extra.model] = _read(plan, extra.model, extra.name).to(torch.float32)
    aligned = align(job.vocab.alignment, by_model)
    del by_model
    new_base = aligned[job.base.model] if job.base is not None else None
    return [aligned[i.model] for i in job.inputs], new_base


# --- jobs -------------------------------------------------------------------------------------


def read_inputs(plan: Plan, job: TensorJob) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A job's inputs and base as float32, in the output vocabulary for vocabulary tensors."""
    tensors = [_read(plan, i.model, i.name).to(torch.float32) for i in job.inputs]
    base = _read(plan, job.base.model, job.base.name).to(torch.float32) if job.base else None
    if job.vocab is not None:
        tensors, base = _align_vocab(plan, job, tensors, base)
    return tensors, base


def _read_with_base(plan: Plan, job: TensorJob) -> tuple[list[torch.Tensor], torch.Tensor]:
    tensors, base = read_inputs(plan, job)
    if base is None:  # the planner gives every trim job a base
        raise RuntimeError(f"'{job.name}': global trim needs a base tensor")
    return tensors, base


def _copy(plan: Plan, job: TensorJob) -> torch.Tensor:
    """A copied tensor, with an MoE expert's noise and scale applied in float32."""
    tensor = _read(plan, job.inputs[0].model, job.inputs[0].name)
    if job.noise == 0.0 and job.scale == 1.0:
        return tensor.to(job.dtype)
    out = tensor.to(torch.float32)
    if job.noise:
        gen = torch.Generator().manual_seed(tensor_seed(plan.seed, job.name))
        out = out + torch.randn(out.shape, generator=gen) * job.noise
    return (out * job.scale).to(job.dtype)


def _device_inputs(
    plan: Plan, job: TensorJob, mover: Mover
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A job's inputs and base on the mover's device, as float32: moved as stored (fewer
    bytes) and converted there, except vocabulary tensors (aligned on the CPU first)."""
    if job.vocab is not None:
        tensors, base = read_inputs(plan, job)
        moved = None if base is None else mover.put(base)
        return [mover.put(t) for t in tensors], moved
    tensors = [mover.put(_read(plan, i.model, i.name)).float() for i in job.inputs]
    if job.base is None:
        return tensors, None
    return tensors, mover.put(_read(plan, job.base.model, job.base.name)).float()


def _apply(
    plan: Plan,
    job: TensorJob,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    params: dict[str, Any],
) -> torch.Tensor:
    rng = None
    if plan.method.random:  # a CPU generator on every device: masks agree bitwise
        rng = torch.Generator().manual_seed(tensor_seed(plan.seed, job.name))
    out = plan.method.fn(tensors, base, params, rng)
    if tuple(out.shape) != job.shape:  # a method bug, not a user error
        raise RuntimeError(
            f"{plan.method.name} returned shape {tuple(out.shape)} for "
            f"'{job.name}', expected {job.shape}"
        )
    return out


def run_job(
    plan: Plan,
    job: TensorJob,
    trim: GlobalTrim | None = None,
    computed: Mapping[str, torch.Tensor] | None = None,
    *,
    mover: Mover | None = None,
    turn: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> torch.Tensor:
    """The output tensor of one job, in its output dtype, on the CPU. Jobs with global
    trimming take their thresholds from ``trim`` inside ``turn()``, which must admit them in
    plan order; ``computed`` jobs take their tensor from ``computed``; with a ``mover`` the
    method runs on its device."""
    if job.computed is not None:
        if computed is None or job.name not in computed:
            raise RuntimeError(f"'{job.name}': computed tensor was not provided")
        return computed[job.name].to(job.dtype)
    if job.copy:
        return _copy(plan, job)
    with mover.stream() if mover is not None else nullcontext():
        if mover is not None:
            tensors, base = _device_inputs(plan, job, mover)
        else:
            tensors, base = read_inputs(plan, job)
        params = job.params
        if trim is not None and base is not None and trims_globally(job):
            with turn():
                params = trim.job_params(job, tensors, base)
        out = _apply(plan, job, tensors, base, params).to(job.dtype)
        return mover.back(out) if mover is not None else out


def _trim_pass(plan: Plan, show: bool) -> GlobalTrim | None:
    jobs = global_jobs(plan.jobs)
    if not jobs:
        return None
    bars: list[tqdm] = []

    def step(desc: str) -> Callable[[TensorJob], None]:
        bar = tqdm(total=len(jobs), desc=desc, unit="tensor", disable=not show, file=sys.stderr)
        bars.append(bar)
        return lambda job: bar.update(1)

    try:
        return GlobalTrim.compute(jobs, lambda j: _read_with_base(plan, j), step)
    finally:
        for bar in bars:
            bar.close()


@dataclass(frozen=True)
class Resources:
    """How a run may use the machine: worker ``threads``, the memory ``budget`` in bytes
    (estimated tensor data in flight) and the ``device`` of the method math (``None``: the
    CPU, with no transfers; ``torch.device("cpu")`` takes the transfer path, for tests)."""

    threads: int
    budget: int
    device: torch.device | None = None

    @classmethod
    def resolve(
        cls, threads: int | None = None, max_memory: str | int | None = None, device: str = "cpu"
    ) -> Resources:
        """From the CLI options; defaults: every available core, half the available RAM."""
        if threads is not None and threads < 1:
            raise MergeError(f"--threads must be at least 1, got {threads}")
        if max_memory is None:
            budget = int(DEFAULT_FRACTION * available_memory())
        else:
            try:
                budget = parse_size(max_memory, "--max-memory")
            except ValueError as e:
                raise MergeError(str(e)) from None
        return cls(threads or default_threads(), budget, _device(device))


def _device(name: str) -> torch.device | None:
    if name == "cpu":
        return None
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type != "cuda":
        raise MergeError(f"--device must be cpu or cuda (or cuda:N), got {name!r}")
    if not torch.cuda.is_available():
        raise MergeError(f"--device {name}: CUDA is not available here; use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MergeError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev


def _worker(
    plan: Plan,
    trim: GlobalTrim | None,
    computed: Mapping[str, torch.Tensor] | None,
    mover: Mover | None,
    seq: Sequencer,
) -> Callable[[int], torch.Tensor]:
    """``work(i)``: run job ``i``; global-trim jobs take their quota in plan order."""
    order = {j.name: k for k, j in enumerate(global_jobs(plan.jobs))} if trim else {}

    def work(i: int) -> torch.Tensor:
        job = plan.jobs[i]
        k = order.get(job.name)
        turn = partial(seq.turn, k) if k is not None else nullcontext
        try:
            return run_job(plan, job, trim, computed, mover=mover, turn=turn)
        finally:
            if k is not None:
                seq.done(k)  # also when the job failed before its turn

    return work


def execute(
    plan: Plan,
    directory: Path,
    *,
    progress: bool = True,
    computed: Mapping[str, torch.Tensor] | None = None,
    resources: Resources | None = None,
) -> None:
    """Write every output tensor of ``plan`` as safetensors shards into ``directory``
    (``computed``: the tensors of the plan's computed jobs, by name), running jobs in
    parallel within ``resources`` (default: ``Resources.resolve()``)."""
    res = resources or Resources.resolve()
    metadata = {"format": "pt", "merged_with": "merge", "merge_method": plan.method.name}
    show = progress and sys.stderr.isatty()
    trim = _trim_pass(plan, show)
    seq = Sequencer()
    mover = Mover(res.device) if res.device is not None else None
    work = _worker(plan, trim, computed, mover, seq)
    peaks = [job_peak_bytes(j, plan.models, plan.method) for j in plan.jobs]
    out_bytes = [j.numel * j.dtype.itemsize for j in plan.jobs]
    pinned = [trims_globally(j) for j in plan.jobs]
    numels = [j.numel for j in plan.jobs]
    first = hoisted(numels, peaks, out_bytes, res.budget, res.threads, pinned)
    bar = tqdm(
        total=plan.shards.total_bytes,
        unit="B",
        unit_scale=True,
        desc="merging",
        disable=not show,
        file=sys.stderr,
    )

    with ShardWriter(directory, plan.shards, metadata) as writer, bar, single_intra_op():

        def write(i: int, tensor: torch.Tensor) -> None:
            writer.write(plan.jobs[i].name, tensor)
            bar.update(out_bytes[i])

        run_ordered(
            work,
            write,
            peaks=peaks,
            out_bytes=out_bytes,
            budget=res.budget,
            threads=res.threads,
            first=first,
            on_abort=seq.abort,
        )
