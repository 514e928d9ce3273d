"""Checkpoints that are safe to load, never destroy what was saved before, and fail loudly when they do not fit.

The format (``lash-checkpoint-v2``) holds only what ``torch.load(weights_only=True)`` reads:
tensors, dicts, lists, tuples, numbers, strings, booleans and ``None``. The training config is
stored as a dict and the Python and NumPy random states as tensors, so loading never unpickles
an arbitrary object and a crafted file cannot run code; a file holding anything else is refused
before any of it is built. Files of the older ``lash-checkpoint-v1`` format (which needed the
unsafe loader) are refused with the one-off conversion to run on a file you trust.

A checkpoint is written to a temporary name in the same directory and renamed over the target
(:func:`lash.files.write_atomic`), so an interrupted save leaves the previous checkpoint intact.
Loading checks the format and every model tensor's name and shape before anything is copied,
so a mismatched checkpoint raises ``ValueError`` and leaves the model as it was.
"""

from __future__ import annotations

import pickle
import pickletools
import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lash.files import write_atomic

FORMAT = "lash-checkpoint-v2"
# Config fields that only evaluation reads (the exit rule): a resumed run may change them.
EVALUATION_ONLY = ("routing_threshold", "exit_layer")
OLD_FORMAT = "lash-checkpoint-v1"
# What a v1 file holds besides tensors: the config object and NumPy's RNG state (NumPy 2 moved
# numpy.core to numpy._core). Anything else marks a foreign, possibly malicious, file.
_V1_GLOBALS = {
    "lash.config.TrainingConfig", "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
}  # fmt: skip

_PLAIN = (str, int, float, bool, type(None), torch.Tensor)
_SECTIONS = ("model", "optimizer", "trainer", "rng", "config", "extra")
_RNG = {
    "python": torch.Tensor, "python_version": int, "python_gauss": (float, type(None)), "numpy_kind": str,
    "numpy": torch.Tensor, "numpy_pos": int, "numpy_has_gauss": int, "numpy_gauss": float, "torch": torch.Tensor,
    "cuda": list,
}  # fmt: skip


def check_plain(value: Any, where: str) -> None:
    """Raise ``ValueError`` unless ``value`` is built only of what a safe load reads back."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain(key, f"{where} key")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise ValueError(
        f"{where} is a {type(value).__name__}; checkpoints hold only tensors, dicts, lists, tuples, "
        "numbers, strings, booleans and None"
    )


def save_atomic(payload: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` the payload (plus the format tag) to ``path`` through a temporary file."""
    payload = {"format": FORMAT} | payload
    check_plain(payload.get("extra", {}), "extra")
    check_plain(payload.get("config", {}), "config")
    write_atomic(Path(path), lambda f: torch.save(payload, f))


def _old_format_hint(path: Path) -> str:
    return (
        f"checkpoint {path} is in the older {OLD_FORMAT} format, which only an unsafe loader (one that can run "
        "code) reads; if you trust the file, convert it once with: python -c \"import torch; from lash import "
        f"checkpoint; checkpoint.save_atomic(checkpoint.upgrade_v1(torch.load('{path}', weights_only=False)), "
        f"'{path}.v2.pt')\" (README, 'Checkpoint format')"
    )


