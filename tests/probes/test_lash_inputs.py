"""Probes of LASH's entry points with bad input: each gets a named ``ValueError`` (a CLI: exit code 2
and one line on stderr) or a correct result, never an error from deep inside torch or os."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lash.data import load_dataset
from lash.generation import generate
from lash.models import DeepSupervisionTransformer, StandardTransformer
from lash.routing import early_exit_forward, forward_inference

REPO = Path(__file__).resolve().parent.parent.parent
V = 29


def tiny_model(num_layers: int = 2) -> DeepSupervisionTransformer:
    torch.manual_seed(0)
    return DeepSupervisionTransformer(V, dim=16, num_layers=num_layers, num_heads=2, max_seq_len=16).eval()


def hf_model():
    pytest.importorskip("transformers")
    from tests.lash.hf.tiny import tiny_model as tiny_hf

    return tiny_hf("llama").eval()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_models_take_token_ids_of_any_integer_dtype(dtype):
    """A model's forward and hidden_states take any integer dtype and answer as with int64 ids."""
    model = tiny_model()
    ids = torch.tensor([[0, 3, V - 1]])
    torch.testing.assert_close(model(ids.to(dtype)), model(ids))
    torch.testing.assert_close(model.hidden_states(ids.to(dtype), [1])[0], model.hidden_states(ids, [1])[0])


