"""The model card (``README.md``) written next to a merged checkpoint.

Design: one pure function, :func:`model_card`, from the recipe text and the method's metadata
to Markdown with YAML front matter that the Hugging Face Hub understands (``base_model``,
``base_model_relation: merge``, ``library_name``, ``tags``). The front matter is produced with
``yaml.safe_dump``, so odd model names are quoted rather than breaking the YAML. The recipe is
included verbatim so the card alone is enough to rebuild the model.

What it does not do: read files, talk to the Hub, resolve revisions or check that the models
exist. Which references are Hub ids is decided from their spelling (``org/name``, optionally
``@revision``); local paths and bare names (which could be either) are left out of
``base_model`` but still listed in the body.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

import yaml

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


def _front_matter(ids: list[str]) -> str:
    meta: dict[str, object] = {}
    if ids:
        meta["base_model"] = ids
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "mergesmith"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _model_line(ref: str, is_base: bool, local: bool = False) -> str:
    repo = None if local else hub_id(ref)
    parsed = _parse(ref)
    revision = parsed.revision if parsed is not None else None
    if repo is not None and "+" not in ref:
        text = f"[{repo}]({HUB_URL}/{repo})"
        if revision:
            text += f", revision `{revision}`"
    else:
        text = f"`{ref}`"
    return f"- {text}" + (" (base model)" if is_base else "")


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
) -> str:
    """The README.md of a merged model: front matter, models, recipe, how to reproduce.

    ``local_models`` are references known to be local directories: they never count as Hub
    ids, even when they look like ``org/name``.
    """
    refs = list(dict.fromkeys(([base_model] if base_model else []) + list(models)))
    hub_refs = [r for r in refs if r not in local_models]
    ids = list(dict.fromkeys(i for i in map(hub_id, hub_refs) if i is not None))
    method = f"[{method_name}]({method_paper})" if method_paper else method_name
    parts = [
        _front_matter(ids),
        f"# {title or 'Merged model'}\n",
        f"This model is a merge of pre-trained language models, made with `merge` "
        f"(mergesmith) using the {method} merge method.",
    ]
    if method_description.strip():
        parts.append(method_description.strip())
    facts = f"Output dtype: `{dtype}`."
    if num_params is not None:
        facts += f" Parameters: {_count(num_params)}."
    parts.append(facts)
    lines = [_model_line(ref, ref == base_model, ref in local_models) for ref in refs]
    parts.append("## Models\n\n" + "\n".join(lines))
    for heading, body in extra_sections:
        parts.append(f"## {heading}\n\n{body.strip()}")
    parts.append(
        "## Configuration\n\nThe exact recipe used to produce this model:\n\n"
        + _fenced(recipe_text, "yaml").rstrip("\n")
    )
    parts.append(
        f"## Reproducing\n\nMade with mergesmith {tool_version}, seed {seed}. "
        "Save the recipe above as `recipe.yaml` and run:\n\n"
        + _fenced(f"pip install mergesmith=={tool_version}\nmerge run recipe.yaml", "sh")
    )
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"
