"""One entry point for building a recipe file, one stage or several.

``run_file`` loads the file: a single recipe goes to ``merge.api.run``, a multi-stage one to
``merge.build.stagerun.run_stages``, both with the same ``Settings`` (the options that change
what is built) and reporting options. ``merge run`` and ``merge rebuild`` both build through
it, so a rebuild is exactly the run a user would type.

What this module does not do: decide whether to build (``merge.build.rebuild``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from merge.build.multistage import Settings


def run_file(
    recipe: str | Path,
    out: str | Path | None,
    *,
    settings: Settings,
    overwrite: bool = False,
    intermediate_dir: str | Path | None = None,
    lazy: bool = True,
    report: Callable[[str], None] | None = None,
    **common: Any,
) -> str:
    """Build ``recipe`` into ``out``; the one-line summary (``wrote OUT`` or the stages')."""
    from merge import api
    from merge.build.stagerun import run_stages
    from merge.build.stages import Stages, load

    loaded = load(Path(recipe))
    if isinstance(loaded, Stages):
        done = run_stages(
            loaded,
            out,
            intermediate_dir=intermediate_dir,
            lazy=lazy,
            overwrite=overwrite,
            settings=settings,
            report=report,
            **common,
        )
        return done.summary()
    wrote = api.run(loaded, out, overwrite=overwrite, **settings.run_options(), **common)
    return f"wrote {wrote}"
