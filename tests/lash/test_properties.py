"""Property-based checks of the entry points: any input either works or is a one-line ValueError."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lash import ASHEMConfig, TrainingConfig, cli, load_dataset

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ODD = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(allow_nan=True), st.integers(-3, 6))
NUMBER = st.one_of(st.integers(-2, 5), st.floats(-2, 5), st.sampled_from([math.nan, math.inf, -0.0]))


@FAST
@given(
    weights=st.dictionaries(st.one_of(st.integers(-1, 5), st.booleans(), st.text(max_size=1)), NUMBER, max_size=4),
    scales=st.one_of(st.none(), st.dictionaries(st.integers(-1, 5), NUMBER, max_size=3)),
    threshold=st.one_of(NUMBER, ODD),
    exit_layer=ODD,
)
def test_training_config_is_valid_or_a_value_error(weights, scales, threshold, exit_layer):
    try:
        config = TrainingConfig(weights, scales, threshold, exit_layer)
    except ValueError as error:
        assert "\n" not in str(error)
        return
    assert config.active_layers and all(w >= 0 and math.isfinite(w) for w in config.layer_weights.values())
    assert 0 <= config.routing_threshold <= 1 and config.output_layer >= 1
    try:
        config.validate_for(4)
    except ValueError:
        return
    assert all(1 <= layer <= 4 for layer in config.layer_weights)


@FAST
@given(
    layers=st.tuples(ODD, ODD),
    lrs=st.tuples(NUMBER, NUMBER),
    ratio=NUMBER,
    flags=st.tuples(ODD, ODD, ODD),
    protocol=st.sampled_from(["held-out", "reference", "other", 3]),
)
def test_ashem_config_is_valid_or_a_value_error(layers, lrs, ratio, flags, protocol):
    try:
        config = ASHEMConfig(layers[0], lrs[0], 1, ratio, layers[1], lrs[1], 1, 1, 1, *flags, protocol)
    except ValueError:
        return
    assert 1 <= config.phase1_layers < config.phase2_layers and 0 < config.hard_example_ratio < 1
    assert all(isinstance(flag, bool) for flag in flags)


@FAST
@given(
    samples=st.integers(-1, 12),
    batch=st.integers(-1, 5),
    seq_len=st.integers(-1, 6),
    max_vocab=st.sampled_from([None, 0, 1, 2, 40, 64, 64.0, "64"]),
    val_samples=st.sampled_from([None, -1, 0, 1, 3]),
)
def test_offline_data_is_valid_or_a_value_error(samples, batch, seq_len, max_vocab, val_samples):
    try:
        data = load_dataset("offline", samples, batch, seq_len, 0, max_vocab, val_samples)
    except ValueError:
        return
    assert data.train.inputs.shape == (samples, seq_len) and data.val.inputs.shape[1] == seq_len
    assert int(data.train.inputs.max()) < data.vocab_size and len(data.train) == -(-samples // batch)


BAD_FLAGS = [("--epochs", "0"), ("--max-steps", "-1"), ("--grad-accum", "0"), ("--grad-clip", "-1"), ("--grad-clip", "nan"),
             ("--lr", "0"), ("--lr", "inf"), ("--seq-len", "0"), ("--batch-size", "0"), ("--layer-weights", "1:-1"),
             ("--layer-weights", "1:1,1:1"), ("--layer-weights", "2:1"), ("--samples", "-3"), ("--device", "tpu"),
             ("--stop-at-step", "0"), ("--warmup-steps", "-1"), ("--max-vocab", "1"), ("--val-samples", "0")]  # fmt: skip


@pytest.mark.filterwarnings("ignore")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    good=st.fixed_dictionaries(
        {
            "--max-steps": st.sampled_from(["1", "2", "3"]),
            "--grad-accum": st.sampled_from(["1", "2"]),
            "--grad-clip": st.sampled_from(["0", "0.5"]),
            "--seq-len": st.sampled_from(["1", "4"]),
            "--batch-size": st.sampled_from(["1", "3"]),
            "--warmup-steps": st.sampled_from(["0", "2"]),
        }
    ),
    bad=st.one_of(st.none(), st.sampled_from(BAD_FLAGS)),
)
def test_cli_train_runs_or_names_the_bad_flag_in_one_line(tmp_path_factory, capsys, good, bad):
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--dataset", "offline", "--samples", "6", "--val-samples", "2", "--num-layers", "1", "--dim", "8",
            "--num-heads", "2", "--max-vocab", "64", "--no-progress", "--out", str(out)]  # fmt: skip
    for flag, value in [*good.items(), *([bad] if bad else [])]:
        argv += [flag, value]
    try:
        code = cli.main(argv)
    except SystemExit as done:  # argparse's own errors
        code = done.code
    err = capsys.readouterr().err
    if bad is None:
        assert code == 0 and (out / "metrics.json").is_file() and (out / "checkpoint.pt").is_file()
    else:
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert bad[0] in err or bad[0][2:].replace("-", "_") in err  # the flag, or the config field it sets
        assert not (out / "checkpoint.pt").exists()
