"""From a composed Hydra config to the objects of one run: data module, model, Lightning module, trainer.

Every check that can fail a run is done here, before the first training step, and raises ``ValueError`` naming
the fix: K > E, ``data.seq_len > model.max_seq_len``, tokenizer vocabulary != ``model.vocab_size``, a learning
rate <= 0, a negative or non-finite ``router_lr_scale``, a ``ckpt_path`` whose config differs from the current one in
what is trained (model, router, experts, optimizer, schedule, loss, data, seed: ``checkpoint.TRAINING_KEYS``) unless
``resume_allow_changes`` names the keys, and an expert-parallel size (``conf/parallel``) that does not divide
``model.num_experts`` or the trainer's process count. A refused run writes nothing into its run
dir: the run dir is claimed (and Hydra's ``.hydra/`` files written into it) only after the checks.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from omegaconf import DictConfig, OmegaConf

from moe_variants import paths
from moe_variants.model.args import ModelArgs
from moe_variants.model.transformer import Transformer
from moe_variants.parallel.expert_parallel import local_expert_range
from moe_variants.parallel.load_balance import check_load_balance_scope
from moe_variants.routers.aux_free import AuxFreeRouter
from moe_variants.routers.resources import FROM_CHECKPOINT, RoutingResources, bind_resources
from moe_variants.training.callbacks import BiasBalancing
from moe_variants.training.checkpoint import (
    ADDED_KEYS,
    CONFIG_KEY,
    MODEL_SECTIONS,
    NOT_COMPARED,
    TRAINING_KEYS,
    AtomicCheckpointIO,
    config_diff,
    nonfinite,
    read_checkpoint,
    remove_temp_files,
    write_error,
)
from moe_variants.training.interrupt import SaveOnStop
from moe_variants.training.lit import LitMoE, check_router_lr_scale
from moe_variants.training.naming import override_tags
from moe_variants.training.optim import resolve_optimizer_impl

log = logging.getLogger(__name__)


# -- model ---------------------------------------------------------------------------------------------------
def model_args(cfg: DictConfig) -> ModelArgs:
    """``cfg.model`` -> validated ``ModelArgs`` (raises ValueError, e.g. for top-k > num_experts)."""
    return ModelArgs.from_dict(OmegaConf.to_container(cfg.model, resolve=True))


def build_model(cfg: DictConfig, resources: Any = None) -> Transformer:
    """The Transformer of ``cfg.model`` with the router of ``cfg.router`` and experts ``cfg.experts.impl``.

    ``resources`` (tokenizer and corpus statistics, :func:`make_resources`; ``FROM_CHECKPOINT`` to load a checkpoint)
    reach the routers that declare ``needs_resources``; other routers are built from their config alone.
    """
    router = bind_resources(instantiate(cfg.router), resources)
    return Transformer(
        model_args(cfg), router=router, experts=cfg.experts.impl,
        activation_checkpointing=bool(cfg.get("activation_checkpointing", False)),
    )


def load_model(
    path: str | os.PathLike[str], map_location: Any = "cpu"
) -> tuple[Transformer, DictConfig]:
    """Rebuild the trained model from a checkpoint file (or a run dir: its ``checkpoints/last.ckpt``).

    Returns (model in eval mode, the run's resolved config). Routers are rebuilt with
    ``resources=FROM_CHECKPOINT``: their tokenizer- and corpus-derived tables are buffers and come from the state
    dict, so no corpus is needed.
    """
    ckpt = read_checkpoint(path, map_location)
    cfg = OmegaConf.create(ckpt[CONFIG_KEY])
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}  # tolerate a torch.compile'd wrapper
    model = build_model(cfg, resources=FROM_CHECKPOINT)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"checkpoint {path} does not match the model rebuilt from its own config: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {path} does not match the model rebuilt from its own config: missing "
            f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]} (was the model code changed?)"
        )
    bad = nonfinite(model.state_dict().items())
    if bad:
        raise ValueError(
            f"checkpoint {path} holds NaN/inf weights ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}): it "
            f"was saved after its run diverged; use an earlier checkpoint (checkpoints/step*.ckpt)"
        )
    return model.eval(), cfg


def make_resources(datamodule: Any) -> Any:
    """Corpus statistics for routers that need them (``routers.resources.RoutingResources``), cached under the
    data root; computed lazily, on a router's first request."""
    return RoutingResources.from_datamodule(datamodule, cache_dir=paths.data_root() / "cache" / "routing")


def router_name(cfg: DictConfig) -> str:
    """The router's config name (``topk``), from Hydra's choices when running under Hydra."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("router")
        if choice:
            return str(choice)
    return str(cfg.router._target_).rsplit(".", 2)[-2]  # moe_variants.routers.<name>.<Class>


def config_choices(cfg: DictConfig) -> dict[str, str]:
    """The config-group options of this run (``{"router": "hash", "model": "tiny", ...}``; Hydra's choices, or the
    router alone without Hydra): saved with the config, so W&B panels group by ``choices.router``."""
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        return {str(k): str(v) for k, v in choices.items() if v is not None and not str(k).startswith("hydra")}
    return {"router": router_name(cfg)}


def swept_tags(cfg: DictConfig) -> list[str]:
    """W&B tags for the overrides in the run's name (``router.table=random``); none without Hydra."""
    if not HydraConfig.initialized():
        return []
    hydra_cfg = HydraConfig.get()
    return override_tags(hydra_cfg.overrides.task, hydra_cfg.job.config.override_dirname.exclude_keys)


# -- checks --------------------------------------------------------------------------------------------------
def check_config(cfg: DictConfig) -> ModelArgs:
    """Checks that need no data: model args valid (incl. top-k <= E), sequence length fits the model."""
    if isinstance(cfg.get("study"), str):  # `+study=<name>` without the study's conf/ on the search path
        raise ValueError(
            f"study={cfg.study} is a plain value, not a config: a study's configs live in experiments/<study>/conf/; "
            f"add 'hydra.searchpath=[file://experiments/{cfg.study}/conf]' (see experiments/{cfg.study}/README.md)"
        )
    try:
        args = model_args(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"invalid model config: {e}") from e
    ep = expert_parallel_size(cfg)
    if ep != "world":
        local_expert_range(args.num_experts, ep, 0)  # ValueError naming the divisors of num_experts
    seq_len = cfg.data.get("seq_len")
    if seq_len is not None and seq_len > args.max_seq_len:
        raise ValueError(
            f"data.seq_len={seq_len} exceeds model.max_seq_len={args.max_seq_len}: lower data.seq_len or raise "
            f"model.max_seq_len"
        )
    opt = cfg.get("optimizer") or {}
    lr, wd = opt.get("lr"), opt.get("weight_decay") or 0
    if lr is not None and not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
        raise ValueError(f"optimizer.lr={lr!r} trains nothing (or diverges at once): set a learning rate > 0")
    if lr is not None and str(opt.get("_target_", "")).endswith("AdamW") and lr * wd >= 1:
        # trained anyway (an LR search may go there on purpose): the NaN/inf guard stops the run before a
        # non-finite state is saved, and the last finite checkpoint resumes with a lower LR
        warnings.warn(
            f"optimizer.lr={lr} with optimizer.weight_decay={wd}: AdamW multiplies every weight by 1 - lr x "
            f"weight_decay = {1 - lr * wd:.3g} each step, so the weights will blow up; lower optimizer.lr (the "
            f"NaN/inf guard stops the run at the first non-finite step and keeps the last finite checkpoint)",
            stacklevel=2,
        )
    check_router_lr_scale(cfg.get("router_lr_scale", 1.0))
    optimizer_impl(cfg)
    check_load_balance_scope(cfg.get("load_balance_scope", "local"))
    max_steps = (cfg.get("trainer") or {}).get("max_steps")
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"trainer.max_steps={max_steps}: runs are counted in optimizer steps, set it > 0")
    return args


