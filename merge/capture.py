"""Third-party warnings and log records during a command: each shown once, or none with -q.

``captured(show)`` is a ``with`` block around a command. Inside it:

- Python warnings (``warnings.warn``, e.g. transformers' FutureWarnings) keep the filters in
  force (``-W error`` still raises) but are handed to ``show`` as ``Category: message``
  instead of being printed;
- log records of any logger at WARNING or above go to ``show`` as ``logger: message``, where
  ``logger`` is the top-level package (``transformers``, ``huggingface_hub``). Libraries that
  print through a handler of their own (transformers adds a stderr handler to its
  ``transformers`` logger and stops propagation when it is first imported, which may happen
  during the command) are rerouted when their first record is made: the log-record factory
  takes the handlers off the record's logger and its ancestors and lets the record propagate
  to one handler on the root logger. Everything is put back at the end of the block.

``show`` gets each distinct text once; ``show=None`` (``--quiet``) drops everything.

What it does not do: capture output that libraries print directly (``print``, progress bars
written to stderr) or records below WARNING.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class _Once:
    """Calls ``show`` with each distinct text once."""

    def __init__(self, show: Callable[[str], None] | None):
        self.show = show
        self.seen: set[str] = set()

    def __call__(self, text: str) -> None:
        if self.show is not None and text not in self.seen:
            self.seen.add(text)
            self.show(text)


class _Handler(logging.Handler):
    def __init__(self, emit: _Once):
        super().__init__(logging.WARNING)
        self.once = emit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in someone else's log call
            message = str(record.msg)
        self.once(f"{record.name.split('.')[0]}: {message.strip()}")


class _Rerouter:
    """Takes the handlers off loggers (saving them) so their records reach the root's."""

    def __init__(self) -> None:
        self.saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []

    def chain(self, name: str) -> None:
        """``name``'s logger and its ancestors below the root: no handlers, propagating."""
        if name == logging.root.name:
            return
        logger: logging.Logger | None = logging.getLogger(name)
        while logger is not None and logger is not logging.root:
            if logger.handlers or not logger.propagate:
                self.saved.append((logger, list(logger.handlers), logger.propagate))
                for h in list(logger.handlers):
                    logger.removeHandler(h)
                logger.propagate = True
            logger = logger.parent

    def restore(self) -> None:
        for logger, handlers, propagate in reversed(self.saved):
            for h in handlers:
                logger.addHandler(h)
            logger.propagate = propagate
        self.saved.clear()


@contextmanager
def captured(show: Callable[[str], None] | None) -> Iterator[None]:
    """Third-party warnings and log records inside the block go to ``show``, once each."""
    once = _Once(show)
    handler = _Handler(once)
    rerouter = _Rerouter()
    factory = logging.getLogRecordFactory()

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        rerouter.chain(record.name)
        return record

    def show_warning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        once(f"{category.__name__}: {message}")

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        logging.root.addHandler(handler)
        logging.setLogRecordFactory(make_record)
        try:
            yield
        finally:
            logging.setLogRecordFactory(factory)
            logging.root.removeHandler(handler)
            rerouter.restore()
