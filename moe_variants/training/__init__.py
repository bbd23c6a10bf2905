"""One training run, from a composed Hydra config to a report.

Owns: the ``moe-train`` app (``run``: config -> checks -> build -> fit -> report, top to bottom), building the
run's objects from config (``build``), the thin Lightning module (``lit``: loss, logging, optimizer), the LR
schedule (``schedule``), how the optimizer's update runs (``optim``: fused, foreach or compiled), checkpoint IO
(``checkpoint``), training callbacks (``callbacks``: routing metrics; ``throughput``: tokens/s, MFU, time split;
``dashboard``: W&B summaries and images; ``console``: progress bar and log lines), run names (``naming``), the run
report (``report``), the HF export of a run (``export``) and the ``moe-audit`` app (``audit``: a router config
audited on the run's tokenizer and corpus).

May import: every other layer (``model``, ``routers``, ``data``, ``parallel``, ``analysis.metrics`` and
``analysis.plots``), Hydra, Lightning, W&B. Nothing below it imports ``training``, except ``analysis.analyze``,
which loads checkpoints.
"""
