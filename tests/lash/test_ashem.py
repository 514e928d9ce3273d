import dataclasses
import json

import pytest
import torch

from lash import cli
from lash import ASHEMConfig, DeepSupervisionTransformer, load_dataset
from lash.ashem import (
    IGNORE_INDEX,
    ASHEMResult,
    compute_confidence_threshold,
    evaluate_on_hard_examples,
    extend_model,
    freeze_lower_layers,
    run_ashem,
    score_tokens,
    _phase2_config,
    train_phase2,
)
from lash.files import write_atomic
from lash.optim import create_optimizer
from lash.report import load_results, write_report

TINY = ASHEMConfig(phase1_layers=1, phase2_layers=2, phase1_max_epochs=2, phase2_max_epochs=2, phase2_lr=1e-3)


def _mine(model, batches, ratio):
    """The hard examples of ``batches``: the ``ratio`` of their tokens the model is least sure of."""
    scored = score_tokens(model, batches)
    return scored.hard_examples(compute_confidence_threshold(scored.confidence, ratio))


@pytest.fixture(scope="module")
def data():
    return load_dataset("offline", num_samples=96, batch_size=32, seq_len=12, max_vocab=128, seed=0)


@pytest.fixture(scope="module")
def result(data):
    return run_ashem(TINY, data.train, data.val, data.vocab_size, dim=16, num_heads=2, progress=False, verbose=False)


def test_threshold_gives_target_hard_ratio_on_training_tokens(data):
    model = DeepSupervisionTransformer(data.vocab_size, dim=16, num_layers=1, num_heads=2)
    scored = score_tokens(model, data.train)
    conf = scored.confidence
    assert conf.shape == data.train.inputs.shape and ((conf > 0) & (conf <= 1)).all()
    for ratio in (0.2, 0.5, 0.7):
        threshold = compute_confidence_threshold(conf, ratio)
        hard = scored.hard_examples(threshold)
        assert abs(hard.ratio - ratio) <= 0.02
        torch.testing.assert_close(hard.hard, score_tokens(model, hard.batches(32)).confidence < threshold)
    with pytest.raises(ValueError, match=r"hard_example_ratio=1.0 is outside \(0, 1\)"):
        compute_confidence_threshold(conf, 1.0)


def test_loss_mask_covers_exactly_the_hard_tokens(data):
    model = DeepSupervisionTransformer(data.vocab_size, dim=16, num_layers=1, num_heads=2)
    scored = score_tokens(model, data.train)
    hard = scored.hard_examples(scored.confidence.median().item())
    seen_x, seen_y = [], []
    for x, y in hard.batches(32, shuffle=True):
        seen_x.append(x)
        seen_y.append(y)
    x, y = torch.cat(seen_x), torch.cat(seen_y)
    order = torch.stack([torch.nonzero((hard.inputs == row).all(1))[0, 0] for row in x])
    assert torch.equal(y != IGNORE_INDEX, hard.hard[order])
    assert torch.equal(y[y != IGNORE_INDEX], hard.targets[order][hard.hard[order]])
    single = hard.single_tokens()
    assert single.inputs.shape == (int(hard.hard.sum()), 1) and single.ratio == 1.0


def test_extend_and_freeze_keep_phase1_function_and_weights(data):
    model1 = DeepSupervisionTransformer(data.vocab_size, dim=16, num_layers=1, num_heads=2)
    for p in model1.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        model1.layers[0].norm2.weight.normal_(2.0, 0.3)  # a trained-looking gain, far from 1
    model2 = extend_model(model1, 3)
    assert model2.num_layers == 3 and model2.exit_layer == 1
    x = data.val.inputs[:4]
    with torch.no_grad():
        shallow, _, deep = model2.forward_all_layers(x)
        torch.testing.assert_close(shallow, model1(x))
        # The new layers start as identities: the deep exit answers as the phase-1 model does.
        torch.testing.assert_close(deep, shallow, rtol=1e-4, atol=1e-4 * shallow.abs().max().item())
    freeze_lower_layers(model2, 1, embedding=True, layers=True, head=True)
    frozen = {n: p.detach().clone() for n, p in model2.named_parameters() if not p.requires_grad}
    assert set(frozen) == {"embedding.weight", "output_head.weight"} | {
        n for n, _ in model2.named_parameters() if n.startswith("layers.0.")
    }
    hard = _mine(model1, data.train, 0.5)
    before = {n: p.detach().clone() for n, p in model2.named_parameters() if p.requires_grad}
    train_phase2(model2, hard, hard, TINY, batch_size=32, progress=False, verbose=False)
    for name, p in model2.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        else:
            assert not torch.equal(p, before[name]), name
    with pytest.raises(ValueError, match="phase2_layers=1 must be greater than the model's 1 layers"):
        extend_model(model1, 1)


