"""Routing churn (``callbacks.RoutingChurn``): the set comparison on constructed ids, a hash run's churn is 0, a
learned run's is not, and the history survives a resume."""

from __future__ import annotations

import contextlib
import csv
from types import SimpleNamespace

import pytest
import torch
from test_train import SMALL, compose_run

from moe_variants import ModelArgs, Transformer
from moe_variants.analysis.metrics import expert_sets, set_churn
from moe_variants.routers.topk import TopKRouter
from moe_variants.training.callbacks import RoutingChurn
from moe_variants.training.run import run

VAL_EVERY_2 = [*SMALL, "trainer.val_check_interval=2", "scheduler.total_steps=4", "optimizer.lr=1e-2"]


def test_set_churn_ignores_the_order_inside_a_set():
    before = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]]])  # (tokens=2, layers=2, K=2)
    after = torch.tensor([[[1, 0], [2, 4]], [[5, 4], [7, 6]]])  # token 0 layer 1 changed; the rest reordered
    assert set_churn(before, after).tolist() == [[False, True], [False, False]]
    assert float(set_churn(before, after).float().mean()) == 0.25
    assert not set_churn(before, before.flip(-1)).any()
    # a dropped slot leaves the set: {5} differs from {3, 5}
    dropped = torch.tensor([[False, True]])
    assert expert_sets(torch.tensor([[5, 3]]), dropped).tolist() == [[-1, 5]]
    assert set_churn(expert_sets(torch.tensor([[5, 3]]), dropped), torch.tensor([[3, 5]])).tolist() == [True]
    with pytest.raises(ValueError, match="same tokens and layers"):
        set_churn(before, after[:1])
    with pytest.raises(ValueError, match="sequences_per_domain"):
        RoutingChurn(sequences_per_domain=0)


def logged(run_dir, key: str) -> dict[int, float]:
    rows = csv.DictReader(open(next(run_dir.glob("csv/version_*/metrics.csv"))))
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.mark.parametrize("router, moves", [("hash", False), ("topk", True)])
def test_hash_routing_never_churns_and_learned_routing_does(router, moves, tmp_path):
    report = run(compose_run(tmp_path, f"router={router}", *VAL_EVERY_2, "trainer.max_steps=4"))
    churn = report["churn"]
    assert [h["step"] for h in churn] == [2, 4]
    if moves:
        assert churn[-1]["churn_from_init"] > 0 and all(h["churn"] > 0 for h in churn)
    else:
        assert all(h["churn"] == 0 and h["churn_from_init"] == 0 for h in churn)
    assert logged(tmp_path, "routing/churn") and logged(tmp_path, "routing/churn/layer_1")
    layers = [logged(tmp_path, f"routing/churn/layer_{i}")[3] for i in range(2)]  # csv step = global_step - 1
    assert sum(layers) / 2 == pytest.approx(churn[-1]["churn"])
    assert "Routing churn on the probe batch at step 4" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_churn_history_goes_on_across_a_resume(tmp_path):
    whole = run(compose_run(tmp_path / "whole", *VAL_EVERY_2, "trainer.max_steps=4"))
    run(compose_run(tmp_path / "resumed", *VAL_EVERY_2, "trainer.max_steps=2"))
    resumed = run(compose_run(tmp_path / "resumed", *VAL_EVERY_2, "trainer.max_steps=4", "ckpt_path=last"))
    assert resumed["churn"] == whole["churn"] and whole["churn"][-1]["churn_from_init"] > 0
    assert resumed["val_loss"] == whole["val_loss"]


def test_every_probe_forward_has_the_same_batch_size():
    """A probe of 11 windows runs as two forwards of 8 rows (a smaller last batch would make a compiled model
    compile again); the sets of the 11 windows are those of each window alone (top-k routes token by token)."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=100, num_experts=4,
                     num_experts_per_tok=2, max_seq_len=16)
    model = Transformer(args, router=TopKRouter)
    shapes = []
    model.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
    churn = RoutingChurn()
    churn.probe = torch.randint(0, 100, (11, 16))
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    sets = churn.routing_sets(trainer, module)
    assert shapes == [(8, 16), (8, 16)]
    assert sets.shape == (11, 16, 2, 2)
    for i in (0, 9, 10):  # the first window, and two of the padded last forward
        single = RoutingChurn()
        single.probe = churn.probe[i : i + 1]
        assert torch.equal(single.routing_sets(trainer, module)[0], sets[i])
