"""``merge evolve``: search a genome's merge parameters with CMA-ES (``merge.evolve.search``).

``register(app)`` adds the command to ``merge.cli.app``. One line per generation on stderr
(``gen 3: best 0.81 (mean 0.64) weight=[...]``), the summary on stdout; user errors are one
line each, exit 2 (``merge.clihelp._guard``).
"""

from __future__ import annotations

import re
from typing import Annotated

import typer

from merge import options as opt
from merge.clihelp import _guard

GenomeArg = Annotated[
    str,
    typer.Argument(
        metavar="GENOME",
        help="The evolve config: genome (models, merge_method, ...) and tasks.",
        show_default=False,
    ),
]
StorageOpt = Annotated[
    str,
    typer.Option(
        "--storage-path",
        metavar="DIR",
        help="Where the state, history.jsonl, best.yaml and progress.png go; rerunning the "
        "same command continues the run kept there.",
        show_default=False,
    ),
]
WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers", metavar="N", help="Candidates scored at once: 1 in process, more on Ray."
    ),
]
RayOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="ADDRESS",
        help="An existing Ray cluster (default: a local Ray instance when --workers > 1).",
        show_default=False,
    ),
]
MaxEvalsOpt = Annotated[
    int,
    typer.Option("--max-evals", metavar="N", help="Stop after N candidates (whole generations)."),
]
PopOpt = Annotated[
    int | None,
    typer.Option(
        "--popsize",
        metavar="N",
        help="Candidates per generation (default: CMA-ES's).",
        show_default=False,
    ),
]
SigmaOpt = Annotated[
    float, typer.Option("--sigma0", metavar="X", help="CMA-ES's initial step size.")
]
SeedOpt = Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the search.")]
TimeOpt = Annotated[
    str | None,
    typer.Option(
        "--time-limit",
        metavar="TIME",
        help="Stop after this long (seconds, or 90s, 30m, 2h), checked between generations.",
        show_default=False,
    ),
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", "-b", metavar="N", help="Sequences per forward pass.")
]
DeviceOpt = Annotated[
    str, typer.Option("--device", metavar="DEVICE", help="Where candidates are merged and scored.")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        metavar="N",
        help="Torch threads per worker (default: all cores in process, 1 per Ray actor).",
        show_default=False,
    ),
]

UNITS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1.5h`` -> seconds; MergeError otherwise."""
    from merge.errors import MergeError

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise MergeError(f"--time-limit: expected seconds or like 30m, 2h, got '{text}'")
    return float(m.group(1)) * UNITS[m.group(2)]


def evolve_command(
    genome: GenomeArg,
    storage_path: StorageOpt,
    workers: WorkersOpt = 1,
    ray_address: RayOpt = None,
    max_evals: MaxEvalsOpt = 100,
    popsize: PopOpt = None,
    sigma0: SigmaOpt = 1 / 6,
    seed: SeedOpt = 0,
    time_limit: TimeOpt = None,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    quiet: opt.QuietOpt = False,
    help: opt.HelpOpt = False,
) -> None:
    """Search GENOME's merge parameters with CMA-ES, scoring in-memory merges on its tasks.

    Writes DIR/best.yaml (a recipe for merge run), DIR/history.jsonl and DIR/progress.png."""

    def go() -> str:
        from merge.evolve.search import evolve
        from merge.settings import device_name

        limit = parse_duration(time_limit) if time_limit is not None else None
        result = evolve(
            genome,
            storage_path,
            workers=workers,
            ray_address=ray_address,
            max_evals=max_evals,
            popsize=popsize,
            sigma0=sigma0,
            seed=seed,
            time_limit=limit,
            batch_size=batch_size,
            device=device_name(device),
            threads=threads,
            echo=None if quiet else (lambda s: typer.echo(s, err=True)),
        )
        if not quiet:
            for w in result.warnings:
                typer.echo(f"warning: {w}", err=True)
        best = result.best
        score = f"best score {best['score']:.6g}" if best else "no candidate scored"
        return (
            f"{result.stopped}: {result.generations} generations, {result.evals} candidates, "
            f"{score}; recipe: {result.storage / 'best.yaml'}"
        )

    typer.echo(_guard(go, quiet))


def register(app: typer.Typer) -> None:
    """Add ``merge evolve`` to ``app``."""
    app.command(name="evolve", add_help_option=False)(evolve_command)
