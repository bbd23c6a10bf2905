"""Router study v2 (experiments/router_study/): the paired interval against hand-computed numbers, the driver's job
plan (tuning grid, grid order, dependencies), the choice of settings from tuning runs, the configs, and a CPU smoke
run of the whole pipeline (tune -> choose -> grid -> analyse)."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONF_DIR, REPO_ROOT
from hydra import compose, initialize_config_dir
from tiny_corpus import write_tiny_corpus

STUDY = REPO_ROOT / "experiments" / "router_study"
sys.path.insert(0, str(STUDY))
import analyze_v2  # noqa: E402
import sweep_v2  # noqa: E402
from _study import STUDY_CONF_DIR, study_overrides  # noqa: E402


# -- the paired interval -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("df, t", [(1, 12.706204736), (2, 4.302652730), (4, 2.776445105), (30, 2.042272456)])
def test_t_quantile_matches_the_table(df, t):
    assert analyze_v2.t_quantile(0.975, df) == pytest.approx(t, abs=1e-8)


def test_paired_interval_by_hand():
    # seeds 0-2 in both; seed 3 only in the reference: not a pair. d = 0.1, 0.2, 0.3: mean 0.2, sd 0.1,
    # half width = t(0.975, 2) * 0.1 / sqrt(3) = 4.302653 * 0.057735 = 0.248414
    p = analyze_v2.paired({0: 3.1, 1: 3.3, 2: 3.5}, {0: 3.0, 1: 3.1, 2: 3.2, 3: 9.0})
    assert p.seeds == [0, 1, 2] and p.n == 3
    assert p.mean == pytest.approx(0.2) and p.sd == pytest.approx(0.1)
    assert p.half_width == pytest.approx(0.2484138, abs=1e-6)
    assert p.ci == pytest.approx((-0.0484138, 0.4484138), abs=1e-6)
    assert p.verdict() == "interval includes 0: no difference shown"
    # d = -0.50, -0.40, -0.45: mean -0.45, sd 0.05, half 4.302653 * 0.05 / sqrt(3) = 0.124207 -> below 0
    q = analyze_v2.paired({0: 2.5, 1: 2.7, 2: 2.75}, {0: 3.0, 1: 3.1, 2: 3.2})
    assert q.ci == pytest.approx((-0.574207, -0.325793), abs=1e-6)
    assert q.verdict().startswith("lower loss than topk")
    one = analyze_v2.paired({0: 3.0}, {0: 2.0})
    assert one.mean == 1.0 and math.isnan(one.half_width) and one.verdict() == "no interval (n=1)"


def test_domain_gaps_pair_by_seed_and_domain():
    def run(arm, seed, a, b):
        return {"arm": arm, "seed": seed, "val_loss_per_domain": {"code": a, "prose": b}}

    rows = [run("topk", 0, 2.0, 3.0), run("topk", 1, 2.2, 3.4), run("hash_random", 0, 1.9, 3.3),
            run("hash_random", 1, 2.3, 3.5), run("dense", 1, 2.5, 3.4)]
    g = analyze_v2.domain_gaps(rows)
    assert set(g) == {"hash_random", "dense"}
    assert g["hash_random"]["code"].diffs == pytest.approx([-0.1, 0.1])  # mean 0
    assert g["hash_random"]["prose"].mean == pytest.approx(0.2)  # 0.3 and 0.1
    assert g["dense"]["code"].seeds == [1] and g["dense"]["code"].mean == pytest.approx(0.3)
    lines = analyze_v2.domain_table(rows)
    assert lines[2] == "| arm | code | prose |"
    assert lines[4] == "| hash_random | +0.000 | +0.200 |" and lines[5] == "| dense | +0.300 | +0.000 |"
    assert analyze_v2.domain_table([run("topk", 0, 2.0, 3.0)]) == []  # nothing to compare


# -- the plan -------------------------------------------------------------------------------------------------------
LR = {"topk": 1e-3, "hash_random": 2e-3, "hash_distilled": 4e-3}


def test_tuning_plan():
    jobs = sweep_v2.plan_tune(["topk", "hash_random", "hash_distilled"], LR, "b10M")
    best = ("tune:topk-lr0.0005-s0", "tune:topk-lr0.001-s0", "tune:topk-lr0.002-s0")
    assert [(j.key, j.after) for j in jobs] == [
        (best[0], ()), (best[1], ()), (best[2], ()),
        ("tune:hash_random-lr0.001-s0", ()), ("tune:hash_random-lr0.002-s0", ()), ("tune:hash_random-lr0.004-s0", ()),
        # topk's knobs, one at a time at its best lr (known once its lr runs ended)
        ("tune:topk-lrbest-rls0.1-s0", best), ("tune:topk-lrbest-rls0.3-s0", best),
        ("tune:topk-lrbest-lb0-s0", best), ("tune:topk-lrbest-lb0.04-s0", best), ("tune:topk-lrbest-z0-s0", best),
        # the distilled table comes from topk's best-lr tuning run
        ("tune-distill:topk-lrbest-s0", best),
        ("tune:hash_distilled-lr0.002-s0", ("tune-distill:topk-lrbest-s0",)),
        ("tune:hash_distilled-lr0.004-s0", ("tune-distill:topk-lrbest-s0",)),
        ("tune:hash_distilled-lr0.008-s0", ("tune-distill:topk-lrbest-s0",)),
    ]
    assert all(j.budget == "b10M" and j.seed == 0 for j in jobs)
    # another lr grid; hash_distilled alone still plans the topk runs its table needs, but not topk's knobs
    jobs = sweep_v2.plan_tune(["hash_distilled"], LR, "tiny", factors=(1.0,), knobs=())
    assert [j.key for j in jobs] == ["tune:topk-lr0.001-s0", "tune-distill:topk-lrbest-s0",
                                     "tune:hash_distilled-lr0.004-s0"]


def test_grid_plan_puts_the_minimum_first_smallest_budget_first():
    jobs = sweep_v2.plan_grid(["topk", "hash_distilled", "hash_random", "span_head"], ["b10M", "b100M"], [0, 1])
    keys = [j.key for j in jobs]
    assert keys == [
        "train:topk-b10M-s0", "train:hash_random-b10M-s0", "train:topk-b10M-s1", "train:hash_random-b10M-s1",
        "train:topk-b100M-s0", "train:hash_random-b100M-s0", "train:topk-b100M-s1", "train:hash_random-b100M-s1",
        "distill:topk-b10M-s0", "train:hash_distilled-b10M-s0", "train:span_head-b10M-s0",
        "distill:topk-b10M-s1", "train:hash_distilled-b10M-s1", "train:span_head-b10M-s1",
        "distill:topk-b100M-s0", "train:hash_distilled-b100M-s0", "train:span_head-b100M-s0",
        "distill:topk-b100M-s1", "train:hash_distilled-b100M-s1", "train:span_head-b100M-s1",
    ]
    after = {j.key: j.after for j in jobs}
    assert after["distill:topk-b100M-s1"] == ("train:topk-b100M-s1",)
    assert after["train:hash_distilled-b100M-s1"] == ("distill:topk-b100M-s1",)
    full = sweep_v2.plan_grid(list(sweep_v2.ARMS), list(sweep_v2.BUDGETS), [0, 1, 2])
    assert len([j for j in full if j.kind == "train"]) == 8 * 3 * 3 and len(full) == 8 * 9 + 9
    assert {j.arm for j in full[:36]} == set(sweep_v2.MINIMUM) and full[35].key == "train:dense-b100M-s2"


def _tune_run(root: Path, name: str, val_loss: float, steps: int = 20) -> None:
    d = root / "tune" / name
    d.mkdir(parents=True)
    (d / "report.json").write_text(json.dumps({"steps": steps, "val_loss": val_loss, "tokens_per_s": 1000.0}))


def test_choose_takes_the_lowest_loss_and_waits_for_unfinished_runs(tmp_path):
    jobs = sweep_v2.plan_tune(["topk", "hash_random"], LR, "tiny")
    for name, loss in [("topk-lr0.0005-s0", 5.0), ("topk-lr0.001-s0", 4.8), ("topk-lr0.002-s0", 4.9),
                       ("topk-lr0.001-rls0.1-s0", 4.7), ("topk-lr0.001-rls0.3-s0", 4.75),
                       ("topk-lr0.001-lb0-s0", 4.9), ("topk-lr0.001-lb0.04-s0", 4.85), ("topk-lr0.001-z0-s0", 4.81),
                       ("hash_random-lr0.001-s0", 4.6), ("hash_random-lr0.002-s0", 4.5)]:
        _tune_run(tmp_path, name, loss)
    _tune_run(tmp_path, "hash_random-lr0.004-s0", 4.0, steps=10)  # unfinished: not chosen, arm not chosen
    chosen = sweep_v2.choose(tmp_path, jobs, 20, tmp_path / "res")
    assert chosen == {"topk": {"optimizer.lr": 0.001, "router_lr_scale": 0.1}}
    assert yaml.safe_load((tmp_path / "res" / "chosen.yaml").read_text()) == chosen
    rows = list(csv.DictReader(open(tmp_path / "res" / "tuning.csv")))
    assert len(rows) == 11 and [r["run"] for r in rows if r["chosen"] == "True"] == \
        ["topk-lr0.001-rls0.1-s0", "hash_random-lr0.002-s0"]  # tuning.csv marks the best finished run per arm
    unfinished = next(r for r in rows if r["run"] == "hash_random-lr0.004-s0")
    assert unfinished["finished"] == "False" and unfinished["val_loss"] == ""
    assert next(r for r in rows if r["run"] == "topk-lr0.001-lb0.04-s0")["loss.load_balance"] == "0.04"


# -- configs -------------------------------------------------------------------------------------------------------
def _study(study: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=study_overrides(study, list(overrides)), return_hydra_config=True)


def test_v2_configs():
    assert sorted(p.stem for p in (STUDY_CONF_DIR / "arm_v2").glob("*.yaml")) == sorted(sweep_v2.ARMS)
    steps = {"b10M": 153, "b32M": 488, "b100M": 1526}
    for budget, n in steps.items():
        cfg = _study("router_study_v2", f"budget={budget}", "arm_v2=hash_balanced", "seed=1")
        assert (cfg.trainer.max_steps, cfg.budget_tokens) == (n, analyze_v2.budget_tokens(budget))
        assert abs(n * 64 * 1024 - cfg.budget_tokens) < 64 * 1024 and cfg.scheduler.warmup_steps == 15
        assert (cfg.data.batch_size, cfg.data.seq_len, cfg.data.max_train_tokens, cfg.data.allow_partial) == \
            (64, 1024, 110_000_000, True)
        assert cfg.data._target_.endswith("ShardDataModule") and cfg.callbacks.checkpoint.save_top_k == 0
        assert cfg.hydra.runtime.choices.budget == budget and cfg.router.table == "balanced"
        assert (cfg.experiment, cfg.compile, cfg.trainer.precision, cfg.experts.impl) == \
            ("router_study_v2", True, "bf16-mixed", "grouped")
    topk = _study("router_study_v2", "arm_v2=topk").model
    dense = _study("router_study_v2", "arm_v2=dense")
    assert (dense.model.num_experts, dense.model.num_experts_per_tok) == (1, 1)
    assert dense.model.hidden_dim == 2 * topk.hidden_dim and dense.loss.load_balance == dense.loss.z_loss == 0
    assert _study("router_study_v2", "arm_v2=topk_frozen").router_lr_scale == 0
    span = _study("router_study_v2", "arm_v2=span_vocab").router
    assert span._target_.endswith("FirstPieceVocabRouter") and span.spans == "word"
    smoke = _study("router_study_v2_smoke", "arm_v2=hash_random")
    assert (smoke.trainer.max_steps, smoke.model.dim, smoke.data._target_.rsplit(".", 1)[-1]) == \
        (20, 64, "CorpusDataModule")


# -- end to end on the smoke config ------------------------------------------------------------------------------
@pytest.mark.slow
def test_smoke_study_v2_end_to_end(tmp_path, monkeypatch):
    """tune (lr grid of one value) -> choose -> grid -> analyse, for topk and hash_random, one seed, on CPU."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    corpus = write_tiny_corpus(tmp_path, {"prose": "It was a fine morning, and Emma walked {i} miles. ",
                                          "code": "    def f{i}(x, y):\n        return x * {i} + y\n"},
                               docs_per_domain=40, val_every=4, tag="router-study-v2-tiny")
    root, res = tmp_path / "runs", tmp_path / "results"
    args = ["--study", "router_study_v2_smoke", "--arms", "topk,hash_random", "--budgets", "tiny", "--tune-budget",
            "tiny", "--seeds", "0", "--lr-factors", "1", "--knobs", "loss.z_loss", "--study-root", str(root),
            "--out", str(res), "--gpus", "0", "--", f"data.corpus_dir={corpus}"]
    # an lr grid of one value and one topk knob (z-loss off), at that lr
    assert sweep_v2.main(["all", *args]) == 0
    names = sorted(p.name for p in (root / "tune").iterdir())
    assert names == ["hash_random-lr0.003-s0", "topk-lr0.003-s0", "topk-lr0.003-z0-s0"]
    chosen = yaml.safe_load((res / "chosen.yaml").read_text())
    assert set(chosen) == {"topk", "hash_random"} and chosen["hash_random"] == {"optimizer.lr": 0.003}
    summary = list(csv.DictReader(open(res / "summary.csv")))
    assert [(r["arm"], r["budget"], r["budget_tokens"], r["seed"], r["steps"]) for r in summary] == \
        [("topk", "tiny", "5120", "0", "20"), ("hash_random", "tiny", "5120", "0", "20")]
    assert all(float(r["val_loss"]) > 0 and float(r["tokens_per_s"]) > 0 for r in summary)
    assert float(summary[1]["lr"]) == 0.003
    tuning = list(csv.DictReader(open(res / "tuning.csv")))
    assert len(tuning) == 3 and sum(r["chosen"] == "True" for r in tuning) == 2
    md = (res / "report.md").read_text()
    assert "Smoke study" in md and "| hash_random | 1 |" in md and "no interval (n=1)" in md
    assert (res / "gap_vs_tokens.png").stat().st_size > 0
    # everything done: the same command trains nothing again
    assert sweep_v2.main(["grid", *args]) == 0
