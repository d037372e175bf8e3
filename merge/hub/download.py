"""Downloads from the Hugging Face Hub (``merge.hub.remote`` reads headers without them).

Design
------
``download_model`` fetches exactly what a merge needs from a model repo into the standard
Hugging Face cache and returns the snapshot folder: config and other top-level json files,
tokenizer files, and one weight format (safetensors + index if the repo has any, else
``pytorch_model*.bin`` + index; never both, never gguf/onnx/msgpack/h5, ``original/`` or
``consolidated.*``), plus a LoRA adapter's ``adapter_model.safetensors`` (else ``.bin``) and
``adapter_config.json`` when the repo has them. Which files to take is decided by a pure
function (``select_files``) over the repo listing when online, or over the cached snapshot when
offline. ``hub_or_cache`` is the choice between the two, shared with ``merge.hub.remote``.

Environment is read at call time (huggingface_hub reads some of it once at import):
``HF_HUB_CACHE`` / ``HUGGINGFACE_HUB_CACHE`` / ``HF_HOME`` / ``XDG_CACHE_HOME`` pick the cache,
``HF_HUB_OFFLINE`` switches to cache-only, ``HF_ENDPOINT`` the server. Every failure becomes a
one-line ``SourceError`` with the next step.

Offline without ``HF_HUB_OFFLINE``: inside ``hub_run()`` (``merge.sourceset.open_models`` opens
one per run) the Hub is probed once, before the first Hub model, with one request through
huggingface_hub's own HTTP session (so ``HF_ENDPOINT``, proxies and a custom client factory
apply) and a short timeout (``MERGE_HUB_PROBE_TIMEOUT`` seconds, default 3). Any HTTP answer
means reachable; a connection error or timeout means every Hub model of the run comes from the
cache, with no further network attempt, and so does a network error of a later request. This
spares the run huggingface_hub's retries (about 23 s per model). Outside ``hub_run()`` nothing
is probed.

What this module does not do: publish (a later ``merge.hub`` part), resolve local paths
(``merge.sources``), read weights or their headers (``merge.hub.remote``), or record revisions
for the lock file.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from merge.checkpoint import BIN_INDEX, SAFE_INDEX
from merge.errors import SourceError
from merge.tokenizer import TOKENIZER_FILES

# What a merge needs besides weights and top-level json files (README.md: the input's card,
# whose license, language and datasets the output's card is made from).
NEEDED_FILES = frozenset(TOKENIZER_FILES) | {"generation_config.json", "README.md"}
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
PROBE_TIMEOUT_VAR = "MERGE_HUB_PROBE_TIMEOUT"
PROBE_TIMEOUT_S = 3.0
OFFLINE_STEP = "download it once online or use a local path"
UNREACHABLE_STEP = (
    "download it once online, use a local path, or set HF_HUB_OFFLINE=1 to use only the cache"
)
T = TypeVar("T")


class HubUnreachableError(SourceError):
    """The Hub could not be reached (network down, timeout, proxy); the cache may still help."""

    reason: str = "the Hub cannot be reached"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is now."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def offline_reason() -> str | None:
    """Why the Hub must not be contacted: HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE as
    huggingface_hub also accepts it; None when online use is allowed."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in TRUE_VALUES:
            return f"{var}=1 is set"
    return None


@dataclass
class _Reach:
    """One run's answer to "can the Hub be reached?", unknown until the first Hub model."""

    known: bool = False
    down: str | None = None  # why the Hub cannot be reached, once known


_RUN: ContextVar[_Reach | None] = ContextVar("merge_hub_run", default=None)


@contextmanager
def hub_run() -> Iterator[None]:
    """Within the block the Hub is probed at most once, and once it is found unreachable (by
    the probe or by a request's network error) every Hub model comes from the cache only.
    A nested block shares the outer one's answer, which is forgotten when the outer one ends."""
    if _RUN.get() is not None:
        yield
        return
    token = _RUN.set(_Reach())
    try:
        yield
    finally:
        _RUN.reset(token)


