"""FSDP2 (``model.sharding=fsdp``) on 2 CPU processes with gloo: the sharded runs equal their unsharded
counterparts, resume exactly, and leave a posterior that one unsharded process loads and predicts with."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import build_assets, tiny_llama, tiny_tokenizer
from test_scoring import MC, MC_TASK, ListTask
from test_train_distributed import WORLD, _adapter, _config, _spawn
from varlora import IVON, distributed, sharding
from varlora.config import ConfigError, LoraArgs, ModelArgs, RunConfig
from varlora.evaluate import finish
from varlora.models import attach_lora, load_base_model, lora_parameters
from varlora.scoring import make_scorer
from varlora.tasks import Example
from varlora.train import load_run, train_run

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS = 3
# choices that the tiny tokenizer encodes as one token each (after a space)
ONE_TOKEN = [Example("t0", "Which one is a letter?", ("C", "a", "the", "True"), 0),
             Example("t1", "Hi?", ("the", "C", "a", "False"), 3)]
OPTIONS = dict(lr=0.05, ess=1e3, hess_init=0.1, beta2=0.99, weight_decay=1e-3, clip_radius=0.05, stats_every=1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    # 9 evaluation examples, batches of 4: rank 0 scores 5 (2 batches), rank 1 scores 4 (1 batch and an empty one)
    return build_assets(tmp_path_factory.mktemp("assets"), n_train=32, n_val=9)


def _lora_llama() -> torch.nn.Module:
    model = attach_lora(tiny_llama(seed=0, dtype=torch.float64), LoraArgs(r=4, alpha=8, dropout=0.0), seed=1)
    return model.train()


def _ivon_run(rank: int, model: torch.nn.Module) -> dict:
    """STEPS IVON steps on this rank's half of each batch, gradients averaged over ranks, then one evaluation
    sample."""
    params = lora_parameters(model)
    opt = IVON(list(params.values()), **OPTIONS)  # generator=None: every rank draws the same noise (sync=False)
    stats = []
    for step in range(STEPS):
        ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(10 * step + rank))
        noise = opt.draw_noise() if step == STEPS - 1 else None  # the last step's ε drawn ahead (DTensors if sharded)
        with opt.sampled_params(train=True, grad_transform=distributed.average_gradients, max_grad_norm=0.5,
                                noise=noise):
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        stats.append(opt.last_step_stats)
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(99))
    with torch.no_grad(), opt.sampled_params(generator=torch.Generator().manual_seed(7)):
        logits = model(input_ids=ids).logits
    return {"params": sharding.full_tensors(dict(params)), "logits": logits, "stats": stats,
            "state": sharding.full_tensors({n: {k: opt.state[p][k] for k in ("hess", "momentum")}
                                            for n, p in params.items()})}


def _optimizer_worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)  # the same initial seed on both ranks: IVON's private generators agree
        replicated = _lora_llama()
        dp = _ivon_run(rank, replicated)
        torch.manual_seed(0)
        model = _lora_llama()
        sharding.shard_model(model)
        params = list(lora_parameters(model).values())
        local = {tuple(p.to_local().shape) for p in params}
        with pytest.raises(ValueError, match="Invalid sync: True for parameters sharded by FSDP2"):
            IVON(params, lr=0.1, ess=10.0, sync=True)
        fsdp = _ivon_run(rank, model)
        # cloze scores where rank 0's continuations are one token each (one forward unsharded) and rank 1's longer
        task, examples = (ListTask("one", ONE_TOKEN, 4), ONE_TOKEN) if rank == 0 else (MC_TASK, MC)
        scorer = make_scorer("cloze", tiny_tokenizer(), task)
        batch = scorer.collate(list(examples))
        with torch.no_grad():
            scores = [scorer.choice_logits(m, batch) for m in (replicated, model)]
        torch.save({"dp": dp, "fsdp": fsdp, "local_shapes": local, "scores": scores,
                    "one_token": batch["continuation_ids"].shape[1] == 1}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ivon_under_fsdp_equals_ivon_data_parallel_with_shared_noise(tmp_path):
    """Tiny float64 Llama with LoRA: IVON on the shards (each rank perturbs its shard with its slice of the full
    draw; FSDP averages the gradient) takes the same steps as replicated IVON(sync=False) whose ranks draw the same
    noise and average their gradients; m, h, ḡ, the logged statistics and an evaluation sample agree. Then cloze
    scores, with one-token continuations on one rank only (the sharded scorer still runs both forwards there)."""
    mp.spawn(_optimizer_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert any(shape[0] == 2 for shape in runs[0]["local_shapes"])  # lora_A (4, 32) is cut into halves
    for run in runs:
        dp, fsdp = run["dp"], run["fsdp"]
        assert dp["params"].keys() == fsdp["params"].keys()
        for name, mean in dp["params"].items():
            torch.testing.assert_close(fsdp["params"][name], mean, rtol=1e-10, atol=1e-12)
            for key in ("hess", "momentum"):
                torch.testing.assert_close(fsdp["state"][name][key], dp["state"][name][key], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fsdp["logits"], dp["logits"], rtol=1e-10, atol=1e-10)
        for a, b in zip(dp["stats"], fsdp["stats"], strict=True):
            assert a.keys() == b.keys() and a["clip_fraction"] > 0
            for key in ("clip_fraction", "hess_mean", "sigma_mean", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-9), key
    assert [run["one_token"] for run in runs] == [True, False]
    for run in runs:
        torch.testing.assert_close(run["scores"][1], run["scores"][0], rtol=1e-8, atol=1e-10)
    # the sample moved the weights (ranks agree, as the all-gather makes them)
    assert torch.equal(runs[0]["fsdp"]["logits"], runs[1]["fsdp"]["logits"])
    assert not torch.equal(runs[0]["dp"]["params"][next(iter(runs[0]["dp"]["params"]))],
                           _lora_llama().get_parameter(next(iter(runs[0]["dp"]["params"]))))


LORA = LoraArgs(r=4, alpha=8, dropout=0.0)
# float32; bfloat16 with gradient checkpointing (the LoRA weights float32 in both)
LOADINGS = [{}, {"dtype": "bfloat16", "gradient_checkpointing": True}]


def _loading_worker(rank: int, folder: str, model: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    shard, before = sharding.shard_model, []

    def recording_shard_model(model: torch.nn.Module) -> None:
        before.append({p.device.type for p in model.parameters()})
        shard(model)

    sharding.shard_model = recording_shard_model
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))  # the same batch on both ranks
    try:
        runs = []
        for options in LOADINGS:
            peft_model = sharding.load_sharded_model(ModelArgs(name=model, sharding="fsdp", **options), LORA, seed=3)
            llama = peft_model.get_base_model()
            local = {n: p.to_local().clone() for n, p in peft_model.named_parameters()}
            mlp_calls = []  # the layer's forward is checkpointed: count a module inside it
            llama.model.layers[0].mlp.register_forward_pre_hook(lambda *_, calls=mlp_calls: calls.append(1))
            loss = peft_model.train()(input_ids=ids, labels=ids).loss
            loss.backward()
            params = lora_parameters(peft_model)
            runs.append({"devices": before[-1], "local": local, "buffers": dict(peft_model.named_buffers()),
                         "tied": llama.lm_head.weight is llama.model.embed_tokens.weight, "loss": loss.detach(),
                         "layer_runs": len(mlp_calls),
                         "grads": sharding.full_tensors({n: p.grad for n, p in params.items()})})
        torch.save(runs, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_only_rank_0_loads_the_base_and_every_rank_gets_its_shards_of_it(tmp_path):
    """2 ranks load a tiny tied-embedding Llama with model.sharding=fsdp, in float32 and in bfloat16 with gradient
    checkpointing. Rank 1 never reads the weights: its parameters are on the meta device until sharded. After
    loading, each rank's shard of every parameter, base and LoRA, is bitwise its slice of the model loaded whole in
    one process; the rotary buffers (non-persistent, in no state dict) are the same; the head is still the
    embedding; and a training forward and backward gives the one-process loss and LoRA gradients (with
    checkpointing, each decoder layer runs twice)."""
    tiny_llama(seed=0, tie_word_embeddings=True).save_pretrained(tmp_path / "model")
    model = str(tmp_path / "model")
    mp.spawn(_loading_worker, args=(str(tmp_path), model), nprocs=WORLD, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    for i, options in enumerate(LOADINGS):
        args = ModelArgs(name=model, **options)
        whole = attach_lora(load_base_model(args, "cpu"), LORA, seed=3)
        assert whole.get_base_model().lm_head.weight.dtype == (torch.bfloat16 if options else torch.float32)
        params = lora_parameters(whole)
        assert [runs[r][i]["devices"] for r in range(WORLD)] == [{"cpu"}, {"meta"}]
        for rank, run in enumerate(r[i] for r in runs):
            assert run["tied"] and run["layer_runs"] == (2 if options else 1)
            assert run["local"].keys() == dict(whole.named_parameters()).keys()
            for name, param in whole.named_parameters():
                assert torch.equal(run["local"][name], param.detach().chunk(WORLD)[rank]), name
            assert run["buffers"].keys() == {"base_model.model.model.rotary_emb.inv_freq",
                                             "base_model.model.model.rotary_emb.original_inv_freq"}
            for name, buffer in whole.named_buffers():
                assert torch.equal(run["buffers"][name], buffer), name
        loss = whole.train()(input_ids=ids, labels=ids).loss
        loss.backward()
        for run in (r[i] for r in runs):
            torch.testing.assert_close(run["loss"], loss.detach(), rtol=1e-6, atol=0)
            for name, param in params.items():
                torch.testing.assert_close(run["grads"][name], param.grad, rtol=1e-5, atol=1e-7)


def _fsdp(config: dict) -> dict:
    return config | {"model": config["model"] | {"sharding": "fsdp"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_fsdp(config: dict, folder: Path) -> None:
    """`accelerate launch --use_fsdp --fsdp_version 2 -m varlora.cli train` on 2 CPU processes."""
    recipe = folder.with_suffix(".json")
    recipe.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", str(WORLD), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "varlora.cli", "train", "--config", str(recipe), "--run-dir", str(folder)]
    done = subprocess.run(cmd, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_fsdp_training_equals_data_parallel_resumes_and_loads_in_one_process(assets, tmp_path):
    """2 ranks with a sharded model. AdamW launched by accelerate's FSDP plugin (model.sharding=auto becomes fsdp)
    equals AdamW data parallel, and bit for bit the same run under torchrun's variables, stopped after its step-2
    checkpoint and rerun. IVON stopped and rerun likewise ends bit for bit like the uninterrupted run; that run
    equals single-process IVON (one shared sample per step, the gradient of the whole batch); its final/ loads in
    one unsharded process and predicts the same."""
    adamw, ivon = _config(assets, "adamw"), _fsdp(_config(assets, "ivon"))
    dp, adamw_cut, whole, cut = (str(tmp_path / name) for name in ("dp", "adamw_cut", "whole", "cut"))
    _spawn([(adamw, dp, None), (_fsdp(adamw), adamw_cut, 2), (_fsdp(adamw), adamw_cut, None), (ivon, whole, None),
            (ivon, cut, 2), (ivon, cut, None)])
    _accelerate_fsdp(adamw, tmp_path / "fsdp")
    assert RunConfig.load(tmp_path / "fsdp" / "config.json").model.sharding == "fsdp"
    runs = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("dp", "fsdp", "whole")}
    assert [runs[name]["sharded"] for name in ("dp", "fsdp", "whole")] == [False, True, True]
    for key, tensor in _adapter(Path(dp)).items():
        torch.testing.assert_close(_adapter(tmp_path / "fsdp")[key], tensor, rtol=1e-5, atol=1e-7)
        assert torch.equal(_adapter(Path(adamw_cut))[key], _adapter(tmp_path / "fsdp")[key]), key

    # IVON's resume: the checkpoint holds full tensors, cut to shards again on load
    for name, tensor in _adapter(Path(whole)).items():
        assert torch.equal(tensor, _adapter(Path(cut))[name]), name
    posterior = [load_file(str(Path(f) / "final" / "posterior.safetensors")) for f in (whole, cut)]
    assert posterior[0].keys() == posterior[1].keys()
    assert all(torch.equal(posterior[0][k], posterior[1][k]) for k in posterior[0])

    single = train_run(RunConfig.from_dict(ivon), tmp_path / "one", log=lambda _: None)
    assert single["processes"] == 1 and not single["sharded"]
    for key, tensor in _adapter(tmp_path / "one").items():
        torch.testing.assert_close(_adapter(Path(whole))[key], tensor, rtol=1e-4, atol=1e-6)

    # the saved posterior (full tensors) in one process, unsharded: the same probabilities, sampled rows included
    session, method = load_run(whole)
    assert not sharding.is_sharded(session.model) and len(session.val_examples) == 9
    saved = load_file(str(session.paths.eval_probs(single["task"])))
    rows = [finish(p, 10) for p in method.predict(session.val_examples, session.scorer)]
    assert {row.label for row in rows} == {"ivon", "ivon@mean"}
    for row in rows:
        torch.testing.assert_close(row.probs, saved[f"probs/{row.label}"], rtol=1e-5, atol=1e-7)


def test_sharding_auto_follows_accelerate_and_refuses_what_cannot_shard(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    assert ModelArgs(name="m").sharding == "none"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert ModelArgs(name="m").sharding == "fsdp"
    assert ModelArgs(name="m", sharding="none").sharding == "none"  # an explicit choice wins
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1; varlora shards with FSDP2 only"):
        ModelArgs(name="m")
    with pytest.raises(ConfigError, match="invalid model.sharding='fsdp': cannot shard a base quantised"):
        ModelArgs(name="m", sharding="fsdp", quantization="4bit")
    with pytest.raises(ConfigError, match="invalid model.sharding='fsdp': needs model.device_map=local"):
        ModelArgs(name="m", sharding="fsdp", device_map="auto")
    with pytest.raises(ConfigError, match="invalid model.sharding='zero3': must be auto, none or fsdp"):
        ModelArgs(name="m", sharding="zero3")
