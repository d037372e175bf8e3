"""Tiny stand-ins for the Hub models that mergekit's published recipes name, in an HF cache.

mergekit's examples and docs name real Hub models (``psmathur/orca_mini_v3_13b``, ...). To
run those recipes unchanged and offline, each name gets a tiny model with the same layout
where it matters: the architecture, the layer count that the recipes' ``layer_range`` values
rely on (40 for the Llama-2-13B family, 32 for Mistral-7B and Llama-3-8B), and the real
vocabulary quirks relative to their base (WizardMath adds ``[PAD]``, 32001 against Llama-2's
32000; OpenHermes-2.5 adds the two ChatML tokens; Hermes-2-Pro adds 32 tokens; Llama-3 has
its header tokens). Fine-tunes are their base plus seeded noise, so merges are meaningful.

``StandIns(root).cache(*repo_ids)`` builds the models a test needs (once per session) and
returns an HF cache folder in which each id resolves offline (``HF_HUB_CACHE``) to its
stand-in, through ``snapshot_download(local_files_only=True)`` like any cached model.
LoRA adapters (``predibase/magicoder``) are peft adapters of their base's stand-in.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import make_tiny

CHATML = ["<|im_start|>", "<|im_end|>"]
HERMES_PRO = CHATML + ["<tools>", "</tools>", "<tool_call>", "</tool_call>"]
HERMES_PRO += [f"<|reserved_{i}|>" for i in range(32 - len(HERMES_PRO))]
LLAMA3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@dataclass(frozen=True)
class Spec:
    """A stand-in: a base (``arch``, ``layers``) or a fine-tune of ``base``; ``tokens`` are
    added to its tokenizer (special) and its embeddings grown to match."""

    arch: str = "llama"
    layers: int = 2
    base: str | None = None
    tokens: tuple[str, ...] = ()
    tie: bool = False
    adapter_of: str | None = None


L2, M7, Q15 = "TheBloke/Llama-2-13B-fp16", "mistralai/Mistral-7B-v0.1", "Qwen/Qwen2.5-1.5B-Instruct"
SPECS: dict[str, Spec] = {
    L2: Spec("llama", 40),
    "psmathur/orca_mini_v3_13b": Spec(base=L2),
    "garage-bAInd/Platypus2-13B": Spec(base=L2),
    "WizardLM/WizardLM-13B-V1.2": Spec(base=L2),
    "WizardLM/WizardMath-13B-V1.0": Spec(base=L2, tokens=("[PAD]",)),
    M7: Spec("mistral", 32),
    "mistralai/Mistral-7B-Instruct-v0.2": Spec(base=M7),
    "BioMistral/BioMistral-7B": Spec(base=M7),
    "BioMistral/BioMistral-7B-DARE": Spec(base=M7),
    "PocketDoc/Dans-AdventurousWinds-7b": Spec(base=M7),
    "VAGOsolutions/SauerkrautLM-7b-HerO": Spec(base=M7),
    "samir-fama/SamirGPT-v1": Spec(base=M7),
    "OpenPipe/mistral-ft-optimized-1218": Spec(base=M7),
    "HuggingFaceH4/zephyr-7b-beta": Spec(base=M7),
    "meta-math/MetaMath-Mistral-7B": Spec(base=M7),
    "mlabonne/NeuralBeagle14-7B": Spec(base=M7),
    "teknium/OpenHermes-2.5-Mistral-7B": Spec(base=M7, tokens=tuple(CHATML)),
    "NousResearch/Hermes-2-Pro-Mistral-7B": Spec(base=M7, tokens=tuple(HERMES_PRO)),
    "predibase/magicoder": Spec(adapter_of=M7),
    "predibase/gsm8k": Spec(adapter_of=M7),
    "BEE-spoke-data/smol_llama-220M-GQA": Spec("llama", 2),
    "NousResearch/Meta-Llama-3-8B-Instruct": Spec("llama", 32, tokens=tuple(LLAMA3)),
    Q15: Spec("qwen2", 2, tie=True),
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": Spec(base=Q15),
    "Qwen/Qwen2.5-Math-1.5B-Instruct": Spec(base=Q15),
}


def _seed(repo_id: str) -> int:
    return int.from_bytes(hashlib.sha256(repo_id.encode()).digest()[:4], "little")


def _fine_tune(folder: Path, base: Path, seed: int, noise: float = 0.02) -> None:
    """``base``'s files, with its weights plus seeded Gaussian noise (straight on the
    safetensors file: much faster than a transformers round trip for 40 layers)."""
    shutil.copytree(base, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    state = load_file(base / "model.safetensors")
    noisy = {k: v + torch.randn(v.shape, generator=gen) * noise for k, v in sorted(state.items())}
    save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})


def _add_tokens(folder: Path, tokens: tuple[str, ...], seed: int) -> None:
    """Grow ``folder``'s tokenizer by ``tokens`` (special) and its embedding and lm_head rows
    (seeded normal rows) and ``vocab_size`` to match."""
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    tok.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    state = load_file(folder / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            extra = torch.randn(
                len(tok) - state[name].shape[0], state[name].shape[1], generator=gen
            )
            state[name] = torch.cat([state[name], extra * 0.02])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = len(tok)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _adapter(folder: Path, base: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(init_lora_weights=False, r=4, target_modules=["q_proj", "v_proj"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        get_peft_model(model, config).save_pretrained(folder)
    return folder


class StandIns:
    """Builds stand-ins under ``root`` (once each) and an HF cache that resolves their ids."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hub = root / "hub"

    def folder(self, repo_id: str) -> Path:
        """The stand-in of ``repo_id`` (built on first use, its base first)."""
        spec = SPECS[repo_id]
        folder = self.root / "models" / repo_id.replace("/", "--")
        if folder.is_dir():
            return folder
        if spec.adapter_of is not None:
            return _adapter(folder, self.folder(spec.adapter_of), _seed(repo_id))
        if spec.base is None:
            make_tiny(folder, spec.arch, seed=_seed(repo_id), layers=spec.layers, tie=spec.tie)  # type: ignore[arg-type]
        else:
            _fine_tune(folder, self.folder(spec.base), _seed(repo_id))
        if spec.tokens:
            _add_tokens(folder, spec.tokens, _seed(repo_id))
        return folder

    def cache(self, *repo_ids: str) -> Path:
        """An HF cache folder where each of ``repo_ids`` resolves to its stand-in."""
        for repo_id in repo_ids:
            seed_cache(self.hub, repo_id, self.folder(repo_id))
        return self.hub


def seed_cache(hub: Path, repo_id: str, folder: Path) -> Path:
    """Make ``repo_id`` resolve to ``folder``'s files at ``main`` in the HF cache ``hub`` (a
    snapshot of symlinks into the repo's ``blobs/``, as the Hub client writes them); returns
    ``hub``."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    if repo.is_dir():
        return hub
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in folder.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            try:  # a hard link: the cache's links stay inside the repo folder (merge.links)
                os.link(file, blob)
            except OSError:
                shutil.copyfile(file, blob)
        os.symlink(Path("..", "..", "blobs", digest), snapshot / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return hub
