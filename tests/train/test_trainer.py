"""The trainer on the tiny random Llama: config checks, token-in/token-out, exact LoRA merging,
learning an easy maze, checkpoints and bitwise resume, SFT, and `welfare-server train`."""

import dataclasses
import json
import math
import shutil

import pytest
import torch

from welfare_server.maze import GOLD, MOLD, SOUTH, MazeConfig
from welfare_server.maze.config import DIRECTION_DELTAS
from welfare_server.train import losses as L
from welfare_server.train.config import TrainConfig, preset_config
from welfare_server.train.policy import TokenMismatch, check_moves, move_logits
from welfare_server.train.trainer import TIMING_KEYS, Trainer


def read_metrics(out_dir) -> list[dict]:
    with open(f"{out_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def trained_tensors(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.weights.named_parameters()}


def taken_logp(trainer, episodes) -> torch.Tensor:
    """The training forward's untempered log-prob of every move of the episodes."""
    with torch.no_grad():
        logits = move_logits(trainer.model, episodes.token_ids, episodes.answer_positions,
                             trainer.table.action_token_ids, trainer.table.pad_id)
    logp = L.masked_log_softmax(logits, episodes.valid)
    return logp.gather(-1, episodes.actions[..., None]).squeeze(-1)


# ---------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("changes,field", [
    (dict(algorithm="ppo"), "TrainConfig.algorithm"),
    (dict(group_size=1), "TrainConfig.group_size"),  # dr_grpo's group baseline needs 2 episodes
    (dict(group_size=1, algorithm="reinforce"), "TrainConfig.group_size"),
    (dict(groups_per_step=0), "TrainConfig.groups_per_step"),
    (dict(steps=True), "TrainConfig.steps"),
    (dict(temperature=0.0), "TrainConfig.temperature"),
    (dict(gamma=1.5), "TrainConfig.gamma"),
    (dict(clip_eps=0.0), "TrainConfig.clip_eps"),
    (dict(dual_clip=1.0), "TrainConfig.dual_clip"),
    (dict(entropy_mode="tile"), "TrainConfig.entropy_mode"),
    (dict(finetune="qlora"), "TrainConfig.finetune"),
    (dict(lora_dropout=1.0), "TrainConfig.lora_dropout"),
    (dict(lora_layers="2-x"), "TrainConfig.lora_layers"),
    (dict(lora_layers="-1"), "TrainConfig.lora_layers"),
    (dict(lora_layers="3-1"), "TrainConfig.lora_layers"),
    (dict(lora_layers="1,,a"), "TrainConfig.lora_layers"),
    (dict(lr=0.0), "TrainConfig.lr"),
    (dict(adam_beta2=1.0), "adam_beta2"),
    (dict(mini_batches=5), "TrainConfig.mini_batches"),  # 2 x 2 episodes cannot make 5 parts
    (dict(eval_temperature=-0.5), "TrainConfig.eval_temperature"),
    (dict(maze=MazeConfig(size=12, episode_steps=3, autoreset=True)), "TrainConfig.maze"),
    (dict(maze={"size": 12}), "TrainConfig.maze"),
])
def test_bad_config_values_are_refused_naming_the_field(tiny_train_config, changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        tiny_train_config(**changes)


def test_valid_corner_cases_and_presets():
    assert TrainConfig(algorithm="sft", group_size=1).episodes_per_step == 8  # sft has no group baseline
    assert TrainConfig(lora_layers="2-4").lora_layer_list() == [2, 3, 4]
    assert TrainConfig(lora_layers="5, 1").lora_layer_list() == [5, 1]
    assert TrainConfig(lora_layers="").lora_layer_list() is None
    assert TrainConfig(loss_token_constant=0).token_constant == 15  # the maze's episode_steps
    demo = preset_config("cpu-demo", steps=3)
    assert (demo.algorithm, demo.steps, demo.lora_layers) == ("reinforce", 3, "10-29")
    assert preset_config("paper").loss_token_constant == 1024
    assert preset_config(None) == TrainConfig()
    with pytest.raises(ValueError, match="preset: 'nope'"):
        preset_config("nope")
    with pytest.raises(ValueError, match="TrainConfig.group_size"):
        preset_config("paper", group_size=1)


def test_trainer_refuses_what_the_model_cannot_do_before_training(tmp_path, tiny_train_config, smollm2_tokenizer):
    # Adapters on layers the model lacks: refused at construction, before any step or file.
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"TrainConfig\.lora_layers: layer 9 does not exist .*4 layers"):
        Trainer(tiny_train_config(lora_layers="2-9", out_dir=out))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    with pytest.raises(ValueError, match=r"TrainConfig\.lora_target_modules"):
        Trainer(tiny_train_config(lora_target_modules="no_such_proj"))
    # A directory that is not a Hugging Face model.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"TrainConfig\.model: .*config\.json"):
        Trainer(tiny_train_config(model=str(empty)))
    # A tokenizer without a chat template: the maze is a multi-turn chat.
    from welfare_server.model.loading import _build_config

    plain = tmp_path / "plain"
    _build_config("tiny-llama").save_pretrained(plain)
    template = smollm2_tokenizer.chat_template
    try:
        smollm2_tokenizer.chat_template = None
        smollm2_tokenizer.save_pretrained(plain)
    finally:
        smollm2_tokenizer.chat_template = template
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"TrainConfig\.model: the tokenizer has no chat template"):
        Trainer(tiny_train_config(model=str(plain)))
    with pytest.raises(ValueError, match="expected a TrainConfig"):
        Trainer(dataclasses.asdict(tiny_train_config()))


