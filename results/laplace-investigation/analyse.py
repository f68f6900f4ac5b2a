"""Phase 2 of the Laplace investigation (issue 31): predictive metrics and variance diagnostics from the moments
saved by ``moments.py`` (no model needed; seconds).

    .venv/bin/python results/laplace-investigation/analyse.py MOMENTS.pt
"""

import math
import sys

import torch

from varlora.methods._kfac import glm_probs
from varlora.metrics import compute_metrics

d = torch.load(sys.argv[1], weights_only=False)
mean, y, lengths = d["mean"], d["labels"], d["lengths"].double()
N, K = mean.shape
present = torch.isfinite(mean)
print(f"N={N}, delta*={d['delta_star']:.4g}, gamma={d['gamma']:.1f}, P={d['n_params']}, |theta|^2 by kind "
      f"{ {k: round(v, 1) for k, v in d['sq_norm'].items()} }")
print("log marglik:", {k: round(v, 1) for k, v in d["log_marglik"].items()})
map_pred = mean.argmax(1)


def row(name, probs):
    m = compute_metrics(probs, y)
    agree = (probs.argmax(1) == map_pred).double().mean() * 100
    ent = -(probs.clamp_min(1e-300).log() * probs).sum(1).mean()
    print(f"| {name} | {m['acc']:.1f} | {agree:.1f} | {m['nll']:.3f} | {m['ece']:.1f} | {m['brier']:.3f} | "
          f"{probs.max(1).values.mean():.3f} | {ent:.3f} |")


def spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


print("\n| predictive | acc % | same argmax as MAP % | NLL | ECE % | Brier | mean max p | entropy |")
print("|---|---|---|---|---|---|---|---|")
row("MAP softmax(f*)", mean.softmax(1))
g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
for name, _, delta in d["configs"]:
    cov = d["cov"][name]
    if name.startswith("grid"):
        row(f"{name} mc", glm_probs(mean, cov, "mc", 100_000, g(), keep=10)[0])
        continue
    var = cov.diagonal(dim1=-2, dim2=-1)
    row(f"{name} (δ={delta:.3g}) mc", glm_probs(mean, cov, "mc", 100_000, g(), keep=10)[0])
    row(f"{name} probit", glm_probs(mean, cov, "probit")[0])
    centred = mean - mean.masked_fill(~present, 0).sum(1, keepdim=True) / present.sum(1, keepdim=True)
    row(f"{name} probit of f − mean_k f", glm_probs(centred, cov, "probit")[0])
    vbar = var.masked_fill(~present, 0).sum(1, keepdim=True) / present.sum(1, keepdim=True)
    row(f"{name} shared-κ probit", (mean / torch.sqrt(1 + math.pi / 8 * vbar)).softmax(1))

print("\nper-choice variance diagnostics (choices present only)")
for name, _, _ in d["configs"][:3]:
    cov = d["cov"][name]
    var = cov.diagonal(dim1=-2, dim2=-1)
    v, L = var[present], lengths[present]
    gaps = (mean.sort(1, descending=True).values[:, 0] - mean.sort(1, descending=True).values[:, 1])
    print(f"[{name}] median sd {v.sqrt().median():.3f}, median top-2 gap of f* {gaps.median():.3f}; "
          f"Spearman(var, length) {spearman(v, L):+.3f}; Spearman(‖J‖², length) "
          f"{spearman(d['JJt'].diagonal(dim1=-2, dim2=-1)[present], L):+.3f}")
    for lo, hi in ((1, 1), (2, 2), (3, 4), (5, 8), (9, 99)):
        sel = (L >= lo) & (L <= hi)
        if sel.any():
            print(f"   length {lo}-{hi} tokens: n={int(sel.sum())}, median var {v[sel].median():.3g}")
    probs = glm_probs(mean, cov, "mc", 100_000, g(), keep=10)[0]
    flip = probs.argmax(1) != map_pred
    to = probs.argmax(1)
    vmax = var.masked_fill(~present, -1).argmax(1)
    print(f"   flips: {int(flip.sum())}/{N}; the predictive's choice is the max-variance choice in "
          f"{(to == vmax).double().mean() * 100:.0f}% of all questions, "
          f"{(to[flip] == vmax[flip]).double().mean() * 100:.0f}% "
          f"of flips; the MAP choice is the max-variance one in {(map_pred == vmax).double().mean() * 100:.0f}%; "
          f"flipped-to choice shorter than the MAP choice in "
          f"{(lengths[flip, to[flip]] < lengths[flip, map_pred[flip]]).double().mean() * 100:.0f}% of flips "
          f"(longer {(lengths[flip, to[flip]] > lengths[flip, map_pred[flip]]).double().mean() * 100:.0f}%); "
          f"flips fix {int(((to == y) & flip).sum())}, break {int(((map_pred == y) & flip).sum())}")
