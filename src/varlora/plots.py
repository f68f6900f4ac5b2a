"""Figures of a comparison: reliability diagrams, the τ trade-off (paper Fig. 1), accuracy vs time (Fig. 2).

All functions take plain data (probabilities, metric rows) and write one PNG; they never train or load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from varlora import _io  # noqa: E402
from varlora.metrics import confidence_bins  # noqa: E402

__all__ = ["reliability_diagrams", "tau_tradeoff", "accuracy_vs_time"]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with _io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def reliability_diagrams(
    predictions: Mapping[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, n_bins: int = 10,
    title: str = "",
) -> Path:
    """One reliability diagram per method: accuracy per top-label confidence bin against the diagonal.

    ``predictions`` maps a method name to (confidence (N,), correct (N,) bool), so that tasks with
    different numbers of choices can be pooled. Bars are the bins' accuracy, the red part the gap to
    their mean confidence, and the title gives ECE with its bin count.
    """
    fig, axes = plt.subplots(1, len(predictions), figsize=(3.6 * len(predictions), 3.6), squeeze=False)
    edges = torch.linspace(0, 1, n_bins + 1)
    centers = ((edges[:-1] + edges[1:]) / 2).tolist()
    for ax, (method, (confidence, correct)) in zip(axes[0], predictions.items(), strict=True):
        bins = confidence_bins(confidence, correct, n_bins)
        filled = bins.count > 0
        acc = torch.where(filled, bins.accuracy, torch.zeros(n_bins)).tolist()
        conf = torch.where(filled, bins.confidence, torch.tensor(centers)).tolist()
        ax.bar(centers, acc, width=1 / n_bins, edgecolor="black", color="#4C72B0", label="accuracy")
        ax.bar(centers, [c - a for a, c in zip(acc, conf, strict=True)], bottom=acc, width=1 / n_bins,
               edgecolor="#C44E52", color="#C44E52", alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_title(f"{method}  (n={len(confidence)})\nECE {100 * bins.ece:.1f}% ({n_bins} bins)", fontsize=10)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11, y=1.02)
    return _save(fig, path)


def tau_tradeoff(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                 baselines: Mapping[str, Mapping[str, float]] | None = None, title: str = "") -> Path:
    """Error (%) against NLL (top row) and against ECE (%) (bottom row) as τ goes 0 → 1, one column per task
    (Cong et al., Fig. 1).

    ``curves[task]`` is a list of metric rows with keys ``tau``, ``acc``, ``nll``, ``ece``; ``baselines[task]``
    (optional) is AdamW's row, drawn as a cross.
    """
    fig, axes = plt.subplots(2, len(curves), figsize=(3.2 * len(curves), 6), squeeze=False)
    for column, (task, rows) in enumerate(curves.items()):
        rows = sorted(rows, key=lambda r: r["tau"])
        error = [100 - r["acc"] for r in rows]
        for ax, key, label in ((axes[0][column], "nll", "NLL"), (axes[1][column], "ece", "ECE (%)")):
            ax.plot([r[key] for r in rows], error, "-o", color="C0", markersize=4, label="IVON, τ 0→1")
            for r, e in zip(rows, error, strict=True):
                ax.annotate(f"τ={r['tau']:g}", (r[key], e), fontsize=7, color="C0", xytext=(3, 3),
                            textcoords="offset points")
            if baselines and task in baselines:
                ax.plot(baselines[task][key], 100 - baselines[task]["acc"], "x", color="C3", markersize=9,
                        label="AdamW")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0][column].set_title(task, fontsize=10)
    for row in axes:
        row[0].set_ylabel("error (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    if title:
        fig.suptitle(title, fontsize=11, y=1.02)
    return _save(fig, path)


def accuracy_vs_time(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, title: str = "",
                     styles: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Validation accuracy against cumulative training wall-clock seconds (Cong et al., Fig. 2).

    ``curves[label]`` is a list of periodic-evaluation rows with ``train_seconds`` and ``acc``; ``styles[label]``
    (optional) holds matplotlib line options, e.g. a colour per method and a line style per seed.
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, rows in curves.items():
        style = {"marker": "o", "markersize": 3, **((styles or {}).get(label, {}))}
        ax.plot([r["train_seconds"] for r in rows], [r["acc"] for r in rows], label=label, **style)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)
