"""Routing-analysis metrics on hand-built tensors with hand-computed answers, plus random-routing baselines."""

import math

import pytest
import torch

from moe_variants.analysis import (
    best_token_expert_table,
    consecutive_repeat_rates,
    document_halves,
    document_ids,
    domain_specialization,
    expert_coactivation,
    expert_load,
    expert_load_per_domain,
    heldout_token_id_predictability,
    load_balance_stats,
    middle_layer,
    paper_layers,
    per_layer,
    plot_load_heatmap,
    plot_load_per_domain,
    plot_repeat_rates,
    random_repeat_baselines,
    random_routing,
    random_routing_baseline,
    repeat_rates_per_domain,
    router_entropy,
    router_saturation,
    span_coherence,
    token_html,
    token_html_page,
    token_id_predictability,
    vocabulary_specialization,
    vocabulary_specialization_per_token,
)


def ids(*rows):
    """(N, S, K) routing from nested lists: ids([[0, 1], [0, 2]]) is one row of two tokens, K = 2."""
    return torch.tensor(rows, dtype=torch.long)


def first_only(*rows):
    """(N, S, 1) routing from first choices only."""
    return torch.tensor(rows, dtype=torch.long).unsqueeze(-1)


def close(a, b, tol=1e-6):
    return torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), atol=tol, rtol=0)


@pytest.fixture(scope="module")
def uniform():
    """200k tokens of uniformly random routing, E = 8, K = 2 distinct experts."""
    g = torch.Generator().manual_seed(0)
    N, S, E, K = 100, 2000, 8, 2
    return torch.rand(N, S, E, generator=g).argsort(-1)[..., :K], E, K, g


# ----------------------------------------------------------------------------------- consecutive repeats


def test_repeat_rates_hand_built():
    # pairs: ([0,1],[0,2]) first + any; ([0,2],[2,1]) any only; ([2,1],[4,5]) neither
    r = consecutive_repeat_rates(ids([[0, 1], [0, 2], [2, 1], [4, 5]]))
    close(r["first"], 1 / 3)
    close(r["any"], 2 / 3)


def test_repeat_rates_mask_excludes_padding():
    e = first_only([1, 1, 2, 2, 2])
    mask = torch.tensor([[True, True, True, False, False]])
    assert consecutive_repeat_rates(e)["first"] == pytest.approx(3 / 4)  # padding would add two repeats
    assert consecutive_repeat_rates(e, mask=mask)["first"] == pytest.approx(1 / 2)


def test_repeat_rates_doc_start_excludes_cross_document_pairs():
    e = first_only([1, 1, 2, 2], [3, 4, 4, 4])
    doc = torch.tensor([[True, False, True, False], [True, True, False, False]])
    assert consecutive_repeat_rates(e)["first"] == pytest.approx(4 / 6)
    # kept pairs: row 0 (0,1) and (2,3) repeat; row 1 (1,2), (2,3) repeat; (0,1) of row 1 is cross-document
    assert consecutive_repeat_rates(e, doc_start=doc)["first"] == pytest.approx(4 / 4)


def test_repeat_rates_never_pair_across_rows():
    assert consecutive_repeat_rates(first_only([1, 2], [2, 1]))["first"] == 0.0  # flattening would pair 2, 2


def test_repeat_rates_no_pairs_is_nan():
    assert math.isnan(consecutive_repeat_rates(first_only([3]))["first"])


def test_repeat_rates_per_domain():
    e = first_only([1, 1, 2, 3])
    dom = torch.tensor([[0, 0, 1, 1]])
    r = repeat_rates_per_domain(e, dom, num_domains=3)  # pair (1, 2) crosses domains and is dropped
    close(r["first"][:2], [1.0, 0.0])
    assert math.isnan(float(r["first"][2]))
    close(r["any"][:2], [1.0, 0.0])


def test_random_repeat_baselines():
    b = random_repeat_baselines(8, 2)
    assert b["first"] == pytest.approx(0.125)
    assert b["any"] == pytest.approx(13 / 28)  # 1 - C(6,2)/C(8,2) = 1 - 15/28 ≈ 0.4643
    assert random_repeat_baselines(4, 2)["any"] == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert random_repeat_baselines(3, 2)["any"] == 1.0  # two 2-subsets of 3 always meet
    assert random_repeat_baselines(8, 1)["any"] == pytest.approx(1 / 8)


