"""``moe-analyze``: the Mixtral paper's routing analysis (and OLMoE's) for any checkpoint, as files and W&B.

    moe-analyze ckpt=runs/default/topk-s0                      # our run dir or .ckpt, any router
    moe-analyze ckpt=/path/to/hf-mixtral-dir name=mixtral      # an HF Mixtral checkpoint directory

Runs the checkpoint over the validation split of each domain and writes ``results/<name>/``:
``table5.md`` / ``table5.csv`` (consecutive repeat rates per domain and layer, Mixtral Table 5),
``load_per_domain.png`` (Figure 7), ``load_heatmap.png`` (layers x experts), ``repeat_rates.png``
(Figure 10), ``tokens.html`` (Figure 8), ``predictability.md`` (token-id predictability, in-sample and held out
by document, and vocabulary and domain specialisation, each beside its value for uniformly random routing of
the same tokens), ``metrics.json`` (everything, per layer); and logs them to a W&B run in the project and group
of the analysed training run, with its config (router, seed, experiment), so that analysis panels group and
filter with the sweep. The figures show the first, middle and last layer, the middle being (n_layers - 1) // 2
as in the paper (15 of 32).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import hydra
import torch
import wandb
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe_variants import analysis as A
from moe_variants.data.datamodule import CorpusDataModule
from moe_variants.model.hf import load_hf
from moe_variants.model.transformer import Transformer
from moe_variants.paths import CONF_DIR
from moe_variants.routers.spans import piece_kinds, word_starts
from moe_variants.routers.topk import TopKRouter
from moe_variants.training.build import load_model
from moe_variants.training.checkpoint import nonfinite


def load_any(path: str) -> tuple[Transformer, dict[str, Any]]:
    """Our checkpoint (file or run dir) or an HF Mixtral directory -> (model, data settings)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        model = load_hf(p, router=TopKRouter).eval()
        bad = nonfinite(model.state_dict().items())
        if bad:
            raise ValueError(f"{p} holds NaN/inf weights ({', '.join(bad[:5])}): it cannot be analysed")
        return model, {"tokenizer": "mixtral", "source": "hf"}
    if not p.exists():
        raise FileNotFoundError(f"ckpt={path} does not exist: give a .ckpt file, a run dir or an HF Mixtral dir")
    model, cfg = load_model(p)
    data = OmegaConf.to_container(cfg.data, resolve=True) if "data" in cfg else {}
    return model, {"tokenizer": data.get("tokenizer", "mixtral"), "seq_len": data.get("seq_len"), "source": "ours",
                   "router": OmegaConf.to_container(cfg.router, resolve=True) if "router" in cfg else None,
                   "run_config": OmegaConf.to_container(cfg, resolve=True)}


@torch.no_grad()
def collect(model: Transformer, loaders: list, max_batches: int | None) -> dict[str, Any]:
    """Run every domain's validation loader; keep per-layer expert ids, logits and the batch annotations."""
    keep: dict[str, list] = {k: [] for k in ("input_ids", "domain_ids", "doc_start", "loss")}
    experts: list[list[torch.Tensor]] = [[] for _ in model.layers]
    dropped: list[list[torch.Tensor]] = [[] for _ in model.layers]
    entropy: list[list[float]] = [[] for _ in model.layers]  # per layer: [summed token entropies, tokens]
    for loader in loaders:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            out = model(batch["input_ids"], labels=batch["labels"])
            for k in ("input_ids", "domain_ids", "doc_start"):
                keep[k].append(batch[k])
            keep["loss"].append(torch.full((batch["input_ids"].shape[0],), float(out.lm_loss)))
            for layer, r in enumerate(out.routing):
                experts[layer].append(r.expert_ids)
                dropped[layer].append(torch.zeros_like(r.expert_ids, dtype=torch.bool) if r.dropped is None
                                      else r.dropped)
                if r.logits is not None:  # summed per token, so that the mean weighs every token alike
                    n = r.logits.shape[:-1].numel()
                    sums = entropy[layer] or [0.0, 0]
                    entropy[layer] = [sums[0] + A.router_entropy(r.logits) * n, sums[1] + n]
    data = {k: torch.cat(v) for k, v in keep.items()}
    data["expert_ids"] = [torch.cat(e) for e in experts]  # per layer (N, S, K)
    data["dropped"] = [torch.cat(d) for d in dropped]  # per layer (N, S, K) bool: copies no expert computed
    data["entropy"] = [e[0] / e[1] if e else None for e in entropy]  # mean over all tokens
    return data


