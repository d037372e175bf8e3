"""``merge eval``: score a model on tasks, print a table or JSON, optionally record the card.

``register(app)`` adds the command to ``merge.cli.app``. The work is ``merge.eval.evaluate``
and, with ``--card``, ``merge.eval.card.record``; user errors are one line each, exit 2
(``merge.clihelp._guard``). Results go to stdout, the progress bar and notes to stderr.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from merge import options as opt
from merge.clihelp import _guard

ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="OUT",
        help="The model: a merge output directory, another local folder or a Hub id.",
        show_default=False,
    ),
]
TaskOpt = Annotated[
    list[str],
    typer.Option(
        "--task",
        "-t",
        metavar="KIND:ARG",
        help="A task (repeat for more): perplexity:FILE, choice:FILE, generate:FILE or "
        "lm_eval:NAME (needs the eval extra).",
        show_default=False,
    ),
]
BatchOpt = Annotated[
    int,
    typer.Option("--batch-size", "-b", metavar="N", help="Sequences per forward pass."),
]
LimitOpt = Annotated[
    int | None,
    typer.Option(
        "--limit",
        metavar="N",
        help="Score only each task's first N documents or questions.",
        show_default=False,
    ),
]
EvalDeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="Where the model runs: cpu (default), cuda, cuda:N, or auto (cuda if any).",
        show_default=False,
    ),
]
EvalJsonOpt = Annotated[bool, opt.flag("--json", help="Print the results as JSON.")]
CardOpt = Annotated[
    bool,
    opt.flag(
        "--card",
        help="Also record the results in OUT's model card (model-index) and update its "
        "manifest; OUT must be a merge output.",
    ),
]
RemoteCodeOpt = Annotated[
    bool,
    opt.flag(
        "--trust-remote-code/--no-trust-remote-code",
        help="Let transformers run the model's own code (danger).",
    ),
]


def eval_command(
    out: ModelArg,
    task: TaskOpt,
    batch_size: BatchOpt = 8,
    limit: LimitOpt = None,
    device: EvalDeviceOpt = None,
    as_json: EvalJsonOpt = False,
    card: CardOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
    quiet: opt.QuietOpt = False,
    help: opt.HelpOpt = False,
) -> None:
    """Score OUT on each --task and print a table (task, metric, value, n).

    Metrics have lm-eval's names: perplexity, acc, acc_norm, exact_match..."""
    import sys

    from merge.eval.run import evaluate
    from merge.settings import device_name

    def go() -> str:
        dev = device_name(device) if device is not None else None
        if card:
            from merge.eval.card import require_output

            require_output(out)  # before the model is loaded
        results = evaluate(
            out,
            task,
            batch_size=batch_size,
            limit=limit,
            device=dev,
            progress=not quiet and sys.stderr.isatty(),
            trust_remote_code=trust_remote_code,
        )
        if card:
            from merge.eval.card import record

            written = record(out, results)
            if not quiet:
                typer.echo(f"wrote {', '.join(f'{out}/{n}' for n in written)}", err=True)
        if as_json:
            return json.dumps(results.as_json(), indent=2)
        return results.table()

    typer.echo(_guard(go, quiet))


def register(app: typer.Typer) -> None:
    """Add ``merge eval`` to ``app``."""
    app.command(name="eval", add_help_option=False)(eval_command)
