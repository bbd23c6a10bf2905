"""Routing-analysis metrics: pure functions over one layer's routing decisions.

Conventions shared by every function:

- ``expert_ids``: (N, S, K) int64, the K *distinct* experts chosen per token, index 0 = first choice
  (``RouterOutput.expert_ids``). A (N, S) tensor is read as K = 1.
- ``mask``: (N, S) bool, True for valid tokens; None means all tokens are valid. Padding is excluded
  everywhere; a consecutive pair counts only when both of its tokens are valid.
- ``doc_start``: (N, S) bool, True at the first token of a document inside a packed row. The pair
  (t, t+1) with ``doc_start[t+1]`` is a *cross-document* pair and is never counted.
- ``token_ids`` / ``domain_ids``: (N, S) int64, aligned with ``expert_ids``.
- Shares with an empty denominator are NaN (scalars and per-domain rows) unless a docstring says otherwise.
- numpy arrays are accepted wherever a tensor is; results are tensors on the input's device or Python floats.

Sources: Mixtral §5 (Figure 7 load per domain, Table 5 / Figure 10 consecutive repeats) and OLMoE §5
(Eqs. 5–8: saturation, co-activation, domain and vocabulary specialization). See REFERENCE.md §1.4, §6.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

_CHOICES = ("any", "first", "second")


# ----------------------------------------------------------------------------------------------- helpers


def _t(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _routing(expert_ids: Any) -> torch.Tensor:
    ids = _t(expert_ids).long()
    if ids.dim() == 2:
        ids = ids.unsqueeze(-1)
    if ids.dim() != 3:
        raise ValueError(f"expert_ids must be (N, S, K) or (N, S), got shape {tuple(ids.shape)}")
    return ids


def _valid(mask: Any, ids: torch.Tensor) -> torch.Tensor:
    """(N, S) bool validity mask matching the first two dims of ``ids``."""
    if mask is None:
        return torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)
    m = _t(mask).to(device=ids.device, dtype=torch.bool)
    if m.shape != ids.shape[:2]:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match routing shape {tuple(ids.shape[:2])}")
    return m


def _col_slice(ids: torch.Tensor, choice: str) -> slice:
    """The routing columns a ``choice`` refers to: all K, the first, or the second."""
    if choice not in _CHOICES:
        raise ValueError(f"choice must be one of {_CHOICES}, got {choice!r}")
    if choice == "second" and ids.shape[-1] < 2:
        raise ValueError("choice='second' needs K >= 2 experts per token")
    return {"any": slice(None), "first": slice(0, 1), "second": slice(1, 2)}[choice]


def _columns(ids: torch.Tensor, choice: str) -> torch.Tensor:
    return ids[..., _col_slice(ids, choice)]


def _bincount(x: torch.Tensor, size: int, what: str = "expert id", weights: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.bincount`` of length exactly ``size``; ids outside [0, size) are an error, not silently dropped."""
    counts = torch.bincount(x, weights=weights, minlength=size)
    if counts.numel() > size:
        raise ValueError(f"{what} out of range: found index {counts.numel() - 1} >= {size}")
    return counts


def _check_experts(sel: torch.Tensor, num_experts: int) -> None:
    if sel.numel() and int(sel.max()) >= num_experts:
        raise ValueError(f"expert id out of range: found {int(sel.max())} >= num_experts={num_experts}")


def _ratio(num: torch.Tensor | int, den: torch.Tensor | int) -> float:
    den = int(den)
    return float(num) / den if den > 0 else math.nan


def _pair_mask(valid: torch.Tensor, doc_start: Any) -> torch.Tensor:
    """(N, S-1) bool: pair (t, t+1) is counted (both valid, same document)."""
    pairs = valid[:, :-1] & valid[:, 1:]
    if doc_start is not None:
        ds = _t(doc_start).to(device=valid.device, dtype=torch.bool)
        if ds.shape != valid.shape:
            raise ValueError(f"doc_start shape {tuple(ds.shape)} does not match routing shape {tuple(valid.shape)}")
        pairs = pairs & ~ds[:, 1:]
    return pairs


