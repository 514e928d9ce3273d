"""What an ASHEM run keeps in its ``--out`` directory, so that a stopped run loses at most one epoch.

Layout::

    OUT/ashem_run.json               the run's settings; a rerun into OUT must match them to continue
    OUT/seed-42/phase1-checkpoint.pt phase 1's last finished epoch (while phase 1 runs)
    OUT/seed-42/phase1_model.pt      phase 1 finished: its kept model, figures and random state
    OUT/seed-42/phase1.json, .md     phase 1's figures, for people
    OUT/seed-42/phase2-checkpoint.pt phase 2's last finished epoch (while phase 2 runs)
    OUT/seed-42/phase2_model.pt      the run finished: the phase-2 model
    OUT/seed-42/result.json          the run finished: everything it measured
    OUT/results.json, .md, *.png     the report over the finished runs (lash.report)

Every file is written atomically (:mod:`lash.files`), and the model files are read with
``torch.load(weights_only=True)``, so neither an interrupt nor a crafted file can do harm. A
checkpoint is deleted once the phase it belongs to is kept in full.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lash.ashem import ASHEMResult, PhaseOne
from lash.checkpoint import check_model_state, check_plain, read_safely
from lash.files import write_atomic
from lash.models import DeepSupervisionTransformer
from lash.report import phase1_markdown

MANIFEST = "ashem_run.json"


def _load_model_file(path: Path) -> dict[str, Any]:
    try:
        payload = read_safely(path)
    except ValueError as error:
        raise ValueError(f"{error}; delete it to redo that phase") from None
    keys = {"model_args": dict, "model": dict, "summary": dict, "rng": dict}
    if not isinstance(payload, dict) or not all(isinstance(payload.get(k), kind) for k, kind in keys.items()):
        raise ValueError(f"{path} is not an ASHEM phase-1 file; delete it to redo that phase")
    return payload


class SeedStore:
    """The files of one seed's run under ``OUT/seed-{seed}``."""

    def __init__(self, root: Path, seed: int) -> None:
        self.dir = root / f"seed-{seed}"
        self.phase1_checkpoint = self.dir / "phase1-checkpoint.pt"
        self.phase2_checkpoint = self.dir / "phase2-checkpoint.pt"
        self.phase1_model = self.dir / "phase1_model.pt"
        self.result_file = self.dir / "result.json"

    def load_result(self) -> ASHEMResult | None:
        """The finished run, or ``None``."""
        if not self.result_file.is_file():
            return None
        try:
            return ASHEMResult(**json.loads(self.result_file.read_text()))
        except (ValueError, TypeError) as error:
            raise ValueError(f"{self.result_file} is damaged ({error}); delete it to redo phase 2") from None

    def load_phase1(self, device: torch.device) -> PhaseOne | None:
        """Finished phase 1 (its kept model on ``device``), or ``None``."""
        if not self.phase1_model.is_file():
            return None
        payload = _load_model_file(self.phase1_model)
        model = DeepSupervisionTransformer(**payload["model_args"])
        check_model_state(payload["model"], model, self.phase1_model)
        model.load_state_dict(payload["model"])
        return PhaseOne(model.to(device), payload["summary"], payload["rng"])

    def save_phase1(self, phase1: PhaseOne, seed: int) -> list[Path]:
        """Keep finished phase 1: its model, figures and random state; drop its epoch checkpoint."""
        model = phase1.model
        args = dict(vocab_size=model.vocab_size, dim=model.dim, num_layers=model.num_layers, num_heads=model.num_heads,
                    ffn_dim=model.layers[0].ffn.w1.out_features, max_seq_len=model.max_seq_len)  # fmt: skip
        state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
        payload = {"model_args": args, "model": state, "summary": phase1.summary, "rng": phase1.rng}
        check_plain(payload, "phase 1")
        write_atomic(self.phase1_model, lambda f: torch.save(payload, f))
        figures = self.dir / "phase1.json"
        write_atomic(figures, json.dumps(phase1.summary, indent=2, default=float).encode())
        report = self.dir / "phase1.md"
        write_atomic(report, phase1_markdown(phase1.summary, seed).encode())
        self.phase1_checkpoint.unlink(missing_ok=True)
        return [self.phase1_model, figures, report]

    def save_result(self, result: ASHEMResult, model: DeepSupervisionTransformer) -> list[Path]:
        """Keep the finished run: the phase-2 model and everything measured; drop phase 2's checkpoint."""
        model_file = self.dir / "phase2_model.pt"
        state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
        write_atomic(model_file, lambda f: torch.save({"model": state}, f))
        write_atomic(self.result_file, json.dumps(result.to_dict(), indent=2, default=float).encode())
        self.phase2_checkpoint.unlink(missing_ok=True)
        return [model_file, self.result_file]

    def describe(self) -> str:
        """What is kept, in words."""
        if self.result_file.is_file():
            return f"finished ({self.result_file})"
        kept = []
        if self.phase1_model.is_file():
            kept.append(f"phase 1 finished ({self.phase1_model}, phase1.md)")
        elif self.phase1_checkpoint.is_file():
            kept.append(f"phase 1's last finished epoch ({self.phase1_checkpoint})")
        if self.phase2_checkpoint.is_file():
            kept.append(f"phase 2's last finished epoch ({self.phase2_checkpoint})")
        return "; ".join(kept) or "nothing yet"


class ASHEMStore:
    """An ASHEM run's ``--out`` directory: its settings, and one :class:`SeedStore` per seed.

    Args:
        out: the directory (created if needed).
        settings: the run's settings that a continued run must share (plain values).
    """

    def __init__(self, out: str | Path, settings: dict[str, Any]) -> None:
        self.out, self.settings = Path(out), settings

    def open(self, overwrite: bool = False, resume: bool = False) -> bool:
        """Start or continue the run in ``out``; returns whether an earlier run is continued.

        Raises:
            ValueError: ``resume`` with no run in ``out``, or a run there with other settings
                (without ``overwrite``, which discards its kept work instead).
        """
        manifest = self.out / MANIFEST
        if manifest.is_file() and overwrite:
            for seed_dir in self.out.glob("seed-*"):
                shutil.rmtree(seed_dir)
            manifest.unlink()
        if not manifest.is_file():
            if resume:
                raise ValueError(f"--resume: {self.out} holds no ASHEM run to continue")
            write_atomic(manifest, json.dumps({"settings": self.settings}, indent=2).encode())
            return False
        try:
            saved = json.loads(manifest.read_text())["settings"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{manifest} is damaged; pass --overwrite to start the run in {self.out} afresh") from None
        for name in sorted(set(saved) | set(self.settings)):
            if saved.get(name) != self.settings.get(name):
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{self.out} holds an ASHEM run with {flag} {saved.get(name)!r}, not {self.settings.get(name)!r}: "
                    f"rerun with its settings to continue it, pass --overwrite to discard it, or choose another --out"
                )
        return True

    def seed(self, seed: int) -> SeedStore:
        return SeedStore(self.out, seed)

    def describe(self, seeds: list[int]) -> str:
        """One line per seed: what is kept."""
        return "\n".join(f"  seed {seed}: {self.seed(seed).describe()}" for seed in seeds)
