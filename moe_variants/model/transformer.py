"""The full Mixtral model (arXiv 2401.04088) with a pluggable router in every MoE feed-forward layer.

token embedding -> n_layers x [RMSNorm -> causal GQA attention with RoPE (optional sliding window) -> residual;
RMSNorm -> MoE(router, E SwiGLU experts) -> residual] -> RMSNorm -> untied LM head.

Names follow the Mixtral reference (``wq/wk/wv/wo``, ``attention_norm``, ``ffn_norm``, ``feed_forward``);
RoPE uses the HF "rotate half" layout so that HF checkpoints load without permuting weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_variants.model.args import ModelArgs
from moe_variants.model.experts import (
    Experts,
    LocalDispatcher,
    SharedExperts,
    compute_dtype,
    make_experts,
    over_capacity,
)
from moe_variants.model.routing import LayerSpec, Router, RouterFactory, RouterOutput, RoutingContext


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # normalise in fp32, as Mixtral/HF do
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos, sin of shape (S, head_dim) for absolute ``positions`` (S,)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (S, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, S, hd); rotate pairs (i, i + hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class LayerCache:
    """One attention layer's K/V for incremental decoding; only the last ``window`` keys when windowed."""

    k: torch.Tensor | None = None  # (B, H_kv, S_k, hd)
    v: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # (S_k,)


@dataclass
class KVCache:
    """Decoding state of the whole model: attention K/V, token history and per-layer router state."""

    layers: list[LayerCache]
    router_state: list[dict[str, Any]]
    history_ids: torch.Tensor | None = None  # (B, S_hist) every token fed so far
    next_pos: int = 0


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, S, hd)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        key_pos = positions
        if cache is not None and cache.k is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            key_pos = torch.cat([cache.positions, positions])
        if cache is not None:  # keep what later queries can still attend to (rolling when windowed)
            keep = k.shape[2] if self.window is None else min(k.shape[2], self.window)
            cache.k, cache.v, cache.positions = k[:, :, -keep:], v[:, :, -keep:], key_pos[-keep:]
        if self.window is None and k.shape[2] == S:  # plain causal self-attention: fused kernels
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            delta = positions[:, None] - key_pos[None, :]  # (S, S_k) query pos - key pos
            mask = delta >= 0
            if self.window is not None:
                mask &= delta < self.window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class MoE(nn.Module):
    """Route, dispatch, run experts, combine. The router is injected; this layer never knows which one.

    With ``args.capacity_factor`` the copies over an expert's capacity are dropped (``experts.over_capacity``) and
    marked in ``RouterOutput.dropped``; with ``args.num_shared_experts`` every token also goes through the shared
    experts, added with weight 1.
    """

    def __init__(self, args: ModelArgs, router: Router, experts: str) -> None:
        super().__init__()
        self.router = router
        self.experts = make_experts(experts, dim=args.dim, hidden_dim=args.hidden_dim, num_experts=args.num_experts)
        self.dispatcher = LocalDispatcher(args.num_experts)
        self.num_experts = args.num_experts  # all of them (under expert parallelism ``experts`` holds a shard)
        self.capacity_factor = args.capacity_factor
        self.shared_experts = None
        if args.num_shared_experts:
            self.shared_experts = SharedExperts(dim=args.dim, hidden_dim=args.shared_hidden_dim or args.hidden_dim,
                                                num_experts=args.num_shared_experts)

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> tuple[torch.Tensor, RouterOutput]:
        B, S, D = x.shape
        routing = self.router(x, ctx)
        if self.capacity_factor is not None:
            over = over_capacity(routing.expert_ids, self.num_experts, self.capacity_factor, routing.dropped)
            routing.dropped = over if routing.dropped is None else routing.dropped | over
        K = routing.expert_ids.shape[-1]
        x_TD = x.reshape(B * S, D)
        x_TD = x_TD.to(compute_dtype(x_TD))  # under autocast: cast once, before the copies are made and moved
        keep = None if routing.dropped is None else ~routing.dropped.reshape(B * S, K)
        plan = ctx.dispatch_plan(self.router.layer_idx)  # split sizes planned before the layers ran, or None
        out = self.dispatcher.run(self.experts, x_TD, routing.expert_ids.reshape(B * S, K),
                                  routing.weights.reshape(B * S, K), keep_TK=keep, plan=plan)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_TD)
        return out.view(B, S, D), routing


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, router: Router, experts: str) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoE(args, router, experts)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
        ctx: RoutingContext, cache: LayerCache | None,
    ) -> tuple[torch.Tensor, RouterOutput]:
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, cache)
        ffn, routing = self.feed_forward(self.ffn_norm(h), ctx)
        return h + ffn, routing


