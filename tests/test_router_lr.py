"""``router_lr_scale``: the routers' own learning rate (parameter groups of ``LitMoE.configure_optimizers``), scaled
by the LR schedule like every other group; 0 freezes the routers at their init; bad values and resumes that change
it are refused."""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import pytest
import torch
from test_train import SMALL, compose_run

from moe_variants import Transformer
from moe_variants.model.losses import compose_loss
from moe_variants.model.routing import Router
from moe_variants.routers.topk import TopKRouter
from moe_variants.training.build import build_model, check_checkpoint, resolved_config
from moe_variants.training.checkpoint import CONFIG_KEY, read_checkpoint
from moe_variants.training.lit import LitMoE
from moe_variants.training.run import run
from moe_variants.training.schedule import warmup_cosine

LR = 1e-2


def router_names(model: Transformer) -> set[str]:
    return {f"{prefix}.{n}" for prefix, m in model.named_modules() if isinstance(m, Router)
            for n, _ in m.named_parameters()}


def train_steps(tiny_args, scale: float, steps: int, weight_decay: float = 0.1):
    """A tiny top-2 model trained ``steps`` AdamW steps on random tokens through ``LitMoE``'s optimizer and LR
    schedule (warmup 2 of 10 steps). Returns (initial weights, model, optimizer)."""
    torch.manual_seed(0)
    tiny_args = dataclasses.replace(tiny_args, vocab_size=512)
    model = Transformer(tiny_args, router=TopKRouter)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    lit = LitMoE(model, optimizer=lambda g: torch.optim.AdamW(g, lr=LR, weight_decay=weight_decay),
                 scheduler=lambda o: warmup_cosine(o, warmup_steps=2, total_steps=10), loss_coefficients={},
                 router_lr_scale=scale)
    conf = lit.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, tiny_args.vocab_size, (2, 16), generator=g)
        out = model(ids, labels=ids)
        loss, _ = compose_loss(out.lm_loss, out.routing, {"load_balance": 0.01, "z_loss": 0.001})
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return init, model, opt


def test_scale_one_keeps_the_two_groups_of_older_checkpoints(tiny_args):
    _, _, opt = train_steps(tiny_args, 1.0, steps=1)
    assert len(opt.param_groups) == 2  # decay, no_decay: what every checkpoint before the scale holds


def test_router_groups_hold_exactly_the_router_parameters(tiny_args):
    _, model, opt = train_steps(tiny_args, 0.5, steps=0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in opt.param_groups]
    assert len(groups) == 4 and groups[2] | groups[3] == router_names(model) and groups[2]
    assert not (groups[0] | groups[1]) & router_names(model)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1, 0.0]


def test_zero_scale_freezes_the_routers_at_init(tiny_args):
    init, model, opt = train_steps(tiny_args, 0.0, steps=4)
    routers = router_names(model)
    assert routers
    for n, p in model.named_parameters():
        if n in routers:
            assert torch.equal(p, init[n]), f"router parameter {n} moved"
            assert p.grad is not None and p.grad.abs().sum() > 0  # it had a gradient: the lr alone froze it
        elif not n.endswith("norm.weight"):
            assert not torch.equal(p, init[n]), f"{n} did not train"
    assert [g["lr"] for g in opt.param_groups[2:]] == [0.0, 0.0]


def test_first_adamw_step_moves_routers_by_the_scaled_lr(tiny_args):
    """AdamW's first step moves every weight with a nonzero gradient by lr x sign(grad) (|grad| >> eps), so with
    no decay the router weights move by 0.1 x what the other weights move: the warmup's first lr, lr/2."""
    init, model, opt = train_steps(tiny_args, 0.1, steps=1, weight_decay=0.0)
    routers = router_names(model)
    moves = {n: (p.detach() - init[n]).abs() for n, p in model.named_parameters()}
    router_move = torch.cat([moves[n][moves[n] > 0] for n in routers])
    other_move = torch.cat([moves[n][moves[n] > 0] for n in moves if n not in routers])
    torch.testing.assert_close(router_move.median(), torch.tensor(0.1 * LR / 2), rtol=1e-3, atol=0)
    torch.testing.assert_close(other_move.median(), torch.tensor(LR / 2), rtol=1e-3, atol=0)
    # the schedule scales every group by the same factor: the ratio stays 0.1 step after step
    _, _, opt = train_steps(tiny_args, 0.1, steps=5)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == lrs[1] and lrs[2] == lrs[3] and math.isclose(lrs[2], 0.1 * lrs[0], rel_tol=1e-12)


@pytest.mark.parametrize("bad", ["-0.1", "nan", "inf", "'x'"])
def test_bad_scale_is_refused_before_anything_is_written(bad, tmp_path):
    with pytest.raises(ValueError, match=r"router_lr_scale=.*finite number >= 0"):
        run(compose_run(tmp_path, f"router_lr_scale={bad}"))
    assert not any(tmp_path.iterdir())


def test_frozen_router_run_end_to_end_and_resume_refuses_a_new_scale(tmp_path):
    """A real run with router_lr_scale=0: its checkpointed routers equal the init the run built (same seed), the
    rest trained; resuming it with another scale is refused, naming the key."""
    cfg = compose_run(tmp_path, *SMALL, "router_lr_scale=0", "trainer.max_steps=3", "scheduler.total_steps=3",
                      "report=false")
    run(cfg)
    L.seed_everything(cfg.seed, verbose=False)  # what training.build does before building the model
    init = build_model(cfg).state_dict()
    state = read_checkpoint(tmp_path)["state_dict"]
    routers = {f"model.{n}" for n in router_names(build_model(cfg))}
    assert routers and all(torch.equal(state[n], init[n[len("model."):]]) for n in routers)
    assert not torch.equal(state["model.tok_embeddings.weight"], init["tok_embeddings.weight"])
    with pytest.raises(ValueError, match=r"router_lr_scale: checkpoint 0, config 1.0"):
        run(compose_run(tmp_path, *SMALL, "ckpt_path=last", "trainer.max_steps=3", "scheduler.total_steps=3"))

    # a checkpoint whose saved config has no router_lr_scale (written before it existed) trained with 1.0:
    # resuming it at 1.0 passes the config check, another scale is refused
    ckpt = read_checkpoint(tmp_path)
    del ckpt[CONFIG_KEY]["router_lr_scale"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    config = {**resolved_config(cfg), "router_lr_scale": 1.0}
    check_checkpoint(config, str(old))
    with pytest.raises(ValueError, match=r"router_lr_scale: checkpoint 1.0, config 0.5"):
        check_checkpoint({**config, "router_lr_scale": 0.5}, str(old))
