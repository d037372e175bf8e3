"""Shared fixtures: an offline, isolated Hugging Face environment and tiny checkpoints.

Session fixtures build each checkpoint once per test session (with ``tests/tiny.py``) under a
session temp folder; treat them as read-only inputs and write outputs to ``tmp_path``.

==================  ======  ======  ====  ==========================================
fixture             arch    layers  tie   on disk
==================  ======  ======  ====  ==========================================
llama_base          llama   4       no    model.safetensors (float32), seed 0
llama_ft1           llama   4       no    llama_base + 0.02 noise (seed 1)
llama_ft2           llama   4       no    llama_base + 0.02 noise (seed 2)
llama_sharded       llama   4       no    llama_ft1's weights in >= 3 shards + index
llama_bin           llama   4       no    llama_ft2's weights as pytorch_model.bin
qwen2_tied          qwen2   2       yes   model.safetensors, no lm_head.weight, seed 3
qwen2_tied_ft       qwen2   2       yes   qwen2_tied + 0.02 noise (seed 4)
==================  ======  ======  ====  ==========================================

Every checkpoint has hidden size 32, the quick start tokenizer (vocab 512) and a
generation_config.json. ``llava_base``/``llava_ft`` and ``qwen2vl_base``/``qwen2vl_ft`` are
tiny multimodal models (``tests/tiny_vlm.py``: 2 text layers, 3 vision layers).
``make_checkpoint(name, **make_tiny_kwargs)`` builds others under ``tmp_path``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import tiny` in any import mode

from tiny import QUICKSTART_TOKENIZER, make_tiny  # noqa: E402
from tiny_vlm import make_tiny_vlm  # noqa: E402

# Patched both in the environment and in huggingface_hub.constants, which reads the
# environment once at import time.
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


@pytest.fixture(scope="session", autouse=True)
def hf_offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No test can reach the network or the user's Hugging Face cache and token.

    Sets the offline variables and points ``HF_HOME``/``HF_HUB_CACHE`` (and the tool's own
    ``MERGE_CACHE_DIR``) at per-session temp folders, for the whole session (session fixtures
    included). Yields that ``HF_HOME``.
    """
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf_home")
    paths = {
        "HF_HOME": home,
        "HF_HUB_CACHE": home / "hub",
        "HUGGINGFACE_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
        # the tool's own caches (merge.build.hashing), outside HF_HOME
        "MERGE_CACHE_DIR": tmp_path_factory.mktemp("mergesmith"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**_OFFLINE_ENV, **{k: str(v) for k, v in paths.items()}}.items():
            mp.setenv(key, value)
        mp.delenv("HF_TOKEN", raising=False)
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        for key, path in paths.items():
            if hasattr(constants, key):
                mp.setattr(constants, key, str(path))
        yield home


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session folder that holds every session checkpoint."""
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_root: Path) -> Path:
    """A copy of the shipped quick start tokenizer (``recipes/quickstart/tokenizer``)."""
    return Path(shutil.copytree(QUICKSTART_TOKENIZER, tiny_root / "tokenizer"))


@pytest.fixture(scope="session")
def llama_base(tiny_root: Path) -> Path:
    return make_tiny(tiny_root / "llama_base", "llama", seed=0, layers=4)


@pytest.fixture(scope="session")
def llama_ft1(tiny_root: Path, llama_base: Path) -> Path:
    return make_tiny(tiny_root / "llama_ft1", seed=1, noise_from=llama_base)


@pytest.fixture(scope="session")
def llama_ft2(tiny_root: Path, llama_base: Path) -> Path:
    return make_tiny(tiny_root / "llama_ft2", seed=2, noise_from=llama_base)


@pytest.fixture(scope="session")
def llama_sharded(tiny_root: Path, llama_base: Path) -> Path:
    """llama_ft1's weights, sharded at 100 kB (4 shards + model.safetensors.index.json)."""
    return make_tiny(
        tiny_root / "llama_sharded", seed=1, noise_from=llama_base, shard_bytes=100_000
    )


@pytest.fixture(scope="session")
def llama_bin(tiny_root: Path, llama_base: Path) -> Path:
    """llama_ft2's weights as a single ``pytorch_model.bin``."""
    return make_tiny(tiny_root / "llama_bin", seed=2, noise_from=llama_base, fmt="bin")


@pytest.fixture(scope="session")
def qwen2_tied(tiny_root: Path) -> Path:
    return make_tiny(tiny_root / "qwen2_tied", "qwen2", seed=3, tie=True)


@pytest.fixture(scope="session")
def qwen2_tied_ft(tiny_root: Path, qwen2_tied: Path) -> Path:
    return make_tiny(tiny_root / "qwen2_tied_ft", seed=4, noise_from=qwen2_tied)


@pytest.fixture(scope="session")
def llava_base(tiny_root: Path) -> Path:
    return make_tiny_vlm(tiny_root / "llava_base", "llava", seed=10)


@pytest.fixture(scope="session")
def llava_ft(tiny_root: Path, llava_base: Path) -> Path:
    return make_tiny_vlm(tiny_root / "llava_ft", seed=11, noise_from=llava_base)


@pytest.fixture(scope="session")
def qwen2vl_base(tiny_root: Path) -> Path:
    return make_tiny_vlm(tiny_root / "qwen2vl_base", "qwen2_vl", seed=12)


@pytest.fixture(scope="session")
def qwen2vl_ft(tiny_root: Path, qwen2vl_base: Path) -> Path:
    return make_tiny_vlm(tiny_root / "qwen2vl_ft", seed=13, noise_from=qwen2vl_base)


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_checkpoint("name", **make_tiny_kwargs)`` -> ``tmp_path / "name"``."""

    def factory(name: str = "model", **kwargs: object) -> Path:
        return make_tiny(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return factory
