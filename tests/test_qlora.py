"""4- and 8-bit bases (QLoRA) through bitsandbytes, on a tiny random Llama, on the CPU.

bitsandbytes >= 0.48 quantises and runs NF4 and LLM.int8 layers on the CPU, so the path a 70B base takes on a GPU
(quantise while loading, prepare for k-bit training, float32 LoRA, train, save, reload, predict) runs here too.
Every registered method is trained (when it trains), saved, reloaded onto a freshly quantised base and
re-evaluated to the same probabilities, bit for bit.
"""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_assets
from varlora.config import ConfigError, ModelArgs, RunConfig
from varlora.evaluate import finish
from varlora.methods import METHODS
from varlora.models import is_kbit, load_base_model, quantization_config
from varlora.run_paths import RunPaths
from varlora.train import load_run, train_run

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the qlora extra) is not installed")

SECTION_OVERRIDES: dict[str, dict] = {
    "temperature": {"holdout": 8},
    "ensemble": {"members": 2},
    "tfb": {"n_anchor": 8, "search_samples": 2, "search_steps": 2},
    "laplace": {"fit_batch_size": 4},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"), n_train=32, n_val=8, hidden_size=64)


def _config(assets, method: str, quantization: str, **model) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"name": assets["model"], "quantization": quantization, **model},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "method": {"name": method},
        "data": {"task": assets["task"], "scoring": "cloze", "max_length": 64, "train_limit": 16},
        "train": {"steps": 2, "batch_size": 4, "save_every": 2, "seed": 3},
        "ivon": {"lr": 0.1, "ess": 1e4, "hess_init": 0.1, "clip_radius": 1.0},
        "adamw": {"lr": 1e-2},
        "blob": {"lr": 1e-2},
        "eval": {"n_samples": 2, "taus": [0.0, 1.0], "batch_size": 4},
        **SECTION_OVERRIDES,
    })


def _quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("bits, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_the_base_is_quantised_and_lora_stays_float32(assets, bits, layer):
    base = load_base_model(ModelArgs(name=assets["model"], quantization=bits))
    assert is_kbit(base)
    q_proj = base.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer and q_proj.weight.dtype in (torch.uint8, torch.int8)
    assert q_proj.weight.numel() < 64 * 64 or bits == "8bit"  # NF4 packs two weights per byte
    # prepare_model_for_kbit_training: everything that is not quantised is float32 and frozen
    assert all(p.dtype in (torch.float32, torch.uint8, torch.int8) and not p.requires_grad for p in base.parameters())
    from varlora.config import LoraArgs
    from varlora.models import attach_lora, lora_parameters

    model = attach_lora(base, LoraArgs(r=4), seed=0)
    params = lora_parameters(model)
    assert params and all(p.dtype == torch.float32 for p in params.values())
    out = model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in params.items() if "lora_B" in n)


def test_4bit_logits_are_close_to_the_float_base(assets):
    """NF4 quantisation error only: the quantised base computes the same function, approximately."""
    full = load_base_model(ModelArgs(name=assets["model"]))
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    reference = full(input_ids=ids).logits
    for bits, tol in (("4bit", 0.3), ("8bit", 0.05)):
        quantised = load_base_model(ModelArgs(name=assets["model"], quantization=bits))(input_ids=ids).logits
        err = (quantised - reference).abs().max().item()
        assert 0 < err < tol * reference.abs().max().item(), (bits, err)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_saves_reloads_and_predicts_identically_on_a_4bit_base(name, assets, tmp_path):
    folder = tmp_path / name
    summary = train_run(_config(assets, name, "4bit"), folder, log=_quiet)
    task = summary["task"]
    session, method = load_run(folder)  # a fresh base, quantised again, the adapter (and posterior) loaded
    assert is_kbit(session.model.base_model.model)
    assert all(p.dtype == torch.float32 for p in session.params.values())
    again = {p.label: p for p in method.predict(session.val_examples, session.scorer)}
    saved = load_file(str(RunPaths(folder).eval_probs(task)))
    assert again.keys() == summary["results"][task].keys()
    for label, p in again.items():
        assert torch.equal(saved[f"probs/{label}"], p.probs), label
        assert finish(p, 10).metrics == summary["results"][task][label], label


