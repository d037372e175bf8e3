"""``merge eval``: each built-in task against a hand computation on a tiny model, the card's
``model-index``, the command line and its errors.

The hand computations run the model on one unpadded sequence at a time and take the
log-softmax of the last position's logits, token by token; the library batches and pads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from merge.cli import app
from merge.errors import EvalError
from merge.eval import evaluate_loaded, parse_task
from merge.eval.loglik import continuations
from merge.eval.tasks import GenerateTask
from support import run_recipe
from tiny import make_tiny

runner = CliRunner()
WINDOW = 128  # the tiny config's max_position_embeddings

QUESTIONS = [
    {"prompt": "The sky is", "choices": ["blue", "green", "a very long answer"], "answer": 0},
    {"prompt": "Two plus two is", "choices": ["four", "five"], "answer": "five"},
    {"prompt": "Colors:", "choices": ["red", "red and blue", "x"], "answer": 2},
    {"prompt": "Q", "choices": ["yes", "no"], "answer": 1},
]
PROMPTS = ["Hello there", "Hello world", "A longer prompt", "Hi"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("eval") / "model", layers=2, hidden=32, seed=7)


@pytest.fixture(scope="module")
def loaded(tiny: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@torch.no_grad()
def next_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """log-softmax of the logits after ``ids`` (one unpadded sequence)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.double(), dim=-1)


def hand_continuation(model: Any, tok: Any, context: str, continuation: str) -> float:
    ctx = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    assert whole[: len(ctx)] == ctx  # this tokenizer does not merge across the boundary here
    return sum(
        float(next_logprobs(model, whole[:i])[whole[i]]) for i in range(len(ctx), len(whole))
    )


@pytest.fixture(scope="module")
def hand_sums(loaded: tuple[Any, Any]) -> dict[tuple[str, str], float]:
    """Each question's choices' log-likelihoods, by hand: (prompt, " " + choice) -> sum."""
    model, tok = loaded
    pairs = [(q["prompt"], " " + c) for q in QUESTIONS for c in q["choices"]]
    return {(c, x): hand_continuation(model, tok, c, x) for c, x in pairs}


def test_continuation_logliks_match_token_by_token(
    loaded: tuple[Any, Any], hand_sums: dict[tuple[str, str], float]
) -> None:
    model, tok = loaded
    pairs = list(hand_sums)
    got = continuations(model, tok, pairs, batch_size=3)  # padded batches of mixed lengths
    for (context, cont), result in zip(pairs, got, strict=True):
        assert result.logprob == pytest.approx(hand_sums[(context, cont)], abs=1e-4)
        assert result.tokens == len(tok(context + cont).input_ids) - len(tok(context).input_ids)


def test_choice_acc_and_acc_norm(
    loaded: tuple[Any, Any], hand_sums: dict[tuple[str, str], float], tmp_path: Path
) -> None:
    model, tok = loaded
    acc = norm = 0
    for q in QUESTIONS:
        sums = [hand_sums[(q["prompt"], " " + c)] for c in q["choices"]]
        answer = q["answer"] if isinstance(q["answer"], int) else q["choices"].index(q["answer"])
        acc += max(range(len(sums)), key=lambda i: sums[i]) == answer
        normed = [s / len(c) for s, c in zip(sums, q["choices"], strict=True)]
        norm += max(range(len(sums)), key=lambda i: normed[i]) == answer
    task = parse_task(f"choice:{write_jsonl(tmp_path / 'q.jsonl', QUESTIONS)}")
    got = task.evaluate(model, tok, batch_size=2)
    assert got == {"acc": acc / 4, "acc_norm": norm / 4, "n": 4.0}
    assert task.evaluate(model, tok, limit=1)["n"] == 1.0


@torch.no_grad()
def hand_perplexity(model: Any, tok: Any, docs: list[str]) -> tuple[float, float]:
    """(total NLL, tokens scored): each token after the first, given the tokens before it in
    its window of WINDOW inputs (one unpadded forward pass a window; a causal model's logits
    at position j are those of the prefix ending at j)."""
    nll, count = 0.0, 0
    for doc in docs:
        ids = tok(doc).input_ids
        assert ids[0] == tok.bos_token_id
        for start in range(0, len(ids) - 1, WINDOW):
            window = ids[start : start + WINDOW + 1]
            logits = model(input_ids=torch.tensor([window[:-1]])).logits[0]
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            for j, target in enumerate(window[1:]):
                nll -= float(logprobs[j, target])
                count += 1
    return nll, count


