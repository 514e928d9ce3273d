"""Checkpoints that never destroy what was saved before, and that fail loudly when they do not fit.

A checkpoint is one ``torch.save`` file written to a temporary name in the same directory and
renamed over the target, so an interrupted save leaves the previous checkpoint intact. Loading
checks the format and every model tensor's name and shape before anything is copied, so a
mismatched checkpoint raises ``ValueError`` and leaves the model as it was.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "lash-checkpoint-v1"


def save_atomic(payload: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": FORMAT} | payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable LASH checkpoint (truncated, corrupt, other format).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"checkpoint {path} is unreadable or corrupt ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a {FORMAT} file")
    return payload


def check_model_state(state: dict[str, torch.Tensor], model: torch.nn.Module, path: str | Path) -> None:
    """Raise ``ValueError`` unless ``state`` has exactly the model's tensor names and shapes."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(
                f"checkpoint {path} does not fit the model: {name} has shape {tuple(tensor.shape)}, "
                f"the model's is {tuple(own[name].shape)}"
            )


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) random states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