def hub_endpoint() -> str:
    """The Hub's base URL: ``HF_ENDPOINT`` as it is now, else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def probe_timeout() -> float:
    """Seconds the probe waits for the Hub: ``MERGE_HUB_PROBE_TIMEOUT``, default 3."""
    text = os.environ.get(PROBE_TIMEOUT_VAR, "").strip()
    if not text:
        return PROBE_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise SourceError(f"{PROBE_TIMEOUT_VAR}={text!r}: expected a number of seconds > 0")
    return value


def probe_hub() -> str | None:
    """None if the Hub's endpoint gives any HTTP answer (404 too) to one request within
    ``probe_timeout()``; else why it cannot be reached. Goes through huggingface_hub's session,
    so its proxies, certificates and client factory are the downloads' own. The request runs in
    a daemon thread so that the wait is bounded even where the client's timeout is not (a
    name lookup that hangs)."""
    from huggingface_hub import get_session

    endpoint, timeout = hub_endpoint(), probe_timeout()
    outcome: list[BaseException | None] = []

    def request() -> None:
        try:
            get_session().head(endpoint, timeout=timeout)
            outcome.append(None)
        except BaseException as e:  # handed to the caller, never printed by the thread
            outcome.append(e)

    worker = threading.Thread(target=request, name="merge-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    error = outcome[0] if outcome else TimeoutError()
    if error is None or not _is_network_error(error):
        return None  # an answer, or no connection problem: the real request reports it
    if isinstance(error, TimeoutError) or "Timeout" in type(error).__name__:
        wait = f"no answer within {timeout:g} s; {PROBE_TIMEOUT_VAR} sets how long to wait"
        return f"the Hub at {endpoint} cannot be reached ({wait})"
    return _unreachable(error, endpoint)


def _hub_down() -> str | None:
    """Why the Hub cannot be reached in this ``hub_run`` (probed on first call), or None."""
    reach = _RUN.get()
    if reach is None:
        return None
    if not reach.known:
        reach.down, reach.known = probe_hub(), True
    return reach.down


def _mark_down(reason: str) -> None:
    reach = _RUN.get()
    if reach is not None and reach.down is None:
        reach.down, reach.known = reason, True


def select_files(names: Iterable[str]) -> list[str]:
    """The files of a repo listing a merge needs; no weight file at all means an empty list."""
    top = sorted(n for n in names if "/" not in n)
    safetensors = [
        n
        for n in top
        if n.endswith(".safetensors") and not n.startswith(("consolidated.", "adapter_"))
    ]
    bins = [n for n in top if n.startswith("pytorch_model") and n.endswith(".bin")]
    adapter = [n for n in ("adapter_model.safetensors", "adapter_model.bin") if n in top][:1]
    weights = (safetensors or bins) + adapter
    if not weights:
        return []
    other_index = BIN_INDEX if safetensors else SAFE_INDEX
    meta = [
        n
        for n in top
        if (n.endswith(".json") and n != other_index and not n.startswith("consolidated."))
        or n in NEEDED_FILES
    ]
    return sorted(set(weights) | set(meta))


def download_model(repo_id: str, revision: str | None) -> Path:
    """Fetch (or find in the cache) what a merge needs from ``repo_id`` and return its folder."""
    return hub_or_cache(
        repo_id, revision, lambda label, cache: _download(repo_id, revision, label, cache)
    )


def hub_or_cache(repo_id: str, revision: str | None, online: Callable[[str, Path], T]) -> T | Path:
    """``online(label, cache)`` where the Hub may be used; the cached snapshot instead (no
    network) when it must not be (``HF_HUB_OFFLINE``), or is found unreachable before or by
    ``online`` (a ``HubUnreachableError``)."""
    label = repo_id if revision is None else f"{repo_id}@{revision}"
    cache = hub_cache_dir()
    offline = offline_reason()
    if offline:
        return _from_cache(repo_id, revision, cache, label, offline, OFFLINE_STEP)
    down = _hub_down()
    if down:
        return _from_cache(repo_id, revision, cache, label, down, UNREACHABLE_STEP)
    try:
        return online(label, cache)
    except HubUnreachableError as error:
        return _from_cache(repo_id, revision, cache, label, error.reason, UNREACHABLE_STEP)


def no_weights(label: str) -> SourceError:
    return SourceError(
        f"model '{label}': the repo has no safetensors, pytorch_model.bin or adapter weights"
    )


def _download(repo_id: str, revision: str | None, label: str, cache: Path) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    with _hub_errors(label, revision, cache):
        names = HfApi(endpoint=endpoint).list_repo_files(repo_id, revision=revision)
    files = select_files(names)
    if not files:
        raise no_weights(label)
    with _hub_errors(label, revision, cache):
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=files, endpoint=endpoint
        )
    return Path(folder)


def _from_cache(
    repo_id: str, revision: str | None, cache: Path, label: str, reason: str, next_step: str
) -> Path:
    """The cached snapshot for ``revision`` (branch, tag or commit), without any network;
    ``reason`` (why the cache only) and ``next_step`` make the message when it is not there."""
    from huggingface_hub import snapshot_download

    def cached(patterns: list[str]) -> Path:
        with _hub_errors(label, revision, cache, offline_reason=reason, next_step=next_step):
            return Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache,
                    local_files_only=True,
                    allow_patterns=patterns,
                )
            )

    folder = cached(["config.json", "adapter_config.json"])  # locates the snapshot
    files = select_files(p.name for p in folder.iterdir() if p.is_file())
    if not files:  # e.g. only the config and tokenizer that `merge plan` fetched
        raise SourceError(
            f"model '{label}': the cached snapshot {folder} has no weights and {reason}; "
            f"{next_step}"
        )
    return cached(files)  # checks the chosen files against the cached repo listing, if any


@contextmanager
def _hub_errors(
    label: str,
    revision: str | None,
    cache: Path,
    offline_reason: str | None = None,
    next_step: str = OFFLINE_STEP,
) -> Iterator[None]:
    """Turn huggingface_hub failures into one-line SourceErrors with the next step."""
    from huggingface_hub import errors as hf

    where = f"model '{label}'"
    login = "log in with `hf auth login` (or `huggingface-cli login`) or set HF_TOKEN"
    try:
        yield
    except hf.GatedRepoError as e:
        raise SourceError(f"{where}: gated repo: accept its terms on the Hub, then {login}") from e
    except hf.RepositoryNotFoundError as e:
        raise SourceError(f"{where}: repo not found on the Hub (if it is private, {login})") from e
    except hf.RevisionNotFoundError as e:
        raise SourceError(f"{where}: revision '{revision}' not found in the repo") from e
    except hf.RevisionResolutionError as e:  # HfApi.resolve_revision: no answer, no cached ref
        if e.__cause__ is None or not _is_network_error(e.__cause__):
            raise SourceError(f"{where}: {_first_line(e)}") from e
        raise _unreachable_error(where, e.__cause__) from e
    except hf.IncompleteSnapshotError as e:
        raise SourceError(
            f"{where}: the cached snapshot in {cache} is incomplete; download it again online"
        ) from e
    except hf.LocalEntryNotFoundError as e:
        if offline_reason is None:
            raise SourceError(f"{where}: download failed: {_first_line(e)}") from e
        raise SourceError(
            f"{where}: not in the Hugging Face cache ({cache}) and {offline_reason}; {next_step}"
        ) from e
    except hf.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise SourceError(f"{where}: access denied by the Hub; {login}") from e
        raise SourceError(f"{where}: Hub request failed: {_first_line(e)}") from e
    except Exception as e:
        if not _is_network_error(e):
            raise
        raise _unreachable_error(where, e) from e


def _unreachable_error(where: str, e: BaseException) -> HubUnreachableError:
    """The error of a network failure; the run's next models go to the cache without retrying."""
    reason = _unreachable(e, hub_endpoint())
    _mark_down(reason)
    error = HubUnreachableError(f"{where}: {reason}; check your connection or proxy")
    error.reason = reason
    return error


def _unreachable(e: BaseException, endpoint: str) -> str:
    return f"the Hub at {endpoint} cannot be reached ({type(e).__name__}: {_first_line(e)})"


def _is_network_error(e: BaseException) -> bool:
    module = type(e).__module__.split(".")[0]
    return isinstance(e, (ConnectionError, TimeoutError)) or module in {
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
        "requests",
        "urllib3",
    }


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
