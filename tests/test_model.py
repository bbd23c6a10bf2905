"""Core model: shapes, causality, equivalences (1 expert = dense SwiGLU; loop = grouped experts; activation
checkpointing on = off), balance-loss normalisation, parameter counts, cached generation, and clear errors for bad
sizes."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from moe_variants import ModelArgs, Transformer
from moe_variants.model.experts import (
    GroupedExperts,
    LocalDispatcher,
    LoopExperts,
    inverse_permutation,
    permute_rows,
    swiglu,
)
from moe_variants.model.losses import compose_loss, load_balance_loss
from moe_variants.model.transformer import ChunkedLinearCrossEntropy, RMSNorm
from moe_variants.routers.hash import HashRouter
from moe_variants.routers.topk import TopKRouter


def tiny(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=500, num_experts=4,
                num_experts_per_tok=2, max_seq_len=128)
    return ModelArgs(**{**base, **kw})


def test_forward_shapes_and_routing_output():
    torch.manual_seed(0)
    model = Transformer(tiny(), router=TopKRouter)
    out = model(torch.randint(0, 500, (3, 17)))
    assert out.logits.shape == (3, 17, 500)
    assert len(out.routing) == 2
    for r in out.routing:
        assert r.expert_ids.shape == (3, 17, 2) and r.weights.shape == (3, 17, 2)
        assert r.logits.shape == (3, 17, 4)
        assert set(r.aux_losses) == {"load_balance", "z_loss"}


@pytest.mark.parametrize("window", [None, 5])
def test_causal_logits_and_routing(window):
    torch.manual_seed(0)
    model = Transformer(tiny(sliding_window=window), router=TopKRouter).eval()
    ids = torch.randint(0, 500, (2, 24))
    base = model(ids)
    for t in (0, 7, 22):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, 500, (2, 24 - t - 1))
        out = model(changed)
        torch.testing.assert_close(out.logits[:, : t + 1], base.logits[:, : t + 1])
        for r0, r1 in zip(base.routing, out.routing):
            assert torch.equal(r0.expert_ids[:, : t + 1], r1.expert_ids[:, : t + 1])


def test_sliding_window_limits_attention():
    torch.manual_seed(0)
    model = Transformer(tiny(sliding_window=4, n_layers=1), router=TopKRouter).eval()
    ids = torch.randint(0, 500, (1, 20))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 500  # outside the window of position 19 (sees 16..19)
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[0, 19], b[0, 19])
    assert not torch.allclose(a[0, 4], b[0, 4])


def test_one_expert_moe_equals_dense_swiglu():
    torch.manual_seed(0)
    args = tiny(num_experts=1, num_experts_per_tok=1, n_layers=1)
    model = Transformer(args, router=TopKRouter).eval()
    moe = model.layers[0].feed_forward
    x = torch.randn(2, 9, args.dim)
    from moe_variants.model.routing import RoutingContext

    ctx = RoutingContext(history_ids=torch.zeros(2, 9, dtype=torch.long), positions=torch.arange(9).expand(2, 9))
    y, routing = moe(x, ctx)
    w13, w2 = moe.experts.w13[0], moe.experts.w2[0]
    w1, w3 = w13[: args.hidden_dim], w13[args.hidden_dim :]
    dense = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    torch.testing.assert_close(y, dense)
    assert torch.all(routing.weights == 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_loop_and_grouped_experts_agree_fp32(seed):
    torch.manual_seed(seed)
    E, D, Fh, T, K = 6, 32, 48, 50, 2
    loop = LoopExperts(dim=D, hidden_dim=Fh, num_experts=E)
    loop.reset_parameters(0.1)
    grouped = GroupedExperts(dim=D, hidden_dim=Fh, num_experts=E)
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(T, D, requires_grad=True)
    ids = torch.rand(T, E).argsort(-1)[:, :K]
    ids[ids == 5] = 4  # expert 5 gets no tokens: empty groups must work
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % 5, ids[:, 1])
    w = torch.softmax(torch.randn(T, K), -1)
    disp = LocalDispatcher(E)
    outs = []
    for experts in (loop, grouped):
        d = disp.dispatch(x, ids)
        y = disp.combine(experts(d.x, d.tokens_per_expert), w, d)
        g = torch.autograd.grad((y * torch.randn_like(y, generator=torch.Generator().manual_seed(3))).sum(),
                                [x, experts.w13, experts.w2])
        outs.append((y, *g))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_swiglu_derivative_equals_autograds():
    """The hand-written SwiGLU backward equals autograd's derivative of ``silu(gate) * up`` (float64: to rounding),
    and in bf16 it matches the fp32 reference as closely as autograd's own bf16 backward does."""
    torch.manual_seed(0)
    h = (3 * torch.randn(64, 2 * 24, dtype=torch.float64)).requires_grad_()
    grad = torch.randn(64, 24, dtype=torch.float64)
    assert torch.autograd.gradcheck(swiglu, (h,))
    reference = torch.autograd.grad(F.silu(h[:, :24]) * h[:, 24:], h, grad)[0]
    torch.testing.assert_close(swiglu(h), F.silu(h[:, :24]) * h[:, 24:], rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(swiglu(h), h, grad)[0], reference, rtol=1e-12, atol=1e-12)
    h16 = h.detach().bfloat16().requires_grad_()
    ours = torch.autograd.grad(swiglu(h16), h16, grad.bfloat16())[0]
    autograds = torch.autograd.grad(F.silu(h16[:, :24]) * h16[:, 24:], h16, grad.bfloat16())[0]
    h64 = h16.detach().double().requires_grad_()  # the bf16 inputs, differentiated exactly
    exact = torch.autograd.grad(F.silu(h64[:, :24]) * h64[:, 24:], h64, grad.bfloat16().double())[0]
    assert (ours.double() - exact).abs().max() <= (autograds.double() - exact).abs().max() * 1.01 + 1e-6


