"""Generated hostile inputs (issue: reliability): hypothesis builds recipes of the right shape
with wrong values, types and keys, and safetensors headers mutated from a valid one, and runs
``merge validate`` on each in-process. Whatever it builds, the CLI exits 0 or 2 (never 1, a
bug), prints only ``error:``/``warning:`` lines (one line per problem, never a traceback) and
stays within a time and memory bound.

Derandomized: the same examples run on every machine, so CI is deterministic. More than one
error line is allowed for a generated recipe: it may hold several problems, and a phase
reports all of its problems together (DESIGN.md, principle 7); the corpus (``test_hostile.py``)
checks the one-problem, one-line cases.
"""

from __future__ import annotations

import json
import resource
import shutil
import struct
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from merge.cli import app

runner = CliRunner()
SETTINGS = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SECONDS = 5.0  # each example, also checked here (hypothesis' deadline reruns to be sure)
GROWTH_BYTES = 512 * 2**20  # peak resident memory may grow this much over the whole test
METHODS = ["linear", "ties", "dare_ties", "della", "slerp", "karcher", "task_arithmetic",
           "passthrough", "model_stock", "nuslerp", "sce", "ram", "breadcrumbs"]  # fmt: skip
PARAMS = ["weight", "density", "epsilon", "lambda", "t", "gamma", "normalize", "rescale",
          "int8_mask", "max_iter", "tol", "select_topk", "scale", "k", "filter_wise"]  # fmt: skip


def numbers() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(10**40), max_value=10**40),
        st.sampled_from([0, 1, -1, 0.5, 1e-300, 1e39, 2**63, 10**400]),
    )


def values() -> st.SearchStrategy[Any]:
    leaf = st.one_of(
        numbers(), st.booleans(), st.none(), st.text(max_size=20), st.sampled_from(["", "\n\x1b"])
    )
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.sampled_from(["filter", "value", "x"]), inner, max_size=3),
        ),
        max_leaves=8,
    )


