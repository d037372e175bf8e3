"""The last tensors that were read whole now stream (issue #16): vocabulary-aligned
embeddings, LoRA-updated tensors and MoE experts with ``noise_scale``.

- exactness: each streamed form equals its whole-tensor form bit for bit, at several chunk
  sizes, by construction: a vocabulary block is made row by row with the same copies and sums
  (``merge.vocab.align_rows``); a LoRA delta is computed in fixed row blocks (fixed by the
  shape) by both paths (``LoraPair.rows``); MoE noise is drawn in fixed blocks, each from its
  own generator (``merge.noise``). The executor's streamed bytes equal its whole-tensor path's
  (``--device cpu`` reads whole tensors) at every chunk size, thread count and budget tried.
- memory, per family: every job's estimated peak (the executor's own accounting,
  ``job_peak_bytes``, by which the scheduler admits jobs) fits a 64 KB budget, far below the
  largest tensor, no tensor is read whole, and the largest slice read is about one chunk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_lora import make_adapter
from test_parallel import shard_bytes

import merge.execute as execute
import merge.lora.adapter as adapter
import merge.memory as memory
import merge.methods.stream as stream
import merge.reads as reads
from merge import api, noise
from merge.checkpoint import Checkpoint
from merge.lora import LoraCheckpoint, LoraPair
from merge.memory import job_peak_bytes, streamed
from merge.noise import NOISE_BLOCK, noise_range
from merge.vocab import align
from merge.vocab.align import Alignment, align_rows
from support import cpu_and_device_bytes, run_recipe
from tiny import make_tiny
from vocab_models import EXTRAS, make_vocab_model

SIZES = (7, 96, 1000)
BUDGET = 64 * 1024


# --- the pieces, bit for bit --------------------------------------------------------------


def test_noise_ranges_equal_the_whole_draw() -> None:
    n = 3 * NOISE_BLOCK + 123
    whole = noise_range(42, n, 0, n)
    assert whole.shape == (n,) and 0.98 < float(whole.std()) < 1.02
    for size in (1000, NOISE_BLOCK, NOISE_BLOCK + 1, 2 * NOISE_BLOCK - 5):
        parts = [noise_range(42, n, a, min(a + size, n)) for a in range(0, n, size)]
        assert torch.equal(torch.cat(parts), whole), size
    assert not torch.equal(noise_range(43, n, 0, n), whole)
    blocks = whole[: 2 * NOISE_BLOCK].view(2, -1)
    assert not torch.equal(blocks[0], blocks[1])  # each block its own generator


@pytest.mark.parametrize("transpose", [False, True])
def test_lora_rows_equal_the_whole_delta(transpose: bool) -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(8, 300, generator=g), torch.randn(700, 8, generator=g)
    pair = LoraPair("m", a, b, 0.37, transpose)
    whole = pair.delta()
    assert whole.shape == pair.shape
    plain = (b @ a).T * 0.37 if transpose else (b @ a) * 0.37
    torch.testing.assert_close(whole, plain, rtol=1e-6, atol=1e-6)
    for step in (1, 7, 96, pair.block, pair.block + 3):
        for r0 in range(0, pair.shape[0], step):
            r1 = min(r0 + step, pair.shape[0])
            assert torch.equal(pair.rows(r0, r1), whole[r0:r1]), (step, r0)


def test_align_rows_equal_align() -> None:
    g = torch.Generator().manual_seed(5)
    xs = {"a": torch.randn(9, 4, generator=g), "b": torch.randn(6, 4, generator=g)}
    own = {
        "a": torch.tensor([0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1]),
        "b": torch.tensor([5, 4, -1, 3, -1, 2, 1, 0, -1, -1, -1, -1]),
    }
    fill = {
        "a": (torch.tensor([3, 7, 7, 2, 11]), torch.tensor([0, 1, 1, 4, 2])),
        "b": (torch.tensor([7, 2, 4, 8, 9]), torch.tensor([2, 0, 5, 5, 1])),
    }
    scale = torch.tensor([1, 1, 0.5, 1, 1, 1, 1, 1 / 3, 1, 1, 1, 1], dtype=torch.float32)
    al = Alignment(12, own, fill, scale)
    whole = align(al, xs)

    def rows(model: str, idx: torch.Tensor) -> torch.Tensor:
        return xs[model].index_select(0, idx)

    for step in (1, 2, 5, 12):
        for r0 in range(0, 12, step):
            block = align_rows(al, rows, r0, min(r0 + step, 12))
            for m in own:
                assert torch.equal(block[m], whole[m][r0 : r0 + step]), (step, r0, m)


def test_lora_read_range_equals_read(tmp_path: Path, llama_base: Path) -> None:
    adapter = make_adapter(
        tmp_path / "ad",
        llama_base,
        target_modules=["q_proj", "embed_tokens", "lm_head"],
        modules_to_save=["o_proj"],
    )
    ckpt = LoraCheckpoint.open(
        Checkpoint.open(llama_base, "b"), adapter, label="b+a", base_label="b", adapter_label="a"
    )
    touched = [*ckpt.adapter.pairs, *ckpt.adapter.replacements]
    assert len(touched) >= 4 and all(ckpt.can_range(n) and not ckpt.can_view(n) for n in touched)
    for name in touched:
        whole = ckpt.read(name).reshape(-1)
        for size in SIZES:
            parts = [ckpt.read_range(name, a, a + size) for a in range(0, whole.numel(), size)]
            assert torch.equal(torch.cat(parts), whole), (name, size)


# --- the executor: streamed bytes = whole-tensor bytes; memory per family -----------------


@pytest.fixture(scope="module")
def vocab_abc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wholes_vocab")
    return {n: make_vocab_model(root / n, 30 + i, EXTRAS[n]) for i, n in enumerate("ABC")}


def vocab_recipe(abc: dict[str, Path], method: str) -> dict[str, Any]:
    a, b, c = (str(abc[n]) for n in "ABC")
    tokens = {
        "<|im_start|>": {"source": {"kind": "model_token", "model": c, "token": "<|im_end|>"}},
        "<|tool|>": {"source": {"kind": "model_token", "model": a, "token_id": 5}, "force": True},
        "<|new|>": {},
    }
    params = {"ties": {"density": 0.5}, "della": {"density": 0.5, "epsilon": 0.1}}.get(method, {})
    rec: dict[str, Any] = {
        "merge_method": method,
        "base_model": a,
        "models": [
            {"model": m, "parameters": {"weight": w, **params}} for m, w in ((b, 0.6), (c, 0.4))
        ],
        "tokenizer": {"source": "union", "tokens": tokens, "pad_to_multiple_of": 8},
        "dtype": "bfloat16",
        "parameters": {"normalize": True} if method == "ties" else {},
    }
    if method == "linear":  # no base: rows missing from one model are the others' mean
        del rec["base_model"]
        rec["models"].append({"model": a, "parameters": {"weight": 0.3}})
    return rec


def lora_recipe(tmp_path: Path, base: Path) -> dict[str, Any]:
    ad1 = make_adapter(tmp_path / "ad1", base, seed=1, target_modules=["q_proj", "v_proj"])
    ad2 = make_adapter(
        tmp_path / "ad2", base, seed=2, target_modules=["o_proj", "embed_tokens", "lm_head"]
    )
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": f"{base}+{ad1}", "parameters": {"weight": 0.5, "density": 0.6}},
            {"model": f"{base}+{ad2}", "parameters": {"weight": 0.7, "density": 0.6}},
        ],
        "dtype": "bfloat16",
    }


def moe_recipe(tmp_path: Path) -> dict[str, Any]:
    src = make_tiny(tmp_path / "dense", "llama", seed=12)
    other = make_tiny(tmp_path / "dense2", "llama", seed=13)
    return {
        "base_model": str(src),
        "gate_mode": "random",
        "experts": [
            {"source_model": str(src), "noise_scale": 0.5},
            {"source_model": str(other), "noise_scale": 0.01, "residual_scale": 0.5},
        ],
        "seed": 7,
    }


class Reads:
    """The largest slice read by range, and the tensors read whole (inputs, copies)."""

    def __init__(self, monkeypatch: Any) -> None:
        self.largest = 0
        self.whole: list[str] = []
        flat_get, read_whole, copy = reads.Flat.__getitem__, execute.read_inputs, execute._copy

        def get(flat: Any, span: slice) -> torch.Tensor:
            self.largest = max(self.largest, span.stop - span.start)
            return flat_get(flat, span)

        def read_inputs(plan: Any, job: Any) -> Any:
            self.whole.append(job.name)
            return read_whole(plan, job)

        def whole_copy(plan: Any, job: Any) -> Any:
            self.whole.append(job.name)
            return copy(plan, job)

        monkeypatch.setattr(reads.Flat, "__getitem__", get)
        monkeypatch.setattr(execute, "read_inputs", read_inputs)
        monkeypatch.setattr(execute, "_copy", whole_copy)


def chunked(monkeypatch: Any, size: int, blocks: bool = False) -> None:
    """Chunks of ``size`` elements (and, with ``blocks``, LoRA and noise blocks to match)."""
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", size)
    monkeypatch.setattr(memory, "CHUNK_ELEMENTS", size)
    if not blocks:
        return
    # a LoRA delta's matmul blocks (64K elements) are a sixteenth of a real chunk: keep them
    # under the tiny chunks here too (both paths use the same blocks, whatever their size)
    monkeypatch.setattr(adapter, "LORA_BLOCK", max(size // 4, 1))
    monkeypatch.setattr(noise, "NOISE_BLOCK", size)  # the same for MoE noise blocks


def family_recipe(kind: str, tmp_path: Path, llama_base: Path, abc: dict[str, Path]) -> Any:
    if kind.startswith("vocab-"):
        return vocab_recipe(abc, kind.removeprefix("vocab-"))
    return lora_recipe(tmp_path, llama_base) if kind == "lora" else moe_recipe(tmp_path)


def interesting(kind: str, job: Any) -> bool:
    """The jobs of the family under test: vocabulary, LoRA-updated, noised."""
    if kind.startswith("vocab-"):
        return job.vocab is not None
    if kind == "lora":
        return not job.copy and ("proj" in job.name or "embed" in job.name or "lm_head" in job.name)
    return job.copy and job.noise != 0.0


KINDS = ["vocab-linear", "vocab-ties", "vocab-della", "vocab-nuslerp", "lora", "moe-noise"]


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_bytes_equal_the_whole_tensor_path_at_every_chunk_size(
    tmp_path: Path, kind: str, llama_base: Path, vocab_abc: dict[str, Path], monkeypatch: Any
) -> None:
    rec = family_recipe(kind, tmp_path, llama_base, vocab_abc)
    if kind == "vocab-nuslerp":
        rec["models"][0]["parameters"] = {"weight": 0.6}
        rec["models"][1]["parameters"] = {"weight": 0.4}
        rec["parameters"] = {"nuslerp_flatten": False}  # rows: no float64 sums across chunks
    whole = run_recipe(tmp_path, rec, "whole", threads=1, device="cpu")  # whole tensors
    for size, threads, budget in ((23, 2, BUDGET), (96, 1, None), (1000, 2, 10**9)):
        chunked(monkeypatch, size)
        got = run_recipe(tmp_path, rec, f"s{size}", threads=threads, max_memory=budget)
        assert shard_bytes(got) == shard_bytes(whole), (kind, size)


@pytest.mark.parametrize("kind", ["vocab-ties", "lora", "moe-noise"])
def test_memory_per_family_under_a_small_budget(
    tmp_path: Path, kind: str, llama_base: Path, vocab_abc: dict[str, Path], monkeypatch: Any
) -> None:
    rec = family_recipe(kind, tmp_path, llama_base, vocab_abc)
    chunk, budget = 96, BUDGET if kind != "moe-noise" else BUDGET // 8  # tiny experts
    chunked(monkeypatch, chunk, blocks=True)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    plan = api.plan(path)
    family = [j for j in plan.jobs if interesting(kind, j)]
    assert family and all(streamed(j, plan.models, plan.method) for j in family)
    peaks = {j.name: job_peak_bytes(j, plan.models, plan.method) for j in plan.jobs}
    largest = max(family, key=lambda j: j.numel)
    # the executor's own accounting: a few chunks (plus rows or LoRA blocks) per job, whatever
    # the tensor's size, while the largest tensor's inputs alone are far more
    assert max(peaks.values()) <= budget < 4 * largest.numel * (len(largest.inputs) + 1)
    reads = Reads(monkeypatch)
    run_recipe(tmp_path, rec, "small", threads=2, max_memory=budget)
    assert reads.whole == []  # nothing read whole
    widest = max(j.numel // j.shape[0] for j in family)
    assert reads.largest <= chunk + 2 * widest  # one chunk, rounded out to whole rows


@pytest.mark.parametrize("kind", ["lora", "moe-noise"])
def test_small_blocks_crossing_chunks_still_agree(
    tmp_path: Path, kind: str, llama_base: Path, vocab_abc: dict[str, Path], monkeypatch: Any
) -> None:
    """LoRA and noise blocks smaller than a tensor, so chunks start and end inside blocks."""
    rec = family_recipe(kind, tmp_path, llama_base, vocab_abc)
    monkeypatch.setattr(adapter, "LORA_BLOCK", 50)
    monkeypatch.setattr(noise, "NOISE_BLOCK", 50)
    whole = run_recipe(tmp_path, rec, "whole", threads=1, device="cpu")
    for size in (23, 96):
        chunked(monkeypatch, size)
        got = run_recipe(tmp_path, rec, f"s{size}", threads=2, max_memory=BUDGET)
        assert shard_bytes(got) == shard_bytes(whole), (kind, size)


@pytest.mark.parametrize("kind", ["vocab-ties", "lora"])
def test_the_device_path_gives_the_cpu_bytes_for_the_newly_streamed_inputs(
    tmp_path: Path, kind: str, llama_base: Path, vocab_abc: dict[str, Path], monkeypatch: Any
) -> None:
    """With a device (the simulated one of ``merge.device`` on CPU tensors): aligned
    vocabulary tensors run on the host's aligned tensors (never the raw rows), LoRA-updated
    inputs stream their rows to the device; both give the CPU executor's bytes. (Copies,
    noised or not, never go to the device: ``merge.device.vram.placement``.)"""
    chunked(monkeypatch, 96, blocks=True)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(family_recipe(kind, tmp_path, llama_base, vocab_abc)))
    cpu, device = cpu_and_device_bytes(path, tmp_path)
    assert cpu == device
