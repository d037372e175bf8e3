"""Vocabulary data and embedding alignment: which row of which model fills each output row.

Alignment (``VocabPlan.alignment``, once per set of job models): each model's aligned tensor
takes, for every output row, the model's own row for that key; a model lacking the key takes
the *default row*: the override's source if there is one, else the fill rule (the base's row
if the base has the key, else the only model that has it, else the mean over the models that
have it, else zero with a warning). ``force: true`` gives every model the override's row.
When every model already has the output's vocabulary and nothing is overridden the alignment
is ``None`` and the job stays plain, so such recipes give the same bits as before.

``align`` is the executor's step: a pure function from each model's float32 tensor to its
aligned copy (no I/O, inputs never modified). ``align_rows`` makes a block of output rows
from the source rows it needs (a streamed vocabulary tensor, read by ranges): no statistics
pass is needed, since every default row is a sum of given rows times a scale.

What it does not do: read tokenizers or the recipe (``merge.vocab.build``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer
from torch import Tensor

from merge import architecture as arch

Key = str | int
RowSource = tuple[str, int]


def model_rows(config: dict[str, Any], tensors: Mapping[str, Any]) -> int | None:
    """A model's vocabulary size: ``vocab_size`` in its config (or ``text_config``), else the
    rows of its embedding tensor; None when neither exists."""
    for cfg in (config, config.get("text_config")):
        value = cfg.get("vocab_size") if isinstance(cfg, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    for name in (arch.embedding_name(tensors), *(head for head, _ in arch.TIED_PAIRS)):
        if name is not None and name in tensors and tensors[name].shape:
            return int(tensors[name].shape[0])
    return None


@dataclass(frozen=True)
class ModelVocab:
    """Which key each of a model's ``rows`` embedding rows holds (key -> row)."""

    rows: int
    keys: dict[Key, int]


def model_vocab(tokens: Mapping[str, int], rows: int) -> tuple[ModelVocab, list[str]]:
    """The vocabulary of a model with ``rows`` embedding rows and tokenizer ``tokens``, and
    the tokens whose id is past its rows (they count as missing)."""
    keys: dict[Key, int] = {}
    beyond = []
    for token, i in sorted(tokens.items(), key=lambda kv: kv[1]):
        if i < rows:
            keys[token] = i
        else:
            beyond.append(token)
    used = set(keys.values())
    keys.update({i: i for i in range(rows) if i not in used})
    return ModelVocab(rows, keys), beyond


@dataclass(frozen=True)
class Override:
    """``tokenizer.tokens.<token>``: the row(s) to use (none: a zero row), and for whom."""

    sources: tuple[RowSource, ...]
    force: bool


@dataclass(frozen=True)
class Alignment:
    """Per output row, each model's own row (-1: the default row), and how the default rows
    are made: ``fill[model] = (output rows, its rows)`` summed, then times ``scale``."""

    rows: int
    own: dict[str, Tensor]
    fill: dict[str, tuple[Tensor, Tensor]]
    scale: Tensor

    @property
    def extra(self) -> list[str]:
        """Models whose rows are needed only for default rows (override sources)."""
        return [m for m in self.fill if m not in self.own]


