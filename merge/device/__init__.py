"""The GPU path of the executor: streamed jobs chunk by chunk on a device.

- ``backend``: the few device operations the pipeline uses (pinned buffers, asynchronous
  copies on streams, events), for CUDA and for a simulated device on CPU tensors whose copies
  really are deferred until an event is waited on, so the scheduling runs and is checked in
  the default test suite without a GPU;
- ``chunks``: ``device_merge_chunks``, ``merge.methods.stream.merge_chunks`` with host to
  device copies of chunk ``i + 1`` overlapped with the compute of chunk ``i`` (double
  buffering) and results coming back through pinned buffers;
- ``vram``: the ``--max-vram`` budget and each job's device-memory estimate.

What it does not do: choose which jobs run on the device (``merge.execute``) or admit jobs
(``merge.pipeline.run_jobs``).
"""
