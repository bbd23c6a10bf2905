"""The look-ahead audit: every causal router config passes, every cheat fails.

Router configs are every ``conf/router/*.yaml``, composed by Hydra as ``moe-audit`` composes them, so a new router
is audited with no new test code; a config that refuses to build without ``router.allow_lookahead=true`` is
non-causal and must fail once allowed. The seven cheats (``cheating_routers``) each route position t by token t+1
under one condition. Inputs: the Mixtral tokenizer and, when built under the data root, the corpus's validation
windows (without the corpus the audit runs on uniform and Zipf-drawn ids and says so).
"""

from __future__ import annotations

from functools import partial

import cheating_routers as cheats
import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moe_variants import ModelArgs, paths
from moe_variants.model.routing import LayerSpec, Router, RouterOutput
from moe_variants.routers.audit import AUDIT_MODEL, Decisions, audit, audit_model_for, compare
from moe_variants.training.audit import corpus_inputs, main

ROUTER_CONFIGS = sorted(p.stem for p in (CONF_DIR / "router").glob("*.yaml"))
ARGS = ModelArgs(**AUDIT_MODEL)


@pytest.fixture(scope="module")
def inputs():
    return corpus_inputs("mixtral", str(paths.corpus_dir()), ARGS.max_seq_len, 4)  # as moe-audit: cached once


