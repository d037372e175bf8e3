"""Finite by construction (merge.finite): overflow of the output dtype and NaN/Inf made by the
merge are errors naming the tensor (exit 2, nothing written); NaN/Inf carried from an input is
a warning naming the tensor and model, an error under --strict-finite; integer tensors are
copied only when every model holds the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from _ckpt_utils import tiny_state_dict, write_safetensors
from merge import api
from merge.cli import app
from merge.errors import ComputeError
from tiny import load_state

runner = CliRunner()
Q = "model.layers.0.self_attn.q_proj.weight"
POS = "model.position_ids"


def model(tmp_path: Path, name: str, seed: int = 0, **set_: torch.Tensor) -> Path:
    sd = tiny_state_dict(seed)
    sd.update(set_)
    return write_safetensors(tmp_path / name, sd)


def recipe(tmp_path: Path, *models: Path, dtype: str | None = None, **extra: object) -> Path:
    doc: dict = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        "parameters": {"normalize": False},
        **extra,
    }
    if dtype:
        doc["dtype"] = dtype
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def fails(tmp_path: Path, *args: str | Path) -> str:
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", *map(str, args), str(out), "--quiet"])
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no leftovers
    return result.stderr


def test_fp16_overflow_is_an_error(tmp_path: Path) -> None:
    big = torch.full((16, 16), 40000.0)
    a, b = model(tmp_path, "a", 0, **{Q: big}), model(tmp_path, "b", 1, **{Q: big})
    err = fails(tmp_path, recipe(tmp_path, a, b, dtype="float16"))
    assert err == (
        f"error: tensor '{Q}': values up to 8e+04 overflow float16 (largest finite 6.55e+04); "
        "nothing was written; write the output as dtype: bfloat16 or dtype: float32\n"
    )


def test_fp16_overflow_of_a_copy(tmp_path: Path) -> None:
    """A passthrough of a float32 model into float16 overflows just the same."""
    a = model(tmp_path, "a", 0, **{Q: torch.full((16, 16), 1e6)})
    doc = {"merge_method": "passthrough", "models": [{"model": str(a)}], "dtype": "float16"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    err = fails(tmp_path, tmp_path / "r.yaml")
    assert f"tensor '{Q}': values up to 1e+06 overflow float16" in err


def test_nan_made_by_the_merge_is_an_error(tmp_path: Path) -> None:
    huge = torch.full((16, 16), 3e38)
    a, b = model(tmp_path, "a", 0, **{Q: huge}), model(tmp_path, "b", 1, **{Q: huge})
    err = fails(tmp_path, recipe(tmp_path, a, b, dtype="float32"))
    assert err == (
        f"error: tensor '{Q}': the merge gave 256 non-finite values (NaN/Inf) from models "
        f"'{a}', '{b}', whose values are all finite; nothing was written\n"
    )


def poisoned(tmp_path: Path) -> tuple[Path, Path]:
    q = tiny_state_dict(1)[Q].clone()
    q[0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    return model(tmp_path, "a", 0), model(tmp_path, "b", 1, **{Q: q})


@pytest.mark.parametrize("threads", [1, 2])
def test_nan_in_an_input_is_a_warning(tmp_path: Path, threads: int) -> None:
    a, b = poisoned(tmp_path)
    said: list[str] = []
    out = api.run(
        recipe(tmp_path, a, b), tmp_path / "out", progress=False, warn=said.append, threads=threads
    )
    carried = [w for w in said if "NaN/Inf" in w]
    assert carried == [
        f"tensor '{Q}': the inputs hold NaN/Inf values (3 in model '{b}'); merged as they "
        "are (--strict-finite makes this an error)"
    ]
    got = load_state(out)[Q]
    assert int((~torch.isfinite(got)).sum()) == 3


def test_nan_in_an_input_with_strict_finite_is_an_error(tmp_path: Path) -> None:
    a, b = poisoned(tmp_path)
    err = fails(tmp_path, recipe(tmp_path, a, b), "--strict-finite")
    assert err == (
        f"error: tensor '{Q}': the inputs hold NaN/Inf values (3 in model '{b}'); nothing was "
        "written (--strict-finite); fix or leave out those models\n"
    )


def test_inputs_are_checked_even_where_the_output_would_be_finite() -> None:
    """NaN/Inf that a method would mask out (a trimmed or dropped value) is reported too:
    inputs are checked before the merge, each model counted, the first report only."""
    from merge.finite import FiniteCheck

    bad = torch.ones(64, dtype=torch.bfloat16)
    bad[[3, 9]] = float("nan")
    bad[5] = float("-inf")
    chunks = lambda: iter([[("a", torch.ones(32)), ("b", bad[:32])], [("b", bad[32:])]])  # noqa: E731
    said: list[str] = []
    check = FiniteCheck(warn=said.append)
    check.inputs("t", chunks)
    check.inputs("t", chunks)  # once per tensor
    assert said == [
        "tensor 't': the inputs hold NaN/Inf values (3 in model 'b'); merged as they are "
        "(--strict-finite makes this an error)"
    ]
    with pytest.raises(ComputeError, match=r"tensor 't': the inputs hold NaN/Inf values \(3 in"):
        FiniteCheck(strict=True).inputs("t", chunks)
    FiniteCheck(strict=True, scan=False).inputs("t", chunks)  # not scanned: nothing to say
    FiniteCheck(strict=True).inputs("u", lambda: iter([[("a", torch.ones(8))]]))


def test_streamed_inputs_are_tallied_as_read_each_chunk_once() -> None:
    """A streamed tensor's inputs are checked as the merge reads them: counts add up over
    chunks, a chunk read again by a later pass counts once, the report comes at the end;
    under strict the first bad chunk is an error with the exact counts of every chunk."""
    from merge.finite import FiniteCheck

    bad = torch.ones(64, dtype=torch.bfloat16)
    bad[[3, 40, 41]] = float("nan")
    ok = torch.ones(64, dtype=torch.bfloat16)
    chunks = [[("a", ok[:32]), ("b", bad[:32])], [("a", ok[32:]), ("b", bad[32:])]]
    said: list[str] = []
    tally = FiniteCheck(warn=said.append).tally("t", lambda: iter(chunks))
    assert tally is not None
    for _ in range(2):  # two passes over the chunks
        tally(0, chunks[0])
        tally(32, chunks[1])
    assert said == []
    tally.done()
    assert said == [
        "tensor 't': the inputs hold NaN/Inf values (3 in model 'b'); merged as they are "
        "(--strict-finite makes this an error)"
    ]
    strict = FiniteCheck(strict=True).tally("t", lambda: iter(chunks))
    assert strict is not None
    with pytest.raises(ComputeError, match=r"\(3 in model 'b'\); nothing was written"):
        strict(0, chunks[0])
    assert FiniteCheck(scan=False).tally("t", lambda: iter(chunks)) is None


def test_whole_tensor_path_checks_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs read whole (no memory maps) are checked like streamed ones."""
    from merge import execute

    monkeypatch.setattr(execute, "streamed", lambda *a: False)
    big = torch.full((16, 16), 40000.0)
    a, b = model(tmp_path, "a", 0, **{Q: big}), model(tmp_path, "b", 1, **{Q: big})
    with pytest.raises(ComputeError, match=f"tensor '{Q}': values up to 8e\\+04 overflow"):
        api.run(recipe(tmp_path, a, b, dtype="float16"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_normal_merge_has_no_finite_warning(tmp_path: Path) -> None:
    a, b = model(tmp_path, "a", 0), model(tmp_path, "b", 1)
    said: list[str] = []
    api.run(recipe(tmp_path, a, b, dtype="float16"), tmp_path / "out", progress=False,
            warn=said.append, strict_finite=True)  # fmt: skip
    assert not [w for w in said if "NaN" in w or "overflow" in w]


# --- integer tensors ----------------------------------------------------------------------


def positions(offset: int = 0) -> torch.Tensor:
    return torch.arange(8, dtype=torch.int64).reshape(1, 8) + offset


def test_integer_tensors_that_agree_are_copied(tmp_path: Path) -> None:
    a = model(tmp_path, "a", 0, **{POS: positions()})
    b = model(tmp_path, "b", 1, **{POS: positions()})
    said: list[str] = []
    out = api.run(recipe(tmp_path, a, b), tmp_path / "out", progress=False, warn=said.append)
    got = load_state(out)[POS]
    assert got.dtype == torch.int64 and torch.equal(got, positions())
    assert not [w for w in said if "ignored" in w]  # b's tensor was read (compared), not unused


@pytest.mark.parametrize("whole", [False, True])
def test_integer_tensors_that_differ_are_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole: bool
) -> None:
    if whole:
        from merge import execute

        monkeypatch.setattr(execute, "streamed", lambda *a: False)
    a = model(tmp_path, "a", 0, **{POS: positions()})
    b = model(tmp_path, "b", 1, **{POS: positions(1)})
    with pytest.raises(ComputeError) as e:
        api.run(recipe(tmp_path, a, b), tmp_path / "out", progress=False)
    assert str(e.value) == (
        f"tensor '{POS}': the integer (int64) tensor of model(s) '{b}' differs from model "
        f"'{a}''s; integer tensors are copied, never averaged, only when all models agree bit "
        "for bit; nothing was written"
    )
    assert not (tmp_path / "out").exists()


def test_integer_tensors_that_differ_exit_2(tmp_path: Path) -> None:
    a = model(tmp_path, "a", 0, **{POS: positions()})
    b = model(tmp_path, "b", 1, **{POS: positions(1)})
    assert f"tensor '{POS}': the integer (int64) tensor" in fails(tmp_path, recipe(tmp_path, a, b))


@pytest.mark.parametrize("first", ["int", "float"])
def test_integer_and_float_dtypes_disagree_is_a_plan_error(tmp_path: Path, first: str) -> None:
    """Float bytes relabelled I32 in one model are never merged as integers (nor as floats)."""
    q = tiny_state_dict(1)[Q]
    relabelled = q.view(torch.int32)
    a = model(tmp_path, "a", 0, **({Q: relabelled} if first == "int" else {}))
    b = model(tmp_path, "b", 1, **({Q: relabelled} if first == "float" else {}))
    err = fails(tmp_path, recipe(tmp_path, a, b))
    ints, floats = (a, b) if first == "int" else (b, a)
    assert (
        f"tensor '{Q}': dtype {'float32' if first == 'int' else 'int32'} in model "
        f"'{b}' does not match {'int32' if first == 'int' else 'float32'} in model '{a}'; "
        "integer tensors are copied, never averaged, so every model must store them with the "
        "same dtype"
    ) in err
    assert ints != floats


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_finite_values_whose_sum_overflows_are_fine(tmp_path: Path, dtype: str) -> None:
    """The fast check is a float32 sum; finite values whose sum overflows are still written."""
    a = model(tmp_path, "a", 0, **{Q: torch.full((16, 16), 2e38)})
    doc = {"merge_method": "passthrough", "models": [{"model": str(a)}], "dtype": dtype}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    out = api.run(tmp_path / "r.yaml", tmp_path / "out", progress=False)
    got = load_state(out)[Q]
    assert bool(torch.isfinite(got).all()) and float(got.float().min()) > 1e38
