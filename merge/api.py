"""The library entry points behind the CLI: validate, plan and run a recipe.

Each phase raises a ``MergeError`` subclass listing all of its problems. ``run`` writes into
a temporary sibling of the output directory and renames it into place only when everything
succeeded, so a failed run leaves nothing behind and never touches an existing output.

Hub models whose weights are not in the cache are planned from their safetensors headers,
read over the network (``merge.hub.remote``): ``validate`` and ``plan`` download only their
config and tokenizer files. ``run`` makes every check of the plan, the output location's and
the disk space's included, before it downloads any weight, then downloads them (with progress
bars), opens the models again from the files and plans again (a plan is cheap), so that
execution reads real files.

When a lock (``<stem>.lock``, ``merge.build.lockfile``) lies beside the recipe, every phase
resolves the Hub models at their locked commits (``merge.build.locked``); ``run(locked=True)``
also requires the lock, a recipe that matches it and inputs whose content is what it records,
all checked before any output (Hub weights once downloaded, before any tensor is computed),
and records the lock's sha256 in the manifest.

MoE recipes (``merge.moe``) take the same path with their own planner; ``run`` computes their
router gates after planning and before opening the output, prints the routing report through
``info`` and writes it into the model card.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from merge.build.locked import LockUse, use_lock
from merge.build.manifest import InputHashes
from merge.device.vram import VramPlan, device_peak_line, vram_plan
from merge.errors import OutputError
from merge.execute import execute
from merge.finite import FiniteCheck
from merge.hub import check_download_space
from merge.inputstate import check_models, journal_inputs, resume_problems
from merge.jobs import Plan
from merge.memory import MemoryPlan, memory_plan
from merge.moe.recipe import MoeRecipe
from merge.outdir import AtomicOutput, check_disk_space, check_output_location
from merge.outputfiles import (
    check_tokenizer_files,
    copy_lock,
    dropped_template,
    write_extras,
    write_model_card,
    write_run_manifest,
)
from merge.plan import make_plan
from merge.recipe import Recipe, load_recipe  # noqa: F401 (re-exported for the CLI)
from merge.resources import Resources
from merge.resume import (
    Journal,
    clear_for_resume,
    interrupted,
    journal_header,
    leftover_problems,
    partial_dir,
    plan_identity,
    read_journal,
    stale_siblings,
)
from merge.settings import applied, device_name
from merge.shardplan import MIN_SHARD_BYTES, parse_size
from merge.sources import pinned
from merge.sourceset import (
    Model,
    close_models,
    iter_unique_dirs,
    open_models,
    remote_models,
    with_weights,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch


def shard_bytes(value: str | int) -> int:
    """A shard size: text as ``--out-shard-size`` takes it (at least 1MB), or a byte count."""
    try:
        if isinstance(value, int):
            return parse_size(value, "shard size")
        return parse_size(value, "--out-shard-size", minimum=MIN_SHARD_BYTES)
    except ValueError as e:
        raise OutputError(str(e)) from None


@contextmanager
def planned(
    recipe: str | Path | Recipe | MoeRecipe,
    *,
    seed: int | None = None,
    shard_size: str | int = "5GB",
    allow_crimes: bool = False,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    lock: LockUse | None = None,
) -> Iterator[Plan]:
    """Load, resolve and plan a recipe; the models stay open inside the ``with`` block, and
    the settings (``merge.settings.applied``) hold there too. Hub models whose weights are not
    in the cache are planned from their headers and cannot be read (``Model.remote`` is set):
    ``run`` downloads them after the plan passed. With ``lock``, Hub models resolve to its
    commits, the models on disk are checked against it (``--locked``; the others once
    downloaded, by ``run``) and its warnings come first among the plan's."""
    nbytes = shard_bytes(shard_size)
    rec = recipe if isinstance(recipe, (Recipe, MoeRecipe)) else load_recipe(recipe)
    pins = lock.pins() if lock is not None else {}
    with applied(trust_remote_code=trust_remote_code, cache_dir=cache_dir), pinned(pins):
        models = open_models(rec, headers_only=True)
        try:
            if lock is not None:
                lock.check({ref: m for ref, m in models.items() if m.remote is None})
            p = _make_plan(rec, models, seed, nbytes, allow_crimes)
            p.warnings[:0] = lock.warnings if lock is not None else []
            yield p
        finally:
            close_models(models)


def _make_plan(
    rec: Recipe | MoeRecipe,
    models: dict[str, Model],
    seed: int | None,
    shard_bytes: int,
    allow_crimes: bool,
) -> Plan:
    if isinstance(rec, MoeRecipe):
        from merge.moe.plan import make_moe_plan

        return make_moe_plan(rec, models, seed=seed, shard_bytes=shard_bytes)
    return make_plan(rec, models, seed=seed, shard_bytes=shard_bytes, allow_crimes=allow_crimes)


