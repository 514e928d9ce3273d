"""Data: WikiText-2, local text files, and an offline corpus with a known entropy rate.

Every source ends as :class:`TokenBatches` of ``(x, y)`` LongTensor pairs ``(batch, seq_len)``
with ``y`` the next tokens. Text goes through one word-level tokenizer (lower-case, whitespace
split) whose vocabulary comes from the training split only.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import numpy as np
import torch

from lash.validation import check_int, check_optional_int, check_real

UNK = "<unk>"
DATASETS = ("auto", "wikitext-2", "offline")


class TokenBatches:
    """Fixed-length sequences served as ``(x, y)`` batches; iterate again for another epoch.

    Args:
        inputs: ``(num_sequences, seq_len)`` token ids.
        targets: ``(num_sequences, seq_len)`` next-token ids.
        batch_size: sequences per batch (the last batch may be smaller).
        shuffle: reshuffle the sequences at every iteration (seeded, so runs repeat).
        seed: seed of the shuffling.

        weights: optional ``(num_sequences, seq_len)`` per-token loss weights; with them every
            batch is ``(x, y, w)``, which :class:`lash.Trainer` trains on as a weighted mean.

    ``epoch`` counts the iterations begun; the order of an iteration depends only on ``seed``
    and ``epoch``. :meth:`lash.Trainer.train_epoch` sets it to the epoch it trains, so a resumed
    run sees the order the uninterrupted run saw.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        weights: torch.Tensor | None = None,
    ) -> None:
        if inputs.shape != targets.shape or inputs.dim() != 2:
            raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be equal (n, seq_len)")
        if weights is not None and weights.shape != targets.shape:
            raise ValueError(f"weights {tuple(weights.shape)} must have the targets' shape {tuple(targets.shape)}")
        check_int("batch_size", batch_size, 1)
        self.inputs, self.targets, self.weights = inputs, targets, weights
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.inputs.shape[0] / self.batch_size)

    @property
    def num_tokens(self) -> int:
        return self.targets.numel()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.inputs.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        self.epoch += 1
        for start in range(0, n, self.batch_size):
            rows = order[start : start + self.batch_size]
            if self.weights is None:
                yield self.inputs[rows], self.targets[rows]
            else:
                yield self.inputs[rows], self.targets[rows], self.weights[rows]

    def in_order(self) -> TokenBatches:
        """The same sequences, served in their stored order at every iteration: for scoring them,
        where the order of the results must not depend on how many epochs were trained."""
        return TokenBatches(self.inputs, self.targets, self.batch_size, False, self.seed, self.weights)

    def split(self, fraction: float, seed: int) -> tuple[TokenBatches, TokenBatches]:
        """Carve a held-out slice: ``(rest, slice)`` with ``fraction`` of the sequences (at least one) in the slice.

        The slice is one contiguous run of sequences at a random offset (``seed``): sequences cut
        from text keep its order, so the slice holds whole passages the rest never saw, as a
        validation split does, rather than windows interleaved with the training ones. ``rest``
        keeps this object's batch size and shuffling, under ``seed``; the slice is served in
        order (for model selection and early stopping).
        """
        check_real("fraction", fraction, 0.0, 1.0, low_open=True, high_open=True)
        n = self.inputs.shape[0]
        count = max(1, round(fraction * n))
        if count >= n:
            raise ValueError(f"cannot hold out {fraction:.0%} of {n} sequences (at least one) and train on the rest")
        offset = int(torch.randint(n - count + 1, (), generator=torch.Generator().manual_seed(seed)))
        held = torch.arange(offset, offset + count)
        kept = torch.cat([torch.arange(offset), torch.arange(offset + count, n)])

        def part(rows: torch.Tensor, shuffle: bool) -> TokenBatches:
            w = None if self.weights is None else self.weights[rows]
            return TokenBatches(self.inputs[rows], self.targets[rows], self.batch_size, shuffle, seed, w)

        return part(kept, self.shuffle), part(held, False)


class LMData(NamedTuple):
    """A language-modelling dataset ready for training."""

    train: TokenBatches
    val: TokenBatches
    vocab_size: int
    vocab: list[str]  # id → word
    source: str  # "wikitext-2", "offline" or the path read
    entropy_rate: float | None  # nats per validation target, when the source knows it (offline)