# ---------------------------------------------------------------------------------- token in, token out
def test_training_forward_reproduces_every_rollout_move(tiny_train_config):
    config = tiny_train_config(steps=3, kl_metric_every=0, eval_episodes=0)
    trainer = Trainer(config)
    for _ in range(2):  # the second step plays with trained (merged) adapters
        record = trainer.train_step()
        assert record["moves_checked"] == config.episodes_per_step * config.maze.episode_steps == 12
        assert 0.0 <= record["max_logprob_diff"] < 1e-4

    episodes = trainer.collect(2)
    assert check_moves(episodes.token_ids, episodes.answer_positions, episodes.actions,
                       trainer.table.action_token_ids, episodes.logprobs, taken_logp(trainer, episodes),
                       trainer.tolerance, episodes.env_ids) < 1e-4
    assert episodes.env_ids == [0, 1, 2, 3]

    def corrupted(**edits):
        copy = dataclasses.replace(episodes, token_ids=[list(ids) for ids in episodes.token_ids],
                                   answer_positions=[list(p) for p in episodes.answer_positions],
                                   logprobs=episodes.logprobs.clone())
        for edit in edits.values():
            edit(copy)
        return copy

    def check(bad):
        return check_moves(bad.token_ids, bad.answer_positions, bad.actions, trainer.table.action_token_ids,
                           bad.logprobs, taken_logp(trainer, bad), trainer.tolerance, bad.env_ids)

    def other_move(e):  # env 2's answer at turn 1 becomes another direction's token
        p = e.answer_positions[2][1]
        e.token_ids[2][p] = trainer.table.action_token_ids[(int(e.actions[2, 1]) + 1) % 4]

    def shifted(e):  # env 1's turn 2 read one token too late
        e.answer_positions[1][2] += 1

    def logprob(e):  # env 3's recorded log-prob at turn 2 is off by 0.01
        e.logprobs[3, 2] -= 0.01

    def nan(e):
        e.logprobs[0, 1] = float("nan")

    with pytest.raises(TokenMismatch, match=r"env 2, turn 1: token \d+ at answer position"):
        check(corrupted(a=other_move))
    with pytest.raises(TokenMismatch, match=r"env 1, turn 2: token"):
        check(corrupted(a=shifted))
    with pytest.raises(TokenMismatch, match=r"env 3, turn 2: the training forward gives log-prob"):
        check(corrupted(a=logprob))
    with pytest.raises(TokenMismatch, match=r"env 0, turn 1"):
        check(corrupted(a=nan))

    # Inside a training step the mismatch stops the step before the optimizer moves anything.
    before = trained_tensors(trainer)
    trainer.collect = lambda step: corrupted(a=other_move)
    with pytest.raises(TokenMismatch, match=r"step 2, env 2, turn 1"):
        trainer.train_step()
    assert trainer.step == 2
    assert all(torch.equal(p, before[n]) for n, p in trainer.weights.named_parameters())


