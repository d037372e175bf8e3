"""The text of a model card (``README.md``): Hub front matter and a Markdown body.

Design: one pure function, :func:`model_card`, from the recipe text, the method's metadata,
the resolved inputs (manifest form: ref, source, repo, commit) and the card fields already
decided (``merge.card.facts``: license, language, datasets, pipeline tag, tags) to Markdown.
The front matter is huggingface_hub's ``ModelCardData`` (``base_model``,
``base_model_relation: merge``, ``library_name``, ``pipeline_tag``, ``tags``, ``license``,
``language``, ``datasets``; ``model-index`` from ``merge eval --card`` results), so it is what the
Hub reads. The recipe is included verbatim and
the reproduction section names the lock when the output carries one.

What it does not do: read files, talk to the Hub, or decide a field (every value comes in).
Without ``inputs``, which references are Hub ids is decided from their spelling (``org/name``,
optionally ``@revision``); local paths and bare names are left out of ``base_model`` but still
listed in the body.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from merge.sources import ModelRef

HUB_URL = "https://huggingface.co"


def _parse(ref: str) -> ModelRef | None:
    try:
        return ModelRef.parse(ref)
    except ValueError:
        return None


def hub_id(ref: str) -> str | None:
    """The Hub repository id of a model reference, or None for a local path.

    A LoRA reference ``model+adapter`` counts as its model.
    """
    parsed = _parse(ref)
    return parsed.path if parsed is not None and parsed.is_hub else None


@dataclass(frozen=True)
class Fields:
    """The front matter's decided fields (``merge.card.facts`` makes them); None: left out."""

    license: str | None = None
    language: list[str] | None = None
    datasets: list[str] | None = None
    pipeline_tag: str | None = None
    tags: list[str] = field(default_factory=lambda: ["merge", "mergesmith"])
    # ``merge eval --card`` results (``merge.eval.card`` entries) and the model-index's name
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    model_name: str | None = None


def _data(ids: list[str], fields: Fields) -> ModelCardData:
    evaluated: dict[str, Any] = {}
    if fields.evaluations:
        from merge.eval.card import hub_results

        evaluated = {
            "eval_results": hub_results(fields.evaluations),
            "model_name": fields.model_name or "merged-model",
        }
    return ModelCardData(
        base_model=ids or None,
        base_model_relation="merge" if ids else None,
        library_name="transformers",
        pipeline_tag=fields.pipeline_tag,
        license=fields.license,
        language=fields.language,
        datasets=fields.datasets,
        tags=fields.tags,
        **evaluated,
    )


def _sides(ref: str) -> list[str]:
    """The input refs of a recipe reference: itself, or ``base`` and ``adapter`` of a LoRA."""
    parsed = _parse(ref)
    if parsed is None or parsed.lora is None:
        return [ref]
    return [str(parsed.base), str(parsed.lora)]


def _side_text(ref: str, entry: Mapping[str, Any] | None, local: bool) -> str:
    if entry is not None:
        if entry.get("source") == "hub":
            repo = entry["repo"]
            text = f"[{repo}]({HUB_URL}/{repo})"
            if entry.get("revision"):
                text += f", revision `{entry['revision']}`"
            return text + (f", commit `{entry['commit']}`" if entry.get("commit") else "")
        if entry.get("source") == "stage":
            return f"`{ref}` (an earlier stage of the recipe)"
        return f"`{ref}` (a local folder)"
    repo = None if local else hub_id(ref)
    parsed = _parse(ref)
    revision = parsed.revision if parsed is not None else None
    if repo is None:
        return f"`{ref}`"
    return f"[{repo}]({HUB_URL}/{repo})" + (f", revision `{revision}`" if revision else "")


def _model_line(
    ref: str, is_base: bool, local: bool, inputs: Mapping[str, Mapping[str, Any]]
) -> str:
    sides = _sides(ref)
    if len(sides) == 2 and not inputs:
        text = f"`{ref}`"
    else:
        texts = [_side_text(s, inputs.get(s), local) for s in sides]
        text = texts[0] if len(texts) == 1 else f"{texts[0]} with the LoRA adapter {texts[1]}"
    return f"- {text}" + (" (base model)" if is_base else "")