def test_uniform_routing_matches_random_baselines(uniform):
    e, E, K, _ = uniform
    r, b = consecutive_repeat_rates(e), random_repeat_baselines(E, K)
    assert abs(r["first"] - b["first"]) < 0.01
    assert abs(r["any"] - b["any"]) < 0.01


# --------------------------------------------------------------------------------------------- load


E3 = ids([[0, 1], [0, 2], [3, 0]])  # one row, three tokens, K = 2


def test_expert_load_choices():
    close(expert_load(E3, 4), [3 / 6, 1 / 6, 1 / 6, 1 / 6])
    close(expert_load(E3, 4, choice="first"), [2 / 3, 0, 0, 1 / 3])
    close(expert_load(E3, 4, choice="second"), [1 / 3, 1 / 3, 1 / 3, 0])
    close(expert_load(E3, 4, mask=torch.tensor([[True, True, False]])), [2 / 4, 1 / 4, 1 / 4, 0])
    close(expert_load(E3.numpy(), 4), [3 / 6, 1 / 6, 1 / 6, 1 / 6])  # numpy in, tensor out


def test_expert_load_rejects_out_of_range_and_bad_choice():
    with pytest.raises(ValueError):
        expert_load(E3, 3)
    with pytest.raises(ValueError):
        expert_load(E3, 4, choice="third")
    with pytest.raises(ValueError):
        expert_load(first_only([0, 1]), 4, choice="second")


def test_expert_load_per_domain():
    load = expert_load_per_domain(E3, torch.tensor([[0, 0, 1]]), num_experts=4, num_domains=3)
    close(load[0], [2 / 4, 1 / 4, 1 / 4, 0])
    close(load[1], [1 / 2, 0, 0, 1 / 2])
    assert torch.isnan(load[2]).all()  # no tokens in domain 2
    first = expert_load_per_domain(E3, torch.tensor([[0, 0, 1]]), 4, 2, choice="first")
    close(first, [[1, 0, 0, 0], [0, 0, 0, 1]])


def test_uniform_load(uniform):
    e, E, _, _ = uniform
    close(expert_load(e, E), torch.full((E,), 1 / E), tol=0.01)
    close(expert_load(e, E).sum(), 1.0)


def test_load_balance_stats():
    s = load_balance_stats(torch.tensor([1.0, 1.0, 2.0, 4.0]))  # mean 2, population var (1+1+0+4)/4 = 1.5
    assert s["max_over_mean"] == pytest.approx(2.0)
    assert s["cv"] == pytest.approx(math.sqrt(1.5) / 2)
    assert (s["min"], s["max"]) == (1.0, 4.0)
    assert load_balance_stats(torch.full((8,), 0.125))["cv"] == pytest.approx(0.0)


def test_router_entropy():
    inf = float("inf")
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, -inf, -inf, -inf], [5.0, 5.0, -inf, -inf]]])
    assert router_entropy(logits) == pytest.approx((math.log(4) + 0 + math.log(2)) / 3)
    assert router_entropy(logits, mask=torch.tensor([[True, False, False]])) == pytest.approx(math.log(4))


# ------------------------------------------------------------------------------------------- OLMoE §5


def test_router_saturation():
    a = ids([[0, 1], [2, 3], [4, 5]])
    b = ids([[1, 0], [2, 6], [7, 8]])  # overlaps 2, 1, 0 (order inside the set does not matter)
    assert router_saturation(a, b) == pytest.approx(3 / 6)
    assert router_saturation(a, b, k=1) == pytest.approx(1 / 3)  # first choices: 0/1, 2/2, 4/7
    assert router_saturation(a, b, mask=torch.tensor([[True, True, False]])) == pytest.approx(3 / 4)
    assert router_saturation(a, a) == 1.0


def test_uniform_saturation(uniform):
    e, E, K, g = uniform
    other = torch.rand(*e.shape[:2], E, generator=g).argsort(-1)[..., :K]
    assert abs(router_saturation(e, other) - K / E) < 0.01  # E|A ∩ B| / K = K / E