@pytest.mark.parametrize("name", ["ivon", "blob"])
def test_an_8bit_base_trains_saves_reloads_and_predicts_identically(name, assets, tmp_path):
    folder = tmp_path / name
    summary = train_run(_config(assets, name, "8bit"), folder, log=_quiet)
    task = summary["task"]
    session, method = load_run(folder)
    saved = load_file(str(RunPaths(folder).eval_probs(task)))
    for p in method.predict(session.val_examples, session.scorer):
        assert torch.equal(saved[f"probs/{p.label}"], p.probs), p.label


def test_blob_flipout_samples_differ_on_a_4bit_base(assets, tmp_path):
    """The flipout hook on lora_A works on a quantised layer: BLoB's samples are not all the same."""
    summary = train_run(_config(assets, "blob", "4bit"), tmp_path / "blob", log=_quiet)
    probs = load_file(str(RunPaths(tmp_path / "blob").eval_probs(summary["task"])))
    samples = next(v for k, v in probs.items() if k.startswith("sample_probs/"))
    assert samples.shape[0] == 2 and not torch.equal(samples[0], samples[1])


def test_quantising_a_gguf_file_is_refused_naming_the_field(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"invalid model.quantization='4bit': cannot apply to the GGUF file"):
        ModelArgs(name=str(gguf), quantization="4bit")
    with pytest.raises(ConfigError, match=r"model.quantization='3bit'.*must be one of"):
        RunConfig.from_dict({"model": {"quantization": "3bit"}})


def test_a_missing_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ConfigError, match=r"model.quantization='4bit': bitsandbytes is not installed.*qlora"):
        quantization_config(ModelArgs(name="x", quantization="4bit"))


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_batched_posterior_samples_equal_sequential_ones_on_a_quantised_base(assets, bits):
    """IVON's ``eval.batched_samples`` folds S samples into one forward through peft's bitsandbytes LoRA layers too
    (not only ``lora.Linear``); oracle: each sample copied into the weights, one forward each. 4-bit agrees to float
    rounding; LLM.int8 picks its float16 outlier columns (|x| > 6) over the whole batch, so a batch folded S times
    can differ from S separate ones by that choice (measured 7e-4 on logits of size 6)."""
    from varlora._batched_lora import batched_lora, supports
    from varlora.config import LoraArgs
    from varlora.evaluate import predict_logits
    from varlora.models import attach_lora, load_tokenizer, lora_parameters
    from varlora.scoring import make_scorer
    from varlora.tasks import get_task

    model = attach_lora(load_base_model(ModelArgs(name=assets["model"], quantization=bits)), LoraArgs(r=4), seed=0)
    params = lora_parameters(model)
    assert supports(model, set(params))
    gen = torch.Generator().manual_seed(1)
    samples = {n: 0.3 * torch.randn(3, *p.shape, generator=gen) for n, p in params.items()}  # (S, *shape)
    task = get_task(assets["task"])
    scorer = make_scorer("cloze", load_tokenizer(assets["model"]), task, max_length=64)
    examples = task.load("validation")[:5]
    sequential = []
    with torch.no_grad():
        for s in range(3):
            for n, p in params.items():
                p.copy_(samples[n][s])
            sequential.append(predict_logits(model.eval(), scorer, examples, batch_size=5))
        with batched_lora(model, samples) as n_samples:
            batched = predict_logits(model, scorer, examples, batch_size=5, n_samples=n_samples)
    torch.testing.assert_close(batched, torch.stack(sequential), rtol=0, atol=1e-5 if bits == "4bit" else 3e-3)
    assert not torch.equal(sequential[0], sequential[1])


def test_the_per_forward_int8_cast_notice_is_dropped_and_nothing_else(assets, caplog):
    model = load_base_model(ModelArgs(name=assets["model"], quantization="8bit"))
    with caplog.at_level("WARNING"):
        model(input_ids=torch.tensor([[3, 4, 5]]))
        import logging

        logging.getLogger("bitsandbytes.autograd._functions").warning("another notice")
    assert [r.getMessage() for r in caplog.records] == ["another notice"]
