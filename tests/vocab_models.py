"""Tiny models with their own added tokens, and the expected embedding rows computed plainly.

Shared by the tokenizer tests: ``make_vocab_model`` writes a tiny Llama whose tokenizer has
extra tokens (ids from 512) and whose embeddings match; ``fill_row`` and ``aligned_rows``
write the fill rule out token by token, independently of ``merge.vocab``. ``EXTRAS``:

=====  =====  ======================================================================
model  rows   added tokens (ids from 512)
=====  =====  ======================================================================
A      513    ``<|tool|>`` (special)
B      515    ``<|im_start|>``, ``<|im_end|>`` (special), ``hello_world`` (normal)
C      514    ``<|im_end|>``, ``<|tool|>`` (special)
=====  =====  ======================================================================
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer

from tiny import make_tiny

EXTRAS = {
    "A": [("<|tool|>", True)],
    "B": [("<|im_start|>", True), ("<|im_end|>", True), ("hello_world", False)],
    "C": [("<|im_end|>", True), ("<|tool|>", True)],
}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def make_vocab_model(directory: Path, seed: int, extras: list[tuple[str, bool]], **kw) -> Path:
    """A tiny model whose tokenizer has ``extras`` added and whose embeddings match."""
    make_tiny(directory, seed=seed, layers=2, vocab=512 + len(extras), **kw)
    tok = AutoTokenizer.from_pretrained(directory)
    tok.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in extras])
    tok.save_pretrained(directory)
    assert len(tok) == 512 + len(extras)
    return directory


def vocab_of(directory: Path) -> dict[str, int]:
    return Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(with_added_tokens=True)


def fill_row(token: str, models: dict[str, tuple[dict[str, int], torch.Tensor]], base: str | None):
    """The fill rule, plainly: base's row, else the only one, else the mean, else zero."""
    have = [name for name, (vocab, _) in models.items() if token in vocab]
    rows = {name: models[name][1][models[name][0][token]] for name in have}
    if base in rows:
        return rows[base]
    if len(rows) == 1:
        return next(iter(rows.values()))
    if rows:
        return sum(rows.values()) / len(rows)
    return torch.zeros_like(next(iter(models.values()))[1][0])


def aligned_rows(out_vocab, models, base, overrides=None) -> dict[str, torch.Tensor]:
    """Each model's tensor moved into the output vocabulary (rows past the tokens: zero)."""
    overrides = overrides or {}
    size = max(out_vocab.values()) + 1
    result = {}
    for name, (vocab, tensor) in models.items():
        out = torch.zeros(size, tensor.shape[1])
        for token, row in out_vocab.items():
            if token in overrides and (overrides[token][1] or token not in vocab):
                out[row] = overrides[token][0]
            elif token in vocab:
                out[row] = tensor[vocab[token]]
            else:
                out[row] = fill_row(token, models, base)
        result[name] = out
    return result
