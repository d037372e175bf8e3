"""Evaluating a generation's candidates: in this process, or on Ray actors.

A ``Scorer`` holds one ``InMemoryMerger`` (the inputs opened once, one target model) and the
parsed tasks; ``score(recipe)`` merges the candidate into the model and evaluates it:
``{"score": sum(weight * metric), "metrics": {task: {metric: value}}, "seconds": ...}``.
``LocalPool`` is one Scorer in process (``--workers 1``). ``RayPool`` starts one actor per
worker (one GPU each when the cluster has GPUs, else one CPU), each holding its own Scorer,
hands candidates to free actors and returns the results in candidate order, so the history
is the same for any number of workers. Ray is imported here only, when a RayPool starts.

Evaluation runs in float32 where the model is (CPU by default) with ``threads`` torch threads
(default 1 on Ray actors); the merges are bit-exact, so a candidate's score depends only on
its recipe, the tasks, the batch size and the device.

What it does not do: retry a failed candidate (its error stops the run), or schedule merges
and evaluations on separate actors (mergekit's ``buffered`` strategy).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from merge.errors import EvalError, MergeError
from merge.evolve.config import TaskSpec


class Scorer:
    """One merger and the tasks; scores candidate recipes."""

    def __init__(
        self,
        base_recipe: dict[str, Any],
        genome_file: str,
        tasks: tuple[TaskSpec, ...],
        *,
        limit: int | None,
        batch_size: int,
        device: str,
        threads: int | None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        import torch

        from merge.eval import parse_task
        from merge.evolve.inmemory import InMemoryMerger, as_recipe

        if threads:
            torch.set_num_threads(threads)
        self._file = Path(genome_file)
        self._merger = InMemoryMerger(
            as_recipe(base_recipe, self._file), device=device, threads=threads, warn=warn
        )
        self._tasks = [(t, parse_task(t.spec)) for t in tasks]
        self._limit, self._batch, self._device = limit, batch_size, device

    @property
    def layers(self) -> int:
        """The input models' layer count (``num_hidden_layers`` of the output config)."""
        return int(self._merger.config.get("num_hidden_layers") or 0)

    def score(self, recipe: dict[str, Any]) -> dict[str, Any]:
        from merge.evolve.inmemory import as_recipe

        start = time.perf_counter()
        model = self._merger.merge(as_recipe(recipe, self._file))
        tokenizer = self._merger.tokenizer()
        total, metrics = 0.0, {}
        for spec, task in self._tasks:
            got = task.evaluate(
                model, tokenizer, batch_size=self._batch, limit=self._limit, device=self._device
            )
            if spec.metric not in got:
                have = ", ".join(k for k in got if k != "n")
                raise EvalError(f"{spec.where}: task has no metric '{spec.metric}'; it has {have}")
            metrics[spec.spec] = {k: float(v) for k, v in got.items()}
            total += spec.weight * float(got[spec.metric])
        return {"score": total, "metrics": metrics, "seconds": time.perf_counter() - start}

    def close(self) -> None:
        self._merger.close()


class LocalPool:
    """One Scorer in this process."""

    def __init__(self, scorer: Scorer) -> None:
        self._scorer = scorer

    def map(self, recipes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self._scorer.score(r) for r in recipes]

    def close(self) -> None:
        self._scorer.close()


def _remote_scorer(ray: Any) -> Any:
    class ScorerActor:
        def __init__(self, kwargs: dict[str, Any]) -> None:
            self.scorer = Scorer(**kwargs)

        def score(self, recipe: dict[str, Any]) -> dict[str, Any]:
            try:
                return self.scorer.score(recipe)
            except MergeError as e:  # a user error crosses as text, not a Ray traceback
                return {"error": e.problems}

    return ray.remote(ScorerActor)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MergeError(
            "--workers N > 1 and --ray-address need Ray: pip install 'mergesmith[evolve]'"
        ) from None
    return ray


class RayPool:
    """``workers`` Ray actors, each with a Scorer (see the module docstring)."""

    def __init__(self, workers: int, address: str | None, threads: int | None, **kwargs: Any):
        ray = self._ray = _import_ray()
        root = str(Path(__file__).resolve().parents[2])  # this checkout's merge package
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {
            "env_vars": {
                "PYTHONPATH": path,
                "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
            }
        }
        self._started = not ray.is_initialized()
        if self._started:
            init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address is None:
                init["num_cpus"] = max(workers, 1)
            ray.init(address=address, runtime_env=env, **init)
        gpus = ray.cluster_resources().get("GPU", 0)
        per = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
        if gpus >= 1:
            kwargs["device"] = "cuda"
        kwargs["threads"] = threads or 1
        actor = _remote_scorer(ray).options(**per)
        self._actors = [actor.remote(kwargs) for _ in range(workers)]

    def map(self, recipes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from ray.util import ActorPool

        pool = ActorPool(self._actors)
        results = list(pool.map(lambda a, r: a.score.remote(r), recipes))  # candidate order
        for r in results:
            if "error" in r:
                raise MergeError(r["error"])
        return results

    def close(self) -> None:
        for a in self._actors:
            self._ray.kill(a)
        self._actors = []
        if self._started:
            self._ray.shutdown()
