"""Run-wide settings that reach code far from the options: remote code, the Hub cache, devices.

``applied(trust_remote_code=..., cache_dir=...)`` holds two settings for a ``with`` block
(``merge.api`` wraps each phase in it):

- ``trust_remote_code`` in a context variable, read by ``remote_code()`` wherever transformers
  loads a tokenizer, config or model (``merge.tokenizer.read_tokenizer``, ``merge.moe.forward``);
- ``cache_dir`` (mergekit's ``--transformers-cache``) as ``HF_HUB_CACHE`` in the environment,
  which ``merge.hub`` reads at each call, restored afterwards.

``device_name`` turns mergekit's device flags (``--cuda``, ``--gpu-rich``, ``--device auto``)
into one ``--device`` value.

What it does not do: thread the settings into worker threads (the code that reads them runs
in the calling thread) or make the environment change safe for concurrent runs in one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

_TRUST_REMOTE_CODE: ContextVar[bool] = ContextVar("trust_remote_code", default=False)
CACHE_VARIABLE = "HF_HUB_CACHE"


def remote_code() -> bool:
    """Whether transformers may run code from the models' folders (``--trust-remote-code``)."""
    return _TRUST_REMOTE_CODE.get()


@contextmanager
def applied(
    *, trust_remote_code: bool = False, cache_dir: str | Path | None = None
) -> Iterator[None]:
    """The settings for the ``with`` block; the previous ones come back after it."""
    token = _TRUST_REMOTE_CODE.set(trust_remote_code)
    before = os.environ.get(CACHE_VARIABLE)
    if cache_dir is not None:
        os.environ[CACHE_VARIABLE] = str(Path(cache_dir).expanduser())
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)
        if cache_dir is not None:
            if before is None:
                os.environ.pop(CACHE_VARIABLE, None)
            else:
                os.environ[CACHE_VARIABLE] = before


def device_name(device: str | None = None, cuda: bool = False, gpu_rich: bool = False) -> str:
    """The device of the method math: ``device`` when given (``auto``: cuda when available,
    else cpu), else ``cuda`` for mergekit's ``--cuda`` or ``--gpu-rich``, else ``cpu``."""
    if device is None:
        return "cuda" if cuda or gpu_rich else "cpu"
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
