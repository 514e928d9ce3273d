"""lash.hf.training: apply_lash's loss and gradients against Hugging Face's own and a logits reference."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from lash.config import TrainingConfig  # noqa: E402
from lash.hf import LashCausalLMOutput, apply_lash  # noqa: E402
from tests.lash.hf.tiny import FAMILIES, LAYERS, batch, grads, reference_loss, tiny_model  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
EXITS = {1: 0.3, 2: 0.2, 3: 0.5}


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_alone_equals_the_models_own_loss_and_gradients(family):
    model = tiny_model(family)
    plain = copy.deepcopy(model)
    apply_lash(model, TrainingConfig({LAYERS: 1.0}))
    input_ids, labels = batch()
    out = model(input_ids=input_ids, labels=labels)
    expected = plain(input_ids=input_ids, labels=labels).loss
    assert isinstance(out, LashCausalLMOutput) and out.logits is None
    torch.testing.assert_close(out.loss, expected, **TOL)
    out.loss.backward()
    expected.backward()
    for got, want in zip(grads(model), grads(plain)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_several_exits_equal_the_logits_reference(family):
    model = apply_lash(tiny_model(family), TrainingConfig(EXITS))
    input_ids, labels = batch()
    out = model(input_ids=input_ids, labels=labels)
    expected = reference_loss(model, input_ids, labels, EXITS)
    torch.testing.assert_close(out.loss, expected, **TOL)
    assert sorted(out.exit_losses) == [1, 2, 3]
    torch.testing.assert_close(sum(EXITS[k] * v for k, v in out.exit_losses.items()), expected.detach(), **TOL)
    out.loss.backward()
    got = grads(model)
    expected.backward()
    for a, b in zip(got, grads(model)):
        torch.testing.assert_close(a, b, **TOL)


def test_tied_embeddings_get_the_head_and_embedding_gradient_once():
    model = apply_lash(tiny_model("llama-tied"), TrainingConfig(EXITS))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    input_ids, labels = batch()
    model(input_ids=input_ids, labels=labels).loss.backward()
    got = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    reference_loss(model, input_ids, labels, EXITS).backward()
    torch.testing.assert_close(got, model.lm_head.weight.grad, **TOL)


def test_layers_deeper_than_the_deepest_weighted_one_do_not_run_nor_learn():
    model = apply_lash(tiny_model("qwen3"), TrainingConfig({1: 0.6, 2: 0.4}))
    calls = []
    model.model.layers[2].register_forward_hook(lambda *_: calls.append(1))
    input_ids, labels = batch()
    out = model(input_ids=input_ids, labels=labels)
    assert not calls
    out.loss.backward()
    assert all(p.grad is None for p in model.model.layers[2].parameters())
    assert model.model.norm.weight.grad is not None
    got = grads(model)
    expected = reference_loss(model, input_ids, labels, {1: 0.6, 2: 0.4})
    torch.testing.assert_close(out.loss, expected, **TOL)
    expected.backward()
    for a, b in zip(got, grads(model)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_every_exits_gradient(reentrant):
    model = apply_lash(tiny_model("llama"), TrainingConfig(EXITS))
    input_ids, labels = batch()
    reference_loss(model, input_ids, labels, EXITS).backward()
    want = grads(model)
    checkpoint_kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # its name in current transformers releases
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    model(input_ids=input_ids, labels=labels).loss.backward()
    for a, b in zip(grads(model), want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_gradient_accumulation_with_num_items_equals_the_large_batch(as_tensor):
    model = apply_lash(tiny_model("mistral"), TrainingConfig(EXITS))
    input_ids, labels = batch(rows=4)
    labels[2, 3:] = -100  # micro-batches with different numbers of labelled tokens
    valid = int((labels[:, 1:] != -100).sum())
    num_items = torch.tensor(valid) if as_tensor else valid
    large = model(input_ids=input_ids, labels=labels)
    large.loss.backward()
    want = grads(model)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        loss = model(input_ids=input_ids[rows], labels=labels[rows], num_items_in_batch=num_items).loss
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, large.loss.detach(), **TOL)
    for a, b in zip(grads(model), want):
        torch.testing.assert_close(a, b, **TOL)
    expected = reference_loss(model, input_ids[:2], labels[:2], EXITS, num_items=valid)
    torch.testing.assert_close(model(input_ids=input_ids[:2], labels=labels[:2], num_items_in_batch=num_items).loss, expected, **TOL)


def test_ignored_rows_and_all_ignored_batches():
    model = apply_lash(tiny_model("phi3"), TrainingConfig(EXITS))
    input_ids, labels = batch(rows=3)
    labels[1] = -100
    torch.testing.assert_close(
        model(input_ids=input_ids, labels=labels).loss, reference_loss(model, input_ids, labels, EXITS), **TOL
    )
    out = model(input_ids=input_ids, labels=torch.full_like(labels, -100))
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_without_labels_the_model_is_unchanged():
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    apply_lash(model, TrainingConfig(EXITS))
    input_ids, _ = batch()
    out, want = model(input_ids=input_ids), plain(input_ids=input_ids)
    assert type(out) is type(want)
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
    assert model.generate(input_ids, max_new_tokens=3, do_sample=False).tolist() == plain.generate(
        input_ids, max_new_tokens=3, do_sample=False
    ).tolist()


def test_a_copy_of_a_patched_model_runs_its_own_parameters():
    model = apply_lash(tiny_model("llama"), TrainingConfig(EXITS))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.lm_head.weight.zero_()  # uniform logits: the twin's loss is log V at every exit
    input_ids, labels = batch()
    assert not torch.isclose(model(input_ids=input_ids, labels=labels).loss, twin(input_ids=input_ids, labels=labels).loss)
    torch.testing.assert_close(twin(input_ids=input_ids, labels=labels).loss, torch.tensor(torch.log(torch.tensor(64.0)).item()))


def test_configs_that_do_not_fit_the_model_and_caches_with_labels_are_refused():
    with pytest.raises(ValueError, match="layer_weights"):
        apply_lash(tiny_model("llama"), TrainingConfig({4: 1.0}))
    model = apply_lash(tiny_model("llama"), TrainingConfig(EXITS))
    input_ids, labels = batch()
    cache = model(input_ids=input_ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="pass labels or a cache, not both"):
        model(input_ids=input_ids, labels=labels, past_key_values=cache)


# AdamW's step is ±lr wherever a gradient is ~0, whatever its rounding: a smaller rate keeps the
# parameters of the two runs within the tolerance.
@pytest.mark.parametrize(("optimizer", "lr"), [(torch.optim.SGD, 1e-1), (torch.optim.AdamW, 1e-3)])
def test_training_patched_and_unpatched_stays_together(optimizer, lr):
    model = tiny_model("qwen2")
    plain = copy.deepcopy(model)
    apply_lash(model, TrainingConfig({LAYERS: 1.0}))
    optimizers = [optimizer(m.parameters(), lr=lr) for m in (model, plain)]
    input_ids, labels = batch(rows=2, length=9)
    first = model(input_ids=input_ids, labels=labels).loss.detach()
    for _ in range(5):
        losses = []
        for m, opt in zip((model, plain), optimizers):
            opt.zero_grad()
            loss = m(input_ids=input_ids, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], **TOL)
    assert losses[0] < first, "the 5 steps should learn something"
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compiled_equals_eager():
    model = apply_lash(tiny_model("llama"), TrainingConfig({1: 0.5, 2: 0.5}))
    calls = []
    model.model.layers[2].register_forward_hook(lambda *_: calls.append(1))
    compiled = torch.compile(model, fullgraph=True)  # the depth change and the hooks break no graph
    input_ids, labels = batch()
    eager = model(input_ids=input_ids, labels=labels)
    eager.loss.backward()
    want = grads(model)
    for _ in range(2):
        out = compiled(input_ids=input_ids, labels=labels)
        torch.testing.assert_close(out.loss, eager.loss, **TOL)
        out.loss.backward()
        for a, b in zip(grads(model), want):
            torch.testing.assert_close(a, b, **TOL)
    assert not calls and model.config.num_hidden_layers == LAYERS
