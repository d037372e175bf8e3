"""Tokenizer merging: union vocabularies, token overrides, padding and embedding permutation.

Three tiny Llama models share the quick start tokenizer (512 tokens) plus their own added
tokens, with embeddings enlarged to match (``vocab_models.EXTRAS``: the table is there).

Expected embedding and lm_head rows are computed here, plainly, token by token from each
model's own tokenizer file, with the fill rule written out (``fill_row``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import AddedToken, Tokenizer
from torch.testing import assert_close
from transformers import AutoTokenizer
from typer.testing import CliRunner

from merge import api
from merge.cli import app
from merge.tokenizer import write_tokenizer
from merge.vocab import Alignment, align
from support import run_recipe
from tiny import assert_loads_and_generates, load_state, make_tiny
from vocab_models import EXTRAS, VOCAB_TENSORS, aligned_rows, make_vocab_model, vocab_of


@pytest.fixture(scope="module")
def abc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {
        name: make_vocab_model(root / name, 20 + i, EXTRAS[name]) for i, name in enumerate("ABC")
    }


def inputs(abc: dict[str, Path], names: str, tensor: str) -> dict:
    return {n: (vocab_of(abc[n]), load_state(abc[n])[tensor].float()) for n in names}


def linear(abc: dict[str, Path], weights: dict[str, float], **extra: object) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(abc[n]), "parameters": {"weight": w}} for n, w in weights.items()],
        **extra,
    }


def check_roundtrip(out: Path, specials: list[str]) -> dict[str, int]:
    """Texts with every special token encode and decode back; each is one id. Returns ids."""
    tok = AutoTokenizer.from_pretrained(out)
    ids = {}
    for special in specials:
        text = f"say {special} and hello_world{special}!"
        encoded = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(encoded) == text
        ids[special] = tok.convert_tokens_to_ids(special)
        assert encoded.count(ids[special]) == 2, (special, encoded)
    return ids


def test_union_linear(tmp_path: Path, abc: dict[str, Path]) -> None:
    weights = {"A": 0.5, "B": 0.3, "C": 0.2}
    recipe = linear(abc, weights, tokenizer_source="union", chat_template="chatml")
    out = run_recipe(tmp_path, recipe)
    out_vocab = vocab_of(out)
    # A's tokenizer, then B's missing tokens in B's id order; C adds nothing new.
    assert len(out_vocab) == 516
    assert [out_vocab[t] for t in ("<|tool|>", "<|im_start|>", "<|im_end|>", "hello_world")] == [
        512,
        513,
        514,
        515,
    ]
    ids = check_roundtrip(out, ["<|tool|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"])
    got = load_state(out)
    for name in VOCAB_TENSORS:
        rows = aligned_rows(out_vocab, inputs(abc, "ABC", name), base=None)
        want = sum(w * rows[n] for n, w in weights.items()) / sum(weights.values())
        assert got[name].shape == (516, 32)
        assert_close(got[name], want, msg=name)
        for special, i in ids.items():  # the id a special token encodes to is the row checked
            assert_close(got[name][i], want[out_vocab[special]])
    a, b, c = (load_state(abc[n]) for n in "ABC")
    inner = "model.layers.1.mlp.up_proj.weight"  # not a vocabulary tensor: plain linear
    assert_close(got[inner], 0.5 * a[inner] + 0.3 * b[inner] + 0.2 * c[inner])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 516
    assert (out / "generation_config.json").read_bytes() == (
        abc["A"] / "generation_config.json"
    ).read_bytes()
    tok = AutoTokenizer.from_pretrained(out)
    decoder = tok.added_tokens_decoder
    assert decoder[ids["<|im_start|>"]].special and decoder[ids["<|tool|>"]].special
    assert not decoder[out_vocab["hello_world"]].special
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert tok(chat, add_special_tokens=False)["input_ids"][0] == ids["<|im_start|>"]
    assert_loads_and_generates(out)
    again = run_recipe(tmp_path, recipe, "again")
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_union_task_arithmetic_uses_the_base_row(tmp_path: Path, abc: dict[str, Path]) -> None:
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(abc["A"]),
        "models": [
            {"model": str(abc["B"]), "parameters": {"weight": 0.7}},
            {"model": str(abc["C"]), "parameters": {"weight": -0.4}},
        ],
        "tokenizer": {"source": "union"},
    }
    out = run_recipe(tmp_path, recipe)
    out_vocab = vocab_of(out)
    got = load_state(out)
    for name in VOCAB_TENSORS:
        models = inputs(abc, "ABC", name)
        rows = aligned_rows(out_vocab, models, base="A")
        want = rows["A"] + 0.7 * (rows["B"] - rows["A"]) - 0.4 * (rows["C"] - rows["A"])
        assert_close(got[name], want, msg=name)
        # B lacks <|tool|>: it takes the base's row (C has one too, but the base wins).
        tool = out_vocab["<|tool|>"]
        assert_close(rows["B"][tool], models["A"][1][512])
    check_roundtrip(out, ["<|tool|>", "<|im_start|>", "<|im_end|>"])
    assert_loads_and_generates(out)


def test_overrides_and_padding(tmp_path: Path, abc: dict[str, Path]) -> None:
    a, b, c = (str(abc[n]) for n in "ABC")
    tokens = {
        "<|im_start|>": {"source": {"kind": "model_token", "model": c, "token": "<|im_end|>"}},
        "<|im_end|>": {"source": b, "force": True},
        "hello_world": {"source": {"kind": "zero"}},
        "<|tool|>": {"source": {"kind": "model_token", "model": a, "token_id": 5}, "force": True},
        "<|new|>": {},
    }
    recipe = linear(
        abc,
        {"A": 1.0, "B": 2.0, "C": 1.0},
        tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 8},
    )
    plan = api.plan(_write(tmp_path, recipe))
    assert any("'<|new|>'" in w and "zero embedding rows" in w for w in plan.warnings)
    out = run_recipe(tmp_path, recipe)
    out_vocab = vocab_of(out)
    assert len(out_vocab) == 517 and out_vocab["<|new|>"] == 516
    got = load_state(out)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 520
    for name in VOCAB_TENSORS:
        models = inputs(abc, "ABC", name)
        (_, ta), (vb, tb), (vc, tc) = models["A"], models["B"], models["C"]
        overrides = {
            "<|im_start|>": (tc[vc["<|im_end|>"]], False),
            "<|im_end|>": (tb[vb["<|im_end|>"]], True),
            "hello_world": (torch.zeros(32), False),
            "<|tool|>": (ta[5], True),
        }
        rows = aligned_rows(out_vocab, models, base=None, overrides=overrides)
        want = (rows["A"] + 2 * rows["B"] + rows["C"]) / 4
        assert got[name].shape == (520, 32)
        assert_close(got[name][:517], want, msg=name)
        assert not got[name][517:].any(), "padding rows are zero"
        assert not got[name][516].any(), "a token no model has is zero"
        assert_close(got[name][out_vocab["<|im_end|>"]], tb[vb["<|im_end|>"]])  # forced for all
        assert_close(got[name][out_vocab["<|tool|>"]], ta[5])
        # B keeps its own <|im_start|>; A and C take C's <|im_end|> row.
        start = (tc[vc["<|im_end|>"]] + 2 * tb[vb["<|im_start|>"]] + tc[vc["<|im_end|>"]]) / 4
        assert_close(got[name][out_vocab["<|im_start|>"]], start)
        assert_close(got[name][out_vocab["hello_world"]], 2 * tb[vb["hello_world"]] / 4)
    check_roundtrip(out, ["<|tool|>", "<|im_start|>", "<|im_end|>"])
    assert_loads_and_generates(out)


def _write(tmp_path: Path, recipe: dict, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_tokenizer_source_model_permutes_into_its_vocabulary(tmp_path: Path) -> None:
    """Tied Qwen2 models; the output takes B's tokenizer, A's rows are moved into it."""
    a = make_vocab_model(tmp_path / "qa", 30, EXTRAS["A"], arch="qwen2", tie=True)
    b = make_vocab_model(tmp_path / "qb", 31, EXTRAS["B"], arch="qwen2", tie=True)
    models = {"A": a, "B": b}
    (a / "generation_config.json").unlink()  # the donor has none: the next model's is carried
    out = run_recipe(tmp_path, linear(models, {"A": 0.6, "B": 0.4}, tokenizer_source=str(b)))
    assert vocab_of(out) == vocab_of(b)
    assert (out / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    name = "model.embed_tokens.weight"
    rows = aligned_rows(vocab_of(b), inputs(models, "AB", name), base=None)
    got = load_state(out)
    assert "lm_head.weight" not in got
    assert_close(got[name], 0.6 * rows["A"] + 0.4 * rows["B"])
    # A lacks B's added tokens: B's rows fill them; A's <|tool|> is not in the output.
    assert_close(got[name][512:], load_state(b)[name][512:])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 515 and config["tie_word_embeddings"] is True
    gen = (out / "generation_config.json").read_bytes()
    assert gen == (b / "generation_config.json").read_bytes()
    assert_loads_and_generates(out)


def test_override_rows_from_a_model_that_is_not_an_input(
    tmp_path: Path, abc: dict[str, Path]
) -> None:
    """C only gives the tokenizer and, through a forced override, the <|im_end|> rows."""
    c = str(abc["C"])
    tokens = {"<|im_end|>": {"source": c, "force": True}}
    recipe = linear(abc, {"A": 1.0, "B": 3.0}, tokenizer={"source": c, "tokens": tokens})
    code, stdout, stderr = cli("plan", _write(tmp_path, recipe))
    assert code == 0, stderr
    assert (
        "  lm_head.weight  [514x32]  m0 m1  weight=[1, 3] normalize=true  (rows permuted into "
        "the output vocabulary, override rows from m2)"
    ) in stdout.splitlines()
    out = run_recipe(tmp_path, recipe)
    assert vocab_of(out) == vocab_of(abc["C"])
    got = load_state(out)
    for name in VOCAB_TENSORS:
        models = inputs(abc, "AB", name)
        vc, tc = inputs(abc, "C", name)["C"]
        overrides = {"<|im_end|>": (tc[vc["<|im_end|>"]], True)}
        rows = aligned_rows(vocab_of(abc["C"]), models, base=None, overrides=overrides)
        assert_close(got[name], (rows["A"] + 3 * rows["B"]) / 4, msg=name)
        assert_close(got[name][513], models["A"][1][512])  # <|tool|>: only A has it
    assert_loads_and_generates(out)


def test_same_vocabulary_with_tokenizer_setting_is_unchanged(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    """Nothing to permute: the jobs stay plain and the output equals the plain merge."""
    plain = linear({"A": llama_base, "B": llama_ft1}, {"A": 1.0, "B": 3.0})
    plan = api.plan(_write(tmp_path, {**plain, "tokenizer": {"source": "union"}}))
    assert plan.vocab is not None and plan.vocab.rows == 512
    assert all(job.vocab is None for job in plan.jobs)
    one = run_recipe(tmp_path, plain, "plain")
    two = run_recipe(tmp_path, {**plain, "tokenizer_source": "union"}, "union")
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    assert (two / "generation_config.json").is_file()


runner = CliRunner()


def cli(*args: object) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def fails(recipe: Path, tmp_path: Path, command: str = "run") -> list[str]:
    """Exit 2, one line per problem, no traceback, nothing written."""
    out = tmp_path / "out"
    args = [command, recipe, out] if command == "run" else [command, recipe]
    code, stdout, stderr = cli(*args)
    assert code == 2, stderr
    assert "Traceback" not in stderr + stdout
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    return [line.removeprefix("error: ") for line in stderr.strip().splitlines()]


def test_plan_shows_permuted_embeddings_without_reading_tensors(
    tmp_path: Path, abc: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from merge.checkpoint import Checkpoint

    def forbidden(*args: object) -> None:
        raise AssertionError("plan read tensor data")

    monkeypatch.setattr(Checkpoint, "read", forbidden)
    recipe = _write(tmp_path, linear(abc, {"A": 1.0, "B": 1.0}, tokenizer_source="union"))
    code, stdout, stderr = cli("plan", recipe)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert (
        "tokenizer: union of the models' tokenizers: 516 tokens (3 added), 516 rows (inputs: "
        f"513 in '{abc['A']}', 515 in '{abc['B']}'), 2 tensor(s) permuted into it"
    ) in lines
    assert (
        "  model.embed_tokens.weight  [516x32]  m0 m1  weight=[1, 1] normalize=true  "
        "(rows permuted into the output vocabulary)"
    ) in lines
    code, stdout, _ = cli("plan", recipe, "--json")
    data = json.loads(stdout)
    assert data["vocab"]["rows"] == 516
    assert data["vocab"]["added"] == ["<|im_start|>", "<|im_end|>", "hello_world"]


def test_plan_time_tokenizer_errors(tmp_path: Path, abc: dict[str, Path]) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(abc["B"], bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    a, c = str(abc["A"]), str(abc["C"])
    text = f"""merge_method: linear