def _hub_ids(refs: list[str], inputs: Mapping[str, Mapping[str, Any]], local: Collection[str]):
    """The Hub repos of every input side, in recipe order, each once."""
    if inputs:
        found = [inputs[s].get("repo") for r in refs for s in _sides(r) if s in inputs]
        found = [r for r in found if r]
    else:
        found = [hub_id(r) for r in refs if r not in local]
    return list(dict.fromkeys(i for i in found if i is not None))


def _fenced(text: str, lang: str) -> str:
    """``text`` verbatim in a code fence longer than any backtick run inside it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text if text.endswith("\n") else text + "\n"
    return f"{fence}{lang}\n{body}{fence}\n"


def _count(n: int) -> str:
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def _reproducing(
    tool_version: str,
    seed: int,
    recipe_name: str,
    lock_name: str | None,
    local: Sequence[str] = (),
) -> str:
    if lock_name is None:
        how = (
            f"Save the recipe above as `{recipe_name}` and run (the Hub models resolve to "
            "their newest commits, so the result may differ):"
        )
        command = f"merge run {recipe_name}"
    else:
        how = (
            f"Download `{recipe_name}` and its lock `{lock_name}` from this repository and "
            "run (the lock pins every input's commit and file hashes):"
        )
        command = f"merge run --locked {recipe_name}"
    if local:
        names = ", ".join(f"`{ref}`" for ref in local)
        how += (
            f" The local inputs ({names}) are not on the Hub: put folders with the same files "
            "at the same paths beside the recipe first"
            + (" (the lock checks their hashes)." if lock_name is not None else ".")
        )
    return (
        f"## Reproducing\n\nMade with mergesmith {tool_version}, seed {seed}. {how}\n\n"
        + _fenced(f"pip install mergesmith=={tool_version}\n{command}", "sh")
    )


def model_card(
    *,
    recipe_text: str,
    method_name: str,
    method_paper: str | None,
    method_description: str,
    models: Sequence[str],
    base_model: str | None,
    tool_version: str,
    seed: int,
    dtype: str,
    num_params: int | None = None,
    extra_sections: Sequence[tuple[str, str]] = (),
    title: str | None = None,
    local_models: Collection[str] = (),
    inputs: Sequence[Mapping[str, Any]] = (),
    fields: Fields | None = None,
    recipe_name: str = "recipe.yaml",
    lock_name: str | None = None,
) -> str:
    """The README.md of a merged model: front matter, summary, models, recipe, how to
    reproduce.

    ``inputs`` are the manifest's resolved inputs (their ``source`` says which are Hub repos
    and their ``commit`` is shown); without them, ``local_models`` are references known to be
    local directories, never counted as Hub ids even when they look like ``org/name``.
    ``lock_name`` is the lock beside ``recipe_name`` in the output, when it carries one.
    """
    refs = list(dict.fromkeys(([base_model] if base_model else []) + list(models)))
    by_ref = {str(i["ref"]): i for i in inputs}
    ids = _hub_ids(refs, by_ref, local_models)
    method = f"[{method_name}]({method_paper})" if method_paper else method_name
    parts = [
        f"# {title or 'Merged model'}\n",
        f"This model is a merge of {len(refs)} pre-trained language models, made with `merge` "
        f"(mergesmith) using the {method} merge method.",
    ]
    if method_description.strip():
        parts.append(method_description.strip())
    facts = f"Output dtype: `{dtype}`."
    if num_params is not None:
        facts += f" Parameters: {_count(num_params)}."
    parts.append(facts)
    lines = [_model_line(ref, ref == base_model, ref in local_models, by_ref) for ref in refs]
    parts.append("## Models\n\n" + "\n".join(lines))
    for heading, body in extra_sections:
        parts.append(f"## {heading}\n\n{body.strip()}")
    parts.append(
        "## Configuration\n\nThe exact recipe used to produce this model:\n\n"
        + _fenced(recipe_text, "yaml").rstrip("\n")
    )
    local = [str(i["ref"]) for i in inputs if i.get("source") == "local"]
    if not inputs:
        local = [ref for ref in refs if ref in local_models]
    parts.append(_reproducing(tool_version, seed, recipe_name, lock_name, local))
    body = "\n\n".join(p.rstrip("\n") for p in parts) + "\n"
    data = _data(ids, fields or Fields())
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
