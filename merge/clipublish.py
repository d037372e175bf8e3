"""``merge publish`` and the publishing options that ``merge run`` / ``merge rebuild`` share
with it (``--push-to-hub REPO_ID``), over ``merge.hub.publish``.

``Publishing`` holds the options; ``publisher()`` checks the token first (so a missing one
fails before a long build) and returns the function a build calls with its output. The
one-line result goes to stdout (``merge publish``), to stderr after ``merge run`` (unless
``--quiet``), and ends ``merge rebuild``'s summary line. Errors are ``merge.clihelp``'s: one
line each, exit 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from merge import options as opt
from merge.clihelp import _guard

PANEL = "Publishing"

RepoIdArg = Annotated[
    str,
    typer.Argument(metavar="REPO_ID", help="The Hub model repo: org/name.", show_default=False),
]
PushToHubOpt = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="REPO_ID",
        help="After a successful build, publish OUT to this Hub repo (as merge publish).",
        show_default=False,
        rich_help_panel=PANEL,
    ),
]
PrivateOpt = Annotated[
    bool, opt.flag("--private", help="Create the repo private (when it is new).", panel=PANEL)
]
RevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        metavar="BRANCH",
        help="Branch to publish to, created if missing (default: main).",
        show_default=False,
        rich_help_panel=PANEL,
    ),
]
CreatePrOpt = Annotated[
    bool,
    opt.flag(
        "--create-pr", help="Open a pull request instead of pushing; print its URL.", panel=PANEL
    ),
]
CommitMessageOpt = Annotated[
    str | None,
    typer.Option(
        "--commit-message",
        metavar="TEXT",
        help="The commit's message.",
        show_default=False,
        rich_help_panel=PANEL,
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        metavar="TOKEN",
        help="Hub token with write access (default: HF_TOKEN, else the `hf auth login` one).",
        show_default=False,
        rich_help_panel=PANEL,
    ),
]
DeleteExtraOpt = Annotated[
    bool,
    opt.flag("--delete-extra", help="Delete the repo's files that OUT does not have.", panel=PANEL),
]


@dataclass
class Publishing:
    """The publishing options of one command line."""

    repo_id: str | None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    token: str | None = None
    delete_extra: bool = False
    quiet: bool = False

    def publisher(self, echo: Callable[[str], None] | None = None) -> Callable[[Path], str] | None:
        """None without a repo; else check the token now and return ``publish(out)``, which
        returns the one-line result and ``echo``es it too when given."""
        from merge.hub import publish, resolve_token

        if self.repo_id is None:
            return None
        repo_id, token = self.repo_id, resolve_token(self.token)

        def go(out: Path) -> str:
            result = publish(
                out,
                repo_id,
                token=token,
                private=self.private,
                revision=self.revision,
                create_pr=self.create_pr,
                commit_message=self.commit_message,
                delete_extra=self.delete_extra,
                progress=not self.quiet,
            )
            if echo is not None:
                echo(result.summary())
            return result.summary()

        return go


def publish(
    out: opt.OutDirArg,
    repo_id: RepoIdArg,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    create_pr: CreatePrOpt = False,
    commit_message: CommitMessageOpt = None,
    token: TokenOpt = None,
    delete_extra: DeleteExtraOpt = False,
    quiet: opt.QuietOpt = False,
    help: opt.HelpOpt = False,
) -> None:
    """Upload the merge output OUT to the Hub model repo REPO_ID (created if missing).

    OUT must pass merge verify first. Only the files whose content changed are uploaded.

    One commit per publish; an unchanged OUT uploads nothing; a rerun resumes an upload."""
    options = Publishing(
        repo_id, private, revision, create_pr, commit_message, token, delete_extra, quiet
    )

    def go() -> None:
        send = options.publisher(echo=typer.echo)
        assert send is not None
        send(out)

    _guard(go, quiet)
