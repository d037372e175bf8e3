"""Measuring one command for the benchmark: wall time, memory, CPU, and the I/O floor.

Design: ``measure`` starts the command with its output sent to a log file, samples
``/proc/PID/status`` of the process and its descendants (found every 150 ms) every 15 ms in a
thread (sum of ``VmRSS`` and of ``RssAnon`` across the tree, plus each process's ``VmHWM``), and
reaps it with ``os.wait4`` so that the user+system CPU time comes from the kernel, not from
sampling. Peak RSS is the larger of the sampled tree sum and each process's ``VmHWM`` (a
high-water mark, so only the last ~15 ms can be missed; ``ru_maxrss`` is not used: it includes the
forked parent before ``exec``); peak anonymous memory is the largest sampled tree sum of
``RssAnon`` (memory-mapped inputs are file-backed and do not count).

The I/O floor is itself a measured command: a bare ``python`` (no imports beyond the standard
library, so its start-up is included) that reads every input file once in 16 MiB chunks and writes
an output of a given size to the output's filesystem, without fsync, then deletes it; it prints
how long the reads and the writes took (``Sample.parts``), since on a virtual machine the
writes (the kernel finding fresh page-cache pages) can vary several times from run to run.

Not done here: dropping the page cache (runs are measured warm, as a user re-running a merge
sees them), or per-thread CPU breakdowns (use py-spy for that).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_S = 0.015
TREE_EVERY = 10  # samples between walks of the process tree
CHUNK = 16 * 2**20

FLOOR_CODE = """
import os, sys, time
out, nbytes, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
buf = bytearray(16 * 2**20)
view = memoryview(buf)
start = time.perf_counter()
for name in files:
    with open(name, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
read = time.perf_counter()
with open(out, "wb", buffering=0) as f:
    left = nbytes
    while left > 0:
        left -= f.write(view[: min(left, len(buf))])
os.unlink(out)
print(f"floor read_s={read - start:.4f} write_s={time.perf_counter() - read:.4f}")
"""
FLOOR_LINE = re.compile(r"floor read_s=([0-9.]+) write_s=([0-9.]+)")


@dataclass
class Sample:
    """What one measured run cost."""

    wall_s: float
    cpu_s: float
    peak_rss: int
    peak_anon: int
    returncode: int
    error: str = ""
    parts: dict[str, float] | None = None  # the floor's read_s and write_s

    @property
    def cpu_util(self) -> float:
        """CPU time over wall time: 1.0 is one core busy the whole time."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def _status_kb(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            values[key] = int(rest.split()[0])
    return values


def _tree(pid: int) -> list[int]:
    """The process and its descendants, from /proc/PID/task/*/children."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
            except OSError:
                pass
    return pids


class _Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.stop = threading.Event()
        self.peak_rss = 0
        self.peak_anon = 0

    def run(self) -> None:
        tick = 0
        pids = [self.pid]
        while not self.stop.is_set():
            if tick % TREE_EVERY == 0:  # walking every thread's children file costs CPU
                pids = _tree(self.pid)
            tick += 1
            rss = anon = 0
            for p in pids:
                s = _status_kb(p)
                rss += s.get("VmRSS", 0)
                anon += s.get("RssAnon", 0)
                self.peak_rss = max(self.peak_rss, s.get("VmHWM", 0) * 1024)
            self.peak_rss = max(self.peak_rss, rss * 1024)
            self.peak_anon = max(self.peak_anon, anon * 1024)
            self.stop.wait(SAMPLE_S)


def measure(cmd: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 0):
    """Run ``cmd`` to completion (stdout and stderr to ``log``) and return its ``Sample``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = _Sampler(proc.pid)
        sampler.start()
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if timer:
            timer.cancel()
        sampler.stop.set()
        sampler.join()
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    error = "" if code == 0 else _tail(log)
    return Sample(
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss=sampler.peak_rss,  # not ru_maxrss: it counts the forked parent before exec
        peak_anon=sampler.peak_anon,
        returncode=code,
        error=error,
    )


def _tail(log: Path, lines: int = 5) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:])[-600:]


def floor(files: list[Path], out_bytes: int, scratch: Path, log: Path) -> Sample:
    """Time a bare python reading ``files`` once and writing ``out_bytes`` under ``scratch``."""
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "floor.bin"
    cmd = [sys.executable, "-c", FLOOR_CODE, str(target), str(out_bytes)]
    sample = measure(cmd + [str(f) for f in files], log)
    found = FLOOR_LINE.search(log.read_text(errors="replace")) if sample.returncode == 0 else None
    if found:
        sample.parts = {"read_s": float(found.group(1)), "write_s": float(found.group(2))}
    return sample


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def machine() -> dict[str, object]:
    """CPU model, cores, RAM and OS of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "os": platform.platform(),
        "python": platform.python_version(),
    }
