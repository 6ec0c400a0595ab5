"""The command line: bad arguments are refused with the field and the bound, before any loading."""

import pytest

from welfare_server.cli import main


@pytest.mark.parametrize("argv,message", [
    (["rollout", "--size", "3"], "MazeConfig.size=3 is out of bounds [4, 1000]"),
    (["rollout", "--num-envs", "0"], "num_envs must be an int >= 1"),
    (["rollout", "--temperature", "-1"], "RolloutConfig.temperature=-1.0 is out of bounds"),
    (["rollout", "--glyphs", "emoji"], "MazeConfig.glyphs must be one of"),
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
    assert main(["rollout", "--model", str(tmp_path), "--num-envs", "2", "--size", "12", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "env 0: moves " in out and "env 1: moves " in out and "6 model moves" in out
