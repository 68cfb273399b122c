"""Console messages: one logger for the project, configured once by the command line."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("dppmg")


def setup_logging(verbose: bool = False) -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[dppmg] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
