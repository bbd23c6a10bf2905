"""Live routing metrics describe the step they are logged at (known answers from a router that encodes the step)."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import CONF_DIR, TEST_CONF_DIR
from hydra import compose, initialize_config_dir

from moe_variants.training.callbacks import to_host
from moe_variants.training.run import run

E = 8


def logged_loads(run_dir) -> dict[int, list[float]]:
    """step -> layer 0's logged expert shares, from the run's CSV log."""
    out = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("routing/layer0/load/e0"):
                    out[int(row["step"])] = [float(row[f"routing/layer0/load/e{j}"]) for j in range(E)]
    return out


def test_routing_metrics_describe_the_logged_step(tmp_path, every=3, accumulate=2):
    """The step router sends the n-th training forward to experts n % 8 and (n+1) % 8, so the load logged at step s
    (Lightning's logged step: optimizer steps before this one) must come from the last micro-batch of step s."""
    overrides = [f"hydra.searchpath=[file://{TEST_CONF_DIR}]", f"run_dir={tmp_path}", "name=steps", "logger=csv",
                 "model=tiny", "data=standin", "data.seq_len=16", "data.batch_size=2", "trainer.accelerator=cpu",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.max_steps=7",
                 f"trainer.log_every_n_steps={every}", f"++trainer.accumulate_grad_batches={accumulate}",
                 "trainer.val_check_interval=100", "scheduler.warmup_steps=1", "report=false",
                 "callbacks.checkpoint.every_n_train_steps=100", "router._target_=step_router.StepRouter",
                 "~router.jitter_eps", "~router.score_func", "~router.renormalize"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        run(compose("config", overrides=overrides))
    loads = logged_loads(tmp_path)
    assert sorted(loads) == [s for s in range(7) if (s + 1) % every == 0]  # Lightning flushes every `every` steps
    for step, load in loads.items():
        n = step * accumulate + accumulate - 1  # the forward of the step's last micro-batch
        expected = [0.5 if j in (n % E, (n + 1) % E) else 0.0 for j in range(E)]
        assert load == pytest.approx(expected), f"step {step}"


def test_to_host_keeps_the_structure_and_values():
    routing = [{"expert_ids": torch.tensor([[[1, 2]]]), "logits": None, "aux": {"z": torch.tensor(0.5)}},
               {"expert_ids": torch.tensor([[[0, 3]]]), "logits": torch.ones(1, 1, 4), "aux": {}}]
    host, doc_start = to_host((routing, None))
    assert doc_start is None and host[0]["logits"] is None and host[1]["aux"] == {}
    assert host[0]["expert_ids"].tolist() == [[[1, 2]]] and float(host[0]["aux"]["z"]) == 0.5
    assert torch.equal(host[1]["logits"], torch.ones(1, 1, 4)) and host[1]["logits"].device.type == "cpu"


@pytest.mark.gpu
def test_to_host_copies_from_the_gpu_in_one_wait():
    ids = torch.randint(0, 8, (2, 64, 2), device="cuda")
    host = to_host([{"expert_ids": ids, "aux": {"z": ids.float().mean()}}])
    assert host[0]["expert_ids"].device.type == "cpu" and torch.equal(host[0]["expert_ids"], ids.cpu())
    assert float(host[0]["aux"]["z"]) == float(ids.float().mean())


def test_routing_metrics_refuse_another_interval():
    from moe_variants.training.callbacks import RoutingMetrics

    class Trainer:
        log_every_n_steps, global_step = 10, 0

    with pytest.raises(ValueError, match=r"every_n_steps=5\).*log_every_n_steps=10"):
        RoutingMetrics(every_n_steps=5).on_train_start(Trainer(), None)
    RoutingMetrics(every_n_steps=10).on_train_start(Trainer(), None)
