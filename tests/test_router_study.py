"""The router study (experiments/router_study/): the hash router's ``file`` table kind, the study configs, the
difference rule of the report, and the whole pipeline (train -> distil -> train -> analyse) on the smoke config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, REPO_ROOT, TEST_CONF_DIR
from hydra import compose, initialize_config_dir
from tiny_corpus import write_tiny_corpus

from moe_variants import ModelArgs, Transformer
from moe_variants.routers.audit import AUDIT_ARGS
from moe_variants.routers.hash import HashRouter
from moe_variants.routers.resources import FROM_CHECKPOINT, synthetic_resources

STUDY = REPO_ROOT / "experiments" / "router_study"
sys.path.insert(0, str(STUDY))
import analyze as study_analyze  # noqa: E402
import sweep as study_sweep  # noqa: E402
from _study import ARMS, STUDY_CONF_DIR, study_overrides  # noqa: E402

ARGS = ModelArgs(**AUDIT_ARGS)


def write_table(path: Path, n_layers: int = ARGS.n_layers, V: int = ARGS.vocab_size, K: int = ARGS.num_experts_per_tok,
                E: int = ARGS.num_experts, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(n_layers, V, E, generator=g).argsort(-1)[..., :K].contiguous()
    torch.save(table, path)
    return table


def file_model(path: Path | str | None, resources: bool = True) -> Transformer:
    res = synthetic_resources(ARGS.vocab_size) if resources else FROM_CHECKPOINT
    return Transformer(ARGS, router=partial(HashRouter, table="file", table_path=None if path is None else str(path),
                                            resources=res))


# -- the file table kind ---------------------------------------------------------------------------------------
def test_file_table_routes_each_layer_by_its_row(tmp_path):
    table = write_table(tmp_path / "t.pt")
    model = file_model(tmp_path / "t.pt")
    ids = torch.randint(0, ARGS.vocab_size, (2, 17))
    out = model(ids)
    for layer, r in enumerate(out.routing):
        assert torch.equal(r.expert_ids, table[layer][ids])
        torch.testing.assert_close(r.weights, torch.full_like(r.weights, 1 / ARGS.num_experts_per_tok))
    assert model.routers[0].describe() == f"hash(table=file, weights=uniform, k={ARGS.num_experts_per_tok})"


def test_file_table_comes_from_the_checkpoint_when_the_file_is_gone(tmp_path):
    table = write_table(tmp_path / "t.pt")
    state = file_model(tmp_path / "t.pt").state_dict()
    (tmp_path / "t.pt").unlink()
    rebuilt = file_model(tmp_path / "t.pt", resources=False)  # as checkpoint.load_model rebuilds it
    rebuilt.load_state_dict(state)
    ids = torch.randint(0, ARGS.vocab_size, (1, 9))
    assert torch.equal(rebuilt(ids).routing[1].expert_ids, table[1][ids])


@pytest.mark.parametrize("shape, message", [
    ((ARGS.n_layers + 1, ARGS.vocab_size, ARGS.num_experts_per_tok), "shape"),
    ((ARGS.n_layers, ARGS.vocab_size - 1, ARGS.num_experts_per_tok), "shape"),
    ((ARGS.n_layers, ARGS.vocab_size, ARGS.num_experts_per_tok + 1), "shape"),
])
def test_file_table_of_the_wrong_shape_is_refused(tmp_path, shape, message):
    write_table(tmp_path / "t.pt", *shape)
    with pytest.raises(ValueError, match=rf"\(n_layers, V, K\) = \({ARGS.n_layers}, {ARGS.vocab_size}"):
        file_model(tmp_path / "t.pt")


def test_file_table_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        file_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="needs router.table_path"):
        file_model(None)
    torch.save(torch.zeros(ARGS.n_layers, ARGS.vocab_size, 2), tmp_path / "float.pt")
    with pytest.raises(ValueError, match="int64 tensor"):
        file_model(tmp_path / "float.pt")
    torch.save(torch.zeros(ARGS.n_layers, ARGS.vocab_size, 2, dtype=torch.int64), tmp_path / "dup.pt")
    with pytest.raises(ValueError, match="repeating an expert"):
        file_model(tmp_path / "dup.pt")
    torch.save(torch.full((ARGS.n_layers, ARGS.vocab_size, 2), ARGS.num_experts, dtype=torch.int64),
               tmp_path / "range.pt")
    with pytest.raises(ValueError, match="outside"):
        file_model(tmp_path / "range.pt")
    (tmp_path / "junk.pt").write_text("not a tensor")
    with pytest.raises(ValueError, match="not a torch tensor file"):
        file_model(tmp_path / "junk.pt")


# -- configs -------------------------------------------------------------------------------------------------------
def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def _study(study: str, *overrides: str):
    return _compose(*study_overrides(study, list(overrides)))


@pytest.mark.parametrize("arm", ARMS)
def test_study_configs_compose_for_every_arm(arm):
    assert sorted(p.stem for p in (STUDY_CONF_DIR / "arm").glob("*.yaml")) == sorted(ARMS)
    gpu = _study("router_study", f"arm={arm}", "seed=2")
    assert (gpu.experiment, gpu.model.dim, gpu.trainer.accelerator, gpu.experts.impl, gpu.compile) == \
        ("router_study", 512, "gpu", "grouped", True)
    assert gpu.hydra.runtime.choices.arm == arm
    smoke = _study("router_study_smoke", f"arm={arm}")
    assert (smoke.experiment, smoke.model.dim, smoke.trainer.accelerator, smoke.compile) == \
        ("router_study_smoke", 64, "cpu", False)
    router = {"topk": "topk.TopKRouter", "span_head": "span.SpanHeadRouter",
              "span_first_piece": "span_vocab.FirstPieceVocabRouter", "span_prefix": "span_vocab.PrefixVocabRouter"}
    assert gpu.router._target_.endswith(router.get(arm, "hash.HashRouter"))
    if arm == "hash_distilled":
        assert gpu.router.table == "file" and gpu.router.table_path == "runs/router_study/distilled_hash/topk-s2.pt"


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_builds_on_the_smoke_config(arm, tmp_path):
    from standin_data import StandinDataModule

    from moe_variants.training.build import build_model, make_resources

    root = tmp_path / "runs"
    (root / "distilled_hash").mkdir(parents=True)
    # the test-only data config joins the study's folder on the search path
    cfg = _study("router_study_smoke", f"hydra.searchpath=[file://{TEST_CONF_DIR}]", f"arm={arm}", "data=standin",
                 f"study_root={root}")
    write_table(root / "distilled_hash" / "topk-s0.pt", cfg.model.n_layers, cfg.model.vocab_size,
                cfg.model.num_experts_per_tok, cfg.model.num_experts)
    dm = StandinDataModule(seq_len=16, batch_size=2)
    dm.setup("fit")
    model = build_model(cfg, resources=make_resources(dm))
    out = model(torch.randint(0, 300, (2, 16)))
    assert len(out.routing) == cfg.model.n_layers == 2 and model.causal


def test_study_configs_live_with_the_study():
    """moe-train's conf/ has no study or arm group: without the study's folder on the search path, the arm cannot
    be chosen."""
    assert not (CONF_DIR / "study").exists() and not (CONF_DIR / "arm").exists()
    with pytest.raises(Exception, match="Could not override 'arm'"):
        _compose("+study=router_study", "arm=topk")


def test_experiment_stays_a_plain_override():
    cfg = _compose("experiment=first_sweep", "router=hash")  # no config group may be named `experiment`
    assert cfg.experiment == "first_sweep"


# -- the difference rule -------------------------------------------------------------------------------------------
def test_differences_are_called_only_beyond_the_seed_spread():
    S, compare = study_analyze.Stat, study_analyze.compare
    a, b = S([3.00, 3.02, 3.04]), S([3.03, 3.05, 3.07])  # |Δ| = 0.03 < 0.02 + 0.02
    assert not study_analyze.differs(a, b)
    text = compare("hash_random", a, "topk", b)
    assert "no difference beyond the seed spread" in text and "better" not in text and "worse" not in text
    c = S([3.20, 3.21, 3.22])  # |Δ| = 0.16 > 0.02 + 0.01
    assert study_analyze.differs(c, b)
    assert "**hash_random is worse** by 0.160" in compare("hash_random", c, "topk", b)
    assert "is better" in compare("topk", b, "hash_random", c)
    one = S([2.0])  # a single seed has no spread: never a difference, however large the gap
    assert not study_analyze.differs(one, b)
    text = compare("span_head", one, "topk", b)
    assert "not compared" in text and "better" not in text and "worse" not in text


# -- end to end on the smoke config ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    texts = {"prose": "It was a fine morning, and Emma walked {i} miles to Highbury with her sister. ",
             "code": "    def f{i}(x, y):\n        return x * {i} + y\n"}
    return write_tiny_corpus(tmp_path_factory.mktemp("study_data"), texts, docs_per_domain=40, val_every=4,
                             tag="router-study-tiny")


def sweep_args(tmp: Path, corpus: Path, arms: str, seeds: str, *extra: str) -> list[str]:
    return ["--study", "router_study_smoke", "--arms", arms, "--seeds", seeds, "--study-root", str(tmp / "runs"),
            "--out", str(tmp / "results"), "--gpus", "0", "--distill-windows", "64", *extra, "--",
            f"data.corpus_dir={corpus}"]


def sweep(tmp: Path, corpus: Path, arms: str, seeds: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(STUDY / "sweep.py"), *sweep_args(tmp, corpus, arms, seeds, *extra)]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)  # 7 arms x 2 seeds


def check_outputs(tmp: Path, arms: list[str], seeds: list[int]) -> str:
    res = tmp / "results"
    for f in ("report.md", "summary.csv", "runs.csv", "val_loss_per_domain.png", "token_id_predictability.png",
              "routing_per_layer.png"):
        assert (res / f).is_file() and (res / f).stat().st_size > 0, f
    for arm in arms:
        for s in seeds:
            run = json.loads((res / "runs" / f"{arm}-s{s}" / "run.json").read_text())
            assert run["report"]["steps"] == 20 and len(run["layers"]) == 2
            for m in ("token_id_predictability", "token_id_predictability_heldout_by_doc", "vocabulary_specialization"):
                assert 0 <= run["layers"][0][m + "_random"] <= 1, m  # every number beside its random-routing floor
    summary = (res / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary[1:]] == arms
    return (res / "report.md").read_text()


def test_smoke_study_end_to_end(tmp_path, corpus, capsys, monkeypatch):
    """topk and hash_distilled, 1 seed: train topk, distil its table, train on the table, report; then regenerate
    the report and the per-run figures from the results folder alone, without the runs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny model: threads only add contention on a busy 2-core machine
    # the sweep (run here: it trains and distils in subprocesses) and the report, in this process to save
    # interpreter starts; the slow test below runs sweep.py as a command, report included
    assert study_sweep.main(sweep_args(tmp_path, corpus, "topk,hash_distilled", "0", "--no-analyze")) == 0
    data = ["--data", f"corpus_dir={corpus}", "--sequences-per-domain", "4"]
    assert study_analyze.main(["--study", "router_study_smoke", "--study-root", str(tmp_path / "runs"), "--out",
                               str(tmp_path / "results"), *data]) == 0
    table_path = tmp_path / "runs" / "distilled_hash" / "topk-s0.pt"
    table = torch.load(table_path)
    assert table.shape == (2, 32000, 2) and table.dtype == torch.int64
    info = json.loads(table_path.with_suffix(".pt.json").read_text())
    assert info["source_step"] == 20 and min(info["table_matches_router_per_layer"]) > 0.3
    ckpt = torch.load(tmp_path / "runs" / "hash_distilled-s0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert torch.equal(ckpt["state_dict"]["model.layers.1.feed_forward.router.expert_table"], table[1])
    md = check_outputs(tmp_path, ["topk", "hash_distilled"], [0])
    assert "hash_distilled vs topk: not compared" in md  # one seed: no difference may be called
    assert "is better" not in md and "is worse" not in md
    assert "Smoke study" in md and "sweep.py --study router_study_smoke" in md

    # everything is done: the same command trains nothing again
    assert study_sweep.main(sweep_args(tmp_path, corpus, "topk,hash_distilled", "0", "--no-analyze")) == 0
    assert "3 jobs, 3 already done, 0 to run" in capsys.readouterr().out

    before = md
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "results" / "report.md").unlink()
    assert not (tmp_path / "results" / "missing.json").exists()  # written only when runs are missing
    figures = {p.name: p.read_bytes() for p in (tmp_path / "results" / "runs" / "topk-s0").glob("*.png")}
    assert sorted(figures) == ["load_heatmap.png", "load_per_domain.png", "repeat_rates.png"]
    for name in figures:
        (tmp_path / "results" / "runs" / "topk-s0" / name).unlink()
    rc = study_analyze.main(["--study", "router_study_smoke", "--out", str(tmp_path / "results"), "--report-only",
                             "--run-plots"])
    assert rc == 0
    after = (tmp_path / "results" / "report.md").read_text()
    assert after.split("## Commands")[0] == before.split("## Commands")[0]
    # the per-run figures (not kept in git) come back from metrics.json as moe-analyze drew them
    assert {p.name: p.read_bytes() for p in (tmp_path / "results" / "runs" / "topk-s0").glob("*.png")} == figures


