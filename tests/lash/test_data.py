import math

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import lash.data
from lash import create_wikitext_dataloaders, load_dataset
from lash.data import OfflineCorpus, TokenBatches, WordTokenizer
from tests.lash.strategies import FAST

TRAIN = ["The cat sat on the mat .", "", " = Heading = ", "the dog sat on the log ."] * 40
VALID = ["the cat saw a zebra .", "the dog sat ."] * 30


def test_tokenizer_lowercases_caps_and_uses_train_vocab_only():
    tok = WordTokenizer(["B a a", "c B b"], max_vocab=3)
    assert tok.vocab == ["<unk>", "b", "a"]
    assert tok.encode(["A B c zebra"]).tolist() == [2, 1, 0, 0]
    with pytest.raises(ValueError, match="max_vocab=1"):
        WordTokenizer(["a"], max_vocab=1)


@pytest.fixture
def local_wikitext(monkeypatch):
    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        return datasets.DatasetDict(
            train=datasets.Dataset.from_dict({"text": TRAIN}), validation=datasets.Dataset.from_dict({"text": VALID})
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_wikitext_code_path_on_local_data(local_wikitext):
    train, val, vocab_size = create_wikitext_dataloaders(num_samples=20, batch_size=8, seq_len=6, seed=3)
    assert local_wikitext == [("wikitext", "wikitext-2-raw-v1")]
    words = {w for line in TRAIN for w in line.lower().split()}
    assert vocab_size == len(words) + 1
    assert train.inputs.shape == (20, 6) and len(train) == 3
    assert torch.equal(train.inputs[:, 1:], train.targets[:, :-1])  # y is x shifted by one
    assert val.inputs.shape[1] == 6 and val.inputs.shape[0] >= 1
    data = load_dataset("wikitext-2", num_samples=20, batch_size=8, seq_len=6, seed=3)
    assert "zebra" not in data.vocab and "saw" not in data.vocab
    assert (data.val.inputs == 0).any()  # val-only words map to <unk>
    capped = load_dataset("wikitext-2", num_samples=20, batch_size=8, seq_len=6, max_vocab=5)
    assert capped.vocab_size == 5 and int(capped.train.inputs.max()) < 5


def test_local_file_and_directory(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(TRAIN + VALID))
    data = load_dataset(str(text), num_samples=10, batch_size=4, seq_len=5)
    assert data.source == str(text) and data.train.inputs.shape == (10, 5)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.txt").write_text("\n".join(TRAIN))
    (tmp_path / "d" / "valid.txt").write_text("\n".join(VALID))
    data = load_dataset(str(tmp_path / "d"), num_samples=10, batch_size=4, seq_len=5)
    assert "zebra" not in data.vocab
    with pytest.raises(ValueError, match="nor an existing file or directory"):
        load_dataset(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="needs train.txt"):
        load_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="batch_size=0"):
        load_dataset("offline", batch_size=0)


def test_auto_falls_back_to_offline_with_one_warning(monkeypatch):
    monkeypatch.setattr(lash.data, "_hub_reachable", lambda: False)
    with pytest.warns(UserWarning, match="unreachable; using the offline generated corpus") as record:
        data = load_dataset("auto", num_samples=16, batch_size=4, seq_len=8)
    assert len(record) == 1 and data.source == "offline" and data.entropy_rate > 0


def test_auto_uses_wikitext_when_reachable(monkeypatch, local_wikitext):
    monkeypatch.setattr(lash.data, "_hub_reachable", lambda: True)
    assert load_dataset("auto", num_samples=8, batch_size=4, seq_len=6).source == "wikitext-2"


def test_offline_corpus_is_seeded_and_states_its_entropy():
    a = load_dataset("offline", num_samples=64, batch_size=16, seq_len=12, seed=1, max_vocab=300)
    b = load_dataset("offline", num_samples=64, batch_size=16, seq_len=12, seed=1, max_vocab=300)
    c = load_dataset("offline", num_samples=64, batch_size=16, seq_len=12, seed=2, max_vocab=300)
    assert torch.equal(a.train.inputs, b.train.inputs) and not torch.equal(a.train.inputs, c.train.inputs)
    assert a.vocab_size == 300 and 0 < a.entropy_rate < math.log(300)
    assert torch.equal(a.train.inputs[:, 1:], a.train.targets[:, :-1])


def test_offline_log_probs_equal_brute_force_marginal():
    corpus = OfflineCorpus(vocab_size=64, num_topics=5, pool_size=8, seed=0)
    tokens, logp = corpus.sample(6, 9, seed=1)
    for doc, lp in zip(tokens, logp):
        joint = np.zeros(corpus.num_topics)  # log p(prefix | topic)
        for t in range(1, len(doc)):
            before = np.logaddexp.reduce(joint)
            joint = joint + np.log(corpus._prob(doc[t - 1 : t], doc[t : t + 1])[0])
            assert lp[t - 1] == pytest.approx(np.logaddexp.reduce(joint) - before, abs=1e-9)


