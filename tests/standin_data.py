"""Test-only stand-in for ``moe_variants.data.CorpusDataModule``: random tokens, the same batch dict and the same
resume contract (the train loader starts at ``trainer.global_step``). Never used outside tests."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset


def _batch(seed: int, index: int, batch_size: int, seq_len: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    # a few hundred distinct ids with a repeating pattern, so the loss can fall
    base = torch.randint(0, 300, (batch_size, seq_len + 1), generator=g)
    ids = torch.where(torch.arange(seq_len + 1) % 3 == 0, base, (base * 7 + 11) % 300) + 3
    doc_start = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    doc_start[:, 0] = True
    return {
        "input_ids": ids[:, :-1].clamp(max=vocab - 1),
        "labels": ids[:, 1:].clamp(max=vocab - 1),
        "domain_ids": torch.zeros(batch_size, seq_len, dtype=torch.long),
        "doc_start": doc_start,
    }


class _Stream(IterableDataset):
    def __init__(self, seed: int, start: int, stop: int, batch_size: int, seq_len: int, vocab: int) -> None:
        self.args = (seed, start, stop, batch_size, seq_len, vocab)

    def __iter__(self):
        seed, start, stop, b, s, v = self.args
        for i in range(start, stop):
            yield _batch(seed, i, b, s, v)

    def __len__(self) -> int:
        return self.args[2] - self.args[1]


class StandinDataModule(L.LightningDataModule):
    def __init__(self, seq_len: int = 32, batch_size: int = 4, vocab_size: int = 32000, seed: int = 0,
                 domains: tuple[str, ...] = ("alpha", "beta"), val_batches: int = 2, train_batches: int = 100_000,
                 **_: object) -> None:
        super().__init__()
        self.seq_len, self.batch_size, self.vocab_size, self.seed = seq_len, batch_size, vocab_size, seed
        self.domains = sorted(domains)
        self.val_batches, self.train_batches = val_batches, train_batches
        self.tokenizer_fingerprint = f"standin-{vocab_size}"

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(1)
        # what routers read of a tokenizer: pieces in SentencePiece notation (about half of them begin a word)
        marked = (torch.rand(self.vocab_size, generator=g) < 0.5).tolist()
        self.vocab_pieces = [("\u2581" if m else "") + f"w{i}" for i, m in enumerate(marked)]
        self.special_token_ids = [0, 1, 2]
        self.tokenizer = None

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self.trainer is not None else 0
        stream = _Stream(self.seed, start, self.train_batches, self.batch_size, self.seq_len, self.vocab_size)
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(_Stream(10_000 + d, 0, self.val_batches, self.batch_size, self.seq_len, self.vocab_size),
                       batch_size=None)
            for d in range(len(self.domains))
        ]

    def train_token_chunks(self):
        for i in range(4):
            yield _batch(self.seed, i, self.batch_size, self.seq_len, self.vocab_size)["input_ids"]
