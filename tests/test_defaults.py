"""The library's defaults name no ``../shared``: it takes explicit paths or environment variables; only the
command line (and the demo) look in the project's shared folder."""

from __future__ import annotations

import os

from varlora import cli
from varlora.config import DEFAULT_MODEL, MODEL_ENV, ModelArgs, RunConfig
from varlora.tasks import DATA_DIR_ENV, IGNORE_SHARED_ENV, resolve_data_dir


def _project_beside_shared(tmp_path, monkeypatch):
    """A working folder with ../shared/data and ../shared/models/<demo GGUF> beside it, variables unset."""
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "models").mkdir()
    (tmp_path / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    for name in (DATA_DIR_ENV, MODEL_ENV, IGNORE_SHARED_ENV):
        monkeypatch.delenv(name, raising=False)


def test_the_library_does_not_look_in_shared(tmp_path, monkeypatch):
    _project_beside_shared(tmp_path, monkeypatch)
    assert ModelArgs().name == DEFAULT_MODEL and "shared" not in DEFAULT_MODEL
    assert RunConfig.from_dict({}).model.name == DEFAULT_MODEL
    assert resolve_data_dir() is None
    monkeypatch.setenv(MODEL_ENV, "/models/x.gguf")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert ModelArgs().name == "/models/x.gguf" and resolve_data_dir() == tmp_path


def test_the_command_line_defaults_to_shared_and_restores_the_environment(tmp_path, monkeypatch):
    _project_beside_shared(tmp_path, monkeypatch)
    seen = {}
    monkeypatch.setattr(cli, "_main", lambda argv: seen.update(
        model=RunConfig.from_dict({}).model.name, data=resolve_data_dir()) or 0)
    assert cli.main(["tasks"]) == 0
    assert seen == {"model": "../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "data": (tmp_path / "shared" / "data").resolve()}
    assert MODEL_ENV not in os.environ and DATA_DIR_ENV not in os.environ
    monkeypatch.setenv(MODEL_ENV, "mine")  # a variable already set wins
    assert cli.main(["tasks"]) == 0 and seen["model"] == "mine" and os.environ[MODEL_ENV] == "mine"