def test_offline_sampler_follows_its_tables():
    corpus = OfflineCorpus(vocab_size=200, num_topics=4, pool_size=10, seed=0)
    tokens, logp = corpus.sample(4000, 20, seed=1)
    prev, nxt = tokens[:, :-1].ravel(), tokens[:, 1:].ravel()
    func = corpus.is_function[prev]
    top = corpus.bigram_next[prev, corpus.bigram_prob[prev].argmax(-1)]
    observed = (nxt[func] == top[func]).mean()
    expected = ((1 - corpus.smoothing) * corpus.bigram_prob[prev[func]].max(-1) + corpus.smoothing / 200).mean()
    assert observed == pytest.approx(expected, abs=0.03)
    # Context helps: topic words get more predictable later in the document.
    topic_word = corpus.in_pool.any(0)[tokens[:, 1:]] & ~corpus.is_function[tokens[:, :-1]]
    early, late = -logp[:, :3][topic_word[:, :3]].mean(), -logp[:, -5:][topic_word[:, -5:]].mean()
    assert late < early - 0.5


def test_token_batches_shuffle_per_epoch_and_cover_everything():
    x = torch.arange(10).view(10, 1)
    batches = TokenBatches(x, x + 100, batch_size=4, shuffle=True, seed=0)
    first = torch.cat([bx for bx, _ in batches]).view(-1)
    second = torch.cat([bx for bx, _ in batches]).view(-1)
    assert sorted(first.tolist()) == list(range(10)) and not torch.equal(first, second)
    assert [by - bx for bx, by in batches][0].eq(100).all()
    assert [len(bx) for bx, _ in TokenBatches(x, x, batch_size=4)] == [4, 4, 2]


def test_split_holds_out_a_seeded_disjoint_slice():
    x = torch.arange(40).view(20, 2)
    weights = torch.rand(20, 2)
    batches = TokenBatches(x, x + 100, batch_size=3, shuffle=True, seed=7, weights=weights)
    rest, dev = batches.split(0.25, seed=1)
    assert dev.inputs.shape == (5, 2) and rest.inputs.shape == (15, 2)
    rows = sorted(torch.cat([rest.inputs, dev.inputs])[:, 0].tolist())
    assert rows == x[:, 0].tolist()  # disjoint, and together every sequence
    assert dev.inputs[:, 0].diff().eq(2).all()  # one contiguous passage
    assert torch.equal(dev.targets, dev.inputs + 100) and torch.equal(dev.weights, weights[dev.inputs[:, 0] // 2])
    assert rest.shuffle and not dev.shuffle and rest.batch_size == dev.batch_size == 3 and rest.seed == 1
    assert torch.equal(batches.split(0.25, seed=1)[1].inputs, dev.inputs)
    assert not torch.equal(batches.split(0.25, seed=2)[1].inputs, dev.inputs)
    assert [len(b) for b in next(iter(dev))] == [3, 3, 3]  # (x, y, w) batches
    with pytest.raises(ValueError, match=r"cannot hold out 10% of 1 sequences \(at least one\)"):
        TokenBatches(x[:1], x[:1], batch_size=1).split(0.1, seed=0)
    with pytest.raises(ValueError, match=r"fraction=0.0 is outside \(0.0, 1.0\)"):
        batches.split(0.0, seed=0)
    with pytest.raises(ValueError, match=r"weights \(20, 3\) must have the targets' shape \(20, 2\)"):
        TokenBatches(x, x, 4, weights=torch.ones(20, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_samples": 0}, "val_samples=0 must be None or an int >= 1"),
        ({"val_samples": -5}, "val_samples=-5 must be None or an int >= 1"),
        ({"max_vocab": 0}, "max_vocab=0 must be None or an int >= 2"),
        ({"max_vocab": 64.0}, "max_vocab=64.0 must be None or an int >= 2"),
        ({"seed": -1}, "seed=-1 must be an int >= 0"),
        ({"seed": True}, "seed=True must be an int >= 0"),
    ],
)
def test_load_dataset_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("offline", 16, 4, 8, **kwargs)


def test_text_file_errors_name_the_file_and_the_split(tmp_path):
    one_line = tmp_path / "one.txt"
    one_line.write_text("a b c d e f g h i j k l m n o p q r s t u v w x y z\n")
    with pytest.raises(ValueError, match=r"the validation split of .*one.txt holds 0 tokens"):
        load_dataset(str(one_line), 4, 2, 8)
    for name, data in (("latin1.txt", "café au lait\n".encode("latin-1")), ("binary.bin", bytes(range(256)))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"data file .*{name} is not UTF-8 text"):
            load_dataset(str(tmp_path / name), 4, 2, 8)


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