def with_random_baselines(eids: torch.Tensor, ids: torch.Tensor, doc: torch.Tensor, dom: torch.Tensor, E: int,
                          K: int, D: int) -> dict[str, float]:
    """Token-id predictability (in-sample and held out by document), vocabulary specialisation (min_count 10)
    and domain specialisation (mean over domains of the largest expert share), each with ``<name>_random``: its
    value for uniformly random routing of the same tokens (mean of 4 draws). Their floors are not 1/E."""
    metrics = {
        "token_id_predictability": lambda e: A.token_id_predictability(e, ids),
        "token_id_predictability_heldout": lambda e: A.heldout_token_id_predictability(e, ids, doc),
        "vocabulary_specialization": lambda e: A.vocabulary_specialization(e, ids, E, min_count=10),
        "domain_specialization_max": lambda e: float(A.domain_specialization(e, dom, E, D).max(-1).values.nanmean()),
    }
    out = {}
    for name, fn in metrics.items():
        out[name] = fn(eids)
        out[f"{name}_random"] = A.random_routing_baseline(fn, ids.shape, E, K)
    return out


def analyze(model: Transformer, data: dict[str, Any], domains: list[str], pieces: list[str], out: Path,
            view_layers: list[int]) -> dict[str, Any]:
    E, K = model.args.num_experts, model.args.num_experts_per_tok
    D = len(domains)
    dom, doc, ids = data["domain_ids"], data["doc_start"], data["input_ids"]
    spans = word_starts(ids, piece_kinds(pieces))  # word spans as the span routers define them
    per_layer: list[dict[str, Any]] = []
    loads = {}
    for layer, eids in enumerate(data["expert_ids"]):
        rates = A.repeat_rates_per_domain(eids, dom, D, doc_start=doc)
        overall = A.consecutive_repeat_rates(eids, doc_start=doc)
        dropped = data["dropped"][layer]
        # loads count the copies that experts computed (capacity drops and expert choice's unused slots excluded),
        # read as one row of K = 1 choices
        kept_ids, kept_dom = eids[~dropped].view(1, -1), dom.unsqueeze(-1).expand_as(eids)[~dropped].view(1, -1)
        load_DE = A.expert_load_per_domain(kept_ids, kept_dom, E, D)
        loads[layer] = load_DE
        load = A.expert_load(kept_ids, E)
        per_layer.append({
            "layer": layer,
            "repeat_first": overall["first"], "repeat_any": overall["any"],
            "repeat_first_per_domain": dict(zip(domains, rates["first"].tolist())),
            "repeat_any_per_domain": dict(zip(domains, rates["any"].tolist())),
            "expert_load": load.tolist(), "load_balance": A.load_balance_stats(load),
            "expert_load_per_domain": dict(zip(domains, load_DE.tolist())),
            "domain_specialization": dict(zip(domains, A.domain_specialization(eids, dom, E, D).tolist())),
            "coactivation": A.expert_coactivation(eids, E).tolist() if K > 1 else None,
            **with_random_baselines(eids, ids, doc, dom, E, K, D),
            "span_coherence": A.span_coherence(eids, spans, doc_start=doc),
            "router_entropy": data["entropy"][layer],
            "drop_rate": float(dropped.float().mean()),  # share of the K slots no expert computed
            "unrouted": float(dropped.all(-1).float().mean()),  # share of tokens no expert computed
        })
    baselines = A.random_repeat_baselines(E, K)
    loss_per_domain = {d: float(data["loss"][(dom[:, 0] == i)].mean()) for i, d in enumerate(domains)
                       if (dom[:, 0] == i).any()}
    metrics = {"domains": domains, "num_experts": E, "top_k": K, "causal": model.causal,
               "routers": [r.describe() for r in model.routers[:1]], "baselines": baselines,
               "val_loss_per_domain": loss_per_domain, "layers": per_layer}
    out.mkdir(parents=True, exist_ok=True)
    write_table5(per_layer, domains, baselines, out)
    write_predictability(per_layer, out)
    A.plot_load_per_domain({layer: loads[layer] for layer in view_layers}, domains, out / "load_per_domain.png")
    A.plot_load_heatmap(torch.stack([torch.tensor(p["expert_load"]) for p in per_layer]), out / "load_heatmap.png")
    A.plot_repeat_rates({"first": {d: [p["repeat_first_per_domain"][d] for p in per_layer] for d in domains},
                         "any": {d: [p["repeat_any_per_domain"][d] for p in per_layer] for d in domains}},
                        baselines, out / "repeat_rates.png")
    (out / "tokens.html").write_text(token_page(data, domains, pieces, view_layers, E))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def write_table5(per_layer: list[dict], domains: list[str], baselines: dict, out: Path) -> None:
    header = ["domain"] + [f"first L{p['layer']}" for p in per_layer] + [f"any L{p['layer']}" for p in per_layer]
    rows = [[d] + [p["repeat_first_per_domain"][d] for p in per_layer] + [p["repeat_any_per_domain"][d]
                                                                           for p in per_layer] for d in domains]
    rows.append(["random baseline"] + [baselines["first"]] * len(per_layer) + [baselines["any"]] * len(per_layer))
    with open(out / "table5.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join([r[0]] + [f"{100 * v:.1f}%" for v in r[1:]]) + " |" for r in rows]
    (out / "table5.md").write_text(
        "Share of consecutive token pairs (same document) whose first-choice expert repeats (`first`) or whose "
        "top-K sets overlap (`any`), per domain and layer (Mixtral Table 5).\n\n" + "\n".join(md) + "\n")


PREDICTABILITY_COLUMNS = {
    "token_id_predictability": "token-id predictability",
    "token_id_predictability_heldout": "held out by document",
    "vocabulary_specialization": "vocabulary specialisation",
    "domain_specialization_max": "domain specialisation (max share)",
}


def write_predictability(per_layer: list[dict], out: Path) -> None:
    header = ["layer"] + [f"{label} | random" for label in PREDICTABILITY_COLUMNS.values()]
    md = ["| " + " | ".join(header) + " |", "|---|" + "---|---|" * len(PREDICTABILITY_COLUMNS)]
    for p in per_layer:
        md.append(f"| {p['layer']} | " + " | ".join(f"{p[k]:.3f} | {p[k + '_random']:.3f}"
                                                    for k in PREDICTABILITY_COLUMNS) + " |")
    (out / "predictability.md").write_text(
        "How much of the routing the token id (or the domain) explains, per layer, beside the same statistic for "
        "uniformly random routing of the same tokens (`random`, mean of 4 draws): that, not 1/E, is the floor. "
        "Token-id predictability is the accuracy of the best token id -> first expert table, fitted and scored on "
        "the same tokens (in-sample) or fitted on half of the documents and scored on the other half; vocabulary "
        "specialisation is OLMoE's (ids seen at least 10 times); domain specialisation is OLMoE's, the largest "
        "expert share of each domain's tokens, averaged over domains.\n\n" + "\n".join(md) + "\n")


def token_page(data: dict, domains: list[str], pieces: list[str], layers: list[int], E: int,
               n_tokens: int = 160) -> str:
    sections = []
    for i, d in enumerate(domains):
        rows = (data["domain_ids"][:, 0] == i).nonzero().flatten()
        if not len(rows):
            continue
        row = int(rows[0])
        toks = data["input_ids"][row, :n_tokens].tolist()
        for layer in layers:
            first = data["expert_ids"][layer][row, :n_tokens, 0].tolist()
            sections.append(A.token_html([pieces[t] for t in toks], first, E, title=f"{d}, layer {layer}"))
    return A.token_html_page(sections)


def run(cfg: DictConfig) -> dict[str, Any]:
    model, info = load_any(cfg.ckpt)
    n_layers = len(model.layers)
    view = list(cfg.layers) if cfg.layers else A.paper_layers(n_layers)
    bad = [layer for layer in view if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has layers 0..{n_layers - 1}")
    common = dict(tokenizer=info["tokenizer"], seq_len=cfg.seq_len or info.get("seq_len") or 256,
                  batch_size=cfg.batch_size, domains=list(cfg.domains) if cfg.domains else None,
                  val_sequences_per_domain=cfg.sequences_per_domain)
    if cfg.get("data"):  # a data config (conf/data/*.yaml) instead of the embedded corpus: data=datasets ...
        dm = instantiate(cfg.data, **common)
    else:
        dm = CorpusDataModule(corpus_dir=cfg.corpus_dir, **common)
    dm.setup("validate")
    if dm.vocab_size != model.args.vocab_size:
        raise ValueError(f"tokenizer vocabulary {dm.vocab_size} != model.vocab_size {model.args.vocab_size}")
    data = collect(model, dm.val_dataloader(), None)
    name = result_name(cfg.name, cfg.ckpt)
    out = Path(cfg.results_dir) / name
    pieces = [dm.tokenizer.id_to_token(i) or "" for i in range(dm.vocab_size)]
    metrics = analyze(model, data, dm.domains, pieces, out, view)
    metrics["checkpoint"] = str(cfg.ckpt)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if cfg.wandb:
        log_wandb(metrics, out, wandb_settings(info.get("run_config"), name, cfg))
    print(f"wrote {out}/: table5.md table5.csv predictability.md load_per_domain.png load_heatmap.png "
          f"repeat_rates.png tokens.html metrics.json")
    return metrics


def result_name(name: Any, ckpt: str) -> str:
    """``results/<name>/``: ``name`` as text (``name=7`` or ``name=nan`` parse as numbers), else the checkpoint's
    file or folder name."""
    return str(name) if name is not None else Path(ckpt).resolve().name.replace(".ckpt", "")


def wandb_settings(run_config: dict[str, Any] | None, name: str, cfg: DictConfig) -> dict[str, Any]:
    """``wandb.init`` arguments of the analysis run: the project and group of the analysed training run, its whole
    config (router, seed, experiment, choices, ...) plus an ``analysis`` section, and its router and seed as tags,
    so that analysis panels group and filter with the sweep. An HF checkpoint (no run config) goes to group
    ``analysis``. ``WANDB_MODE`` in the environment wins over ``cfg.wandb_mode`` (offline by default)."""
    run_config = dict(run_config or {})
    logger = (run_config.get("logger") or {}).get("wandb") or {}
    analysis = {"checkpoint": str(cfg.ckpt), "sequences_per_domain": cfg.sequences_per_domain, "seq_len": cfg.seq_len,
                "domains": OmegaConf.to_container(cfg.domains) if cfg.domains else None}
    tags = ["analysis"]
    if run_config:
        router = (run_config.get("choices") or {}).get("router") or str(run_config["router"]["_target_"]).rsplit(
            ".", 2)[-2]  # moe_variants.routers.<name>.<Class>, for checkpoints saved without choices
        tags += [router, f"seed-{run_config.get('seed')}"]
    return {
        "project": logger.get("project") or "moe-variants",
        "group": logger.get("group") or run_config.get("experiment") or "analysis",
        "name": f"analyze-{name}",
        "job_type": "analysis",
        "tags": tags,
        "config": {**run_config, "analysis": analysis},
        "mode": os.environ.get("WANDB_MODE") or cfg.get("wandb_mode") or "offline",
    }


def log_wandb(metrics: dict, out: Path, settings: dict[str, Any]) -> None:
    """One W&B run (in ``out/wandb``): Table 5, the figures and token view, per-layer metrics on a ``layer/layer``
    axis, and layer means in the summary (``analysis/<metric>``) for the runs table."""
    run = wandb.init(dir=str(out), **settings)
    with open(out / "table5.csv") as f:
        rows = list(csv.reader(f))
    run.log({"table5": wandb.Table(columns=rows[0], data=rows[1:]),
             **{k: wandb.Image(str(out / f"{k}.png")) for k in ("load_per_domain", "load_heatmap", "repeat_rates")},
             "tokens": wandb.Html(str(out / "tokens.html"))})
    run.define_metric("layer/*", step_metric="layer/layer")
    for p in metrics["layers"]:
        run.log({f"layer/{k}": v for k, v in p.items() if isinstance(v, (int, float))})
    for key in ("repeat_first", "repeat_any", "token_id_predictability"):
        values = [p[key] for p in metrics["layers"] if isinstance(p.get(key), (int, float)) and p[key] == p[key]]
        if values:
            run.summary[f"analysis/{key}"] = sum(values) / len(values)
    run.finish()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="analyze")
def main(cfg: DictConfig) -> None:
    run(cfg)