def params() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(
        st.one_of(st.sampled_from(PARAMS), st.text(max_size=8)), values(), max_size=4
    )


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` four times in five, else ``bad``: wrong enough to hit every check, right
    enough to get past the first one."""
    return st.integers(0, 4).flatmap(lambda i: bad if i == 0 else good)


def model_entries(models: list[str]) -> st.SearchStrategy[Any]:
    real = st.sampled_from(models)
    name = mostly(real, st.one_of(st.text(max_size=30), values()))
    entry = st.fixed_dictionaries({"model": name}, optional={"parameters": params()})
    return mostly(entry, values())


def recipes(models: list[str]) -> st.SearchStrategy[Any]:
    slices = st.lists(
        st.fixed_dictionaries(
            {
                "sources": st.lists(
                    st.fixed_dictionaries(
                        {"model": st.sampled_from(models)},
                        optional={"layer_range": st.lists(numbers(), max_size=3)},
                    ),
                    max_size=2,
                )
            }
        ),
        max_size=2,
    )
    recipe = st.fixed_dictionaries(
        {
            "merge_method": mostly(st.sampled_from(METHODS), values()),
            "models": mostly(st.lists(model_entries(models), min_size=1, max_size=3), values()),
        },
        optional={
            "base_model": mostly(st.sampled_from(models), values()),
            "parameters": params(),
            "unknown_key": values(),
            "dtype": mostly(st.sampled_from(["float16", "bfloat16", "float33"]), values()),
            "tokenizer": st.fixed_dictionaries(
                {},
                optional={"source": values(), "pad_to_multiple_of": numbers(), "tokens": values()},
            ),
            "chat_template": mostly(st.sampled_from(["chatml", "{% for %}", "{{ x }}"]), values()),
            "seed": mostly(st.integers(0, 2**64), numbers()),
        },
    )
    expert = st.fixed_dictionaries(
        {"source_model": st.sampled_from(models)},
        optional={
            "residual_scale": numbers(),
            "positive_prompts": st.lists(st.text(max_size=10), max_size=2),
        },
    )
    moe = st.fixed_dictionaries(
        {"base_model": st.sampled_from(models), "experts": st.lists(expert, max_size=3)},
        optional={
            "gate_mode": mostly(st.sampled_from(["random", "hidden", "psychic"]), values()),
            "experts_per_token": numbers(),
        },
    )
    sliced = st.fixed_dictionaries({"merge_method": st.sampled_from(METHODS), "slices": slices})
    # mostly merge recipes: one in ten each a MoE recipe, a slices recipe, not a mapping at all
    kinds = [moe, sliced, values()]
    return st.integers(0, 9).flatmap(lambda i: kinds[i] if i < 3 else recipe)


class Bounds:
    """Checks one CLI call: exit 0 or 2, only error/warning lines, time and memory bounds."""

    def __init__(self) -> None:
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.codes: list[int] = []

    def check(self, args: list[str]) -> None:
        start = time.perf_counter()
        result = runner.invoke(app, args)
        took = time.perf_counter() - start
        out = result.stderr + result.stdout
        assert "Traceback" not in out, out
        assert result.exit_code in (0, 2), (result.exit_code, result.stderr, result.exception)
        lines = result.stderr.strip().splitlines()
        assert all(line.startswith(("error: ", "warning: ")) for line in lines), result.stderr
        errors = [line for line in lines if line.startswith("error: ")]
        self.codes.append(result.exit_code)
        assert bool(errors) == (result.exit_code == 2), result.stderr
        assert took < SECONDS, f"{took:.1f} s"
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.rss
        assert grown < GROWTH_BYTES, f"peak memory grew by {grown / 2**20:.0f} MiB"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_generated_recipes(work: Path, llama_base: Path, llama_ft1: Path) -> None:
    bounds = Bounds()
    recipe = work / "recipe.yaml"

    @SETTINGS
    @given(recipes([str(llama_base), str(llama_ft1)]))
    def one(doc: Any) -> None:
        recipe.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), "utf-8")
        bounds.check(["validate", str(recipe)])

    one()
    assert {0, 2} <= set(bounds.codes)  # the generator reaches valid recipes, and bad ones


# --- safetensors headers ---------------------------------------------------------------------


def json_values() -> st.SearchStrategy[Any]:
    leaf = st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=10),
        st.booleans(),
        st.none(),
        st.sampled_from(["F32", "F16", "BF16", "I32", "I64", "F8_E4M3", "F33"]),
    )
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=6,
    )


FIELDS = ["dtype", "shape", "data_offsets", "extra"]
Mutation = tuple[str, int, str, Any]
mutations = st.lists(
    st.tuples(
        st.sampled_from(["set", "delete", "rename", "metadata", "offset_by"]),
        st.integers(min_value=0, max_value=1000),
        st.sampled_from(FIELDS),
        json_values(),
    ),
    min_size=1,
    max_size=3,
)


def mutate(header: dict[str, Any], changes: list[Mutation]) -> dict[str, Any]:
    names = sorted(k for k in header if k != "__metadata__")
    for op, pick, field, value in changes:
        name = names[pick % len(names)]
        entry = header.get(name)
        if op == "set" and isinstance(entry, dict):
            entry[field] = value
        elif op == "delete":
            header.pop(name, None)
        elif op == "rename" and name in header:
            header[str(value)] = header.pop(name)
        elif op == "metadata":
            header["__metadata__"] = value
        elif op == "offset_by" and isinstance(entry, dict) and isinstance(value, int):
            entry["data_offsets"] = [o + value for o in entry["data_offsets"]]
    return header


def test_generated_headers(work: Path, llama_base: Path, llama_ft1: Path) -> None:
    bounds = Bounds()
    donor = Path(shutil.copytree(llama_base, work / "donor"))
    file = donor / "model.safetensors"
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    good, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    recipe = work / "header.yaml"
    models = [{"model": str(m), "parameters": {"weight": 1.0}} for m in (donor, llama_ft1)]
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))

    @SETTINGS
    @given(mutations, st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)))
    def one(changes: list[Mutation], length: int | None) -> None:
        header = mutate(json.loads(json.dumps(good)), changes)
        text = json.dumps(header, allow_nan=True).encode()
        prefix = struct.pack("<Q", len(text) if length is None else length)
        file.write_bytes(prefix + text + data)
        bounds.check(["validate", str(recipe)])

    one()
