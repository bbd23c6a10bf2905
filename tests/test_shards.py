"""The large-corpus path end to end on a tiny build: pinned packages -> deduplicated, split, tokenized uint16
shards -> memory-mapped windows with exact resume; pieces for transport; any `datasets` source cached by
fingerprint (trained on and analysed per domain)."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moe_variants import paths
from moe_variants.data import dedup, shards, transport
from moe_variants.data.large import build_large
from moe_variants.data.pins import load_pins
from moe_variants.data.shard_datamodule import DatasetsDataModule, ShardDataModule

# Two domains from packages that scripts/setup.sh already downloads: a training and a validation package each.
TEST_PINS = [
    ("dict-foldoc", "wikipedia", "train", 'reader = "dictd"\ndict = "foldoc"'),
    ("dict-wn", "wikipedia", "validation", 'reader = "dictd"\ndict = "wn"'),
    ("perl-doc", "stackexchange", "train", "include = '^usr/share/perl/[^/]+/pod/[^/]+\\.pod(\\.gz)?$'"),
    ("python3.11-doc", "stackexchange", "validation", "include = '/_sources/library/.*\\.txt$'"),
]
TARGET, VAL, SHARD = 120_000, 20_000, 40_000


def _write_pins(path: Path, debs: Path) -> Path:
    blocks = []
    for name, domain, split, extra in TEST_PINS:
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            pytest.skip(f"{name}_*.deb not in {debs} (scripts/setup.sh downloads it)")
        version = urllib.parse.unquote(found[-1].name.split("_")[1])
        blocks.append(f'[[source]]\nname = "{name}"\nversion = "{version}"\nregistry = "deb"\ndomain = "{domain}"\n'
                      f'split = "{split}"\nlicence = "test"\n{extra}\n')
    path.write_text("\n".join(blocks))
    return path


def _build(tmp: Path, workers: int) -> tuple[Path, dict]:
    raw = tmp / "raw"
    raw.mkdir(parents=True)
    (raw / "debs").symlink_to(paths.raw_dir() / "debs")  # the downloads, with private caches beside them
    pins = _write_pins(tmp / "pins.toml", paths.raw_dir() / "debs")
    out = tmp / "corpus"
    m = build_large(out, raw, pins, target_tokens=TARGET, val_tokens_per_domain=VAL, shard_tokens=SHARD,
                    workers=workers, fetch=False)
    return out, m


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("large"), workers=2)


def _dm(corpus: Path, **kw) -> ShardDataModule:
    dm = ShardDataModule(corpus, **{"seq_len": 64, "batch_size": 4, "val_sequences_per_domain": 3, **kw})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _attach(dm, step: int, max_steps: int, accum: int = 1) -> None:
    dm.trainer = SimpleNamespace(global_step=step, max_steps=max_steps, accumulate_grad_batches=accum, world_size=1,
                                 global_rank=0)


def test_pin_list_parses_and_is_pinned():
    pins = load_pins()
    assert {p.domain for p in pins} >= {"arxiv", "dm_mathematics", "freelaw", "github", "gutenberg",
                                         "stackexchange", "wikipedia"}
    assert all(p.version for p in pins)
    for d in {p.domain for p in pins} - {"dm_mathematics"}:  # validation is held out by package
        assert {p.split for p in pins if p.domain == d} == {"train", "validation"}, d


def test_html_and_man_page_text():
    from moe_variants.data.extract import html_to_text, troff_to_text, usable

    page = ("<html><head><title>t</title><script>var x;</script></head><body>"
            '<div class="related" role="navigation"><a href="#">index</a></div>'
            '<div class="sphinxsidebar"><p>search</p></div>'
            '<div class="body" role="main"><h1>Title</h1><p>First &amp; <b>bold</b> paragraph.</p>'
            "<pre>  code\n    indented</pre><ul><li>one</li><li>two</li></ul></div>"
            '<div class="footer">footer text</div></body></html>')
    text = html_to_text(page)
    assert text.startswith("# Title") and "First & bold paragraph." in text and "  code\n    indented" in text
    assert text.endswith("one\n\ntwo") and not any(w in text for w in ("index", "search", "var x", "footer"))
    # a page without a main region: everything outside skipped elements, after a navigation block closes
    assert html_to_text('<body><nav><a>menu</a></nav><p>Body text.</p></body>') == "Body text."
    man = '.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH SYNOPSIS\n.B ls\n[\\fIOPTION\\fR]...\n'
    assert troff_to_text(man) == "LS 1\n\nNAME\nls - list directory contents\n\nSYNOPSIS\nls\n[OPTION]..."
    assert not usable("x" * 5000) and not usable("a\x00b") and usable("a line\nanother line")


def test_minhash_finds_near_duplicates():
    rng = np.random.default_rng(0)
    a = rng.integers(3, 32000, 600)
    b = a.copy()
    b[::50] = 7  # 2% of the tokens changed: Jaccard of 5-grams ~0.9
    c = rng.integers(3, 32000, 600)
    idx = dedup.NearDuplicateIndex()
    assert idx.offer(b"a" * 16, dedup.signature(a))
    assert not idx.offer(b"b" * 16, dedup.signature(b))  # near duplicate
    assert idx.offer(b"c" * 16, dedup.signature(c))
    assert not idx.offer(b"a" * 16, dedup.signature(c))  # exact (same text hash)
    assert (idx.exact_dups, idx.near_dups) == (1, 1)
    assert dedup.text_hash("a  b\nc") == dedup.text_hash("a b c")


def test_large_build_manifest_and_split(large):
    out, m = large
    index = shards.read_index(out)
    assert index["domains"] == ["stackexchange", "wikipedia"]
    assert 0.9 * TARGET <= m["train_tokens"] <= TARGET
    assert sum(s["tokens"] for s in index["train"]) == m["train_tokens"] and len(index["train"]) >= 2
    for d in index["domains"]:
        st = m["domains"][d]
        assert st["train"]["tokens"] > 0 and 0 < st["validation"]["tokens"] <= VAL
    by_source = {s["package"]: s for s in m["sources"]}
    assert all(len(s["archive_sha256"]) >= 32 and s["licence"] and s["text_bytes"] > 0 for s in by_source.values())
    # validation and training share no source package and no document
    val_src = {i for i, k in enumerate(index["sources"]) if any(k.startswith(f"deb:{n}==") for n, _, sp, _ in
                                                                TEST_PINS if sp == "validation")}
    train_docs, val_docs = set(), set()
    for e in index["train"]:
        st = shards.Stream(out / "train" / e["name"], e["tokens"])
        toks, docs = np.asarray(st.tokens()), st.docs()
        assert not set(docs["source"].tolist()) & val_src
        train_docs |= {toks[a:a + n].tobytes() for a, n in zip(docs["start"], docs["length"])}
    for d, e in index["validation"].items():
        st = shards.Stream(out / "validation" / d, e["tokens"])
        toks, docs = np.asarray(st.tokens()), st.docs()
        assert set(docs["source"].tolist()) <= val_src and set(docs["domain"].tolist()) == {index["domains"].index(d)}
        val_docs |= {toks[a:a + n].tobytes() for a, n in zip(docs["start"], docs["length"])}
        assert (toks[docs["start"]] == index["bos_id"]).all()
    assert not train_docs & val_docs


@pytest.mark.slow
def test_large_build_is_deterministic(large, tmp_path):
    """Same inputs -> same bytes: a second build with fresh caches, in one process instead of two."""
    _, again = _build(tmp_path, workers=1)
    assert again["content_sha256"] == large[1]["content_sha256"]


def test_shard_windows_batches_and_token_chunks(large):
    out, _ = large
    dm = _dm(out)
    assert dm.domains == ["stackexchange", "wikipedia"] and dm.vocab_size == 32000
    bos = shards.read_index(out)["bos_id"]
    w = dm.train_windows
    for i in (0, len(w) // 2, len(w) - 1):
        item = w[i]
        ids = torch.cat([item["input_ids"], item["labels"][-1:]])
        assert torch.equal(item["doc_start"], item["input_ids"] == bos)  # BOS opens every document
        s, a = w.locate(i)
        docs = w.streams[s].docs()
        expect = docs["domain"][np.searchsorted(docs["start"], np.arange(a, a + 64), side="right") - 1]
        assert torch.equal(item["domain_ids"], torch.from_numpy(expect.astype(np.int64)))
        assert torch.equal(ids, torch.from_numpy(np.asarray(w.streams[s].tokens()[a:a + 65], dtype=np.int64)))
    _attach(dm, 0, 3)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "domain_ids", "doc_start"}  # span routers find their own spans
    assert batch["input_ids"].shape == (4, 64) and batch["doc_start"].dtype == torch.bool
    assert [len(v) for v in dm.val_windows] == [3, 3] and len(dm.val_dataloader()) == 2
    chunks = list(dm.train_token_chunks(windows_per_chunk=50))
    assert torch.equal(torch.cat(chunks), torch.stack([torch.from_numpy(w.raw(i)[0]) for i in range(len(w))]))
    assert dm.data_fingerprint != _dm(out, seq_len=32).data_fingerprint
    with pytest.raises(ValueError, match="mix all its domains"):
        _dm(out, domains=["wikipedia"])
    with pytest.raises(ValueError, match="another tokenizer"):
        ShardDataModule(out, tokenizer=str(_bpe_json(out.parent))).prepare_data()


def _bpe_json(tmp: Path) -> Path:
    from moe_variants.data.tokenizer import train_bpe

    path = tmp / "bpe.json"
    if not path.is_file():
        train_bpe(["some text to learn from"] * 10, 300).save(str(path))
    return path


def test_shard_resume_is_exact(large):
    out, _ = large
    dm = _dm(out, batch_size=3)
    max_steps, accum = len(dm.train_windows) // 3 + 4, 2  # crosses an epoch boundary
    _attach(dm, 0, max_steps, accum)
    full = [b["input_ids"] for b in dm.train_dataloader()]
    for k in (1, max_steps - 1):
        _attach(dm, k, max_steps, accum)
        tail = [b["input_ids"] for b in dm.train_dataloader()]
        assert len(tail) == (max_steps - k) * accum
        assert all(torch.equal(x, y) for x, y in zip(tail, full[k * accum:]))


def test_pack_unpack_partial_and_damaged(large, tmp_path):
    out, _ = large
    limit = 60_000
    m = transport.pack(out, tmp_path / "pieces", max_bytes=limit, log=lambda *_: None)
    pieces = sorted((tmp_path / "pieces").glob("piece-*.zz"))
    assert len(pieces) == m["pieces"] > 2 and all(p.stat().st_size <= limit for p in pieces)
    # only the pieces of index, manifest, validation and the first shard have arrived
    names = [p["name"] for f in m["files"] for p in f["pieces"]]
    first_shard = next(i for i, f in enumerate(m["files"]) if f["path"].startswith("train/shard-00001"))
    arrived = tmp_path / "arrived"
    arrived.mkdir()
    (arrived / "pack.json").write_bytes((tmp_path / "pieces" / "pack.json").read_bytes())
    for f in m["files"][:first_shard]:
        for p in f["pieces"]:
            (arrived / p["name"]).write_bytes((tmp_path / "pieces" / p["name"]).read_bytes())
    got = transport.unpack(arrived, tmp_path / "corpus", log=lambda *_: None)
    assert got["train_shards_ready"] == 1 and not got["complete"]
    with pytest.raises(ValueError, match="allow_partial"):
        _dm(tmp_path / "corpus")
    with pytest.warns(UserWarning, match="not received yet"):
        part = _dm(tmp_path / "corpus", allow_partial=True)
    assert 0 < len(part.train_windows) < len(_dm(out).train_windows)
    # the rest arrives, one piece damaged in transit
    for n in names:
        (arrived / n).write_bytes((tmp_path / "pieces" / n).read_bytes())
    bad = arrived / m["files"][-1]["pieces"][0]["name"]
    blob = bytearray(bad.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    bad.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="damaged"):
        transport.unpack(arrived, tmp_path / "corpus", log=lambda *_: None)
    bad.write_bytes((tmp_path / "pieces" / bad.name).read_bytes())
    assert transport.unpack(arrived, tmp_path / "corpus", log=lambda *_: None)["complete"]
    for f in m["files"]:
        assert shards.sha256_file(tmp_path / "corpus" / f["path"]) == f["sha256"]
    assert transport.parse_size("64MiB") == 64 * 2**20


# ---------------------------------------------------------------- any `datasets` source


def _rows(n: int = 60) -> list[dict]:
    texts = {"law": "Section {i}. The licensee shall not sublicense clause {i} without written consent.",
             "code": "def f{i}(x):\n    return x * {i} + {i}\n",
             "prose": "Chapter {i}. It was a fine morning, and Emma walked {i} miles to Highbury."}
    return [{"body": (t.format(i=i) + " ") * (i % 4 + 3), "source": d, "id": i}
            for i in range(n) for d, t in texts.items()]


def _ds_dm(tmp: Path, **kw) -> DatasetsDataModule:
    base = dict(path="json", data_files=str(tmp / "mix.jsonl"), text_column="body", domain_column="source",
                cache_dir=str(tmp / "cache"), seq_len=32, batch_size=2, val_sequences_per_domain=2,
                validation_fraction=0.1)
    return DatasetsDataModule(**{**base, **kw})


def test_datasets_source_tokenized_once(tmp_path):
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    dm = _ds_dm(tmp_path)
    dm.setup("fit")
    assert dm.tokenized_now and dm.domains == ["code", "law", "prose"]
    assert len(dm.val_dataloader()) == 3 and next(iter(dm.train_dataloader()))["input_ids"].shape == (2, 32)
    again = _ds_dm(tmp_path)
    again.setup("fit")
    assert not again.tokenized_now and again.data_fingerprint == dm.data_fingerprint  # the cache, by fingerprint
    with open(tmp_path / "mix.jsonl", "a") as f:  # edited file: tokenized again
        f.write(json.dumps({"body": "one more document about law", "source": "law", "id": -1}) + "\n")
    edited = _ds_dm(tmp_path)
    edited.setup("fit")
    assert edited.tokenized_now and edited.data_fingerprint != dm.data_fingerprint


def test_datasets_source_parquet_splits(tmp_path):
    import datasets

    rows = _rows(30)
    datasets.Dataset.from_list(rows[:60]).to_parquet(str(tmp_path / "train.parquet"))
    datasets.Dataset.from_list(rows[60:]).to_parquet(str(tmp_path / "val.parquet"))
    dm = DatasetsDataModule(path="parquet", data_files={"train": str(tmp_path / "train.parquet"),
                                                         "validation": str(tmp_path / "val.parquet")},
                            validation_split="validation", text_column="body", domain_column="source",
                            cache_dir=str(tmp_path / "cache"), seq_len=16, batch_size=2, val_sequences_per_domain=1,
                            streaming=True)
    dm.setup("fit")
    val = shards.read_index(dm.corpus_dir)["validation"]
    assert sorted(val) == dm.domains and sum(v["docs"] for v in val.values()) == 30


def test_datasets_source_errors(tmp_path, monkeypatch):
    import datasets

    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(5)))
    with pytest.raises(ValueError, match="no text column 'text'.*body"):
        _ds_dm(tmp_path, text_column="text").setup("fit")
    datasets.Dataset.from_dict({"text": [], "domain": []}, features=datasets.Features(
        {"text": datasets.Value("string"), "domain": datasets.Value("string")})).to_parquet(
        str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match="is empty"):
        _ds_dm(tmp_path, path="parquet", data_files=str(tmp_path / "empty.parquet"), text_column="text",
               domain_column="domain").setup("fit")
    with pytest.raises(ValueError, match="no split 'test'"):
        _ds_dm(tmp_path, split="test").setup("fit")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="needs the network"):
        _ds_dm(tmp_path, path="moe-variants-test/no-such-dataset", data_files=None).setup("fit")


def test_datasets_source_trains_and_is_analysed_per_domain(tmp_path, monkeypatch):
    """moe-train data=datasets on a JSON Lines file, then moe-analyze on the same source: per-domain results,
    and the second use reads the cached shards."""
    from conftest import CONF_DIR, TEST_CONF_DIR
    from hydra import compose, initialize_config_dir

    from moe_variants.analysis.analyze import run as analyze_run
    from moe_variants.training.run import run as train_run

    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    data = ["data=datasets", "data.path=json", f"data.data_files={tmp_path / 'mix.jsonl'}", "data.text_column=body",
            "data.domain_column=source", f"data.cache_dir={tmp_path / 'cache'}", "data.validation_fraction=0.1"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"hydra.searchpath=[file://{TEST_CONF_DIR}]", f"run_dir={tmp_path / 'run'}", "name=ds", "logger=csv",
            "model=tiny", "data.seq_len=32", "data.batch_size=2", "data.val_sequences_per_domain=2",
            "trainer.accelerator=cpu", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.val_check_interval=100", "scheduler.warmup_steps=1",
            "report=false", *data])
    train_run(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        acfg = compose("analyze", overrides=[f"ckpt={ckpt}", "name=ds", f"results_dir={tmp_path / 'res'}",
                                             "sequences_per_domain=2", "batch_size=2", "wandb=false", *data])
    metrics = analyze_run(acfg)
    assert metrics["domains"] == ["code", "law", "prose"]
    assert "| law |" in (tmp_path / "res" / "ds" / "table5.md").read_text()
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one tokenization, reused by the analysis
