"""Merges as builds: what an output was made from, and whether it is still what it claims.

- ``hashing``: streamed sha256 of files, cached by (path, size, mtime).
- ``inputs``: the identity of each resolved input (Hub commit or local folder, and the
  size and sha256 of every file a merge uses), shared by locks, manifests and stage keys.

Locks, manifests, ``verify``, ``outdated``, multi-stage recipes and ``rebuild`` are modules of
this package too.
"""