def test_int16_ids_of_a_vocabulary_past_int16_are_checked_in_int64():
    """int16 ids of a vocabulary larger than int16 holds are in range, not wrapped around."""
    model = StandardTransformer(40000, dim=8, num_layers=1, num_heads=1, max_seq_len=4).eval()
    ids = torch.tensor([[1, 32767]])
    torch.testing.assert_close(model(ids.to(torch.int16)), model(ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_models_refuse_token_ids_that_are_not_integers(dtype):
    """Floating or bool ids are a ValueError naming the dtype."""
    with pytest.raises(ValueError, match=rf"token ids must be an integer tensor.*got dtype {dtype}"):
        tiny_model()(torch.zeros(1, 3, dtype=dtype))


@pytest.mark.parametrize("route", [forward_inference, early_exit_forward])
@pytest.mark.parametrize("threshold", [0.5, None])
def test_routing_refuses_an_empty_batch(route, threshold):
    """forward_inference and early_exit_forward both refuse 0 rows with the same ValueError."""
    with pytest.raises(ValueError, match=r"input ids must have shape \(batch >= 1, seq_len >= 1\); got \(0, 3\)"):
        route(tiny_model(), torch.zeros(0, 3, dtype=torch.long), threshold)


@pytest.mark.parametrize("name, value", [("speculative", "no"), ("speculative", 1), ("return_stats", "yes")])
def test_generate_flags_must_be_bools(name, value):
    """generate's bool arguments refuse anything but True/False, naming the argument and value."""
    with pytest.raises(ValueError, match=rf"^{name}={value!r} must be True or False$"):
        generate(tiny_model(), torch.zeros(1, 3, dtype=torch.long), 2, exit_layer=1, **{name: value})


@pytest.mark.parametrize("name, value", [("speculative", "no"), ("return_stats", "yes")])
def test_hf_generate_flags_must_be_bools(name, value):
    """lash.hf.generate's bool arguments refuse anything but True/False, naming the argument and value."""
    from lash.hf import generate as hf_generate

    with pytest.raises(ValueError, match=rf"^{name}={value!r} must be True or False$"):
        hf_generate(hf_model(), torch.zeros(1, 3, dtype=torch.long), 2, exit_layer=1, **{name: value})


@pytest.mark.parametrize("name", [None, "", " ", 3])
def test_load_dataset_refuses_a_missing_name(name):
    """load_dataset without a usable name is a ValueError naming the value and the allowed ones."""
    with pytest.raises(ValueError, match=rf"^name={name!r} must be one of auto, wikitext-2, offline or a path"):
        load_dataset(name)


@pytest.mark.parametrize("bad", [64, -1])
def test_hf_generate_refuses_token_ids_outside_the_vocabulary(bad):
    """lash.hf.generate refuses prompt ids outside [0, vocab_size) with the id and the range."""
    from lash.hf import generate as hf_generate

    with pytest.raises(ValueError, match=rf"token id {bad} is outside \[0, 64\)"):
        hf_generate(hf_model(), torch.tensor([[3, bad]]), 2)


@pytest.mark.parametrize("eos", ["x", 64, -1, [1, "x"], 1.0, True])
def test_generate_refuses_eos_ids_that_are_not_token_ids(eos):
    """An EOS id that is not an int in [0, vocab_size) is a ValueError naming it, for both generates."""
    from lash.hf import generate as hf_generate

    with pytest.raises(ValueError, match=r"^eos_token_id=.* must be None, a token id or a list of token ids \(ints\) in \[0, 64\)$"):
        hf_generate(hf_model(), torch.tensor([[3, 4]]), 2, eos_token_id=eos)
    with pytest.raises(ValueError, match=rf"^eos_token_id=.* in \[0, {V}\)$"):
        generate(tiny_model(), torch.tensor([[3, 4]]), 2, eos_token_id=eos if eos != 64 else V)


@pytest.mark.parametrize("count", [0, -3, 2.0, True, torch.tensor(0), torch.tensor(-3), torch.tensor(0.0),
                                   torch.tensor(float("nan")), torch.tensor([2, 3])])  # fmt: skip
def test_hf_loss_refuses_a_num_items_in_batch_that_is_not_positive(count):
    """A patched forward refuses num_items_in_batch that is not a positive int or a positive one-element tensor."""
    from lash.config import TrainingConfig
    from lash.hf import apply_lash
    from tests.lash.hf.tiny import batch

    model = apply_lash(hf_model(), TrainingConfig({1: 0.5, 3: 0.5}))
    input_ids, labels = batch()
    with pytest.raises(ValueError, match=r"^num_items_in_batch=.* must be a positive int or a one-element tensor holding a positive number$"):
        model(input_ids=input_ids, labels=labels, num_items_in_batch=count)
    for good in (5, torch.tensor(5), torch.tensor(5.0)):  # transformers.Trainer passes a float tensor
        assert torch.isfinite(model(input_ids=input_ids, labels=labels, num_items_in_batch=good).loss)


def test_apply_lash_refuses_a_dict_for_a_config():
    """apply_lash with a dict in place of a TrainingConfig is a ValueError naming the type expected."""
    from lash.hf import apply_lash

    with pytest.raises(ValueError, match=r"^config must be a lash.TrainingConfig, got dict"):
        apply_lash(hf_model(), {1: 0.5, 3: 0.5})


@pytest.mark.parametrize("threshold", [0.5, None])
def test_early_exit_on_a_one_layer_model_names_its_depth(threshold):
    """early_exit_forward on a 1-layer model says it has no shallower layer to exit at."""
    with pytest.raises(ValueError, match=r"^exit_layer=1: a model of num_layers=1 has no shallower layer to exit at$"):
        early_exit_forward(tiny_model(num_layers=1), torch.zeros(1, 3, dtype=torch.long), threshold)


def test_gpu_suite_refuses_an_unwritable_out_before_running(tmp_path, monkeypatch, capsys):
    """gpu_suite.py --out on a read-only directory exits 2 with one line, before measuring anything."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_suite

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the write itself fail as it would
        denied = PermissionError(13, "Permission denied")
        monkeypatch.setattr("lash.files.tempfile.TemporaryFile", lambda **_: (_ for _ in ()).throw(denied))
    monkeypatch.setattr(gpu_suite.measure, "environment", lambda: pytest.fail("the suite started"))
    try:
        with pytest.raises(SystemExit) as stop:
            gpu_suite.main(["--dry-run", "--out", str(locked)])
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "--out" in err and "not a writable directory" in err, err


@pytest.mark.parametrize("flag", ["--markdown", "--json"])
@pytest.mark.parametrize("where", ["missing/out.txt", "."])
def test_aot_check_refuses_an_output_path_it_cannot_write(flag, where, tmp_path):
    """aot_check --markdown/--json into a missing directory or onto a directory exits 2 with one line, at once."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "lash_kernels.aot_check", "--shapes", "seed", "--dtypes", "bf16", "--archs", "sm_80",
         flag, str(tmp_path / where)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in done.stderr, done.stderr