@dataclass
class ModelOutput:
    """Everything a forward returns: loss, logging and analysis all read this one object."""

    logits: torch.Tensor | None  # (B, S, V); None when only the loss was asked for
    routing: list[RouterOutput] = field(default_factory=list)  # one per MoE layer
    lm_loss: torch.Tensor | None = None  # mean next-token cross-entropy over labels != -100


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ weight.T`` against ``labels`` (-100 = ignore), in token chunks.

    The forward pass also computes both gradients chunk by chunk (softmax - one_hot is known once the logits
    are), so only one chunk of logits is ever alive and backward just scales the stored gradients. The weight's
    gradient is summed over the chunks in the weight's dtype: without autocast the GEMM adds each chunk's product
    in its epilogue (``addmm_``: summed in fp32, rounded to the weight's dtype once per chunk); under autocast (fp32
    weights, bf16 products) each product is added in fp32.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:  # noqa: ANN001
        grad_h = torch.empty_like(h)
        grad_w = None  # (V, D) in weight.dtype
        # the chunk products come out in the weight's dtype: add them in the GEMM (an in-place addmm_ is not
        # autocast's, it would run in the inputs' dtype, fp32 GEMMs under bf16-mixed)
        in_gemm = not torch.is_autocast_enabled(h.device.type) and h.dtype == weight.dtype
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk):
            h_c, y_c = h[start : start + chunk], labels[start : start + chunk]
            logits = (h_c @ weight.t()).float()  # (n, V)
            valid = y_c != -100
            y_safe = torch.where(valid, y_c, torch.zeros_like(y_c))
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, y_safe[:, None]).squeeze(1)
            total = total + torch.where(valid, lse - target, torch.zeros_like(lse)).sum()
            # d loss / d logits = softmax - one_hot
            if torch.compiler.is_compiling():  # one pointwise expression: inductor fuses it into one pass
                vocab = torch.arange(weight.shape[0], device=h.device)  # (V,), an index expression once fused
                d_logits = torch.exp(logits - lse[:, None]) - (vocab[None, :] == y_safe[:, None]).float()
            else:  # eager: the fused softmax kernel, then the one-hot subtracted in place (2x faster on CPU)
                d_logits = torch.softmax(logits, dim=-1)
                d_logits.scatter_add_(1, y_safe[:, None], -torch.ones_like(lse)[:, None])
            d_logits = (d_logits * valid[:, None]).to(h.dtype)
            grad_h[start : start + chunk] = d_logits @ weight
            if grad_w is not None and in_gemm:
                grad_w.addmm_(d_logits.t(), h_c)
            else:
                product = (d_logits.t() @ h_c).to(weight.dtype)
                grad_w = product if grad_w is None else grad_w.add_(product)
        ctx.save_for_backward(grad_h, torch.zeros_like(weight) if grad_w is None else grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


class Transformer(nn.Module):
    """Mixtral language model with one router per MoE layer.

    Args:
        args: architecture.
        router: a router factory called once per layer with its ``LayerSpec``, e.g. Mixtral's gate
            ``moe_variants.routers.topk.TopKRouter`` or a Hydra ``_partial_`` router config; whatever a router
            needs beyond the spec (tables, corpus statistics) is bound into the factory by whoever builds the model.
        experts: ``"loop"`` (reference) or ``"grouped"`` (grouped GEMMs).
        loss_chunk_tokens: tokens per chunk when computing the LM loss, so that the (tokens x V) logits
            never sit in memory at once.
        activation_checkpointing: in training (``model.train()``, grad enabled, no KV cache), keep only each
            block's inputs and recompute its activations in backward (non-reentrant ``torch.utils.checkpoint``):
            less activation memory for about one more forward pass; results and gradients are unchanged.

    ``dispatch_planner`` (set by ``parallel.expert_parallel.apply_expert_parallel``): called as
    ``planner(model, ctx)`` at the start of every forward outside incremental decoding; it returns every layer's
    dispatch split sizes (``RoutingContext.dispatch_plans``) when it can tell them before the layers run, else None.
    """

    dispatch_planner: Callable[[Transformer, RoutingContext], list[Any] | None] | None = None

    def __init__(
        self,
        args: ModelArgs,
        router: RouterFactory,
        experts: str = "loop",
        loss_chunk_tokens: int = 8192,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.args = args
        self.loss_chunk_tokens = loss_chunk_tokens
        self.activation_checkpointing = activation_checkpointing
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList()
        for i in range(args.n_layers):
            spec = LayerSpec(
                dim=args.dim, num_experts=args.num_experts, top_k=args.num_experts_per_tok,
                vocab_size=args.vocab_size, n_layers=args.n_layers, layer_idx=i,
            )
            self.layers.append(TransformerBlock(args, router(spec), experts))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # cos/sin of every position, computed once (recomputing them in every layer cost ~5% of a GPU step)
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim), persistent=False)
        self.reset_parameters()

    @property
    def routers(self) -> list[Router]:
        return [layer.feed_forward.router for layer in self.layers]

    @property
    def causal(self) -> bool:
        """False when any router looks ahead, or capacity dropping does (such a run must be labelled non-causal)."""
        return all(r.causal for r in self.routers) and self.args.capacity_factor is None

    def init_rope(self) -> None:
        """(Re)compute the RoPE tables, e.g. after ``to_empty`` from the meta device."""
        if self.rope_cos.is_meta:
            return
        positions = torch.arange(self.args.max_seq_len, device=self.rope_cos.device)
        cos, sin = rope_cos_sin(positions, self.args.head_dim, self.args.rope_theta, torch.float32)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def reset_parameters(self) -> None:
        self.init_rope()
        std = self.args.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Experts):
                module.reset_parameters(std)

    # -- forward -----------------------------------------------------------------------------------------
    def _check_input(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        if torch.compiler.is_compiling():  # value checks sync with the host; the eager path already ran them
            return
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, S), got {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.args.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.args.vocab_size}); got range [{int(input_ids.min())}, "
                f"{int(input_ids.max())}]: the tokenizer does not match model.vocab_size"
            )
        if positions.numel() and int(positions.max()) >= self.args.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} is beyond the model's max_seq_len={self.args.max_seq_len}: "
                f"shorten the sequence or raise model.max_seq_len"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_logits: bool | None = None,
    ) -> ModelOutput:
        """Args: input_ids (B, S) int64; labels (B, S) next-token targets (-100 = ignore); cache for incremental
        decoding. Logits are returned unless only the loss was asked for (labels given and
        ``return_logits`` not True)."""
        B, S = input_ids.shape
        start = cache.next_pos if cache is not None else 0
        positions = torch.arange(start, start + S, device=input_ids.device)
        self._check_input(input_ids, positions)
        history = input_ids
        if cache is not None:
            history = input_ids if cache.history_ids is None else torch.cat([cache.history_ids, input_ids], 1)
            cache.history_ids, cache.next_pos = history, start + S
        ctx = RoutingContext(
            history_ids=history, positions=positions.expand(B, S), router_state=cache.router_state if cache else None,
        )
        if self.dispatch_planner is not None and cache is None:
            ctx.dispatch_plans = self.dispatch_planner(self, ctx)
        h = self.tok_embeddings(input_ids)
        cos, sin = self.rope_cos[positions].to(h.dtype), self.rope_sin[positions].to(h.dtype)
        routing = []
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:  # RNG state (router jitter) is restored for the recomputation
                h, r = checkpoint(layer, h, cos, sin, positions, ctx, None, use_reentrant=False)
            else:
                h, r = layer(h, cos, sin, positions, ctx, cache.layers[i] if cache else None)
            routing.append(r)
        h = self.norm(h)
        if return_logits is None:
            return_logits = labels is None
        logits = self.output(h) if return_logits else None
        lm_loss = None if labels is None else self.lm_loss(h, labels, logits)
        return ModelOutput(logits=logits, routing=routing, lm_loss=lm_loss)

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32 softmax) over labels != -100.

        Without precomputed logits it runs the LM head chunk by chunk and computes the gradients in the same
        pass (:class:`ChunkedLinearCrossEntropy`), so the (tokens x V) logits never sit in memory at once and
        are never recomputed.
        """
        labels = labels.reshape(-1)
        n_valid = (labels != -100).sum().clamp(min=1)
        if logits is not None:
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels, reduction="sum") / n_valid
        h = h.reshape(-1, h.shape[-1])
        if torch.is_grad_enabled() and (h.requires_grad or self.output.weight.requires_grad):
            total = ChunkedLinearCrossEntropy.apply(h, self.output.weight, labels, self.loss_chunk_tokens)
        else:  # evaluation: the loss alone, still one chunk of logits at a time
            total = sum(F.cross_entropy(self.output(h_c).float(), y_c, reduction="sum")
                        for h_c, y_c in zip(h.split(self.loss_chunk_tokens), labels.split(self.loss_chunk_tokens)))
        return total / n_valid

    # -- generation --------------------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        return KVCache(layers=[LayerCache() for _ in self.layers], router_state=[{} for _ in self.layers])

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode with a KV cache. Returns (tokens (B, S + new), logits of every fed position (B, S + new - 1, V)).

        ``temperature=0`` is greedy; otherwise sample from softmax(logits / temperature), optionally top-k.
        """
        cache = self.new_cache()
        tokens, all_logits = prompt_ids, []
        feed = prompt_ids
        for _ in range(max_new_tokens):
            logits = self(feed, cache=cache).logits  # (B, s, V)
            all_logits.append(logits)
            last = logits[:, -1].float()
            if temperature == 0.0:
                nxt = last.argmax(-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None:
                    kth = last.topk(top_k, dim=-1).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(last, -1), 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
            feed = nxt
        return tokens, torch.cat(all_logits, dim=1)

    # -- bookkeeping -------------------------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Total parameters, and active ones per token (only top-K of the E experts run)."""
        total = sum(p.numel() for p in self.parameters())
        expert = sum(layer.feed_forward.experts.w13.numel() + layer.feed_forward.experts.w2.numel()
                     for layer in self.layers)
        active = total - expert + expert * self.args.num_experts_per_tok // self.args.num_experts
        return {"total": total, "active": active}