def test_evaluate_on_hard_examples_counts_only_hard_tokens(data):
    model = DeepSupervisionTransformer(data.vocab_size, dim=16, num_layers=1, num_heads=2)
    hard = _mine(model, data.val, 0.3)
    stats = evaluate_on_hard_examples(model, hard, batch_size=16)
    assert stats["tokens"] == int(hard.hard.sum())
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(hard.inputs).transpose(1, 2), hard.targets, reduction="none")
    assert stats["loss"] == pytest.approx(ce[hard.hard].mean().item(), rel=1e-5)
    assert stats["loss"] != pytest.approx(ce.mean().item(), rel=1e-5)


def test_pipeline_end_to_end_and_json_schema(result, data, tmp_path):
    assert abs(result.hard_ratio_mined - 0.5) <= 0.02
    assert result.setup["mined_from"] == "train" and result.config["protocol"] == "held-out"
    dev = result.setup["dev_sequences"]
    assert dev == round(0.1 * data.train.inputs.shape[0]) and result.setup["train_sequences"] + dev == data.train.inputs.shape[0]
    assert 0 < result.routing["shallow_ratio"] < 1
    expected_cost = (result.routing["shallow_ratio"] * 1 + (1 - result.routing["shallow_ratio"]) * 2) / 2
    assert result.routing["compute_cost"] == pytest.approx(expected_cost)
    assert len(result.phase1["dev_losses"]) == result.phase1["total_epochs"] <= 2
    p2 = result.phase2
    assert len(p2["dev_losses"]) == len(p2["dev_routing_losses"]) == len(p2["train_losses"]) + 1 == p2["total_epochs"] + 1
    assert p2["dev_losses"][p2["best_epoch"]] == min(p2["dev_losses"][: p2["total_epochs"] + 1])
    assert set(p2["per_layer"]) == {"1", "2"} and set(result.phase1["per_layer"]) == {"1"}
    assert result.hard_before["tokens"] == result.hard_after["tokens"] > 0
    assert sum(result.confidence_histogram["counts"]) == result.setup["train_sequences"] * result.setup["seq_len"]
    assert set(result.seconds) == {"phase1", "mining", "phase2", "evaluation"}
    paths = write_report([result], tmp_path / "out", "python colab2.py --quick")
    assert {p.name for p in paths} == {
        "results.json", "results.md", "training_curves.png", "confidence_histogram.png", "ppl_per_exit.png"
    }
    for p in paths:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"command", "seeds", "summary", "runs"} == set(raw) and raw["seeds"] == [0]
    assert {"config", "setup", "phase1", "threshold", "hard_ratio_mined", "hard_ratio_val", "hard_before",
            "hard_after", "phase2", "routing", "confidence_histogram", "seconds"} == set(raw["runs"][0])
    assert load_results(tmp_path / "out" / "results.json") == [ASHEMResult(**json.loads(json.dumps(result.to_dict())))]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Two-stage routing" in md and "python colab2.py --quick" in md and "## PPL per exit" in md
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_validation_split_is_only_reported(data):
    """Selection, early stopping and mining never look at the validation split: another one changes no decision."""
    other = load_dataset("offline", num_samples=96, batch_size=32, seq_len=12, max_vocab=128, seed=5).val
    again = run_ashem(TINY, data.train, other, data.vocab_size, dim=16, num_heads=2, progress=False, verbose=False)
    first = run_ashem(TINY, data.train, data.val, data.vocab_size, dim=16, num_heads=2, progress=False, verbose=False)
    for key in ("dev_losses", "best_epoch", "total_epochs"):
        assert again.phase1[key] == first.phase1[key] and again.phase2[key] == first.phase2[key], key
    assert again.threshold == first.threshold and again.phase1["ppl"] != first.phase1["ppl"]


def test_phase2_keeps_its_start_when_training_only_hurts(data):
    """A learning rate that wrecks phase 2: epoch 0 is kept and the report equals phase 1 (the epoch-0 rule)."""
    config = ASHEMConfig(**{**TINY.__dict__, "phase2_lr": 3.0, "phase2_patience": 2, "phase2_max_epochs": 2})
    r = run_ashem(config, data.train, data.val, data.vocab_size, dim=16, num_heads=2, progress=False, verbose=False)
    assert r.phase2["best_epoch"] == 0 and min(r.phase2["dev_losses"][1:]) > r.phase2["dev_losses"][0]
    assert r.hard_after["ppl"] == pytest.approx(r.hard_before["ppl"], rel=1e-4)
    assert r.routing["ppl"] == pytest.approx(r.phase1["ppl"], rel=1e-4)
    assert r.phase2["ppl"] == pytest.approx(r.phase1["ppl"], rel=1e-4)  # the identity layers answer as phase 1


