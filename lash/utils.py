"""What every part of a run shares: seeding, progress lines for people watching it, durations."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger("lash")


def log_progress(line: str, verbose: bool, is_main: bool = True) -> None:
    """Log a progress line, and with ``verbose`` print it (beside the tqdm bars) unless a
    logging handler already shows it, so it appears once; rank 0 (``is_main``) only."""
    if not is_main:
        return
    logger.info(line)
    if verbose and not (logger.isEnabledFor(logging.INFO) and logger.hasHandlers()):
        tqdm.write(line)


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 07 s"``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
