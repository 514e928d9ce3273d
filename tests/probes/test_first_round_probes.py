"""Probes of the first reliability campaign, one per defect it found, kept so none comes back.

Each probe states what must happen: a named ``ValueError`` (CLI: exit 2 and one line naming
the flag and value), a correct result, or files left as they were. The deeper tests of the same
behaviour (exact resume, malicious pickles, published report sets) live beside the code they
test, in ``tests/lash/``.
"""

import re

import pytest
import torch

from lash import ASHEMConfig, DeepSupervisionTransformer, StandardTransformer, Trainer, TrainingConfig, calibrate_threshold
from lash.data import load_dataset
from lash.generation import generate
from lash.routing import early_exit_forward
from tests.lash.test_cli import ARGS, run_cli
from tests.probes.test_training_probes import _main, _one_line_error

V = 30


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--epochs", "0"], r"--epochs=0 must be an int >= 1"),
        (["--max-steps", "0"], r"--max-steps=0 must be an int >= 1"),
        (["--stop-at-step", "-1"], r"--stop-at-step=-1 must be an int >= 1"),
        (["--grad-accum", "0"], r"--grad-accum=0 must be an int >= 1"),
        (["--grad-clip", "-1"], r"--grad-clip=-1"),
        (["--device", "tpu"], r"--device"),
        (["--val-samples", "0"], r"--val-samples=0"),
        (["--max-vocab", "0"], r"--max-vocab=0"),
        (["--layer-weights", "1:0.5,1:0.5"], r"names layer 1 more than once"),
    ],
)  # fmt: skip
def test_a_bad_flag_of_the_first_round_is_one_line(tmp_path, capsys, flags, message):
    """Exit 2, one line naming the flag and the value; no traceback, nothing trained."""
    assert _main([*ARGS, "--out", str(tmp_path / "run"), *flags]) == 2
    assert re.search(message, _one_line_error(capsys))


def test_out_naming_a_file_is_refused_before_training(tmp_path, capsys):
    """--out that is a file: exit 2 before any epoch, the file untouched."""
    target = tmp_path / "file"
    target.write_bytes(b"keep")
    assert _main([*ARGS, "--out", str(target)]) == 2
    assert "is a file, not a directory" in _one_line_error(capsys) and target.read_bytes() == b"keep"


def test_a_new_run_never_replaces_an_earlier_checkpoint(tmp_path, capsys):
    """A second run into an --out holding a checkpoint: exit 2 unless --resume or --overwrite."""
    run_cli(tmp_path, "run")
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert _main([*ARGS, "--out", str(tmp_path / "run")]) == 2
    assert "--overwrite" in _one_line_error(capsys) and (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved


def test_resuming_with_another_lr_is_refused(tmp_path, capsys):
    """--resume with a different --lr: exit 2 naming the flag; the checkpoint's settings never win silently."""
    run_cli(tmp_path, "run", "--stop-at-step", "2")
    assert _main([*ARGS, "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "run" / "checkpoint.pt"), "--lr", "0.5"]) == 2
    assert "lr=0.001" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Trainer(TrainingConfig({1: 1.0}), V, progress=False).train_epoch(
            StandardTransformer(V, 16, 1, 2), [(torch.zeros(2, 3, dtype=torch.long),) * 2], torch.optim.SGD(
                StandardTransformer(V, 16, 1, 2).parameters(), 0.1), grad_clip=-1.0), r"grad_clip=-1.0"),
        (lambda: StandardTransformer(V, 16, 1, 2, ffn_dim=0), r"ffn_dim=0"),
        (lambda: ASHEMConfig(freeze_head="no"), r"freeze_head='no'"),
        (lambda: DeepSupervisionTransformer(V, 16, 2, 2, routing_threshold="0.5"), r"routing_threshold='0.5'"),
        (lambda: StandardTransformer(V, 16, 1, 2)(torch.zeros(2, 3)), r"integer"),
        (lambda: early_exit_forward(DeepSupervisionTransformer(V, 16, 2, 2), torch.zeros(2, 0, dtype=torch.long), 0.5),
         r"seq_len >= 1"),
        (lambda: calibrate_threshold(DeepSupervisionTransformer(V, 16, 2, 2),
                                     [(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), V))], 1,
                                     target_shallow_ratio=0.5), rf"{V}"),
        (lambda: load_dataset("offline", num_samples=16, val_samples=0), r"val_samples=0"),
        (lambda: load_dataset("offline", num_samples=16, max_vocab=2.5), r"max_vocab=2.5"),
    ],
    ids=["grad_clip", "ffn_dim", "freeze_head", "routing_threshold", "float ids", "empty input", "targets",
         "val_samples", "max_vocab"],
)  # fmt: skip
def test_a_bad_argument_of_the_first_round_is_a_named_error(make, message):
    """A named ValueError, never silent acceptance or a torch/NumPy error."""
    with pytest.raises(ValueError, match=message):
        make()


def test_a_tiny_temperature_samples_like_greedy():
    """temperature=1e-45 is a valid temperature: sampling then picks the greedy tokens, no multinomial error."""
    torch.manual_seed(0)
    model = DeepSupervisionTransformer(V, 16, 2, 2).eval()
    prompt = torch.randint(0, V, (2, 3))
    assert torch.equal(generate(model, prompt, 4, temperature=1e-45), generate(model, prompt, 4))


def test_a_text_file_that_is_not_utf8_names_the_file(tmp_path):
    """A binary or Latin-1 data file: a ValueError naming the file, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_dataset(str(path), num_samples=8)