def optimizer_impl(cfg: DictConfig) -> str:
    """How this run's optimizer update runs: ``optimizer_impl`` with ``auto`` resolved (``training.optim``)."""
    trainer = cfg.get("trainer") or {}
    fp16_clipping = str(trainer.get("precision")) in ("16-mixed", "16") and bool(trainer.get("gradient_clip_val"))
    return resolve_optimizer_impl(cfg.get("optimizer_impl", "auto"), compiled_model=bool(cfg.get("compile")),
                                  fp16_clipping=fp16_clipping)


def expert_parallel_size(cfg: DictConfig) -> int | str:
    """The EP group size: ``parallel.ep_size``, an int >= 1 or ``"world"`` (every process of the run); 1 without
    the group. ``parallel.expert_parallel`` is its former name and, when set, means the same; set both to
    different sizes and the run is refused (``ep_size`` 1 and ``"world"`` are the groups' defaults, which the old
    spelling overrides)."""
    parallel = cfg.get("parallel") or {}
    ep, old = parallel.get("ep_size", 1), parallel.get("expert_parallel")
    key = "ep_size"
    if old is not None:
        if ep not in (1, "world", old):
            raise ValueError(
                f"parallel.ep_size={ep} and parallel.expert_parallel={old} (its former name) disagree: set only "
                f"parallel.ep_size"
            )
        ep, key = old, "expert_parallel"
    if ep == "world":
        return ep
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
        raise ValueError(f"parallel.{key} must be an int >= 1 or 'world', got {ep!r}")
    return ep


