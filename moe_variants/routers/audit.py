"""Look-ahead audit: a router's decision at position t (and the model's output there) may use only tokens <= t.

The audit builds a small model with the router in every layer and compares forwards that share the tokens up to t,
at every length up to the model's ``max_seq_len``, in training and in evaluation mode, for several seeds (each seed
its own weights, sequences and cut points). Four checks:

=========  ======================================================================================  ====="""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moe_variants.model.args import ModelArgs
from moe_variants.model.routing import RouterFactory
from moe_variants.model.transformer import ModelOutput, Transformer
from moe_variants.routers import spans
from moe_variants.routers.resources import RoutingResources, bind_resources

HEAD_OUTPUTS = 4  # width of the audit model's LM head (module docstring)
ATOL, RTOL = 1e-5, 1e-4  # float tolerance of weights, logits and outputs
NEAR_TIE = 1e-4  # router logits closer than this: which expert wins is float noise
TOP_FREQUENT = 16  # the most frequent ids forced at t+1 by the suffix check
CHECKS = ("suffix", "prefix", "vocab", "decode")

AUDIT_ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=512, num_experts=8,
                  num_experts_per_tok=2, max_seq_len=128)
"""A tiny model over a 512-id vocabulary, for tests that need a small model (the router tests build theirs)."""

AUDIT_MODEL = dict(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=32, vocab_size=32000, num_experts=8,
                   num_experts_per_tok=2, max_seq_len=256)
"""The model ``moe-audit`` audits routers in: Mixtral's vocabulary, E and K, two layers (so that a router's
second layer sees hidden states mixed by attention), tiny widths (the audit costs seconds on a CPU)."""


# -- inputs -------------------------------------------------------------------------------------------------------
@dataclass
class AuditInputs:
    """What the audit feeds the model besides the router.

    Attributes:
        word_start_table: (V,) bool, True for pieces that open a word (``spans.WORD`` pieces: they carry the
            tokenizer's word marker); derived from the resources' piece kinds, for cheating routers in tests.
        token_counts: (V,) float64 corpus count of every id: sequences drawn with these frequencies put frequent
            ids (newline, '.', ',') where a router may peek, and the most frequent ids are forced at t+1.
        windows: (N, S') int64 real token windows (e.g. the corpus's validation split), or None.
        span_start: span-start flags passed to the forward, ``(B, S) ids -> (B, S) bool``; None: routers compute
            their own spans from the token ids (the data side provides none).
        resources: what routers read when they are built (corpus statistics, ``routers.resources``).
        source: where the inputs come from, for the report.
        notes: what the inputs lack and why (printed with the result).
    """

    word_start_table: torch.Tensor
    token_counts: torch.Tensor
    windows: torch.Tensor | None = None
    span_start: Callable[[torch.Tensor], torch.Tensor] | None = None
    resources: Any = None
    source: str = "synthetic"
    notes: list[str] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return self.word_start_table.numel()