def _repeat_flags(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S-1) bool flags per consecutive pair: same first choice, intersecting top-K sets."""
    a, b = ids[:, :-1], ids[:, 1:]  # (N, S-1, K)
    first = a[..., 0] == b[..., 0]
    any_ = (a.unsqueeze(-1) == b.unsqueeze(-2)).flatten(-2).any(-1)  # (N, S-1, K, K) -> (N, S-1)
    return first, any_


def per_layer(fn: Callable[..., Any], routing_list: Sequence[Any], **kw: Any) -> list[Any]:
    """Apply a metric to every layer: ``[fn(r, **kw) for r in routing_list]``.

    Example: ``per_layer(consecutive_repeat_rates, [out.expert_ids for out in routing], mask=mask)``.
    """
    return [fn(r, **kw) for r in routing_list]


# ------------------------------------------------------------------------ Mixtral §5: repeats and load


def consecutive_repeat_rates(
    expert_ids: torch.Tensor, mask: torch.Tensor | None = None, doc_start: torch.Tensor | None = None
) -> dict[str, float]:
    """Share of consecutive token pairs routed to a repeated expert (Mixtral Table 5, Figure 10).

    Pairs are (t, t+1) inside one row where both tokens are valid and t+1 does not start a new document.

    Args:
        expert_ids: (N, S, K) int64 distinct experts per token, first choice at index 0.
        mask: (N, S) bool valid tokens, None = all. Restricting the mask to one domain gives that domain's
            rate over its within-domain pairs.
        doc_start: (N, S) bool first token of each packed document; cross-document pairs are excluded.

    Returns:
        ``{"first": P[first choices equal], "any": P[top-K sets intersect]}`` ("first or second choice" for
        K = 2); NaN when there are no pairs. Random baselines: :func:`random_repeat_baselines`.
    """
    ids = _routing(expert_ids)
    pairs = _pair_mask(_valid(mask, ids), doc_start)
    first, any_ = _repeat_flags(ids)
    n = int(pairs.sum())
    return {"first": _ratio((first & pairs).sum(), n), "any": _ratio((any_ & pairs).sum(), n)}


def repeat_rates_per_domain(
    expert_ids: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    mask: torch.Tensor | None = None,
    doc_start: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`consecutive_repeat_rates` per domain, over pairs whose two tokens share a domain.

    Returns:
        ``{"first": Tensor[D], "any": Tensor[D]}`` float32; NaN for domains without pairs.
    """
    ids = _routing(expert_ids)
    dom = _t(domain_ids).to(ids.device).long()
    pairs = _pair_mask(_valid(mask, ids), doc_start) & (dom[:, :-1] == dom[:, 1:])
    first, any_ = _repeat_flags(ids)
    d = dom[:, 1:][pairs]
    n = _bincount(d, num_domains, "domain id").double()
    out = {}
    for name, flags in (("first", first), ("any", any_)):
        hits = _bincount(d, num_domains, "domain id", flags[pairs].double())
        out[name] = (hits / n).float()
    return out


