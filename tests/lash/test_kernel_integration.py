"""The model on the Triton kernels (through the interpreter here) against the torch path."""

import pytest
import torch

from lash import DeepSupervisionTransformer, Trainer, TrainingConfig

V = 37


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, V, (2, 10), generator=g) for _ in range(n)]
    return [(s[:, :-1], s[:, 1:]) for s in seqs]


def make_model():
    torch.manual_seed(3)
    model = DeepSupervisionTransformer(vocab_size=V, dim=24, num_layers=2, num_heads=2)
    for norm in (m for m in model.modules() if m.__class__.__name__ == "RMSNorm"):
        torch.nn.init.normal_(norm.weight, 1.0, 0.2)  # non-unit gains, so the weight path is exercised
    return model


def test_kernels_match_torch_outputs_and_grads(monkeypatch):
    x, y = batches(1)[0]
    results = {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv("LASH_KERNELS", choice)
        model = make_model()
        loss = Trainer(TrainingConfig(layer_weights={1: 0.5, 2: 0.5}), V).compute_loss(model, x, y)
        loss.backward()
        results[choice] = (model.forward_all_layers(x), {n: p.grad for n, p in model.named_parameters()})
    for a, b in zip(results["torch"][0], results["triton"][0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_training_converges_the_same_with_kernels_on_and_off(monkeypatch):
    losses = {}
    for choice in ("torch", "triton"):
        monkeypatch.setenv("LASH_KERNELS", choice)
        model = make_model()
        trainer = Trainer(TrainingConfig(layer_weights={1: 0.3, 2: 0.7}), V, progress=False)
        opt = trainer.create_optimizer(model, base_lr=3e-3)
        losses[choice] = [trainer.train_epoch(model, batches(), opt) for _ in range(4)]
    assert losses["torch"][-1] < losses["torch"][0] - 0.1
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["torch"]), atol=1e-4, rtol=1e-4)


def test_model_compiles_without_graph_breaks(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "torch")
    torch._dynamo.reset()
    model = make_model()
    trainer = Trainer(TrainingConfig(layer_weights={1: 0.5, 2: 0.5}), V)
    x, y = batches(1)[0]
    compiled = torch.compile(lambda x, y: trainer.compute_loss(model, x, y), fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    loss.backward()
    torch.testing.assert_close(loss, trainer.compute_loss(model, x, y))
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.gpu
def test_model_compiles_on_cuda_with_triton_kernels(monkeypatch):
    monkeypatch.setenv("LASH_KERNELS", "triton")
    torch._dynamo.reset()
    model = make_model().cuda()
    trainer = Trainer(TrainingConfig(layer_weights={1: 0.5, 2: 0.5}), V, device="cuda")
    x, y = (t.cuda() for t in batches(1)[0])
    compiled = torch.compile(lambda x, y: trainer.compute_loss(model, x, y), fullgraph=True)
    torch.testing.assert_close(compiled(x, y), trainer.compute_loss(model, x, y), atol=1e-4, rtol=1e-4)