def test_a_rank_with_no_envs_plays_no_episodes(tiny_train_config):
    # With fewer held-out mazes than processes some rank's share of the evaluation is empty.
    from welfare_server.train.episodes import Episodes, group_batch, play

    config = tiny_train_config()
    trainer = Trainer(config)
    maze = group_batch(config.maze, 2, 2, seed=3)
    none = play(trainer.engine, trainer.table, maze, [], trainer.rollout_config(0.7, 0), chunk=4)
    assert len(none) == 0 and none.env_ids == [] and none.token_ids == []
    assert none.actions.shape == (0, 3) and none.valid.shape == (0, 3, 4) and none.oracle_returns.shape == (0,)
    some = play(trainer.engine, trainer.table, maze, [1, 3], trainer.rollout_config(0.7, 0), chunk=4)
    joined = Episodes.concat([none, some, none])
    assert joined.env_ids == [1, 3] and torch.equal(joined.rewards, some.rewards)
    assert torch.equal(joined.valid, some.valid) and float(joined.gold.sum()) == float(some.gold.sum())


@pytest.mark.parametrize("changes", [
    dict(algorithm="grpo", kl_coef=0.1),
    dict(algorithm="reinforce", gamma=0.9, entropy_mode="plain"),
    dict(mini_batches=2, ppo_epochs=2, lr=5e-2),
    dict(tempered_policy=True, temperature=0.5, kl_coef=0.1),
    dict(finetune="full", lr=1e-3, gradient_checkpointing=True),
], ids=["grpo-kl", "reinforce-discounted", "ppo-epochs", "tempered", "full-checkpointed"])
def test_every_objective_trains_on_checked_moves(tiny_train_config, changes):
    config = tiny_train_config(eval_episodes=0, **changes)
    trainer = Trainer(config)
    before = trained_tensors(trainer)
    history = trainer.run()
    assert [r["step"] for r in history] == [1, 2]
    for record in history:
        assert record["moves_checked"] == 12 and record["max_logprob_diff"] < 1e-4
        for key in ("loss", "entropy", "entropy_eq", "kl", "grad_norm"):
            assert math.isfinite(record[key]), key
        assert 0.0 <= record["clip_frac"] <= 1.0 and record["entropy_eq"] <= record["entropy"] + 1e-6
    assert any(not torch.equal(p, before[n]) for n, p in trainer.weights.named_parameters())


def test_micro_batching_changes_only_the_summation_order(tiny_train_config, tmp_path):
    runs = []
    for size in (4, 1):
        trainer = Trainer(tiny_train_config(micro_batch_size=size, eval_episodes=0, out_dir=tmp_path / str(size)))
        history = trainer.run()
        runs.append((trained_tensors(trainer), history))
    (a, history_a), (b, history_b) = runs
    # The gradients agree to ~1e-5 relative; Adam's normalisation at lr 1e-2 turns that into
    # weight differences of a few 1e-6 after two steps.
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=2e-5), name
    assert [r["return"] for r in history_a] == [r["return"] for r in history_b]
    for key in ("loss", "grad_norm", "entropy", "kl"):  # the same scale: no per-micro-batch normalisation
        assert [r[key] for r in history_a] == pytest.approx([r[key] for r in history_b], rel=1e-5, abs=1e-6), key


