"""The command line: options from the config dataclasses, recipes, clear errors with exit code 2."""

import pytest

from varlora.cli import build_parser, config_from_args, main


def test_options_and_recipe_build_the_config(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {steps: 9}\nmethod: {name: adamw}\nivon: {ess: 1e7}\n")
    args = build_parser().parse_args(["train", "--run-dir", "x", "--config", str(recipe), "--train.steps", "4",
                                      "--eval.taus", "0", "0.5", "--lora.target_modules", "all-linear",
                                      "--ivon.rescale_lr", "true", "--train.max_grad_norm", "none"])
    config = config_from_args(args)
    assert config.train.steps == 4 and config.method.name == "adamw"  # command line over recipe
    assert config.ivon.ess == 1e7 and config.ivon.rescale_lr is True
    assert config.eval.taus == [0.0, 0.5] and config.lora.target_modules == ["all-linear"]
    assert config.train.max_grad_norm is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--run-dir", "x", "--train.steps", "-3"], "train.steps=-3"),
        (["train", "--run-dir", "x", "--config", "missing.yaml"], "recipe file not found: missing.yaml"),
        (["eval", "nowhere"], "nowhere is not a run folder (no config.json)"),
        (["experiment", "nope"], "unknown preset 'nope'"),
    ],
)
def test_user_errors_exit_2_with_a_clear_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"varlora {argv[0]}: error: ") and message in err


def test_bad_choice_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--run-dir", "x", "--data.scoring", "logits"])
    assert "invalid choice: 'logits'" in capsys.readouterr().err


def test_train_help_lists_every_methods_options(capsys):
    from varlora.methods import METHODS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name, cls in METHODS.items():
        assert name in out
        if cls.args_class is not None:
            assert f"--{name}." in out
    assert "--train.optimizer" not in out


def test_the_old_optimizer_option_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--run-dir", "x", "--train.optimizer", "ivon"])
    assert "--train.optimizer" in capsys.readouterr().err


def test_methods_lists_the_registry(capsys):
    from varlora.methods import METHODS

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS)


def test_tasks_lists_the_registry(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("winogrande_s", "winogrande_m", "arc_challenge", "arc_easy", "obqa", "boolq"):
        assert name in out