def expert_parallel_key(cfg: DictConfig) -> str:
    """The spelling this config sets the EP size with (``ep_size``, or its former name ``expert_parallel``), for
    error messages."""
    return "expert_parallel" if (cfg.get("parallel") or {}).get("expert_parallel") is not None else "ep_size"


def check_expert_parallel(ep: int | str, args: ModelArgs, trainer: Any, key: str = "ep_size") -> int:
    """The EP size for this trainer (``"world"`` resolved); EP needs Lightning's DDP strategy and a process count
    that is a multiple of the EP size (world = data-parallel replicas x EP size)."""
    processes = int(trainer.num_devices) * int(trainer.num_nodes)
    ep = processes if ep == "world" else int(ep)
    if ep == 1:
        return 1
    local_expert_range(args.num_experts, ep, 0)
    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or isinstance(strategy, DeepSpeedStrategy):
        raise ValueError(
            f"parallel.{key}={ep} runs under Lightning's DDP strategy only (got "
            f"{type(strategy).__name__}): use trainer=ddp, or parallel.{key}=1 with this trainer"
        )
    if processes % ep:
        fits = [d for d in range(2, processes + 1) if processes % d == 0 and args.num_experts % d == 0]
        raise ValueError(
            f"parallel.{key}={ep} but the trainer runs {processes} processes (trainer.devices x trainer.num_nodes "
            f"= {trainer.num_devices} x {trainer.num_nodes}), not a multiple of it (world = data-parallel replicas "
            f"x EP size): set trainer.devices={ep} (or a multiple, one node) or parallel.{key} to one of {fits or [1]}"
        )
    return ep


def check_data(args: ModelArgs, datamodule: Any) -> None:
    """Checks against the set-up data module: the tokenizer's vocabulary is the model's."""
    vocab = int(datamodule.vocab_size)
    if vocab != args.vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab} tokens but model.vocab_size={args.vocab_size}: set "
            f"model.vocab_size={vocab} or pick the matching data.tokenizer"
        )


def check_bias_balancing(model: Transformer, callbacks: list[Any]) -> None:
    """Auxiliary-loss-free routers learn their bias only through the ``BiasBalancing`` callback: refuse to train
    them without it (the bias would silently stay 0)."""
    if any(isinstance(r, AuxFreeRouter) for r in model.routers) and not any(
            isinstance(c, BiasBalancing) for c in callbacks):
        raise ValueError(
            "router AuxFreeRouter updates its bias through the BiasBalancing callback, which this run lacks: add "
            "callbacks.bias_balancing (conf/callbacks/default.yaml has it)"
        )


