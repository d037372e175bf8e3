"""merge evolve: searching recipe parameters by merging and scoring candidates.

``inmemory`` merges a candidate recipe straight into a live model's parameters through the
normal planner and executor (``InMemoryMerger``); ``target`` builds that model and the sink
that fills it. ``config`` parses mergekit-evolve's config, ``genome`` maps a parameter vector
to a recipe; ``search`` runs CMA-ES (``evolve``) with ``workers`` (in process or Ray actors),
``store`` (the resumable storage directory) and ``outputs`` (best.yaml, progress.png).
"""

from merge.evolve.inmemory import InMemoryMerger
from merge.evolve.search import evolve

__all__ = ["InMemoryMerger", "evolve"]
