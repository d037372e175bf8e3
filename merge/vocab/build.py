"""Plan time: the output vocabulary from the recipe's tokenizer settings and the tokenizers.

Reads config, tensor headers and tokenizer files (``merge.tokenizer``), never tensor data, so
``merge validate`` and ``merge plan`` report every problem before a run; each is one line with
the recipe line of the setting at fault.

- A model's vocabulary maps each row of its embedding (``vocab_size`` in its config, else the
  embedding tensor's rows) to a *key*: the token whose id it is, or, for a row no token uses
  (spare rows of a padded embedding), the row's index. Tokens whose id is past the embedding
  count as missing from that model (with a warning).
- The output tokenizer: ``union`` extends the base's tokenizer (``base_model``, else the first
  model) with every token of the other models that it lacks, in recipe order, as added tokens
  keeping their ``special`` flag; ``base`` or a model reference takes that tokenizer. Tokens
  named under ``tokenizer.tokens`` that it lacks are added too, as mergekit does.
- Output rows: the tokenizer's ids, at least as many as the donor model's embedding rows, then
  rounded up to ``pad_to_multiple_of``; padding rows are zero.
- ``union`` needs every model's tokenizer files; other sources need the donor's, and a model
  without tokenizer files is taken to share the donor's vocabulary when its embedding has as
  many rows (with a warning), else it is an error.
- Planner helpers: which tensors are vocabulary tensors, the one-line error for models whose
  vocabularies differ without a tokenizer setting, and marking a job for alignment.

What it does not do: align tensors (``merge.vocab.align``) or write files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer

from merge import architecture as arch
from merge.jobs import Input, TensorJob, VocabAlign
from merge.tokenizer import extend_tokenizer, has_tokenizer, read_tokenizer
from merge.vocab.align import Key, ModelVocab, VocabPlan, model_rows, model_vocab
from merge.vocab.default import default_warning, sizes_text, vocab_sizes
from merge.vocab.overrides import resolve_overrides

if TYPE_CHECKING:  # pragma: no cover
    from merge.recipe import Recipe
    from merge.recipe.yamlsrc import PathKey
    from merge.sourceset import Model


def has_setting(recipe: Recipe) -> bool:
    """True when the recipe says anything about the tokenizer (then embeddings are aligned)."""
    return recipe.tokenizer is not None or recipe.schema.tokenizer_source is not None


def _source_path(recipe: Recipe) -> PathKey:
    return ("tokenizer", "source") if recipe.tokenizer is not None else ("tokenizer_source",)


class _Where:
    """Where a vocabulary problem is reported: the recipe's tokenizer setting, or (for the
    default of models whose vocabulary sizes differ, ``implicit``) the model's own line."""

    def __init__(self, recipe: Recipe, implicit: bool) -> None:
        self.recipe, self.implicit = recipe, implicit
        self.paths = recipe.ref_paths()

    def error(self, ref: str, message: str) -> str:
        path = self.paths.get(ref, ()) if self.implicit else _source_path(self.recipe)
        return self.recipe.loc.error(path, message)


def _read_all(
    models: Mapping[str, Model], union: bool, where: _Where, problems: list[str]
) -> dict[str, Tokenizer | None]:
    """Every model's tokenizer (None: it has no tokenizer files)."""
    found: dict[str, Tokenizer | None] = {}
    for ref, model in models.items():
        found[ref] = None
        if not has_tokenizer(model.directory):
            if union:
                problems.append(
                    where.error(
                        ref,
                        f"union needs every model's tokenizer, but model '{ref}' has no "
                        f"tokenizer files (tokenizer.json, tokenizer.model, ...) in "
                        f"{model.directory}",
                    )
                )
            continue
        try:
            found[ref] = read_tokenizer(model.directory)
        except ValueError as e:
            problems.append(where.error(ref, f"cannot read the tokenizer of model '{ref}': {e}"))
    return found