# ---------------------------------------------------------------------------------- LoRA merging
def test_lora_merge_is_exact_and_unmerge_restores_the_base_weights_bit_for_bit(tiny_train_config):
    trainer = Trainer(tiny_train_config(steps=3, eval_episodes=2, kl_metric_every=1, lr=5e-2))
    lora = trainer.weights
    assert len(lora.layers) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 layers
    base = {name: m.base_layer.weight.detach().clone() for name, m in lora.layers}
    trainer.run()
    assert trainer.step == 3 and not lora.merged
    assert all(float(m.lora_B["default"].weight.detach().abs().max()) > 0 for _, m in lora.layers)  # all trained
    for name, m in lora.layers:
        assert torch.equal(m.base_layer.weight, base[name]), name

    episodes = trainer.collect(3)
    with torch.no_grad():
        separate = move_logits(trainer.model, episodes.token_ids, episodes.answer_positions,
                               trainer.table.action_token_ids, trainer.table.pad_id)
    lora.merge()
    for name, m in lora.layers:
        a, b = m.lora_A["default"].weight.float(), m.lora_B["default"].weight.float()
        expected = (base[name].float() + float(m.scaling["default"]) * (b @ a)).to(base[name].dtype)
        assert torch.equal(m.base_layer.weight, expected), name
        assert not torch.equal(m.base_layer.weight, base[name]), name
    # The merged weights without the adapters' path compute what the adapters compute.
    for _, m in lora.layers:
        m.enable_adapters(False)
    with torch.no_grad():
        merged = move_logits(trainer.model, episodes.token_ids, episodes.answer_positions,
                             trainer.table.action_token_ids, trainer.table.pad_id)
    for _, m in lora.layers:
        m.enable_adapters(True)
    assert torch.allclose(merged, separate, atol=1e-5)
    assert (merged - separate).abs().max() < 1e-5 < (separate - separate.mean()).abs().max()
    for _ in range(5):  # merge and unmerge again and again: no drift
        lora.unmerge()
        lora.merge()
    lora.unmerge()
    for name, m in lora.layers:
        assert torch.equal(m.base_layer.weight, base[name]), name
    lora.merge()
    with pytest.raises(RuntimeError, match="unmerged"):  # the KL reference needs W0 under the adapters
        with lora.reference_model():
            pass
    lora.unmerge()


def test_lora_layers_and_target_modules_choose_the_adapted_linears(tiny_train_config):
    trainer = Trainer(tiny_train_config(lora_layers="2-3", lora_target_modules="q_proj,down_proj"))
    names = sorted(name for name, _ in trainer.weights.layers)
    assert names == ["model.layers.2.mlp.down_proj", "model.layers.2.self_attn.q_proj",
                     "model.layers.3.mlp.down_proj", "model.layers.3.self_attn.q_proj"]
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all("lora_" in n for n in trainable)


# ---------------------------------------------------------------------------------- learning
def gold_to_the_south(maze):
    """Every start gets Gold to its south and Mold on its three other sides."""
    for i in range(maze.num_envs):
        r, c = int(maze.row[i]), int(maze.col[i])
        for d, (dr, dc) in enumerate(DIRECTION_DELTAS):
            maze.grids[i, r + dr, c + dc] = GOLD if d == SOUTH else MOLD


def test_a_tiny_model_learns_an_easy_maze_with_dr_grpo_and_reinforce(tmp_path, tiny_train_config):
    # One move per episode, Gold on one side and Mold on the three others: the untrained random
    # model goes South (its least likely move) in a few percent of the held-out episodes. Full
    # fine-tuning: LoRA on this 64-wide random model cannot move the frozen output embedding far
    # enough (the final norm bounds the logits; p(South) saturates near 0.6).
    runs = {}
    for algorithm in ("dr_grpo", "reinforce"):
        config = tiny_train_config(
            algorithm=algorithm, finetune="full", lr=1e-3, steps=25, groups_per_step=8, group_size=4,
            micro_batch_size=32, eval_episodes=32, kl_metric_every=0, seed=1, out_dir=tmp_path / algorithm,
            maze=MazeConfig(size=6, episode_steps=1, wind_prob=0.0))
        history = Trainer(config, prepare_maze=gold_to_the_south).run()
        evals = [r for r in history if r["kind"] == "eval"]
        train = [r for r in history if r["kind"] == "train"]
        assert [r["step"] for r in evals] == [0, 25] and len(train) == 25
        assert evals[0]["gold"] <= 0.3, evals[0]
        assert evals[-1]["gold"] >= 0.9, (algorithm, evals[-1])
        assert evals[-1]["return"] > evals[0]["return"] + 10
        # Every training episode ended on Gold or Mold: the crafted start reached every clone.
        assert all(r["gold"] + r["mold"] == 1.0 for r in train)
        runs[algorithm] = [(r["return"], r["gold"]) for r in train]
    # With one move, REINFORCE's advantage G_0 - mean(G_0) is Dr. GRPO's R - mean(R), and at ratio 1
    # the clipped surrogate's gradient is the policy gradient: the two runs are the same run.
    assert runs["dr_grpo"] == runs["reinforce"]


