"""Run a plan: read each job's inputs, apply the method in float32, cast once, write.

Vocabulary tensors (jobs with ``vocab``: embeddings and lm_head under a tokenizer setting)
get one extra step between reading and the method: every input and the base is moved into the
output vocabulary's rows (``merge.vocab.align``), so methods only ever see equal shapes.

Jobs merged with ``trim: global`` (TIES over the whole model) first go through two statistics
passes (``merge.globaltrim``) that find each model's exact magnitude threshold; each job's
parameters then carry the thresholds.

Jobs are streamed (``merge.memory.streamed``): copies and methods (each has a chunked form,
``Method.stream``, ``merge.methods.stream``) read their inputs chunk by chunk and write each
cast output chunk straight to its place in the shard, so a job holds a few chunk-sized buffers
whatever the tensor's size. Chunks are read with ``preadv`` (``Checkpoint.read_range``), not
from memory maps: see ``merge.inputstate`` (the reads are ``merge.reads``). Three kinds of
input are made per chunk, with the whole-tensor path's bits: a vocabulary tensor's chunk from
the output rows it covers (``merge.vocab.align_rows``: each model's source rows, read a run of
consecutive rows at a time, and the default rows, which are sums of given rows: no statistics
pass); a LoRA-updated tensor's from its rows (``LoraCheckpoint.read_range``: the delta in fixed
row blocks); an MoE expert's noise from fixed blocks with a generator each (``merge.noise``).
Only jobs on the GPU that cannot stream there and a source that cannot read ranges (a planned
stage) read whole tensors and call ``Method.fn``.

Jobs run in parallel (``merge.pipeline``): a pool of ``--threads`` workers, largest jobs first,
within the ``--max-memory`` budget of estimated bytes (``merge.memory``). Torch runs one
intra-op thread per job and each random job gets its own generator seeded from (seed, output
tensor name), and chunk bounds depend on shapes only, so outputs are bit-identical whatever
the thread count or budget. Global trim's tie quota is handed out per job before the merge
(``GlobalTrim.allot``). With ``--device cuda`` (``merge.device``) streamed jobs run chunk by
chunk on the GPU, the stored bytes copied in through pinned buffers while the previous chunk
computes and the cast chunks copied back the same way; jobs that cannot stream move their
whole inputs there when they fit ``--max-vram`` (else they run on the CPU); copies stay on
the CPU. Device jobs are admitted within ``--max-vram`` as well as ``--max-memory``.

MoE plans have two more kinds of job: expert copies with ``noise``/``scale`` (seeded by the
output tensor's name and the noise block, ``merge.noise``) and ``computed`` tensors (the
router's gates, small), which ``execute`` takes ready-made in ``computed`` (name -> float32
tensor) and only casts.

``execute`` writes the outputs as shards (``merge.writer.ShardWriter``); ``execute_into``
hands the same cast tensors to any ``merge.sink.TensorSink`` (an in-memory merge's model,
``merge.evolve``). The run's ``Resources`` (threads, budget, device) are ``merge.resources``.

What it does not do: run copies, MoE noise, vocabulary alignment and the global-trim
statistics passes on the GPU.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from merge.device.jobs import Backends, device_stream_job
from merge.device.vram import placements
from merge.errors import ComputeError
from merge.finite import FiniteCheck
from merge.globaltrim import GlobalTrim, global_jobs
from merge.jobs import Plan, TensorJob, tensor_seed
from merge.memory import (
    job_order,
    job_peak_bytes,
    streamed,
)
from merge.methods.stream import chunk_bounds, merge_chunks
from merge.noise import noise_range
from merge.pipeline import Mover, keep_freed_memory, run_jobs, single_intra_op
from merge.reads import (
    chunk_reader,
    flat_view,
    flat_views,
    input_chunks,
    job_chunks,
    job_models,
    read_inputs,
    read_tensor,
    vocab_reader,
)
from merge.resources import Resources
from merge.sink import TensorSink
from merge.writer import ShardWriter

if TYPE_CHECKING:
    from merge.resume import Journal


def _agree(job: TensorJob, tensor: torch.Tensor, others: list[torch.Tensor]) -> None:
    """An integer tensor is copied only when every other model's is the same, bit for bit."""
    differ = [a.model for a, o in zip(job.agree, others, strict=True) if not torch.equal(tensor, o)]
    if differ:
        names = ", ".join(f"'{m}'" for m in differ)
        raise ComputeError(
            f"tensor '{job.name}': the integer ({str(tensor.dtype).removeprefix('torch.')}) "
            f"tensor of model(s) {names} differs from model '{job.inputs[0].model}''s; integer "
            "tensors are copied, never averaged, only when all models agree bit for bit; "
            "nothing was written"
        )


