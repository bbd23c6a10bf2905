"""Every config composes; model presets build; config errors surface before training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, TEST_CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moe_variants.routers.resources import FROM_CHECKPOINT
from moe_variants.training.build import build_model, check_config, make_resources

# a study's own groups (experiments/<study>/conf/) are composed and built by that study's tests
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
ALL_OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


def compose_cfg(overrides: list[str], tmp_path: Path | None = None, hydra_cfg: bool = False):
    """The app's config with test data (data=standin unless another data is chosen) and concrete run paths."""
    base = [f"hydra.searchpath=[file://{TEST_CONF_DIR}]", "model=tiny", "data=standin", "name=test", "logger=none"]
    if tmp_path is not None:
        base.append(f"run_dir={tmp_path}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=base + overrides, return_hydra_config=hydra_cfg)


def _standin_dm():
    from standin_data import StandinDataModule

    dm = StandinDataModule(seq_len=16, batch_size=2)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_config_composes_and_builds(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    assert cfg[group] is not None or group == "logger"
    if group == "data":  # the corpus module needs the built corpus: composing is what is checked here
        assert "_target_" in cfg.data
        return
    if group == "model" and option != "tiny":  # big presets: shapes only, no memory
        with torch.device("meta"):
            model = build_model(cfg)
        assert model.args.dim == cfg.model.dim
        return
    check_config(cfg)
    dm = _standin_dm()
    if cfg.router.get("allow_lookahead") is False:  # a look-ahead router refuses to build unless allowed
        with pytest.raises(ValueError, match="allow_lookahead=true"):
            build_model(cfg, resources=make_resources(dm))
        cfg.router.allow_lookahead = True
    model = build_model(cfg, resources=make_resources(dm))
    assert len(model.routers) == cfg.model.n_layers
    opt = instantiate(cfg.optimizer)(model.parameters())
    instantiate(cfg.scheduler)(opt)
    OmegaConf.to_container(cfg.loss)
    for key in ("callbacks", "logger"):
        for sub in (cfg.get(key) or {}).values():
            instantiate(sub)
    if cfg.trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        return  # GPU trainers (bf16, DDP, FSDP) only compose here; they run on a GPU machine
    trainer_cfg = OmegaConf.to_container(cfg.trainer)
    trainer_cfg.update(accelerator="cpu", precision="32-true", enable_progress_bar=False, logger=False)
    instantiate(trainer_cfg)


def test_mixtral_8x7b_parameter_counts():
    cfg = compose_cfg(["model=mixtral_8x7b"])
    with torch.device("meta"):
        model = build_model(cfg)
    counts = model.num_params()
    assert round(counts["total"] / 1e9, 1) == 46.7
    assert round(counts["active"] / 1e9, 1) == 12.9
    assert model.args.sliding_window is None and model.args.max_seq_len == 32768 and model.args.rope_theta == 1e6


def test_hydra_launcher_configs_compose():
    for launcher, target in (("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")):
        cfg = compose_cfg([f"hydra/launcher={launcher}"], hydra_cfg=True)
        assert cfg.hydra.launcher._target_.endswith(target)
    slurm = compose_cfg(["hydra/launcher=slurm"], hydra_cfg=True).hydra.launcher
    assert slurm.gpus_per_node == 1 and slurm.timeout_min == 720


def _hydra_names(*overrides: str) -> tuple[str, str, tuple[str, str], list[str]]:
    """(name, run dir, (sweep dir, subdir), W&B tags of the overrides) of a config composed as ``moe-train`` does."""
    from hydra.core.hydra_config import HydraConfig

    from moe_variants.training.build import swept_tags

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"hydra.searchpath=[file://{TEST_CONF_DIR}]"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert "wandb" not in cfg.logger or cfg.logger.wandb.name == cfg.name
        return cfg.name, cfg.hydra.run.dir, (cfg.hydra.sweep.dir, cfg.hydra.sweep.subdir), swept_tags(cfg)
    finally:
        HydraConfig.instance().cfg = None


def test_run_names_and_dirs_are_deterministic():
    name, run_dir, sweep, tags = _hydra_names("router=hash", "seed=3", "experiment=e01")
    assert (name, run_dir, sweep, tags) == ("hash-s3", "runs/e01/hash-s3", ("runs/e01", "hash-s3"), [])


def test_run_names_say_every_override_but_how_a_run_is_run():
    """Any override that changes what is trained is in the name (sorted, after router and seed), so the jobs of a
    sweep over any key get their own folders; resuming or lengthening a run keeps its name."""
    a, _, _, tags = _hydra_names("router=hash", "router.table=random", "model=tiny")
    b = _hydra_names("router=hash", "router.table=balanced", "model=tiny")[0]
    assert a == "hash-s0,model=tiny,router.table=random" and b == "hash-s0,model=tiny,router.table=balanced"
    assert tags == ["model=tiny", "router.table=random"]
    same = _hydra_names("router=hash", "router.table=random", "model=tiny", "ckpt_path=last", "trainer.max_steps=9",
                        "experiment=x", "logger=csv", "compile=true", "optimizer_impl=compiled")[0]
    assert same == a
    files = _hydra_names("data=text_files", "data.data_files=/a/b.txt")[0]
    assert files == "topk-s0,data.data_files=_a_b.txt,data=text_files"  # one folder: "/" -> "_"
    assert _hydra_names("router_lr_scale=0")[0] == "topk-s0,router_lr_scale=0"  # a training setting


def test_long_run_names_stay_unique_and_fit_a_folder_name():
    from moe_variants.training.naming import MAX_NAME_BYTES, run_name

    long_a, long_b = (run_name("hash", 0, ",".join(f"k{i}={v}" for i in range(60))) for v in ("x", "y"))
    assert long_a != long_b and len(long_a.encode()) <= MAX_NAME_BYTES and long_a.startswith("hash-s0,k0=x")


@pytest.mark.parametrize("router", ["hash", "span_first_piece"])
def test_table_seed_follows_the_run_seed_unless_set(router):
    """Sweeping seed= varies the hash and vocabulary tables too; router.seed= pins one."""
    def table(*overrides: str) -> tuple[int, torch.Tensor]:
        cfg = compose_cfg([f"router={router}", "model.vocab_size=512", *overrides])
        # FROM_CHECKPOINT: corpus-derived buffers are placeholders; the seeded expert table is built all the same
        return cfg.router.seed, build_model(cfg, resources=FROM_CHECKPOINT).routers[0].expert_table

    (s0, t0), (s1, t1), (s5, t5) = table("seed=0"), table("seed=1"), table("seed=1", "router.seed=5")
    assert (s0, s1, s5) == (0, 1, 5)
    assert not torch.equal(t0, t1) and not torch.equal(t1, t5)
    assert torch.equal(t5, table("seed=2", "router.seed=5")[1])  # the table follows router.seed alone


def test_help_describes_the_app():
    proc = subprocess.run([sys.executable, "-m", "moe_variants.training.run", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "moe-train: train a Mixtral" in proc.stdout and "== Everyday commands ==" in proc.stdout
    assert "moe-train -m router=hash router.table=random,balanced" in proc.stdout
    routers = ", ".join(sorted(p.stem for p in (CONF_DIR / "router").glob("*.yaml")))
    assert f"router: {routers}" in proc.stdout and "is powered by Hydra" not in proc.stdout


def test_loss_coefficients_live_in_loss_config_only():
    cfg = compose_cfg([])
    assert dict(cfg.loss) == {"load_balance": 0.01, "z_loss": 0.001}


@pytest.mark.parametrize("flag", [None, "true", "false"])
def test_activation_checkpointing_key_reaches_the_model(flag):
    cfg = compose_cfg([] if flag is None else [f"activation_checkpointing={flag}"])
    assert build_model(cfg).activation_checkpointing is (flag == "true")  # off by default


def test_unknown_config_name_lists_choices(tmp_path):
    cmd = [sys.executable, "-m", "moe_variants.training.run", "router=nope", "data=standin",
           f"hydra.searchpath=[file://{TEST_CONF_DIR}]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "router/nope" in proc.stderr and "Available options" in proc.stderr and "topk" in proc.stderr


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.num_experts_per_tok=9"], "num_experts_per_tok"),
        (["data.seq_len=1024"], r"data\.seq_len=1024 exceeds model\.max_seq_len=512"),
        (["model.vocab_size=1000"], r"model\.vocab_size=32000|set model\.vocab_size=32000"),
    ],
    ids=["k_gt_e", "seq_len", "vocab"],
)
def test_config_errors_surface_before_training(overrides, match, tmp_path, monkeypatch):
    from lightning import Trainer

    from moe_variants.training.run import run

    def no_fit(*a, **k):
        raise AssertionError("training started despite an invalid config")

    monkeypatch.setattr(Trainer, "fit", no_fit)
    cfg = compose_cfg(["data.seq_len=32", *overrides], tmp_path)
    with pytest.raises(ValueError, match=match):
        run(cfg)


def test_a_study_without_its_search_path_is_refused(tmp_path):
    cfg = compose_cfg(["+study=router_study"], tmp_path)  # no study conf on the search path: a plain string
    with pytest.raises(ValueError, match="hydra.searchpath=\\[file://experiments/router_study/conf\\]"):
        check_config(cfg)