def test_phase2_keeps_the_best_epoch_whose_routing_is_no_worse(data, monkeypatch):
    """Scripted dev losses: epoch 2 has the best hard loss but worse routing than the start, so epoch 1 is kept."""
    model1 = DeepSupervisionTransformer(data.vocab_size, dim=16, num_layers=1, num_heads=2)
    scored = score_tokens(model1, data.train)
    threshold = compute_confidence_threshold(scored.confidence, 0.5)
    hard = scored.hard_examples(threshold)
    model2 = extend_model(model1, 2)
    hard_losses, routing_losses, states = iter([2.0, 1.9, 1.5, 1.95]), iter([1.0, 0.9, 1.1, 0.95]), []

    def scripted_hard(self, model, batches):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"loss": next(hard_losses), "ppl": 0.0}

    monkeypatch.setattr("lash.trainer.Trainer.evaluate", scripted_hard)
    monkeypatch.setattr("lash.ashem.evaluate", lambda *args, **kwargs: {"loss": next(routing_losses)})
    config = ASHEMConfig(**{**TINY.__dict__, "phase2_max_epochs": 3, "phase2_patience": 3})
    history = train_phase2(model2, hard, hard, config, 32, progress=False, verbose=False, routing=(data.train, threshold))
    assert history["best_epoch"] == 1 and history["dev_routing_losses"] == [1.0, 0.9, 1.1, 0.95]
    assert all(torch.equal(v, states[1][k]) for k, v in model2.state_dict().items())


def test_phase2_variants_weight_easy_tokens_and_scale_lower_layers(data):
    model1 = DeepSupervisionTransformer(data.vocab_size, dim=16, num_layers=1, num_heads=2)
    hard = _mine(model1, data.train, 0.5)
    x, y, w = next(iter(hard.batches(500, easy_weight=0.25)))
    assert torch.equal(y, hard.targets) and torch.equal(w, torch.where(hard.hard, 1.0, 0.25))
    config = ASHEMConfig(**{**TINY.__dict__, "phase2_easy_weight": 0.25, "freeze_lower_layers": False, "lower_lr_scale": 0.1})
    r = run_ashem(config, data.train, data.val, data.vocab_size, dim=16, num_heads=2, progress=False, verbose=False)
    assert r.phase2["total_epochs"] >= 1 and r.config["phase2_easy_weight"] == 0.25
    model2 = extend_model(model1, 2)
    freeze_lower_layers(model2, 1, layers=False)
    optimizer, _ = create_optimizer(model2, _phase2_config(model2, config), 1e-3)
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert lrs["layer_1"] == pytest.approx(1e-4) and lrs["layer_2"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lower_lr_scale=0.1 needs freeze_lower_layers=False"):
        ASHEMConfig(lower_lr_scale=0.1)
    with pytest.raises(ValueError, match=r"dev_fraction=0.9 is outside \(0.0, 0.5\]"):
        ASHEMConfig(dev_fraction=0.9)


def test_original_protocol_runs(data):
    config = ASHEMConfig(**{**TINY.__dict__, "protocol": "original"})
    ref = run_ashem(config, data.train, data.val, data.vocab_size, dim=16, num_heads=2, progress=False, verbose=False)
    assert ref.setup["mined_from"] == "validation" and abs(ref.hard_ratio_mined - 0.5) <= 0.02
    assert ref.hard_before["tokens"] == ref.hard_after["tokens"] == round(ref.hard_ratio_mined * data.val.num_tokens)


def test_failed_write_keeps_existing_results(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")

    def no_space(*args):
        raise OSError("no space left on device")

    monkeypatch.setattr("lash.files.os.replace", no_space)
    with pytest.raises(OSError, match="no space"):
        write_atomic(target, b"new")
    assert target.read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name != "results.json"]


def test_colab2_cli_writes_results(tmp_path, capsys):
    args = ["--dataset", "offline", "--samples", "64", "--val-samples", "16", "--seq-len", "8", "--dim", "16",
            "--num-heads", "2", "--batch-size", "32", "--max-vocab", "64", "--phase1-layers", "1", "--phase2-layers", "2",
            "--phase1-max-epochs", "1", "--phase2-max-epochs", "1", "--no-progress", "--freeze-head", "--seeds", "2",
            "--out", str(tmp_path)]
    assert cli.ashem_main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    run = result["runs"][1]
    assert run["config"]["freeze_head"] is True and run["setup"]["dataset"] == "offline" and result["seeds"] == [42, 43]
    assert len(result["summary"]["phase1_ppl"]["values"]) == 2 and result["summary"]["phase1_ppl"]["std"] > 0
    out = capsys.readouterr().out
    assert "Two-stage routing" in out and " ± " in out and "run 2 of 2 done (elapsed" in out and "ETA" in out
    assert "phase 1 done: kept epoch 1 of 1" in out and "phase 2 epoch 0 (start)" in out
    assert cli.ashem_main(["--hard-example-ratio", "1.5", "--out", str(tmp_path)]) == 2
    assert "hard_example_ratio=1.5 is outside" in capsys.readouterr().err
    assert cli.ashem_main(["--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds=0 must be an int >= 1" in capsys.readouterr().err
    ashem = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["ashem"]
    documented = {a.dest: a.help for a in ashem._actions}
    assert all(documented[f.name] for f in dataclasses.fields(ASHEMConfig)), documented
    assert "loss weight of the easy tokens in phase 2" in documented["phase2_easy_weight"]
    assert cli.parse_args(["ashem", "--quick"]).samples == cli.QUICK["samples"]
    assert cli.parse_args(["ashem", "--quick", "--samples", "50"]).samples == 50
