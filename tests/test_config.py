"""RunConfig: validation names the bad field and value, JSON round trip, recipe presets parse."""

import json

import pytest

from varlora.config import ConfigError, RunConfig


def test_round_trip_through_json(tmp_path):
    config = RunConfig.from_dict({"ivon": {"ess": "1e7"}, "train": {"steps": 7}, "method": {"name": "adamw"},
                                  "eval": {"taus": [0, 0.5, 1]}, "ensemble": {"members": 4}})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    loaded = RunConfig.load(path)
    assert loaded == config
    assert loaded.ivon.ess == 1e7 and isinstance(loaded.ivon.ess, float)
    assert loaded.eval.taus == [0.0, 0.5, 1.0]
    assert loaded.method_args("ensemble").members == 4 and loaded.method.name == "adamw"
    # only the sections the method reads make up the run's identity
    assert set(loaded.effective()) == {"model", "lora", "method", "data", "train", "eval", "adamw"}
    assert set(RunConfig.from_dict({"method": {"name": "ensemble"}}).effective()) >= {"adamw", "ensemble"}
    # eval.taus belongs to the identity of a method that reads it only
    for name, counts in (("adamw", False), ("temperature", False), ("ivon", True)):
        a, b = (RunConfig.from_dict({"method": {"name": name}, "eval": {"taus": t}}) for t in ([0, 1], [0, 0.5, 1]))
        assert (a.effective() != b.effective()) is counts


def test_a_config_written_with_train_optimizer_is_still_read():
    """config.json files from before methods existed: train.optimizer becomes method.name; steps 0 zero-shot."""
    legacy = RunConfig.from_dict({"train": {"optimizer": "adamw", "steps": 5}})
    assert legacy.method.name == "adamw" and legacy.train.steps == 5
    assert RunConfig.from_dict({"train": {"optimizer": "ivon", "steps": 0}}).method.name == "zero_shot"
    with pytest.raises(ConfigError, match="train.optimizer is replaced by method.name"):
        RunConfig.from_dict({"train": {"optimizer": "ivon"}, "method": {"name": "ivon"}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"steps": "x"}}, "train.steps='x': must be an integer"),
        ({"train": {"steps": 2.5}}, "train.steps=2.5: must be an integer"),
        ({"train": {"steps": -1}}, "train.steps=-1"),
        ({"train": {"batch_size": 4, "grad_accum": 3}}, "train.grad_accum=3"),
        ({"data": {"scoring": "logits"}}, "data.scoring='logits': must be one of"),
        ({"ivon": {"lr": -1}}, "ivon.lr=-1.0"),
        ({"ivon": {"beta1": 1.0}}, "ivon.beta1=1.0"),
        ({"ivon": {"rescale_lr": "yes"}}, "ivon.rescale_lr='yes': must be true or false"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules='q_proj': must be a list"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout=1.0"),
        ({"eval": {"taus": [0.0, 1.5]}}, "eval.taus=[0.0, 1.5]"),
        ({"eval": {"samples_per_forward": -1}}, "eval.samples_per_forward=-1"),
        ({"trian": {}}, "unknown section(s) ['trian']"),
        ({"method": {"name": "sgld"}}, "method.name='sgld': must be one of"),
        ({"ensemble": {"members": 1}}, "ensemble.members=1"),
        ({"temperature": {"holdout": 0}}, "temperature.holdout=0"),
        ({"train": {"stpes": 3}}, "unknown field(s) ['stpes'] in section 'train'"),
        ({"train": 3}, "section 'train' must be a mapping"),
    ],
)
def test_invalid_values_name_field_and_value(data, message):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    assert message in str(info.value)


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "train": {"steps": 3,}\n}\n')
    with pytest.raises(ConfigError, match=r"config.json: line 2: not valid JSON"):
        RunConfig.load(path)