def _stream_job(
    plan: Plan, job: TensorJob, params: dict[str, Any], writer: TensorSink, finite: FiniteCheck
) -> None:
    """Run a streamed job: chunks read from the files, each output chunk to its shard."""
    models, inputs = job_models(job), input_chunks(plan, job)
    if job.copy:
        (view,), _ = flat_views(plan, job)
        others = [flat_view(plan, a.model, a.name) for a in job.agree]
        seed = tensor_seed(plan.seed, job.name)
        for start, stop in chunk_bounds(job.numel):
            part = view[start:stop]
            _agree(job, part, [o[start:stop] for o in others])
            part = _edit(job, seed, start, part)
            cast = part.to(job.dtype)
            finite.chunk(job.name, part, cast, models, inputs)
            writer.write_part(job.name, start, cast)
        return
    tally = finite.tally(job.name, inputs)  # a copy's output check sees its input whole
    stream = plan.method.stream
    assert stream is not None
    state = stream(params, job.shape, _rng(plan, job))

    def emit(start: int, chunk: torch.Tensor) -> None:
        cast = chunk.to(job.dtype)
        finite.chunk(job.name, chunk, cast, models, inputs)
        writer.write_part(job.name, start, cast)

    if job.vocab is not None:
        read = vocab_reader(plan, job, tally)
    else:
        read = chunk_reader(plan, job, state.stored_inputs, tally)
    merge_chunks(state, job.numel, read, emit)
    if tally is not None:
        tally.done()


def _edit(job: TensorJob, seed: int, start: int, values: torch.Tensor) -> torch.Tensor:
    """An MoE expert's noise and scale on the flat elements from ``start`` of a copied
    tensor, in float32 (``merge.noise``: the same numbers whatever the chunks); ``values``
    unchanged without them."""
    if job.noise == 0.0 and job.scale == 1.0:
        return values
    out = values.to(torch.float32)
    if job.noise:
        flat = out.reshape(-1)
        noise = noise_range(seed, job.numel, start, start + flat.numel())
        out = (flat + noise * job.noise).view(out.shape)
    return out * job.scale


def _copy(plan: Plan, job: TensorJob) -> torch.Tensor:
    """A copied tensor, with an MoE expert's noise and scale applied in float32."""
    tensor = read_tensor(plan, job.inputs[0].model, job.inputs[0].name)
    _agree(job, tensor, [read_tensor(plan, a.model, a.name) for a in job.agree])
    return _edit(job, tensor_seed(plan.seed, job.name), 0, tensor)