def zipf_counts(vocab_size: int, seed: int = 0, tokens: int = 400_000, exponent: float = 1.1) -> torch.Tensor:
    """(V,) float64 counts of a Zipf law in a corpus of ``tokens`` tokens, over a random permutation of the ids
    (frequent ids anywhere in the range; with V = 32000 most ids occur fewer than 5 times, as in real text)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.arange(1, vocab_size + 1).double() ** -exponent
    counts = torch.empty(vocab_size, dtype=torch.float64)
    counts[torch.randperm(vocab_size, generator=g)] = (tokens * p / p.sum()).floor()
    return counts


def synthetic_inputs(vocab_size: int, seed: int = 0, kinds: torch.Tensor | None = None) -> AuditInputs:
    """Inputs without a corpus: random piece kinds (unless given; about 2.5 pieces per word, some punctuation), Zipf
    counts, and routing resources computed from a corpus drawn with those counts."""
    g = torch.Generator().manual_seed(seed)
    if kinds is None:
        kinds = torch.where(torch.rand(vocab_size, generator=g) < 0.4, spans.WORD, spans.CONT).to(torch.int8)
        kinds[torch.rand(vocab_size, generator=g) < 0.1] = spans.PUNCT
    counts = zipf_counts(vocab_size, seed)
    corpus = torch.multinomial(counts, 64 * 128, replacement=True, generator=g).view(64, 128)
    resources = RoutingResources(lambda: [corpus], kinds, "synthetic-audit")
    return AuditInputs(kinds == spans.WORD, counts, resources=resources, source="synthetic")


# -- result ---------------------------------------------------------------------------------------------------------
@dataclass
class CheckRun:
    """One check in one mode for one seed: how many (row, position) pairs it compared, what differed."""

    check: str
    mode: str
    seed: int
    compared: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.check} ({self.mode}, seed {self.seed})"


@dataclass
class AuditResult:
    runs: list[CheckRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def violations(self) -> list[str]:
        return [f"{r.label}: {v}" for r in self.runs for v in r.violations]

    @property
    def passed(self) -> bool:
        return bool(self.runs) and not self.violations

    @property
    def trials(self) -> int:
        """(row, position) pairs compared over all checks."""
        return sum(r.compared for r in self.runs)

    def summary(self) -> str:
        lines = []
        for check in CHECKS:
            runs = [r for r in self.runs if r.check == check]
            if runs:
                bad = sum(len(r.violations) for r in runs)
                modes = "/".join(dict.fromkeys(r.mode for r in runs))
                lines.append(f"  {check:7s} {modes:10s} {len(runs)} run(s), {sum(r.compared for r in runs):>9,d} "
                             f"positions compared: " + ("ok" if not bad else f"{bad} violation(s)"))
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


# -- forwards and comparisons ---------------------------------------------------------------------------------------
@dataclass
class Decisions:
    """Per layer expert ids (R, S, K), weights (R, S, K), router logits (R, S, E) or None; outputs (R, S, 4)."""

    expert_ids: list[torch.Tensor]
    weights: list[torch.Tensor]
    logits: list[torch.Tensor | None]
    outputs: torch.Tensor

    @classmethod
    def of(cls, out: ModelOutput) -> Decisions:
        return cls([r.expert_ids for r in out.routing], [r.weights.float() for r in out.routing],
                   [None if r.logits is None else r.logits.float() for r in out.routing], out.logits.float())

    @classmethod
    def cat(cls, parts: list[Decisions]) -> Decisions:
        n = len(parts[0].expert_ids)
        return cls([torch.cat([p.expert_ids[i] for p in parts], 1) for i in range(n)],
                   [torch.cat([p.weights[i] for p in parts], 1) for i in range(n)],
                   [None if parts[0].logits[i] is None else torch.cat([p.logits[i] for p in parts], 1)
                    for i in range(n)],
                   torch.cat([p.outputs for p in parts], 1))

    def rows(self, index: torch.Tensor) -> Decisions:
        return Decisions([x[index] for x in self.expert_ids], [x[index] for x in self.weights],
                         [None if x is None else x[index] for x in self.logits], self.outputs[index])


def forward(model: Transformer, ids: torch.Tensor, span_start: Callable | None, rng_seed: int) -> Decisions:
    """One forward from a fixed RNG state (a stochastic router draws the same noise for the same shapes)."""
    torch.manual_seed(rng_seed)
    if span_start is not None:
        raise ValueError("the model computes span starts from the token ids itself: pass span_start=None")
    return Decisions.of(model(ids))


def _close(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(R, S) True where the last dims agree within tolerance (NaNs agree with NaNs)."""
    return torch.isclose(a, b, atol=ATOL, rtol=RTOL, equal_nan=True).all(-1)