def resolve_ckpt_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """``ckpt_path``: None, a file, or ``last`` = ``<run_dir>/checkpoints/last.ckpt`` (None if there is none yet,
    so that re-running a sweep command starts the missing runs and resumes the others). A fresh start into a run
    dir that already has a checkpoint is refused (it would mix two runs' checkpoints and logs)."""
    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        if (run_dir / "checkpoints" / "last.ckpt").is_file():
            raise ValueError(
                f"{run_dir} already holds a run (checkpoints/last.ckpt): resume it with ckpt_path=last, or start a "
                f"new one under another experiment=/name=, or delete that folder"
            )
        return None
    if str(ckpt) == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            return None  # build() says so once the run dir is claimed (a refused run logs nothing into it)
        return str(last)
    if not Path(ckpt).is_file():
        raise ValueError(f"ckpt_path={ckpt} does not exist (use ckpt_path=last to resume this run dir)")
    return str(ckpt)


def check_checkpoint(config: dict[str, Any], ckpt_path: str, allow: Any = ()) -> None:
    """A resumed run trains what the checkpoint's run trained: its saved config must equal the current one in
    ``MODEL_SECTIONS`` and ``TRAINING_KEYS`` (the stop step ``trainer.max_steps`` may change, the schedule's
    horizon ``scheduler.total_steps`` may not). ``allow`` (``resume_allow_changes``) lists the keys or sections a
    researcher changes on purpose; those are logged, any other difference is refused, listing the keys."""
    saved = {**ADDED_KEYS, **read_checkpoint(ckpt_path)[CONFIG_KEY]}
    allow = [str(a) for a in (allow or ())]
    diffs = config_diff(saved, config, (*MODEL_SECTIONS, *TRAINING_KEYS), ignore=NOT_COMPARED)
    allowed = {k: v for k, v in diffs.items() if any(k == a or k.startswith(a + ".") for a in allow)}
    refused = {k: v for k, v in diffs.items() if k not in allowed}
    for k, (old, new) in allowed.items():
        log.warning("resuming %s with %s changed on purpose: checkpoint %r, now %r", ckpt_path, k, old, new)
    if not refused:
        return
    lines = "\n  ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in refused.items())
    hint = ""
    if "scheduler.total_steps" in refused:
        hint = (
            "\nscheduler.total_steps is the LR schedule's horizon (it defaults to trainer.max_steps): to stop a run "
            "early and resume it later on the same schedule, set scheduler.total_steps=<horizon> with "
            "trainer.max_steps=<stop step>; to train past the old horizon, allow the change"
        )
    raise ValueError(
        f"checkpoint {ckpt_path} was trained with other settings; differing keys:\n  {lines}{hint}\n"
        f"resume with the checkpoint's values, make the change explicit with "
        f"resume_allow_changes=[{','.join(refused)}], or start a new run (ckpt_path=null, another experiment/name)"
    )


def check_global_batch(ckpt_path: str, datamodule: Any, trainer: Any, allow: Any = ()) -> None:
    """``data.batch_size`` is per process; what a resume must keep is the global batch, the training windows one
    optimizer step reads over all processes (saved by the data module with its stream position). A data module
    that saves no such state is not checked."""
    state = read_checkpoint(ckpt_path).get(type(datamodule).__qualname__) or {}
    saved = state.get("samples_per_step")
    accum, world = int(trainer.accumulate_grad_batches), int(trainer.world_size)
    now = int(datamodule.batch_size) * accum * world
    if saved is None or saved == now or any(a in ("data", "data.batch_size") for a in map(str, allow or ())):
        return
    raise ValueError(
        f"checkpoint {ckpt_path} trained on {saved} windows per optimizer step; this run would read {now} "
        f"(data.batch_size={datamodule.batch_size} x accumulate_grad_batches={accum} x {world} processes): set "
        f"data.batch_size to keep the global batch, or make the change explicit with "
        f"resume_allow_changes=[data.batch_size]"
    )