@pytest.mark.slow
def test_smoke_study_every_arm_two_seeds(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    r = sweep(tmp_path, corpus, ",".join(ARMS), "0,1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = check_outputs(tmp_path, list(ARMS), [0, 1])
    for arm in ARMS[1:]:
        assert f"{arm} vs topk:" in md


def test_wandb_history_reads_an_offline_run_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Curves logged to an offline W&B run come back step by step (the study report's learning curves), across
    resumes of one run, including rows larger than a 32 KiB block (records split over blocks)."""
    import wandb
    from wandb_history import read_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    big = {f"pad/{i}": float(i) for i in range(3000)}  # a row of ~60 KB
    logged = {}
    for start, steps in enumerate(([9, 19], [19, 29])):  # a resumed run: step 19 logged again, later wins
        run = wandb.init(project="t", dir=str(tmp_path), mode="offline")
        for step in steps:
            loss = 10.0 - step / 10 + start
            run.log({"train/loss": loss, "trainer/global_step": step, **big})
            logged[step] = loss
        run.log({"val/loss": 5.0 + start, "trainer/global_step": steps[-1]})
        run.finish()
    history = read_history(tmp_path, wait_s=60)  # right after finish(): wait for each sitting's exit record
    assert history["train/loss"] == sorted(logged.items())
    assert history["val/loss"] == [(19, 5.0), (29, 6.0)]
    assert read_history(tmp_path / "nothing") == {}


def test_report_from_the_saved_v1_results_says_what_they_lack(tmp_path):
    """The committed v1 run.json files (no random-routing floors; 'held out' by window parity) still make a report:
    it prints n/a where a floor is missing, says why, and does not call the window-parity number held out."""
    shutil.copytree(REPO_ROOT / "results" / "router_study" / "runs", tmp_path / "runs",
                    ignore=lambda d, names: [n for n in names if n not in ("run.json", "history.json")
                                             and not (Path(d) / n).is_dir()])
    assert study_analyze.main(["--study", "router_study", "--out", str(tmp_path), "--report-only"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| topk, random routing | n/a |" in md
    assert "predate the random-routing floor" in md
    assert "even vs odd windows, not held out: 0.707 ± 0.018" in md
    assert "**token-id predictability, held out**" not in md
    assert "1/E plus" not in md