def test_dispatch_gathers_match_indexing():
    """The dispatcher's row moves (gathers both ways) give the values and gradients of plain indexing: x[order // K]
    for dispatch, the un-sort y[inverse] for combine."""
    torch.manual_seed(0)
    T, K, D = 9, 2, 5
    order = torch.randperm(T * K)
    inverse = inverse_permutation(order)
    assert torch.equal(order[inverse], torch.arange(T * K)) and torch.equal(inverse, order.argsort())
    ids = torch.stack([torch.randperm(6)[:K] for _ in range(T)])
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    d = LocalDispatcher(6).dispatch(x, ids)
    assert torch.equal(d.x, x[d.order // K]) and torch.equal(d.order[d.inverse], torch.arange(T * K))
    g = torch.randn(T * K, D, dtype=torch.float64)
    grad, expected_grad = (torch.autograd.grad((rows * g).sum(), x)[0] for rows in (d.x, x[d.order // K]))
    assert torch.allclose(grad, expected_grad)
    y = torch.randn(T * K, D, dtype=torch.float64, requires_grad=True)
    expected = torch.empty_like(y).index_put((order,), y)  # y_unsorted[order] = y
    assert torch.equal(permute_rows(y, inverse, order), expected)
    assert torch.autograd.gradcheck(lambda t: permute_rows(t, inverse, order), (y,))


def test_grouped_model_compiles_to_one_graph():
    """The GPU training path (grouped experts under torch.compile: the study configs) compiles with no graph break
    (router, dispatch gathers, grouped GEMMs, combine) and gives the eager loss and gradients. bf16 weights:
    grouped_mm's shape function only takes bf16."""
    torch.manual_seed(0)
    model = Transformer(tiny(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=48, vocab_size=64),
                        router=TopKRouter, experts="grouped").to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 16))
    eager = model(ids, labels=ids).lm_loss
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)(ids, labels=ids).lm_loss
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), abs=1e-3)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=4e-3, rtol=2e-2)


