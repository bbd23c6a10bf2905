"""Tokenizers as ``tokenizers.Tokenizer`` objects: the real Mixtral 8x7B SentencePiece model, a trained BPE,
or any ``tokenizer.json``.

``load_tokenizer("mixtral")`` converts ``mistral_common/data/tokenizer.model.v1`` (sha256 ``dadfd56d…``, the
official Mixtral-8x7B / Mistral-7B-v0.1 ``tokenizer.model``, shipped in the Apache-2.0 PyPI wheel) with the small
converter below; the result encodes exactly like ``sentencepiece.SentencePieceProcessor.encode`` (no BOS is added:
the data module prepends it). ``transformers`` is deliberately not used.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

from moe_variants import paths

SPM_SPACE = "\u2581"  # "▁", SentencePiece's whitespace marker
MIXTRAL_MODEL = ("mistral_common", "data/tokenizer.model.v1")
MIXTRAL_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"  # Mixtral-8x7B tokenizer.model
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|endoftext|>", "<bos>", "[CLS]")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 in every tokenizer built here (as in Mixtral)

# SentencePiece piece types (sentencepiece_model.proto)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def mixtral_model_path() -> Path:
    """Path of Mixtral's ``tokenizer.model`` inside the installed ``mistral-common`` package."""
    pkg, rel = MIXTRAL_MODEL
    path = Path(str(importlib.resources.files(pkg).joinpath(rel)))
    if not path.is_file():
        raise FileNotFoundError(f"{rel} not found in the installed {pkg} package ({path}); reinstall mistral-common")
    return path


