import torch

from lash.distributed import DistInfo, ShardedBatches, all_reduce_sum, launched_by_torchrun


def test_each_rank_keeps_its_rows_of_every_batch():
    x = torch.arange(10).view(5, 2)
    batches = [(x, x + 100)]
    shards = [list(ShardedBatches(batches, DistInfo(rank, 2))) for rank in range(2)]
    assert torch.equal(shards[0][0][0], x[0::2]) and torch.equal(shards[1][0][1], x[1::2] + 100)
    assert len(ShardedBatches(batches, DistInfo(1, 2))) == 1
    assert DistInfo().is_main and not DistInfo(1, 2).is_main


def test_without_a_process_group_nothing_is_reduced(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert not launched_by_torchrun()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