def test_grouped_experts_follow_autocast():
    """Under bf16-mixed (fp32 weights, fp32 activations, autocast on) the grouped GEMMs run in bf16, as the loop's
    autocast-covered matmuls do, and the fp32 weights get fp32 gradients."""
    torch.manual_seed(0)
    E, D, Fh, T, K = 4, 32, 48, 40, 2
    loop = LoopExperts(dim=D, hidden_dim=Fh, num_experts=E)
    loop.reset_parameters(0.1)
    grouped = GroupedExperts(dim=D, hidden_dim=Fh, num_experts=E)
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(T, D)
    ids = torch.rand(T, E).argsort(-1)[:, :K]
    d = LocalDispatcher(E).dispatch(x, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_loop, y_grouped = loop(d.x, d.tokens_per_expert), grouped(d.x, d.tokens_per_expert)
    assert y_grouped.dtype == y_loop.dtype == torch.bfloat16
    torch.testing.assert_close(y_grouped.float(), y_loop.float(), atol=2e-2, rtol=2e-2)
    y_grouped.float().sum().backward()
    assert grouped.w13.grad.dtype == grouped.w2.grad.dtype == torch.float32


@pytest.mark.gpu
def test_loop_and_grouped_experts_agree_bf16_cuda():
    torch.manual_seed(0)
    E, D, Fh, T, K = 8, 256, 512, 4096, 2
    loop = LoopExperts(dim=D, hidden_dim=Fh, num_experts=E).cuda()
    loop.reset_parameters(0.02)
    grouped = GroupedExperts(dim=D, hidden_dim=Fh, num_experts=E).cuda()
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(T, E, device="cuda").argsort(-1)[:, :K]
    w = torch.softmax(torch.randn(T, K, device="cuda"), -1)
    disp = LocalDispatcher(E)
    d = disp.dispatch(x, ids)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_loop = disp.combine(loop(d.x, d.tokens_per_expert), w, d)
    y_grouped = disp.combine(grouped(d.x, d.tokens_per_expert), w, d)
    rel = (y_loop.float() - y_grouped.float()).norm() / y_loop.float().norm()
    assert rel < 1e-2


def test_balance_loss_is_one_when_perfectly_balanced_for_any_k():
    E = 8
    for K in (1, 2, 4):
        T = E * 10
        ids = torch.stack([(torch.arange(T) + j) % E for j in range(K)], dim=1)  # every expert T*K/E times
        probs = torch.full((T, E), 1.0 / E)
        assert load_balance_loss(probs, ids).item() == pytest.approx(1.0)
    # all tokens on one expert with all probability there: the worst case, E
    ids = torch.zeros(16, 1, dtype=torch.long)
    probs = F.one_hot(ids[:, 0], E).float()
    assert load_balance_loss(probs, ids).item() == pytest.approx(E)


def test_compose_loss_applies_coefficients_and_rejects_unknown_losses():
    torch.manual_seed(0)
    model = Transformer(tiny(), router=TopKRouter)
    ids = torch.randint(0, 500, (2, 10))
    out = model(ids, labels=ids)
    total, parts = compose_loss(out.lm_loss, out.routing, {"load_balance": 0.5, "z_loss": 0.0})
    lb = torch.stack([r.aux_losses["load_balance"] for r in out.routing]).mean()
    torch.testing.assert_close(total, out.lm_loss + 0.5 * lb)
    assert set(parts) == {"lm_loss", "load_balance", "z_loss"}
    with pytest.raises(ValueError, match="no coefficient"):
        compose_loss(out.lm_loss, out.routing, {"load_balance": 0.01})


@pytest.mark.parametrize("compiled_branch", [False, True], ids=["eager", "compile_expression"])
def test_chunked_loss_equals_full_cross_entropy_and_gradients(compiled_branch, monkeypatch):
    # the gradient expression used under torch.compile, run here in eager mode
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiled_branch)
    torch.manual_seed(0)
    model = Transformer(tiny(), router=TopKRouter, loss_chunk_tokens=7)
    ids = torch.randint(0, 500, (2, 13))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    out = model(ids, labels=labels)
    assert out.logits is None
    logits = model(ids).logits
    ref = F.cross_entropy(logits.reshape(-1, 500), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, ref)
    params = [model.output.weight, model.tok_embeddings.weight, model.layers[0].attention.wq.weight]
    for g1, g2 in zip(torch.autograd.grad(out.lm_loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize(
    "router",
    [TopKRouter, functools.partial(TopKRouter, jitter_eps=0.1), functools.partial(HashRouter, weights="learned"),
     HashRouter],
    ids=["topk", "topk_jitter", "hash_learned", "hash_uniform"],
)
def test_activation_checkpointing_keeps_loss_routing_and_gradients(router):
    """Recomputing each block in backward changes nothing: loss, every RouterOutput field (aux losses included)
    and every parameter gradient are those of the plain model (jitter noise: the RNG state is restored)."""
    torch.manual_seed(0)
    model = Transformer(tiny(), router=router)
    ids = torch.randint(0, 500, (2, 16))
    results = []
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = model(ids, labels=ids.roll(-1, 1))
        loss, _ = compose_loss(out.lm_loss, out.routing, {"load_balance": 0.5, "z_loss": 0.1})
        loss.backward()
        results.append((loss.detach(), out.routing, {n: p.grad for n, p in model.named_parameters()}))
    (loss0, routing0, grads0), (loss1, routing1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for r0, r1 in zip(routing0, routing1, strict=True):
        assert torch.equal(r0.expert_ids, r1.expert_ids)
        torch.testing.assert_close(r1.weights, r0.weights, rtol=1e-6, atol=0)
        assert (r0.logits is None) == (r1.logits is None)
        if r0.logits is not None:
            torch.testing.assert_close(r1.logits, r0.logits, rtol=1e-6, atol=0)
        assert r1.aux_losses.keys() == r0.aux_losses.keys()
        for k in r0.aux_losses:
            torch.testing.assert_close(r1.aux_losses[k], r0.aux_losses[k], rtol=1e-6, atol=0)
    assert grads1.keys() == grads0.keys()
    for n, g0 in grads0.items():
        assert g0 is not None and grads1[n] is not None, n
        torch.testing.assert_close(grads1[n], g0, rtol=1e-5, atol=1e-7, msg=n)


def test_activation_checkpointing_only_in_training(monkeypatch):
    """The checkpoint wraps every block in training only: not in eval, under no_grad or with a KV cache."""
    import moe_variants.model.transformer as model_mod

    calls = []
    real = model_mod.checkpoint
    monkeypatch.setattr(model_mod, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = Transformer(tiny(), router=TopKRouter, activation_checkpointing=True)
    ids = torch.randint(0, 500, (1, 8))
    model(ids, labels=ids)
    assert calls == [{"use_reentrant": False}] * 2
    calls.clear()
    with torch.no_grad():
        model(ids)
    model(ids, cache=model.new_cache())
    model.eval()(ids)
    model.generate(ids, max_new_tokens=2)
    assert calls == []
    assert Transformer(tiny(), router=TopKRouter).activation_checkpointing is False


def test_mixtral_8x7b_parameter_counts_on_meta_device():
    with torch.device("meta"):
        model = Transformer(ModelArgs(), router=TopKRouter)  # defaults are Mixtral 8x7B (Table 1)
    counts = model.num_params()
    assert round(counts["total"] / 1e9, 1) == 46.7
    assert round(counts["active"] / 1e9, 1) == 12.9


@pytest.mark.parametrize("window", [None, 6])
def test_cached_generation_equals_uncached(window):
    torch.manual_seed(0)
    model = Transformer(tiny(sliding_window=window), router=TopKRouter).eval()
    prompt = torch.randint(0, 500, (2, 9))
    tokens, cached_logits = model.generate(prompt, max_new_tokens=8)
    assert tokens.shape == (2, 17)
    full = model(tokens).logits[:, :-1]
    torch.testing.assert_close(cached_logits, full, atol=1e-5, rtol=1e-4)
    assert torch.equal(tokens[:, 9:], full[:, 8:].argmax(-1))


def test_rolling_cache_keeps_only_the_window():
    model = Transformer(tiny(sliding_window=4), router=TopKRouter).eval()
    cache = model.new_cache()
    model(torch.randint(0, 500, (1, 10)), cache=cache)
    assert cache.layers[0].k.shape[2] == 4
    assert cache.layers[0].positions.tolist() == [6, 7, 8, 9]


def test_rmsnorm_matches_definition():
    norm = RMSNorm(8, 1e-5)
    x = torch.randn(3, 8)
    torch.testing.assert_close(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(n_heads=6, n_kv_heads=4, head_dim=16), "divisible by n_kv_heads"),
        (dict(num_experts=4, num_experts_per_tok=5), "1 <= top_k <= num_experts"),
        (dict(num_experts_per_tok=0), "positive integer"),
        (dict(dim=60, n_heads=8), "not divisible by n_heads"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(head_dim=15), "even"),
    ],
)
def test_bad_sizes_fail_with_clear_messages(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def test_unknown_model_args_field_is_named():
    with pytest.raises(ValueError, match="unknown ModelArgs field.*n_layer"):
        ModelArgs.from_dict({"n_layer": 2})


def test_out_of_vocab_and_too_long_inputs_fail_clearly():
    model = Transformer(tiny(), router=TopKRouter)
    with pytest.raises(ValueError, match="tokenizer does not match model.vocab_size"):
        model(torch.tensor([[1, 2, 500]]))
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("precision", ["bf16", "bf16-autocast"])
def test_chunked_loss_gradients_in_bf16_match_full_cross_entropy(precision):
    """bf16 weights: the LM head's gradient summed over 4 chunks inside the GEMMs (addmm_) is the full
    cross-entropy's to bf16 rounding; fp32 weights under bf16 autocast: summed in fp32, an fp32 gradient."""
    torch.manual_seed(0)
    h = torch.randn(52, 64)
    weight = torch.randn(500, 64) / 8
    labels = torch.randint(0, 500, (52,))
    labels[::5] = -100
    autocast = precision == "bf16-autocast"
    if not autocast:
        h, weight = h.bfloat16(), weight.bfloat16()
    h.requires_grad_(True)
    weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        chunked = ChunkedLinearCrossEntropy.apply(h, weight, labels, 13)
    grads = torch.autograd.grad(chunked, (h, weight))
    assert grads[1].dtype == weight.dtype
    ref = F.cross_entropy((h.double() @ weight.double().t()), labels, ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (h, weight))
    torch.testing.assert_close(chunked.double(), ref.detach(), rtol=1e-2, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=2e-2, atol=2e-2 * float(r.abs().max()))
