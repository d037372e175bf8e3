"""The pieces of ``scripts/quality.py`` that make its models: tasks, data, tokenizer, training.

Four synthetic tasks over short digit strings, written as space-separated tokens:

    copy 3 9 1 =        ->  3 9 1
    rev 3 9 1 =         ->  1 9 3
    sort 3 9 1 =        ->  1 3 9
    add 4 7 + 2 5 =     ->  7 2

Each task has train, validation and test splits drawn from one seeded generator per (task,
split), so the files are the same on every run; the validation and test splits are disjoint
from each other and from what the training stream draws only by chance (the space is large).
The splits are written as ``generate:`` JSONL files (``prompt``, ``answer``) for
``merge.eval``.

The tokenizer is a ``tokenizers`` WordLevel model over the digits, the four task markers, ``+``,
``=`` and the specials ``<pad> <s> </s> <unk>``, split on whitespace, with ``<s>`` prepended by
its post-processor; it is saved with each model as a ``PreTrainedTokenizerFast`` so that
``AutoTokenizer.from_pretrained`` loads it. Decoding joins tokens with spaces, which is the
answers' own format.

The model is a tiny Llama (transformers ``LlamaConfig``, eager attention: on CPU at this size it
trains several times faster than sdpa). Training: AdamW, a constant learning rate after a short
warm-up, the loss on the answer tokens and the closing ``</s>`` only (the prompt is given). The
base is trained on a mixture of all four tasks, long enough to know the format and to be fair at
copy, reverse and sort (about 60 to 80%) but not at add; each fine-tune continues from the base
on its own task alone, at a sixth of the base's learning rate, until it is near 100% on it: a
fine-tune in the usual sense, a small step from a shared start, which is the setting that
merging methods assume. (In a first try, a base of 300 steps and fine-tunes at the base's
learning rate, every merge scored below the base, and most scored 0.) Everything is seeded, and
``torch.use_deterministic_algorithms`` holds while training.

What it does not do: merge or score models (``scripts/quality.py`` with ``merge.api`` and
``merge.eval``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

TASKS = ("copy", "rev", "sort", "add")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
VOCAB = (*SPECIALS, *(str(d) for d in range(10)), *TASKS, "+", "=")
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


@dataclass(frozen=True)
class Settings:
    """Everything that decides the trained models (their cache key is a hash of it)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    min_len: int = 3
    max_len: int = 6
    add_digits: int = 2
    base_steps: int = 1000
    finetune_steps: int = 300
    batch: int = 64
    lr: float = 3e-3
    finetune_lr: float = 5e-4
    warmup: int = 20
    seed: int = 0
    validation: int = 200
    test: int = 200
    version: int = 1  # bump when the training code changes what it makes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- tasks and data ---------------------------------------------------------------------------


def example(task: str, rng: random.Random, s: Settings) -> tuple[str, str]:
    """One (prompt, answer) of ``task``."""
    if task == "add":
        lo, hi = 10 ** (s.add_digits - 1), 10**s.add_digits - 1
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        return f"add {' '.join(str(a))} + {' '.join(str(b))} =", " ".join(str(a + b))
    digits = [str(rng.randrange(10)) for _ in range(rng.randint(s.min_len, s.max_len))]
    out = {"copy": digits, "rev": digits[::-1], "sort": sorted(digits)}[task]
    return f"{task} {' '.join(digits)} =", " ".join(out)


def split_rng(task: str, split: str, seed: int) -> random.Random:
    return random.Random(f"{seed}:{task}:{SPLIT_SEEDS[split]}")


def examples(task: str, split: str, n: int, s: Settings) -> list[tuple[str, str]]:
    """The first ``n`` examples of a split; the same on every call."""
    rng = split_rng(task, split, s.seed)
    return [example(task, rng, s) for _ in range(n)]


def write_splits(folder: Path, s: Settings) -> dict[str, dict[str, Path]]:
    """``folder/{task}-{split}.jsonl`` for the validation and test splits: {split: {task: path}}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, Path]] = {"validation": {}, "test": {}}
    for split, n in (("validation", s.validation), ("test", s.test)):
        for task in TASKS:
            path = folder / f"{task}-{split}.jsonl"
            lines = [json.dumps({"prompt": p, "answer": a}) for p, a in examples(task, split, n, s)]
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            paths[split][task] = path
    return paths


# --- tokenizer and model ----------------------------------------------------------------------


def make_tokenizer() -> Any:
    """The task tokenizer as a ``PreTrainedTokenizerFast`` (see the module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
    )


def make_model(s: Settings, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=s.hidden,
        intermediate_size=4 * s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attn_implementation="eager",  # on CPU, 7x faster to train than sdpa at this size
    )
    torch.manual_seed(s.seed)
    return LlamaForCausalLM(config)


# --- training ---------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def encode_batch(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> Batch:
    """Right-padded ``<s> prompt answer </s>`` rows, labelled on the answer and ``</s>``."""
    rows, masks = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        masks.append([False] * len(p) + [True] * len(a))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
        labels[i, : len(r)] = torch.where(torch.tensor(m), torch.tensor(r), -100)
    return Batch(ids, attention, labels)


@dataclass
class Run:
    """One training run: from a model, on a mixture of tasks, for a number of steps."""

    tasks: tuple[str, ...]
    steps: int
    seed: int
    lr: float
    losses: list[float] = field(default_factory=list)


def train(
    model: Any,
    tokenizer: Any,
    run: Run,
    s: Settings,
    log: Callable[[str], None] | None = None,
) -> Any:
    """Train ``model`` in place for ``run.steps`` steps; the model, in eval mode."""
    rng = random.Random(f"{s.seed}:train:{run.seed}:{','.join(run.tasks)}")
    torch.manual_seed(run.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / s.warmup))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    model.train()
    try:
        for step in range(run.steps):
            pairs = [example(rng.choice(run.tasks), rng, s) for _ in range(s.batch)]
            b = encode_batch(tokenizer, pairs)
            loss = model(
                input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels
            ).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            run.losses.append(loss.item())
            if log is not None and (step + 1) % 100 == 0:
                name = "+".join(run.tasks)
                log(f"  {name} step {step + 1}/{run.steps}: loss {run.losses[-1]:.4f}")
    finally:
        torch.use_deterministic_algorithms(previous)
    return model.eval()


def save(model: Any, tokenizer: Any, folder: Path) -> None:
    """A float32 Hugging Face checkpoint with its tokenizer and generation config."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.generation_config.do_sample = False
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
