"""IVON across 2 CPU processes (gloo): each rank is an MC sample, and the step equals a single-process IVON
with ``mc_samples=2`` fed the ranks' two noises and batches."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from varlora import IVON

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD, STEPS = 2, 3
OPTIONS = dict(lr=0.05, ess=100.0, hess_init=0.5, beta2=0.99, weight_decay=1e-3, clip_radius=0.2, stats_every=1)


def setup() -> tuple[nn.Module, nn.Parameter]:
    torch.manual_seed(0)  # the same weights on every rank, and the same global seed
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))  # only rank 0 (sample 0) uses it
    return model, extra


def shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    return x, torch.stack([x[:, 0] * x[:, 1], x[:, 2] - x[:, 3]], dim=1)


def loss_fn(model: nn.Module, extra: nn.Parameter, rank: int) -> torch.Tensor:
    x, y = shard(rank)
    loss = nn.functional.mse_loss(model(x), y)
    return loss + (extra.square().sum() if rank == 0 else 0.0)


def _worker(rank: int, tmpdir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/store", rank=rank, world_size=WORLD)
    try:
        model, extra = setup()
        ddp = DistributedDataParallel(model)
        params = [*model.parameters(), extra]
        opt = IVON(params, **OPTIONS, sync=True)  # private generator, seed mixed with the rank
        perturbations = []
        for _ in range(STEPS):
            means = [p.detach().clone() for p in params]
            with opt.sampled_params(train=True):
                perturbations.append([p.detach() - m for p, m in zip(params, means, strict=True)])
                with ddp.no_sync():  # each rank's gradient is its own sample's
                    loss_fn(ddp, extra, rank).backward()
            opt.step()
        # without sync the ranks share their noise (for plain data-parallel DDP)
        shared = IVON(setup()[0].parameters(), **OPTIONS)
        with shared.sampled_params():
            shared_theta = [p.detach().clone() for group in shared.param_groups for p in group["params"]]
        torch.save(
            {
                "perturbations": perturbations,
                "params": [p.detach() for p in params],
                "state": [{k: v for k, v in opt.state[p].items()} for p in params],
                "stats": opt.last_step_stats,
                "shared": shared_theta,
            },
            f"{tmpdir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ranks_act_as_mc_samples(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # each rank drew its own noise; both applied the same update
    assert not torch.allclose(runs[0]["perturbations"][0][0], runs[1]["perturbations"][0][0])
    for a, b in zip(runs[0]["params"], runs[1]["params"], strict=True):
        assert torch.equal(a, b)
    assert runs[0]["stats"]["num_samples"] == WORLD
    for a, b in zip(runs[0]["shared"], runs[1]["shared"], strict=True):
        assert torch.equal(a, b)

    # oracle: one process, mc_samples = 2, sample r = rank r's noise and batch
    model, extra = setup()
    params = [*model.parameters(), extra]
    opt = IVON(params, **OPTIONS, mc_samples=WORLD)
    for step in range(STEPS):
        for rank, run in enumerate(runs):
            eps = [d / opt.posterior_std(p) for d, p in zip(run["perturbations"][step], params, strict=True)]
            with opt.sampled_params(train=True, noise=eps):
                loss_fn(model, extra, rank).backward()
        opt.step()
    for i, p in enumerate(params):
        torch.testing.assert_close(runs[0]["params"][i], p.detach(), rtol=0, atol=1e-12)
        for key in ("hess", "momentum"):
            torch.testing.assert_close(runs[0]["state"][i][key], opt.state[p][key], rtol=0, atol=1e-12)
        assert runs[0]["state"][i]["step"] == opt.state[p]["step"] == STEPS
    assert not torch.equal(extra.detach(), torch.ones(3, dtype=torch.float64))  # trained from rank 0 alone
