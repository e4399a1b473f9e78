import pytest

from gptsmith.cli import main
from gptsmith.config import ConfigError, load_config, parse_overrides, save_config


def test_override_sets_value_and_types(tmp_path):
    cfg = load_config(None, parse_overrides(["--pretrain.lr", "3e-4", "--model.n_layer=6", "--sft.lora", "true"]))
    assert cfg.pretrain.lr == pytest.approx(3e-4)
    assert cfg.model.n_layer == 6
    assert cfg.sft.lora is True


def test_yaml_file_then_overrides_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pretrain:\n  lr: 0.01\n  max_steps: 7\nmodel:\n  preset: test\n")
    cfg = load_config(f, {"pretrain.lr": 0.5})
    assert (cfg.pretrain.lr, cfg.pretrain.max_steps, cfg.model.preset) == (0.5, 7, "test")


def test_unknown_override_names_closest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'pretrain.lrr'.*'pretrain.lr'"):
        load_config(None, parse_overrides(["--pretrain.lrr", "1"]))


def test_unknown_key_in_file_names_file_and_closest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pretrain:\n  max_step: 7\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*'pretrain.max_step'.*'pretrain.max_steps'"):
        load_config(f)


def test_wrong_type_is_error_naming_key():
    with pytest.raises(ConfigError, match=r"'pretrain.lr'"):
        load_config(None, {"pretrain.lr": "fast"})


def test_missing_value_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--pretrain.lr"])
    f = tmp_path / "bad.yaml"
    f.write_text("pretrain: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_effective_config_round_trips(tmp_path):
    cfg = load_config(None, {"pretrain.lr": 0.02, "model.preset": "test"})
    path = save_config(cfg, tmp_path)
    assert load_config(path) == cfg


def test_cli_reports_config_error_without_traceback(capsys):
    assert main(["config", "show", "--pretrain.warmup", "3"]) == 2
    err = capsys.readouterr().err
    assert "pretrain.warmup" in err and "pretrain.warmup_steps" in err and "Traceback" not in err


def test_shipped_configs_are_valid():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert files
    for f in files:
        load_config(f)