@contextmanager
def _downloaded(
    p: Plan, again: Callable[[dict[str, Model]], Plan], progress: bool
) -> Iterator[Plan]:
    """``p`` when every input is on disk; else the plan ``again`` makes of the models opened
    from their downloaded weights, which stay open inside the block."""
    if not remote_models(p.models):
        yield p
        return
    models = with_weights(p.models, progress=progress and sys.stderr.isatty())
    try:
        yield again(models)
    finally:
        close_models({ref: m for ref, m in models.items() if p.models[ref] is not m})


def plan(
    recipe: str | Path | Recipe | MoeRecipe,
    *,
    seed: int | None = None,
    shard_size: str | int = "5GB",
    allow_crimes: bool = False,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    lock: LockUse | None = None,
) -> Plan:
    """The checked plan of a recipe (reads headers only); the keywords as for ``run``. The
    recipe's lock, when there is one (or ``lock``, a multi-stage build's), pins its Hub
    models."""
    rec = recipe if isinstance(recipe, (Recipe, MoeRecipe)) else load_recipe(recipe)
    with planned(
        rec,
        seed=seed,
        shard_size=shard_size,
        allow_crimes=allow_crimes,
        trust_remote_code=trust_remote_code,
        cache_dir=cache_dir,
        lock=lock if lock is not None else use_lock([rec], rec.file),
    ) as p:
        return p


def vram(p: Plan, resources: Resources) -> VramPlan | None:
    """The device-memory schedule of ``p`` under ``resources`` (``None`` on the CPU)."""
    if resources.device is None:
        return None
    dev, threads = str(resources.device), resources.threads
    return vram_plan(p.jobs, p.models, p.method, dev, resources.vram, threads)


def memory(p: Plan, resources: Resources) -> MemoryPlan:
    """The memory schedule of ``p`` under ``resources``: budget, worst case, tensors over it."""
    return memory_plan(p.jobs, p.models, p.method, resources.budget, resources.threads)


def default_output(recipe_file: Path) -> Path:
    return Path.cwd() / f"{recipe_file.stem}-merged"


def _check_output(p: Plan, out: Path, overwrite: bool, resume: bool = False) -> None:
    """Where the output goes, an interrupted run's leftovers (``merge.resume``), and the disk
    space for it and for the weights to download."""
    problems = check_output_location(out, list(iter_unique_dirs(p.models)))
    if problems:
        raise OutputError(problems)  # the path itself is unusable: nothing else to ask
    if out.exists() and not overwrite:
        problems.append(f"output '{out}' already exists; pass --overwrite to replace it")
    problems += leftover_problems(out, plan_identity(p), len(p.jobs), resume)
    need = p.shards.total_bytes + 50 * 2**20
    for space in (
        check_disk_space(out, need),
        check_download_space(remote_models(p.models), out, need),
    ):
        if space:
            problems.append(space)
    if problems:
        raise OutputError(problems)


def _gates(
    p: Plan, progress: bool, warn: Callable[[str], None] | None, info: Callable[[str], None] | None
) -> dict[str, torch.Tensor] | None:
    """An MoE plan's computed tensors (router gates); the report goes to ``info`` and the
    model card, the warnings to ``warn``."""
    if p.moe is None:
        return None
    from merge.moe.gates import gate_tensors

    tensors, report, warnings = gate_tensors(p, progress=progress and sys.stderr.isatty())
    p.moe.report = report
    if warn is not None:
        for w in warnings:
            warn(w)
    if info is not None:
        for line in report:
            info(line)
    return tensors