def test_expert_coactivation():
    co = expert_coactivation(ids([[0, 1], [0, 2], [0, 1], [3, 1]]), 4)
    # N_0 = 3, N_1 = 3, N_2 = 1, N_3 = 1; N_01 = 2, N_02 = 1, N_13 = 1
    close(co, [[0, 2 / 3, 1 / 3, 0], [2 / 3, 0, 0, 1 / 3], [1, 0, 0, 0], [0, 1, 0, 0]])


def test_coactivation_counts_all_pairs_not_adjacent_ranks():
    co = expert_coactivation(ids([[0, 1, 2]]), 4)  # K = 3: ranks 0 and 2 are not adjacent but co-activate
    assert co[0, 2] == 1.0 and co[2, 0] == 1.0
    assert co[3].sum() == 0  # an expert never chosen has a zero row
    assert co.diagonal().sum() == 0


def test_uniform_coactivation(uniform):
    e, E, _, _ = uniform
    co = expert_coactivation(e, E)
    off = co[~torch.eye(E, dtype=torch.bool)]
    close(off, torch.full_like(off, 1 / (E - 1)), tol=0.01)  # the partner is uniform over the other 7


def test_domain_specialization():
    dom = torch.tensor([[0, 0, 1]])
    spec = domain_specialization(E3, dom, num_experts=4, num_domains=2)
    close(spec, [[1, 1 / 2, 1 / 2, 0], [1, 0, 0, 1]])  # rows sum to K: normalised by tokens, not assignments
    close(domain_specialization(E3, dom, 4, 2, k=1), [[1, 0, 0, 0], [0, 0, 0, 1]])
    close(spec, 2 * expert_load_per_domain(E3, dom, 4, 2))


def test_uniform_domain_specialization(uniform):
    e, E, K, g = uniform
    dom = torch.randint(0, 3, e.shape[:2], generator=g)
    close(domain_specialization(e, dom, E, 3), torch.full((3, E), K / E), tol=0.015)


def test_vocabulary_specialization():
    e = first_only([0, 0, 1, 2, 3, 1])
    tok = torch.tensor([[5, 5, 5, 7, 7, 9]])  # 5 -> 2/3 on expert 0; 7 -> 1/2; 9 -> 1
    assert vocabulary_specialization(e, tok, 4) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert vocabulary_specialization(e, tok, 4, min_count=2) == pytest.approx((2 / 3 + 1 / 2) / 2)
    kept, table = vocabulary_specialization_per_token(e, tok, 4, min_count=2)
    assert kept.tolist() == [5, 7]
    close(table, [[2 / 3, 1 / 3, 0, 0], [0, 0, 1 / 2, 1 / 2]])
    mask = torch.tensor([[True, True, False, True, True, True]])
    assert vocabulary_specialization(e, tok, 4, mask=mask) == pytest.approx((1 + 1 / 2 + 1) / 3)


def test_vocabulary_specialization_any_choice():
    e = ids([[0, 1], [0, 2], [3, 1]])
    tok = torch.tensor([[5, 5, 7]])
    _, table = vocabulary_specialization_per_token(e, tok, 4, choice="any")
    close(table, [[1, 1 / 2, 1 / 2, 0], [0, 1, 0, 1]])  # share of occurrences whose top-K contains e
    assert vocabulary_specialization(e, tok, 4, choice="any") == 1.0
    assert vocabulary_specialization(e, tok, 4, choice="second") == pytest.approx((1 / 2 + 1) / 2)


# -------------------------------------------------------------------------------- token-id predictability


def test_token_id_predictability_hand_built():
    e = first_only([0, 0, 1, 2, 3, 1])
    tok = torch.tensor([[5, 5, 5, 7, 7, 9]])
    assert token_id_predictability(e, tok) == pytest.approx(4 / 6)  # 2 (id 5) + 1 (id 7) + 1 (id 9)
    # table: 5 -> 0, 7 -> 2 (tie 2/3 -> lower id), 9 -> 1; unseen -> global most frequent (0 and 1 tie -> 0)
    held = (first_only([0, 3, 1, 0, 2]), torch.tensor([[5, 7, 9, 11, 7]]))
    assert token_id_predictability(e, tok, held_out=held) == pytest.approx(4 / 5)
    held_masked = (*held, torch.tensor([[True, True, True, True, False]]))
    assert token_id_predictability(e, tok, held_out=held_masked) == pytest.approx(3 / 4)


