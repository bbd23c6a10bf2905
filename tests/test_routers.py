"""Router contract, look-ahead audit and router-specific behaviour, looped over every router config.

Every ``conf/router/*.yaml`` (and the variants below) is built through Hydra's ``instantiate`` with resources bound
as ``moe-train`` binds them, so a new router file + config is covered by the contract, checkpoint and audit tests
with no new test code. A router class with ``causal = False`` is a look-ahead router: its config must refuse to
build without ``router.allow_lookahead=true``, and the audit must fail it once allowed.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moe_variants import ModelArgs, Transformer
from moe_variants.model.routing import LayerSpec, RoutingContext
from moe_variants.routers import spans
from moe_variants.routers.audit import AUDIT_ARGS
from moe_variants.routers.hash import HashRouter
from moe_variants.routers.resources import (
    FROM_CHECKPOINT,
    RoutingResources,
    bind_resources,
    build_routing_vocab,
    lookup_routing_ids,
    synthetic_resources,
)
from moe_variants.routers.tables import balanced_expert_table, lpt_expert_table
from moe_variants.routers.topk import TopKRouter

CONF = Path(__file__).resolve().parents[1] / "conf" / "router"
ROUTER_CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))
VARIANTS = {
    "hash-balanced": ("hash", {"table": "balanced"}),
    "hash-balanced-lpt": ("hash", {"table": "balanced_lpt"}),
    "hash-prev_token": ("hash", {"table": "prev_token"}),
    "hash-bigram-learned": ("hash", {"table": "bigram", "weights": "learned"}),
    "span-fixed": ("span", {"spans": "fixed", "span_len": 3}),
    "span_first_piece-fallback": ("span_first_piece", {"learned_top": 8, "weights": "learned"}),
    "span_first_piece-fixed": ("span_first_piece", {"spans": "fixed", "span_len": 2}),
    "span_prefix-fallback": ("span_prefix", {"learned_top": 8, "weights": "learned"}),
}
LOOKAHEAD = {"allow_lookahead": True}


def router_factory(name: str, overrides: dict, run_seed: int = 0):
    """The router config as ``moe-train`` instantiates it: ``${seed}`` (table seeds) is the run's seed."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF / f"{name}.yaml"), overrides)
    return instantiate(OmegaConf.create({"seed": run_seed, "router": cfg}).router)


def is_causal(name: str, overrides: dict) -> bool:
    return bool(router_factory(name, overrides).func.causal)  # a class attribute: nothing is built


CONFIGS = [(name, {}) for name in ROUTER_CONFIGS] + list(VARIANTS.values())
IDS = ROUTER_CONFIGS + list(VARIANTS)
CAUSAL = [(c, i) for c, i in zip(CONFIGS, IDS) if is_causal(*c)]
LOOKAHEAD_CONFIGS = [name for name in ROUTER_CONFIGS if not is_causal(name, {})]


def build(name: str, overrides: dict, seed: int = 0, resources=None, **kw) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(**{**AUDIT_ARGS, **kw})
    resources = synthetic_resources(args.vocab_size) if resources is None else resources
    return Transformer(args, router=bind_resources(router_factory(name, overrides), resources))


def test_every_router_config_is_covered():
    assert {"topk", "hash", "span", "span_first_piece", "span_prefix", "span_whole_word"} <= set(ROUTER_CONFIGS)
    assert "span_whole_word" in LOOKAHEAD_CONFIGS and "span_prefix" not in LOOKAHEAD_CONFIGS