def run(
    recipe: str | Path | Recipe | MoeRecipe,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    seed: int | None = None,
    shard_size: str | int = "5GB",
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
    info: Callable[[str], None] | None = None,
    threads: int | None = None,
    max_memory: str | int | None = None,
    device: str = "cpu",
    max_vram: str | int | None = None,
    copy_tokenizer: bool = True,
    write_card: bool = True,
    allow_crimes: bool = False,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    locked: bool = False,
    lock: LockUse | None = None,
    lock_sha256: str | None = None,
    build_key: str | None = None,
    stages_text: str | None = None,
    license: str | None = None,
    strict_finite: bool = False,
    resume: bool = False,
) -> Path:
    """Merge: plan, check the output location, download the weights of Hub models not in the
    cache (progress bars with ``progress``), stream every tensor, then finalize atomically.
    ``warn`` gets each warning, ``info`` each line of an MoE's routing report (and, on a device,
    its memory peak). ``threads`` (default: every available core), ``max_memory`` (default: half
    the available RAM) and ``device`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``; ``max_vram``:
    its budget) change speed and memory, never the output (on a GPU: see ``merge.device`` for
    the methods whose reductions round differently there). ``copy_tokenizer`` and ``write_card``
    false leave out the tokenizer files (unless a recipe tokenizer setting built them) and
    README.md; ``allow_crimes`` merges models of different architectures; ``trust_remote_code``
    lets transformers run the models' code; ``cache_dir`` is the Hugging Face cache for
    downloads (default: ``HF_HUB_CACHE`` etc.).
    The recipe's lock, when there is one (or ``lock``, a multi-stage build's), pins the Hub
    models; ``locked`` makes a missing lock, a recipe changed since it was locked or an input
    that differs from it an error (nothing written). ``lock_sha256`` (the lock the inputs were
    resolved from; default: the sha256 of the lock used) and ``build_key`` (a multi-stage
    build's key) are recorded in the output's ``merge-manifest.json``. Every output tensor
    is checked to be finite (``merge.finite``): an overflow or NaN/Inf made by the merge is an
    error, NaN/Inf in an input a warning (an error with ``strict_finite``). The
    output is built in ``.OUT.partial`` beside it, with a journal of finished tensors; an
    interrupt keeps it, and ``resume`` continues from the tensors there whose bytes verify
    (``merge.resume``)."""
    resources = Resources.resolve(threads, max_memory, device_name(device), max_vram)
    rec = recipe if isinstance(recipe, (Recipe, MoeRecipe)) else load_recipe(recipe)
    target = Path(out) if out is not None else default_output(rec.file)
    nbytes = shard_bytes(shard_size)
    if lock is None:
        lock = use_lock([rec], rec.file, locked=locked)
    lock_sha256 = lock_sha256 or (lock.sha256 if lock is not None else None)

    def again(models: dict[str, Model]) -> Plan:
        if lock is not None:
            lock.check(models)
        return _make_plan(rec, models, seed, nbytes, allow_crimes)

    with planned(
        rec,
        seed=seed,
        shard_size=shard_size,
        allow_crimes=allow_crimes,
        trust_remote_code=trust_remote_code,
        cache_dir=cache_dir,
        lock=lock,
    ) as first:
        if warn is not None:
            mem, on_device = memory(first, resources), vram(first, resources)
            dropped = dropped_template(first, copy_tokenizer)
            mem_warnings = [*mem.warnings(), *(on_device.warnings() if on_device else [])]
            for w in [*first.warnings, *mem_warnings, *dropped, *stale_siblings(target)]:
                warn(w)
        _check_output(first, target, overwrite, resume)
        with _downloaded(first, again, progress) as p:
            inputs_now = journal_inputs(p.models)
            if resume:
                _check_resumable(target, inputs_now)
            check_tokenizer_files(p, copy_tokenizer)
            computed = _gates(p, progress, warn, info)
            hashes = InputHashes(p.models)
            try:
                with (
                    AtomicOutput(target, overwrite, partial=True, resume=resume) as tmp,
                    Journal(tmp, plan_identity(p), inputs_now) as journal,
                ):
                    kept = _kept(p, tmp) if resume else None
                    journal.start(kept or {})
                    finite = FiniteCheck(strict_finite, warn)
                    shard_sha256 = execute(
                        p,
                        tmp,
                        progress=progress,
                        computed=computed,
                        resources=resources,
                        finite=finite,
                        journal=journal,
                        resume=kept,
                    )
                    if info is not None and resources.device is not None:
                        info(device_peak_line(resources))
                    write_extras(p, tmp, copy_tokenizer=copy_tokenizer)
                    copy_lock(p, lock, tmp, stages_text)
                    inputs = hashes.result()
                    if write_card:
                        write_model_card(p, tmp, inputs, license, warn)
                    check_models(p.models)  # the inputs as they were when planned
                    journal.remove()
                    write_run_manifest(p, tmp, inputs, lock_sha256, build_key, shard_sha256)
            except KeyboardInterrupt:
                if partial_dir(target).is_dir():
                    raise interrupted(target, len(p.jobs)) from None
                raise
            finally:
                hashes.cancel()
    return target


def _check_resumable(target: Path, inputs: dict[str, list[int]]) -> None:
    """An interrupted run's leftovers are resumed only with the inputs it read, unchanged."""
    part = partial_dir(target)
    header = journal_header(part) if part.is_dir() else None
    if header is not None:
        problems = resume_problems(part, header.get("inputs"), inputs)
        if problems:
            raise OutputError(problems)


def _kept(p: Plan, tmp: Path) -> dict[str, str]:
    """The journaled tensors of the interrupted run in ``tmp`` (each is verified against its
    bytes by the writer); everything there but the shards and the journal is removed."""
    found, done = read_journal(tmp)
    clear_for_resume(tmp, {s.filename for s in p.shards.shards})
    return done if found == plan_identity(p) else {}
