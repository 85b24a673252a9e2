"""transformers' own messages, relayed through dynq's logging with their control characters made visible.

transformers logs through a logger of its own that writes straight to stderr (it does not propagate), and warns
through `warnings`: both print what config.json holds as it is, so a crafted `rope_type` could carry an OSC 8
hyperlink or a colour change to the terminal. While a checkpoint is opened, its records and warnings are taken
and logged again, cleaned, from dynq's logger (where the CLI's handler shows them like any other line).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from dynq.core.visible import clean

THIRD_PARTY_LOGGERS = ("transformers",)


class _Relay(logging.Handler):
    def __init__(self, to: logging.Logger) -> None:
        super().__init__()
        self.to = to

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: show the format alone
            text = str(record.msg)
        self.to.log(record.levelno, "%s: %s", record.name.split(".")[0], clean(text))


@contextmanager
def relayed(to: logging.Logger) -> Iterator[None]:
    """Within the block, transformers' log records and every Python warning are logged by `to`, cleaned."""
    relay = _Relay(to)
    saved = []
    for name in THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [relay]
        logger.propagate = False
    with warnings.catch_warnings(record=True) as caught:
        try:
            yield
        finally:
            for logger, handlers, propagate in saved:
                logger.handlers = handlers
                logger.propagate = propagate
            for w in caught:
                to.warning("%s: %s", w.category.__name__, clean(w.message))