def _new_tokens(
    recipe: Recipe, toks: Mapping[str, Tokenizer | None], donor: str, union: bool
) -> list[AddedToken]:
    """Tokens the output adds to the donor's tokenizer, in order."""
    donor_tok = toks[donor]
    assert donor_tok is not None
    have = set(donor_tok.get_vocab(with_added_tokens=True))
    new: list[AddedToken] = []
    for ref, tok in toks.items():
        if not union or ref == donor or tok is None:
            continue
        decoder = tok.get_added_tokens_decoder()
        for token, i in sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda t: t[1]):
            if token not in have:
                have.add(token)
                new.append(decoder[i] if i in decoder else AddedToken(token))
    for token in (recipe.tokenizer.tokens or {}) if recipe.tokenizer else {}:
        if token not in have:
            have.add(token)
            new.append(AddedToken(token))
    return new


def _output_keys(
    vocab: Mapping[str, int], donor_rows: int, multiple: int | None
) -> list[Key | None]:
    """Key of every output row: tokens by id, unused ids and the donor's spare rows by index,
    padding (``pad_to_multiple_of``) as None."""
    size = max(vocab.values(), default=-1) + 1
    named = max(size, donor_rows)
    rows = -(-named // multiple) * multiple if multiple else named
    keys: list[Key | None] = [None] * rows
    for token, i in vocab.items():
        keys[i] = token
    for i in range(named):
        if keys[i] is None:
            keys[i] = i
    return keys


def _model_vocabs(
    models: Mapping[str, Model],
    toks: Mapping[str, Tokenizer | None],
    donor: str,
    union: bool,
    where: _Where,
    problems: list[str],
    warnings: list[str],
) -> dict[str, ModelVocab]:
    rows = {ref: model_rows(m.checkpoint.config, m.checkpoint.tensors) for ref, m in models.items()}
    vocabs: dict[str, ModelVocab] = {}
    for ref in sorted(models, key=lambda r: r != donor):  # the donor first
        n, tok = rows[ref], toks[ref]
        if n is None:
            problems.append(
                f"model '{ref}': cannot tell its vocabulary size (no vocab_size in its "
                "config.json and no embedding tensor)"
            )
        elif tok is not None:
            vocabs[ref], beyond = model_vocab(tok.get_vocab(with_added_tokens=True), n)
            if beyond:
                warnings.append(
                    f"model '{ref}': {len(beyond)} tokenizer token(s) have ids past its {n} "
                    f"embedding rows and count as missing from it: {beyond[0]!r}"
                )
        elif union:
            continue  # reported with the tokenizers
        elif donor in vocabs and n == vocabs[donor].rows:
            vocabs[ref] = vocabs[donor]
            if not where.implicit:  # without a setting, equal sizes are merged row by row
                warnings.append(
                    f"model '{ref}' has no tokenizer files; its {n} embedding rows are taken "
                    f"to follow the tokenizer of '{donor}'"
                )
        else:
            donor_rows = vocabs[donor].rows if donor in vocabs else rows[donor]
            sizes = f"{sizes_text(rows)}; " if where.implicit else ""
            problems.append(
                where.error(
                    ref,
                    f"{sizes}model '{ref}' has no tokenizer files, so its {n} embedding rows "
                    f"cannot be matched to the output vocabulary ('{donor}' has {donor_rows}) "
                    "by token",
                )
            )
    return vocabs


def build_vocab(
    recipe: Recipe,
    models: Mapping[str, Model],
    donor: str,
    problems: list[str],
    implicit: bool = False,
) -> VocabPlan | None:
    """The output vocabulary for a recipe with a tokenizer setting, or, ``implicit``, for a
    recipe without one whose models' vocabulary sizes differ (then the donor's tokenizer, as
    ``tokenizer_source: base``). ``donor`` is the model whose tokenizer the output starts
    from. None (with ``problems``) if it cannot be built."""
    before = len(problems)
    source = recipe.tokenizer_source or "base"
    union = source == "union"
    where = _Where(recipe, implicit)
    toks = _read_all(models, union, where, problems)
    if toks.get(donor) is None:
        if len(problems) == before:
            sizes = f"{sizes_text(vocab_sizes(models))}; " if implicit else ""
            problems.append(
                where.error(
                    donor,
                    f"{sizes}model '{donor}' has no tokenizer files to take the output "
                    "tokenizer from",
                )
            )
        return None
    warnings: list[str] = []
    vocabs = _model_vocabs(models, toks, donor, union, where, problems, warnings)
    new = _new_tokens(recipe, toks, donor, union)
    donor_tok = toks[donor]
    assert donor_tok is not None
    built = extend_tokenizer(donor_tok, new) if new else None
    vocab = (built or donor_tok).get_vocab(with_added_tokens=True)
    multiple = recipe.tokenizer.pad_to_multiple_of if recipe.tokenizer else None
    donor_rows = vocabs[donor].rows if donor in vocabs else 0
    keys = _output_keys(vocab, donor_rows, multiple)
    overrides = resolve_overrides(recipe, vocab, vocabs, list(models), problems)
    if len(problems) > before:
        return None
    plan = VocabPlan(
        source=source,
        donor=donor,
        rows=len(keys),
        size=max(vocab.values(), default=-1) + 1,
        keys=keys,
        models=vocabs,
        overrides=overrides,
        tokenizer=built,
        added=[(vocab[t.content], t) for t in new],
        warnings=warnings,
    )
    if implicit:
        plan.warnings.insert(0, default_warning(plan, vocab_sizes(models)))
    return plan


# --- planner helpers ----------------------------------------------------------------------------


def vocab_tensor(name: str, shape: Sequence[int], rows: int | None) -> bool:
    """A vocabulary tensor (embeddings, lm_head and its bias): outside the layers, not a
    norm, and its first dim is the model's vocabulary size ``rows``."""
    return arch.layer_of(name) is None and "norm" not in name and bool(shape) and shape[0] == rows


def size_mismatch(models: Mapping[str, Model]) -> str:
    """The one-line error for vocabularies that differ without a tokenizer setting."""
    sizes = []
    for ref, model in models.items():
        rows = model_rows(model.checkpoint.config, model.checkpoint.tensors)
        if rows is not None:
            sizes.append(f"{rows} in model '{ref}'")
    return (
        f"vocabulary sizes differ ({', '.join(sizes)}); set tokenizer_source: union (or base, "
        "or a model reference) to merge the embeddings and lm_head token by token"
    )


def align_job(
    vocab: VocabPlan,
    job: TensorJob,
    fill_base: str | None,
    models: Mapping[str, Model],
    has: Callable[[str, str], str | None],
    problems: list[str],
) -> TensorJob | None:
    """Mark a vocabulary tensor's job for alignment into the output rows (the job is left
    plain when every model already has the output vocabulary). ``has(model, name)`` finds a
    tensor (tied lm_head aware) for the models that only overrides read."""
    refs = [i.model for i in (*job.inputs, *([job.base] if job.base else []))]
    al = vocab.alignment(refs, fill_base)
    if al is None:
        return job
    extra = []
    for ref in al.extra:
        rows = vocab.models[ref].rows
        info = models[ref].checkpoint.tensors.get(has(ref, job.name) or "")
        if info is None or tuple(info.shape) != (rows, *job.shape[1:]):
            what = f"shape {list(info.shape)}" if info else "no such tensor"
            problems.append(
                f"model '{ref}' has {what} for '{job.name}', which a tokenizer.tokens "
                f"override reads (expected {[rows, *job.shape[1:]]})"
            )
            return None
        extra.append(Input(ref, info.name))
    job.shape = (al.rows, *job.shape[1:])
    job.vocab = VocabAlign(al, tuple(extra))
    return job
