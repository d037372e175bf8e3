"""Device operations of the chunk pipeline, behind one small interface.

``Backend`` has what ``merge.device.chunks`` needs: ``pinned`` host buffers, device
buffers (``empty``), a ``copy`` stream and a ``compute`` stream, ``copy_async`` on a stream,
``record`` (an event after the work issued so far on a stream), ``wait`` (a stream waits for
an event) and ``host_wait`` (the host waits for an event).

``CudaBackend`` maps them onto ``torch.cuda`` streams and events (pinned memory from torch's
caching host allocator). ``SimBackend`` runs the same schedule on CPU tensors: work on the
compute stream runs at once (like the host thread issuing kernels), while copies on the copy
stream are queued and run only when something waits for an event recorded after them, as a
real copy engine may run them late. A missing wait therefore reads stale data or overwrites a
buffer still in use, and the result differs; every operation is logged (``log``) so tests can
check the order too (overlap, buffer reuse).

What it does not do: decide the order of operations (``merge.device.chunks``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class Backend(Protocol):
    device: torch.device
    copy: Any
    compute: Any

    def pinned(self, numel: int, dtype: torch.dtype) -> torch.Tensor: ...
    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor: ...
    def on(self, stream: Any) -> AbstractContextManager[Any]: ...
    def copy_async(self, stream: Any, dst: torch.Tensor, src: torch.Tensor, tag: str) -> None: ...
    def record(self, stream: Any, tag: str) -> Any: ...
    def wait(self, stream: Any, event: Any) -> None: ...
    def host_wait(self, event: Any) -> None: ...
    def note(self, tag: str) -> None: ...


class CudaBackend:
    """``Backend`` on one CUDA device: a copy stream and a compute stream per pipeline."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy = torch.cuda.Stream(device=device)
        self.compute = torch.cuda.Stream(device=device)

    def pinned(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, pin_memory=True)

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        with torch.cuda.stream(self.compute):
            return torch.empty(numel, dtype=dtype, device=self.device)

    def on(self, stream: Any) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def copy_async(self, stream: Any, dst: torch.Tensor, src: torch.Tensor, tag: str) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def record(self, stream: Any, tag: str) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def host_wait(self, event: Any) -> None:
        event.synchronize()

    def note(self, tag: str) -> None:
        pass


@dataclass
class SimEvent:
    stream: SimStream
    position: int  # the stream's operations before it
    tag: str


@dataclass
class SimStream:
    name: str
    queue: list[Callable[[], None]] = field(default_factory=list)
    done: int = 0  # operations run so far

    def run_to(self, position: int) -> None:
        while self.done < position:
            self.queue[self.done]()
            self.done += 1


class SimBackend:
    """``Backend`` on CPU tensors with deferred copies (see the module notes)."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.copy = SimStream("copy")
        self.compute = SimStream("compute")
        self.log: list[str] = []

    def pinned(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype)

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype)

    def on(self, stream: Any) -> AbstractContextManager[Any]:
        return nullcontext()

    def copy_async(self, stream: Any, dst: torch.Tensor, src: torch.Tensor, tag: str) -> None:
        self.log.append(f"issue {tag}")

        def run() -> None:
            self.log.append(f"run {tag}")
            dst.copy_(src)

        if stream is self.compute:
            run()
        else:
            stream.queue.append(run)

    def record(self, stream: Any, tag: str) -> SimEvent:
        self.log.append(f"record {tag}")
        return SimEvent(stream, len(stream.queue), tag)

    def wait(self, stream: Any, event: Any) -> None:
        self.log.append(f"wait {stream.name} {event.tag}")
        if stream is self.compute:  # the compute stream runs now: what it waits for, too
            event.stream.run_to(event.position)
        else:
            stream.queue.append(lambda: event.stream.run_to(event.position))

    def host_wait(self, event: Any) -> None:
        self.log.append(f"host {event.tag}")
        event.stream.run_to(event.position)

    def note(self, tag: str) -> None:
        self.log.append(tag)