models:
  - model: {a}
    parameters: {{weight: 1}}
  - model: {bare}
    parameters: {{weight: 1}}
  - model: {c}
    parameters: {{weight: 1}}
tokenizer:
  source: union
  tokens:
    <|tool|>:
      source: ./elsewhere
    <|im_end|>:
      source: {{kind: model_token, model: {a}, token: "<|nope|>"}}
    hello_world:
      source: {{kind: model_token, model: {c}, token_id: 514}}
    <|im_start|>:
      source: {{kind: average}}
    x:
      force: true
"""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    tok = "tokenizer.tokens"
    assert fails(recipe, tmp_path, "validate") == [
        f"{recipe}:10: tokenizer.source: union needs every model's tokenizer, but model "
        f"'{bare}' has no tokenizer files (tokenizer.json, tokenizer.model, ...) in {bare}",
        f"{recipe}:13: {tok}.<|tool|>.source: './elsewhere' is not a model of this recipe "
        f"({a}, {bare}, {c})",
        f"{recipe}:15: {tok}.<|im_end|>.source.token: model '{a}' has no token '<|nope|>'",
        f"{recipe}:17: {tok}.hello_world.source.token_id: model '{c}' has no token id 514 (its "
        "embedding has 514 rows)",
        f"{recipe}:19: {tok}.<|im_start|>.source: must be a model reference, {{kind: "
        "model_token, model: REF, token: TOKEN} (or token_id: ID) or {kind: zero}",
        f"{recipe}:21: {tok}.x.force: force: true needs a source for the row",
    ]


def test_model_without_tokenizer_shares_the_donors_when_sizes_match(
    tmp_path: Path, llama_base: Path, llama_ft1: Path
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(llama_ft1, bare)
    (bare / "tokenizer.json").unlink()
    recipe = linear({"A": llama_base, "B": bare}, {"A": 1.0, "B": 1.0}, tokenizer_source="base")
    plan = api.plan(_write(tmp_path, recipe))
    assert f"model '{bare}' has no tokenizer files; its 512 embedding rows are taken to " in (
        "\n".join(plan.warnings)
    )
    assert all(job.vocab is None for job in plan.jobs)


def test_override_source_without_revision_matches_the_recipe_model() -> None:
    from merge.vocab.overrides import match_ref

    refs = ["org/a@main", "org/b", "./local"]
    assert match_ref("org/a", refs) == "org/a@main"
    assert match_ref("org/a@main", refs) == "org/a@main"
    assert match_ref("org/a@dev", refs) is None
    assert match_ref("org/c", refs) is None
    assert match_ref("./local", refs) == "./local"


# --- the alignment step on its own -------------------------------------------------------------


def test_align_is_pure_and_follows_the_index_maps() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(n, 3, generator=gen) for n in (4, 5, 2))
    before = [t.clone() for t in (x, y, z)]
    al = Alignment(
        rows=6,
        own={"x": torch.tensor([0, 1, 2, 3, -1, -1]), "y": torch.tensor([4, 3, 2, 1, 0, -1])},
        fill={
            "y": (torch.tensor([4]), torch.tensor([0])),
            "z": (torch.tensor([4]), torch.tensor([1])),
        },
        scale=torch.tensor([1, 1, 1, 1, 0.5, 1]),
    )
    out = align(al, {"x": x, "y": y, "z": z})
    for t, b in zip((x, y, z), before, strict=True):
        assert torch.equal(t, b), "inputs unchanged"
    mean = (y[0] + z[1]) / 2
    want_x = torch.stack([x[0], x[1], x[2], x[3], mean, torch.zeros(3)])
    want_y = torch.stack([y[4], y[3], y[2], y[1], y[0], torch.zeros(3)])
    assert_close(out["x"], want_x)
    assert_close(out["y"], want_y)
    assert set(out) == {"x", "y"} and al.extra == ["z"]


def test_write_tokenizer_lists_added_tokens_in_the_copied_configs(tmp_path: Path) -> None:
    donor = tmp_path / "donor"
    make_tiny(donor, layers=1)
    config = json.loads((donor / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"0": {"content": "<s>", "special": True}}
    (donor / "tokenizer_config.json").write_text(json.dumps(config))
    (donor / "added_tokens.json").write_text("{}")
    tok = Tokenizer.from_file(str(donor / "tokenizer.json"))
    new = AddedToken("<|x|>", special=True, normalized=False)
    tok.add_tokens([new])
    out = tmp_path / "out"
    out.mkdir()
    write_tokenizer(donor, out, "{{ x }}", tok, [(512, new)])
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["512"] == {
        "content": "<|x|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    assert config["chat_template"] == "{{ x }}"
    assert json.loads((out / "added_tokens.json").read_text()) == {"<|x|>": 512}
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|x|>") == 512


def test_override_sources_in_mapping_form(tmp_path: Path, abc: dict[str, Path]) -> None:
    """mergekit's mapping form of a model reference works in token overrides too."""
    b, c = str(abc["B"]), str(abc["C"])

    def plan_of(start: object, end: object) -> object:
        tokens = {
            "<|im_start|>": {
                "source": {"kind": "model_token", "model": start, "token": "<|im_end|>"}
            },
            "<|im_end|>": {"source": end, "force": True},
        }
        recipe = linear(
            abc, {"A": 1.0, "B": 1.0, "C": 1.0}, tokenizer={"source": "union", "tokens": tokens}
        )
        return api.plan(_write(tmp_path, recipe)).vocab

    text, mapping = plan_of(c, b), plan_of({"model": c}, {"model": {"path": b}})
    assert text is not None and mapping is not None
    assert mapping.overrides == text.overrides and len(text.overrides) == 2
