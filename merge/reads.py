"""Reading a job's inputs: whole tensors, flat slices, chunks.

``read_inputs`` gives a job's inputs and base whole, as float32 (vocabulary tensors moved into
the output vocabulary's rows first, ``merge.vocab.align``). ``Flat`` reads one tensor by
slices of its flattened elements (``preadv`` through ``TensorSource.read_range``, stored
dtype); ``chunk_reader`` gives a streamed job's chunks as float32 (or as stored, for streams
that only subtract the float32 base) and feeds the input check (``merge.finite``);
``vocab_reader`` gives a vocabulary tensor's chunks in the output's rows
(``merge.vocab.stream``); ``job_chunks`` serves the global-trim statistics passes;
``input_chunks`` re-reads inputs for a failed output check. Any error reading a tensor that
passed the header checks is a ``CheckpointError`` naming the model and the tensor.

What it does not do: run methods or write outputs (``merge.execute``, ``merge.device``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from merge.errors import CheckpointError
from merge.finite import InputChunks, InputTally
from merge.jobs import Plan, TensorJob
from merge.memory import streamed
from merge.methods.stream import chunk_bounds
from merge.vocab import align
from merge.vocab.stream import AlignedChunks


def read_tensor(plan: Plan, model: str, name: str) -> torch.Tensor:
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
        by_model[extra.model] = read_tensor(plan, extra.model, extra.name).to(torch.float32)
    aligned = align(job.vocab.alignment, by_model)
    del by_model
    new_base = aligned[job.base.model] if job.base is not None else None
    return [aligned[i.model] for i in job.inputs], new_base


# --- jobs -------------------------------------------------------------------------------------


def read_inputs(plan: Plan, job: TensorJob) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """A job's inputs and base as float32, in the output vocabulary for vocabulary tensors."""
    tensors = [read_tensor(plan, i.model, i.name).to(torch.float32) for i in job.inputs]
    base = read_tensor(plan, job.base.model, job.base.name).to(torch.float32) if job.base else None
    if job.vocab is not None:
        tensors, base = _align_vocab(plan, job, tensors, base)
    return tensors, base


class Flat:
    """One input tensor, flattened, read by slices (``flat[start:stop]``: a fresh tensor in
    the stored dtype, from ``TensorSource.read_range``)."""

    def __init__(self, plan: Plan, model: str, name: str) -> None:
        self.source = plan.models[model].checkpoint
        self.model, self.name = model, name
        self.dtype = self.source.tensors[name].dtype

    def __getitem__(self, span: slice) -> torch.Tensor:
        try:
            return self.source.read_range(self.name, span.start, span.stop)
        except CheckpointError:
            raise
        except Exception as e:  # a corrupt file that passed header checks
            raise CheckpointError(
                f"model '{self.model}': cannot read tensor '{self.name}': {e}"
            ) from None


def flat_view(plan: Plan, model: str, name: str) -> Flat:
    """One tensor of a streamed job, read by slices (stored dtype)."""
    return Flat(plan, model, name)


def flat_views(plan: Plan, job: TensorJob) -> tuple[list[Flat], Flat | None]:
    """A streamed job's inputs and base, read by slices (stored dtype)."""
    xs = [flat_view(plan, i.model, i.name) for i in job.inputs]
    return xs, flat_view(plan, job.base.model, job.base.name) if job.base else None


def chunk_reader(
    plan: Plan, job: TensorJob, stored: bool = False, tally: InputTally | None = None
) -> Callable[[int, int], Any]:
    """``read(start, stop)``: chunks of a streamed job's inputs and base, as float32 (with
    ``stored``: floating inputs as stored, for streams that only subtract the float32 base);
    a ``tally`` sees each chunk as stored (``merge.finite``)."""
    xs, base = flat_views(plan, job)
    f32 = torch.float32
    keep = [stored and x.dtype.is_floating_point for x in xs]
    models = job_models(job)

    def read(start: int, stop: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        raw_base = None if base is None else base[start:stop]
        parts = [x[start:stop] for x in xs]
        if tally is not None:
            held = [*parts, *([raw_base] if raw_base is not None else [])]
            tally(start, list(zip(models, held, strict=True)))
        chunk_base = None if raw_base is None else raw_base.to(f32)
        return [p if k else p.to(f32) for p, k in zip(parts, keep, strict=True)], chunk_base

    return read


def vocab_reader(
    plan: Plan, job: TensorJob, tally: InputTally | None = None
) -> Callable[[int, int], Any]:
    """``read(start, stop)``: flat chunks of a vocabulary tensor's aligned inputs and base
    (float32; ``merge.vocab.stream``); a ``tally`` sees each chunk (aligned)."""
    assert job.vocab is not None
    names = {r.model: r.name for r in [*job.inputs, *([job.base] if job.base else [])]}
    names.update({e.model: e.name for e in job.vocab.extra})
    models = [i.model for i in job.inputs]
    chunks = AlignedChunks(
        job.vocab.alignment, {m: flat_view(plan, m, n) for m, n in names.items()}, job.shape
    )

    def read(start: int, stop: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        block = chunks.read(start, stop)
        xs = [block[m] for m in models]
        base = None if job.base is None else block[job.base.model]
        if tally is not None:
            held = [*xs, *([base] if base is not None else [])]
            tally(start, list(zip(job_models(job), held, strict=True)))
        return xs, base

    return read


def job_chunks(plan: Plan, job: TensorJob) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """A job's inputs and base in chunks (whole tensors where it cannot stream) for the global
    trim, which only uses ``x - base``: the base in float32, streamed inputs as stored."""
    if streamed(job, plan.models, plan.method):
        if job.vocab is not None:
            read = vocab_reader(plan, job)
        else:
            read = chunk_reader(plan, job, stored=True)
        for start, stop in chunk_bounds(job.numel):
            xs, base = read(start, stop)
            assert base is not None  # the planner gives every trim job a base
            yield xs, base
        return
    tensors, whole_base = read_inputs(plan, job)
    if whole_base is None:  # the planner gives every trim job a base
        raise RuntimeError(f"'{job.name}': global trim needs a base tensor")
    yield tensors, whole_base


def job_models(job: TensorJob) -> list[str]:
    return [r.model for r in [*job.inputs, *([job.base] if job.base else [])]]


def input_chunks(plan: Plan, job: TensorJob) -> InputChunks:
    """A job's inputs and base as (model, values), chunk by chunk (``Flat``) where
    they can be read by ranges, else whole (only read when an output chunk is not finite)."""
    reads = [*job.inputs, *([job.base] if job.base else [])]

    def chunks() -> Iterator[list[tuple[str, torch.Tensor]]]:
        views = all(plan.models[r.model].checkpoint.can_range(r.name) for r in reads)
        if views and job.vocab is None:  # a vocabulary tensor's inputs have their own rows
            xs, base = flat_views(plan, job)
            pairs = list(
                zip(job_models(job), [*xs, *([base] if base is not None else [])], strict=True)
            )
            for start, stop in chunk_bounds(job.numel):
                yield [(m, x[start:stop]) for m, x in pairs]
        else:
            yield [(r.model, read_tensor(plan, r.model, r.name)) for r in reads]

    return chunks
