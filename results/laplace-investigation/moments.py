"""Phase 1 of the Laplace investigation (issue 31): fit the K-FAC posterior on a finished ``adamw`` run exactly as
``laplace`` does (64 training questions, marginal-likelihood δ), then save, per validation question, the MAP
choice scores f*, the choice lengths (continuation tokens), and the GLM covariance J Σ Jᵀ for several
posteriors that differ only in δ or in a scale c of the curvature (Σ⁻¹ = c·G⊗A + δ I), from one Jacobian pass.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python results/laplace-investigation/moments.py RUN_DIR OUT.pt
"""

import sys
import time
from pathlib import Path

import torch

from varlora.config import RunConfig
from varlora.evaluate import eval_mode
from varlora.methods import build_method
from varlora.methods._kfac import KronLaplace, _Capture, _finite, _rows, fit_kron_factors, lora_layers
from varlora.run_paths import RunPaths
from varlora.session import setup

run_dir, out_path = sys.argv[1], sys.argv[2]
limit = int(sys.argv[3]) if len(sys.argv) > 3 else 300
config = RunConfig.load(RunPaths(Path(run_dir)).config)
session = setup(config, run_dir)  # with the training questions (load_run leaves them out)
method = build_method(session)
method.load(RunPaths(Path(run_dir)).final)
model, scorer = session.model, session.scorer
layers = lora_layers(model, "all")
fn = lambda batch: scorer.choice_logits(model, batch)  # noqa: E731

t0 = time.perf_counter()
train = session.train_examples
batches = (scorer.collate(train[i : i + 4]) for i in range(0, len(train), 4))
with eval_mode(model):
    factors, n_data, log_lik = fit_kron_factors(fn, layers, batches)
la = KronLaplace.from_factors(factors, {n: m.weight for n, m in layers.items()}, n_data, log_lik)
delta_star = la.optimize_prior_precision()
print(f"fit {time.perf_counter() - t0:.0f} s: n={n_data} delta*={delta_star:.4g} gamma={la.effective_params():.1f} "
      f"|theta|^2={la.map_sq_norm:.1f} P={la.n_params}", flush=True)
# |theta|^2 by kind (A vs B)
sq = {k: sum(float(m.weight.double().pow(2).sum()) for n, m in layers.items() if f".lora_{k}." in n) for k in "AB"}
print("sq norm A, B:", sq, flush=True)

# posteriors: (name, curvature scale c, delta)
configs = [("d*", 1.0, delta_star)] + [(f"d*x{s:g}", 1.0, delta_star * s) for s in (10, 100, 1000, 10000)]
for c in (4.0, 35.0):  # proxy for summing the curvature over 4x / 35x (all 2241 ARC-Easy train) questions
    scaled = KronLaplace({n: (lg * c, qg, l_a, qa) for n, (lg, qg, l_a, qa) in la.eig.items()}, la.map_sq_norm,
                         la.n_params, la.n_data, la.log_lik * c)
    d = scaled.optimize_prior_precision()
    print(f"curvature x{c:g}: marglik delta={d:.4g} gamma={scaled.effective_params():.1f}", flush=True)
    configs.append((f"G x{c:g}, marglik", c, d))
configs += [(f"grid 1e{e}", 1.0, 10.0**e) for e in range(-1, 7)]  # the validation-NLL curve over δ
inv = {name: {n: 1.0 / (c * la.eigenvalues(n) + d) for n in la.eig} for name, c, d in configs}

def save(done):
    rows = torch.tensor(order[:done])

    def unsort(parts):
        x = torch.cat(parts)
        out = torch.empty_like(x)
        out[rows.argsort()] = x
        return out

    torch.save({"mean": unsort(means), "lengths": unsort(lens), "JJt": unsort(jj),
                "cov": {name: unsort(covs[name]) for name, _, _ in configs},
                "configs": configs, "labels": torch.tensor([examples[i].label for i in sorted(order[:done])]),
                "sq_norm": sq, "delta_star": delta_star, "gamma": la.effective_params(), "n_params": la.n_params,
                "log_marglik": {name: float(la.log_marglik(d)) for name, c, d in configs if c == 1.0}}, out_path)


examples = session.val_examples[:limit]
order = list(range(len(examples)))  # validation order (seed-0 random): any prefix is a random subset
means, lens, jj, covs = [], [], [], {name: [] for name, _, _ in configs}
with eval_mode(model):
    for start in range(0, len(order), 16):
        batch = scorer.collate([examples[i] for i in order[start : start + 16]])
        with torch.enable_grad(), _Capture(layers) as cap:
            raw = fn(batch)
        f, present = _finite(raw)
        B, K = f.shape
        records = cap.records()
        tilde_a = []
        for name, x, _ in records:
            a = _rows(x).float()
            tilde_a.append((a @ la.eig[name][3]).reshape(B, -1, a.shape[-1]))
        Jt = {n: torch.zeros(K, B, *la.eigenvalues(n).shape) for n in la.eig}
        outputs = [o for _, _, o in records]
        for k in range(K):
            v = torch.nn.functional.one_hot(torch.tensor(k), K).to(f).expand(B, K)
            grads = torch.autograd.grad(f, outputs, grad_outputs=v, retain_graph=k < K - 1, allow_unused=True)
            for (name, _, _), at, g in zip(records, tilde_a, grads, strict=True):
                if g is not None:
                    g = _rows(g).float() @ la.eig[name][1]
                    Jt[name][k] += torch.einsum("bso,bsi->boi", g.reshape(B, -1, g.shape[-1]), at)
        jj.append(sum(torch.einsum("kboi,lboi->bkl", jt, jt).double() for jt in Jt.values()))
        for name, _, _ in configs:
            covs[name].append(sum(torch.einsum("kboi,oi,lboi->bkl", Jt[n], inv[name][n], Jt[n]).double()
                                  for n in Jt))
        means.append(f.detach().double().masked_fill(~present, float("-inf")))
        lens.append(batch["continuation_mask"].sum(-1).view(B, K))
        save(start + B)  # after every batch: a prefix of the (random) validation order is a random subset
        print(f"{start + B}/{len(order)} {time.perf_counter() - t0:.0f} s", flush=True)

print("saved", out_path, f"{time.perf_counter() - t0:.0f} s")
