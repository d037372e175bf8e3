"""The command line's options: typer declarations that ``merge.cli`` shares between commands.

Every option of ``mergekit-yaml`` and ``mergekit-moe`` is accepted, so a mergekit command line
works with ``merge run``. Those with a meaning here are ordinary options or second names of
ours (``--random-seed`` is ``--seed``, ``-j``/``--num-threads`` is ``--threads``, ``--cuda`` and
``--gpu-rich`` mean ``--device cuda``). The others change nothing, because what they switch on
is how this tool always works, or does not apply to it: each is declared with
``noop(..., reason=...)`` and, when given, records a notice (``notices(ctx)``) that the command
prints once, on stderr, unless ``--quiet``. Like mergekit, every boolean comes as
``--x/--no-x``.

Flags show as flags in ``--help``: an empty ``metavar`` replaces typer's ``<bool>``, and
``--help`` itself is declared here (``HelpOpt``) for the same reason.

What it does not do: act on the options (``merge.api`` and ``merge.settings`` do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

MERGEKIT_PANEL = "mergekit options"
NOOP_PANEL = "mergekit options with no effect here"
_NOTICES = "merge.notices"


def _show_help(ctx: typer.Context, value: bool) -> None:
    if value:
        typer.echo(ctx.get_help())
        raise typer.Exit()


def flag(*decls: str, help: str, panel: str | None = None) -> Any:
    """A boolean option, shown without a type."""
    return typer.Option(*decls, metavar="", help=help, show_default=False, rich_help_panel=panel)


def notices(ctx: typer.Context) -> list[str]:
    """The notices of the no-op options given to this command, in the order given."""
    return list(ctx.meta.get(_NOTICES, []))


def noop(*decls: str, reason: str, metavar: str = "", count: bool = False) -> Any:
    """An option that is accepted, changes nothing and leaves the notice ``<flag> has no
    effect: <reason>`` when given (in either form of a ``--x/--no-x`` pair)."""

    def note(ctx: typer.Context, param: typer.CallbackParam, value: Any) -> None:
        if value is None or (value == 0 and not isinstance(value, bool)):
            return  # not given (a count of 0: not given)
        given = param.secondary_opts[0] if value is False else _long_name(param.opts)
        ctx.meta.setdefault(_NOTICES, []).append(f"{given} has no effect: {reason}")

    return typer.Option(
        *decls,
        metavar=metavar,
        help=f"No effect: {reason}.",
        callback=note,
        expose_value=False,
        show_default=False,
        rich_help_panel=NOOP_PANEL,
        count=count,
    )


def _long_name(opts: list[str]) -> str:
    return next((o for o in opts if o.startswith("--")), opts[0])


# --- arguments and options of our own -------------------------------------------------------

HelpOpt = Annotated[
    bool,
    typer.Option(
        "--help",
        metavar="",
        is_eager=True,
        expose_value=False,
        callback=_show_help,
        help="Show this message and exit.",
    ),
]
RecipeArg = Annotated[
    Path, typer.Argument(metavar="RECIPE", help="The recipe (mergekit syntax).", show_default=False)
]
OutArg = Annotated[
    Path | None,
    typer.Argument(
        metavar="OUT",
        help="Output directory (default: ./<recipe stem>-merged).",
        show_default=False,
    ),
]
OutDirArg = Annotated[
    Path,
    typer.Argument(metavar="OUT", help="A merge output directory.", show_default=False),
]
OverwriteOpt = Annotated[bool, flag("--overwrite", help="Replace an existing output directory.")]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed",
        "--random-seed",
        metavar="N",
        help="Seed for random methods (default: the recipe's seed, else a fixed one).",
        show_default=False,
    ),
]
ShardOpt = Annotated[
    str,
    typer.Option(
        "--out-shard-size",
        metavar="SIZE",
        help="Largest output shard: 5B or 5GB (10^9 bytes), 500MB, 2GiB; at least 1MB.",
    ),
]
QuietOpt = Annotated[
    bool,
    flag("--quiet/--no-quiet", "-q", help="No progress bars, notices or warnings; errors only."),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        "-j",
        "--num-threads",
        metavar="N",
        help="Tensors merged at once (default: the cores available). Never changes the output.",
        show_default=False,
    ),
]
MemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        metavar="SIZE",
        help="Budget for tensor data in flight, e.g. 8GB (default: half the available RAM).",
        show_default=False,
    ),
]
VramOpt = Annotated[
    str | None,
    typer.Option(
        "--max-vram",
        metavar="SIZE",
        help="With --device cuda: budget for device memory in flight, e.g. 20GB "
        "(default: 80% of the free device memory).",
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        metavar="DEVICE",
        help="Where the method math runs: cpu (default), cuda, cuda:N, or auto (cuda if any).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, flag("--json", help="Print the plan as JSON.")]
IntermediateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--intermediate-dir",
        "-I",
        metavar="DIR",
        help="A multi-stage recipe's named stages are built in DIR/<name> "
        "(default: ./<recipe stem>-stages).",
        show_default=False,
    ),
]
LazyOpt = Annotated[
    bool,
    flag(
        "--lazy/--no-lazy",
        help="Multi-stage recipes: skip the stages that are up to date (default); --no-lazy "
        "rebuilds every stage.",
    ),
]
ResumeOpt = Annotated[
    bool,
    flag(
        "--resume",
        help="Continue an interrupted run into OUT from the tensors it finished (each "
        "re-verified by its sha256); the output is the same as an uninterrupted run's.",
    ),
]
LockedOpt = Annotated[
    bool,
    flag(
        "--locked",
        help="Require RECIPE's lock file, a recipe that matches it and inputs as it records "
        "them; else an error, nothing written.",
    ),
]
ModelsArg = Annotated[
    list[str] | None,
    typer.Argument(
        metavar="MODEL",
        help="With --update: refresh only these models (a reference as the recipe writes it, "
        "or a repo id or path for all its revisions).",
        show_default=False,
    ),
]
LicenseOpt = Annotated[
    str | None,
    typer.Option(
        "--license",
        metavar="ID",
        help="The model card's license (a Hub license id such as apache-2.0) instead of the "
        "one inferred from the input cards.",
        show_default=False,
    ),
]
CardWriteOpt = Annotated[
    bool,
    flag(
        "--write",
        help="Rewrite OUT's README.md and merge-card.json and update the manifest to match, "
        "instead of printing the card.",
    ),
]
UpdateOpt = Annotated[
    bool,
    flag(
        "--update",
        help="Resolve the models again (all, or the MODELs) instead of keeping locked entries.",
    ),
]
OutdatedJsonOpt = Annotated[bool, flag("--json", help="Print the comparison as JSON.")]

# --- mergekit's options with the same meaning -----------------------------------------------

CudaOpt = Annotated[
    bool, flag("--cuda/--no-cuda", help="Same as --device cuda.", panel=MERGEKIT_PANEL)
]
GpuRichOpt = Annotated[
    bool,
    flag(
        "--gpu-rich", help="Same as --device cuda (the rest has no effect).", panel=MERGEKIT_PANEL
    ),
]
CopyTokenizerOpt = Annotated[
    bool,
    flag(
        "--copy-tokenizer/--no-copy-tokenizer",
        help="Write the tokenizer files (default). A recipe tokenizer setting always writes them.",
        panel=MERGEKIT_PANEL,
    ),
]
WriteCardOpt = Annotated[
    bool,
    flag(
        "--write-model-card/--no-write-model-card",
        help="Write README.md, the model card (default).",
        panel=MERGEKIT_PANEL,
    ),
]
AllowCrimesOpt = Annotated[
    bool,
    flag(
        "--allow-crimes/--no-allow-crimes",
        help="Merge models of different architectures (config names or tensor sets) anyway, "
        "as the recipe's allow_mismatched_architectures: true does.",
        panel=MERGEKIT_PANEL,
    ),
]
StrictFiniteOpt = Annotated[
    bool,
    flag(
        "--strict-finite/--no-strict-finite",
        help="NaN/Inf in an input tensor is an error, not a warning.",
    ),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    flag(
        "--trust-remote-code/--no-trust-remote-code",
        help="Let transformers run the models' own code (danger).",
        panel=MERGEKIT_PANEL,
    ),
]
CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--transformers-cache",
        metavar="DIR",
        help="Where downloaded models are stored (default: the Hugging Face cache).",
        show_default=False,
        rich_help_panel=MERGEKIT_PANEL,
    ),
]

OutPathOpt = Annotated[
    Path | None,
    typer.Option(
        "--out-path",
        metavar="PATH",
        help="Same as OUT (mergekit-multi's name for it).",
        show_default=False,
        rich_help_panel=MERGEKIT_PANEL,
    ),
]

# --- mergekit's options with no effect here -------------------------------------------------

_LORA = "adapters are applied in float32 while the base is read; nothing is merged to disk"
_ROUTER = "the router's hidden states are computed layer by layer in float32"

LazyUnpickle = Annotated[
    bool | None,
    noop(
        "--lazy-unpickle/--no-lazy-unpickle",
        reason="inputs are always read lazily, tensor by tensor or chunk by chunk",
    ),
]
LowCpuMemory = Annotated[
    bool | None,
    noop(
        "--low-cpu-memory/--no-low-cpu-memory",
        reason="each result is written to its shard as soon as it is computed, so results "
        "never pile up in memory (--max-memory bounds the data in flight)",
    ),
]
ReadToGpu = Annotated[
    bool | None,
    noop(
        "--read-to-gpu/--no-read-to-gpu",
        reason="with --device cuda every input tensor is moved to the GPU as it is read",
    ),
]
MultiGpu = Annotated[
    bool | None,
    noop(
        "--multi-gpu/--no-multi-gpu",
        reason="the math runs on one device; pick it with --device cuda:N",
    ),
]
LoraMergeCache = Annotated[str | None, noop("--lora-merge-cache", reason=_LORA, metavar="DIR")]
LoraMergeDtype = Annotated[str | None, noop("--lora-merge-dtype", reason=_LORA, metavar="DTYPE")]
CloneTensors = Annotated[
    bool | None,
    noop("--clone-tensors/--no-clone-tensors", reason="a layer used twice is always written twice"),
]
SafeSerialization = Annotated[
    bool | None,
    noop("--safe-serialization/--no-safe-serialization", reason="output is always safetensors"),
]
AsyncWrite = Annotated[
    bool | None,
    noop(
        "--async-write/--no-async-write",
        reason="the workers always write each tensor to its shard as soon as it is merged",
    ),
]
WriteThreads = Annotated[
    int | None,
    noop(
        "--write-threads",
        reason="the merge workers write their own results (--threads sets how many)",
        metavar="N",
    ),
]
LoadIn4bit = Annotated[bool | None, noop("--load-in-4bit", reason=_ROUTER)]
LoadIn8bit = Annotated[bool | None, noop("--load-in-8bit", reason=_ROUTER)]
NotUseful = Annotated[
    bool | None,
    noop(
        "--i-understand-this-is-not-useful-without-training",
        reason="nothing here refuses an MoE whose experts are all the same model",
    ),
]
Verbose = Annotated[
    int,
    noop(
        "--verbose",
        "-v",
        reason="progress and warnings are shown without it (MERGE_DEBUG=1 shows tracebacks)",
        count=True,
    ),
]
