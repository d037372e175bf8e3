"""Third-party warnings and log records during a command: once each as ``warning:``, none
with ``-q``, whether the library set up its logging before or during the command."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from merge.capture import captured
from merge.cli import app

runner = CliRunner()


class Recorder(logging.Handler):
    """Stands in for a library's own stderr handler."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


@pytest.fixture
def library() -> Iterator[tuple[logging.Logger, Recorder]]:
    """A library root logger configured like transformers': its own handler, no propagation."""
    logger = logging.getLogger("fakelib")
    handler = Recorder()
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    yield logger, handler
    logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def noisy(times: int = 2) -> None:
    for _ in range(times):
        warnings.warn("`past_key_values` is deprecated", FutureWarning, stacklevel=1)
        logging.getLogger("fakelib.modeling").warning("Some weights were not used")
        logging.getLogger("fakelib.modeling").info("below the level: never shown")


def test_each_distinct_warning_and_record_once(library: tuple[logging.Logger, Recorder]) -> None:
    logger, own = library
    before = list(logger.handlers)  # own, and those pytest adds to non-propagating loggers
    shown: list[str] = []
    with captured(shown.append):
        noisy()
        warnings.warn("another one", UserWarning, stacklevel=1)
    assert shown == [
        "FutureWarning: `past_key_values` is deprecated",
        "fakelib: Some weights were not used",
        "UserWarning: another one",
    ]
    assert own.records == []  # the library's own handler printed nothing
    assert logger.handlers == before and logger.propagate is False  # put back
    logging.getLogger("fakelib.modeling").warning("after")
    assert own.records == ["after"]


def test_quiet_drops_everything(library: tuple[logging.Logger, Recorder]) -> None:
    with captured(None):
        noisy()
    assert library[1].records == []


def test_a_library_that_sets_up_its_logging_during_the_command() -> None:
    """Like transformers imported mid-command: the handler arrives inside the block."""
    own = Recorder()
    shown: list[str] = []
    logger = logging.getLogger("latelib")
    try:
        with captured(shown.append):
            logger.addHandler(own)
            logger.propagate = False
            logging.getLogger("latelib.sub").warning("late %s", "news")
            logging.getLogger("latelib.sub").warning("late %s", "news")
        assert shown == ["latelib: late news"] and own.records == []
        assert own in logger.handlers and logger.propagate is False
    finally:
        logger.removeHandler(own)
        logger.propagate = True


def test_warning_filters_still_apply() -> None:
    with captured(lambda text: None), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with pytest.raises(FutureWarning):
            warnings.warn("now an error", FutureWarning, stacklevel=1)


def test_transformers_logger_is_rerouted_and_restored() -> None:
    from transformers.utils import logging as hf_logging

    root = logging.getLogger("transformers")
    before = (list(root.handlers), root.propagate)
    shown: list[str] = []
    with captured(shown.append):
        hf_logging.get_logger("transformers.modeling_utils").warning("from transformers")
    assert shown == ["transformers: from transformers"]
    assert (list(root.handlers), root.propagate) == before


# --- through the command line -------------------------------------------------------------------


@pytest.fixture
def noisy_validate(tmp_path: Path, llama_base: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A recipe whose ``merge validate`` makes third-party warnings and log records."""
    import merge.report

    summary = merge.report.summary

    def loud_summary(*args: Any, **kwargs: Any) -> Any:
        noisy()
        return summary(*args, **kwargs)

    monkeypatch.setattr(merge.report, "summary", loud_summary)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump({"merge_method": "passthrough", "models": [{"model": str(llama_base)}]})
    )
    return recipe


def test_cli_shows_third_party_warnings_once(
    noisy_validate: Path,
    library: tuple[logging.Logger, Recorder],
    capfd: pytest.CaptureFixture[str],
) -> None:
    result = runner.invoke(app, ["validate", str(noisy_validate)])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: FutureWarning: `past_key_values` is deprecated",
        "warning: fakelib: Some weights were not used",
    ]
    assert library[1].records == []
    assert capfd.readouterr().err == ""


def test_cli_quiet_silences_third_party_warnings(
    noisy_validate: Path,
    library: tuple[logging.Logger, Recorder],
    capfd: pytest.CaptureFixture[str],
) -> None:
    result = runner.invoke(app, ["validate", str(noisy_validate), "-q"])
    assert result.exit_code == 0
    assert result.stderr == "" and library[1].records == []
    assert capfd.readouterr().err == ""
