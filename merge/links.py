"""Symbolic links in input folders: followed only where they stay inside the model's folder.

Design
------
Every file the output takes from an input (config, generation config, tokenizer files, chat
templates, processor files, the card's fields) and every weight file is read through
``inside(path, folder)``: the path, links resolved, must lie inside the folder's root, else a
``CheckpointError`` refuses it. So a ``generation_config.json`` linked to ``/etc/passwd`` never
reaches an output that would then be published. The root is the folder itself, resolved, or
for a Hugging Face cache snapshot (``.../models--org--name/snapshots/<sha>/``, whose files are
links into ``../../blobs/``) the repo's cache folder ``.../models--org--name/``.

``check_folder`` makes the check for every such file a folder has, when the model is opened,
so ``merge validate`` finds a bad link before any output exists.

What it does not do: refuse links that stay inside (a folder may link one of its files to
another), or look at files the output never takes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from merge.errors import CheckpointError

# The files of a model folder that make its tokenizer (``merge.tokenizer`` copies them).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
)
# Files a multimodal model needs beside its weights and tokenizer (image and video processors,
# the processor's chat template): copied from the config donor, as mergekit does.
TAGALONG_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
)
# What the output may take from a model folder besides its weights (``merge.api``,
# ``merge.tokenizer``, ``merge.card.facts``).
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    *TAGALONG_FILES,
    *TOKENIZER_FILES,
    "README.md",
)


def root_of(folder: Path) -> Path:
    """The folder whose inside a model's files must stay in: the folder itself (resolved),
    or for a Hugging Face cache snapshot its repo cache folder (``models--org--name``)."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def inside(path: Path, folder: Path, label: str | None = None) -> Path:
    """``path`` (a file of ``folder``) when, links resolved, it stays inside ``folder``'s root;
    else a one-line ``CheckpointError`` naming the model (``label``), the file and the target."""
    root = root_of(folder)
    target = Path(os.path.realpath(path))
    if target == root or root in target.parents:
        return path
    who = f"model '{label}' ({path})" if label is not None else f"{path}"
    what = "is a symbolic link to" if path.is_symlink() else "leads to"  # "../x" names
    raise CheckpointError(
        f"{who}: {what} '{target}', outside the model folder; "
        "refused (copy the file into the folder)"
    )


def check_folder(folder: Path, label: str, files: Iterable[Path] = ()) -> None:
    """Check every file of ``folder`` that the output may take (``COPIED_FILES``) and
    ``files`` (its weight files) with ``inside``; all problems together."""
    problems = []
    for path in [*(folder / n for n in COPIED_FILES), *files]:
        if not os.path.lexists(path):
            continue
        try:
            inside(path, folder, label)
        except CheckpointError as e:
            problems.extend(e.problems)
    if problems:
        raise CheckpointError(problems)