@pytest.mark.parametrize("name, overrides", [c for c, _ in CAUSAL], ids=[i for _, i in CAUSAL])
def test_router_contract(name, overrides):
    """Every causal router config: K distinct experts in [0, E), fp32 weights summing to 1, logits of the right
    shape (or None), scalar aux losses, gradients flow, and cached decoding equals one uncached forward."""
    model = build(name, overrides, num_experts_per_tok=3)
    ids = torch.randint(0, AUDIT_ARGS["vocab_size"], (3, 21))
    out = model(ids, labels=ids)
    out.lm_loss.backward()
    E, K = AUDIT_ARGS["num_experts"], 3
    for r in out.routing:
        assert r.expert_ids.shape == (3, 21, K) and r.expert_ids.dtype == torch.int64
        assert r.weights.shape == (3, 21, K) and r.weights.dtype == torch.float32
        assert 0 <= r.expert_ids.min() and r.expert_ids.max() < E
        sorted_ids = r.expert_ids.sort(-1).values
        assert (sorted_ids[..., 1:] != sorted_ids[..., :-1]).all(), "the K experts of a token must be distinct"
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(3, 21))
        assert r.logits is None or (r.logits.shape == (3, 21, E) and r.logits.dtype == torch.float32)
        assert all(v.dim() == 0 for v in r.aux_losses.values())
    assert model.causal
    model.eval()
    prompt = torch.randint(0, AUDIT_ARGS["vocab_size"], (2, 7))
    tokens, cached = model.generate(prompt, max_new_tokens=9)
    full = model(tokens)
    torch.testing.assert_close(cached, full.logits[:, :-1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, overrides", CONFIGS, ids=IDS)
def test_router_rebuilds_from_a_checkpoint_without_the_corpus(name, overrides):
    """What ``load_model`` does: rebuild from the config with ``resources=FROM_CHECKPOINT`` (another table seed
    where there is one), load the state dict, route exactly as the trained model."""
    overrides = {**overrides, **({} if is_causal(name, overrides) else LOOKAHEAD)}
    model = build(name, overrides)
    other = {**overrides, **({"seed": 9} if "seed" in OmegaConf.load(CONF / f"{name}.yaml") else {})}
    rebuilt = build(name, other, seed=1, resources=FROM_CHECKPOINT)
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.randint(0, AUDIT_ARGS["vocab_size"], (2, 25))
    for x, y in zip(model(ids).routing, rebuilt(ids).routing):
        assert torch.equal(x.expert_ids, y.expert_ids)
        torch.testing.assert_close(x.weights, y.weights)


TOKEN_ID_ROUTERS = ("hash", "span_first_piece", "span_prefix", "span_whole_word")  # without learned_top


@pytest.mark.parametrize("name, overrides", CONFIGS, ids=IDS)
def test_token_id_routers_give_their_expert_ids_before_the_layers_run(name, overrides):
    """Exactly the table routers (hash, routing vocabularies without a learned share) declare ``ids_from_tokens``,
    and their ``token_expert_ids`` of the routing context alone are the ids their forward returns (expert
    parallelism plans every layer's split sizes from them)."""
    overrides = {**overrides, **({} if is_causal(name, overrides) else LOOKAHEAD)}
    model = build(name, overrides, num_experts_per_tok=3)
    from_tokens = name in TOKEN_ID_ROUTERS and not overrides.get("learned_top")
    assert [r.ids_from_tokens for r in model.routers] == [from_tokens] * AUDIT_ARGS["n_layers"]
    ids = torch.randint(0, AUDIT_ARGS["vocab_size"], (3, 21))
    ctx = RoutingContext(history_ids=ids, positions=torch.arange(21).expand(3, 21))
    for router, routing in zip(model.routers, model(ids).routing):
        if from_tokens:
            assert torch.equal(router.token_expert_ids(ctx), routing.expert_ids)
        else:
            with pytest.raises(NotImplementedError, match="ids_from_tokens is False"):
                router.token_expert_ids(ctx)


# The look-ahead audit of every config (causal ones pass, look-ahead ones fail): tests/test_audit.py.
@pytest.mark.parametrize("name", LOOKAHEAD_CONFIGS)
def test_lookahead_router_configs_refuse_and_are_labelled(name):
    with pytest.raises(ValueError, match="allow_lookahead=true"):
        build(name, {})
    with pytest.raises(ValueError, match="allow_lookahead=true"):  # the refusal comes first, even without resources
        Transformer(ModelArgs(**AUDIT_ARGS), router=router_factory(name, {}))
    assert not build(name, LOOKAHEAD).causal


@pytest.mark.parametrize(
    "name, kw, message",
    [
        ("hash", dict(table="nope"), "unknown hash table"),
        ("hash", dict(weights="nope"), "unknown combine weights"),
        ("span", dict(spans="sentence"), "unknown span kind"),
        ("span_prefix", dict(max_span_len=0), "max_span_len >= 1"),
        ("span_first_piece", dict(learned_top=-1), "learned_top"),
    ],
)
def test_bad_router_configs(name, kw, message):
    with pytest.raises(ValueError, match=message):
        build(name, kw)


def test_k_greater_than_e_fails_before_building():
    with pytest.raises(ValueError, match="1 <= top_k <= num_experts"):
        build("hash", {}, num_experts=2, num_experts_per_tok=3)


@pytest.mark.parametrize("name", ["hash", "span_first_piece", "span_prefix"])
def test_learned_weights_are_refused_at_k1(name):
    """A softmax over one chosen expert's logit is always 1: such a gate would never learn."""
    with pytest.raises(ValueError, match="K=1 cannot learn"):
        build(name, {"weights": "learned"}, num_experts_per_tok=1)
    build(name, {}, num_experts_per_tok=1)  # uniform weights at K=1: Hash Layers' own setting


@pytest.mark.parametrize("name, overrides, what", [
    ("hash", {"table": "balanced"}, "table=balanced"),
    ("span", {}, "piece table"),
    ("span_prefix", {"spans": "fixed"}, "routing vocabulary"),
])
def test_routers_built_without_their_resources_fail_clearly(name, overrides, what):
    args = ModelArgs(**AUDIT_ARGS)
    with pytest.raises(ValueError, match=f"{what} is built from the tokenizer and the training corpus"):
        Transformer(args, router=router_factory(name, overrides))
    Transformer(args, router=router_factory("span", {"spans": "fixed"}))  # fixed spans need no tokenizer


def test_gates_that_do_not_choose_report_no_routing_logits():
    """Hash and vocabulary routers with learned weights: the gate weights experts chosen by a table, so no logits
    are reported (no router entropy is logged); the learned top-k routers report theirs."""
    for name, overrides in [("hash", {"weights": "learned"}), ("span_prefix", {"weights": "learned"}),
                            ("span_first_piece", {"learned_top": 8})]:
        assert all(r.logits is None for r in build(name, overrides)(torch.randint(0, 512, (1, 9))).routing)
    for name in ("topk", "span"):
        assert all(r.logits is not None for r in build(name, {})(torch.randint(0, 512, (1, 9))).routing)


def test_learned_hash_weights_are_a_softmax_over_the_hashed_experts():
    spec = LayerSpec(dim=4, num_experts=4, top_k=2, vocab_size=10, n_layers=1, layer_idx=0)
    router = HashRouter(spec, weights="learned")
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    x = torch.tensor([[[3.0, 1.0, 2.0, 0.0]]])
    ctx = RoutingContext(history_ids=torch.tensor([[7]]), positions=torch.zeros(1, 1, dtype=torch.long))
    out = router(x, ctx)
    chosen = router.expert_table[7]
    torch.testing.assert_close(out.weights[0, 0], torch.softmax(x[0, 0, chosen], 0))
    assert torch.equal(out.expert_ids[0, 0], chosen) and out.logits is None


# -- hash ---------------------------------------------------------------------------------------------
def test_hash_routing_is_deterministic_and_differs_per_layer():
    a, b = build("hash", {"seed": 0}, seed=0), build("hash", {"seed": 0}, seed=1)  # other init, same table seed
    ids = torch.randint(0, 512, (2, 30))
    ra, rb = a(ids).routing, b(ids).routing
    for x, y in zip(ra, rb):
        assert torch.equal(x.expert_ids, y.expert_ids)
    assert not torch.equal(ra[0].expert_ids, ra[1].expert_ids)
    # same token id -> same experts wherever it occurs
    ids = torch.full((1, 10), 7)
    r = a(ids).routing[0].expert_ids[0]
    assert (r == r[0]).all()


ZIPF = 1e6 / torch.arange(1, 32001).double() ** 1.1  # like real token frequencies


def pair_mass(table: torch.Tensor, counts: torch.Tensor) -> dict[tuple[int, int], float]:
    """Token mass per (sorted) expert pair."""
    out: dict[tuple[int, int], float] = {}
    for pair, c in zip(map(tuple, table.sort(1).values.tolist()), counts.tolist()):
        out[pair] = out.get(pair, 0.0) + c
    return out


@pytest.mark.parametrize("build_table", [balanced_expert_table, lpt_expert_table])
def test_balanced_tables_equalise_token_mass_on_zipf_counts(build_table):
    table = build_table(ZIPF, num_experts=8, top_k=2, seed=0)
    assert (table[:, 0] != table[:, 1]).all()
    mass = torch.zeros(8, dtype=torch.float64).index_add_(0, table.reshape(-1), ZIPF.repeat_interleave(2))
    assert ((mass / mass.mean() - 1).abs() < 0.05).all(), mass / mass.mean()


def test_balanced_table_uses_every_expert_pair_and_differs_per_layer():
    a, b = (balanced_expert_table(ZIPF, num_experts=8, top_k=2, seed=s) for s in (0, 1))
    shares = torch.tensor(list(pair_mass(a, ZIPF).values())) / ZIPF.sum()
    entropy = -(shares * shares.log()).sum() / math.log(28)  # 1 = uniform over pairs (a random table: ~0.88 here)
    assert len(shares) == 28 and entropy > 0.85  # all 8-choose-2 pairs, spread like a random table's
    same = (a.sort(1).values == b.sort(1).values).all(1).double()
    assert (same * ZIPF).sum() / ZIPF.sum() < 0.1  # two layers share a pair for ~1/28 of the mass, as random ones


def test_lpt_table_collapses_to_disjoint_pairs():
    """Why ``balanced`` is not plain LPT: with K=2 the greedy pairs the experts up, the same way in every layer."""
    a, b = (lpt_expert_table(ZIPF, num_experts=8, top_k=2, seed=s) for s in (0, 1))
    assert len(pair_mass(a, ZIPF)) == 4
    layer0_to_layer1 = {}
    for x, y in zip(map(tuple, a.sort(1).values.tolist()), map(tuple, b.sort(1).values.tolist())):
        layer0_to_layer1.setdefault(x, set()).add(y)
    assert all(len(v) == 1 for v in layer0_to_layer1.values())  # one partition, relabelled


def test_balanced_table_on_real_text_with_the_mixtral_tokenizer():
    tok_mod = pytest.importorskip("moe_variants.data.tokenizer")
    import inspect

    tok = tok_mod.load_tokenizer("mixtral")
    text = "".join(inspect.getsource(m) for m in (inspect, pytest, torch.nn.modules.module))
    train_ids = torch.tensor(tok.encode(text).ids)
    spec = LayerSpec(dim=8, num_experts=8, top_k=2, vocab_size=32000, n_layers=1, layer_idx=0)
    resources = RoutingResources(lambda: [train_ids[None]], torch.zeros(32000, dtype=torch.int8), "t")
    router = HashRouter(spec, table="balanced", resources=resources)
    experts = router.expert_table[train_ids].reshape(-1)
    mass = torch.bincount(experts, minlength=8).double()
    assert ((mass / mass.mean() - 1).abs() < 0.05).all(), mass / mass.mean()


def test_prev_token_routing_follows_the_previous_token():
    model = build("hash", {"table": "prev_token"})
    ids = torch.tensor([[5, 9, 9, 5, 1, 9]])
    r = model(ids).routing[0].expert_ids[0]
    assert torch.equal(r[1], r[4])  # both follow token 5
    assert torch.equal(r[2], r[3])  # both follow token 9


# -- spans ----------------------------------------------------------------------------------------------
def reference_prefix_hash(prefix: list[int], max_len: int) -> int:
    return sum((t + 1) * spans.HASH_BASE ** i for i, t in enumerate(prefix[:max_len])) % spans.HASH_MOD


def test_prefix_hash_values():
    ids = torch.tensor([[7, 3, 3, 9, 0, 31999, 5, 5, 5, 5]])
    starts = torch.tensor([[1, 0, 0, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    got = spans.prefix_hash(ids, starts, max_len=3)[0].tolist()
    first = [0, 0, 0, 3, 4, 4, 4, 4, 4, 4]
    assert got == [reference_prefix_hash(ids[0, f:t + 1].tolist(), 3) for t, f in enumerate(first)]
    assert got[:4] == [8, (8 + 4 * 1_000_003) % spans.HASH_MOD, (8 + 4 * 1_000_003 + 4 * 1_000_003 ** 2)
                       % spans.HASH_MOD, 10]
    assert got[6] == got[7] == got[9]  # a span's prefix stops growing after max_len tokens
    whole = spans.full_span_hash(ids, starts, max_len=3)[0].tolist()
    assert whole == [got[2]] * 3 + [got[3]] + [got[9]] * 6  # LOOKS AHEAD: the hash of the complete span


def test_word_starts_from_the_previous_and_current_piece():
    W, C, P, S, X, L, B = (spans.WORD, spans.CONT, spans.PUNCT, spans.SPACE, spans.SPECIAL, spans.BYTE_LEAD,
                           spans.BYTE_CONT)
    kinds = torch.tensor([W, C, P, S, X, L, B], dtype=torch.int8)  # token id i has kind i
    ids = torch.tensor([[1, 0, 1, 1, 2, 1, 3, 1, 4, 1, 5, 6, 6, 1, 0, 2, 2]])
    kind = [C, W, C, C, P, C, S, C, X, C, L, B, B, C, W, P, P]
    want = [1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1]
    assert [int(kinds[i]) for i in ids[0]] == kind
    assert spans.word_starts(ids, kinds)[0].int().tolist() == want


def test_piece_kinds_from_piece_strings():
    pieces = ["<unk>", "\u2581The", "able", "(", "\u2581=", "<0x0A>", "\u2581\u2581", "<0xE2>", "<0x82>", "\u00e9t",
              "<0x41>", "'s"]
    kinds = spans.piece_kinds(pieces, special_ids=[0]).tolist()
    assert kinds == [spans.SPECIAL, spans.WORD, spans.CONT, spans.PUNCT, spans.PUNCT, spans.SPACE, spans.SPACE,
                     spans.BYTE_LEAD, spans.BYTE_CONT, spans.CONT, spans.CONT, spans.PUNCT]


def span_first(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    ctx = RoutingContext(history_ids=ids, positions=torch.arange(ids.shape[1]).expand_as(ids))
    return model.routers[0].spans.first_in_chunk(ctx)


@pytest.mark.parametrize("name, overrides", [
    ("span", {}), ("span", {"spans": "fixed", "span_len": 3}), ("span_first_piece", {}),
    ("span_first_piece", {"learned_top": 64, "weights": "learned"}),
])
def test_all_tokens_of_a_span_share_experts(name, overrides):
    model = build(name, overrides)
    ids = torch.randint(0, 512, (4, 40))
    first = span_first(model, ids)
    for r in model(ids).routing:
        at_first = torch.gather(r.expert_ids, 1, first.unsqueeze(-1).expand_as(r.expert_ids))
        assert torch.equal(r.expert_ids, at_first)
        assert torch.equal(r.weights, torch.gather(r.weights, 1, first.unsqueeze(-1).expand_as(r.weights)))
    assert (first != torch.arange(40)).any(), "the test needs multi-token spans"


def word_ids(resources: RoutingResources) -> tuple[list[int], list[int]]:
    """Ids of marked word pieces and of continuation pieces of the synthetic vocabulary."""
    kinds = resources.piece_kinds
    return torch.nonzero(kinds == spans.WORD).flatten().tolist(), torch.nonzero(kinds == spans.CONT).flatten().tolist()


def test_prefix_router_routes_equal_prefixes_alike():
    """Causal: the id at a token is that of its word's prefix so far; equal prefixes route equally."""
    model = build("span_prefix", {})
    starts, conts = word_ids(synthetic_resources(AUDIT_ARGS["vocab_size"]))
    word = [starts[0], conts[0], conts[1]]
    ids = torch.tensor([word + [starts[1]] + word + [starts[2]]])
    r = model(ids).routing[0].expert_ids[0]
    assert torch.equal(r[0:3], r[4:7])


def test_fixed_spans_of_length_one_equal_per_token_topk():
    span = build("span", {"spans": "fixed", "span_len": 1})
    topk = build("topk", {})
    topk.load_state_dict(span.state_dict())
    ids = torch.randint(0, 512, (2, 19))
    for a, b in zip(span(ids).routing, topk(ids).routing):
        assert torch.equal(a.expert_ids, b.expert_ids)
        torch.testing.assert_close(a.weights, b.weights)
    torch.testing.assert_close(span(ids).logits, topk(ids).logits)


# -- routing vocabularies -------------------------------------------------------------------------------
def corpus_resources() -> tuple[RoutingResources, list[int], list[int]]:
    """A corpus of known words: A=[w0] x6, B=[w1 c0 c1] x4, C=[w1 c0 c2] x3, D=[w2 c3] x1."""
    res = synthetic_resources(AUDIT_ARGS["vocab_size"])
    w, c = word_ids(res)
    words = [[w[0]]] * 6 + [[w[1], c[0], c[1]]] * 4 + [[w[1], c[0], c[2]]] * 3 + [[w[2], c[3]]]
    corpus = torch.tensor([[t for word in words for t in word]])
    return RoutingResources(lambda: [corpus], res.piece_kinds, "corpus"), w, c


def hashes_of(prefixes: list[list[int]]) -> set[int]:
    return {reference_prefix_hash(p, 16) for p in prefixes}


def test_routing_vocabularies_count_what_a_router_can_know():
    res, w, c = corpus_resources()
    word = spans.SpanDef("word")

    def entries(unit: str, size: int) -> list[int]:  # hashes in rank order
        v = res.routing_vocab(unit, size, 1 if unit == "first_piece" else 16, word)
        return [int(v.hashes[v.ranks == r]) for r in range(size) if int(v.hashes[v.ranks == r]) >= 0]

    assert entries("first_piece", 3) == [w[1] + 1, w[0] + 1, w[2] + 1]  # 7 words start with w1, 6 with w0
    whole = entries("whole_word", 3)
    assert whole == [reference_prefix_hash(p, 16) for p in ([w[0]], [w[1], c[0], c[1]], [w[1], c[0], c[2]])]
    prefixes = entries("prefix", 4)  # w1 (7), w1c0 (7), w0 (6), w1c0c1 (4): the shorter prefix wins ties
    assert prefixes == [reference_prefix_hash(p, 16) for p in ([w[1]], [w[1], c[0]], [w[0]], [w[1], c[0], c[1]])]
    longer, shorter = hashes_of([[w[1], c[0], c[1]], [w[1], c[0], c[2]]]), hashes_of([[w[1]], [w[1], c[0]]])
    for size in range(1, 8):  # every prefix of a kept prefix is kept: a frequent word is reachable piece by piece
        kept = set(entries("prefix", size))
        assert not kept & longer or shorter <= kept


def test_routing_shares_report_vocabulary_buckets_and_learned_tokens():
    res, w, c = corpus_resources()
    args = ModelArgs(**AUDIT_ARGS)
    factory = router_factory("span_prefix", {"vocab_size": 4, "learned_top": 1})
    model = Transformer(args, router=bind_resources(factory, res))
    ids = torch.tensor([[w[1], c[0], c[1], w[2], c[3], w[0]]])  # prefixes ranked 0, 1, 3, -, -, 2
    assert model.routers[0].routing_shares(ids) == {"vocab": 3 / 6, "bucket": 2 / 6, "learned": 1 / 6}
    first = Transformer(args, router=bind_resources(router_factory("span_first_piece", {"vocab_size": 2}), res))
    assert first.routers[0].routing_shares(ids) == {"vocab": 4 / 6, "bucket": 2 / 6, "learned": 0.0}


def test_lookup_routing_ids():
    hashes, ranks = torch.tensor([-1, 5, 9, 40]), torch.tensor([3, 1, 0, 2])
    got = lookup_routing_ids(torch.tensor([9, 40, 5, 7, 12]), hashes, ranks, num_buckets=4)
    assert got.tolist() == [0, 2, 1, 4 + 7 % 4, 4 + 12 % 4]


def test_build_routing_vocab_of_an_empty_corpus_fails():
    with pytest.raises(ValueError, match="empty corpus"):
        build_routing_vocab([], lambda ids: ids > 0, "prefix", 8, 16, "t")


def test_routing_vocab_from_another_tokenizer_is_refused():
    model = build("span_first_piece", {})
    args = ModelArgs(**AUDIT_ARGS)
    res = synthetic_resources(args.vocab_size)
    other = RoutingResources(lambda: [torch.randint(0, 512, (8, 64))], res.piece_kinds, "another-tokenizer")
    rebuilt = Transformer(args, router=bind_resources(router_factory("span_first_piece", {}), other))
    with pytest.raises(ValueError, match="routing vocabulary was built for tokenizer"):
        rebuilt.load_state_dict(model.state_dict())


def test_routing_vocab_of_another_format_version_is_refused():
    model = build("span_prefix", {})
    state = model.state_dict()
    key = next(k for k in state if k.endswith("_extra_state"))
    state[key] = {**state[key], "routing_vocab_version": 1}
    with pytest.raises(ValueError, match="format version 1"):
        build("span_prefix", {}, resources=FROM_CHECKPOINT).load_state_dict(state)


# -- top-k --------------------------------------------------------------------------------------------
def test_topk_router_math():
    spec = LayerSpec(dim=4, num_experts=4, top_k=2, vocab_size=10, n_layers=1, layer_idx=0)
    router = TopKRouter(spec)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    x = torch.tensor([[[3.0, 1.0, 2.0, 0.0]]])
    ctx = RoutingContext(history_ids=torch.zeros(1, 1, dtype=torch.long), positions=torch.zeros(1, 1, dtype=torch.long))
    out = router(x, ctx)
    assert out.expert_ids.tolist() == [[[0, 2]]]
    expected = torch.softmax(torch.tensor([3.0, 2.0]), 0)  # softmax over the top-k logits
    torch.testing.assert_close(out.weights[0, 0], expected)


def test_jitter_only_in_training():
    spec = LayerSpec(dim=8, num_experts=4, top_k=2, vocab_size=10, n_layers=1, layer_idx=0)
    router = TopKRouter(spec, jitter_eps=0.5)
    x = torch.randn(1, 50, 8)
    ctx = RoutingContext(history_ids=torch.zeros(1, 50, dtype=torch.long), positions=torch.arange(50)[None])
    router.eval()
    torch.testing.assert_close(router(x, ctx).logits, router(x, ctx).logits)
    router.train()
    assert not torch.allclose(router(x, ctx).logits, router(x, ctx).logits)
    with pytest.raises(ValueError, match="jitter_eps"):
        TopKRouter(spec, jitter_eps=1.5)
