"""The files of an output beside its shards: config, generation config, tokenizer, recipe,
lock, model card and manifest, written into the run's temporary directory.

``write_extras`` writes the small files the plan fixes (config donor, tokenizer donor,
recipe); ``copy_lock`` the lock the run used when it is that recipe's; ``write_card`` the
model card once the inputs' identities are known; ``write_run_manifest`` last, since it lists
every other file (the shards by the sha256 the writer hashed while writing them).

What it does not do: write tensors (``merge.execute``) or decide where the output goes
(``merge.outdir``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from merge import __version__
from merge.build.inputs import InputId
from merge.build.locked import LockUse
from merge.build.manifest import make_manifest, sha256_text, write_manifest
from merge.card.output import LOCK_NAME, RECIPE_NAME, STAGES_LOCK_NAME, STAGES_NAME
from merge.card.output import write as write_card_files
from merge.jobs import Plan
from merge.links import TAGALONG_FILES, inside
from merge.sourceset import iter_unique_dirs
from merge.tokenizer import check_tokenizer, resolve_template, write_tokenizer


def _generation_config(p: Plan) -> Path | None:
    """generation_config.json of the config donor, else of the tokenizer donor, else of the
    first model (recipe order) that has one: always carried, whatever the tokenizer path."""
    for ref in dict.fromkeys([p.donor, p.tokenizer_donor, *p.models]):
        folder = p.models[ref].directory
        path = folder / "generation_config.json"
        if path.is_file():
            return inside(path, folder, ref)
    return None


def writes_tokenizer(p: Plan, copy_tokenizer: bool) -> bool:
    """Whether the output gets tokenizer files: always when a recipe tokenizer setting built
    the output's vocabulary, else unless ``--no-copy-tokenizer`` (as mergekit)."""
    return copy_tokenizer or p.vocab is not None


def check_tokenizer_files(p: Plan, copy_tokenizer: bool) -> None:
    """Before any tensor: the chat template and the donor's tokenizer configs can be read."""
    if writes_tokenizer(p, copy_tokenizer):
        donor = p.models[p.tokenizer_donor].directory
        dirs = iter_unique_dirs(p.models)
        check_tokenizer(donor, p.recipe.chat_template, dirs, p.vocab is not None)


def write_extras(p: Plan, out: Path, *, copy_tokenizer: bool = True) -> None:
    """config.json, generation_config.json, tokenizer (``writes_tokenizer``) and the recipe
    (the model card comes later, with the inputs' identities: ``merge.card.output``)."""
    (out / "config.json").write_text(json.dumps(p.config, indent=2) + "\n", encoding="utf-8")
    gen = _generation_config(p)
    if gen is not None:
        (out / "generation_config.json").write_bytes(gen.read_bytes())
    for name in TAGALONG_FILES:
        path = p.models[p.donor].directory / name
        if path.is_file():
            (out / name).write_bytes(inside(path, path.parent, p.donor).read_bytes())
    if writes_tokenizer(p, copy_tokenizer):
        template = resolve_template(p.recipe.chat_template, iter_unique_dirs(p.models))
        built = p.vocab.tokenizer if p.vocab else None
        added = p.vocab.added if p.vocab else []
        write_tokenizer(p.models[p.tokenizer_donor].directory, out, template, built, added)
    (out / RECIPE_NAME).write_text(p.recipe.text, encoding="utf-8")


def copy_lock(p: Plan, lock: LockUse | None, out: Path, stages_text: str | None) -> None:
    """The lock the run used, as ``merge-recipe.lock`` beside ``merge-recipe.yaml``, when it
    is the lock of exactly that text: ``merge run --locked OUT/merge-recipe.yaml`` then
    rebuilds OUT. A multi-stage build's final output (``stages_text``: the whole file) gets
    the whole file as ``merge-stages.yaml`` and, when the lock is that file's, its lock as
    ``merge-stages.lock``: ``merge run --locked OUT/merge-stages.yaml`` rebuilds every stage."""
    if stages_text is not None:
        (out / STAGES_NAME).write_text(stages_text, encoding="utf-8")
        if lock is not None and lock.lock.recipe_sha256 == sha256_text(stages_text):
            (out / STAGES_LOCK_NAME).write_bytes(lock.lock.path.read_bytes())
        return
    if lock is not None and lock.lock.recipe_sha256 == sha256_text(p.recipe.text):
        (out / LOCK_NAME).write_bytes(lock.lock.path.read_bytes())


def write_model_card(
    p: Plan,
    tmp: Path,
    inputs: list[InputId],
    license: str | None,
    warn: Callable[[str], None] | None,
) -> None:
    """README.md and merge-card.json from the plan and the resolved inputs; their warnings."""
    said = write_card_files(
        p, tmp, [i.as_dict() for i in inputs], tool_version=__version__, license=license
    )
    if warn is not None:
        for w in said:
            warn(w)


def write_run_manifest(
    p: Plan,
    tmp: Path,
    inputs: list[InputId],
    lock_sha256: str | None,
    build_key: str | None,
    shard_sha256: dict[str, str],
) -> None:
    """merge-manifest.json, last: it lists every other file of the output (the shards by the
    sha256 hashed while they were written)."""
    manifest = make_manifest(
        tmp,
        known=shard_sha256,
        recipe_text=p.recipe.text,
        seed=p.seed,
        inputs=inputs,
        lock_sha256=lock_sha256,
        build_key=build_key,
    )
    write_manifest(tmp, manifest)


def dropped_template(p: Plan, copy_tokenizer: bool) -> list[str]:
    """The warning for a chat template that no tokenizer file will carry."""
    if p.recipe.chat_template is None or writes_tokenizer(p, copy_tokenizer):
        return []
    return ["chat_template is set but --no-copy-tokenizer writes no tokenizer; it is not saved"]
