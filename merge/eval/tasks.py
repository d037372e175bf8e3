"""The evaluation tasks: one ``Task`` protocol, the built-in tasks, and ``parse_task(spec)``.

A task spec is ``KIND:ARG``:

- ``perplexity:FILE``: a text file (documents separated by blank lines) or a JSONL file (a
  ``text`` field a line). Each document is tokenized whole (with the tokenizer's BOS, else BOS
  or EOS put before it) and every token after the first is scored, in non-overlapping windows
  of the model's positions: a window's first token is predicted from the last token of the
  window before, nothing earlier. Metrics: ``perplexity`` = exp(total NLL / tokens scored),
  ``word_perplexity`` = exp(total NLL / whitespace-separated words), ``bits_per_byte`` = total
  NLL / ln 2 / UTF-8 bytes. ``n`` counts documents.
- ``choice:FILE``: JSONL with ``prompt``, ``choices`` (strings) and ``answer`` (an index, or
  the text of one choice). Each choice is scored as the continuation ``" " + choice`` of the
  prompt (lm-eval's default target delimiter). ``acc``: the fraction whose highest summed
  log-likelihood is the answer; ``acc_norm``: the same with each sum divided by the choice's
  length in characters (lm-eval's ``acc_norm``). Ties go to the first choice.
- ``generate:FILE``: JSONL with ``prompt`` and ``answer``. Greedy decoding of up to
  ``max_new_tokens`` (32) tokens, stopped at EOS; the text is cut at its first newline.
  ``exact_match``: the fraction whose output ``.strip()`` equals the answer's ``.strip()``.
  Prompts of one token length are generated together, so no prompt is ever padded.
- ``lm_eval:NAME``: an lm-evaluation-harness task (``merge.eval.harness``, the ``eval``
  extra).

``limit`` keeps each task's first N documents or questions.

What it does not do: load models (``merge.eval.run``), print, or write cards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from merge.errors import EvalError
from merge.eval import data, loglik

KINDS = ("perplexity", "choice", "generate", "lm_eval")
DEFAULT_MAX_NEW_TOKENS = 32
CHOICE_DELIMITER = " "


@runtime_checkable
class Task(Protocol):
    """A scored task: ``evaluate`` returns each metric (by its lm-eval name) and ``n``."""

    name: str
    kind: str
    metrics: tuple[str, ...]

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        limit: int | None = None,
        device: str | None = None,
        progress: bool = False,
    ) -> dict[str, float]: ...


def _bar(total: int, name: str, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="seq", disable=not show, leave=False)


def _limited(items: list, limit: int | None) -> list:
    return items if limit is None else items[: max(0, limit)]


@dataclass
class PerplexityTask:
    """``perplexity:FILE`` (see the module docstring)."""

    path: Path
    name: str = ""
    kind: str = "perplexity"
    metrics: tuple[str, ...] = ("perplexity", "word_perplexity", "bits_per_byte")

    def __post_init__(self) -> None:
        self.name = self.name or f"perplexity:{self.path}"

    def evaluate(
        self, model: Any, tokenizer: Any, *, batch_size: int = 8, limit: int | None = None,
        device: str | None = None, progress: bool = False,
    ) -> dict[str, float]:  # fmt: skip
        docs = _limited(data.read_documents(self.path), limit)
        width = loglik.max_length(model, tokenizer)
        windows = [w for d in docs for w in document_windows(tokenizer, d, width)]
        with _bar(len(windows), self.name, progress) as bar:
            scores = loglik.score(
                model,
                windows,
                batch_size=batch_size,
                device=device,
                pad_id=loglik.pad_id(tokenizer),
                progress=bar,
            )
        nll = -sum(s.logprob for s in scores)
        tokens = sum(s.tokens for s in scores)
        words = sum(len(d.split()) for d in docs)
        size = sum(len(d.encode("utf-8")) for d in docs)
        return {
            "perplexity": math.exp(nll / max(1, tokens)),
            "word_perplexity": math.exp(nll / max(1, words)),
            "bits_per_byte": nll / math.log(2) / max(1, size),
            "n": float(len(docs)),
        }


def document_windows(tokenizer: Any, text: str, width: int) -> list[loglik.Scored]:
    """A document's non-overlapping windows of ``width`` model inputs, every token but the
    first scored once."""
    ids = loglik.encode(tokenizer, text)
    start = loglik.start_token(tokenizer)
    if not ids or ids[0] != getattr(tokenizer, "bos_token_id", None):
        ids = [start, *ids]
    if len(ids) < 2:
        ids = [*ids, start]
    return [loglik.Scored(ids[at : at + width + 1], 1) for at in range(0, len(ids) - 1, width)]


@dataclass(frozen=True)
class Question:
    prompt: str
    choices: list[str]
    answer: int


def read_questions(path: Path) -> list[Question]:
    """The questions of a ``choice:`` file; EvalError naming the line of a bad one."""
    questions = []
    for r in data.read_jsonl(path):
        choices = r.data.get("choices")
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            raise EvalError(f"{r.where}: field 'choices' must be a non-empty list of strings")
        answer = r.data.get("answer")
        if isinstance(answer, str):
            if answer not in choices:
                raise EvalError(f"{r.where}: answer {answer!r} is not one of the choices")
            answer = choices.index(answer)
        elif not isinstance(answer, int) or isinstance(answer, bool):
            raise EvalError(f"{r.where}: field 'answer' must be a choice index or choice text")
        elif not 0 <= answer < len(choices):
            raise EvalError(
                f"{r.where}: answer index {answer} out of range for {len(choices)} choices"
            )
        questions.append(Question(r.text("prompt"), choices, answer))
    return questions


@dataclass
class ChoiceTask:
    """``choice:FILE`` (see the module docstring)."""

    path: Path
    name: str = ""
    kind: str = "choice"
    metrics: tuple[str, ...] = ("acc", "acc_norm")

    def __post_init__(self) -> None:
        self.name = self.name or f"choice:{self.path}"

    def evaluate(
        self, model: Any, tokenizer: Any, *, batch_size: int = 8, limit: int | None = None,
        device: str | None = None, progress: bool = False,
    ) -> dict[str, float]:  # fmt: skip
        questions = _limited(read_questions(self.path), limit)
        pairs = [(q.prompt, CHOICE_DELIMITER + c) for q in questions for c in q.choices]
        with _bar(len(pairs), self.name, progress) as bar:
            scores = loglik.continuations(
                model, tokenizer, pairs, batch_size=batch_size, device=device, progress=bar
            )
        acc = norm = 0
        at = 0
        for q in questions:
            sums = [s.logprob for s in scores[at : at + len(q.choices)]]
            at += len(q.choices)
            acc += _argmax(sums) == q.answer
            norm += (
                _argmax([s / max(1, len(c)) for s, c in zip(sums, q.choices, strict=True)])
                == q.answer
            )
        n = max(1, len(questions))
        return {"acc": acc / n, "acc_norm": norm / n, "n": float(len(questions))}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


@dataclass
class GenerateTask:
    """``generate:FILE`` (see the module docstring)."""

    path: Path
    name: str = ""
    kind: str = "generate"
    metrics: tuple[str, ...] = ("exact_match",)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    outputs: list[str] = field(default_factory=list)  # the last run's outputs, for reports

    def __post_init__(self) -> None:
        self.name = self.name or f"generate:{self.path}"

    def evaluate(
        self, model: Any, tokenizer: Any, *, batch_size: int = 8, limit: int | None = None,
        device: str | None = None, progress: bool = False,
    ) -> dict[str, float]:  # fmt: skip
        records = _limited(data.read_jsonl(self.path), limit)
        items = [(r.text("prompt"), r.text("answer")) for r in records]
        with _bar(len(items), self.name, progress) as bar:
            self.outputs = generate(
                model,
                tokenizer,
                [p for p, _ in items],
                max_new_tokens=self.max_new_tokens,
                batch_size=batch_size,
                device=device,
                progress=bar,
            )
        hits = sum(o.strip() == a.strip() for o, (_, a) in zip(self.outputs, items, strict=True))
        return {"exact_match": hits / max(1, len(items)), "n": float(len(items))}


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    device: str | None = None,
    progress: Any = None,
) -> list[str]:
    """Each prompt's greedy continuation (up to ``max_new_tokens``, EOS stops it), decoded
    without special tokens and cut at the first newline."""
    where = loglik._device(model, device)
    encoded = [loglik.encode(tokenizer, p) for p in prompts]
    outputs = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    for length, group in sorted(by_length.items()):
        for at in range(0, len(group), max(1, batch_size)):
            chunk = group[at : at + max(1, batch_size)]
            batch = torch.tensor([encoded[i] for i in chunk], device=where)
            made = model.generate(
                input_ids=batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=loglik.pad_id(tokenizer),
            )
            for i, row in zip(chunk, made[:, length:].tolist(), strict=True):
                text = tokenizer.decode(row, skip_special_tokens=True)
                outputs[i] = text.split("\n", 1)[0]
            if progress is not None:
                progress.update(len(chunk))
    return outputs


def parse_task(spec: str) -> Task:
    """The task a spec names (``KIND:ARG``); EvalError listing the kinds for an unknown one.
    Files are read when the task is evaluated; a missing file is reported now."""
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise EvalError(f"task '{spec}': expected KIND:ARG with KIND one of {', '.join(KINDS)}")
    if kind == "lm_eval":
        from merge.eval.harness import HarnessTask

        return HarnessTask(arg)
    makers: dict[str, Callable[..., Task]] = {
        "perplexity": PerplexityTask,
        "choice": ChoiceTask,
        "generate": GenerateTask,
    }
    if kind not in makers:
        raise EvalError(f"task '{spec}': unknown kind '{kind}'; use one of {', '.join(KINDS)}")
    path = Path(arg).expanduser()
    if not path.is_file():
        raise EvalError(f"task '{spec}': {path}: task file not found")
    return makers[kind](path, name=spec)
