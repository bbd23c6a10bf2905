"""Data side: corpus builder helpers, packing, batches, determinism, exact resume, clear errors."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from moe_variants.data import build
from moe_variants.data.datamodule import (
    PACK_SEED,
    CorpusDataModule,
    ResumableSampler,
    TextFilesDataModule,
    pins_memory,
)
from moe_variants.training.checkpoint import NOT_COMPARED, config_diff

DOMAINS = ["code", "law", "prose"]
S, B = 16, 4


def _doc(domain: str, i: int) -> str:
    if domain == "code":
        return "\n".join(f"    def f{i}_{j}(x):\n        return x * {j}  # {domain}" for j in range(i % 4 + 1))
    if domain == "law":
        return f"Section {i}. The licensee shall not sublicense clause {i * 7} without consent. " * (i % 3 + 1)
    return f"Chapter {i}. It was a fine morning, and Emma walked {i} miles to Highbury. " * (i % 5 + 1)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory):
    """A private MOE_DATA_ROOT / HF cache, with a tiny three-domain corpus saved like `moe-data` does."""
    import datasets

    root = tmp_path_factory.mktemp("moe_data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_DATA_ROOT", str(root))
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf_cache"))
        datasets.disable_progress_bars()
        rows = {
            "train": {"text": [], "domain": [], "source": []},
            "validation": {"text": [], "domain": [], "source": []},
        }
        for d in DOMAINS:
            for i in range(40):
                split = "validation" if i % 8 == 0 else "train"
                rows[split]["text"].append(_doc(d, i))
                rows[split]["domain"].append(d)
                rows[split]["source"].append(f"{d}-src")
        datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in rows.items()}).save_to_disk(
            str(root / "corpus")
        )
        (root / "corpus" / "manifest.json").write_text(json.dumps({"corpus_sha256": "tiny"}))
        yield root


@pytest.fixture
def corpus(data_root):
    return data_root / "corpus"


def _dm(corpus, **kw) -> CorpusDataModule:
    kw = {"seq_len": S, "batch_size": B, "val_sequences_per_domain": 3, **kw}
    dm = CorpusDataModule(corpus, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _attach(dm: CorpusDataModule, step: int, max_steps: int, accum: int = 1) -> None:
    dm.trainer = SimpleNamespace(
        global_step=step, max_steps=max_steps, accumulate_grad_batches=accum, world_size=1, global_rank=0
    )


# ---------------------------------------------------------------- builder helpers


def test_split_documents_keeps_text_and_size():
    paras = [f"Paragraph {i}. " + "word " * (i * 37 % 300) for i in range(200)]
    text = "\n\n".join(paras)
    docs = build.split_documents(text, target=2000)
    assert len(docs) > 5 and all(0 < len(d) <= 2000 * 3 for d in docs)
    assert "".join(docs).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")
    assert all(d.startswith("Paragraph") for d in docs)  # cut at paragraph boundaries
    one_line = "x" * 10_000
    assert [len(d) for d in build.split_documents(one_line, target=4000)] == [4000, 4000, 2000]
    assert build.split_documents("\n\n  \n\n") == []


def test_shares_and_validation_flags():
    assert build.shares([100, 10_000, 10_000], 3000) == [100, 1450, 1450]
    assert sum(build.shares([5, 6, 7], 100)) == 18
    docs = [f"doc {i}" for i in range(200)]
    flags = build.validation_flags(docs)
    assert sum(flags) == 10
    rev = build.validation_flags(docs[::-1])  # depends on the documents, not their order
    assert {d for d, f in zip(docs, flags) if f} == {d for d, f in zip(docs[::-1], rev) if f}
    assert build.validation_flags(["only"]) == [False]


def test_build_fails_clearly_when_nothing_is_available(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="no source could be read"):
        build.build_corpus(out=tmp_path / "corpus", raw=tmp_path / "raw", domains=["arxiv"])
    assert "texlive-science-doc" in capsys.readouterr().err  # the missing source is named
    with pytest.raises(ValueError, match="available"):
        build.build_corpus(out=tmp_path / "corpus", raw=tmp_path / "raw", domains=["pubmed"])


# ---------------------------------------------------------------- packing and batches


def test_batches_shapes_labels_and_flags(corpus):
    dm = _dm(corpus)
    assert dm.domains == DOMAINS and dm.vocab_size == 32000
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "domain_ids", "doc_start"}
    for k in ("input_ids", "labels", "domain_ids"):
        assert batch[k].shape == (B, S) and batch[k].dtype == torch.int64
    assert batch["doc_start"].shape == (B, S) and batch["doc_start"].dtype == torch.bool
    torch.testing.assert_close(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert torch.equal(batch["doc_start"], batch["input_ids"] == 1)  # BOS only ever opens a document
    assert len(dm.vocab_pieces) == dm.vocab_size and dm.special_token_ids == [0, 1, 2]  # what routers read


def test_packing_follows_documents(corpus):
    """The packed stream is every train document, BOS-prefixed, in the fixed pack order, with its domain."""
    import datasets

    dm = _dm(corpus)
    train = datasets.load_from_disk(str(corpus))["train"]
    order = np.random.default_rng(PACK_SEED).permutation(len(train))
    ids, doms, starts = [], [], []
    for i in order:
        doc = [1] + dm.tokenizer.encode(train[int(i)]["text"], add_special_tokens=False).ids
        ids += doc
        doms += [DOMAINS.index(train[int(i)]["domain"])] * len(doc)
        starts += [True] + [False] * (len(doc) - 1)
    w = dm.train_windows
    n = len(ids) // (S + 1)
    assert len(w) == n and w.tokens.shape == (n, S + 1)
    assert w.tokens.reshape(-1).tolist() == ids[: n * (S + 1)]
    assert w.domain_ids.reshape(-1).tolist() == doms[: n * (S + 1)]
    assert w.doc_start.reshape(-1).tolist() == starts[: n * (S + 1)]
    item = w[3]  # labels of a window are its inputs shifted by one
    assert item["input_ids"].tolist() == ids[3 * (S + 1) : 4 * (S + 1) - 1]
    assert item["labels"].tolist() == ids[3 * (S + 1) + 1 : 4 * (S + 1)]


def test_validation_loaders_one_per_domain(corpus):
    dm = _dm(corpus, val_sequences_per_domain=2)
    loaders = dm.val_dataloader()
    assert len(loaders) == len(DOMAINS)
    for d, loader in enumerate(loaders):
        batches = list(loader)
        assert sum(b["input_ids"].shape[0] for b in batches) == 2
        assert all((b["domain_ids"] == d).all() for b in batches)
        assert batches[0]["doc_start"][0, 0]  # starts at the first validation document
    again = [list(x) for x in _dm(corpus, val_sequences_per_domain=2).val_dataloader()]
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for x, y in zip(again, map(list, loaders)) for a, b in zip(x, y)
    )


def test_domain_subset(corpus):
    dm = _dm(corpus, domains=["prose", "code"])
    assert dm.domains == ["code", "prose"]
    assert set(np.unique(dm.train_windows.domain_ids).tolist()) == {0, 1}
    assert len(dm.val_dataloader()) == 2


def test_deterministic_and_seeded(corpus):
    def stream(seed):
        dm = _dm(corpus, seed=seed)
        _attach(dm, 0, max_steps=6)
        return [b["input_ids"] for b in itertools.islice(dm.train_dataloader(), 6)]

    a, b, c = stream(0), stream(0), stream(1)
    assert len(a) == 6 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_resume_continues_the_stream(corpus):
    def take(dm, n):
        return [b["input_ids"] for b in itertools.islice(dm.train_dataloader(), n)]

    dm = _dm(corpus)
    n_windows = len(dm.train_windows)
    max_steps, accum = 2 * n_windows // B + 3, 2  # long enough to cycle through several epochs
    _attach(dm, 0, max_steps, accum)
    with pytest.raises(TypeError):  # endless: Lightning's epoch counters cannot end it early on resume
        len(dm.train_dataloader())
    full = take(dm, max_steps * accum)
    for k in (1, 5, max_steps - 1):
        _attach(dm, k, max_steps, accum)
        tail = take(dm, (max_steps - k) * accum)
        assert all(torch.equal(x, y) for x, y in zip(tail, full[k * accum :], strict=True))
        # a checkpoint's saved position wins over the trainer's step counter
        state = dm.state_dict()
        assert state["train_position"] == k * accum * B
        resumed = _dm(corpus)
        _attach(resumed, 0, max_steps, accum)
        resumed.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(take(resumed, 3), full[k * accum : k * accum + 3]))


def test_sampler_epochs_are_permutations():
    s = ResumableSampler(7, total=7 * 3, seed=5)
    idx = list(s)
    for e in range(3):
        assert sorted(idx[7 * e : 7 * e + 7]) == list(range(7))
    assert idx[:7] != idx[7:14]
    assert list(ResumableSampler(7, total=21, seed=5, start=10)) == idx[10:]
    assert list(itertools.islice(ResumableSampler(7, total=None, seed=5, start=10), 11)) == idx[10:]
    ranks = [list(ResumableSampler(7, total=21, seed=5, rank=r, world_size=2)) for r in (0, 1)]
    assert ranks[0] == idx[0::2] and ranks[1] == idx[1::2]


def test_max_train_tokens(corpus):
    dm = _dm(corpus, max_train_tokens=5 * (S + 1) + 3)
    assert len(dm.train_windows) == 5


# ---------------------------------------------------------------- errors


def test_error_missing_corpus(tmp_path):
    with pytest.raises(ValueError, match="run `moe-data` first"):
        _dm(tmp_path / "nope")


def _save(path, train, val):
    import datasets

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": train, "domain": ["a"] * len(train)},
                features=datasets.Features({"text": datasets.Value("string"), "domain": datasets.Value("string")}),
            ),
            "validation": datasets.Dataset.from_dict({"text": val, "domain": ["a"] * len(val)}),
        }
    ).save_to_disk(str(path))
    return path


def test_error_empty_split_and_no_tokens(data_root, tmp_path):
    with pytest.raises(ValueError, match="'train' split .* is empty"):
        _dm(_save(tmp_path / "empty", [], ["some text"]))
    with pytest.raises(ValueError, match="has no tokens"):
        _dm(_save(tmp_path / "blank", ["", ""], ["some text"]))
    with pytest.raises(ValueError, match="fewer than one window"):
        _dm(_save(tmp_path / "short", ["hi"], ["some text"]))


def test_error_unknown_domain(corpus):
    with pytest.raises(ValueError, match=r"\['pubmed'\] not in .*available: code, law, prose"):
        _dm(corpus, domains=["pubmed", "law"])


def test_text_files_errors(data_root, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("good text é\n".encode() + b"caf\xe9 latin-1\n")
    with pytest.raises(ValueError, match=r"bad\.txt is not valid UTF-8 at byte offset 16"):
        _dm_files(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        _dm_files(empty)
    with pytest.raises(ValueError, match="no file matches"):
        _dm_files(tmp_path / "missing-*.txt")


def _dm_files(files, **kw) -> TextFilesDataModule:
    kw = {"seq_len": S, "batch_size": B, "val_sequences_per_domain": 2, **kw}
    dm = TextFilesDataModule(data_files=files if isinstance(files, dict) else str(files), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_text_files_domains_from_names_and_columns(data_root, tmp_path):
    for d in ("austen", "bible"):
        (tmp_path / f"{d}.txt").write_text("\n\n".join(_doc("prose", i) + f" {d}" for i in range(60)))
    dm = _dm_files(tmp_path / "*.txt")
    assert dm.domains == ["austen", "bible"]
    assert len(dm.val_dataloader()) == 2 and len(dm.train_windows) > 0

    rows = [{"text": _doc(d, i), "domain": d} for d in ("code", "law") for i in range(30)]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = _dm_files(tmp_path / "mixed.jsonl")
    assert dm.domains == ["code", "law"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (B, S)


# ---------------------------------------------------------------- the real thing


@pytest.mark.slow
def test_build_real_github_domain(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "corpus"
    m = build.build_corpus(out=out, raw=tmp_path / "raw", domains=["github"], max_bytes_per_domain=300_000)
    dd = datasets.load_from_disk(str(out))
    assert set(dd) == {"train", "validation"} and set(dd["train"].unique("domain")) == {"github"}
    src = m["sources"][0]
    assert (
        src["source"] == "python-stdlib"
        and 250_000 < src["bytes"] <= 300_000
        and src["docs"] == len(dd["train"]) + len(dd["validation"])
    )
    assert json.loads((out / "manifest.json").read_text())["corpus_sha256"] == m["corpus_sha256"]
    again = build.build_corpus(
        out=tmp_path / "again", raw=tmp_path / "raw", domains=["github"], max_bytes_per_domain=300_000
    )
    assert again["corpus_sha256"] == m["corpus_sha256"]  # deterministic
    assert build.build_corpus(out=out, domains=["github"]) == m  # exists: no-op
    dm = CorpusDataModule(out, seq_len=64, batch_size=2, val_sequences_per_domain=2)
    dm.prepare_data()
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (2, 64)


def test_token_chunks_and_fingerprints(corpus):
    dm = _dm(corpus)
    chunks = list(dm.train_token_chunks(windows_per_chunk=7))
    assert all(c.dtype == torch.int64 and c.shape[1] == S + 1 for c in chunks)
    assert torch.equal(torch.cat(chunks), torch.from_numpy(dm.train_windows.tokens.astype(np.int64)))
    assert dm.tokenizer_fingerprint == _dm(corpus, domains=["law"]).tokenizer_fingerprint
    assert dm.data_fingerprint == _dm(corpus, seed=3).data_fingerprint  # the seed only reorders
    assert dm.data_fingerprint != _dm(corpus, domains=["law"]).data_fingerprint
    assert dm.data_fingerprint != _dm(corpus, seq_len=S + 1).data_fingerprint


def test_loaders_pin_memory_when_training_on_a_gpu(corpus):
    """data.pin_memory=auto: pinned batches when the trainer trains on a CUDA device (Lightning's non_blocking copy
    to the GPU is then asynchronous), pageable memory otherwise; true/false choose; other values are refused; a
    checkpoint saved before the key existed resumes (it is not compared)."""
    dm = _dm(corpus)
    assert not dm.train_dataloader().pin_memory  # no trainer
    assert not pins_memory("auto", L.Trainer(accelerator="cpu", logger=False))
    _attach(dm, 0, 10)
    dm.trainer.strategy = SimpleNamespace(root_device=torch.device("cpu"))
    assert not dm.train_dataloader().pin_memory and not any(v.pin_memory for v in dm.val_dataloader())
    dm.trainer.strategy = SimpleNamespace(root_device=torch.device("cuda", 0))
    assert dm.train_dataloader().pin_memory and all(v.pin_memory for v in dm.val_dataloader())
    dm.pin_memory = False
    assert not dm.train_dataloader().pin_memory
    assert pins_memory(True, None)
    with pytest.raises(ValueError, match=r"data.pin_memory='yes': set auto \(pinned batches when training on a GPU\)"):
        CorpusDataModule(corpus, pin_memory="yes")
    old, new = {"data": {"num_workers": 0}}, {"data": {"num_workers": 0, "pin_memory": "auto"}}
    assert config_diff(old, new, ("data",), ignore=NOT_COMPARED) == {}
