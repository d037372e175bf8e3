"""Plan Hub models from their headers: small files into the cache, weights not downloaded.

Design
------
``locate_model(repo_id, revision)`` is ``download_model``'s twin for the plan phase (``merge
validate``, ``merge plan``, and ``merge run`` before it downloads anything). Online, it resolves
the revision to a commit once (``HfApi.resolve_revision``, which also records a branch or tag in
the cache's ``refs/``), lists the repo at that commit and picks the files with ``select_files``.
When every safetensors weight file is already in the cache, or the repo has none (only
``pytorch_model*.bin`` weights, whose headers cannot be read without the whole file, or only an
adapter), it downloads what is missing as ``download_model`` does and returns the snapshot
folder. Otherwise it downloads only the small files (config and other json files, the
safetensors index, tokenizer files, generation config) into the cache snapshot of that commit
and returns a ``RemoteModel``: repo, commit, snapshot folder, and the weight files still to
download with their sizes.

``RemoteCheckpoint.open_remote`` opens such a model with ``Checkpoint.open`` (same layout rules,
index checks and messages as a folder on disk), the headers of the missing shards read by
``HfApi.parse_safetensors_file_metadata``: HTTP Range reads of each shard's first 100 kB (and
of the rest of the header when it is longer), through huggingface_hub's session, several
shards at a time. Its tensors point where the shards will be in the snapshot; reading one is a
bug (``RuntimeError``).

``download_weights`` fetches the missing files with ``snapshot_download`` at the same commit,
with huggingface_hub's progress bars or none. ``check_downloaded`` then compares the headers of
the files on disk with the planned ones.

Offline (``HF_HUB_OFFLINE``) or with the Hub unreachable, ``locate_model`` takes the cache only,
exactly as ``download_model`` does (``hub_or_cache``), with the same messages.

What this module does not do: header-read ``.bin`` weights or LoRA adapters (adapters are small
and downloaded whole), keep headers for a later offline plan, or check that a shard is as long
as its header says (only the file on disk shows it: ``Checkpoint.open`` checks it after the
download).
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, cast

from merge.checkpoint import Checkpoint
from merge.errors import CheckpointError
from merge.headers import TensorInfo, check_layout, header_entry, read_headers
from merge.hub.download import _first_line, _hub_errors, hub_or_cache, no_weights, select_files
from merge.outdir import existing_ancestor

if TYPE_CHECKING:  # pragma: no cover
    import torch

HEADER_THREADS = 8  # shards whose headers are read at once


@dataclass(frozen=True)
class RemoteModel:
    """A Hub model planned from its headers: small files in ``folder``, weights still remote."""

    repo_id: str
    label: str  # the reference as the recipe gives it: org/name[@revision]
    commit: str
    folder: Path  # the cache snapshot of ``commit``, where the weights will be
    cache: Path
    missing: dict[str, int] = field(hash=False)  # weight file -> size, not in the cache yet
    files: tuple[str, ...] = ()  # every file the merge needs (``select_files``)

    @property
    def download_bytes(self) -> int:
        return sum(self.missing.values())


def locate_model(repo_id: str, revision: str | None) -> Path | RemoteModel:
    """The snapshot folder of ``repo_id`` when its weights are in the cache (or cannot be
    header-read and were downloaded), else a ``RemoteModel`` with its small files fetched."""
    return hub_or_cache(
        repo_id, revision, lambda label, cache: _locate(repo_id, revision, label, cache)
    )


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _locate(repo_id: str, revision: str | None, label: str, cache: Path) -> Path | RemoteModel:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=_endpoint())
    with _hub_errors(label, revision, cache):
        resolved = api.resolve_revision(repo_id, revision=revision, cache_dir=cache)
        tree = api.list_repo_tree(repo_id, revision=resolved.resolved)
        sizes = {f.path: f.size for f in tree if isinstance(f, RepoFile)}
    files = select_files(sizes)
    if not files:
        raise no_weights(label)
    weights = [f for f in files if f.endswith(".safetensors") and not f.startswith("adapter_")]
    missing = {f: sizes[f] for f in weights if not _cached(repo_id, f, cache, resolved.resolved)}
    small = [f for f in files if f not in missing]
    if not small:  # weights alone, no config to plan with: as download_model does
        missing, small = {}, files
    with _hub_errors(label, revision, cache):
        folder = Path(
            snapshot_download(
                repo_id,
                revision=resolved,
                cache_dir=cache,
                allow_patterns=small,
                endpoint=_endpoint(),
                tqdm_class=_silent_tqdm() if missing else None,  # small files: no bar
            )
        )
    if not missing:
        return folder
    return RemoteModel(repo_id, label, resolved.resolved, folder, cache, missing, tuple(files))


def _cached(repo_id: str, filename: str, cache: Path, commit: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=commit)
    return isinstance(found, str)


class RemoteCheckpoint(Checkpoint):
    """A ``Checkpoint`` of a ``RemoteModel``: config and headers, no readable tensor."""

    remote: RemoteModel

    @classmethod
    def open_remote(cls, model: RemoteModel, label: str) -> RemoteCheckpoint:
        """Config from the snapshot, headers from the cached shards and from the Hub."""
        reader = partial(_headers, model)
        opened = cls.open(model.folder, label, listed=set(model.missing), headers=reader)
        ckpt = cast(RemoteCheckpoint, opened)
        ckpt.remote = model
        return ckpt

    def read(self, name: str) -> torch.Tensor:
        raise RuntimeError(self._not_here(name))

    def view(self, name: str) -> torch.Tensor:
        raise RuntimeError(self._not_here(name))

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        raise RuntimeError(self._not_here(name))

    def _not_here(self, name: str) -> str:
        return (
            f"model '{self.label}': tensor '{name}' was planned from the Hub's headers and its "
            "weights are not downloaded (merge.hub.download_weights comes first)"
        )

    def __repr__(self) -> str:
        return f"RemoteCheckpoint({self.label!r}, {len(self.tensors)} tensors)"


def _headers(model: RemoteModel, files: list[Path], label: str) -> dict[str, TensorInfo]:
    """Headers of ``files`` in order: from disk where cached, else from the Hub."""
    remote = [f for f in files if not f.is_file()]
    threads = max(1, min(HEADER_THREADS, len(remote)))
    with ThreadPoolExecutor(threads, thread_name_prefix="merge-headers") as pool:
        headers = pool.map(partial(_remote_header, model, label), remote)
        fetched = dict(zip(remote, headers, strict=True))
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        tensors.update(fetched[file] if file in fetched else read_headers([file], label))
    return tensors


def _remote_header(model: RemoteModel, label: str, file: Path) -> dict[str, TensorInfo]:
    """One shard's header through ``HfApi.parse_safetensors_file_metadata`` (Range reads)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import SafetensorsParsingError

    name = file.relative_to(model.folder).as_posix()
    where = f"model '{label}' ({model.repo_id}/{name} at {model.commit[:12]} on the Hub)"
    try:
        with _hub_errors(label, model.commit, model.cache):
            meta = HfApi(endpoint=_endpoint()).parse_safetensors_file_metadata(
                model.repo_id, name, revision=model.commit
            )
    except SafetensorsParsingError as e:
        raise CheckpointError(f"{where}: corrupt header: {_first_line(e)}") from e
    size = model.missing[name]
    end = max((t.data_offsets[1] for t in meta.tensors.values()), default=0)
    entries = {
        t: {"dtype": i.dtype, "shape": i.shape, "data_offsets": i.data_offsets}
        for t, i in meta.tensors.items()
    }
    # The data is taken to end the file (as every writer does); the disk copy is checked.
    infos = {t: header_entry(t, e, file, where, end, size) for t, e in entries.items()}
    check_layout(infos, where, size - end, end)
    return infos


