"""Figures of a comparison: reliability diagrams, the τ trade-off (paper Fig. 1), accuracy vs time (Fig. 2),
selective prediction (accuracy–coverage curves).

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

__all__ = ["reliability_diagrams", "tau_tradeoff", "accuracy_vs_time", "accuracy_coverage"]


def _grid(n: int, width: float, height: float, max_columns: int = 4):
    """A figure with ``n`` panels in rows of at most ``max_columns``; unused panels hidden. Returns (fig, axes)
    with axes a flat list of the ``n`` panels."""
    columns = min(n, max_columns)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n], columns


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
    their mean confidence, the small number above a bar its count of examples (the MCE is the largest gap,
    however few examples its bin holds), and the title gives ECE and MCE with the number of bins.
    """
    fig, axes, columns = _grid(len(predictions), 3.4, 3.6)
    edges = torch.linspace(0, 1, n_bins + 1)
    centers = ((edges[:-1] + edges[1:]) / 2).tolist()
    for ax, (method, (confidence, correct)) in zip(axes, predictions.items(), strict=True):
        bins = confidence_bins(confidence, correct, n_bins)
        filled = bins.count > 0
        acc = torch.where(filled, bins.accuracy, torch.zeros(n_bins)).tolist()
        conf = torch.where(filled, bins.confidence, torch.tensor(centers)).tolist()
        ax.bar(centers, acc, width=1 / n_bins, edgecolor="black", color="#4C72B0", label="accuracy")
        ax.bar(centers, [c - a for a, c in zip(acc, conf, strict=True)], bottom=acc, width=1 / n_bins,
               edgecolor="#C44E52", color="#C44E52", alpha=0.35, label="gap to confidence")
        for x, a, c, count in zip(centers, acc, conf, bins.count.tolist(), strict=True):
            if count:  # above the bar, or inside its top where the bar reaches the frame (white on the dark bar)
                top = max(a, c)
                ax.text(x, min(top, 0.9) + 0.01, str(count), ha="center", va="bottom", fontsize=5.5, rotation=90,
                        color="white" if a > 0.9 else "black")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_title(f"{method}  (n={len(confidence)})\nECE {100 * bins.ece:.1f}%  MCE {100 * bins.mce:.1f}% "
                     f"({n_bins} bins)", fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for index, ax in enumerate(axes):
        if index % columns == 0:
            ax.set_ylabel("accuracy")
        if index >= len(axes) - columns:
            ax.set_xlabel("confidence")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    if title:
        fig.suptitle(title, fontsize=11, y=1.02)
    return _save(fig, path)


def tau_tradeoff(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                 baselines: Mapping[str, Mapping[str, Any]] | None = None, title: str = "",
                 styles: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Error (%) against NLL (top row) and against ECE (%) (bottom row) as τ goes 0 → 1, one column per task
    (Cong et al., Fig. 1).

    ``curves[task]`` is a list of metric rows with keys ``tau``, ``acc``, ``nll``, ``ece``; ``styles[task]``
    (optional) its ``color`` (default C0) and the ``label`` that names it in the legend (default: none).
    ``baselines[task]`` (optional) is the MAP row, drawn as a cross: ``acc``, ``nll``, ``ece``, and its
    ``color`` (default C3) and ``label`` (default "MAP").
    """
    fig, axes = plt.subplots(2, len(curves), figsize=(3.2 * len(curves), 6), squeeze=False)
    for column, (task, rows) in enumerate(curves.items()):
        rows = sorted(rows, key=lambda r: r["tau"])
        error = [100 - r["acc"] for r in rows]
        style = {"color": "C0", "label": "", **(styles or {}).get(task, {})}
        for ax, key, label in ((axes[0][column], "nll", "NLL"), (axes[1][column], "ece", "ECE (%)")):
            ax.plot([r[key] for r in rows], error, "-o", color=style["color"], markersize=4,
                    label=f"{style['label']}, τ 0→1" if style["label"] else "τ 0→1")
            for r, e in zip(rows, error, strict=True):
                ax.annotate(f"τ={r['tau']:g}", (r[key], e), fontsize=7, color=style["color"], xytext=(3, 3),
                            textcoords="offset points")
            if baselines and task in baselines:
                ax.plot(baselines[task][key], 100 - baselines[task]["acc"], "x",
                        color=baselines[task].get("color", "C3"), markersize=9,
                        label=baselines[task].get("label", "MAP"))
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


_AXES = {"train_seconds": "training time (s)", "epoch": "epochs", "acc": "validation accuracy (%)",
         "nll": "validation NLL"}


def accuracy_vs_time(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, title: str = "",
                     styles: Mapping[str, Mapping[str, Any]] | None = None,
                     panels: Mapping[str, str] | None = None, x: str = "train_seconds", y: str = "acc") -> Path:
    """Validation accuracy against cumulative training wall-clock seconds (Cong et al., Fig. 2), or any other
    pair of the periodic evaluations' fields ``x``, ``y`` (e.g. the NLL against epochs: over-fitting shows as a
    rise past the minimum).

    ``curves[key]`` is a list of periodic-evaluation rows with ``x`` and ``y``; ``styles[key]``
    (optional) holds matplotlib line options, e.g. a colour per method and a line style per seed (a ``label``
    there names the legend entry, the key otherwise; lines of one label share one entry); ``panels[key]``
    (optional) the panel (e.g. the task) the curve is drawn in, one panel if absent.
    """
    names = list(dict.fromkeys((panels or {}).get(key, "") for key in curves))
    fig, axes, columns = _grid(len(names), 4.6, 3.6, max_columns=3)
    entries: dict[str, Any] = {}
    for key, rows in curves.items():
        style = {"marker": "o", "markersize": 3, "label": key, **((styles or {}).get(key, {}))}
        ax = axes[names.index((panels or {}).get(key, ""))]
        (line,) = ax.plot([r[x] for r in rows], [r[y] for r in rows], **style)
        entries.setdefault(style["label"], line)
    for index, (ax, name) in enumerate(zip(axes, names, strict=True)):
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if index % columns == 0:
            ax.set_ylabel(_AXES.get(y, y))
        if index >= len(axes) - columns:
            ax.set_xlabel(_AXES.get(x, x))
    fig.legend(list(entries.values()), list(entries), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.tight_layout()
    if title:
        fig.suptitle(title, fontsize=11, y=1.02)
    return _save(fig, path)


def accuracy_coverage(panels: Mapping[str, Mapping[str, tuple[Any, Any]]], path: str | Path, title: str = "",
                      styles: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Selective prediction: accuracy (%) against coverage, one panel per key of ``panels`` (e.g. a task) and
    one line per method, from :func:`varlora.metrics.accuracy_coverage_curve`.

    ``panels[name][label]`` is (coverage (G,), accuracy % (G,)); ``styles[label]`` optional line options.
    """
    fig, axes, columns = _grid(len(panels), 3.8, 3.4, max_columns=3)
    for ax, (name, lines) in zip(axes, panels.items(), strict=True):
        for label, (coverage, acc) in lines.items():
            style = {"linewidth": 1.2, **((styles or {}).get(label, {}))}
            ax.plot(torch.as_tensor(coverage).tolist(), torch.as_tensor(acc).tolist(), label=label, **style)
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    for index, ax in enumerate(axes):
        if index % columns == 0:
            ax.set_ylabel("accuracy (%)")
        if index >= len(axes) - columns:
            ax.set_xlabel("coverage")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # every label once, whichever panel has it
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.tight_layout()
    if title:
        fig.suptitle(title, fontsize=11, y=1.02)
    return _save(fig, path)
