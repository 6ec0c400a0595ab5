"""The command line: bad arguments are refused with the field and the bound, before any loading."""

import pytest

from welfare_server.cli import main


@pytest.mark.parametrize("argv,message", [
    (["rollout", "--size", "3"], "MazeConfig.size=3 is out of bounds [4, 1000]"),
    (["rollout", "--num-envs", "0"], "num_envs must be an int >= 1"),
    (["rollout", "--temperature", "-1"], "RolloutConfig.temperature=-1.0 is out of bounds"),
    (["rollout", "--glyphs", "emoji"], "MazeConfig.glyphs must be one of"),
    (["rollout", "--wind-prob", "1.5"], "MazeConfig.wind_prob=1.5 is out of bounds [0.0, 1.0]"),
    (["rollout", "--dtype", "int8"], "RuntimeConfig.dtype: unknown dtype 'int8'"),
])
def test_bad_rollout_arguments_exit_2_with_a_clear_message(argv, message, capsys, monkeypatch):
    from welfare_server.model import bundled

    def refuse(*args, **kwargs):
        raise AssertionError("bad arguments must be refused before the model is loaded")

    monkeypatch.setattr(bundled, "ensure_default_model", refuse)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_rollout_plays_episodes_with_a_model(tmp_path, capsys, smollm2_tokenizer):
    # The tiny random Llama preset (SmolLM2's vocabulary), saved as a HF directory with the real
    # tokenizer, plays two short mazes.
    from welfare_server.model.loading import load_model

    load_model("tiny-llama", dtype="float32", device="cpu").model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    assert main(["rollout", "--model", str(tmp_path), "--num-envs", "2", "--size", "12", "--episode-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "env 0: moves " in out and "env 1: moves " in out and "6 model moves" in out


def test_every_config_field_is_an_option_with_its_docstring_as_help(capsys):
    import dataclasses

    from welfare_server import config_cli
    from welfare_server.maze import MazeConfig
    from welfare_server.model.engine import EngineConfig
    from welfare_server.model.loading import RuntimeConfig
    from welfare_server.train.rollout import RolloutConfig

    # The house rule the options rely on: a docstring under every init field of every config.
    for cls in (MazeConfig, RuntimeConfig, RolloutConfig, EngineConfig):
        documented = config_cli.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in documented]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"
    with pytest.raises(SystemExit):
        main(["rollout", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(MazeConfig):
        if f.init and f.name not in ("autoreset", "max_state_bytes"):
            assert "--" + f.name.replace("_", "-") in help_text
            assert config_cli.field_docs(MazeConfig)[f.name][:40] in help_text


def test_options_build_the_dataclass_with_the_given_values():
    import argparse

    from welfare_server import config_cli
    from welfare_server.maze import MazeConfig

    parser = argparse.ArgumentParser()
    config_cli.add_options(parser, MazeConfig)
    built = config_cli.build(MazeConfig, parser.parse_args(["--size", "12", "--no-melting", "--wind-prob", "0.25"]))
    assert built == MazeConfig(size=12, melting=False, wind_prob=0.25)
    assert config_cli.build(MazeConfig, parser.parse_args([])) == MazeConfig()