# ---------------------------------------------------------------------------------- checkpoints
RESUME = dict(steps=4, checkpoint_every=2, eval_every=2, eval_episodes=4, kl_metric_every=1)
"""A 4-step LoRA run with checkpoints and evaluations every 2 steps and the entropy bonus annealed."""


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, make_tiny_config):
    """The uninterrupted 4-step run: its out_dir and final adapters."""
    out = tmp_path_factory.mktemp("straight")
    trainer = Trainer(make_tiny_config(out, **RESUME))
    trainer.run()
    return out, trained_tensors(trainer)


def test_a_resumed_run_equals_the_uninterrupted_one_bit_for_bit(straight_run, tiny_train_config, tmp_path):
    from welfare_server.train.checkpoint import latest_checkpoint, read_checkpoint

    straight_dir, straight_weights = straight_run
    out = tmp_path / "interrupted"
    config = tiny_train_config(out_dir=out, **RESUME)
    first = Trainer(config)
    log = first._log

    def crash_after_step_3(record):  # the process dies after logging step 3, before its checkpoint
        log(record)
        if record["kind"] == "train" and record["step"] == 3:
            raise Crash

    first._log = crash_after_step_3
    with pytest.raises(Crash):
        first.run()
    assert latest_checkpoint(out).name == "step_000002"
    assert read_metrics(out)[-1]["step"] == 3  # logged, but newer than the checkpoint

    resumed = Trainer(config)
    assert resumed.step == 2
    resumed.run()
    final = trained_tensors(resumed)
    assert final.keys() == straight_weights.keys()
    for name, tensor in final.items():
        assert torch.equal(tensor, straight_weights[name]), name
    expected = without_timing(read_metrics(straight_dir))
    assert [(r["kind"], r["step"]) for r in expected] == [
        ("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert without_timing(read_metrics(out)) == expected  # step 3's orphaned line is gone
    assert without_timing(resumed.history) == expected
    _, optimizer_a, _, _ = read_checkpoint(straight_dir / "checkpoints" / "step_000004")
    _, optimizer_b, _, _ = read_checkpoint(out / "checkpoints" / "step_000004")
    assert optimizer_a.keys() == optimizer_b.keys()
    assert all(torch.equal(optimizer_a[k], optimizer_b[k]) for k in optimizer_a)


def test_checkpoints_are_complete_and_latest_names_the_newest(straight_run):
    from welfare_server.train.checkpoint import latest_checkpoint, read_checkpoint

    out, weights = straight_run
    base = out / "checkpoints"
    assert sorted(p.name for p in base.iterdir()) == ["latest", "step_000002", "step_000004"]
    assert (base / "latest").read_text() == "step_000004\n"
    assert latest_checkpoint(out) == base / "step_000004"
    for step in ("step_000002", "step_000004"):
        assert sorted(p.name for p in (base / step).iterdir()) == [
            "meta.json", "optimizer.safetensors", "rng.safetensors", "weights.safetensors"]
    saved, optimizer, rng, meta = read_checkpoint(base / "step_000004")
    assert saved.keys() == weights.keys() and all(torch.equal(saved[n], weights[n]) for n in saved)
    assert (meta["step"], meta["metrics_lines"], meta["finetune"], meta["world_size"]) == (4, 7, "lora", 1)
    assert meta["config"]["lr"] == 1e-2 and meta["config"]["maze"]["size"] == 12
    assert set(optimizer) == {f"{n}/{k}" for n in weights for k in ("exp_avg", "exp_avg_sq", "step")}
    assert all(float(optimizer[f"{n}/step"]) == 4 for n in weights)
    assert "torch_cpu" in rng


def test_resume_ignores_leftover_temp_dirs_and_refuses_changed_settings(straight_run, tmp_path, tiny_train_config):
    src, weights = straight_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    # What a crash during the next checkpoint leaves: a half-written temp dir and pointer.
    leftover = out / "checkpoints" / ".step_000006.k3j2x"
    leftover.mkdir()
    (leftover / "meta.json").write_text('{"step": 6, "conf')
    (out / "checkpoints" / ".latest.tmp").write_text("step_0000")
    lines = (out / "metrics.jsonl").read_text()
    # Settings that change only logging or chunking may differ.
    resumed = Trainer(tiny_train_config(out_dir=out, **dict(RESUME, eval_episodes=2, micro_batch_size=1)))
    assert resumed.step == 4 and len(resumed.history) == 7
    assert all(torch.equal(p, weights[n]) for n, p in resumed.weights.named_parameters())
    resumed.run()  # already finished: nothing more
    assert (out / "metrics.jsonl").read_text() == lines
    for changes, field in [(dict(lr=2e-2), "lr"), (dict(steps=6), "steps"),
                           (dict(maze=MazeConfig(size=10, episode_steps=3)), "maze")]:
        with pytest.raises(ValueError, match=rf"resume: the checkpoint .* other settings \({field}\)"):
            Trainer(tiny_train_config(out_dir=out, **dict(RESUME, **changes)))
    # resume=False starts over, dropping the old run's metrics.
    fresh = Trainer(tiny_train_config(out_dir=out, resume=False, **dict(RESUME, lr=2e-2)))
    assert fresh.step == 0 and not (out / "metrics.jsonl").exists()


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from welfare_server.train import checkpoint as C

    base = tmp_path / "checkpoints"
    C.write_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {"w/step": torch.tensor(1.0)}, {"step": 1})
    real_save = C._save

    def failing_save(tensors, path):
        if path.name == "optimizer.safetensors":
            raise OSError("disk full")
        real_save(tensors, path)

    monkeypatch.setattr(C, "_save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        C.write_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, {"w/step": torch.tensor(2.0)}, {"step": 2})
    assert sorted(p.name for p in base.iterdir()) == ["latest", "step_000001"]  # no temp dir left
    assert C.latest_checkpoint(tmp_path) == base / "step_000001"
    monkeypatch.setattr(C, "_save", real_save)
    # Writing a step again replaces it whole.
    C.write_checkpoint(tmp_path, 1, {"w": torch.full((3,), 7.0)}, {"w/step": torch.tensor(1.0)}, {"step": 1})
    weights, optimizer, _, meta = C.read_checkpoint(base / "step_000001")
    assert torch.equal(weights["w"], torch.full((3,), 7.0)) and meta == {"step": 1}
    # `latest` naming a directory without its meta.json is no checkpoint.
    (base / "step_000003").mkdir()
    (base / "latest").write_text("step_000003\n")
    assert C.latest_checkpoint(tmp_path) is None


# ---------------------------------------------------------------------------------- SFT
def test_sft_plays_the_oracle_as_chat_conversations(tiny_train_config, smollm2_tokenizer):
    from welfare_server.train.episodes import group_batch
    from welfare_server.train.trainer import derive_seed

    config = tiny_train_config(algorithm="sft", group_size=1, groups_per_step=4, finetune="full", eval_episodes=0)
    trainer = Trainer(config)
    episodes = trainer.collect(0)
    n, T = 4, config.maze.episode_steps
    assert episodes.env_ids == [0, 1, 2, 3] and torch.isnan(episodes.logprobs).all()
    # Replay the step's mazes: every move is an oracle move, and each conversation is exactly what
    # the chat template makes of the prompts and the answers.
    replay = group_batch(config.maze, 4, 1, derive_seed(config.seed, "mazes", 0))
    messages = [[] for _ in range(n)]
    for t in range(T):
        _, optimal = replay.oracle()
        texts = replay.render_text()
        assert torch.equal(episodes.valid[:, t], replay.observe().valid)
        for i in range(n):
            a = int(episodes.actions[i, t])
            assert optimal[i, a], (i, t)
            assert episodes.token_ids[i][episodes.answer_positions[i][t]] == trainer.table.action_token_ids[a]
            messages[i] += [{"role": "user", "content": texts[i]}, {"role": "assistant", "content": "NESW"[a]}]
        step = replay.step(episodes.actions[:, t])
        assert torch.equal(episodes.rewards[:, t], step.reward)
    for i in range(n):
        templated = smollm2_tokenizer.apply_chat_template(messages[i], tokenize=True, return_dict=False)
        assert list(templated) == episodes.token_ids[i]


def test_sft_fits_the_oracles_moves(tiny_train_config):
    # On the crafted maze the oracle always goes South (to the Gold): SFT teaches exactly that.
    config = tiny_train_config(algorithm="sft", group_size=1, groups_per_step=4, finetune="full", lr=1e-3,
                               steps=8, eval_episodes=16, kl_metric_every=0,
                               maze=MazeConfig(size=6, episode_steps=1, wind_prob=0.0))
    trainer = Trainer(config, prepare_maze=gold_to_the_south)
    episodes = trainer.collect(0)
    assert episodes.actions.flatten().tolist() == [SOUTH] * 4
    nll_before = float(-taken_logp(trainer, episodes).mean())
    history = trainer.run()
    nll_after = float(-taken_logp(trainer, episodes).mean())
    assert nll_after < nll_before - 0.5, (nll_before, nll_after)
    train = [r for r in history if r["kind"] == "train"]
    evals = [r for r in history if r["kind"] == "eval"]
    assert len(train) == 8 and all(r["moves_checked"] == 0 and r["algorithm"] == "sft" for r in train)
    assert all(r["gold"] == 1.0 for r in train)  # the oracle's own episodes
    losses = [r["loss"] for r in train]
    assert losses[0] == pytest.approx(nll_before, abs=1e-5)  # step 0's loss: the NLL of its batch
    assert losses[-1] < losses[0] - 0.5, losses
    assert evals[-1]["gold"] > evals[0]["gold"] + 0.4, evals


# ---------------------------------------------------------------------------------- command line
SMALL = ["--model", "tiny-llama", "--device", "cpu", "--dtype", "float32", "--groups-per-step", "1",
         "--group-size", "2", "--lora-rank", "2", "--eval-episodes", "2", "--maze-size", "8",
         "--maze-episode-steps", "2", "--no-progress"]


def test_cli_train_writes_metrics_and_a_checkpoint(tmp_path, capsys):
    from welfare_server.cli import main

    assert main(["train", *SMALL, "--steps", "1", "--out-dir", str(tmp_path)]) == 0
    records = read_metrics(tmp_path)
    assert [(r["kind"], r["step"]) for r in records] == [("eval", 0), ("train", 1), ("eval", 1)]
    assert {"step", "return", "gold", "mold", "loss", "max_logprob_diff"} <= records[1].keys()
    assert records[1]["moves_checked"] == 4
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000001\n"
    assert "eval at step    1" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--group-size", "0"], "TrainConfig.group_size: 0 is out of range"),
    (["--group-size", "1"], "TrainConfig.group_size: 1 is out of range (the group baseline"),
    (["--lr", "0"], "TrainConfig.lr"),
    (["--lora-layers", "x"], "TrainConfig.lora_layers"),
    (["--maze-size", "3"], "MazeConfig.size=3 is out of bounds"),
    (["--algorithm", "ppo"], "TrainConfig.algorithm"),
])
def test_cli_train_refuses_bad_options_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    from welfare_server.cli import main
    from welfare_server.model import loading

    def refuse(*args, **kwargs):
        raise AssertionError("bad options must be refused before the model is loaded")

    monkeypatch.setattr(loading, "load_model", refuse)
    assert main(["train", *SMALL, *argv, "--out-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_train_preset_options_are_overridable(tmp_path, capsys):
    from welfare_server.cli import main

    # cpu-demo adapts layers 10-29 (of SmolLM2's 30): on the 4-layer tiny model that is refused
    # naming the field, before any training step.
    assert main(["train", "--preset", "cpu-demo", "--model", "tiny-llama", "--no-progress",
                 "--out-dir", str(tmp_path)]) == 2
    assert "TrainConfig.lora_layers: layer 29 does not exist" in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()
