"""``merge evolve``: CMA-ES over a genome, candidates merged in memory and scored, resumable.

``evolve(genome_path, storage, ...)`` parses the genome (``merge.evolve.genome``), opens the
storage directory (``merge.evolve.store``: a rerun of the same command continues from the
last finished generation, with the same trajectory as an uninterrupted run), starts the
workers (``merge.evolve.workers``) and runs generations until ``max_evals`` candidates were
scored, ``time_limit`` seconds passed (checked between generations), or CMA-ES stops. Each
generation: ``ask`` (numpy's global RNG, seeded by ``seed`` and saved in the state), score
every candidate, ``tell`` the negated scores (CMA-ES minimises; the score is maximised),
append the records, save the state, rewrite ``best.yaml``; at the end ``progress.png``.

What it does not do: evaluate candidates of one generation on more than one worker pool, or
stop mid-generation (a kill loses at most the generation in flight).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge.errors import MergeError
from merge.evolve import outputs
from merge.evolve.config import EvolveConfig, load_config
from merge.evolve.genome import Genome
from merge.evolve.store import State, Store

TEST_HOOK = "MERGE_TEST_KILL_AFTER_GENERATION"  # "N": SIGKILL itself once N are saved


@dataclass
class Result:
    """How a run ended: the storage, the best record, generations, evaluations, why."""

    storage: Path
    best: dict[str, Any] | None
    generations: int
    evals: int
    stopped: str
    warnings: list[str]


def _cma() -> Any:
    try:
        import cma
    except ImportError:
        raise MergeError("merge evolve needs cma: pip install 'mergesmith[evolve]'") from None
    return cma


def new_state(
    genome: Genome, cfg: EvolveConfig, popsize: int | None, sigma0: float, seed: int
) -> State:
    import numpy as np

    cma = _cma()
    x0 = genome.initial(np.random.default_rng(seed), cfg.random_init)
    # cma seeds numpy's global RNG from opts["seed"], and takes 0 for "from the clock"
    opts: dict[str, Any] = {"seed": seed + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0}
    if popsize:
        opts["popsize"] = popsize
    if len(x0) == 1:  # cma needs two dimensions; a second, unused coordinate is harmless
        raise MergeError(
            f"{cfg.file}: the genome has a single parameter; CMA-ES needs at least two "
            f"(add a model, filters or a finer layer_granularity)"
        )
    es = cma.CMAEvolutionStrategy(x0, sigma0, opts)
    return State(optimizer=es, rng=np.random.get_state())


def _record(genome: Genome, gen: int, i: int, x: Any, got: dict[str, Any], evals: int) -> dict:
    vals = genome.values([float(v) for v in x])
    flat = {k: [w for g in v for m in g for w in m] for k, v in vals.items()}
    return {
        "generation": gen,
        "index": i,
        "eval": evals,
        "x": [float(v) for v in x],
        "values": flat,
        "score": got["score"],
        "metrics": got["metrics"],
    }


def run_generation(state: State, genome: Genome, pool: Any) -> list[dict[str, Any]]:
    """Ask, score and tell one generation; the records, in candidate order."""
    import numpy as np

    np.random.set_state(state.rng)
    es = state.optimizer
    xs = es.ask()
    results = pool.map([genome.recipe([float(v) for v in x]) for x in xs])
    es.tell(xs, [-r["score"] for r in results])
    records = [
        _record(genome, state.generation, i, x, r, state.evals + i + 1)
        for i, (x, r) in enumerate(zip(xs, results, strict=True))
    ]
    state.rng = np.random.get_state()
    return records


def _stop_reason(state: State, max_evals: int, deadline: float | None) -> str | None:
    if state.evals >= max_evals:
        return f"--max-evals {max_evals} reached"
    stop = state.optimizer.stop()
    if stop:
        return "CMA-ES converged (" + ", ".join(sorted(stop)) + ")"
    if deadline is not None and time.monotonic() >= deadline:
        return "--time-limit reached"
    return None


def _pool(cfg: EvolveConfig, workers: int, address: str | None, **kw: Any) -> tuple[Any, int]:
    """The workers, and the models' layer count. The models and tasks are opened here first
    (headers only), so a bad reference is an error at its genome line before Ray starts."""
    from merge.evolve.workers import LocalPool, RayPool, Scorer

    kwargs = dict(
        base_recipe=cfg.genome.probe_recipe(),
        genome_file=str(cfg.file),
        tasks=cfg.tasks,
        limit=cfg.limit,
        **kw,
    )
    ray = workers > 1 or address is not None
    try:
        probe = Scorer(**{**kwargs, "threads": None} if ray else kwargs)
    except MergeError as e:
        raise cfg.relocate(e) from None
    layers = probe.layers
    if not ray:
        return LocalPool(probe), layers
    probe.close()
    kwargs.pop("warn")  # an actor's warnings stay on its node; the probe's were shown
    threads = kwargs.pop("threads")
    return RayPool(workers, address, threads, **kwargs), layers


def evolve(
    genome_path: str | Path,
    storage: str | Path,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    max_evals: int = 100,
    popsize: int | None = None,
    sigma0: float = 1 / 6,
    seed: int = 0,
    time_limit: float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    threads: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> Result:
    """Run or continue the search (see the module docstring)."""
    start = time.monotonic()
    deadline = start + time_limit if time_limit is not None else None
    cfg = load_config(genome_path)
    _check(max_evals, popsize, sigma0, workers, batch_size)
    key = cfg.key({"popsize": popsize, "sigma0": sigma0, "seed": seed, "batch_size": batch_size})
    store = Store(storage, key, cfg.file.resolve())
    _cma()
    say = echo or (lambda _s: None)
    pool, layers = _pool(
        cfg,
        workers,
        ray_address,
        batch_size=batch_size,
        device=device,
        threads=threads,
        warn=lambda w: say(f"warning: {w}"),
    )
    try:
        genome = cfg.genome.with_layers(layers, cfg.granularity_at)
        state = store.open()
        if state is None:
            state = new_state(genome, cfg, popsize, sigma0, seed)
        elif state.generation:
            say(f"resuming {store.dir} after generation {state.generation - 1}")
        try:
            stopped = _loop(state, genome, pool, store, max_evals, deadline, say)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"interrupted; {store.dir} keeps {state.generation} finished generations: "
                f"rerun the same command to continue"
            ) from None
    finally:
        pool.close()
    warning = outputs.write_plot(store.dir, store.history())
    return Result(
        store.dir,
        state.best,
        state.generation,
        state.evals,
        stopped or "",
        [warning] if warning else [],
    )


def _loop(
    state: State,
    genome: Genome,
    pool: Any,
    store: Store,
    max_evals: int,
    deadline: float | None,
    say: Callable[[str], None],
) -> str:
    """Run generations until a stop condition; why it stopped."""
    hook = int(os.environ.get(TEST_HOOK, "0") or 0)
    stopped: str | None = state.done
    while stopped is None and not (stopped := _stop_reason(state, max_evals, deadline)):
        records = run_generation(state, genome, pool)
        gen = state.generation
        state.generation += 1
        state.evals += len(records)
        top = max(records, key=lambda r: r["score"])
        if state.best is None or top["score"] > state.best["score"]:
            state.best = top
        store.append(records)
        store.save(state)
        outputs.write_best(store.dir, genome.recipe(state.best["x"]), state.best)
        say(outputs.generation_line(gen, records, state.best))
        if hook and state.generation == hook:
            os.kill(os.getpid(), signal.SIGKILL)
    if state.done is None and stopped.startswith("CMA-ES"):
        state.done = stopped  # final; a larger --max-evals or --time-limit continues otherwise
        store.save(state)
    return stopped


def _check(max_evals: int, popsize: int | None, sigma0: float, workers: int, batch: int) -> None:
    problems = []
    if max_evals < 1:
        problems.append(f"--max-evals must be >= 1, got {max_evals}")
    if popsize is not None and popsize < 2:
        problems.append(f"--popsize must be >= 2, got {popsize}")
    if not sigma0 > 0:
        problems.append(f"--sigma0 must be > 0, got {sigma0}")
    if workers < 1:
        problems.append(f"--workers must be >= 1, got {workers}")
    if batch < 1:
        problems.append(f"--batch-size must be >= 1, got {batch}")
    if problems:
        raise MergeError(problems)