def _globals_named(path: Path) -> set[str]:
    """The ``module.name`` globals a pickle in ``path`` would import, read without unpickling:
    through torch for its zip format, else from a legacy pickle's opcodes; empty for a file that
    is not a pickle at all (cut short, or another format)."""
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        pass
    found, strings = set(), []
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name == "GLOBAL":
                    found.add(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:
        return found
    return found


def read_safely(path: str | Path) -> Any:
    """Read a ``torch.save`` file with ``torch.load(weights_only=True)``: tensors and plain values only.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated or corrupt, or holds Python objects other than tensors and
            plain containers (which could run code, and are never unpickled).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol is refused below or read safely: no noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        found = _globals_named(path)
        if "lash.config.TrainingConfig" in found and found <= _V1_GLOBALS:
            raise ValueError(_old_format_hint(path)) from None
        if not found:  # nothing that names code: the pickle is cut short or not one at all
            raise ValueError(f"{path} is not a LASH checkpoint (damaged or another format)") from None
        raise ValueError(
            f"checkpoint {path} was refused: it holds {', '.join(sorted(found))}, which loading could use to run "
            "code; LASH checkpoints hold only tensors and plain containers"
        ) from None
    except Exception:
        raise ValueError(f"{path} is not a LASH checkpoint (damaged or another format)") from None
    return payload


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` (through :func:`read_safely`) and check its layout.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable LASH v2 checkpoint (truncated, corrupt, another
            format, an old v1 file, or one holding Python objects other than tensors and plain
            containers, which could run code and are never unpickled).
    """
    path = Path(path)
    payload = read_safely(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        if found == OLD_FORMAT:
            raise ValueError(_old_format_hint(path))
        raise ValueError(f"{path} is not a LASH checkpoint (damaged or another format)")
    for section in _SECTIONS:
        if not isinstance(payload.get(section), Mapping):
            raise ValueError(f"checkpoint {path} is damaged: its {section!r} entry is missing or not a dict")
    rng = payload["rng"]
    for key, kind in _RNG.items():
        if not isinstance(rng.get(key), kind):
            raise ValueError(f"checkpoint {path} is damaged: its random state {key!r} is missing or of the wrong type")
    if rng["python"].shape != (625,) or rng["numpy"].shape != (624,) or rng["torch"].dtype != torch.uint8:
        raise ValueError(f"checkpoint {path} is damaged: its random states have the wrong shapes")
    return payload


def upgrade_v1(payload: dict[str, Any]) -> dict[str, Any]:
    """A v1 checkpoint's contents (already loaded, from a file you trust) in the v2 layout.

    Pass the result to :func:`save_atomic`; the README shows the one-off command.
    """
    if payload.get("format") != OLD_FORMAT:
        raise ValueError(f"upgrade_v1 needs a {OLD_FORMAT} payload, got format {payload.get('format')!r}")
    rng = payload["rng"]
    # v1 recorded neither the loss of a part-done epoch nor the run's settings (None: not compared).
    trainer = {key: value for key, value in payload["trainer"].items() if key != "data_epoch"}
    trainer |= {"partial_epoch_loss": [0.0, 0], "settings": None}
    config = payload["config"]
    return {
        "model": payload["model"],
        "optimizer": payload["optimizer"],
        "trainer": trainer,
        "rng": _encode_rng(rng["python"], rng["numpy"], rng["torch"], rng["cuda"]),
        "config": config if isinstance(config, dict) else config.as_dict(),
        "extra": payload["extra"],
    }


def check_model_state(state: Mapping[str, torch.Tensor], model: torch.nn.Module, path: str | Path) -> None:
    """Raise ``ValueError`` unless ``state`` has exactly the model's tensor names and shapes, a
    floating dtype where the model's tensor is floating (its own dtype otherwise) and finite values."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(own[name].shape):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"checkpoint {path} does not fit the model: {name} has shape {shape}, the model's is {tuple(own[name].shape)}"
            )
        floating = own[name].is_floating_point()
        if tensor.is_floating_point() != floating or (not floating and tensor.dtype != own[name].dtype):
            raise ValueError(f"checkpoint {path} does not fit the model: {name} is {tensor.dtype}, the model's is {own[name].dtype}")
        if floating and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"checkpoint {path} is damaged: {name} holds NaN or infinite values")


def check_optimizer_state(state: Mapping[str, Any], optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Raise ``ValueError`` unless ``state`` (an optimizer state dict) fits ``optimizer``: the
    same groups of as many parameters, and per-parameter tensors shaped like their parameter,
    floating and finite, with second moments (``*_sq``) and step counts ≥ 0."""
    groups, own = state.get("param_groups"), optimizer.param_groups
    if not isinstance(groups, list) or len(groups) != len(own):
        raise ValueError(f"checkpoint {path} has an optimizer with a different number of param groups")
    params = [p for group in own for p in group["params"]]
    for saved, mine in zip(groups, own):
        if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), list) or len(saved["params"]) != len(mine["params"]):
            raise ValueError(f"checkpoint {path} has an optimizer param group {mine.get('name', '?')} of another size")
    per_param = state.get("state")
    if not isinstance(per_param, Mapping):
        raise ValueError(f"checkpoint {path} is damaged: its optimizer state is missing")
    for index, values in per_param.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(values, Mapping):
            raise ValueError(f"checkpoint {path} is damaged: optimizer state entry {index!r} names no parameter")
        for key, value in values.items():
            _check_optimizer_value(value, key, params[index], f"checkpoint {path}: optimizer state {index}.{key}")


def _check_optimizer_value(value: Any, key: str, param: torch.Tensor, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (torch.Tensor, int, float)):
        return  # flags and other plain settings: the optimizer's own
    tensor = torch.as_tensor(value)
    if tensor.dim() and tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"{where} has shape {tuple(tensor.shape)}, its parameter's is {tuple(param.shape)}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{where} holds NaN or infinite values")
    if (key.endswith("_sq") or key == "step") and bool((tensor < 0).any()):
        raise ValueError(f"{where} is negative, which it cannot be")