def test_token_id_predictability_hash_vs_random(uniform):
    e, E, _, g = uniform
    tok = torch.randint(0, 50, e.shape[:2], generator=g)
    hashed = (tok * 7 + 3) % E  # expert = f(token id)
    assert token_id_predictability(hashed.unsqueeze(-1), tok) == 1.0
    half = e.shape[0] // 2
    assert token_id_predictability(hashed[:half], tok[:half], held_out=(hashed[half:], tok[half:])) == 1.0
    assert vocabulary_specialization(hashed, tok, E) == 1.0
    # random routing: ~1/E held out; in-sample slightly above (the max of 8 noisy shares)
    assert abs(token_id_predictability(e[:half], tok[:half], held_out=(e[half:], tok[half:])) - 1 / E) < 0.01
    assert 1 / E <= token_id_predictability(e, tok) < 1 / E + 0.02


def test_best_token_expert_table():
    e = ids([[0, 1], [0, 1], [1, 2], [3, 2]])
    tok = torch.tensor([[5, 5, 5, 7]])
    # top-2 membership counts: id 5 -> {0: 2, 1: 3, 2: 1}; id 7 -> {2: 1, 3: 1}; global {0: 2, 1: 3, 2: 2, 3: 1}
    t1 = best_token_expert_table(e, tok, vocab_size=9, top_k=1)  # first choices: id 5 -> {0: 2, 1: 1}, 7 -> 3
    assert t1.shape == (9, 1)
    assert t1[5].tolist() == [0] and t1[7].tolist() == [3] and t1[0].tolist() == [0]  # unseen -> global 0
    t2 = best_token_expert_table(e, tok, vocab_size=9, top_k=2)
    assert t2[5].tolist() == [1, 0]
    assert t2[7].tolist() == [2, 3]  # tie -> lower id first
    assert t2[8].tolist() == [1, 0]  # unseen -> globally most used (0 and 2 tie -> 0)
    t3 = best_token_expert_table(e, tok, vocab_size=9, top_k=3)  # counts use the K = 2 columns available
    assert t3[7].tolist() == [2, 3, 1]  # the slot its counts cannot fill takes the global favourite
    assert t3[4].tolist() == [1, 0, 2]
    assert all(len(set(row)) == 3 for row in t3.tolist())
    assert best_token_expert_table(e, tok, 9, top_k=4, num_experts=5)[0].tolist() == [1, 0, 2, 3]


def test_best_table_agrees_with_predictability(uniform):
    e, E, _, g = uniform
    tok = torch.randint(0, 30, e.shape[:2], generator=g)
    table = best_token_expert_table(e, tok, vocab_size=30)
    acc = float((table[tok, 0] == e[..., 0]).double().mean())
    assert acc == pytest.approx(token_id_predictability(e, tok))


# ------------------------------------------------------------------------------------------ span coherence


def test_span_coherence_hand_built():
    # spans: [t0 t1] [t2 t3 t4] [t5]
    e = ids([[0, 1], [0, 1], [2, 3], [2, 4], [2, 3], [2, 6]])
    start = torch.tensor([[True, False, True, False, False, True]])
    r = span_coherence(e, start)
    assert r["first"] == 1.0  # both multi-token spans keep their first expert
    assert r["all"] == pytest.approx(1 / 2)  # the second span's sets {2,3},{2,4},{2,3} differ
    assert r["pairs_within"] == 1.0  # (0,1) (2,3) (3,4)
    assert r["pairs_across"] == pytest.approx(1 / 2)  # (1,2) differs, (4,5) repeats


def test_span_coherence_sets_ignore_order_and_mask_drops_pieces():
    e = ids([[0, 1], [1, 0], [2, 3], [4, 5]])
    start = torch.tensor([[True, False, True, False]])
    r = span_coherence(e, start)
    assert r["first"] == 0.0 and r["all"] == 1.0 / 2  # span 1: same set, different first choice
    masked = span_coherence(e, start, mask=torch.tensor([[True, True, True, False]]))
    assert masked["all"] == 1.0  # span 2 has one valid piece left: no longer multi-token
    assert masked["pairs_across"] == 0.0 and masked["pairs_within"] == 0.0