def spm_to_tokenizer(model_bytes: bytes) -> Tokenizer:
    """Convert a SentencePiece BPE ``.model`` (serialized ModelProto) into an equivalent ``tokenizers.Tokenizer``.

    SentencePiece BPE merges, at every step, the adjacent pair whose concatenation is the highest-scoring normal
    piece; an HF BPE with merges ranked by that score (ties by piece id) does the same. Characters outside the
    vocabulary fall back to ``<0xNN>`` byte pieces. The normalizer reproduces ``add_dummy_prefix`` (always one
    "▁" in front, even when the text already starts with a space) and whitespace escaping.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    if proto.trainer_spec.model_type != spm_pb2.TrainerSpec.BPE:
        raise ValueError(f"only SentencePiece BPE models are supported, got model_type={proto.trainer_spec.model_type}")
    norm = proto.normalizer_spec
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        raise ValueError(f"SentencePiece normalizer {norm.name!r} is not supported (only 'identity')")

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, idx) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, idx, cut, left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    user_defined = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
    if user_defined:
        raise ValueError(f"SentencePiece models with user-defined pieces are not supported ({user_defined[:5]})")

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=proto.trainer_spec.unk_piece,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
        )
    )
    steps: list[normalizers.Normalizer] = []
    if norm.remove_extra_whitespaces:  # SentencePiece only collapses spaces, not newlines or tabs
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPM_SPACE))  # Prepend skips empty input, as SentencePiece does
    steps.append(normalizers.Replace(" ", SPM_SPACE))  # the Metaspace normalisation, without its pre-splitting
    tok.normalizer = normalizers.Sequence(steps)
    dec: list[decoders.Decoder] = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    specials = [p.piece for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    # SentencePiece never turns the literal text "<s>" into BOS: encode special-token strings as plain text.
    tok.encode_special_tokens = True
    return tok


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _save_atomic(tok: Tokenizer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    tmp.replace(path)


def _mixtral() -> Tokenizer:
    """The converted Mixtral tokenizer, cached under the source model's pinned hash: once converted (by
    ``moe-data`` / setup) it loads without ``mistral-common`` (e.g. on a GPU machine that only got the data)."""
    cache = paths.tokenizers_dir() / f"mixtral-v1-{MIXTRAL_SHA256[:16]}.json"
    if cache.is_file():
        tok = Tokenizer.from_file(str(cache))
    else:
        path = mixtral_model_path()
        model = path.read_bytes()
        if _sha256(model) != MIXTRAL_SHA256:
            raise ValueError(
                f"{path} (sha256 {_sha256(model)[:16]}…) is not the Mixtral tokenizer.model this project pins "
                f"(sha256 {MIXTRAL_SHA256[:16]}…): install the mistral-common version from pyproject.toml"
            )
        tok = spm_to_tokenizer(model)
        _save_atomic(tok, cache)
    tok.encode_special_tokens = True  # not always kept by the JSON round trip
    return tok


def _corpus_texts(corpus_dir: Path, batch: int = 1000) -> Iterator[list[str]]:
    import datasets

    if not (corpus_dir / "dataset_dict.json").is_file():
        raise ValueError(f"no corpus at {corpus_dir} to train a BPE tokenizer on: run `moe-data` first")
    train = datasets.load_from_disk(str(corpus_dir))["train"]
    for i in range(0, len(train), batch):
        yield train[i : i + batch]["text"]


def train_bpe(texts: Iterable[list[str]] | Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with ``<unk>, <s>, </s>`` as ids 0, 1, 2."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    return bpe._tokenizer


def _corpus_key(corpus_dir: Path) -> str:
    """Identifies the corpus content: its manifest's ``corpus_sha256`` (or the train split's fingerprint)."""
    manifest = corpus_dir / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("corpus_sha256") or _sha256(manifest.read_bytes())
    import datasets

    if not (corpus_dir / "dataset_dict.json").is_file():
        raise ValueError(f"no corpus at {corpus_dir} to train a BPE tokenizer on: run `moe-data` first")
    return datasets.load_from_disk(str(corpus_dir))["train"]._fingerprint


def _trained_bpe(vocab_size: int, corpus_dir: Path) -> Tokenizer:
    cache = paths.tokenizers_dir() / f"bpe-{vocab_size}-{_corpus_key(corpus_dir)[:16]}.json"
    if cache.is_file():
        return Tokenizer.from_file(str(cache))
    tok = train_bpe(_corpus_texts(corpus_dir), vocab_size)
    _save_atomic(tok, cache)
    return tok


def load_tokenizer(name_or_path: str = "mixtral", corpus_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Load a tokenizer by name.

    Args:
        name_or_path: ``"mixtral"`` (Mixtral 8x7B's 32000-piece SentencePiece BPE, converted and cached under
            ``DATA_ROOT/tokenizers``), ``"bpe:<N>"`` (a byte-level BPE of vocabulary N trained on the corpus
            train split, cached), or a path to a ``tokenizer.json``.
        corpus_dir: the corpus ``bpe:<N>`` is trained on (default ``DATA_ROOT/corpus``).
    """
    if name_or_path == "mixtral":
        return _mixtral()
    if name_or_path.startswith("bpe:"):
        try:
            n = int(name_or_path[4:])
        except ValueError:
            raise ValueError(f"bad tokenizer name {name_or_path!r}: expected 'bpe:<vocab size>', e.g. 'bpe:8192'")
        if n < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"bpe vocab size must be >= {256 + len(SPECIAL_TOKENS)}, got {n}")
        return _trained_bpe(n, Path(corpus_dir) if corpus_dir else paths.corpus_dir())
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"unknown tokenizer {name_or_path!r}: use 'mixtral', 'bpe:<N>' or a path to a tokenizer.json")
    return Tokenizer.from_file(str(path))


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: ties routing vocabularies and checkpoints to one tokenizer."""
    canon = json.dumps(json.loads(tok.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return _sha256(canon.encode("utf-8"))


def _first_token_id(tok: Tokenizer, names: tuple[str, ...]) -> int | None:
    for name in names:
        idx = tok.token_to_id(name)
        if idx is not None:
            return idx
    return None


def bos_id(tok: Tokenizer) -> int:
    """Id of the beginning-of-sequence token (``<s>`` or a common alternative)."""
    idx = _first_token_id(tok, BOS_NAMES)
    if idx is None:
        raise ValueError(f"the tokenizer has none of the BOS tokens {BOS_NAMES}; add one (e.g. '<s>') to it")
    return idx


def eos_id(tok: Tokenizer) -> int:
    """Id of the end-of-sequence token (``</s>`` or a common alternative)."""
    idx = _first_token_id(tok, EOS_NAMES)
    if idx is None:
        raise ValueError(f"the tokenizer has none of the EOS tokens {EOS_NAMES}; add one (e.g. '</s>') to it")
    return idx


def special_token_ids(tok: Tokenizer) -> list[int]:
    """Ids of the tokenizer's special (added, ``special=True``) tokens."""
    return sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte (GPT-2's alphabet) -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]  # control bytes, space, ...: mapped to U+0100 on
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def _byte_level_piece_in_spm_notation(piece: str, alphabet: dict[str, int]) -> str:
    if any(c not in alphabet for c in piece):
        return piece
    raw = bytes(alphabet[c] for c in piece)
    try:
        return raw.decode("utf-8").replace(" ", SPM_SPACE)
    except UnicodeDecodeError:  # part of a multi-byte character: its bytes, as SentencePiece's byte fallback
        return "".join(f"<0x{b:02X}>" for b in raw)


def vocab_pieces(tok: Tokenizer) -> list[str]:
    """Every id's piece in SentencePiece notation: ``▁`` for a space, ``<0xNN>`` for a raw byte that is not a whole
    UTF-8 character, text otherwise. Mixtral's pieces are already written so; a byte-level BPE's printable byte
    stand-ins (``Ġ`` for a space, ``Ċ`` for a newline, ...) are decoded into it. Word spans are read from these
    (``moe_variants.routers.spans.piece_kinds``)."""
    V = tok.get_vocab_size(with_added_tokens=True)
    pieces = [tok.id_to_token(i) or "" for i in range(V)]
    if not isinstance(tok.decoder, decoders.ByteLevel):
        return pieces
    alphabet, special = _byte_level_alphabet(), set(special_token_ids(tok))
    return [p if i in special else _byte_level_piece_in_spm_notation(p, alphabet) for i, p in enumerate(pieces)]
