"""``tokenizer.tokens``: resolve each override's ``source`` to the embedding row(s) it names.

Forms (mergekit's): a model reference, as text or as a mapping (that model's row of the same token),
``{kind: model_token, model: REF, token: TOKEN}`` or ``{..., token_id: ID}`` (that model's row
of another token, or of an id), and ``{kind: zero}`` (a zero row). ``force: true`` applies the
row to every model, not only to those lacking the token. The model must be one of the recipe's
(a reference without ``@revision`` matches the recipe's model with one). Every problem is one
line with the recipe line of the override.

What it does not do: mergekit's ``token_average`` embedding (not in its current syntax either).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from merge.recipe.refs import is_ref_mapping, ref_text
from merge.sources import ModelRef
from merge.vocab.align import ModelVocab, Override, RowSource

if TYPE_CHECKING:  # pragma: no cover
    from merge.recipe import Recipe
    from merge.recipe.yamlsrc import PathKey

SOURCE_FORMS = (
    "must be a model reference, {kind: model_token, model: REF, token: TOKEN} (or token_id: "
    "ID) or {kind: zero}"
)


def match_ref(text: str, refs: list[str]) -> str | None:
    """The recipe model ``text`` names: the same reference, or the only one with the same
    path when ``text`` gives no revision."""
    if text in refs:
        return text
    try:
        want = ModelRef.parse(text)
    except ValueError:
        return None
    found = []
    for ref in refs:
        have = ModelRef.parse(ref)
        if have.path == want.path and have.lora == want.lora and want.revision is None:
            found.append(ref)
    return found[0] if len(found) == 1 else None


def resolve_overrides(
    recipe: Recipe,
    vocab: Mapping[str, int],
    vocabs: Mapping[str, ModelVocab],
    refs: list[str],
    problems: list[str],
) -> dict[int, Override]:
    tokens = recipe.tokenizer.tokens if recipe.tokenizer else None
    out: dict[int, Override] = {}
    for token, spec in (tokens or {}).items():
        path: PathKey = ("tokenizer", "tokens", token)
        if spec.source is None:
            if spec.force:
                problems.append(
                    recipe.loc.error(path + ("force",), "force: true needs a source for the row")
                )
            continue
        ctx = _Where(recipe, path + ("source",), vocabs, refs, problems)
        sources = ctx.source(token, spec.source)
        if sources is not None:
            out[vocab[token]] = Override(sources, spec.force)
    return out


class _Where:
    """Resolves one override's ``source``, reporting problems at its recipe path."""

    def __init__(
        self,
        recipe: Recipe,
        path: PathKey,
        vocabs: Mapping[str, ModelVocab],
        refs: list[str],
        problems: list[str],
    ) -> None:
        self.recipe, self.path, self.vocabs, self.refs = recipe, path, vocabs, refs
        self.problems = problems

    def bad(self, sub: tuple[str, ...], message: str) -> None:
        self.problems.append(self.recipe.loc.error(self.path + sub, message))

    def model(self, text: Any, sub: tuple[str, ...]) -> str | None:
        try:
            text = ref_text(text)  # mergekit's mapping form of a reference, as text
        except ValueError as e:
            self.bad(sub, str(e))
            return None
        ref = match_ref(text, self.refs) if isinstance(text, str) else None
        if ref is None:
            self.bad(sub, f"{text!r} is not a model of this recipe ({', '.join(self.refs)})")
            return None
        return ref if ref in self.vocabs else None  # else its problem is reported already

    def source(self, token: str, source: Any) -> tuple[RowSource, ...] | None:
        if isinstance(source, str) or is_ref_mapping(source):
            ref = self.model(source, ())
            if ref is None:
                return None
            return self.token_row(ref, token, ())
        kind = source.get("kind") if isinstance(source, dict) else None
        if kind not in ("model_token", "zero"):
            self.bad((), SOURCE_FORMS)
            return None
        assert isinstance(source, dict)
        allowed = ("kind",) if kind == "zero" else ("kind", "model", "token", "token_id")
        unknown = [k for k in source if k not in allowed]
        if unknown:
            self.bad(
                (str(unknown[0]),), f"unknown key for kind {kind} (allowed: {', '.join(allowed)})"
            )
            return None
        return () if kind == "zero" else self.model_token(source)

    def model_token(self, source: dict[str, Any]) -> tuple[RowSource, ...] | None:
        ref = self.model(source.get("model"), ("model",))
        if ("token" in source) == ("token_id" in source):
            self.bad((), "kind model_token needs exactly one of token or token_id")
            return None
        if ref is None:
            return None
        if "token" in source:
            return self.token_row(ref, source["token"], ("token",))
        token_id = source["token_id"]
        rows = self.vocabs[ref].rows
        if not isinstance(token_id, int) or isinstance(token_id, bool) or not 0 <= token_id < rows:
            self.bad(
                ("token_id",),
                f"model '{ref}' has no token id {token_id!r} (its embedding has {rows} rows)",
            )
            return None
        return ((ref, token_id),)

    def token_row(self, ref: str, token: Any, sub: tuple[str, ...]) -> tuple[RowSource, ...] | None:
        row = self.vocabs[ref].keys.get(token) if isinstance(token, str) else None
        if row is None:
            self.bad(sub, f"model '{ref}' has no token {token!r}")
            return None
        return ((ref, row),)