def _device_inputs(
    plan: Plan, job: TensorJob, mover: Mover
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A job's inputs and base on the mover's device, as float32: moved as stored (fewer
    bytes) and converted there, except vocabulary tensors (aligned on the CPU first)."""
    if job.vocab is not None:
        tensors, base = read_inputs(plan, job)
        moved = None if base is None else mover.put(base)
        return [mover.put(t) for t in tensors], moved
    tensors = [mover.put(read_tensor(plan, i.model, i.name)).float() for i in job.inputs]
    if job.base is None:
        return tensors, None
    return tensors, mover.put(read_tensor(plan, job.base.model, job.base.name)).float()


def _rng(plan: Plan, job: TensorJob) -> torch.Generator | None:
    """A random method's generator for one tensor: a CPU generator on every device (masks
    agree bitwise), seeded from the run's seed and the output tensor's name."""
    if not plan.method.random:
        return None
    return torch.Generator().manual_seed(tensor_seed(plan.seed, job.name))


def _apply(
    plan: Plan,
    job: TensorJob,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    params: dict[str, Any],
) -> torch.Tensor:
    out = plan.method.fn(tensors, base, params, _rng(plan, job))
    if tuple(out.shape) != job.shape:  # a method bug, not a user error
        raise RuntimeError(
            f"{plan.method.name} returned shape {tuple(out.shape)} for "
            f"'{job.name}', expected {job.shape}"
        )
    return out


def run_job(
    plan: Plan,
    job: TensorJob,
    params: dict[str, Any] | None = None,
    computed: Mapping[str, torch.Tensor] | None = None,
    *,
    mover: Mover | None = None,
    finite: FiniteCheck | None = None,
) -> torch.Tensor:
    """The output tensor of one job read whole, in its output dtype, on the CPU (``params``:
    the job's parameters with a global trim's share, default ``job.params``; ``computed``
    jobs take their tensor from ``computed``; with a ``mover`` the method runs on its
    device; ``finite`` checks the result, ``merge.finite``)."""
    check = finite or FiniteCheck()
    if job.computed is not None:
        if computed is None or job.name not in computed:
            raise RuntimeError(f"'{job.name}': computed tensor was not provided")
        cast = computed[job.name].to(job.dtype)
        check.chunk(job.name, computed[job.name], cast, [], lambda: ())
        return cast
    if job.copy:
        source = _copy(plan, job)
        cast = source.to(job.dtype)
        check.chunk(job.name, source, cast, job_models(job), input_chunks(plan, job))
        return cast
    with mover.stream() if mover is not None else nullcontext():
        if mover is not None:
            tensors, base = _device_inputs(plan, job, mover)
        else:
            tensors, base = read_inputs(plan, job)
        held = [*tensors, *([base] if base is not None else [])]
        check.inputs(job.name, lambda: iter([list(zip(job_models(job), held, strict=True))]))
        out = _apply(plan, job, tensors, base, job.params if params is None else params)
        cast = out.to(job.dtype)
        check.chunk(job.name, out, cast, job_models(job), input_chunks(plan, job))
        return mover.back(cast) if mover is not None else cast


def _trim_params(plan: Plan, show: bool, res: Resources) -> dict[str, dict[str, Any]]:
    """The parameters, with each model's threshold and tie share, of every job merged with
    ``trim: global`` (by name); empty without such jobs. The statistics passes run their jobs
    on ``res.threads`` workers within ``res.budget``, like the merge."""
    jobs = global_jobs(plan.jobs)
    if not jobs:
        return {}
    bars: list[tqdm] = []

    def each(work: Callable[[int], None], todo: Sequence[TensorJob]) -> None:
        peaks = [job_peak_bytes(j, plan.models, plan.method) for j in todo]
        run_jobs(work, job_order(todo), peaks=peaks, budget=res.budget, threads=res.threads)

    def step(desc: str) -> Callable[[TensorJob], None]:
        bar = tqdm(total=len(jobs), desc=desc, unit="tensor", disable=not show, file=sys.stderr)
        bars.append(bar)
        return lambda job: bar.update(1)

    def chunks(job: TensorJob) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        return job_chunks(plan, job)

    try:
        trim = GlobalTrim.compute(jobs, chunks, step, each)
        counts: list[dict[str, int]] = [{} for _ in jobs]
        if trim.counting():
            tick = step("trim statistics: ties")

            def count(k: int) -> None:
                counts[k] = trim.count_equal(jobs[k], chunks)
                tick(jobs[k])

            each(count, jobs)
    finally:
        for bar in bars:
            bar.close()
    return {j.name: p for j, p in zip(jobs, trim.allot(jobs, counts), strict=True)}


def execute(
    plan: Plan,
    directory: Path,
    *,
    progress: bool = True,
    computed: Mapping[str, torch.Tensor] | None = None,
    resources: Resources | None = None,
    finite: FiniteCheck | None = None,
    journal: Journal | None = None,
    resume: dict[str, str] | None = None,
) -> dict[str, str]:
    """Write every output tensor of ``plan`` as safetensors shards into ``directory``
    (``computed``: the tensors of the plan's computed jobs, by name), running jobs in
    parallel within ``resources`` (default: ``Resources.resolve()``); ``finite`` checks every
    output chunk (``merge.finite``; default: warnings dropped, not strict). ``journal``
    records each finished tensor; ``resume`` (an interrupted run's journaled tensors) skips
    those whose bytes in ``directory`` still hash as recorded (``merge.resume``). Returns each
    shard's sha256 by file name, hashed from the files as they were written."""
    metadata = {"format": "pt", "merged_with": "merge", "merge_method": plan.method.name}
    res = resources or Resources.resolve()
    show = progress and sys.stderr.isatty()
    keep_freed_memory()
    with single_intra_op():
        trimmed = _trim_params(plan, show, res)
        writer = ShardWriter(directory, plan.shards, metadata, journal=journal, resume=resume)
        with writer:
            _run_into(plan, writer, trimmed, show, computed, res, finite)
    return writer.shard_sha256


def execute_into(
    plan: Plan,
    sink: TensorSink,
    *,
    progress: bool = True,
    computed: Mapping[str, torch.Tensor] | None = None,
    resources: Resources | None = None,
    finite: FiniteCheck | None = None,
) -> None:
    """``execute`` with every output tensor handed to ``sink`` instead of shards: the same
    jobs, parameters, seeds and casts, so the sink receives the bytes ``execute`` writes.
    The caller opens and closes (checks) the sink."""
    res = resources or Resources.resolve()
    show = progress and sys.stderr.isatty()
    keep_freed_memory()
    with single_intra_op():
        trimmed = _trim_params(plan, show, res)
        _run_into(plan, sink, trimmed, show, computed, res, finite)


def _run_into(
    plan: Plan,
    sink: TensorSink,
    trimmed: dict[str, dict[str, Any]],
    show: bool,
    computed: Mapping[str, torch.Tensor] | None,
    res: Resources,
    finite: FiniteCheck | None,
) -> None:
    """Run every job not in ``sink.done`` on the worker pool, each output into ``sink``."""
    check = finite or FiniteCheck()
    mover = Mover(res.device) if res.device is not None else None
    backends = Backends(res.device) if res.device is not None else None
    peaks = [job_peak_bytes(j, plan.models, plan.method) for j in plan.jobs]
    where, device_peaks = placements(plan.jobs, plan.models, plan.method, res)
    bar = tqdm(
        total=plan.shards.total_bytes,
        unit="B",
        unit_scale=True,
        desc="merging",
        disable=not show,
        file=sys.stderr,
    )
    lock = threading.Lock()
    with bar:
        bar.update(sink.written_bytes)

        def work(i: int) -> None:
            job = plan.jobs[i]
            params = trimmed.get(job.name, job.params)
            if where[i] == "stream":
                assert backends is not None
                device_stream_job(plan, job, params, sink, check, backends.get(), _rng(plan, job))
            elif where[i] == "cpu" and streamed(job, plan.models, plan.method):
                _stream_job(plan, job, params, sink, check)
            else:
                on = mover if where[i] == "whole" else None
                out = run_job(plan, job, params, computed, mover=on, finite=check)
                sink.write(job.name, out)
            sink.finish(job.name)
            with lock:
                bar.update(job.numel * job.dtype.itemsize)

        order = [i for i in job_order(plan.jobs) if plan.jobs[i].name not in sink.done]
        run_jobs(
            work,
            order,
            peaks=peaks,
            budget=res.budget,
            threads=res.threads,
            device_peaks=device_peaks,
            device_budget=res.vram,
        )
