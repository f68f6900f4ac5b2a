"""Loading and precision: ``model.dtype auto``, TF32, gradient checkpointing, attention kernel, device placement.

On the CPU: auto resolves to float32 (and to bfloat16 on a GPU that has it, mocked), a run folder saved with an
explicit "float32" resumes under the new default, the base is built on the meta device and loaded straight onto its
device, checkpointing recomputes every decoder layer and leaves the gradients unchanged, and bad values are refused
naming the field.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_assets
from varlora.config import ConfigError, ModelArgs, RunConfig, auto_dtype
from varlora.methods.training import backward_batch
from varlora.models import load_base_model, set_tf32
from varlora.run_paths import RunPaths
from varlora.session import setup
from varlora.train import _prepare_run_dir, train_run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"), n_train=16, n_val=8)


def _gpu_with_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


def test_auto_dtype_is_float32_on_the_cpu_and_bfloat16_on_a_gpu_that_has_it(monkeypatch):
    assert auto_dtype() == "float32" and ModelArgs().dtype == "float32"
    assert RunConfig.from_dict({"model": {"dtype": "auto"}}).model.dtype == "float32"
    _gpu_with_bf16(monkeypatch)
    assert ModelArgs().dtype == "bfloat16" and ModelArgs(dtype="float32").dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # e.g. a V100
    assert ModelArgs().dtype == "float32"


def test_the_command_line_offers_the_new_options_with_auto_as_the_dtype_default():
    from dataclasses import fields

    from varlora.cli import build_parser, config_from_args

    default = {f.name: f.default for f in fields(ModelArgs)}
    assert default["dtype"] == "auto" and default["attn_implementation"] == "sdpa"
    assert default["quantization"] == "none" and default["gradient_checkpointing"] is False
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    help_text = " ".join(train.format_help().split())
    for option in ("--model.dtype {auto,float32,bfloat16,float16}", "--model.quantization {none,4bit,8bit}",
                   "--model.gradient_checkpointing BOOL", "--model.attn_implementation",
                   "--model.device_map {local,auto}", "--model.tf32 BOOL"):
        assert option in help_text, option
    args = build_parser().parse_args(["train", "--run-dir", "x", "--model.quantization", "4bit",
                                      "--model.gradient_checkpointing", "true", "--model.name", "m"])
    model = config_from_args(args).model
    assert (model.quantization, model.gradient_checkpointing, model.dtype) == ("4bit", True, "float32")


def test_a_run_saved_with_float32_resumes_under_auto_on_the_cpu_but_not_on_a_bf16_gpu(tmp_path, monkeypatch):
    """A config.json written before ``auto`` existed (no new model fields, "dtype": "float32", as the demo's) is
    the same run as the default config on a CPU; on a bf16 GPU auto means another dtype and the folder refuses."""
    paths = RunPaths(tmp_path)
    old = RunConfig().to_dict()
    old["model"] = {"name": old["model"]["name"], "dtype": "float32"}  # the fields of the old ModelArgs only
    paths.config.write_text(json.dumps(old))
    _prepare_run_dir(RunConfig(), paths)  # no error: the same run
    assert json.loads(paths.config.read_text()) == old  # and its config.json is left as it was
    _gpu_with_bf16(monkeypatch)
    with pytest.raises(ConfigError, match=r"another config \(model.dtype: saved 'float32', given 'bfloat16'\)"):
        _prepare_run_dir(RunConfig(), paths)
    _prepare_run_dir(RunConfig.from_dict({"model": {"dtype": "float32"}}), paths)  # explicit float32 still resumes


def test_config_json_records_the_resolved_dtype(assets, tmp_path):
    config = RunConfig.from_dict({"model": {"name": assets["model"], "dtype": "auto"}})
    _prepare_run_dir(config, RunPaths(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model"]["dtype"] == "float32"


@pytest.mark.parametrize("field, value, message", [
    ("dtype", "float64", "must be one of"),
    ("attn_implementation", "fast", "must be one of"),
    ("device_map", "balanced", "must be one of"),
    ("gradient_checkpointing", "yes", "must be true or false"),
])
def test_bad_model_options_are_refused_naming_the_field_and_value(field, value, message):
    with pytest.raises(ConfigError, match=rf"model.{field}={value!r}.*{message}"):
        RunConfig.from_dict({"model": {field: value}})
    if field == "dtype":
        with pytest.raises(ConfigError, match=r"invalid model.dtype='float64': must be auto, float32, bfloat16"):
            ModelArgs(dtype=value)


def test_the_base_is_built_on_the_meta_device_and_loaded_onto_its_device(assets, monkeypatch):
    """Low-memory loading: the modules are created without storage (meta device), and every weight is then read
    straight to the device ``device_map`` names; nothing is initialised randomly and then overwritten."""
    from transformers import LlamaForCausalLM

    built_on = []
    init = LlamaForCausalLM.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built_on.append(next(self.parameters()).device.type)

    monkeypatch.setattr(LlamaForCausalLM, "__init__", recording_init)
    model = load_base_model(ModelArgs(name=assets["model"]), device="cpu")
    assert built_on == ["meta"]
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_device_map_auto_is_refused_under_several_processes(assets, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match=r"invalid model.device_map='auto'.*one process"):
        load_base_model(ModelArgs(name=assets["model"], device_map="auto"))


def test_device_map_auto_on_a_cpu_puts_everything_on_the_cpu_and_computes_the_same(assets):
    ids = torch.tensor([[3, 4, 5, 6]])
    local = load_base_model(ModelArgs(name=assets["model"]))(input_ids=ids).logits
    spread = load_base_model(ModelArgs(name=assets["model"], device_map="auto"))
    assert {p.device.type for p in spread.parameters()} == {"cpu"}
    assert torch.equal(spread(input_ids=ids).logits, local)


def test_the_attention_kernel_is_the_one_asked_for_and_eager_equals_sdpa(assets):
    ids = torch.tensor([[3, 4, 5, 6, 7], [1, 9, 8, 7, 6]])
    logits = {}
    for kernel in ("sdpa", "eager"):
        model = load_base_model(ModelArgs(name=assets["model"], attn_implementation=kernel))
        assert model.config._attn_implementation == kernel
        logits[kernel] = model(input_ids=ids).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-5, atol=1e-5)


def test_tf32_is_set_on_cuda_only():
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        set_tf32(torch.device("cpu"), True)
        assert torch.backends.cuda.matmul.fp32_precision == before  # a CPU run leaves the process setting alone
        set_tf32(torch.device("cuda", 0), True)  # the flag needs no GPU to be set
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        set_tf32(torch.device("cuda", 0), False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def _session(assets, tmp_path, **model):
    config = RunConfig.from_dict({
        "model": {"name": assets["model"], **model}, "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "method": {"name": "adamw"}, "data": {"task": assets["task"], "scoring": "cloze", "max_length": 64},
        "train": {"steps": 1, "batch_size": 4, "seed": 3},
    })
    return setup(config, tmp_path)


def test_gradient_checkpointing_recomputes_each_layer_and_leaves_the_gradients_unchanged(assets, tmp_path):
    """With checkpointing every decoder layer runs twice per training forward of the model (once more in the
    backward pass), and the LoRA gradients equal those without it (LoRA dropout included: the recompute replays
    the RNG state)."""
    grads, layer_runs = {}, {}
    for on in (False, True):
        session = _session(assets, tmp_path / str(on), gradient_checkpointing=on)
        session.scorer.share_prefix = False  # one sequence per choice in both, as checkpointing needs
        decoder = session.model.base_model.model.model
        assert decoder.layers[0].gradient_checkpointing == on
        model_calls, mlp_calls = [], []  # the layer's forward is checkpointed: count a module inside it
        decoder.register_forward_pre_hook(lambda *_, calls=model_calls: calls.append(1))
        decoder.layers[0].mlp.register_forward_pre_hook(lambda *_, calls=mlp_calls: calls.append(1))
        session.model.train()
        torch.manual_seed(0)
        backward_batch(session, session.batch(0))
        layer_runs[on] = len(mlp_calls) / len(model_calls)
        grads[on] = {n: p.grad.clone() for n, p in session.params.items()}
    assert layer_runs == {False: 1.0, True: 2.0}
    for name, g in grads[False].items():
        assert torch.equal(grads[True][name], g), name


def test_checkpointing_is_off_in_eval_mode(assets, tmp_path):
    session = _session(assets, tmp_path, gradient_checkpointing=True)
    layer = session.model.base_model.model.model.layers[0]
    count = []
    layer.mlp.register_forward_pre_hook(lambda *_: count.append(1))
    with torch.enable_grad():
        logits = session.scorer.choice_logits(session.model, session.scorer.collate(session.val_examples[:2]))
        logits.sum().backward()
    assert len(count) == 1  # eval mode (the post-hoc fits' backward passes): no recompute


def test_blob_refuses_gradient_checkpointing_with_its_reason(assets, tmp_path):
    config = RunConfig.from_dict({"model": {"name": assets["model"], "gradient_checkpointing": True},
                                  "method": {"name": "blob"}, "data": {"task": assets["task"]}})
    with pytest.raises(ConfigError, match=r"invalid model.gradient_checkpointing=True for method 'blob': its "
                                          r"flipout hooks draw the noise"):
        train_run(config, tmp_path / "blob", log=lambda _: None)
    assert not (tmp_path / "blob").exists()  # refused before the run folder is made


def test_a_bfloat16_base_with_checkpointing_trains_and_reloads(assets, tmp_path):
    """bf16 on the CPU, checkpointing on: a short AdamW run trains, saves and reloads to the same predictions."""
    from safetensors.torch import load_file

    from varlora.train import load_run

    config = RunConfig.from_dict({
        "model": {"name": assets["model"], "dtype": "bfloat16", "gradient_checkpointing": True,
                  "attn_implementation": "eager"},
        "lora": {"r": 4}, "method": {"name": "adamw"},
        "data": {"task": assets["task"], "scoring": "cloze", "max_length": 64, "train_limit": 8},
        "train": {"steps": 2, "batch_size": 4, "save_every": 2, "seed": 3}, "adamw": {"lr": 1e-2},
    })
    summary = train_run(config, tmp_path / "run", log=lambda _: None)
    session, method = load_run(tmp_path / "run")
    assert next(session.model.base_model.model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in session.params.values())
    saved = load_file(str(RunPaths(tmp_path / "run").eval_probs(summary["task"])))
    (p,) = method.predict(session.val_examples, session.scorer)
    assert torch.equal(saved[f"probs/{p.label}"], p.probs)


def test_checkpointing_a_model_that_cannot_is_refused_naming_the_field():
    from conftest import tiny_llama
    from varlora.models import prepare_base_model

    model = tiny_llama()
    model.supports_gradient_checkpointing = False  # as a custom architecture without checkpointing support
    with pytest.raises(ConfigError, match=r"invalid model.gradient_checkpointing=True: LlamaForCausalLM does not"):
        prepare_base_model(model, ModelArgs(name="x", gradient_checkpointing=True))
