"""Generate the offline quick start assets under ``recipes/quickstart/``.

What it writes (deterministic, re-runnable; everything is rebuilt from scratch each run):

- ``tokenizer/``: a tiny byte-level BPE tokenizer (512 tokens, specials ``<s>``, ``</s>``,
  ``<unk>``, ``<pad>``) trained with the ``tokenizers`` library on a corpus generated here from
  fixed sentence templates, saved as a transformers fast tokenizer.
- ``base/``, ``chat/``, ``code/``: three tiny Llama checkpoints (hidden 32, 2 layers, bfloat16 on
  disk). ``chat`` and ``code`` are ``base`` plus small seeded Gaussian noise, standing in for two
  fine-tunes of one base model. Each carries the tokenizer and a ``generation_config.json``.

What it does not do: download anything, or produce a model that says anything sensible. The
weights are random; the point is a complete, loadable, few-hundred-KB example that
``merge run recipes/quickstart.yaml out/`` can merge in a second, offline.

The test suite (``tests/tiny.py``) reuses ``recipes/quickstart/tokenizer`` rather than retraining.

Usage: ``python scripts/make_quickstart.py [--out recipes/quickstart]``
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "recipes" / "quickstart"

VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)

# Fine-tunes as (name, noise seed, noise std). Base weights are initialised with std 0.02.
FINE_TUNES = [("chat", 1, 0.005), ("code", 2, 0.005)]

_SUBJECTS = ["the model", "a merge", "the recipe", "each layer", "the tokenizer", "our base"]
_VERBS = ["reads", "writes", "merges", "keeps", "checks", "streams", "plans", "loads"]
_OBJECTS = ["the weights", "every tensor", "a shard", "the config", "two models", "the index"]
_ENDINGS = [".", " quickly.", " before compute.", " in float32.", " on disk.", "!"]
_CHAT = [
    "User: Hello, how are you today?\nAssistant: I am fine, thank you. How can I help?",
    "User: What is a merge?\nAssistant: A merge combines the weights of several models.",
    "User: Can you explain TIES?\nAssistant: Trim, elect sign, then merge the agreeing parts.",
]
_CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import torch\nx = torch.zeros(4, 4)\ny = x @ x.T\n",
    "class Point:\n    def __init__(self, x: int, y: int) -> None:\n        self.x = x\n",
]


def corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    """Return a deterministic training corpus of template sentences, chat turns and code."""
    rng = random.Random(seed)
    text = [
        f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} "
        f"{rng.choice(_OBJECTS)}{rng.choice(_ENDINGS)}"
        for _ in range(lines)
    ]
    text += _CHAT * 50 + _CODE * 50
    text += [" ".join(str(rng.randrange(1000)) for _ in range(8)) for _ in range(200)]
    return text


def train_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=128,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    # transformers 5 records its own backend class name; the generic fast class name also
    # loads in transformers 4.x.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return fast


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """A greedy generation config with the tokenizer's special token ids."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )


def base_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised two-layer Llama sized to the tokenizer (float32)."""
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


@torch.no_grad()
def add_noise(model: LlamaForCausalLM, seed: int, std: float) -> LlamaForCausalLM:
    """Add seeded Gaussian noise to every parameter, in sorted name order."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        param.add_(torch.randn(param.shape, generator=gen) * std)
    return model


def save_checkpoint(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path
) -> None:
    """Save ``model`` as bfloat16 with a generation config and a copy of the tokenizer files.

    The tokenizer files are copied from the sibling ``tokenizer/`` folder, so every checkpoint
    carries byte-identical tokenizer files.
    """
    bf16 = LlamaForCausalLM(model.config).to(dtype=torch.bfloat16)  # type: ignore[call-arg]
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    bf16.config.dtype = torch.bfloat16
    bf16.generation_config = generation_config(tokenizer)
    bf16.save_pretrained(out_dir)
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copyfile(out_dir.parent / "tokenizer" / name, out_dir / name)


def build(out: Path) -> None:
    """Rebuild every quick start asset under ``out``."""
    hf_logging.disable_progress_bar()
    for name in ["tokenizer", "base", *(n for n, _, _ in FINE_TUNES)]:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(out / "tokenizer")
    base = base_model(tokenizer)
    save_checkpoint(base, tokenizer, out / "base")
    for name, seed, std in FINE_TUNES:
        tuned = base_model(tokenizer)
        add_noise(tuned, seed=seed, std=std)
        save_checkpoint(tuned, tokenizer, out / name)
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o644)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    build(args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
