"""LoRA adapters (PEFT format) applied to a base checkpoint while its tensors stream through.

Design
------
A recipe model ``base+adapter`` is the base checkpoint with each LoRA target weight ``W`` read
as ``W + B @ A * scaling``. ``LoraCheckpoint.open`` reads the adapter folder whole (it is small:
``adapter_config.json`` and ``adapter_model.safetensors`` or ``adapter_model.bin``), maps PEFT
tensor names to base tensor names, and checks everything against the base's headers before any
base tensor data is read: every target module exists, every shape fits, every option is one we
apply exactly as peft's ``merge_and_unload`` does. The ``LoraCheckpoint`` then shows the
planner the base's names, shapes, dtypes and config unchanged; ``read(name)`` reads that one
base tensor and, when the adapter touches it, returns the sum computed in float32 (no second
rounding here: the executor casts once, to the output dtype). ``read_range`` computes the same
sum on the rows a range covers only, so updated tensors stream: the delta is made in fixed
blocks of rows (``LORA_BLOCK`` entries, bounds from the shape only) by both, so a range holds
the bits of the whole tensor's (one matmul per block; BLAS need not give a row the same bits
in matmuls of different heights, though it did in every case measured here).

What the adapter may hold, and how it is applied (as peft does):

- ``<module>.lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]: ``W += B @ A * scaling``,
  transposed with ``fan_in_fan_out`` (GPT-2's Conv1D stores ``W`` as [in, out]).
- ``<module>.lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [dim, r]:
  ``W += (B @ A)^T * scaling``.
- any other tensor (``modules_to_save`` such as ``lm_head``, embeddings saved with
  ``save_embedding_layers``, biases trained with ``bias: all|lora_only``): replaces the base
  tensor of the same name (``.base_layer`` dropped); a LoRA delta is then added on top. With a
  tied lm_head, replacing the embeddings needs an equal lm_head (``ensure_weight_tying``);
  otherwise peft unties them, which a tied output cannot represent: refused.
- ``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` and
  ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` (first key matching the
  end of the module name on a dot boundary, as peft matches them).

What it does not do: resolve or download folders (``merge.sources``), write a merged copy or a
cache, or apply other PEFT methods or LoRA variants (DoRA, LoRA bias, aLoRA, trainable tokens,
target_parameters, layer replication, convolution LoRA, ...): each is refused by name.
"""

from merge.lora.adapter import (
    Adapter,
    LoraConfig,
    LoraPair,
    lora_delta,
    parse_key,
    read_adapter,
    read_config,
    read_weights,
)
from merge.lora.checkpoint import LoraCheckpoint

__all__ = [
    "Adapter",
    "LoraCheckpoint",
    "LoraConfig",
    "LoraPair",
    "lora_delta",
    "parse_key",
    "read_adapter",
    "read_config",
    "read_weights",
]
