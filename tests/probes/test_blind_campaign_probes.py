"""Probes of the defects an independent campaign found, written from the README alone.

Each probe states what must happen; see ``tests/probes/test_training_probes.py`` for what makes
a probe fail.
"""

import pytest
import torch

import lash_kernels as K
from lash import DeepSupervisionTransformer, Trainer, TrainingConfig
from lash.generation import generate
from tests.lash.test_cli import ARGS
from tests.probes.test_training_probes import _main, _one_line_error

V = 32


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_rope_positions_past_the_tables_are_refused(monkeypatch, kernels):
    """A position beyond the tables' rows: a named ValueError in both backends, never an out-of-bounds read."""
    monkeypatch.setenv("LASH_KERNELS", kernels)
    q = torch.randn(1, 2, 4, 6)
    with pytest.raises(ValueError, match=r"positions holds 10, outside \[0, 4\)"):
        K.apply_rotary(q, q, torch.ones(4, 6), torch.zeros(4, 6), positions=torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"positions holds -1, outside \[0, 4\)"):
        K.apply_rotary(q, q, torch.ones(4, 6), torch.zeros(4, 6), positions=torch.tensor([0, 1, 2, -1]))


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_meta_tensors_are_refused_by_name(monkeypatch, kernels):
    """Ops on meta tensors (no values): a named ValueError in both backends."""
    monkeypatch.setenv("LASH_KERNELS", kernels)
    with pytest.raises(ValueError, match="x is on meta; LASH's ops compute on CPU or CUDA tensors"):
        K.rms_norm(torch.randn(2, 8, device="meta"), torch.ones(8, device="meta"))
    h, w, y = torch.randn(2, 4, 8, device="meta"), torch.randn(V, 8, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="is on meta"):
        K.multi_exit_cross_entropy(h, w, y, [0.5, 0.5])


def _model() -> DeepSupervisionTransformer:
    torch.manual_seed(0)
    return DeepSupervisionTransformer(V, 16, 2, 2, max_seq_len=32).eval()


@pytest.mark.parametrize(
    "kwargs, message",
    [({"pad_token_id": 99, "eos_token_id": 1}, r"pad_token_id=99 must be None or a token id \(an int\) in \[0, 32\)"),
     ({"attention_mask": torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])}, "row 0 of attention_mask holds no token"),
     ({"attention_mask": torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])}, "left-padded"),
     ({"attention_mask": torch.tensor([[2, 1, 1, 1], [1, 1, 1, 1]])}, "0 .padding. and 1 .token. only")],
)  # fmt: skip
def test_generate_refuses_a_pad_id_or_mask_it_cannot_honour(kwargs, message):
    """A pad id outside the vocabulary, or a mask row with no token: a named ValueError."""
    with pytest.raises(ValueError, match=message):
        generate(_model(), torch.randint(0, V, (2, 4)), 3, **kwargs)


@pytest.mark.parametrize("prompt, shown", [(torch.zeros(1, 3), "torch.float32 of shape (1, 3)"),
                                           (torch.zeros(3, dtype=torch.long), "torch.int64 of shape (3,)")])  # fmt: skip
def test_a_bad_prompt_is_described(prompt, shown):
    """A prompt of the wrong dtype or shape: the message says what was given."""
    with pytest.raises(ValueError, match=__import__("re").escape(shown)):
        generate(_model(), prompt, 2)


def test_hf_generate_checks_sampling_like_generate():
    """lash.hf.generate(top_p=0.0): the same named ValueError as lash.generation.generate, not a multinomial error."""
    pytest.importorskip("transformers")
    from lash.hf import generate as hf_generate
    from tests.lash.hf.tiny import tiny_model

    with pytest.raises(ValueError, match=r"top_p=0.0 is outside \(0.0, 1.0\]"):
        hf_generate(tiny_model("llama").eval(), torch.tensor([[3, 4, 5]]), 3, temperature=1.0, top_p=0.0)


def test_hf_labels_of_another_shape_are_named():
    """apply_lash with labels shaped unlike the inputs: the message names labels and both shapes."""
    pytest.importorskip("transformers")
    from lash.hf import apply_lash
    from tests.lash.hf.tiny import tiny_model

    model = tiny_model("llama")
    apply_lash(model, TrainingConfig(layer_weights={3: 1.0}))
    with pytest.raises(ValueError, match=r"labels must have the inputs' shape \(2, 10\); got \(2, 9\)"):
        model(input_ids=torch.randint(0, 64, (2, 10)), labels=torch.randint(0, 64, (2, 9)))


def test_an_exit_layer_not_shallower_than_the_output_is_refused_on_construction():
    """TrainingConfig({2: 1}, routing_threshold=0.5, exit_layer=2): refused when built, as every field is."""
    with pytest.raises(ValueError, match=r"exit_layer=2 is outside \[1, 1\]"):
        TrainingConfig({2: 1.0}, routing_threshold=0.5, exit_layer=2)


def test_state_dict_and_checkpoint_misuse_are_named(tmp_path):
    """load_state_dict({}) and save_checkpoint(a directory): named ValueErrors, the trainer unchanged."""
    trainer = Trainer(TrainingConfig({2: 1.0}), V, progress=False, model=_model())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match="lacks model, optimizer, trainer, config"):
        trainer.load_state_dict({})
    with pytest.raises(ValueError, match="is a directory, not a checkpoint file"):
        trainer.save_checkpoint(tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_an_empty_dataset_flag_is_named(tmp_path, capsys):
    """--dataset '': exit 2 with one line naming --dataset."""
    assert _main([*ARGS, "--out", str(tmp_path / "run"), "--dataset", ""]) == 2
    assert "--dataset is empty" in _one_line_error(capsys)
