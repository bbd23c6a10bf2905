"""Router contract and router-specific behaviour, looped over every router config.

Every ``conf/router/*.yaml`` (and the variants below) is built through Hydra's ``instantiate``, so a new
router file + config is covered by the contract tests (and by the look-ahead audit, ``test_audit.py``) with no new
test code. A config that refuses to build without ``router.allow_lookahead=true`` is a look-ahead router: it must
keep refusing, and the audit must fail it once allowed.
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
from moe_variants.routers.audit import AUDIT_ARGS, synthetic_resources
from moe_variants.routers.hash import HashRouter, balanced_expert_table, lpt_expert_table
from moe_variants.routers.resources import RoutingResources
from moe_variants.routers.spans import start_index
from moe_variants.routers.topk import TopKRouter

CONF = Path(__file__).resolve().parents[1] / "conf" / "router"
ROUTER_CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))
VARIANTS = {
    "hash-balanced": ("hash", {"table": "balanced"}),
    "hash-balanced-lpt": ("hash", {"table": "balanced_lpt"}),
    "hash-prev_token": ("hash", {"table": "prev_token"}),
    "hash-bigram-learned": ("hash", {"table": "bigram", "weights": "learned"}),
    "span-fixed": ("span", {"spans": "fixed", "span_len": 3}),
    "span-routing_vocab": ("span", {"decision": "routing_vocab"}),
    "span-routing_vocab-fallback": ("span", {"decision": "routing_vocab", "learned_top": 8, "weights": "learned"}),
    "span-fixed-routing_vocab": ("span", {"decision": "routing_vocab", "spans": "fixed", "span_len": 2}),
    "span-routing_vocab-per_token": ("span", {"decision": "routing_vocab", "hold": False}),
}


def router_factory(name: str, overrides: dict):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return instantiate(OmegaConf.merge(cfg, overrides))


def refuses_lookahead(name: str) -> bool:
    spec = LayerSpec(dim=8, num_experts=4, top_k=2, vocab_size=16, n_layers=1, layer_idx=0)
    try:
        router_factory(name, {})(spec)
    except ValueError as e:
        if "allow_lookahead=true" in str(e):
            return True
        raise
    return False


LOOKAHEAD_CONFIGS = [name for name in ROUTER_CONFIGS if refuses_lookahead(name)]
CAUSAL_CONFIGS = [name for name in ROUTER_CONFIGS if name not in LOOKAHEAD_CONFIGS]
CAUSAL = [(name, {}) for name in CAUSAL_CONFIGS] + list(VARIANTS.values())
IDS = CAUSAL_CONFIGS + list(VARIANTS)


def build(name: str, overrides: dict, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(**{**AUDIT_ARGS, **kw})
    table, resources = synthetic_resources(args.vocab_size)
    return Transformer(args, router=router_factory(name, overrides), word_start_table=table, resources=resources)


def test_every_router_config_is_covered():
    assert {"topk", "hash", "span"} <= set(ROUTER_CONFIGS)


@pytest.mark.parametrize("name, overrides", CAUSAL, ids=IDS)
def test_router_contract(name, overrides):
    model = build(name, overrides)
    ids = torch.randint(0, AUDIT_ARGS["vocab_size"], (3, 21))
    out = model(ids, labels=ids)
    out.lm_loss.backward()
    E, K = AUDIT_ARGS["num_experts"], AUDIT_ARGS["num_experts_per_tok"]
    for r in out.routing:
        assert r.expert_ids.shape == (3, 21, K) and r.expert_ids.dtype == torch.int64
        assert r.weights.shape == (3, 21, K) and r.weights.dtype == torch.float32
        assert 0 <= r.expert_ids.min() and r.expert_ids.max() < E
        assert (r.expert_ids[..., 0] != r.expert_ids[..., 1]).all(), "the K experts of a token must be distinct"
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(3, 21))
        assert r.logits is None or r.logits.shape == (3, 21, E)
        assert all(v.dim() == 0 for v in r.aux_losses.values())
    assert model.causal


# The look-ahead audit of every config and variant: tests/test_audit.py.
def test_whole_word_is_labelled_non_causal():
    model = build("span", {"decision": "whole_word", "allow_lookahead": True})
    assert not model.causal


@pytest.mark.parametrize("name", LOOKAHEAD_CONFIGS)
def test_lookahead_router_configs_refuse_and_are_labelled(name):
    """They refuse to build by default and are labelled non-causal when allowed (test_audit.py: the audit fails
    every config that refuses to build)."""
    with pytest.raises(ValueError, match="allow_lookahead=true"):
        build(name, {})
    assert not build(name, {"allow_lookahead": True}).causal


def test_whole_word_refuses_to_build_without_flag():
    with pytest.raises(ValueError, match="allow_lookahead=true"):
        build("span", {"decision": "whole_word"})


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(table="nope"), "unknown hash table"),
        (dict(weights="nope"), "unknown hash weights"),
    ],
)
def test_bad_hash_configs(kw, message):
    with pytest.raises(ValueError, match=message):
        build("hash", kw)


def test_k_greater_than_e_fails_before_building():
    with pytest.raises(ValueError, match="1 <= top_k <= num_experts"):
        build("hash", {}, num_experts=2, num_experts_per_tok=3)


def test_bad_span_configs():
    with pytest.raises(ValueError, match="unknown span decision"):
        build("span", {"decision": "nope"})
    with pytest.raises(ValueError, match="unknown span kind"):
        build("span", {"spans": "sentence"})


# -- hash ---------------------------------------------------------------------------------------------
def test_hash_routing_is_deterministic_and_differs_per_layer():
    a, b = build("hash", {}, seed=0), build("hash", {}, seed=1)  # different init seed, same table seed
    ids = torch.randint(0, 512, (2, 30))
    ra, rb = a(ids).routing, b(ids).routing
    for x, y in zip(ra, rb):
        assert torch.equal(x.expert_ids, y.expert_ids)
    assert not torch.equal(ra[0].expert_ids, ra[1].expert_ids)
    # same token id -> same experts wherever it occurs
    ids = torch.full((1, 10), 7)
    r = a(ids).routing[0].expert_ids[0]
    assert (r == r[0]).all()


@pytest.mark.parametrize("table", ["random", "balanced", "balanced_lpt", "bigram"])
def test_hash_table_round_trips_through_a_checkpoint(table, tmp_path):
    model = build("hash", {"table": table, "seed": 3})
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    args = ModelArgs(**AUDIT_ARGS)
    table_ws, _ = synthetic_resources(args.vocab_size)
    # rebuilt without corpus resources and with another table seed: the tables come from the checkpoint
    rebuilt = Transformer(args, router=router_factory("hash", {"table": table, "seed": 9}), word_start_table=table_ws)
    rebuilt.load_state_dict(torch.load(path))
    ids = torch.randint(0, 512, (2, 25))
    for x, y in zip(model(ids).routing, rebuilt(ids).routing):
        assert torch.equal(x.expert_ids, y.expert_ids)


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
    spec = LayerSpec(dim=8, num_experts=8, top_k=2, vocab_size=32000, n_layers=1, layer_idx=0,
                     resources=RoutingResources(lambda: [train_ids[None]], 32000, torch.ones(32000, dtype=bool), "t"))
    router = HashRouter(spec, table="balanced")
    experts = router.expert_table[train_ids].reshape(-1)
    mass = torch.bincount(experts, minlength=8).double()
    assert ((mass / mass.mean() - 1).abs() < 0.05).all(), mass / mass.mean()


def test_prev_token_routing_follows_the_previous_token():
    model = build("hash", {"table": "prev_token"})
    ids = torch.tensor([[5, 9, 9, 5, 1, 9]])
    r = model(ids).routing[0].expert_ids[0]
    assert torch.equal(r[1], r[4])  # both follow token 5
    assert torch.equal(r[2], r[3])  # both follow token 9


# -- span ---------------------------------------------------------------------------------------------
def span_groups(model: Transformer, ids: torch.Tensor, overrides: dict):
    ctx = RoutingContext(history_ids=ids, positions=torch.arange(ids.shape[1]).expand_as(ids),
                         word_start_table=model.word_start_table)
    starts = ctx.span_starts(model.routers[0].span)
    return start_index(starts)


@pytest.mark.parametrize("overrides", [{}, {"spans": "fixed", "span_len": 3}, {"decision": "routing_vocab"},
                                       {"decision": "routing_vocab", "learned_top": 64, "weights": "learned"}])
def test_all_tokens_of_a_span_share_experts(overrides):
    model = build("span", overrides)
    ids = torch.randint(0, 512, (4, 40))
    first = span_groups(model, ids, overrides)
    for r in model(ids).routing:
        at_first = torch.gather(r.expert_ids, 1, first.unsqueeze(-1).expand_as(r.expert_ids))
        assert torch.equal(r.expert_ids, at_first)
        assert torch.equal(r.weights, torch.gather(r.weights, 1, first.unsqueeze(-1).expand_as(r.weights)))
    assert (first != torch.arange(40)).any(), "the test needs multi-token spans"


def test_routing_vocab_spans_share_the_prefix_id_of_complete_words():
    """routing_vocab is causal: the id at a token is that of the span prefix; equal prefixes route equally."""
    model = build("span", {"decision": "routing_vocab", "hold": False})
    ws = model.word_start_table
    starts = torch.nonzero(ws).flatten()[:3].tolist()
    conts = torch.nonzero(~ws).flatten()[:2].tolist()
    word = [starts[0], conts[0], conts[1]]
    ids = torch.tensor([word + [starts[1]] + word + [starts[2]]])
    r = model(ids).routing[0].expert_ids[0]
    assert torch.equal(r[0:3], r[4:7])


def test_fixed_spans_of_length_one_equal_per_token_topk():
    span = build("span", {"spans": "fixed", "span_len": 1})
    topk = build("topk", {})
    topk.load_state_dict({k: v for k, v in span.state_dict().items() if not k.endswith("_extra_state")})
    ids = torch.randint(0, 512, (2, 19))
    for a, b in zip(span(ids).routing, topk(ids).routing):
        assert torch.equal(a.expert_ids, b.expert_ids)
        torch.testing.assert_close(a.weights, b.weights)
    torch.testing.assert_close(span(ids).logits, topk(ids).logits)


def test_span_routing_cached_generation_equals_uncached():
    for overrides in ({}, {"decision": "routing_vocab"}, {"decision": "routing_vocab", "hold": False},
                      {"spans": "fixed", "span_len": 3}):
        model = build("span", overrides).eval()
        prompt = torch.randint(0, 512, (2, 7))
        tokens, cached = model.generate(prompt, max_new_tokens=9)
        torch.testing.assert_close(cached, model(tokens).logits[:, :-1], atol=1e-5, rtol=1e-4)


def test_routing_vocab_from_another_tokenizer_is_refused(tmp_path):
    model = build("span", {"decision": "routing_vocab"})
    state = model.state_dict()
    args = ModelArgs(**AUDIT_ARGS)
    table, _ = synthetic_resources(args.vocab_size)
    corpus = torch.randint(0, 512, (8, 64))
    other = RoutingResources(lambda: [corpus], 512, table, "another-tokenizer")
    rebuilt = Transformer(args, router=router_factory("span", {"decision": "routing_vocab"}),
                          word_start_table=table, resources=other)
    with pytest.raises(ValueError, match="routing vocabulary was built for tokenizer"):
        rebuilt.load_state_dict(state)


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
