"""Running a multi-stage recipe: every stage planned first, then built in order, each only when
its content key changed.

Design
------
``run_stages`` plans every stage (``merge.build.multistage.plan_stages``) and computes every
stage's key before anything is written. A stage is *up to date* when its output exists and its
``merge-manifest.json`` records the same ``build_key``; it is then left as it is (not even
touched). Otherwise it is rebuilt by ``merge.api.run`` (atomic, as every output), with
``build_key`` written into its manifest and the names of the stages resolving to their built
outputs (``merge.sources.stage_outputs``). ``lazy=False`` rebuilds every stage.

Outputs: the final stage goes to ``out`` (default ``./<recipe stem>-merged``, as a single
recipe), every named stage to ``<intermediate dir>/<name>`` (default
``./<recipe stem>-stages``). An intermediate output belongs to the build: it is replaced when
its key changed. A folder there that is not a merge output (no manifest) is refused, and the
final output needs ``overwrite`` to be replaced (unless it is up to date), as for a single
recipe. Every problem with the outputs (existing, overlapping, inside an input, disk space for
everything to be built) is raised before the first stage starts.

What this module does not do: check or plan a recipe itself (``merge.build.stages``,
``merge.build.multistage``), or verify that an up-to-date output's files are intact
(``merge verify``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge.api import default_output, run
from merge.build.manifest import MANIFEST_NAME, read_manifest, sha256_text
from merge.build.multistage import Settings, StagePlan, plan_stages, stage_keys, stages_lock
from merge.build.stages import Stages
from merge.errors import BuildError, OutputError
from merge.outdir import check_output_location
from merge.sources import stage_outputs
from merge.sourceset import iter_unique_dirs

Report = Callable[[str], None]


def default_intermediate_dir(recipe_file: Path) -> Path:
    """``./<recipe stem>-stages``, beside the default output ``./<recipe stem>-merged``."""
    return Path.cwd() / f"{recipe_file.stem}-stages"


def stage_folders(stages: Stages, intermediate_dir: str | Path | None) -> dict[str, Path]:
    """Where each named stage but the final is built: ``<intermediate dir>/<name>``."""
    root = Path(intermediate_dir) if intermediate_dir else default_intermediate_dir(stages.file)
    return {s.name: root.absolute() / s.name for s in stages.stages if s.name and not s.final}


@dataclass
class StagesRun:
    """What ``run_stages`` did: the final output, and the labels of the stages it built and
    of those that were up to date, in build order."""

    out: Path
    built: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """``wrote OUT (built 2 of 3 stages)`` or ``OUT is up to date (3 stages)``."""
        total = len(self.built) + len(self.up_to_date)
        stages = f"{total} stage" + ("s" if total != 1 else "")
        if not self.built:
            return f"{self.out} is up to date ({stages})"
        return f"wrote {self.out} (built {len(self.built)} of {stages})"


@dataclass
class _Step:
    sp: StagePlan
    out: Path
    key: str
    fresh: bool  # up to date: nothing to do


def run_stages(
    stages: Stages,
    out: str | Path | None = None,
    *,
    intermediate_dir: str | Path | None = None,
    lazy: bool = True,
    overwrite: bool = False,
    settings: Settings | None = None,
    report: Report | None = None,
    warn: Report | None = None,
    **run_options: Any,
) -> StagesRun:
    """Plan every stage, then build those that are not up to date, in order (see the module
    docstring). ``report`` gets one line per stage (built / up to date), ``warn`` each
    warning with its stage; ``run_options`` go to ``merge.api.run`` (progress, threads,
    max_memory, device, info)."""
    settings = settings or Settings()
    target = Path(out) if out is not None else default_output(stages.file)
    folders = stage_folders(stages, intermediate_dir)
    lock = stages_lock(stages, settings)
    plans = plan_stages(stages, settings, folders, lock)
    whole = stages.file.read_text(encoding="utf-8")
    final = {"file": sha256_text(whole), "lock": lock.sha256 if lock is not None else None}
    keys = stage_keys(plans, settings, final)
    steps = [_step(sp, target, folders, keys, lazy) for sp in plans]
    run_options = {**run_options, "stages_text": whole}
    _check_outputs(steps, target, folders, overwrite)
    done = StagesRun(target)
    for step in steps:
        label = step.sp.stage.label
        if step.fresh:
            done.up_to_date.append(label)
            if report is not None:
                report(f"{label}: up to date ({step.out})")
            continue
        start = time.perf_counter()
        options = {**run_options, "lock": lock}
        if not step.sp.stage.final:
            options.pop("stages_text")
        _build(step, folders, settings, overwrite, warn, options)
        done.built.append(label)
        if report is not None:
            report(f"{label}: built {step.out} in {time.perf_counter() - start:.2f} s")
    return done


def _step(
    sp: StagePlan, target: Path, folders: dict[str, Path], keys: dict[str | None, str], lazy: bool
) -> _Step:
    stage = sp.stage
    out = target if stage.final else folders[str(stage.name)]
    key = keys[stage.name]
    return _Step(sp, out, key, lazy and recorded_key(out) == key)


def recorded_key(out: Path) -> str | None:
    """The ``build_key`` in the manifest of ``out``; None without a usable one."""
    try:
        manifest = read_manifest(out) if out.is_dir() else None
    except BuildError:
        return None
    key = manifest.get("build_key") if manifest else None
    return key if isinstance(key, str) else None


def _build(
    step: _Step,
    folders: dict[str, Path],
    settings: Settings,
    overwrite: bool,
    warn: Report | None,
    run_options: dict[str, Any],
) -> None:
    stage = step.sp.stage
    with stage_outputs(folders):
        run(
            stage.recipe,
            step.out,
            overwrite=overwrite or not stage.final,
            **settings.run_options(),
            build_key=step.key,
            warn=None if warn is None else (lambda w: warn(f"{stage.label}: {w}")),
            **run_options,
        )


def _check_outputs(
    steps: list[_Step], target: Path, folders: dict[str, Path], overwrite: bool
) -> None:
    """Every problem with the outputs of the stages to build, before the first is built."""
    problems: list[str] = []
    root = next(iter(folders.values())).parent if folders else None
    if root is not None and (_inside(root, target) or _inside(target, root)):
        problems.append(
            f"the intermediate dir '{root}' and the output '{target}' overlap; choose another "
            "--intermediate-dir or output"
        )
    todo = [s for s in steps if not s.fresh]
    for step in todo:
        problems.extend(_existing(step, overwrite))
        inputs = [d for d in iter_unique_dirs(step.sp.plan.models)]
        problems.extend(check_output_location(step.out, inputs))
    problems.extend(_disk_space(todo))
    if problems:
        raise OutputError(list(dict.fromkeys(problems)))


def _existing(step: _Step, overwrite: bool) -> list[str]:
    out = step.out
    if not os.path.lexists(out):
        return []
    if step.sp.stage.final:
        return (
            [] if overwrite else [f"output '{out}' already exists; pass --overwrite to replace it"]
        )
    if not (out / MANIFEST_NAME).is_file():
        return [
            f"{step.sp.stage.label}: '{out}' exists and is not a merge output (no "
            f"{MANIFEST_NAME}); remove it or choose another --intermediate-dir"
        ]
    return []


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it."""
    return Path(a).expanduser().resolve().is_relative_to(Path(b).expanduser().resolve())


def _disk_space(todo: list[_Step]) -> list[str]:
    """Free space for every output to build, summed per file system."""
    needed: dict[int, tuple[Path, int]] = {}
    for step in todo:
        probe = step.out.absolute()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        device = probe.stat().st_dev
        first, total = needed.get(device, (probe, 0))
        needed[device] = (first, total + step.sp.plan.shards.total_bytes + 50 * 2**20)
    problems = []
    for probe, total in needed.values():
        free = shutil.disk_usage(probe).free
        if free < total:
            problems.append(
                f"not enough disk space for the stages to build: they need {total / 1e9:.2f} "
                f"GB, {free / 1e9:.2f} GB free on {probe}"
            )
    return problems
