"""varlora.models silences two third-party warnings, by category and message, and nothing else."""

from __future__ import annotations

import warnings

from conftest import tiny_llama
from varlora.config import LoraArgs
from varlora.models import attach_lora, save_adapter


def _gguf_like(tmp_path):
    """A LoRA model whose base, as after a GGUF load, names a folder with a .gguf file and no config.json."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "model.Q4_1.gguf").write_bytes(b"GGUF")
    base = tiny_llama()
    base.name_or_path = str(folder)
    return attach_lora(base, LoraArgs(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]), seed=0)


def _record(fn, *args) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the test suite ignores FutureWarning: see everything here
        fn(*args)
    return caught


def test_attach_lora_has_no_gradient_checkpointing_deprecation():
    caught = _record(lambda: attach_lora(tiny_llama(), LoraArgs(r=2, alpha=4, dropout=0.0), seed=0))
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_saving_a_gguf_based_adapter_is_silent(tmp_path):
    model = _gguf_like(tmp_path)
    caught = _record(save_adapter, model, tmp_path / "adapter")
    assert [str(w.message) for w in caught] == []
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}


def test_other_warnings_pass(tmp_path, monkeypatch):
    model = _gguf_like(tmp_path)

    def save_pretrained(folder):
        warnings.warn("Could not find a config file in /x - will assume that the vocabulary was not modified.",
                      stacklevel=1)
        warnings.warn("Could not find a config file in /x", FutureWarning, stacklevel=1)  # another category: kept
        warnings.warn("something that matters", stacklevel=1)

    monkeypatch.setattr(model, "save_pretrained", save_pretrained)
    caught = _record(save_adapter, model, tmp_path / "adapter")
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "Could not find a config file in /x"), (UserWarning, "something that matters")]


def test_filters_do_not_leak(tmp_path):
    save_adapter(_gguf_like(tmp_path), tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.warn("Could not find a config file in /y - will assume that the vocabulary was not modified.",
                      stacklevel=1)
    assert len(caught) == 1
