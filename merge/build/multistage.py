"""Planning a multi-stage recipe before any stage is built, and each stage's content key.

Design
------
``plan_stages`` plans every stage, in build order (``merge.build.stages``), before anything is
computed, so ``merge validate``, ``merge plan`` and ``merge run`` find the problems of every
stage in their first seconds. A later stage sees an earlier one through the earlier stage's
``Plan``: a ``PlannedOutput``, a checkpoint whose headers are the plan's output tensors (names,
shapes, output dtypes) and whose config is the planned config, in a temporary folder that holds
the planned small files (``merge.api.write_extras``: config, generation config, tokenizer,
recipe; no tensor data). Stage names resolve to those folders through
``merge.sources.stage_outputs`` and open as ``PlannedOutput`` through
``merge.sourceset.planned_checkpoints``. A stage whose plan fails leaves out the stages that use
it (directly or not); the problems of every other stage are reported with its own, together.

``stage_keys`` gives each stage a content key, as a build system would: the sha256 of the
stage's document text, the identity of each resolved input (``merge.build.inputs``: Hub commit
or local folder, and the size and sha256 of each file a merge reads; an earlier stage stands
for itself by its own key), the seed, the tool version and the options that change the bytes
written (shard size, ``copy_tokenizer``, ``write_card``). A key is known before anything is
built, so an unchanged rerun rebuilds nothing and a change rebuilds the stages downstream of
it (``merge.build.stagerun``).

What this module does not do: build stages or decide which are up to date
(``merge.build.stagerun``), or read tensor data (a ``PlannedOutput`` has none).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge import __version__
from merge.api import memory, plan, shard_bytes, vram, write_extras
from merge.build.inputs import identify
from merge.build.locked import LockUse, use_lock
from merge.build.stages import Stage, Stages
from merge.checkpoint import Checkpoint, TensorInfo
from merge.errors import CheckpointError, MergeError, PlanError
from merge.jobs import Plan
from merge.report import plan_json, plan_text, summary
from merge.resources import Resources
from merge.sources import ModelRef, stage_outputs
from merge.sourceset import Model, planned_checkpoints


@dataclass(frozen=True)
class Settings:
    """The options every stage is planned and built with (those of ``merge.api.run``)."""

    seed: int | None = None
    shard_size: str | int = "5GB"
    copy_tokenizer: bool = True
    write_card: bool = True
    allow_crimes: bool = False
    trust_remote_code: bool = False
    cache_dir: str | Path | None = None
    locked: bool = False  # --locked: the lock must exist and match (merge.build.locked)
    license: str | None = None  # --license: the model card's, instead of the inferred one
    strict_finite: bool = False  # --strict-finite: NaN/Inf carried from an input is an error
    resume: bool = False  # --resume: continue an interrupted run (merge.resume)

    def plan_options(self) -> dict[str, Any]:
        """The keywords of ``merge.api.plan``."""
        return {
            "seed": self.seed,
            "shard_size": self.shard_size,
            "allow_crimes": self.allow_crimes,
            "trust_remote_code": self.trust_remote_code,
            "cache_dir": self.cache_dir,
        }

    def run_options(self) -> dict[str, Any]:
        """The keywords of ``merge.api.run`` (but ``overwrite`` and the reporting ones)."""
        return {
            **self.plan_options(),
            "copy_tokenizer": self.copy_tokenizer,
            "write_card": self.write_card,
            "locked": self.locked,
            "license": self.license,
            "strict_finite": self.strict_finite,
            "resume": self.resume,
        }

    def key_options(self) -> dict[str, Any]:
        """The options that change the bytes of an output (part of every stage key)."""
        return {
            "shard_bytes": shard_bytes(self.shard_size),
            "copy_tokenizer": self.copy_tokenizer,
            "write_card": self.write_card,
            **({"license": self.license} if self.license else {}),  # keys without one unchanged
        }


@dataclass
class StagePlan:
    """A stage and its plan. In the plan, a model that is an earlier stage has the folder the
    run builds it in (``folders``), not the temporary one it was planned from."""

    stage: Stage
    plan: Plan
    uses: list[str] = field(default_factory=list)


class PlannedOutput(Checkpoint):
    """A stage's output as its plan describes it: headers and config, no tensor data."""

    def __init__(self, folder: Path, label: str, plan: Plan) -> None:
        files = {spec.name: s.filename for s in plan.shards.shards for spec in s.tensors}
        tensors = {
            j.name: TensorInfo(
                j.name, j.shape, j.dtype, folder / files[j.name], j.numel * j.dtype.itemsize
            )
            for j in plan.jobs
        }
        super().__init__(folder, label, dict(plan.config), tensors, "safetensors")

    def read(self, name: str) -> Any:
        raise CheckpointError(
            f"model '{self.label}': a stage that is planned, not built: its tensor '{name}' "
            "cannot be read yet"
        )

    def view(self, name: str) -> Any:
        return self.read(name)

    def read_range(self, name: str, start: int, stop: int) -> Any:
        return self.read(name)


