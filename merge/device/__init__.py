"""The GPU path of the executor: streamed jobs chunk by chunk on a device.

- ``backend``: the few device operations the pipeline uses (pinned buffers, asynchronous
  copies on streams, events), for CUDA and for a simulated device on CPU tensors whose copies
  really are deferred until an event is waited on, so the scheduling runs and is checked in
  the default test suite without a GPU;
- ``chunks``: ``device_merge_chunks``, ``merge.methods.stream.merge_chunks`` with host to
  device copies of chunk ``i + 1`` overlapped with the compute of chunk ``i`` (double
  buffering) and results coming back through pinned buffers;
- ``vram``: the ``--max-vram`` budget and each job's device-memory estimate.

Equality with the CPU. Chunk bounds, pass order, random draws (CPU generators, moved to the
device) and the exact integer cuts (radix histograms) are the CPU executor's, and float32
``+``, ``*`` and casts are IEEE on both, so elementwise methods (``linear``) give the CPU's
bytes. Where a method reduces (float sums over a chunk or over models: ``slerp``'s norms and
dot product, ``model_stock``'s and ``sce``'s statistics, the ``l1`` rescales, the spherical
family's Gram matrices), the CPU sums with numpy's fixed pairwise order and the GPU with its
reduction kernels, so results may differ by float rounding; ``tests/test_gpu_cuda.py``
bounds the difference and records, per method, how many tensors came out bit-identical.
GPU runs are deterministic run to run: CUDA's sum, sort and cumsum kernels do not use float
atomics, the only atomics (``bincount``) count integers, and chunking never depends on
threads or budgets.

What it does not do: choose which jobs run on the device (``merge.execute``) or admit jobs
(``merge.pipeline.run_jobs``).
"""
