"""The vocabulary default of recipes without a tokenizer setting.

mergekit, given models whose vocabulary sizes differ (WizardMath's 32001 tokens beside
Llama-2's 32000, OpenHermes' two added chat tokens, Hermes-2-Pro's 32 more), silently merges
the common leading rows of the embeddings and the lm_head, and truncates the rest. Here the
same recipe, unedited, is merged as ``tokenizer_source: base`` would merge it: the output takes
the base model's tokenizer (else the first model's), and every model's embedding and lm_head
rows are moved to the output's rows by token before merging, with the fill rule of
``merge.vocab.align`` for tokens a model lacks. ``default_warning`` says so in one warning
naming the sizes, the tokens each model lacks (whose rows are filled) and the tokens dropped.

Models whose sizes agree keep today's row-by-row merge (no alignment, the same bits as
before). A model without tokenizer files cannot be matched by token: ``merge.vocab.build``
reports it, naming the sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from merge.vocab.align import Key, VocabPlan, model_rows

if TYPE_CHECKING:  # pragma: no cover
    from merge.sourceset import Model

LISTED = 5


def vocab_sizes(models: Mapping[str, Model]) -> dict[str, int | None]:
    """Each model's vocabulary size (``merge.vocab.model_rows``), None when unknown."""
    return {ref: model_rows(m.checkpoint.config, m.checkpoint.tensors) for ref, m in models.items()}


def sizes_differ(models: Mapping[str, Model]) -> bool:
    """True when the models' known vocabulary sizes are not all equal."""
    return len({n for n in vocab_sizes(models).values() if n is not None}) > 1


def sizes_text(sizes: Mapping[str, int | None]) -> str:
    """``vocabulary sizes differ (32000 in model 'a', 32001 in model 'b')``."""
    listed = ", ".join(f"{n} in model '{ref}'" for ref, n in sizes.items() if n is not None)
    return f"vocabulary sizes differ ({listed})"


def _listed(tokens: Sequence[Key]) -> str:
    named = [repr(t) for t in tokens if isinstance(t, str)]
    spare = len(tokens) - len(named)
    text = ", ".join(named[:LISTED]) + (" ..." if len(named) > LISTED else "")
    if spare:
        text += f"{' and ' if named else ''}{spare} unnamed row(s)"
    return text


def default_warning(vocab: VocabPlan, sizes: Mapping[str, int | None]) -> str:
    """The one warning of the default: the sizes, the output's tokenizer, and per model the
    output tokens it lacks (filled) and its tokens the output lacks (dropped)."""
    out = set(vocab.keys)
    notes = []
    for ref, mv in vocab.models.items():
        if ref == vocab.donor:
            continue
        lacks = [k for k in vocab.keys if k is not None and k not in mv.keys]
        extra = [k for k in mv.keys if k not in out]
        if lacks:
            notes.append(
                f"model '{ref}' lacks {len(lacks)} of the output's rows, filled from the base's "
                f"rows (else the other models'): {_listed(lacks)}"
            )
        if extra:
            notes.append(
                f"model '{ref}' has {len(extra)} row(s) the output lacks, dropped: {_listed(extra)}"
            )
    return (
        f"{sizes_text(sizes)} and the recipe sets no tokenizer: the output "
        f"takes the tokenizer of '{vocab.donor}' ({vocab.rows} rows), as tokenizer_source: base "
        "would, and every model's embedding and lm_head rows are matched to it by token"
        + "".join(f"; {n}" for n in notes)
    )