def stages_lock(stages: Stages, settings: Settings) -> LockUse | None:
    """The lock of a multi-stage file, over every stage (stage names are not locked)."""
    return use_lock(stages.recipes(), stages.file, locked=settings.locked, internal=stages.names)


def plan_stages(
    stages: Stages,
    settings: Settings,
    folders: Mapping[str, Path] | None = None,
    lock: LockUse | None = None,
) -> list[StagePlan]:
    """Plan every stage (see the module docstring); raise every stage's problems together.
    ``folders`` (stage name -> where the run builds it) is what the plans show; ``lock``
    (default: the file's, ``stages_lock``) pins the Hub models of every stage."""
    settings.key_options()  # a bad option once, before any stage
    if lock is None:
        lock = stages_lock(stages, settings)
    plans: list[StagePlan] = []
    problems: list[str] = []
    kinds: list[type[MergeError]] = []
    with tempfile.TemporaryDirectory(prefix="merge-stages-") as tmp:
        standins: dict[str, Path] = {}
        openers: dict[Path, Callable[[str], Checkpoint]] = {}
        for stage in stages.stages:
            if any(dep not in standins for dep in stage.uses):
                continue  # an earlier stage failed: its problems say why
            try:
                with stage_outputs(standins), planned_checkpoints(openers):
                    p = plan(stage.recipe, **settings.plan_options(), lock=lock)
            except MergeError as e:
                problems.extend(_located(stage, stages.file, line) for line in e.problems)
                kinds.append(type(e))
                continue
            plans.append(StagePlan(stage, p, list(stage.uses)))
            if stage.name is not None:
                folder = Path(tmp) / stage.name
                _stand_in(p, folder, settings)
                standins[stage.name] = folder
                openers[folder] = _opener(folder, p)
    if problems:
        raise (kinds[0] if len(set(kinds)) == 1 else PlanError)(problems)
    for sp in plans:
        _show_folders(sp, folders or {})
    return plans


def _opener(folder: Path, p: Plan) -> Callable[[str], Checkpoint]:
    def open_planned(label: str) -> Checkpoint:
        return PlannedOutput(folder, label, p)

    return open_planned


def _stand_in(p: Plan, folder: Path, settings: Settings) -> None:
    """The planned small files of a stage's output, as its run will write them."""
    folder.mkdir()
    write_extras(p, folder, copy_tokenizer=settings.copy_tokenizer)


def _located(stage: Stage, file: Path, problem: str) -> str:
    """A stage's problem with the file and line: those without one get the stage's."""
    if problem.startswith(f"{file}:"):
        return problem
    return f"{file}:{stage.line}: {stage.label}: {problem}"


def _show_folders(sp: StagePlan, folders: Mapping[str, Path]) -> None:
    """Point the plan's stage models at the folders the run reads them from."""
    for ref, model in sp.plan.models.items():
        name = ModelRef.parse(ref).path
        if name in sp.uses and name in folders:
            model.directory = folders[name]