def test_span_coherence_rows_and_doc_starts_split_spans():
    e = first_only([1, 1, 2], [2, 3, 3])
    start = torch.zeros(2, 3, dtype=torch.bool)  # position 0 of each row still starts a span
    r = span_coherence(e, start)
    assert r["first"] == 0.0  # rows are separate spans: [1 1 2] and [2 3 3], neither constant
    doc = torch.tensor([[False, False, True], [False, True, False]])
    r = span_coherence(e, start, doc_start=doc)
    assert r["first"] == 1.0  # spans [1 1] [2] [2] [3 3]
    assert math.isnan(r["pairs_across"])  # the only boundaries are document starts


def test_span_coherence_constant_within_spans(uniform):
    e, E, K, g = uniform
    start = torch.rand(e.shape[:2], generator=g) < 0.4
    start[:, 0] = True
    span_idx = start.long().cumsum(1)  # route every piece with its span's routing
    e_const = torch.gather(e, 1, (span_idx * 7 % e.shape[1]).unsqueeze(-1).expand_as(e))
    r = span_coherence(e_const, start)
    assert r["first"] == 1.0 and r["all"] == 1.0 and r["pairs_within"] == 1.0
    # random routing: a span of L pieces agrees w.p. E^-(L-1); L ~ Geometric(p = 0.4) given L >= 2 gives p/(E - 1 + p)
    r = span_coherence(e, start)
    assert abs(r["first"] - 0.4 / (E - 0.6)) < 0.005
    assert abs(r["pairs_within"] - 1 / E) < 0.01 and abs(r["pairs_across"] - 1 / E) < 0.01


def test_per_layer():
    layers = [first_only([1, 1]), first_only([1, 2])]
    assert [r["first"] for r in per_layer(consecutive_repeat_rates, layers)] == [1.0, 0.0]


# ------------------------------------------------------------------------------------- token view and plots


def test_token_html_escapes_and_keeps_whitespace():
    pieces = ["<script>", "alert(1)", "</script>", "\u2581x", "<0x0A>", "\u2581\u2581\u2581\u2581y"]
    out = token_html(pieces, torch.tensor([0, 1, 2, 3, 4, 9]), 10, title="layer <0>")
    assert "<script>" not in out and "&lt;script&gt;" in out and "&lt;/script&gt;" in out
    assert "layer &lt;0&gt;" in out
    assert ">&nbsp;x<" not in out and "> x<" in out  # ▁ is a plain space shown by pre-wrap
    assert ">    y<" in out and "\n" in out
    assert out.count("<span") >= len(pieces) + 10  # one span per token plus the legend
    page = token_html_page([out, token_html(["a"], [0], 8, title="layer 1")])
    assert page.startswith("<!DOCTYPE html>") and page.count("moe-token-view") == 2
    with pytest.raises(ValueError):
        token_html(["a", "b"], [0], 8)


def test_plots_write_png(tmp_path):
    g = torch.Generator().manual_seed(1)
    load = {layer: torch.softmax(torch.randn(3, 8, generator=g), -1) for layer in (0, 15, 31)}
    b = random_repeat_baselines(8, 2)
    paths = [
        plot_load_per_domain(load, ["arxiv", "github", "dm_math"], tmp_path / "load.png"),
        plot_load_heatmap(torch.stack(list(load.values()))[:, 0], tmp_path / "heat.png"),
        plot_repeat_rates({"arxiv": [0.14, 0.28, 0.23], "github": [0.15, 0.28, 0.2]}, b, tmp_path / "rep.png"),
        plot_repeat_rates(
            {"first": {"arxiv": [0.14, 0.28]}, "any": {"arxiv": [0.47, 0.62]}}, b, tmp_path / "sub" / "rep2.png"
        ),
    ]
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG")


# ------------------------------------------------------------- held out by document, random-routing floors, layers