def download_weights(models: list[RemoteModel], *, progress: bool = True) -> None:
    """Download the missing weights of ``models`` into the cache, each at its planned commit;
    ``progress`` false turns huggingface_hub's bars off (they also stay off without a TTY)."""
    from huggingface_hub import snapshot_download

    done: set[tuple[str, str]] = set()
    for m in models:
        if (m.repo_id, m.commit) in done:
            continue
        done.add((m.repo_id, m.commit))
        with _hub_errors(m.label, m.commit, m.cache):
            snapshot_download(
                m.repo_id,
                revision=m.commit,
                cache_dir=m.cache,
                allow_patterns=list(m.files),
                endpoint=_endpoint(),
                tqdm_class=None if progress else _silent_tqdm(),
            )


def _silent_tqdm() -> type:
    from huggingface_hub.utils import tqdm

    class Silent(tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def check_downloaded(planned: RemoteCheckpoint, opened: Checkpoint) -> None:
    """The downloaded files must hold the tensors the plan read from the Hub's headers."""
    old, new = planned.tensors, opened.tensors

    def key(t: TensorInfo) -> tuple[object, ...]:
        return (t.shape, t.dtype, t.nbytes, t.file)

    differ = sorted({*old, *new} - {n for n in old if n in new and key(old[n]) == key(new[n])})
    if differ:
        raise CheckpointError(
            f"model '{planned.label}': the downloaded weights in {planned.remote.folder} differ "
            f"from the headers the plan read from the Hub ({len(differ)} tensors, first "
            f"'{differ[0]}'); delete that snapshot from the cache and run again"
        )


def download_bytes(models: list[RemoteModel]) -> int:
    """Bytes still to download for ``models``, each repo and commit counted once."""
    return sum(m.download_bytes for m in {(m.repo_id, m.commit): m for m in models}.values())


def check_download_space(models: list[RemoteModel], output: Path, output_bytes: int) -> str | None:
    """A one-line problem if the cache's file system cannot hold the missing weights, and the
    output too when it is on the same file system; else None."""
    from merge.report import human_bytes

    weights = download_bytes(models)
    if not weights:
        return None
    cache = models[0].cache
    probe = existing_ancestor(cache)
    need, also = weights, ""
    if os.stat(probe).st_dev == os.stat(existing_ancestor(output)).st_dev:
        need, also = weights + output_bytes, f" and write the {human_bytes(output_bytes)} output"
    free = shutil.disk_usage(probe).free
    if free >= need:
        return None
    return (
        f"not enough disk space to download {human_bytes(weights)} of weights into the Hugging "
        f"Face cache {cache}{also}: {human_bytes(free)} free on {probe}; free some space or "
        "set HF_HUB_CACHE"
    )