def stage_keys(
    plans: list[StagePlan], settings: Settings, final: Mapping[str, Any] | None = None
) -> dict[str | None, str]:
    """Each stage's content key (see the module docstring), by stage name (None: unnamed).
    ``final`` joins the final stage's key: what its output holds beyond its own stage (the
    whole file and the lock's sha256, copied there for reproduction)."""
    keys: dict[str | None, str] = {}
    options = settings.key_options()
    for sp in plans:
        inputs = [e for m in sp.plan.models.values() for e in _input_entries(m, keys)]
        material = {
            "recipe": sp.stage.recipe.text,
            "inputs": inputs,
            "seed": sp.plan.seed,
            "tool_version": __version__,
            "options": options,
        }
        if sp.stage.final and final:
            material["final"] = dict(final)
        text = json.dumps(material, sort_keys=True, separators=(",", ":"))
        keys[sp.stage.name] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return keys


def _input_entries(model: Model, keys: Mapping[str | None, str]) -> list[dict[str, Any]]:
    """Each side of a model reference as an ``InputId`` entry; a stage by its key."""
    ref = ModelRef.parse(model.ref)
    sides: list[tuple[ModelRef, Path | None]] = [(ref.base, model.directory)]
    if ref.lora is not None:
        sides.append((ref.lora, model.adapter))
    entries = []
    for side, folder in sides:
        if side.path in keys:
            entries.append(
                {
                    "ref": str(side),
                    "source": "stage",
                    "stage": side.path,
                    "build_key": keys[side.path],
                }
            )
        elif folder is not None:
            entries.append(identify(side, folder).as_dict())
    return entries


# --- what validate and plan print ------------------------------------------------------------


def _models_line(sp: StagePlan) -> str:
    refs = [f"{r} (stage)" if ModelRef.parse(r).path in sp.uses else r for r in sp.plan.models]
    return "models: " + ", ".join(refs)


def stage_header(sp: StagePlan) -> str:
    """``stage NAME (line N): METHOD``, the first line of a stage in validate and plan."""
    return f"{sp.stage.label} (line {sp.stage.line}): {sp.plan.method.name}"


def stages_summary(plans: list[StagePlan]) -> list[str]:
    """Each stage's header, models and summary (``merge.report.summary``), indented."""
    lines = []
    for sp in plans:
        lines.append(stage_header(sp))
        lines += [f"  {line}" for line in [_models_line(sp), *summary(sp.plan)[1:]]]
    return lines


def stages_plan_text(plans: list[StagePlan], resources: Resources) -> str:
    """Each stage's plan (``merge.report.plan_text``) and memory line (and VRAM line, on a
    device), under its header."""
    parts = []
    for sp in plans:
        body = plan_text(sp.plan) + "\n" + memory(sp.plan, resources).line()
        on_device = vram(sp.plan, resources)
        body += f"\n{on_device.line()}" if on_device else ""
        parts.append(f"== {stage_header(sp)}\n{body}")
    return "\n\n".join(parts)


def stages_plan_json(plans: list[StagePlan], resources: Resources) -> list[dict[str, Any]]:
    """One ``merge plan --json`` object per stage, with its ``stage`` name (null for the
    unnamed final stage), ``final``, ``line`` and the ``uses`` of earlier stages."""
    return [
        {
            "stage": sp.stage.name,
            "final": sp.stage.final,
            "line": sp.stage.line,
            "uses": sp.uses,
            **plan_json(sp.plan),
            "memory": memory(sp.plan, resources).as_json(),
            **_vram_json(sp, resources),
        }
        for sp in plans
    ]


def _vram_json(sp: StagePlan, resources: Resources) -> dict[str, Any]:
    on_device = vram(sp.plan, resources)
    return {"vram": on_device.as_json()} if on_device else {}


def stage_warnings(plans: list[StagePlan], resources: Resources | None = None) -> list[str]:
    """Every stage's plan warnings (and memory warnings, given ``resources``), each with its
    stage."""
    out = []
    for sp in plans:
        found = [*sp.plan.warnings]
        if resources is not None:
            found += memory(sp.plan, resources).warnings()
            on_device = vram(sp.plan, resources)
            found += on_device.warnings() if on_device else []
        out += [f"{sp.stage.label}: {w}" for w in found]
    return out
