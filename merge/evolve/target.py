"""The target model of in-memory merges and the sink that fills it.

``build_model`` makes one causal LM from a plan's output config (the config donor's config
class, the plan's output dtype), with its initialisation skipped: every tensor is overwritten
by the merge. ``check_target`` proves, before a merge, that the plan's output tensors and the
model's state dict match one to one (names, shapes, dtypes; a tied name such as ``lm_head``
may share the storage of a planned one). ``ParamSink`` is the ``merge.sink.TensorSink`` that
copies each cast output tensor or chunk into the model's storage, as ``ShardWriter`` writes it
to a shard.

What it does not do: rename tensors (checkpoint names must be the model's state-dict names),
resize embeddings, or load any weights itself.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Any

import torch

from merge.errors import PlanError
from merge.jobs import DTYPES, Plan
from merge.settings import remote_code
from merge.shardplan import TensorSpec
from merge.sink import check_part, check_whole

MAX_LISTED = 10


def build_model(p: Plan, device: str) -> Any:
    """The causal LM of ``p``'s output config on ``device``, in eval mode, weights not
    initialised (``merge`` overwrites them all)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    donor = p.models[p.donor].directory
    try:
        kind = type(AutoConfig.from_pretrained(donor, trust_remote_code=remote_code()))
        config = kind.from_dict(p.config)
    except (OSError, ValueError, KeyError) as e:
        raise PlanError(f"model '{p.donor}': cannot build the output config: {e}") from e
    with _no_init():
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[p.out_dtype], trust_remote_code=remote_code()
        )
    model.tie_weights()  # skipping the initialisation also skips the tying (transformers 5)
    return model.to(device).eval()


def _no_init() -> Any:
    """transformers' context that skips weight initialisation (its module moved in 5.x)."""
    import importlib

    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(where).no_init_weights()
        except (ImportError, AttributeError):  # pragma: no cover - another transformers
            continue
    return nullcontext()  # pragma: no cover


def _storage(t: torch.Tensor) -> tuple[int, tuple[int, ...], torch.dtype]:
    return (t.data_ptr(), tuple(t.shape), t.dtype)


def check_target(specs: dict[str, TensorSpec], slots: dict[str, torch.Tensor], what: str) -> None:
    """Raise PlanError listing every mismatch between the planned outputs ``specs`` and the
    model's state dict ``slots`` (``what`` names the model in messages)."""
    problems = []
    for name, spec in specs.items():
        slot = slots.get(name)
        if slot is None:
            problems.append(f"the plan outputs tensor '{name}', which {what} does not have")
        elif tuple(slot.shape) != spec.shape or slot.dtype != spec.dtype:
            problems.append(
                f"tensor '{name}': the plan outputs {spec.shape} {spec.dtype}, {what} has "
                f"{tuple(slot.shape)} {slot.dtype}"
            )
        elif not slot.is_contiguous():
            problems.append(f"tensor '{name}' of {what} is not contiguous")
    planned = {_storage(slots[n]) for n in specs if n in slots}
    for name, slot in slots.items():
        if name not in specs and _storage(slot) not in planned:
            problems.append(f"{what} has tensor '{name}', which the plan does not output")
    if problems:
        more = len(problems) - MAX_LISTED
        listed = problems[:MAX_LISTED] + ([f"... and {more} more"] if more > 0 else [])
        raise PlanError(listed)


class ParamSink:
    """Copies output tensors into ``slots`` (a model's state dict: tensors sharing its
    parameters' storage), from any thread; ``close`` raises if a planned element was not
    written. Shapes, dtypes and bounds are checked as ``ShardWriter`` checks them."""

    def __init__(self, slots: dict[str, torch.Tensor], specs: dict[str, TensorSpec]) -> None:
        self._flat = {name: slots[name].view(-1) for name in specs}
        self._specs = specs
        self._left = {name: slots[name].numel() for name in specs}
        self._lock = threading.Lock()
        self.done: dict[str, str] = {}
        self.written_bytes = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        check_whole(name, self._spec(name).shape, tensor)
        self.write_part(name, 0, tensor)

    def write_part(self, name: str, start: int, tensor: torch.Tensor) -> None:
        spec = self._spec(name)
        flat, n = self._flat[name], tensor.numel()
        check_part(name, spec.dtype, flat.numel(), start, tensor)
        with torch.no_grad():
            flat[start : start + n].copy_(tensor.reshape(-1))
        with self._lock:
            self._left[name] -= n
            self.written_bytes += n * spec.dtype.itemsize

    def finish(self, name: str) -> None:
        """Nothing to sync: the bytes are in the model."""

    def _spec(self, name: str) -> TensorSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise ValueError(f"tensor '{name}' is not in the plan")
        return spec

    def close(self) -> None:
        missing = [name for name, left in self._left.items() if left > 0]
        if missing:
            raise RuntimeError(
                f"in-memory merge incomplete: {len(missing)} tensors not written, such as "
                f"'{missing[0]}'"
            )
