"""Look-ahead audit: a router's decision (and the model's logits) at position t may use only tokens <= t.

For many random t, change every token after t and check that routing (expert ids and weights, every layer)
and logits at positions <= t are unchanged. Run it on any router config:

    moe-audit router=span_prefix
    moe-audit router=span_whole_word router.allow_lookahead=true   # fails: it looks ahead
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from moe_variants.model.args import ModelArgs
from moe_variants.model.routing import RouterFactory
from moe_variants.model.transformer import Transformer
from moe_variants.paths import CONF_DIR
from moe_variants.routers.resources import bind_resources, synthetic_resources


@dataclass
class AuditResult:
    trials: int
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations


@torch.no_grad()
def audit_model(model: Transformer, batch: int = 2, seq_len: int = 48, trials: int = 16, seed: int = 0) -> AuditResult:
    """Check that outputs at positions <= t do not depend on tokens after t, for ``trials`` random t."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    V = model.args.vocab_size
    ids = torch.randint(0, V, (batch, seq_len), generator=g)
    base = model(ids)
    result = AuditResult(trials=trials)
    for t in torch.randint(0, seq_len - 1, (trials,), generator=g).tolist():
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, V, (batch, seq_len - t - 1), generator=g)
        out = model(changed)
        if not torch.allclose(out.logits[:, : t + 1], base.logits[:, : t + 1], atol=1e-5, rtol=1e-4):
            result.violations.append(f"t={t}: logits at <= t changed")
        for i, (r0, r1) in enumerate(zip(base.routing, out.routing)):
            if not torch.equal(r0.expert_ids[:, : t + 1], r1.expert_ids[:, : t + 1]):
                result.violations.append(f"t={t} layer {i}: expert ids at <= t changed")
            elif not torch.allclose(r0.weights[:, : t + 1], r1.weights[:, : t + 1], atol=1e-5):
                result.violations.append(f"t={t} layer {i}: weights at <= t changed")
    return result


def audit_router(router: RouterFactory, args: ModelArgs, trials: int = 16, seed: int = 0) -> AuditResult:
    """Build a model with ``router`` in every layer (synthetic word table and corpus) and audit it."""
    torch.manual_seed(seed)
    model = Transformer(args, router=bind_resources(router, synthetic_resources(args.vocab_size, seed)))
    return audit_model(model, trials=trials, seed=seed)


AUDIT_ARGS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=512, num_experts=8,
                  num_experts_per_tok=2, max_seq_len=128)


def main(argv: list[str] | None = None) -> int:
    """``moe-audit [hydra overrides]``: audit the router config selected by the overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = sys.argv[1:] if argv is None else argv
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="audit", overrides=overrides)
    router = instantiate(cfg.router)
    result = audit_router(router, ModelArgs(**AUDIT_ARGS))
    label = " ".join(overrides) or "router=<default>"
    if result.passed:
        print(f"PASS {label}: {result.trials} random cut points, no look-ahead in routing or logits")
        return 0
    print(f"FAIL {label}: {len(result.violations)} look-ahead violations, e.g.")
    for v in result.violations[:5]:
        print("  ", v)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