def random_repeat_baselines(num_experts: int, top_k: int) -> dict[str, float]:
    """Repeat rates of uniformly random routing (K distinct experts out of E per token, independent tokens).

    ``first`` = 1/E; ``any`` = 1 - C(E-K, K) / C(E, K), the chance that two random K-sets intersect.
    E = 8, K = 2 gives 0.125 and 13/28 = 0.4643 (Mixtral Table 5 caption).
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    disjoint = math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return {"first": 1.0 / num_experts, "any": 1.0 - disjoint}


def expert_load(
    expert_ids: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None, choice: str = "any"
) -> torch.Tensor:
    """Share of routing assignments per expert (Mixtral Figure 7 / Figure 9 convention).

    The denominator is the number of assignments counted: K per valid token for ``choice="any"``, one per
    token for ``"first"`` / ``"second"``. The result sums to 1 and uniform routing gives 1/E everywhere.

    Returns:
        Tensor[E] float32 (NaN when no token is valid).
    """
    ids = _routing(expert_ids)
    sel = _columns(ids, choice)[_valid(mask, ids)].flatten()
    counts = _bincount(sel, num_experts).double()
    return (counts / sel.numel()).float() if sel.numel() else torch.full_like(counts, math.nan).float()


def expert_load_per_domain(
    expert_ids: torch.Tensor,
    domain_ids: torch.Tensor,
    num_experts: int,
    num_domains: int,
    mask: torch.Tensor | None = None,
    choice: str = "any",
) -> torch.Tensor:
    """:func:`expert_load` for each domain separately (Mixtral Figure 7: rows sum to 1, uniform = 1/E).

    Returns:
        Tensor[num_domains, E] float32; rows of domains without valid tokens are NaN.
    """
    ids = _routing(expert_ids)
    cols = _columns(ids, choice)  # (N, S, C)
    valid = _valid(mask, ids)
    dom = _t(domain_ids).to(ids.device).long()[valid]  # (T,)
    sel = cols[valid]  # (T, C)
    _check_experts(sel, num_experts)
    flat = (dom.unsqueeze(-1) * num_experts + sel).flatten()
    counts = _bincount(flat, num_domains * num_experts, "domain/expert id")
    counts = counts.view(num_domains, num_experts).double()
    return (counts / counts.sum(-1, keepdim=True)).float()


def load_balance_stats(load: torch.Tensor) -> dict[str, float]:
    """Summary of a per-expert load vector (counts or shares, Tensor[E]).

    Returns:
        ``max_over_mean`` (1 = perfectly balanced, E = all on one expert), ``cv`` (population std / mean),
        ``min`` and ``max`` of the vector as given.
    """
    x = _t(load).double().flatten()
    mean = x.mean()
    return {
        "max_over_mean": float(x.max() / mean),
        "cv": float(x.std(correction=0) / mean),
        "min": float(x.min()),
        "max": float(x.max()),
    }


def router_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean entropy (nats) of the router's softmax over experts, over valid tokens.

    Args:
        logits: (..., E) router logits (e.g. (N, S, E)); computed in float32, -inf logits are allowed.
        mask: bool of shape ``logits.shape[:-1]``, None = all valid.

    Uniform routing gives log E; a one-hot router gives 0.
    """
    lg = _t(logits).float()
    ent = torch.special.entr(lg.softmax(-1)).sum(-1)  # entr(0) = 0, so masked-out experts are fine
    if mask is not None:
        ent = ent[_t(mask).to(device=ent.device, dtype=torch.bool)]
    return _ratio(ent.double().sum(), ent.numel()) if ent.numel() else math.nan


# --------------------------------------------------------------------------------- OLMoE §5 (Eqs. 5–8)


def router_saturation(
    expert_ids_t: torch.Tensor,
    expert_ids_final: torch.Tensor,
    mask: torch.Tensor | None = None,
    k: int | None = None,
) -> float:
    """OLMoE Eq. 5: mean over valid tokens of |E_t ∩ E_T| / k, routing at checkpoint t vs the final one.

    Args:
        expert_ids_t, expert_ids_final: (N, S, K) routing of the same tokens by the two checkpoints.
        k: compare the first k choices of each (k = 1: first-choice agreement); None = all K.
    """
    a, b = _routing(expert_ids_t), _routing(expert_ids_final)
    if a.shape != b.shape:
        raise ValueError(f"routing shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    k = a.shape[-1] if k is None else k
    if not 1 <= k <= a.shape[-1]:
        raise ValueError(f"k must be in [1, K={a.shape[-1]}], got {k}")
    a, b = a[..., :k], b.to(a.device)[..., :k]
    overlap = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)  # (N, S): |E_t ∩ E_T|
    valid = _valid(mask, a)
    return _ratio(overlap[valid].sum(), int(valid.sum()) * k)