# -- runtime -------------------------------------------------------------------------------------------------
def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The whole run config with interpolations resolved (no ``hydra`` node): saved in checkpoints and W&B."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return container


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of a run folder: new for a fresh start, kept when resuming from a checkpoint, so a resumed
    sitting (``ckpt_path=last``) logs into the same W&B run (offline, each sitting is a folder
    ``offline-run-*-<id>[-N]``; ``wandb sync`` puts them together)."""
    path = Path(run_dir) / "wandb_run_id"
    if not resuming or not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(4))  # 8 lowercase hex characters: a valid W&B run id
    return path.read_text().strip()


def make_loggers(cfg: DictConfig, tags: list[str], run_dir: Path | None = None, resuming: bool = False) -> list[Any]:
    loggers = []
    for key, lcfg in (cfg.get("logger") or {}).items():
        if not isinstance(lcfg, DictConfig) or "_target_" not in lcfg:
            continue
        kwargs: dict[str, Any] = {}
        if lcfg._target_.endswith("WandbLogger"):
            kwargs["tags"] = tags
            if run_dir is not None and not lcfg.get("id"):
                kwargs.update(id=wandb_run_id(run_dir, resuming), resume="allow")
            mode = os.environ.get("WANDB_MODE")
            if mode:  # the environment wins over offline: true (WANDB_MODE=online|offline|disabled)
                kwargs.update(offline=mode in ("offline", "dryrun"), mode=mode)
        loggers.append(instantiate(lcfg, **kwargs))
    return loggers


def make_callbacks(cfg: DictConfig) -> list[Any]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None and "_target_" in c]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def refuse_if_busy(run_dir: Path) -> None:
    """Raise if a live moe-train holds ``<run_dir>/.running`` (another host's lock counts as live); a free run dir
    or a stale lock (a dead pid) passes. Reads only."""
    lock = run_dir / ".running"
    try:
        host, _, pid = lock.read_text().partition(" ")
    except (FileNotFoundError, NotADirectoryError):
        return
    if host == socket.gethostname() and not (pid.isdigit() and _pid_alive(int(pid))):
        return
    raise ValueError(f"another moe-train ({host} pid {pid}) is running in {run_dir}: wait for it, or use another "
                     f"experiment=/name= (delete {lock} if that run is gone)")


def claim_run_dir(run_dir: Path) -> Path:
    """Refuse to share a run dir with a live moe-train (same command started twice): ``<run_dir>/.running``
    holds the owner's host and pid; a stale one (dead pid) is taken over. Returns the lock file to remove."""
    lock, me = run_dir / ".running", f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            refuse_if_busy(run_dir)
            lock.unlink(missing_ok=True)  # stale: its process is dead
            continue
        except OSError as e:
            raise write_error(e, lock, "the run dir's lock") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return lock
    raise ValueError(f"could not claim {run_dir} ({lock} keeps reappearing)")


def prepare_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Once the run dir is ours: clear temp files of checkpoint writes that a killed run left, and write Hydra's
    record of the run (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``; ``conf/config.yaml`` sets
    ``hydra.output_subdir: null`` so that Hydra itself writes nothing before the checks)."""
    for stale in remove_temp_files(run_dir / "checkpoints"):
        log.info("removed %s (a checkpoint write interrupted by a killed run)", stale)
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return
    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}, as Hydra saves it
    out = run_dir / ".hydra"
    try:
        out.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out / "config.yaml")  # the task config, interpolations kept (as Hydra writes it)
        OmegaConf.save(hydra_cfg, out / "hydra.yaml")
        OmegaConf.save(hydra_cfg.hydra.overrides.task, out / "overrides.yaml")
    except OSError as e:
        raise write_error(e, out, "Hydra's config record") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Run:
    """Everything one training run needs, built and checked."""

    config: dict[str, Any]
    run_dir: Path
    datamodule: Any
    model: Transformer
    lit: Any
    trainer: Any
    ckpt_path: str | None
    tags: list[str]
    resources: Any = None
    lock: Path | None = None  # <run_dir>/.running while this process trains; train.run removes it


def build(cfg: DictConfig) -> Run:
    """Build and check everything; nothing is trained yet. The checks only read; the run dir is claimed (see
    :func:`claim_run_dir`) before the objects are built, and prepared (:func:`prepare_run_dir`) once the last check
    (those that need the built trainer) has passed."""
    config = resolved_config(cfg)
    config["choices"] = config_choices(cfg)
    run_dir = Path(config["run_dir"])
    args = check_config(cfg)
    # DDP: Lightning (or torchrun) starts the other ranks with the same command; only rank 0 owns the run dir
    rank0 = launch_rank() == 0
    if rank0:  # first: a live run's checkpoint would otherwise be the reason given
        refuse_if_busy(run_dir)
    ckpt_path = resolve_ckpt_path(cfg, run_dir)
    if ckpt_path is not None:
        check_checkpoint(config, ckpt_path, allow=cfg.get("resume_allow_changes"))
    lock = claim_run_dir(run_dir) if rank0 else None
    try:
        if ckpt_path is None and cfg.get("ckpt_path") == "last":
            log.info("ckpt_path=last: no %s yet, starting from scratch", run_dir / "checkpoints" / "last.ckpt")
        return _build(cfg, config, run_dir, args, ckpt_path, lock)
    except BaseException:
        if lock is not None:
            lock.unlink(missing_ok=True)
        raise


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun/SLURM: ``RANK``/``SLURM_PROCID``; Lightning's
    DDP children: ``NODE_RANK``/``LOCAL_RANK``, nonzero for every child); 0 for a plain single process."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    node, local = os.environ.get("NODE_RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    return 0 if node in ("", "0") and local in ("", "0") else 1


def _build(cfg: DictConfig, config: dict[str, Any], run_dir: Path, args: ModelArgs, ckpt_path: str | None,
           lock: Path | None) -> Run:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    check_data(args, datamodule)
    resources = make_resources(datamodule)

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # model init independent of what data setup consumed
    model = build_model(cfg, resources=resources)
    if cfg.get("compile"):
        model.compile()  # in place: parameter names (and checkpoints) stay those of the eager model
    tags = [router_name(cfg), f"seed-{cfg.seed}"] + ([] if model.causal else ["non-causal"]) + swept_tags(cfg)
    loggers = make_loggers(cfg, tags, run_dir if launch_rank() == 0 else None, resuming=ckpt_path is not None)
    stop = SaveOnStop(run_dir / "checkpoints" / "last.ckpt")  # the stop step (max_steps, Ctrl-C) is saved
    trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=[*make_callbacks(cfg), stop], plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
    )
    check_bias_balancing(model, trainer.callbacks)
    lit = LitMoE(
        model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        loss_coefficients=OmegaConf.to_container(cfg.loss, resolve=True),
        domains=list(getattr(datamodule, "domains", ["all"])),
        config=config,
        # the full model is built (same seed) on every rank; LitMoE.configure_model shards its experts
        expert_parallel=check_expert_parallel(expert_parallel_size(cfg), args, trainer, expert_parallel_key(cfg)),
        router_lr_scale=cfg.get("router_lr_scale", 1.0),
        load_balance_scope=cfg.get("load_balance_scope", "local"),
        one_copy_per_rank=bool((cfg.get("parallel") or {}).get("one_copy_per_rank", False)),
        overlap=bool((cfg.get("parallel") or {}).get("overlap", False)),
        optimizer_impl=optimizer_impl(cfg),
    )
    if ckpt_path is not None:
        check_global_batch(ckpt_path, datamodule, trainer, cfg.get("resume_allow_changes"))
    if lock is not None:  # the last check passed: the run dir is ours to write into
        prepare_run_dir(run_dir, cfg)
    for lg in loggers:  # the full resolved config, once
        lg.log_hyperparams(config)
    return Run(config, run_dir, datamodule, model, lit, trainer, ckpt_path, tags, resources, lock)
