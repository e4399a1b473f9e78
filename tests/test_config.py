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

    # assistant-*.yaml are assistant profiles, checked by test_assist.py::test_the_example_assistant_in_configs_is_valid
    files = sorted(f for f in (Path(__file__).parent.parent / "configs").glob("*.yaml")
                   if not f.name.startswith("assistant-"))
    assert files
    for f in files:
        load_config(f)


def _sections():
    from gptsmith.config import ProjectConfig

    return [(name, field.annotation) for name, field in ProjectConfig.model_fields.items()]


def test_every_section_and_key_has_a_description():
    from gptsmith.config import ProjectConfig

    missing = [name for name, field in ProjectConfig.model_fields.items() if not (field.description or "").strip()]
    for section, model in _sections():
        missing += [f"{section}.{key}" for key, field in model.model_fields.items()
                    if not (field.description or "").strip()]
    assert missing == []


def test_config_show_documents_every_key_and_loads_back(tmp_path, capsys):
    overrides = ["--pretrain.lr", "0.01", "--sft.lora_target_modules", "[q_proj, v_proj]",
                 "--pretrain.sample_prompt", '"Q: why?\\n# not a comment"', "--serve.cors_origins", "[]"]
    assert main(["config", "show", *overrides]) == 0
    shown = capsys.readouterr().out
    path = tmp_path / "my.yaml"
    path.write_text(shown)
    # the printed file is a valid config, and the same config
    assert load_config(path) == load_config(None, parse_overrides(overrides))
    assert load_config(path).pretrain.sample_prompt == "Q: why?\n# not a comment"
    lines = shown.splitlines()
    for section, model in _sections():
        start = lines.index(f"{section}:")
        for key, field in model.model_fields.items():
            at = next(i for i in range(start, len(lines)) if lines[i].startswith(f"  {key}:"))
            above = []
            for line in reversed(lines[start:at]):
                if not line.startswith("  # "):
                    break
                above.insert(0, line[4:])
            assert " ".join(above).startswith(field.description), f"{section}.{key}"
    assert "  # peak learning rate (default: 0.003)" in lines  # a changed value says what the default was
    # shown again from the file: the same text, so the file round-trips exactly
    assert main(["config", "show", "--config", str(path)]) == 0
    assert capsys.readouterr().out == shown


def test_saved_config_documents_itself(tmp_path):
    from gptsmith.config import ProjectConfig

    path = save_config(load_config(None, {"model.preset": "test"}), tmp_path)
    text = path.read_text()
    assert f"  # {ProjectConfig.model_fields['model'].annotation.model_fields['preset'].description}" in text
    assert load_config(path).model.preset == "test"
