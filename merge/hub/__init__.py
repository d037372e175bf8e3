"""Everything that talks to the Hugging Face Hub, through ``huggingface_hub`` only.

- ``download``: fetch what a merge needs into the HF cache (``download_model``), the per-run
  reachability probe (``hub_run``), and the mapping of client failures to one-line errors.
- ``remote``: plan a Hub model from its small files and its shards' headers (HTTP Range
  reads), without downloading its weights (``locate_model``, ``RemoteCheckpoint``); download
  them once the plan passed (``download_weights``, ``check_downloaded``).
- ``meta``: what a lock asks: a revision's commit and that commit's files with size and, for
  LFS files, sha256 (``remote_snapshot``), without downloading weights.

- ``publish``: upload a verified merge output to a model repo, only the files that changed,
  in one commit or pull request (``publish``, ``resolve_token``).

Callers import from ``merge.hub``.
"""

from __future__ import annotations

from merge.hub.download import (
    NEEDED_FILES,
    HubUnreachableError,
    download_model,
    hub_cache_dir,
    hub_endpoint,
    hub_run,
    offline_reason,
    probe_hub,
    probe_timeout,
    select_files,
)
from merge.hub.meta import RemoteFile, RemoteSnapshot, fetch_files, remote_snapshot
from merge.hub.publish import PublishResult, publish, resolve_token
from merge.hub.remote import (
    RemoteCheckpoint,
    RemoteModel,
    check_download_space,
    check_downloaded,
    download_bytes,
    download_weights,
    locate_model,
)

__all__ = [
    "NEEDED_FILES",
    "HubUnreachableError",
    "PublishResult",
    "RemoteFile",
    "RemoteSnapshot",
    "RemoteCheckpoint",
    "RemoteModel",
    "check_download_space",
    "check_downloaded",
    "download_bytes",
    "download_weights",
    "locate_model",
    "download_model",
    "fetch_files",
    "hub_cache_dir",
    "hub_endpoint",
    "hub_run",
    "offline_reason",
    "probe_hub",
    "probe_timeout",
    "publish",
    "remote_snapshot",
    "resolve_token",
    "select_files",
]