def router_factory(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return instantiate(compose("audit", overrides=list(overrides)).router)


def refuses_to_build(factory, inputs) -> bool:
    try:
        audit_model_for(factory, ARGS, inputs, seed=0)
    except ValueError as e:
        assert "allow_lookahead=true" in str(e)
        return True
    return False


def noncausal_configs() -> list[list[str]]:
    """Configs that refuse to build without the look-ahead flag; span's whole_word while it is a span variant."""
    out = []
    for name in ROUTER_CONFIGS:
        try:
            router_factory(f"router={name}")(LayerSpec(dim=8, num_experts=8, top_k=2, vocab_size=64, n_layers=1,
                                                       layer_idx=0))
        except ValueError as e:
            if "allow_lookahead" in str(e):
                out.append([f"router={name}"])
        except Exception:  # noqa: BLE001 - needs resources or a table file: a causal config, audited below
            pass
    span = CONF_DIR / "router" / "span.yaml"
    if span.is_file() and "decision" in OmegaConf.load(span):
        out.append(["router=span", "router.decision=whole_word"])
    return out


@pytest.mark.parametrize("name", ROUTER_CONFIGS)
def test_every_causal_router_config_passes(name, inputs):
    factory = router_factory(f"router={name}")
    if refuses_to_build(factory, inputs):
        pytest.skip(f"{name} is non-causal: test_noncausal_router_configs_fail audits it")
    result = audit(factory, ARGS, inputs)
    assert result.passed, result.violations[:5]
    assert {r.check for r in result.runs} == {"suffix", "prefix", "vocab", "decode"}
    assert {r.mode for r in result.runs} == {"train", "eval"} and {r.seed for r in result.runs} == {0, 1}


def variant_overrides() -> dict[str, list[str]]:
    """The router variants of the contract tests (``test_routers.VARIANTS``) as Hydra overrides."""
    from test_routers import VARIANTS

    return {name: [f"router={cfg}", *(f"router.{k}={v}" for k, v in kw.items())]
            for name, (cfg, kw) in VARIANTS.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(variant_overrides()))
def test_every_causal_router_variant_passes(name, inputs):
    result = audit(router_factory(*variant_overrides()[name]), ARGS, inputs)
    assert result.passed, result.violations[:5]


@pytest.mark.parametrize("overrides", noncausal_configs(), ids=" ".join)
def test_noncausal_router_configs_fail(overrides, inputs):
    assert refuses_to_build(router_factory(*overrides), inputs)
    result = audit(router_factory(*overrides, "router.allow_lookahead=true"), ARGS, inputs, fail_fast=True)
    assert not result.passed


CHEATS = {
    "always": lambda inp: cheats.CheatAlways,
    "at word ends": lambda inp: partial(cheats.CheatAtWordEnds, word_start_table=inp.word_start_table),
    "only in training": lambda inp: cheats.CheatInTraining,
    "only for ids rarer than 5": lambda inp: partial(cheats.CheatOnRareIds, counts=inp.token_counts),
    "only before newline . ,": lambda inp: cheats.CheatOnNewlinePeriodComma,
    "only for 3 ids in 0..511": lambda inp: cheats.CheatOnThreeIds,
    "only from position 64": lambda inp: cheats.CheatFromPosition64,
}


@pytest.mark.parametrize("cheat", list(CHEATS))
def test_every_cheating_router_fails(cheat, inputs):
    result = audit(CHEATS[cheat](inputs), ARGS, inputs, fail_fast=True)
    assert not result.passed
    assert any("expert ids differ" in v for v in result.violations)


def test_audit_command(capsys):
    assert main(["router=hash", "router.table=bigram", "seeds=1"]) == 0
    assert "PASS router=hash router.table=bigram" in capsys.readouterr().out
    if noncausal_configs():
        overrides = noncausal_configs()[0]
        assert main([*overrides, "seeds=1"]) == 2  # refuses to build without the flag
        assert main([*overrides, "router.allow_lookahead=true", "seeds=1", "fail_fast=true"]) == 1
        out = capsys.readouterr().out
        assert "FAIL" in out and "look-ahead" in out


def test_inputs_are_real_validation_windows(inputs):
    if inputs.windows is None:
        pytest.skip(f"no corpus under {paths.corpus_dir()}: {inputs.notes}")
    assert inputs.windows.shape[1] == ARGS.max_seq_len and len(inputs.windows) >= 7  # >= 1 window per domain
    assert (inputs.windows[:, 0] == 1).sum() >= 7  # each domain's first window opens with a document's BOS
    newline, period, comma = cheats.MIXTRAL_NEWLINE_PERIOD_COMMA
    top = set(inputs.token_counts.topk(16).indices.tolist())
    assert {newline, period, comma} <= top  # the suffix check forces these at t+1
    assert int((inputs.token_counts < 5).sum()) > 10_000  # rare ids exist, and uniform ids reach them
    assert inputs.span_start is None  # span routers compute their spans from the ids: no data-side flags


def test_stochastic_training_routing_is_audited_with_aligned_noise(inputs):
    result = audit(router_factory("router=topk", "router.jitter_eps=0.1"), ARGS, inputs, seeds=1)
    assert result.passed, result.violations[:3]
    assert {(r.check, r.mode) for r in result.runs} >= {("suffix", "train"), ("vocab", "train")}
    assert ("prefix", "train") not in {(r.check, r.mode) for r in result.runs}
    assert any("stochastic" in n for n in result.notes)


class RandomInEval(Router):
    def forward(self, x, ctx):
        ids = torch.rand(*x.shape[:2], self.num_experts).argsort(-1)[..., : self.top_k]
        return RouterOutput(expert_ids=ids, weights=torch.full(ids.shape, 1.0 / self.top_k))


def test_router_random_in_evaluation_mode_fails(inputs):
    result = audit(RandomInEval, ARGS, inputs)
    assert not result.passed and "cannot be audited" in result.violations[0]


def test_compare_excuses_only_near_ties_of_unchanged_logits():
    """A changed choice between near-equal, unchanged logits is float noise; any other change is a violation."""
    logits = torch.tensor([[[3.0, 1.0, 1.0 + 1e-6, 0.0], [3.0, 2.0, 1.0, 0.0]]])  # (1, 2, 4); position 0 ties
    ids = torch.tensor([[[0, 2], [0, 1]]])
    weights = torch.full((1, 2, 2), 0.5)

    def decisions(ids, logits):
        return Decisions([ids], [weights], [logits], torch.zeros(1, 2, 4))

    upto = torch.tensor([1])
    flipped_tie = ids.clone()
    flipped_tie[0, 0, 1] = 1
    n, bad = compare(decisions(ids, logits), decisions(flipped_tie, logits), upto, lambda r, p: f"{p}")
    assert not bad and n == 0  # excused at position 0; the rest of the row is not compared
    flipped = ids.clone()
    flipped[0, 1, 1] = 2  # no tie at position 1
    n, bad = compare(decisions(ids, logits), decisions(flipped, logits), upto, lambda r, p: f"{p}")
    assert n == 2 and bad == ["layer 0 expert ids differ at 1 position(s), first at 1"]
    moved = logits.clone()
    moved[0, 0, 1] += 0.5  # the logits changed: not float noise
    _, bad = compare(decisions(ids, logits), decisions(flipped_tie, moved), upto, lambda r, p: f"{p}")
    assert any("expert ids" in b for b in bad) and any("router logits" in b for b in bad)