@dataclass
class VocabPlan:
    """The output vocabulary, decided at plan time."""

    source: str
    donor: str
    rows: int
    size: int
    keys: list[Key | None]
    models: dict[str, ModelVocab]
    overrides: dict[int, Override]
    tokenizer: Tokenizer | None
    added: list[tuple[int, AddedToken]]
    warnings: list[str] = field(default_factory=list)
    _cache: dict[tuple[tuple[str, ...], str | None], Alignment | None] = field(
        default_factory=dict, repr=False
    )

    def alignment(self, models: Sequence[str], base: str | None) -> Alignment | None:
        """How the tensors of ``models`` (a job's inputs and base) align; None: identity."""
        key = (tuple(dict.fromkeys(models)), base)
        if key not in self._cache:
            self._cache[key] = self._align(key[0], base)
        return self._cache[key]

    def _align(self, models: tuple[str, ...], base: str | None) -> Alignment | None:
        own = {m: [self._row(m, k) for k in self.keys] for m in models}
        fill: dict[str, tuple[list[int], list[int]]] = {}
        scale = [1.0] * self.rows
        missing = []
        for r, key in enumerate(self.keys):
            over = self.overrides.get(r)
            users = [m for m in models if own[m][r] < 0 or (over is not None and over.force)]
            if not users:
                continue
            sources = over.sources if over else _fill(models, own, r, base)
            if not sources and over is None and isinstance(key, str):
                missing.append(key)
            for m in users:
                own[m][r] = -1
            for m, row in sources:
                fill.setdefault(m, ([], []))[0].append(r)
                fill[m][1].append(row)
            scale[r] = 1.0 / len(sources) if sources else 1.0
        if missing:
            self.warnings.append(
                f"{len(missing)} output token(s) are in none of the models "
                f"{', '.join(repr(m) for m in models)} and get zero embedding rows: "
                + ", ".join(repr(t) for t in missing[:5])
                + (" ..." if len(missing) > 5 else "")
            )
        identity = list(range(self.rows))
        if all(own[m] == identity and self.models[m].rows == self.rows for m in models):
            return None
        return Alignment(
            self.rows,
            {m: torch.tensor(rows, dtype=torch.int64) for m, rows in own.items()},
            {m: (torch.tensor(o), torch.tensor(s)) for m, (o, s) in fill.items()},
            torch.tensor(scale, dtype=torch.float32),
        )

    def _row(self, model: str, key: Key | None) -> int:
        return -1 if key is None else self.models[model].keys.get(key, -1)


def _fill(
    models: Sequence[str], own: dict[str, list[int]], r: int, base: str | None
) -> tuple[RowSource, ...]:
    """The fill rule: the base's row, else the only one, else all (a mean), else none."""
    present = tuple((m, own[m][r]) for m in models if own[m][r] >= 0)
    for m, row in present:
        if m == base:
            return ((m, row),)
    return present


def align(al: Alignment, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each model's tensor (float32, rows = its vocabulary) moved into the output rows.

    ``tensors`` holds one tensor per model of ``al`` (``own`` and ``fill``); they are not
    modified. The result has one fresh float32 tensor per model of ``al.own``."""
    first = next(iter(tensors.values()))
    shape = (al.rows, *first.shape[1:])
    default = torch.zeros(shape, dtype=torch.float32)
    for m, (out_rows, src_rows) in al.fill.items():
        default.index_add_(0, out_rows, tensors[m].index_select(0, src_rows).float())
    default.mul_(al.scale.view(-1, *([1] * (len(shape) - 1))))
    aligned = {}
    for m, rows in al.own.items():
        t = default.clone()
        have = rows >= 0
        t[have] = tensors[m].index_select(0, rows[have]).float()
        aligned[m] = t
    return aligned


RowReader = Callable[[str, Tensor], Tensor]
"""``read(model, rows)``: those rows (int64 indices) of the model's tensor, as float32."""


def align_rows(al: Alignment, read: RowReader, r0: int, r1: int) -> dict[str, Tensor]:
    """Output rows ``[r0, r1)`` of ``align``'s result, reading only the source rows they take
    (``read``): per row the same copies, sums (in the same order) and scale, so the same bits
    as those rows of ``align``."""
    default: Tensor | None = None
    for m, (out_rows, src_rows) in al.fill.items():
        pick = (out_rows >= r0) & (out_rows < r1)
        if not bool(pick.any()):
            continue
        rows = read(m, src_rows[pick])
        if default is None:
            default = torch.zeros((r1 - r0, *rows.shape[1:]), dtype=torch.float32)
        default.index_add_(0, out_rows[pick] - r0, rows)
    aligned: dict[str, Tensor] = {}
    for m, own in al.own.items():
        block = own[r0:r1]
        have = block >= 0
        rows = read(m, block[have])
        if default is None:
            default = torch.zeros((r1 - r0, *rows.shape[1:]), dtype=torch.float32)
        if not aligned:
            default.mul_(al.scale[r0:r1].view(-1, *([1] * (default.dim() - 1))))
        t = default.clone()
        t[have] = rows
        aligned[m] = t
    return aligned
