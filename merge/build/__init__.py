"""Merges as builds: what an output was made from, and whether it is still what it claims.

- ``hashing``: streamed sha256 of files, cached by (path, size, mtime).
- ``inputs``: the identity of each resolved input (Hub commit or local folder, and the
  size and sha256 of every file a merge uses), shared by locks, manifests and stage keys.
- ``stages``: a multi-stage recipe (mergekit-multi) parsed into checked stages, in build order.
- ``multistage``: every stage planned before any is built; each stage's content key.
- ``stagerun``: the build, stage by stage, rebuilding only those whose key changed.

Locks, manifests, ``verify``, ``outdated`` and ``rebuild`` are modules of this package too.
"""