def _near_tie(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(R, S) True where two of the top K+1 router logits are within NEAR_TIE of each other."""
    top = logits.topk(min(k + 1, logits.shape[-1]), dim=-1).values
    if top.shape[-1] < 2:  # a single expert: nothing to tie with
        return torch.zeros(top.shape[:-1], dtype=torch.bool)
    return (top[..., :-1] - top[..., 1:]).min(-1).values < NEAR_TIE


def compare(a: Decisions, b: Decisions, upto: torch.Tensor, describe: Callable[[int, int], str]
            ) -> tuple[int, list[str]]:
    """Compare two forwards' decisions at positions ``<= upto[r]`` of every row r (same R and S).

    Returns (positions compared, violation messages). ``describe(row, position)`` says where a difference is.
    """
    R, S = a.outputs.shape[:2]
    pos = torch.arange(S)
    live = pos[None, :] <= upto[:, None]  # (R, S)
    # a changed choice between near-equal unchanged logits is float noise: compare that row only before it
    limit = torch.full((R,), S)
    for ids_a, ids_b, lg_a, lg_b in zip(a.expert_ids, b.expert_ids, a.logits, b.logits):
        if lg_a is None or lg_b is None:
            continue
        flip = (ids_a != ids_b).any(-1) & _close(lg_a, lg_b) & _near_tie(lg_a, ids_a.shape[-1]) & live
        first = torch.where(flip, pos[None, :], S).min(1).values
        limit = torch.minimum(limit, first)
    live &= pos[None, :] < limit[:, None]
    messages = []
    layers = list(zip(a.expert_ids, b.expert_ids, a.weights, b.weights, a.logits, b.logits))
    for i, (ids_a, ids_b, w_a, w_b, lg_a, lg_b) in enumerate(layers):
        for what, bad in (
            ("expert ids", (ids_a != ids_b).any(-1)),
            ("combine weights", ~_close(w_a, w_b)),
            ("router logits", torch.zeros_like(live) if lg_a is None or lg_b is None else ~_close(lg_a, lg_b)),
        ):
            messages += _report(bad & live, f"layer {i} {what}", describe)
    messages += _report(~_close(a.outputs, b.outputs) & live, "model outputs", describe)
    return int(live.sum()), messages


def _report(bad: torch.Tensor, what: str, describe: Callable[[int, int], str]) -> list[str]:
    if not bad.any():
        return []
    r, p = (int(x) for x in bad.nonzero()[0])
    return [f"{what} differ at {int(bad.sum())} position(s), first at {describe(r, p)}"]


# -- the checks -----------------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    """Everything one (mode, seed) unit of the audit needs."""

    model: Transformer
    inputs: AuditInputs
    seed: int
    stochastic: bool
    base: torch.Tensor  # (B, S) base sequences
    base_labels: list[str]
    g: torch.Generator


def base_sequences(inputs: AuditInputs, S: int, g: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """(4, S) base sequences: two real windows (else frequency draws), uniform ids over 0..V-1, a frequency draw."""
    V = inputs.vocab_size
    rows, labels = [], []
    windows = inputs.windows
    if windows is not None and len(windows) and windows.shape[1] >= S:
        for i in torch.randperm(len(windows), generator=g)[:2].tolist():
            rows.append(windows[i, :S])
            labels.append(f"real window {i}")
    while len(rows) < 3:
        rows.append(torch.multinomial(inputs.token_counts, S, replacement=True, generator=g))
        labels.append("ids drawn with corpus frequencies")
    rows.insert(2, torch.randint(0, V, (S,), generator=g))
    labels.insert(2, "uniform ids over the vocabulary")
    return torch.stack(rows).long(), labels


def cut_points(S: int, g: torch.Generator, n: int = 6) -> list[int]:
    """``n`` cut points t in [0, S-2]: the ends, one before and one from position 64 on, the rest anywhere."""
    last = S - 2
    if last < 0:
        return []
    picks = {0, last}
    early, late = min(64, last), last
    picks.add(int(torch.randint(0, early + 1, (1,), generator=g)))
    if late > 64:
        picks.add(int(torch.randint(64, late + 1, (1,), generator=g)))
    while len(picks) < min(n, last + 1):
        picks.add(int(torch.randint(0, last + 1, (1,), generator=g)))
    return sorted(picks)


def suffix_check(s: _Setup, run: CheckRun) -> None:
    """Replace everything after t in four ways (module docstring) and compare positions <= t."""
    B, S = s.base.shape
    V, counts, windows = s.inputs.vocab_size, s.inputs.token_counts, s.inputs.windows
    frequent = counts.topk(min(TOP_FREQUENT, V)).indices
    rows, base_of, upto, what = [], [], [], []
    for b in range(B):
        for j, t in enumerate(cut_points(S, s.g)):
            n = S - t - 1
            draw = torch.multinomial(counts, n, replacement=True, generator=s.g)
            forced = draw.clone()
            forced[0] = frequent[(b + j) % len(frequent)]
            if windows is not None and len(windows) and windows.shape[1] >= S:
                other = int(torch.randint(0, len(windows), (1,), generator=s.g))
                text, text_label = windows[other, t + 1 : S], f"the tokens of real window {other}"
            else:
                text, text_label = torch.multinomial(counts, n, replacement=True, generator=s.g), "a frequency draw"
            for suffix, label in ((torch.randint(0, V, (n,), generator=s.g), "uniform ids"),
                                  (draw, "ids drawn with corpus frequencies"), (text, text_label),
                                  (forced, f"a frequency draw with id {int(forced[0])} at t+1")):
                row = s.base[b].clone()
                row[t + 1 :] = suffix
                rows.append(row)
                base_of.append(b)
                upto.append(t)
                what.append(f"{s.base_labels[b]}, tokens after t={t} replaced by {label}")
    pert = torch.stack(rows)
    index = torch.tensor(base_of)
    rng = s.seed * 7919 + 1
    got = forward(s.model, pert, s.inputs.span_start, rng)
    if s.stochastic:  # the same noise row by row: the base rows in a batch of the same shape, same RNG state
        ref = forward(s.model, s.base[index], s.inputs.span_start, rng)
    else:
        ref = forward(s.model, s.base, s.inputs.span_start, rng).rows(index)
    run.compared, run.violations = compare(ref, got, torch.tensor(upto),
                                           lambda r, p: f"position {p} ({what[r]})")


def prefix_check(s: _Setup, run: CheckRun, n: int = 3) -> None:
    """Run the prefixes ``ids[:, :t+1]`` alone and compare them with the full forward."""
    B, S = s.base.shape
    full = forward(s.model, s.base, s.inputs.span_start, s.seed)
    cuts = cut_points(S, s.g, n)
    for t in cuts:
        prefix = forward(s.model, s.base[:, : t + 1], s.inputs.span_start, s.seed)
        compared, bad = compare(_slice(full, t + 1), prefix, torch.full((B,), t),
                                lambda r, p, t=t: f"position {p} ({s.base_labels[r]}, prefix of {t + 1} tokens)")
        run.compared += compared
        run.violations += bad


def _slice(d: Decisions, length: int) -> Decisions:
    return Decisions([x[:, :length] for x in d.expert_ids], [x[:, :length] for x in d.weights],
                     [None if x is None else x[:, :length] for x in d.logits], d.outputs[:, :length])


def vocab_check(s: _Setup, run: CheckRun, t: int = 1) -> None:
    """Token t+1 after a fixed prefix takes every id of the vocabulary; decisions at <= t must all agree."""
    V = s.inputs.vocab_size
    t = min(t, s.base.shape[1] - 2)
    rows = s.base[:1, : t + 2].repeat(V, 1)  # (V, t+2)
    rows[:, t + 1] = torch.arange(V)
    rng = s.seed * 7919 + 2
    got = forward(s.model, rows, s.inputs.span_start, rng)
    if s.stochastic:
        ref = forward(s.model, s.base[:1, : t + 2].repeat(V, 1), s.inputs.span_start, rng)
    else:
        ref = got.rows(torch.zeros(V, dtype=torch.long))  # every row against row 0 (id 0 at t+1)
    run.compared, run.violations = compare(ref, got, torch.full((V,), t),
                                           lambda r, p: f"position {p} with id {r} at t+1={t + 1} "
                                                        f"({s.base_labels[0]})")


def decode_chunks(S: int, g: torch.Generator, token_by_token: bool) -> list[int]:
    """Chunk sizes summing to S: all 1 (token by token), or a random prompt followed by random chunks of 1..16."""
    if token_by_token:
        return [1] * S
    sizes = [int(torch.randint(1, max(2, S // 2), (1,), generator=g))]
    while sum(sizes) < S:
        sizes.append(min(int(torch.randint(1, 17, (1,), generator=g)), S - sum(sizes)))
    return sizes


def decode_check(s: _Setup, run: CheckRun, token_by_token: bool) -> None:
    """Decode every position with the KV cache and compare with full forwards (without and with data-side spans)."""
    B, S = s.base.shape
    cache, parts, start = s.model.new_cache(), [], 0
    for size in decode_chunks(S, s.g, token_by_token):
        torch.manual_seed(s.seed)
        parts.append(Decisions.of(s.model(s.base[:, start : start + size], cache=cache)))
        start += size
    decoded = Decisions.cat(parts)
    how = "token by token" if token_by_token else "in chunks"
    fulls = [("full forward", None)]
    if s.inputs.span_start is not None:
        fulls.append(("full forward with the data side's span starts", s.inputs.span_start))
    for label, span_start in fulls:
        full = forward(s.model, s.base, span_start, s.seed)
        where = lambda r, p, label=label: f"position {p} ({s.base_labels[r]}, decoded {how} vs {label})"  # noqa: E731
        compared, bad = compare(full, decoded, torch.full((B,), S - 1), where)
        run.compared += compared
        run.violations += bad


def is_stochastic(model: Transformer, base: torch.Tensor, span_start: Callable | None, seed: int) -> bool:
    """Whether two forwards of the same ids from different RNG states route differently."""
    a, b = forward(model, base, span_start, seed), forward(model, base, span_start, seed + 1)
    n, bad = compare(a, b, torch.full((base.shape[0],), base.shape[1] - 1), lambda r, p: "")
    return bool(bad)


# -- the audit -------------------------------------------------------------------------------------------------------
def audit_model_for(router: RouterFactory, args: ModelArgs, inputs: AuditInputs, seed: int) -> Transformer:
    """The audited model: ``router`` in every layer, weights from ``seed``, a 4-wide LM head (module docstring).

    The one place that knows how routers receive the tokenizer's piece kinds and corpus statistics.
    """
    torch.manual_seed(seed)
    model = Transformer(args, router=bind_resources(router, inputs.resources))
    model.output = nn.Linear(args.dim, HEAD_OUTPUTS, bias=False)
    nn.init.normal_(model.output.weight, std=1.0)
    return model


@torch.no_grad()
def audit(router: RouterFactory, args: ModelArgs, inputs: AuditInputs, seeds: int = 2,
          fail_fast: bool = False) -> AuditResult:
    """Audit ``router`` with every check of the module docstring over ``seeds`` seeds.

    ``fail_fast`` stops at the first check that finds a violation (the tests of routers that must fail).
    """
    if inputs.vocab_size != args.vocab_size:
        raise ValueError(f"the audit inputs have a vocabulary of {inputs.vocab_size} ids but the model "
                         f"{args.vocab_size}: build the inputs with the model's tokenizer")
    if args.max_seq_len < 2:
        raise ValueError(f"the audit needs max_seq_len >= 2, got {args.max_seq_len}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops: one thread spares a fork-join per op (10x faster on a busy 2-core CPU)
    try:
        return _audit(router, args, inputs, seeds, fail_fast)
    finally:
        torch.set_num_threads(threads)


def _audit(router: RouterFactory, args: ModelArgs, inputs: AuditInputs, seeds: int, fail_fast: bool) -> AuditResult:
    result = AuditResult(notes=list(inputs.notes))
    for seed in range(seeds):
        model = audit_model_for(router, args, inputs, seed)
        g = torch.Generator().manual_seed(1000 + seed)
        base, labels = base_sequences(inputs, args.max_seq_len, g)
        if is_stochastic(model.eval(), base, inputs.span_start, seed):
            result.runs.append(CheckRun("suffix", "eval", seed, violations=[
                "routing differs between two forwards of the same ids in evaluation mode: the router cannot be "
                "audited (and generation with it is not reproducible)"]))
            return result
        for mode in ("train", "eval"):
            model.train(mode == "train")
            stochastic = mode == "train" and is_stochastic(model, base, inputs.span_start, seed)
            s = _Setup(model, inputs, seed, stochastic, base, labels, g)
            steps: list[tuple[str, Callable[[CheckRun], None]]] = [("suffix", lambda r: suffix_check(s, r))]
            if stochastic:
                _note(result, "training mode: the router is stochastic; the prefix check (which cannot align its "
                              "noise) is skipped there, the suffix and vocab checks compare aligned noise")
            else:
                steps.append(("prefix", lambda r: prefix_check(s, r)))
            if seed == 0:  # one vocabulary sweep per mode (V rows)
                steps.append(("vocab", lambda r: vocab_check(s, r)))
            if mode == "eval":
                steps.append(("decode", lambda r: decode_check(s, r, token_by_token=seed == 0)))
            for check, fn in steps:
                run = CheckRun(check, mode, seed)
                fn(run)
                result.runs.append(run)
                if fail_fast and run.violations:
                    return result
    return result


def _note(result: AuditResult, text: str) -> None:
    if text not in result.notes:
        result.notes.append(text)


def audit_router(router: RouterFactory, args: ModelArgs, inputs: AuditInputs | None = None, seeds: int = 2,
                 fail_fast: bool = False) -> AuditResult:
    """:func:`audit` with synthetic inputs when none are given (a random word-start table, Zipf counts)."""
    return audit(router, args, inputs or synthetic_inputs(args.vocab_size), seeds, fail_fast)
