"""Tokenizer merging: the output vocabulary and the alignment of embedding rows into it.

``build`` decides the output vocabulary at plan time (tokenizer union, ``tokenizer_source``,
``pad_to_multiple_of``) and marks vocabulary tensors' jobs; ``overrides`` resolves
``tokenizer.tokens``; ``align`` holds the data and the executor's pure alignment step.
Tokenizer files themselves are read and written by ``merge.tokenizer``.
"""

from merge.vocab.align import Alignment, ModelVocab, Override, VocabPlan, align, model_rows
from merge.vocab.build import align_job, build_vocab, has_setting, size_mismatch, vocab_tensor
from merge.vocab.default import sizes_differ

__all__ = [
    "Alignment",
    "ModelVocab",
    "Override",
    "VocabPlan",
    "align",
    "align_job",
    "build_vocab",
    "has_setting",
    "model_rows",
    "size_mismatch",
    "sizes_differ",
    "vocab_tensor",
]
