"""Where a `merge run` spends its time: a py-spy profile summarized by what the code is doing.

Design: ``profile`` runs the command under ``py-spy record --format raw`` (every thread, not
the idle ones, ``RATE`` samples a second, not pausing the process) and ``summarize`` puts each
sample in one category: start-up (any frame importing), waiting (the innermost frame waits on
a lock, a condition or the pool's queue), else by the innermost frame of the ``merge`` package
(the shard hasher, the journal's CRC-32, ``pwrite``, the finite checks, the input ``stat``
checks, ``preadv``, the input views and float32 copies, the method's math, the cast to the
output dtype, and the rest). A sample is one thread seen once, so a run on 2 cores with 3 busy
threads has more seconds of samples than of wall time; the shares are what to compare.

Not done here: native frames (torch's kernels count as the Python line that called them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

RATE = 200
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
WAITS = ("wait", "_worker", "_wait_for_tstate_lock", "acquire", "select", "sleep", "get")
RULES = [  # (file or folder, function prefix, category), the innermost merge frame's
    ("merge/shardhash.py", "", "hashing: shard sha256 (manifest)"),
    ("merge/writer.py", "ShardWriter._check", "hashing: journal CRC-32"),
    ("merge/writer.py", "_pwrite_all", "writing (pwrite)"),
    ("merge/writer.py", "", "writing: waiting for the file, bookkeeping"),
    ("merge/finite.py", "", "NaN/Inf checks"),
    ("merge/inputstate.py", "", "input stat checks"),
    ("merge/checkpoint.py", "", "reading (preadv)"),
    ("merge/reads.py", "", "input views, float32 copies"),
    ("merge/methods/", "", "method math"),
    ("merge/execute.py", "", "cast to the output dtype"),
]
OTHER = "other (planning, executor, CLI)"
IMPORTS, WAITING = "start-up (imports)", "waiting (locks, queues)"


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for part in stack.split(";"):
        m = FRAME.match(part)
        if m:
            out.append((m["func"], m["file"].replace(os.sep, "/")))
    return out


def category(stack: str) -> str:
    """The category of one raw py-spy stack (outermost frame first)."""
    frames = _frames(stack)
    if any(func == "_find_and_load" for func, _ in frames):
        return IMPORTS
    if frames and frames[-1][0].split(".")[-1] in WAITS:
        return WAITING
    for func, file in reversed(frames):
        at = file[file.rfind("merge/") :] if "merge/" in file else ""
        if not at:
            continue
        for where, prefix, name in RULES:
            if (at == where or (where.endswith("/") and at.startswith(where))) and (
                func.startswith(prefix)
            ):
                return name
        return OTHER
    return OTHER


def summarize(raw: str, rate: int = RATE) -> dict[str, object]:
    """Categories of the samples in py-spy's raw output (``stack count`` lines)."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rstrip().rpartition(" ")
        if stack and n.isdigit():
            counts[category(stack)] += int(n)
    total = sum(counts.values())
    return {
        "rate": rate,
        "samples": total,
        "categories": [
            {"name": k, "samples": v, "seconds": round(v / rate, 3), "share": round(v / total, 4)}
            for k, v in counts.most_common()
        ],
    }


def py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise SystemExit("error: --profile needs py-spy (pip install -e '.[dev]')")
    return found


def profile(cmd: list[str], raw: Path, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``cmd`` under py-spy, keep the raw samples in ``raw`` and return their summary."""
    raw.parent.mkdir(parents=True, exist_ok=True)
    spy = [py_spy(), "record", "-r", str(RATE), "-f", "raw", "--nonblocking", "-o", str(raw)]
    done = subprocess.run([*spy, "--", *cmd], capture_output=True, text=True, env=env)
    if done.returncode != 0 or not raw.exists():
        return {"error": (done.stderr or done.stdout).strip()[-600:]}
    return {**summarize(raw.read_text(errors="replace")), "raw": str(raw)}
