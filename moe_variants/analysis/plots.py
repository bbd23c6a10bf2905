"""Figures of the routing analysis (Mixtral Figures 7 and 10 style, load heatmaps), written as PNG files.

matplotlib is imported lazily inside each function and drawn through the Agg canvas directly (no pyplot),
so importing this module is cheap and never switches the backend of a caller's session.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def _np(x: Any) -> Any:
    import numpy as np

    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=float)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_load_per_domain(
    load_DE_per_layer: Mapping[int, Any], domains: Sequence[str], path: str | Path, choice: str = "either choice"
) -> Path:
    """Mixtral Figure 7: per layer, the share of assignments of each domain to each expert.

    Args:
        load_DE_per_layer: layer index -> (D, E) shares (:func:`expert_load_per_domain`, rows sum to 1).
        domains: the D domain names, in row order.
        path: PNG file to write.
        choice: label of the routing choice counted, for the title.

    One panel per layer, grouped bars per expert (one bar per domain), dashed line at 1/E.
    """
    layers = sorted(load_DE_per_layer)
    fig = _figure(max(6.0, 1.2 * _np(load_DE_per_layer[layers[0]]).shape[1]), 2.6 * len(layers) + 0.8)
    axes = fig.subplots(len(layers), 1, squeeze=False, sharex=True)[:, 0]
    cmap = _cmap(len(domains))
    for ax, layer in zip(axes, layers):
        load = _np(load_DE_per_layer[layer])  # (D, E)
        D, E = load.shape
        width = 0.8 / D
        for d in range(D):
            xs = [e - 0.4 + width * (d + 0.5) for e in range(E)]
            ax.bar(xs, load[d], width=width, color=cmap(d), label=domains[d] if d < len(domains) else str(d))
        ax.axhline(1.0 / E, color="gray", linestyle="--", linewidth=1)
        ax.set_ylabel("share of assignments")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.set_xticks(range(E))
    axes[-1].set_xlabel("expert")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=8)
    fig.suptitle(f"Expert load per domain ({choice}; dashed = uniform 1/E)", fontsize=11)
    return _save(fig, path)


def plot_load_heatmap(
    load_LE: Any, path: str | Path, layers: Sequence[int] | None = None, title: str = "Expert load"
) -> Path:
    """Heatmap of per-layer expert shares: rows = layers, columns = experts (uniform = 1/E).

    Args:
        load_LE: (L, E) shares, e.g. ``torch.stack([expert_load(ids, E) for ids in routing])``.
        layers: row labels (default 0..L-1).
    """
    load = _np(load_LE)
    L, E = load.shape
    fig = _figure(max(4.0, 0.5 * E + 2.0), max(2.5, 0.3 * L + 1.2))
    ax = fig.subplots()
    im = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="share of assignments")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(E))
    labels = list(range(L)) if layers is None else list(layers)
    step = max(1, math.ceil(L / 32))
    ax.set_yticks(range(0, L, step), [str(labels[i]) for i in range(0, L, step)])
    ax.set_title(f"{title} (uniform = {1.0 / E:.3g})", fontsize=10)
    return _save(fig, path)


def plot_repeat_rates(
    rates_per_layer: Mapping[str, Any], baselines: Mapping[str, float] | float, path: str | Path
) -> Path:
    """Mixtral Figure 10: consecutive repeat rate per layer, one line per domain, dashed random baselines.

    Two accepted layouts:

    - ``{domain: [rate per layer]}``: one panel; every baseline value (a float, or each entry of a mapping
      such as :func:`random_repeat_baselines`' output) is drawn as a dashed line.
    - ``{"first": {domain: [...]}, "any": {domain: [...]}}``: one panel per key, each with its own dashed
      ``baselines[key]`` (Figure 10's "first choice" and "first or second choice" panels).
    """
    nested = all(isinstance(v, Mapping) for v in rates_per_layer.values())
    panels: dict[str, Mapping[str, Any]] = dict(rates_per_layer) if nested else {"": rates_per_layer}
    fig = _figure(6.5 * len(panels), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, per_domain) in zip(axes, panels.items()):
        cmap = _cmap(len(per_domain))
        for i, (domain, rates) in enumerate(per_domain.items()):
            ys = _np(rates)
            ax.plot(range(len(ys)), ys, marker="o", markersize=3, color=cmap(i), label=domain)
        if isinstance(baselines, Mapping):
            lines = {name: baselines[name]} if name in baselines else dict(baselines)
        else:
            lines = {"random": float(baselines)}
        for label, value in lines.items():
            ax.axhline(value, color="gray", linestyle="--", linewidth=1)
            ax.annotate(f"random {label}".strip(), (0, value), xytext=(2, 2), textcoords="offset points",
                        fontsize=7, color="gray")  # fmt: skip
        ax.set_xlabel("layer")
        ax.set_ylabel("repeat rate")
        ax.set_title({"first": "first choice", "any": "first or second choice"}.get(name, name), fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle("Repeated consecutive assignments per layer", fontsize=11)
    return _save(fig, path)


def _cmap(n: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10" if n <= 10 else "tab20"]
