"""merge evolve: searching recipe parameters by merging and scoring candidates.

``inmemory`` merges a candidate recipe straight into a live model's parameters through the
normal planner and executor (``InMemoryMerger``); ``target`` builds that model and the sink
that fills it. The search itself (CMA-ES, workers, resumable state) is not here yet.
"""

from merge.evolve.inmemory import InMemoryMerger

__all__ = ["InMemoryMerger"]