def expert_coactivation(expert_ids: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """OLMoE Eq. 6: CoAct(i, j) = N_ij / N_i, the share of tokens routed to i that are also routed to j.

    Convention: N_ij counts tokens whose top-K set contains both i and j, i.e. **all** C(K, 2) pairs of the
    set (the OLMoE paper's definition), not the adjacent-rank pairs (r, r+1) that OLMoE's released code
    counts. Rows are normalised by N_i (asymmetric matrix); the diagonal is 0; rows of experts that were
    never chosen are 0.

    Returns:
        Tensor[E, E] float32, row i = expert i's co-activation with every j.
    """
    ids = _routing(expert_ids)
    sel = ids[_valid(mask, ids)]  # (T, K)
    E, K = num_experts, sel.shape[-1]
    n_i = _bincount(sel.flatten(), E).double()
    off_diag = ~torch.eye(K, dtype=torch.bool, device=sel.device)
    pairs = (sel.unsqueeze(-1) * E + sel.unsqueeze(-2))[:, off_diag]  # ordered pairs (i, j), i != j
    n_ij = _bincount(pairs.flatten(), E * E).view(E, E).double()
    return (n_ij / n_i.clamp(min=1).unsqueeze(-1)).float()


def domain_specialization(
    expert_ids: torch.Tensor,
    domain_ids: torch.Tensor,
    num_experts: int,
    num_domains: int,
    mask: torch.Tensor | None = None,
    k: int | None = None,
) -> torch.Tensor:
    """OLMoE Eq. 7: share of a domain's tokens whose top-k includes expert e.

    Normalisation: by the number of *tokens* of the domain, so each row sums to k and uniform routing gives
    k/E (0.25 for Mixtral's 2 of 8). This is k times :func:`expert_load_per_domain` (Mixtral's per-assignment
    convention, uniform 1/E); say which one a plot shows.

    Args:
        k: use the first k choices (k = 1: OLMoE's top-1 variant); None = all K.

    Returns:
        Tensor[num_domains, E] float32; rows of domains without valid tokens are NaN.
    """
    ids = _routing(expert_ids)
    k = ids.shape[-1] if k is None else k
    if not 1 <= k <= ids.shape[-1]:
        raise ValueError(f"k must be in [1, K={ids.shape[-1]}], got {k}")
    valid = _valid(mask, ids)
    dom = _t(domain_ids).to(ids.device).long()[valid]  # (T,)
    sel = ids[..., :k][valid]  # (T, k)
    D, E = num_domains, num_experts
    _check_experts(sel, E)
    counts = _bincount((dom.unsqueeze(-1) * E + sel).flatten(), D * E, "domain/expert id").view(D, E)
    n_tokens = _bincount(dom, D, "domain id").double()
    return (counts.double() / n_tokens.unsqueeze(-1)).float()


def _token_expert_counts(
    ids: torch.Tensor, token_ids: Any, mask: Any, columns: slice, num_experts: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compact counts over valid tokens: sorted unique ids (V',), counts (V', E) under ``columns``, N_x (V',)."""
    valid = _valid(mask, ids)
    tok = _t(token_ids).to(ids.device).long()
    if tok.shape != valid.shape:
        raise ValueError(f"token_ids shape {tuple(tok.shape)} does not match routing shape {tuple(valid.shape)}")
    sel = ids[..., columns][valid]  # (T, C)
    e_seen = int(sel.max()) + 1 if sel.numel() else 1
    E = e_seen if num_experts is None else num_experts
    if e_seen > E:
        raise ValueError(f"expert id {e_seen - 1} out of range for num_experts={E}")
    uniq, inv = torch.unique(tok[valid], return_inverse=True)
    counts = torch.bincount((inv.unsqueeze(-1) * E + sel).flatten(), minlength=uniq.numel() * E)
    return uniq, counts.view(uniq.numel(), E), torch.bincount(inv, minlength=uniq.numel())


def vocabulary_specialization_per_token(
    expert_ids: torch.Tensor,
    token_ids: torch.Tensor,
    num_experts: int,
    mask: torch.Tensor | None = None,
    min_count: int = 1,
    choice: str = "first",
) -> tuple[torch.Tensor, torch.Tensor]:
    """OLMoE Eq. 8 table: VocabSpec(e, x) = N_{x,e} / N_x per token id x.

    N_x is the number of valid occurrences of x; N_{x,e} the number of those routed to e under ``choice``
    ("first" = OLMoE's default top-1; "any" = e in the top-K set, so a row sums to K; "second").

    Returns:
        ``(ids, table)``: ids LongTensor[V'] of token ids with N_x >= min_count (sorted), table
        Tensor[V', E] float32 of shares.
    """
    ids = _routing(expert_ids)
    uniq, counts, n_x = _token_expert_counts(ids, token_ids, mask, _col_slice(ids, choice), num_experts)
    keep = n_x >= min_count
    return uniq[keep], (counts[keep].double() / n_x[keep].unsqueeze(-1)).float()


def vocabulary_specialization(
    expert_ids: torch.Tensor,
    token_ids: torch.Tensor,
    num_experts: int,
    mask: torch.Tensor | None = None,
    min_count: int = 1,
    choice: str = "first",
) -> float:
    """OLMoE Eq. 8 summary: mean over token ids (with >= min_count occurrences) of max_e VocabSpec(e, x).

    1.0 means every token id always goes to one expert (a hash router). Random routing does not give 1/E: an id
    seen n times has its largest share of n random draws, so the floor depends on the token counts (uniform
    random routing over the embedded corpus's validation text, Mixtral tokenizer, E = 8: 0.24 with
    ``min_count=10``, at 32k tokens as at 205k). Read it against
    :func:`random_routing_baseline` on the same tokens. See :func:`vocabulary_specialization_per_token` for the
    table.
    """
    _, table = vocabulary_specialization_per_token(expert_ids, token_ids, num_experts, mask, min_count, choice)
    return float(table.double().max(-1).values.mean()) if table.shape[0] else math.nan


# ------------------------------------------------------------------ token-id predictability (hash vs learned)


def _rank_keys(counts: torch.Tensor, global_counts: torch.Tensor) -> torch.Tensor:
    """Sort keys per (row, expert): by count desc, ties -> lower expert id; zero counts -> global popularity."""
    E = counts.shape[-1]
    expert = torch.arange(E, device=counts.device)
    order = torch.sort(global_counts, descending=True, stable=True).indices  # ties -> lower id
    global_rank = torch.empty_like(order)
    global_rank[order] = expert
    seen_key = counts * (E + 1) + (E - expert)  # >= E + 1 whenever count > 0
    return torch.where(counts > 0, seen_key, E - global_rank)  # unseen in [1, E]


def best_token_expert_table(
    expert_ids: torch.Tensor,
    token_ids: torch.Tensor,
    vocab_size: int,
    mask: torch.Tensor | None = None,
    top_k: int = 1,
    num_experts: int | None = None,
) -> torch.Tensor:
    """The token-id -> experts table a "distilled hash" router reads: each id's most frequent experts.

    Counts use the first ``min(top_k, K)`` choices of each valid token (top_k = 1: first choice only;
    top_k = K: top-K set membership). Each row lists ``top_k`` distinct experts by count (ties -> lower
    expert id); slots an id's counts cannot fill, and all rows of unseen ids, take the globally most used
    experts (same counting, ties -> lower id).

    Args:
        vocab_size: V, rows of the table; token ids must be < V.
        num_experts: E; default = largest expert id seen + 1 (pass it when some experts may be unused).

    Returns:
        LongTensor[V, top_k].
    """
    ids = _routing(expert_ids)
    uniq, counts, _ = _token_expert_counts(ids, token_ids, mask, slice(0, min(top_k, ids.shape[-1])), num_experts)
    E = counts.shape[-1]
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    if uniq.numel() and int(uniq.max()) >= vocab_size:
        raise ValueError(f"token id {int(uniq.max())} >= vocab_size={vocab_size}")
    dense = torch.zeros(vocab_size, E, dtype=torch.int64, device=uniq.device)
    dense[uniq] = counts
    keys = _rank_keys(dense, dense.sum(0))
    return torch.sort(keys, dim=-1, descending=True).indices[:, :top_k].contiguous()


def token_id_predictability(
    expert_ids: torch.Tensor,
    token_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    held_out: tuple[torch.Tensor, ...] | None = None,
) -> float:
    """Accuracy of the best token-id -> first-expert table, i.e. how much of the routing a hash router explains.

    The table maps each token id to its most frequent first-choice expert (ties -> lower expert id). Without
    ``held_out`` it is fitted and scored on the same tokens: an upper bound, 1.0 for a hash router, and far
    above 1/E for routing that ignores the token id, because every id seen once is "predicted" perfectly and
    real text is Zipf-distributed (uniform random routing, E = 8, over the embedded corpus's validation text
    with the Mixtral tokenizer: 0.28 at 32k tokens, 0.21 at 205k). Read it against
    :func:`random_routing_baseline` on the same tokens, or held out:
    with ``held_out = (expert_ids, token_ids[, mask])`` it is fitted on the first set and scored on the second;
    unseen token ids get the globally most frequent first expert. Split the two sets by document
    (:func:`heldout_token_id_predictability`), never by window: a document cut into several windows would sit
    in both.
    """
    ids = _routing(expert_ids)
    uniq, counts, _ = _token_expert_counts(ids, token_ids, mask, slice(0, 1), None)
    if uniq.numel() == 0:
        return math.nan
    if held_out is None:
        return _ratio(counts.max(-1).values.sum(), counts.sum())
    best = _rank_keys(counts, counts.sum(0)).argmax(-1)  # (V',) most frequent first expert, ties -> lower id
    fallback = torch.sort(counts.sum(0), descending=True, stable=True).indices[0]
    h_ids = _routing(held_out[0]).to(uniq.device)
    h_mask = _valid(held_out[2] if len(held_out) > 2 else None, h_ids)
    h_tok = _t(held_out[1]).to(uniq.device).long()[h_mask]
    target = h_ids[..., 0][h_mask]
    pos = torch.searchsorted(uniq, h_tok).clamp(max=uniq.numel() - 1)
    seen = uniq[pos] == h_tok
    pred = torch.where(seen, best[pos], fallback)
    return _ratio((pred == target).sum(), target.numel())


def document_ids(doc_start: torch.Tensor) -> torch.Tensor:
    """(N, S) int64 index of the document of every token: documents are counted in reading order over the rows,
    which continue each other (consecutive windows cut from one packed stream, as the analysis loaders give them).
    Tokens before the first ``doc_start`` belong to document 0."""
    ds = _t(doc_start).to(dtype=torch.bool)
    if ds.dim() != 2:
        raise ValueError(f"doc_start must be (N, S), got shape {tuple(ds.shape)}")
    ids = ds.flatten().long().cumsum(0).view_as(ds)
    return (ids - int(ds.flatten()[0]) if ds.numel() else ids).clamp(min=0)


def document_halves(doc_start: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (N, S) bool masks that split the tokens by document: each document goes, whole, to one half at random
    (seeded; not by parity, which a router keyed on document ids would align with)."""
    docs = document_ids(doc_start)
    n_docs = int(docs.max()) + 1 if docs.numel() else 0
    g = torch.Generator().manual_seed(seed)
    first = (torch.rand(n_docs, generator=g) < 0.5).to(docs.device)[docs]
    return first, ~first


def heldout_token_id_predictability(
    expert_ids: torch.Tensor, token_ids: torch.Tensor, doc_start: torch.Tensor, mask: torch.Tensor | None = None,
    seed: int = 0,
) -> float:
    """:func:`token_id_predictability` fitted on one half of the documents and scored on the other
    (:func:`document_halves`): how well a fixed token-id table predicts the router on text it was not fitted on.
    Ids unseen in the fitting half get the most used expert, so even a hash router scores a little below 1."""
    ids = _routing(expert_ids)
    valid = _valid(mask, ids)
    fit, score = document_halves(_t(doc_start).to(ids.device), seed)
    return token_id_predictability(ids, token_ids, mask=fit & valid, held_out=(ids, token_ids, score & valid))


def random_routing(shape: Sequence[int], num_experts: int, top_k: int, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """(*shape, K) int64: K distinct experts per token, uniformly at random, independently per token."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    return torch.rand(*shape, num_experts, generator=generator).argsort(-1)[..., :top_k]


def random_routing_baseline(
    metric: Callable[[torch.Tensor], float], shape: Sequence[int], num_experts: int, top_k: int, draws: int = 4,
    seed: int = 0,
) -> float:
    """The value ``metric(expert_ids)`` takes when routing carries no information: its mean over ``draws``
    uniformly random routings (:func:`random_routing`) of the analysed tokens' ``shape``.

    A metric's floor depends on the tokens, not only on E: in-sample token-id predictability and vocabulary
    specialisation of random routing are far above 1/E on Zipf-distributed text. Example, on the same tokens as
    the router's number: ``random_routing_baseline(lambda e: token_id_predictability(e, token_ids),
    token_ids.shape, E, K)``.
    """
    g = torch.Generator().manual_seed(seed)
    return sum(float(metric(random_routing(shape, num_experts, top_k, g))) for _ in range(draws)) / draws


def middle_layer(n_layers: int) -> int:
    """The middle layer the Mixtral paper shows: (n_layers - 1) // 2, i.e. 15 of 32 (its Table 5 and Figure 7 use
    layers 0, 15 and 31)."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return (n_layers - 1) // 2


def paper_layers(n_layers: int) -> list[int]:
    """The first, middle (:func:`middle_layer`) and last layer, as the Mixtral paper's figures show them."""
    return sorted({0, middle_layer(n_layers), n_layers - 1})


# ------------------------------------------------------------------------------------------ span coherence


def span_coherence(
    expert_ids: torch.Tensor,
    span_start: torch.Tensor,
    mask: torch.Tensor | None = None,
    doc_start: torch.Tensor | None = None,
) -> dict[str, float]:
    """How consistently the pieces of a multi-token span (e.g. a word) are routed together.

    A span starts where ``span_start`` is True (and at position 0 of every row, and at every ``doc_start``)
    and runs to the next start. Only its valid tokens count as pieces; a span is *multi-token* when it has
    >= 2 valid pieces.

    Returns:
        ``first``: share of multi-token spans whose pieces all share the first-choice expert.
        ``all``: share of multi-token spans whose pieces all have the same top-K *set* (order ignored).
        ``pairs_within``: first-choice repeat rate of consecutive valid pairs (t, t+1) inside a span.
        ``pairs_across``: the same over pairs where t+1 starts a new span (cross-document pairs excluded).
        NaN where there is nothing to count.
    """
    ids = _routing(expert_ids)
    valid = _valid(mask, ids)
    starts = _t(span_start).to(device=ids.device, dtype=torch.bool).clone()
    if starts.shape != valid.shape:
        raise ValueError(f"span_start shape {tuple(starts.shape)} does not match routing shape {tuple(valid.shape)}")
    if doc_start is not None:
        starts |= _t(doc_start).to(device=ids.device, dtype=torch.bool)
    if starts.numel():
        starts[:, 0] = True

    # pair rates
    pairs = _pair_mask(valid, doc_start)
    same_first = ids[:, :-1, 0] == ids[:, 1:, 0]
    within, across = pairs & ~starts[:, 1:], pairs & starts[:, 1:]
    out = {
        "pairs_within": _ratio((same_first & within).sum(), within.sum()),
        "pairs_across": _ratio((same_first & across).sum(), across.sum()),
    }

    # span-level agreement: a token agrees with its span iff min == max of each column over the span
    span_id = starts.flatten().cumsum(0).view_as(starts) - 1  # global span index, (N, S)
    sid = span_id[valid]
    n_spans = int(span_id.max()) + 1 if span_id.numel() else 0
    sets = ids.sort(-1).values[valid]  # (T, K) the top-K set, order ignored
    cols = torch.cat([ids[..., :1][valid], sets], dim=-1)  # (T, 1 + K): first choice, then sorted set
    pieces = torch.bincount(sid, minlength=n_spans)
    idx = sid.unsqueeze(-1).expand_as(cols)
    big = torch.iinfo(torch.int64).max
    lo = torch.full((n_spans, cols.shape[-1]), big, dtype=torch.int64, device=ids.device).scatter_reduce(
        0, idx, cols, "amin"
    )
    hi = torch.full((n_spans, cols.shape[-1]), -1, dtype=torch.int64, device=ids.device).scatter_reduce(
        0, idx, cols, "amax"
    )
    agree = lo == hi  # (n_spans, 1 + K)
    multi = pieces >= 2
    n_multi = int(multi.sum())
    out["first"] = _ratio((agree[:, 0] & multi).sum(), n_multi)
    out["all"] = _ratio((agree[:, 1:].all(-1) & multi).sum(), n_multi)
    return {k: out[k] for k in ("first", "all", "pairs_within", "pairs_across")}
