"""The trained policy leaves the trainer as a plain Hugging Face directory: loaded without PEFT, it
computes exactly the move logits of the policy the engine served (adapters merged), not the base
model's."""

import torch

from welfare_server.maze import MazeConfig
from welfare_server.model.loading import load_model
from welfare_server.train.config import TrainConfig
from welfare_server.train.policy import move_logits
from welfare_server.train.trainer import Trainer


def test_exported_policy_equals_the_served_policy(tmp_path):
    config = TrainConfig(model="tiny-llama", device="cpu", dtype="float32", algorithm="dr_grpo", steps=2,
                         groups_per_step=2, group_size=2, lora_rank=4, lora_alpha=8.0, lr=1e-2, lora_layers="1-2",
                         eval_episodes=0, checkpoint_every=0, kl_metric_every=0, progress=False,
                         out_dir=str(tmp_path / "run"), maze=MazeConfig(size=12, episode_steps=2))
    trainer = Trainer(config)
    trainer.run()
    episodes = trainer.collect(7)  # conversations to score, played by the trained policy
    table = trainer.table

    def logits(model):
        with torch.no_grad():
            return move_logits(model, episodes.token_ids, episodes.answer_positions, table.action_token_ids,
                               table.pad_id)

    with trainer.weights.policy_model() as served:
        expected = logits(served)
    with trainer.weights.reference_model() as base:
        untrained = logits(base)
    exported = load_model(tmp_path / "run" / "policy", dtype="float32", device="cpu").model.eval()
    assert not any("lora" in name for name, _ in exported.named_parameters())
    assert torch.equal(logits(exported), expected)
    assert (expected - untrained).abs().max() > 1e-3  # the adapters moved the policy: the check can fail
    trainer.close()