def check_rng_state(rng: Mapping[str, Any], path: str | Path) -> None:
    """Raise ``ValueError`` unless the random states have the sizes this machine's generators take."""
    cuda = rng["cuda"]
    expected = torch.get_rng_state().numel()
    if rng["torch"].numel() != expected or rng["numpy_kind"] != "MT19937" or not 0 <= rng["numpy_pos"] <= 624:
        raise ValueError(f"checkpoint {path} is damaged: its random states have the wrong sizes")
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
        raise ValueError(f"checkpoint {path} is damaged: its CUDA random states are not byte tensors")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        if any(t.numel() != torch.cuda.get_rng_state(i).numel() for i, t in enumerate(cuda)):
            raise ValueError(f"checkpoint {path} is damaged: its CUDA random states have the wrong sizes")


def _encode_rng(python: tuple, numpy: tuple, torch_state: torch.Tensor, cuda: list) -> dict[str, Any]:
    version, words, gauss = python
    kind, keys, pos, has_gauss, cached = numpy
    return {
        "python": torch.tensor(words, dtype=torch.int64),
        "python_version": int(version),
        "python_gauss": gauss,
        "numpy_kind": str(kind),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(cached),
        "torch": torch_state,
        "cuda": list(cuda),
    }


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and CUDA) random states, as tensors and numbers."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return _encode_rng(random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda)


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state((state["numpy_kind"], keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def check_resumable(
    payload: dict[str, Any],
    path: str | Path,
    config: dict[str, Any],
    settings: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    has_scheduler: bool,
) -> None:
    """Raise ``ValueError`` unless ``payload`` was saved by a run set up like this one.

    Args:
        payload: what :func:`load` returned.
        path: the file, for messages.
        config: this run's ``TrainingConfig.as_dict()``; the exit rule (:data:`EVALUATION_ONLY`) may differ.
        settings: this run's trainer settings (accumulation, schedule, precision).
        optimizer: this run's optimizer, whose param groups' settings must match.
        has_scheduler: whether this run has a learning-rate schedule.
    """
    state = payload["trainer"]
    for key in ("epochs_trained", "global_step", "batches_into_epoch"):
        if isinstance(state.get(key), bool) or not isinstance(state.get(key), int) or state[key] < 0:
            raise ValueError(f"checkpoint {path} is damaged: its trainer {key} is {state.get(key)!r}")
    partial = state.get("partial_epoch_loss")
    if not (isinstance(partial, list) and len(partial) == 2 and isinstance(partial[0], float) and isinstance(partial[1], int)):
        raise ValueError(f"checkpoint {path} is damaged: its trainer partial_epoch_loss is {partial!r}")
    if "settings" not in state or not isinstance(state["settings"], (dict, type(None))) or not isinstance(state.get("scaler"), dict):
        raise ValueError(f"checkpoint {path} is damaged: its trainer settings or scaler state are missing")
    trained = {key: value for key, value in config.items() if key not in EVALUATION_ONLY}
    saved_config = payload["config"] if isinstance(payload["config"], dict) else {}
    if {key: value for key, value in saved_config.items() if key not in EVALUATION_ONLY} != trained:
        raise ValueError(f"checkpoint {path} was trained with {payload['config']}, this trainer has {config}")
    saved_settings = state["settings"] or settings  # None: converted from v1, which did not record them
    for key, mine in settings.items():
        if saved_settings.get(key) != mine:
            raise ValueError(f"checkpoint {path} was trained with {key}={saved_settings.get(key)!r}, this trainer has {key}={mine!r}")
    if (state.get("scheduler") is None) != (not has_scheduler):
        raise ValueError(f"checkpoint {path} and this trainer disagree on having a learning-rate schedule")
    schedule = state.get("scheduler")
    step = schedule.get("last_epoch") if isinstance(schedule, dict) else None
    if has_scheduler and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"checkpoint {path} is damaged: its learning-rate schedule is at step {step!r}")
    groups = payload["optimizer"].get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint {path} has an optimizer with a different number of param groups")
    for saved, own in zip(groups, optimizer.param_groups):
        # The schedule moves "lr" (its base is "initial_lr"); without one, "lr" is the setting. How
        # the step runs (fused, foreach, ...) is this machine's choice, not the run's.
        skip = {"params", "fused", "foreach", "capturable", "differentiable"} | ({"lr"} if has_scheduler else set())
        for key in sorted(own.keys() - skip):
            if saved.get(key) != own[key]:
                raise ValueError(
                    f"checkpoint {path} has {key}={saved.get(key)!r} in param group {own.get('name', '?')}, "
                    f"this optimizer has {own[key]!r}: create the optimizer with the checkpoint's settings"
                )


def save_run(path: str | Path, state: dict[str, Any], *, write: bool) -> None:
    """Save a training run's ``state`` (a trainer's ``state_dict()`` and ``extra``) with the RNG
    states, atomically; only processes with ``write`` write."""
    if Path(path).is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file")
    if write:
        save_atomic({**state, "rng": rng_state()}, path)