def test_perplexity_text_and_jsonl_with_windows(loaded: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = loaded
    docs = ["A short document.", "Another one,\nover two lines.", "word " * 70 + "end"]
    assert len(tok(docs[2]).input_ids) > WINDOW + 1  # two windows
    nll, count = hand_perplexity(model, tok, docs)
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    words = sum(len(d.split()) for d in docs)
    size = sum(len(d.encode()) for d in docs)
    for path in (text, jsonl):
        got = parse_task(f"perplexity:{path}").evaluate(model, tok, batch_size=2)
        assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
        assert got["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
        assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / size, rel=1e-5)
        assert got["n"] == 3.0


@torch.no_grad()
def hand_greedy(model: Any, tok: Any, prompt: str, steps: int) -> str:
    ids = tok(prompt).input_ids
    new: list[int] = []
    for _ in range(steps):
        token = int(next_logprobs(model, ids + new).argmax())
        if token == tok.eos_token_id:
            break
        new.append(token)
    return tok.decode(new, skip_special_tokens=True).split("\n", 1)[0]


def test_generate_exact_match(loaded: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = loaded
    steps = 5
    outputs = [hand_greedy(model, tok, p, steps) for p in PROMPTS]
    rows = [
        {"prompt": PROMPTS[0], "answer": "  " + outputs[0] + "\n"},  # compared after strip
        {"prompt": PROMPTS[1], "answer": outputs[1]},
        {"prompt": PROMPTS[2], "answer": outputs[2] + " and more"},
        {"prompt": PROMPTS[3], "answer": outputs[3]},
    ]
    task = parse_task(f"generate:{write_jsonl(tmp_path / 'g.jsonl', rows)}")
    assert isinstance(task, GenerateTask)
    task.max_new_tokens = steps
    got = task.evaluate(model, tok, batch_size=2)
    assert task.outputs == outputs
    assert got == {"exact_match": 0.75, "n": 4.0}


def test_evaluate_loaded_is_the_api_for_models_in_memory(
    loaded: tuple[Any, Any], tmp_path: Path
) -> None:
    model, tok = loaded
    path = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    results = evaluate_loaded(model, tok, [f"choice:{path}"], batch_size=4, limit=2)
    (only,) = results.results
    assert only.kind == "choice" and only.n == 2 and set(only.metrics) == {"acc", "acc_norm"}


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            '{"prompt": "p", "choices": ["a"], "answer": 3}\n',
            "q.jsonl:1: answer index 3 out of range",
        ),
        (
            '\n{"prompt": "p", "choices": ["a"], "answer": 0}\nnot json\n',
            "q.jsonl:3: not valid JSON",
        ),
        ('{"prompt": "p", "choices": [], "answer": 0}\n', "q.jsonl:1: field 'choices' must be"),
        ('{"prompt": "p", "choices": ["a"], "answer": "b"}\n', "q.jsonl:1: answer 'b' is not one"),
        ('{"choices": ["a"], "answer": 0}\n', "q.jsonl:1: field 'prompt' must be a string"),
        ("[1]\n", "q.jsonl:1: expected a JSON object, got list"),
    ],
)
def test_bad_choice_lines(loaded: tuple[Any, Any], tmp_path: Path, rows: str, message: str) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(rows, encoding="utf-8")
    with pytest.raises(EvalError, match=message.replace("[", r"\[")):
        parse_task(f"choice:{path}").evaluate(*loaded)


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, ["eval", *[str(a) for a in args]])
    return result.exit_code, result.stdout, result.stderr


