"""The converted Mixtral tokenizer must encode exactly like SentencePiece; trained BPEs are cached and usable."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import sentencepiece as spm
import torch

from moe_variants.data import tokenizer as T
from moe_variants.routers import spans

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife.",
    "In the beginning God created the heaven and the earth.",
    "Mixture-of-Experts routers send each token to k of E experts; hash routing uses the token id alone.",
    "  two leading spaces",
    " one leading space",
    "trailing spaces   ",
    "double  space  between  words",
    "\ttab at start",
    "tabs\tin\tthe\tmiddle",
    "line one\nline two\n\nparagraph",
    "\n",
    "\n\n\n",
    " ",
    "   ",
    "a",
    "I",
    "",
    "don't can't won't it's",
    "e.g. i.e. etc. U.S.A. 3.14159 1,000,000 2024-02-29",
    "<s> and </s> and <unk> as literal text",
    "<0x0A> is not a byte here",
    "\u2581already marked",
    "x\u2581y",
]
LATEX = [
    r"\documentclass[11pt]{article}",
    r"\usepackage{amsmath,amssymb}",
    r"\begin{equation}",
    r"  E = mc^2 \quad \text{and} \quad \int_0^\infty e^{-x^2}\,dx = \frac{\sqrt{\pi}}{2}",
    r"\end{equation}",
    r"% a comment with 100\% certainty",
    r"$\alpha_{i,j}^{(k)} \leq \beta$",
    r"\section*{Results} \label{sec:results}",
    r"\[ \sum_{n=1}^{N} n = \frac{N(N+1)}{2} \]",
]
UNICODE = [
    "naïve café coöperate façade jalapeño",
    "Ærøskøbing ñandú Straße Œuvre",
    "Ελληνικά κείμενο",
    "Русский текст",
    "日本語のテキストです。",
    "中文文本测试",
    "한국어 텍스트",
    "עברית",
    "العربية",
    "हिन्दी पाठ",
    "ไทย",
    "emoji 😀🎉🚀 👩‍👩‍👧‍👦 🇫🇷 ✔️",
    "math ∀x∈ℝ: x² ≥ 0, ∑ ∏ ∫ ≈ ≠ ∞",
    "arrows → ← ↔ ⇒",
    "€£¥₹ ©®™",
    "zero\u200bwidth",
    "combining e\u0301 vs é",
    "\u00a0nbsp\u00a0",
    "replacement \ufffd char",
    "\x00\x01 control",
    "ＦＵＬＬＷＩＤＴＨ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙",
]
CODE = textwrap.dedent("""
    def f(x):
        if x:
            return  x  +  1        # comment
        else:
            return [i for i in range(10)]


    class A:
    \tdef g(self):  # tab-indented
    \t\tpass
    for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; }
        }
    x = {"a": 1, 'b': [1, 2, 3], "c": None}
    """).splitlines()


def _lines() -> list[str]:
    src = inspect.getsource(textwrap).splitlines() + inspect.getsource(json.decoder).splitlines()
    lines = PROSE + LATEX + UNICODE + CODE + src[:300]
    blocks = ["\n".join(src[i : i + 15]) for i in range(0, 150, 15)]  # multi-line text with indentation
    return lines + blocks


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_DATA_ROOT", str(tmp_path_factory.mktemp("data_root")))
        yield T.load_tokenizer("mixtral")


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(T.mixtral_model_path()))


def test_mixtral_matches_sentencepiece_exactly(mixtral, sp):
    lines = _lines()
    assert len(lines) >= 300
    encs = mixtral.encode_batch(lines, add_special_tokens=False)
    mismatches = [(x, e.tokens) for x, e in zip(lines, encs) if e.ids != sp.encode(x)]
    assert mismatches == []


def test_mixtral_vocab_and_specials(mixtral, sp):
    assert mixtral.get_vocab_size() == 32000 == sp.get_piece_size()
    assert mixtral.token_to_id("<unk>") == 0
    assert mixtral.token_to_id("<s>") == T.bos_id(mixtral) == sp.bos_id() == 1
    assert mixtral.token_to_id("</s>") == T.eos_id(mixtral) == sp.eos_id() == 2
    assert [mixtral.id_to_token(i) for i in (3, 258, 1000, 31999)] == [sp.id_to_piece(i) for i in (3, 258, 1000, 31999)]
    assert mixtral.encode("<s>", add_special_tokens=False).ids != [1]  # literal text never becomes BOS


def test_mixtral_decode_round_trip(mixtral, sp):
    for line in _lines():
        if "\u2581" in line:  # "▁" is SentencePiece's space marker: it decodes to " " in both
            continue
        ids = mixtral.encode(line, add_special_tokens=False).ids
        assert mixtral.decode(ids) == line == sp.decode(ids)


def test_mixtral_cache_and_fingerprint(mixtral):
    from moe_variants import paths

    cached = sorted(paths.tokenizers_dir().glob("mixtral-v1-*.json"))  # keyed by the .model's sha256
    assert len(cached) == 1
    assert T.tokenizer_fingerprint(T.load_tokenizer(str(cached[0]))) == T.tokenizer_fingerprint(mixtral)
    assert T.tokenizer_fingerprint(T.load_tokenizer("mixtral")) == T.tokenizer_fingerprint(mixtral)
    assert len(T.tokenizer_fingerprint(mixtral)) == 64


def test_mixtral_loads_from_cache_without_mistral_common(mixtral, monkeypatch):
    def missing():
        raise ModuleNotFoundError("No module named 'mistral_common'")

    monkeypatch.setattr(T, "mixtral_model_path", missing)  # a machine that got the data but not the package
    assert T.tokenizer_fingerprint(T.load_tokenizer("mixtral")) == T.tokenizer_fingerprint(mixtral)


def test_mixtral_refuses_another_model_file(tmp_path, monkeypatch):
    from moe_variants import paths

    other = tmp_path / "tokenizer.model"
    other.write_bytes(b"not the pinned model")
    monkeypatch.setattr(paths, "tokenizers_dir", lambda: tmp_path / "tok")  # nothing cached
    monkeypatch.setattr(T, "mixtral_model_path", lambda: other)
    with pytest.raises(ValueError, match="not the Mixtral tokenizer.model this project pins"):
        T.load_tokenizer("mixtral")


def word_spans(tok, text: str) -> list[str]:
    """The word spans of ``text`` under ``tok``, as "|"-joined pieces."""
    enc = tok.encode(text, add_special_tokens=False)
    kinds = spans.piece_kinds(T.vocab_pieces(tok), T.special_token_ids(tok))
    out: list[list[str]] = []
    for piece, start in zip(enc.tokens, spans.word_starts(torch.tensor([enc.ids]), kinds)[0].tolist()):
        if start:
            out.append([])
        out[-1].append(piece)
    return ["|".join(s) for s in out]


@pytest.mark.parametrize("text, expected", [
    # code: the identifier after "(" or "." starts its own word, punctuation and the newline are their own spans
    ("def f(self):\n    return self.append(None)",
     ["▁def", "▁f", "(", "self", "):", "<0x0A>", "▁▁▁", "▁return", "▁self", ".",
      "append", "(", "None", ")"]),
    # prose: a multi-piece word is one span; a line-initial word does not join the newline
    ("The unbelievable story.\nThe end",
     ["▁The", "▁un|bel|iev|able", "▁story", ".", "<0x0A>", "The", "▁end"]),
    # LaTeX
    ("\\begin{equation} x^2 \\end{equation}",
     ["▁\\", "begin", "{", "equation", "}", "▁x", "^", "2", "▁\\", "end", "{", "equation", "}"]),
    # accented letters are pieces of the word
    ("naïve café", ["▁na|ï|ve", "▁café"]),
    # the byte-fallback pieces of one character stay together; a letter after it starts a word
    ("x\U0001f99cy parrot", ["▁x", "<0xF0>|<0x9F>|<0xA6>|<0x9C>", "y", "▁par|rot"]),
])
def test_word_spans_of_the_mixtral_tokenizer(mixtral, text, expected):
    assert word_spans(mixtral, text) == expected


def test_piece_kinds_of_the_mixtral_vocabulary(mixtral):
    kinds = spans.piece_kinds(T.vocab_pieces(mixtral), T.special_token_ids(mixtral))
    assert kinds.shape == (32000,) and kinds.dtype == torch.int8
    kind = {name: int(kinds[mixtral.token_to_id(name)]) for name in
            ("<s>", "<0x0A>", "<0x09>", "<0xC3>", "<0x9F>", "▁The", "able", "(", "▁=", "▁")}
    assert kind == {"<s>": spans.SPECIAL, "<0x0A>": spans.SPACE, "<0x09>": spans.SPACE, "<0xC3>": spans.BYTE_LEAD,
                    "<0x9F>": spans.BYTE_CONT, "▁The": spans.WORD, "able": spans.CONT, "(": spans.PUNCT,
                    "▁=": spans.PUNCT, "▁": spans.SPACE}


def test_trained_bpe_is_cached(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("MOE_DATA_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    texts = [" ".join(PROSE + LATEX + UNICODE) for _ in range(3)] + CODE
    corpus = tmp_path / "corpus"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": texts, "domain": ["x"] * len(texts)}),
            "validation": datasets.Dataset.from_dict({"text": ["v"], "domain": ["x"]}),
        }
    ).save_to_disk(str(corpus))
    tok = T.load_tokenizer("bpe:300", corpus_dir=corpus)
    assert tok.get_vocab_size() <= 300
    assert (tok.token_to_id("<unk>"), tok.token_to_id("<s>"), tok.token_to_id("</s>")) == (0, 1, 2)
    files = list((tmp_path / "tokenizers").glob("bpe-300-*.json"))
    assert len(files) == 1
    again = T.load_tokenizer("bpe:300", corpus_dir=corpus)
    assert T.tokenizer_fingerprint(again) == T.tokenizer_fingerprint(tok)
    assert tok.decode(tok.encode("hello world").ids) == "hello world"
    pieces = T.vocab_pieces(tok)  # byte-level stand-ins decoded into SentencePiece notation
    assert len(pieces) == tok.get_vocab_size()
    newline = tok.token_to_id("\u010a")  # byte-level BPE's stand-in for "\n"
    assert pieces[newline] == "\n" and pieces[tok.token_to_id("\u0120")] == "\u2581"  # "Ġ": a space
    enc = tok.encode("x\nThe", add_special_tokens=False)
    starts = spans.word_starts(torch.tensor([enc.ids]), spans.piece_kinds(pieces, T.special_token_ids(tok)))[0]
    at = enc.ids.index(newline)
    assert starts[at] and starts[at + 1]  # the newline is its own span, the line-initial word starts one


def test_bad_names():
    with pytest.raises(ValueError, match="bpe:<vocab size>"):
        T.load_tokenizer("bpe:lots")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        T.load_tokenizer("/nonexistent/tokenizer.json")
