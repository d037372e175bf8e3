"""`merge methods [NAME]`: every registered method with its parameters, or one in detail."""

from __future__ import annotations

from typer.testing import CliRunner

from merge.cli import app
from merge.methods import METHODS, Method, Param, register, unregister
from merge.methods.docs import param_text

runner = CliRunner()


def test_lists_every_method_with_parameters_and_paper() -> None:
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    blocks = result.output.strip().split("\n\n")
    assert [b.split(":", 1)[0] for b in blocks] == sorted(METHODS)
    for block in blocks:
        method = METHODS[block.split(":", 1)[0]]
        for p in method.params:
            scope = "per-model" if p.per_model else "global"
            line = next(x for x in block.splitlines() if x.startswith(f"  {scope}: "))
            assert param_text(p).replace("`", "") in line, (method.name, p.name)
        if method.paper:
            assert f"paper: {method.paper}" in block


def test_one_method_in_detail() -> None:
    result = runner.invoke(app, ["methods", "ties"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("ties: ")
    assert "  per-model parameters:" in lines
    assert "    density (number in (0, 1], default 1.0): fraction of entries kept" in lines
    assert "  base model: required; models: 1 or more, plus the base" in lines


def test_choices_randomness_and_fixes_are_shown() -> None:
    def fn(tensors, base, params, rng):  # type: ignore[no-untyped-def]
        return tensors[0]

    method = Method(
        name="zz_test_method",
        fn=fn,
        params=(
            Param("mode", False, str, "a", choices=("a", "b"), help="which one"),
            Param("rescale", False, bool, True, choices=("l1",)),
        ),
        base="optional",
        min_models=2,
        max_models=2,
        paper=None,
        description="a test method",
        random=True,
        fixes="something mergekit gets wrong",
    )
    register(method)
    try:
        result = runner.invoke(app, ["methods", "zz_test_method"])
    finally:
        unregister("zz_test_method")
    assert result.exit_code == 0, result.output
    assert "    mode (a or b, default 'a'): which one" in result.output
    assert "    rescale (true, false or l1, default true)" in result.output
    assert "  base model: optional, task vectors when set; models: 2, plus an optional base" in (
        result.output
    )
    assert "  random: seeded per output tensor (recipe seed or --seed)" in result.output
    assert "  fix vs mergekit: something mergekit gets wrong" in result.output
    assert "paper:" not in result.output


def test_unknown_method_is_a_one_line_error() -> None:
    result = runner.invoke(app, ["methods", "tie"])
    assert result.exit_code == 2
    assert result.output.startswith(
        "error: unknown merge method 'tie' (did you mean 'ties'?); valid methods: "
    )
    assert result.output.count("\n") == 1