def test_document_ids_count_documents_across_rows():
    doc_start = torch.tensor([[False, True, False], [False, False, True], [True, False, False]])
    assert document_ids(doc_start).tolist() == [[0, 1, 1], [1, 1, 2], [3, 3, 3]]
    assert document_ids(torch.tensor([[True, False], [True, True]])).tolist() == [[0, 0], [1, 2]]
    fit, score = document_halves(doc_start)
    assert torch.equal(fit, ~score)
    docs = document_ids(doc_start)
    for d in range(4):  # every document lies whole in one half
        assert fit[docs == d].all() or score[docs == d].all()


def documents_with_topics(seed: int = 0, n_docs: int = 500, S: int = 128, V: int = 32000):
    """Zipf-distributed tokens packed into windows of S; each document of 100-1500 tokens also repeats its own 20
    topic ids (names, terms) in 40% of its positions, as real documents do. Returns token ids and doc_start."""
    g = torch.Generator().manual_seed(seed)
    zipf = torch.arange(1, V + 1).double() ** -1.1
    toks, starts = [], []
    for _ in range(n_docs):
        n = int(torch.randint(100, 1500, (1,), generator=g))
        doc = torch.multinomial(zipf, n, replacement=True, generator=g)
        topic = torch.randint(1000, V, (20,), generator=g)
        use = torch.rand(n, generator=g) < 0.4
        doc[use] = topic[torch.randint(0, 20, (int(use.sum()),), generator=g)]
        start = torch.zeros(n, dtype=torch.bool)
        start[0] = True
        toks.append(doc)
        starts.append(start)
    n = sum(len(t) for t in toks) // S * S
    return torch.cat(toks)[:n].view(-1, S), torch.cat(starts)[:n].view(-1, S)


def test_heldout_predictability_by_document_of_a_router_blind_to_tokens():
    """Known answer: a router that reads no token (expert = document id mod 8) is predicted by a token-id table on
    unseen documents no better than chance, ~1/8. Split by window parity instead, the halves share documents
    (each is cut into several windows) and the same router looks 3x more predictable."""
    toks, doc_start = documents_with_topics()
    experts = (document_ids(doc_start) % 8).unsqueeze(-1)
    assert heldout_token_id_predictability(experts, toks, doc_start) == pytest.approx(1 / 8, abs=0.025)
    by_window_parity = token_id_predictability(experts[0::2], toks[0::2], held_out=(experts[1::2], toks[1::2]))
    assert by_window_parity > 0.35
    hashed = (toks * 7 + 3) % 8  # a hash router stays predictable on new documents (unseen ids count against it)
    assert heldout_token_id_predictability(hashed.unsqueeze(-1), toks, doc_start) > 0.7  # topic ids unseen: misses


def test_random_routing_floor_is_not_one_over_e_on_zipf_tokens():
    toks, doc_start = documents_with_topics(n_docs=40)  # ~32k tokens
    E, K = 8, 2
    routing = random_routing(toks.shape, E, K, torch.Generator().manual_seed(1))
    assert routing.shape == (*toks.shape, K) and (routing[..., 0] != routing[..., 1]).all()
    in_sample = random_routing_baseline(lambda e: token_id_predictability(e, toks), toks.shape, E, K)
    assert in_sample > 2 / E  # ids seen once are "predicted" perfectly: the floor is far above 1/E
    assert in_sample == random_routing_baseline(lambda e: token_id_predictability(e, toks), toks.shape, E, K)
    assert random_routing_baseline(lambda e: vocabulary_specialization(e, toks, E, min_count=10), toks.shape, E,
                                   K) > 1.5 / E
    held = random_routing_baseline(lambda e: heldout_token_id_predictability(e, toks, doc_start), toks.shape, E, K)
    assert held == pytest.approx(1 / E, abs=0.01)
    # on ids that each occur many times the floor does approach 1/E
    many = torch.randint(0, 5, toks.shape, generator=torch.Generator().manual_seed(2))
    assert random_routing_baseline(lambda e: token_id_predictability(e, many), many.shape, E, K) < 1 / E + 0.02


def test_middle_layer_is_mixtrals_fifteen_of_thirty_two():
    assert middle_layer(32) == 15 and paper_layers(32) == [0, 15, 31]
    assert paper_layers(8) == [0, 3, 7] and paper_layers(2) == [0, 1] and paper_layers(1) == [0]
    with pytest.raises(ValueError, match="n_layers"):
        middle_layer(0)