class WordTokenizer:
    """Lower-case, whitespace-split words; ids by training frequency, ``<unk>`` (id 0) for the rest.

    Args:
        texts: the training texts the vocabulary is built from.
        max_vocab: cap on the vocabulary size, ``<unk>`` included (None: every word).
    """

    def __init__(self, texts: Sequence[str], max_vocab: int | None = None) -> None:
        check_optional_int("max_vocab", max_vocab, 2)
        counts = Counter(word for text in texts for word in text.lower().split())
        ranked = sorted(counts, key=lambda word: (-counts[word], word))
        if max_vocab is not None:
            ranked = ranked[: max_vocab - 1]
        self.vocab = [UNK] + ranked
        self.ids = {word: i for i, word in enumerate(self.vocab)}

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """All texts as one stream of ids ``(num_words,)``."""
        return torch.tensor([self.ids.get(word, 0) for text in texts for word in text.lower().split()], dtype=torch.long)


def _sequences(
    stream: torch.Tensor, seq_len: int, count: int | None, seed: int, split: str, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token stream into non-overlapping ``seq_len + 1`` windows; keep ``count`` of them at random."""
    windows = stream[: (stream.numel() // (seq_len + 1)) * (seq_len + 1)].view(-1, seq_len + 1)
    if windows.shape[0] == 0:
        raise ValueError(
            f"the {split} split of {source} holds {stream.numel()} tokens, fewer than one sequence of "
            f"seq_len + 1 = {seq_len + 1}"
        )
    if count is not None and count < windows.shape[0]:
        keep = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
        windows = windows[keep.sort().values]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _from_texts(
    train_texts: Sequence[str],
    val_texts: Sequence[str],
    source: str,
    num_samples: int | None,
    val_samples: int | None,
    batch_size: int,
    seq_len: int,
    seed: int,
    max_vocab: int | None,
) -> LMData:
    tokenizer = WordTokenizer(train_texts, max_vocab)
    x, y = _sequences(tokenizer.encode(train_texts), seq_len, num_samples, seed, "training", source)
    vx, vy = _sequences(tokenizer.encode(val_texts), seq_len, val_samples, seed + 1, "validation", source)
    return LMData(
        TokenBatches(x, y, batch_size, shuffle=True, seed=seed),
        TokenBatches(vx, vy, batch_size),
        len(tokenizer.vocab),
        tokenizer.vocab,
        source,
        None,
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (no retries, no long waits)."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_wikitext_texts() -> tuple[list[str], list[str]]:
    """The train and validation lines of WikiText-2 (raw) from the Hugging Face hub."""
    import datasets

    ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
    return list(ds["train"]["text"]), list(ds["validation"]["text"])


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"data file {path} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    except OSError as error:
        raise ValueError(f"data file {path} cannot be read ({error.strerror or error})") from None


def _read_local(path: Path) -> tuple[list[str], list[str]]:
    """A directory with train.txt and valid.txt/validation.txt/val.txt, or one file split 90/10 by lines."""
    if path.is_dir():
        train = path / "train.txt"
        val = next((path / name for name in ("valid.txt", "validation.txt", "val.txt") if (path / name).is_file()), None)
        if not train.is_file() or val is None:
            raise ValueError(f"directory {path} needs train.txt and one of valid.txt, validation.txt, val.txt")
        return _read_lines(train), _read_lines(val)
    if not path.is_file():
        raise ValueError(f"dataset {str(path)!r} is neither one of {', '.join(DATASETS)} nor an existing file or directory")
    lines = _read_lines(path)
    cut = max(1, int(len(lines) * 0.9))
    return lines[:cut], lines[cut:]


class OfflineCorpus:
    """A generated language with a known entropy rate, mixing easy and hard (context-dependent) tokens.

    Each sequence is one document with a hidden topic. The first tenth of the vocabulary are
    "function" words whose successor follows a global, topic-free bigram table: easy, one layer
    learns them. After any other ("content") word, the successor follows a shared sparse bigram
    row with probability ``1 - topic_mass`` and is otherwise a uniform draw from the document's
    topic pool of ``pool_size`` words. Those topic words are hard: predicting them needs the
    topic, which only earlier topic words anywhere in the document reveal, so their difficulty
    falls along the sequence and a model must gather evidence across its context. Every
    transition keeps a little uniform mass, so no token is impossible.

    The exact probability of every generated token given its prefix is tracked by Bayesian
    filtering over the topics, so the corpus reports its own entropy rate: the lowest loss any
    model can reach on it.

    Args:
        vocab_size: number of token ids.
        num_topics: number of hidden topics.
        pool_size: words per topic pool.
        topic_mass: probability that a content word is followed by a topic word.
        successors: non-zero entries per bigram row.
        smoothing: uniform probability mass mixed into every row.
        seed: seed of the language (its tables); samples take their own seed.
    """

    def __init__(
        self,
        vocab_size: int = 2048,
        num_topics: int = 16,
        pool_size: int = 32,
        topic_mass: float = 0.4,
        successors: int = 3,
        smoothing: float = 0.02,
        seed: int = 0,
    ) -> None:
        num_function = max(1, vocab_size // 10)
        if vocab_size - num_function < pool_size:
            raise ValueError(f"vocab_size={vocab_size} is too small for topic pools of {pool_size} words")
        rng = np.random.default_rng(seed)
        self.vocab_size, self.num_topics, self.pool_size = vocab_size, num_topics, pool_size
        self.topic_mass, self.smoothing = topic_mass, smoothing
        self.is_function = np.arange(vocab_size) < num_function  # (V,)
        self.bigram_next = rng.integers(vocab_size, size=(vocab_size, successors))  # (V, b)
        self.bigram_prob = rng.dirichlet(np.full(successors, 0.5), size=vocab_size)  # (V, b)
        self.pools = np.stack(
            [rng.choice(np.arange(num_function, vocab_size), pool_size, replace=False) for _ in range(num_topics)]
        )  # (Z, P)
        self.in_pool = np.zeros((num_topics, vocab_size), dtype=bool)  # (Z, V)
        np.put_along_axis(self.in_pool, self.pools, True, axis=1)

    def _prob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """p(next | prev, topic) for every topic: ``(n,)`` pairs → ``(n, Z)``."""
        bigram = ((self.bigram_next[prev] == nxt[:, None]) * self.bigram_prob[prev]).sum(-1)[:, None]  # (n, 1)
        content = (1 - self.topic_mass) * bigram + self.topic_mass * self.in_pool[:, nxt].T / self.pool_size
        table = np.where(self.is_function[prev][:, None], bigram, content)  # (n, Z)
        return (1 - self.smoothing) * table + self.smoothing / self.vocab_size

    def sample(self, num_docs: int, doc_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Generate documents and the exact log-probability of each token after the first.

        Returns:
            ``tokens (num_docs, doc_len)`` int64 and ``logp (num_docs, doc_len - 1)`` float64,
            ``logp[:, t]`` = log p(tokens[:, t + 1] | tokens[:, :t + 1]).
        """
        rng = np.random.default_rng(seed)
        n, rows = num_docs, np.arange(num_docs)
        topic = rng.integers(self.num_topics, size=n)
        tokens = np.empty((n, doc_len), dtype=np.int64)
        tokens[:, 0] = rng.integers(self.vocab_size, size=n)
        logp = np.empty((n, doc_len - 1))
        log_post = np.full((n, self.num_topics), -math.log(self.num_topics))  # log p(topic | prefix)
        for t in range(1, doc_len):
            prev = tokens[:, t - 1]
            pick = (rng.random(n)[:, None] > self.bigram_prob[prev].cumsum(-1)).sum(-1).clip(max=self.bigram_prob.shape[1] - 1)
            nxt = self.bigram_next[prev, pick]
            from_topic = ~self.is_function[prev] & (rng.random(n) < self.topic_mass)
            nxt = np.where(from_topic, self.pools[topic, rng.integers(self.pool_size, size=n)], nxt)
            nxt = np.where(rng.random(n) < self.smoothing, rng.integers(self.vocab_size, size=n), nxt)
            tokens[:, t] = nxt
            joint = log_post + np.log(self._prob(prev, nxt))  # (n, Z)
            logp[:, t - 1] = np.logaddexp.reduce(joint, axis=1)
            log_post = joint - logp[:, t - 1 : t]
        return tokens, logp


OFFLINE_MIN_VOCAB = 36  # a tenth function words, and 32 for the largest topic pool


def _offline(num_samples: int, val_samples: int, batch_size: int, seq_len: int, seed: int, max_vocab: int | None) -> LMData:
    if max_vocab is not None and max_vocab < OFFLINE_MIN_VOCAB:
        raise ValueError(f"max_vocab={max_vocab} is too small for the offline corpus, whose topics need at least "
                         f"{OFFLINE_MIN_VOCAB} words")  # fmt: skip
    corpus = OfflineCorpus(vocab_size=max_vocab or 2048, seed=seed)
    train, _ = corpus.sample(num_samples, seq_len + 1, seed=seed + 1)
    val, val_logp = corpus.sample(val_samples, seq_len + 1, seed=seed + 2)
    train, val = torch.from_numpy(train), torch.from_numpy(val)
    return LMData(
        TokenBatches(train[:, :-1].contiguous(), train[:, 1:].contiguous(), batch_size, shuffle=True, seed=seed),
        TokenBatches(val[:, :-1].contiguous(), val[:, 1:].contiguous(), batch_size),
        corpus.vocab_size,
        [f"w{i}" for i in range(corpus.vocab_size)],
        "offline",
        float(-val_logp.mean()),
    )


def load_dataset(
    name: str | os.PathLike = "auto",
    num_samples: int = 10000,
    batch_size: int = 64,
    seq_len: int = 32,
    seed: int = 42,
    max_vocab: int | None = None,
    val_samples: int | None = None,
) -> LMData:
    """Load a dataset by name: ``"auto"``, ``"wikitext-2"``, ``"offline"`` or a local path.

    ``"auto"`` uses WikiText-2 when the hub answers and otherwise the offline corpus, with one
    warning saying so.

    Args:
        name: which data: one of the names above, or a path (str or ``os.PathLike``).
        num_samples: training sequences (at most what the source holds).
        batch_size: sequences per batch.
        seq_len: tokens per sequence.
        seed: seed of the sampling, the shuffling and the offline corpus.
        max_vocab: vocabulary cap (text sources) or size (offline corpus, default 2048).
        val_samples: validation sequences (default ``num_samples // 5``, at least 1).
    """
    if not isinstance(name, os.PathLike) and not (isinstance(name, str) and name.strip()):
        raise ValueError(f"name={name!r} must be one of {', '.join(DATASETS)} or a path to a text file or directory")
    for field, value in (("num_samples", num_samples), ("batch_size", batch_size), ("seq_len", seq_len)):
        check_int(field, value, 1)
    check_optional_int("val_samples", val_samples, 1)
    check_optional_int("max_vocab", max_vocab, 2)
    check_int("seed", seed, 0)  # NumPy's generators take no negative seed
    val_samples = max(1, num_samples // 5) if val_samples is None else val_samples
    if name == "auto":
        if _hub_reachable():
            try:
                return load_dataset("wikitext-2", num_samples, batch_size, seq_len, seed, max_vocab, val_samples)
            except Exception as error:  # any hub/cache failure: fall back, and say why
                reason = f"loading WikiText-2 failed ({type(error).__name__}: {error})"
        else:
            reason = "the Hugging Face hub is unreachable"
        warnings.warn(f"{reason}; using the offline generated corpus instead", stacklevel=2)
        name = "offline"
    if name == "offline":
        return _offline(num_samples, val_samples, batch_size, seq_len, seed, max_vocab)
    if name == "wikitext-2":
        train_texts, val_texts = load_wikitext_texts()
    else:
        train_texts, val_texts = _read_local(Path(name))
    return _from_texts(train_texts, val_texts, name, num_samples, val_samples, batch_size, seq_len, seed, max_vocab)


def create_wikitext_dataloaders(
    num_samples: int, batch_size: int, seq_len: int = 32, seed: int = 42, max_vocab: int | None = None
) -> tuple[TokenBatches, TokenBatches, int]:
    """WikiText-2 as ``(train_batches, val_batches, vocab_size)``, as the original implementation's experiments use it."""
    data = load_dataset("wikitext-2", num_samples, batch_size, seq_len, seed, max_vocab)
    return data.train, data.val, data.vocab_size