def test_cli_table_json_and_limit(tiny: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", QUESTIONS)
    code, out, _ = cli(tiny, "--task", f"choice:{path}", "-q")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["task", "metric", "value", "n"]
    assert [r.split()[1] for r in rows] == ["acc", "acc_norm"] and rows[0].split()[3] == "4"
    code, out, _ = cli(tiny, "--task", f"choice:{path}", "--json", "--limit", "3", "-q")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == str(tiny)
    assert set(data["results"][f"choice:{path}"]) == {"acc", "acc_norm", "n"}
    assert data["results"][f"choice:{path}"]["n"] == 3


def test_cli_errors(tiny: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    cases = [
        (["--task", f"choice:{missing}"], f"error: task 'choice:{missing}': {missing}: task "),
        (["--task", "rouge:x"], "error: task 'rouge:x': unknown kind 'rouge'; use one of "),
        (["--task", "choice"], "error: task 'choice': expected KIND:ARG"),
        (["--task", "lm_eval:hellaswag"], "pip install 'mergesmith[eval]'"),
        (["--task", f"choice:{tiny / 'config.json'}", "--limit", "0"], "--limit must be at least"),
        (["--task", f"choice:{tiny / 'config.json'}", "--card"], "--card needs a merge output"),
    ]
    for args, message in cases:
        code, out, err = cli(tiny, *args)
        assert code == 2 and out == "", (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    code, _, err = cli(tmp_path / "absent", "--task", f"choice:{tiny / 'config.json'}")
    assert code == 2 and "local path not found" in err


def test_card_writes_model_index_and_keeps_the_manifest(tmp_path: Path, tiny: Path) -> None:
    out = run_recipe(
        tmp_path,
        {"merge_method": "linear", "models": [{"model": str(tiny), "parameters": {"weight": 1.0}}]},
    )
    questions = write_jsonl(tmp_path / "qa.jsonl", QUESTIONS)
    docs = tmp_path / "wiki.txt"
    docs.write_text("Some text.\n\nMore text here.\n", encoding="utf-8")
    code, out_json, err = cli(
        out, "-t", f"choice:{questions}", "-t", f"perplexity:{docs}", "--card", "--json"
    )
    assert code == 0, err
    results = json.loads(out_json)["results"]
    card = ModelCard.load(out / "README.md")
    found = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert found[("choice:qa.jsonl", "acc")] == results[f"choice:{questions}"]["acc"]
    assert found[("perplexity:wiki.txt", "perplexity")] == pytest.approx(
        results[f"perplexity:{docs}"]["perplexity"]
    )
    assert card.data.model_name == "out" and "## Evaluation" in card.text
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    # a second run replaces its task's metrics, keeps the others; merge card keeps them all
    assert cli(out, "-t", f"choice:{questions}", "--limit", "1", "--card", "-q")[0] == 0
    again = ModelCard.load(out / "README.md").data.eval_results
    assert len(again) == len(card.data.eval_results)
    printed = runner.invoke(app, ["card", str(out)]).stdout
    assert printed == (out / "README.md").read_text(encoding="utf-8")
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0


def test_lm_eval_bridge_with_a_stand_in_harness(
    loaded: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bridge wraps the loaded model in HFLM, runs simple_evaluate and keeps lm-eval's
    metric names without the filter suffix and without standard errors."""
    import sys
    import types

    calls: dict[str, Any] = {}

    class HFLM:
        def __init__(self, **kwargs: Any) -> None:
            calls["hflm"] = kwargs

    def simple_evaluate(**kwargs: Any) -> dict[str, Any]:
        calls["run"] = kwargs
        found = {"acc,none": 0.25, "acc_stderr,none": 0.1, "acc_norm,none": 0.5, "alias": "x"}
        return {"results": {"hellaswag": found}, "n-samples": {"hellaswag": {"effective": 7}}}

    harness = types.ModuleType("lm_eval")
    harness.simple_evaluate = simple_evaluate  # type: ignore[attr-defined]
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = HFLM  # type: ignore[attr-defined]
    for name, module in [("lm_eval", harness), ("lm_eval.models", models), (hf.__name__, hf)]:
        monkeypatch.setitem(sys.modules, name, module)
    model, tok = loaded
    results = evaluate_loaded(model, tok, ["lm_eval:hellaswag"], batch_size=3, limit=7)
    (only,) = results.results
    assert only.name == "lm_eval:hellaswag" and only.kind == "lm_eval" and only.n == 7
    assert only.metrics == {"acc": 0.25, "acc_norm": 0.5}
    assert calls["hflm"]["pretrained"] is model and calls["hflm"]["batch_size"] == 3
    assert calls["run"]["tasks"] == ["hellaswag"] and calls["run"]["limit"] == 7
