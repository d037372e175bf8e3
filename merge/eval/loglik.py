"""Batched log-likelihoods of token sequences under a causal language model.

Design
------
``score(model, sequences)`` takes ``Scored(tokens, start)`` items: the model reads
``tokens[:-1]`` and the log-probabilities of ``tokens[start:]`` (each given every token before
it) are summed; ``start >= 1``. Sequences are sorted longest first and run ``batch_size`` at a
time, right-padded with an attention mask (the padding is never scored), in float32 log-softmax;
results come back in the input order. With each sum comes the number of tokens scored and
whether each of them was the model's argmax (lm-eval's ``is_greedy``).

``continuations(model, tokenizer, pairs)`` scores ``(context, continuation)`` strings as
lm-eval's ``loglikelihood`` does: the tokenizer encodes ``context`` and ``context +
continuation`` (with its special tokens, e.g. BOS), and the continuation is the tokens of the
whole past their common prefix with the context's, so a token merged across the boundary counts
as continuation. Longer than the model's positions (``max_length``), the whole is cut from the
left.

What it does not do: tokenize by hand, sample or generate (``merge.eval.tasks``), or pick
devices and dtypes (the model is used where and as it is).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Scored:
    """Score ``tokens[start:]``, each given the tokens before it."""

    tokens: list[int]
    start: int


@dataclass(frozen=True)
class LogLik:
    """A sequence's summed log-probability, its tokens scored, and whether all were argmax."""

    logprob: float
    tokens: int
    greedy: bool


def max_length(model: Any, tokenizer: Any = None) -> int:
    """The longest input the model takes: its config's position count, else the tokenizer's
    ``model_max_length`` when it is a real one, else 2048."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**8:
        return limit
    return DEFAULT_MAX_LENGTH


def _device(model: Any, device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def _batch(model: Any, items: Sequence[Scored], pad: int, device: torch.device) -> list[LogLik]:
    width = max(len(s.tokens) - 1 for s in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, s in enumerate(items):
        n = len(s.tokens) - 1
        ids[row, :n] = torch.tensor(s.tokens[:-1])
        mask[row, :n] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    out = []
    for row, s in enumerate(items):
        target = torch.tensor(s.tokens[s.start :])
        rows = logprobs[row, s.start - 1 : len(s.tokens) - 1]
        picked = rows.gather(1, target[:, None])[:, 0]
        greedy = bool((rows.argmax(dim=-1) == target).all())
        out.append(LogLik(float(picked.double().sum()), len(target), greedy))
    return out


def score(
    model: Any,
    sequences: Sequence[Scored],
    *,
    batch_size: int = 8,
    device: str | None = None,
    pad_id: int = 0,
    progress: Any = None,
) -> list[LogLik]:
    """The LogLik of each sequence, in order (see the module docstring). ``progress``: a
    tqdm-like object whose ``update(n)`` is called with the sequences done."""
    for s in sequences:
        if not 1 <= s.start < len(s.tokens):
            raise ValueError(f"start {s.start} outside 1..{len(s.tokens) - 1}")
    where = _device(model, device)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].tokens))
    results: list[LogLik | None] = [None] * len(sequences)
    for at in range(0, len(order), max(1, batch_size)):
        chunk = order[at : at + max(1, batch_size)]
        for i, r in zip(
            chunk, _batch(model, [sequences[i] for i in chunk], pad_id, where), strict=True
        ):
            results[i] = r
        if progress is not None:
            progress.update(len(chunk))
    return [r for r in results if r is not None]


def pad_id(tokenizer: Any) -> int:
    """A token id to pad with (never scored): the pad, EOS or BOS token's, else 0."""
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def encode(tokenizer: Any, text: str) -> list[int]:
    """``text``'s token ids as the tokenizer gives them, special tokens included."""
    return list(tokenizer(text, verbose=False)["input_ids"])  # long ones are windowed


def continuation_sequence(tokenizer: Any, context: str, continuation: str, limit: int) -> Scored:
    """The Scored item of ``continuation`` after ``context`` (see the module docstring)."""
    ctx = encode(tokenizer, context)
    whole = encode(tokenizer, context + continuation)
    common = 0
    while common < min(len(ctx), len(whole) - 1) and ctx[common] == whole[common]:
        common += 1
    if common == 0:  # nothing before the continuation: a start token is its context
        whole = [start_token(tokenizer), *whole]
        common = 1
    cut = max(0, len(whole) - (limit + 1))
    return Scored(whole[cut:], max(1, common - cut))


def start_token(tokenizer: Any) -> int:
    """The token put before a text with no context: BOS, else EOS (as lm-eval does)."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return pad_id(tokenizer)


def continuations(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    device: str | None = None,
    progress: Any = None,
) -> list[LogLik]:
    """The LogLik of each ``(context, continuation)``'s continuation, in order."""
    limit = max_length(model, tokenizer)
    items = [continuation_sequence(tokenizer, c, x, limit) for c, x in pairs]
    return score(
        model,
        items,
        batch_size=batch_size,
        device=device,
        pad_id=pad_id(tokenizer),
        progress=progress,
    )
