#!/usr/bin/env bash
# The GPU checks of `--device cuda` (merge.device), for a machine with a CUDA GPU, in about
# 8 minutes: the gpu-marked tests, then the 1b preset merged on the CPU and on the GPU.
#
#   OUT=/some/dir bash scripts/gpu_check.sh        # results under $OUT (default ./gpu-check)
#
# Needs a python with this repository installed (`pip install -e .`) and a CUDA build of
# torch: if `python -c 'import torch; print(torch.cuda.is_available())'` prints False, install
# one first (`pip install torch`, about 2.5 GB). PYTHON picks the interpreter (default python).
# The 1b preset needs about 9 GB of disk for its four models plus two outputs of 2.2 GB.
# Writes: $OUT/env.txt, $OUT/gpu-tests.txt (pytest), $OUT/gpu-report.json (per method: output
# tensors bit-identical to the CPU), $OUT/bench-1b.json and .md (CPU vs GPU, VRAM peak).
set -u
OUT=${OUT:-./gpu-check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv 2>&1
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available())'
    git rev-parse HEAD 2>/dev/null
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. the gpu-marked tests (CPU vs GPU bytes, bounds, run-to-run determinism, VRAM peak)
GPU_REPORT="$OUT/gpu-report.json" timeout 240 "$PY" -m pytest -q -p no:cacheprovider \
    -m gpu tests/test_gpu_cuda.py tests/test_parallel.py 2>&1 | tee "$OUT/gpu-tests.txt" | tail -20

# 2. the 1b preset: CPU vs GPU (--max-vram 4GB), fast recipes, one repetition each
timeout 420 "$PY" scripts/bench.py --preset 1b --recipes linear,ties,dare_ties,slerp \
    --repeat 1 --device cuda --max-vram 4GB --workdir "$OUT/bench" \
    --out "$OUT/bench-1b.json" --markdown "$OUT/bench-1b.md" --quiet 2>&1 | tail -20
rm -rf "$OUT/bench/models" "$OUT/bench/out"  # keep only logs and results
"$PY" - "$OUT/bench-1b.json" <<'PYEOF'
import json, sys
try:
    result = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"no bench result: {e}")
for row in result["results"]:
    gpu = row.get("ours_gpu", {})
    print(row["recipe"], "cpu", row["ours"].get("wall_median_s"), "s; gpu",
          gpu.get("wall_median_s"), "s; vram peak", gpu.get("vram_peak"), row["ratios"])
PYEOF
