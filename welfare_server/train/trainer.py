"""The RL trainer: rollouts through the engine, Dr. GRPO / GRPO / token REINFORCE / SFT updates of
the shared weights, evaluation on held-out mazes, metrics, checkpoints, data parallelism.

One step:
  1. the current policy's weights go to the engine (LoRA: merged exactly into the base weights;
     full fine-tuning: already there) and engine.refresh_weights();
  2. the step's B x G batch (episodes.group_batch, a pure function of (seed, step)) is played, this
     rank's groups only, each turn's valid moves and neighbour tiles recorded; the oracle plays
     copies of the same mazes for the regret;
  3. the adapters are unmerged (the base weights are again exactly the loaded ones);
  4. advantages per group (losses.py), then the training forward over exactly the sampled ids in
     micro-batches: the recomputed log-prob of every move is checked against the rollout's
     (token in, token out), the per-move losses are summed and divided by (episodes x the token
     constant), gradients accumulate, are all-reduced across ranks, clipped, and AdamW steps.
Metrics go to out_dir/metrics.jsonl (one JSON object per step and per evaluation); checkpoints
(checkpoint.py) let a resumed run continue exactly as the uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from welfare_server.train import losses as L
from welfare_server.train.config import TrainConfig
from welfare_server.train.episodes import Episodes, group_batch, oracle_episodes, play
from welfare_server.train.policy import (LOGPROB_TOLERANCE, TokenMismatch, check_model_tokens, check_moves,
                                          load_tokenizer, move_logits)

TIMING_KEYS = ("moves_per_s", "train_moves_per_s", "rollout_s", "update_s", "step_s", "eval_s")
"""Metrics that measure wall time: everything else a step logs is a function of (config, step)."""

RESUME_FREE_FIELDS = ("out_dir", "progress", "resume", "export_policy", "checkpoint_every", "eval_every", "eval_episodes",
                      "eval_seed", "eval_temperature", "kl_metric_every", "max_rollout_envs", "micro_batch_size")
"""Config fields a resumed run may change: they decide what is logged, saved or how work is chunked,
not what the policy learns (micro-batching changes only the summation order of the gradient)."""


def derive_seed(seed: int, *keys) -> int:
    """A 62-bit seed from the run's seed and a path of keys (a counter, never a shared generator)."""
    digest = hashlib.blake2b(repr((seed,) + keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def mean_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval (1.96 standard errors)."""
    v = values.double()
    if v.numel() < 2:
        return float(v.mean()) if v.numel() else float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std() / math.sqrt(v.numel()))


class Trainer:
    """One training run (see the module docstring).

    steering: a SteeringSpec the rollouts run under (the training forward applies the same
    steering through hooks, so the trained policy is the steered one; CPU only).
    prepare_maze(maze): edits each freshly generated MazeBatch (training batches before their
    groups are cloned, and the held-out ones), e.g. to craft an easy maze.
    loaded: an already loaded model (its name must be config.model's); else it is loaded here.
    """

    def __init__(self, config: TrainConfig, *, steering=None, prepare_maze=None, loaded=None):
        from welfare_server.model.engine import Engine, EngineConfig
        from welfare_server.model.loading import RuntimeConfig, load_model
        from welfare_server.train.distributed import init_world
        from welfare_server.train.rollout import episode_context_tokens

        if not isinstance(config, TrainConfig):
            raise ValueError(f"Trainer: config is a {type(config).__name__}, expected a TrainConfig")
        self.config = c = config
        runtime = RuntimeConfig(device=c.device, dtype=c.dtype)
        device, dtype = runtime.resolve()
        self.world = init_world(device.type)
        if self.world.active and device.type == "cuda":
            device = torch.device("cuda", self.world.local_rank)
            runtime = RuntimeConfig(device=str(device), dtype=c.dtype)
        if c.groups_per_step % self.world.size:
            raise ValueError(f"TrainConfig.groups_per_step: {c.groups_per_step} groups do not split evenly over "
                             f"{self.world.size} processes (each process plays whole groups)")
        if steering is not None and device.type != "cpu":
            raise ValueError("steering: training under steering runs the steering hooks' torch reference in the "
                             "training forward, which is differentiable on the CPU only")
        self.steering = steering
        self.prepare_maze = prepare_maze
        # Everything that can be refused is checked before the weights are read.
        self.tokenizer = loaded.tokenizer if loaded is not None else load_tokenizer(c.model)
        self.table = check_model_tokens(self.tokenizer, c.maze)
        if self.steering is not None:
            from welfare_server.train.rollout import generation_header_ids

            self._header = generation_header_ids(self.tokenizer)
        self.loaded = loaded if loaded is not None else load_model(c.model, runtime)
        self.model = self.loaded.model
        self.device, self.dtype = self.loaded.device, self.loaded.dtype
        self.tolerance = c.logprob_tolerance or LOGPROB_TOLERANCE.get(self.dtype, 0.15)

        self.local_groups = list(range(self.world.rank * c.groups_per_step // self.world.size,
                                       (self.world.rank + 1) * c.groups_per_step // self.world.size))
        self.local_envs = [b * c.group_size + g for b in self.local_groups for g in range(c.group_size)]
        self.eval_envs = list(range(self.world.rank, c.eval_episodes, self.world.size))
        slots = max(1, min(c.max_rollout_envs, max(len(self.local_envs), len(self.eval_envs))))
        # The engine fuses q/k/v and gate/up into shared tensors first; adapters are injected after,
        # around the (now view) parameters, so the engine and the adapters read the same storage.
        self.engine = Engine(self.loaded, EngineConfig(max_batch_slots=slots,
                                                       max_context_len=episode_context_tokens(self.table)))
        if c.finetune == "lora":
            from welfare_server.train.weights import LoraWeights

            self.weights = LoraWeights(self.model, rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout,
                                       target_modules=c.lora_target_modules, layers=c.lora_layer_list(),
                                       seed=derive_seed(c.seed, "adapters"))
        else:
            from welfare_server.train.weights import FullWeights

            self.weights = FullWeights(self.model)
        if c.kl_coef > 0 or c.kl_metric_every > 0:
            self.weights.keep_reference()
        if c.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.params = self.weights.parameters()
        self.param_names = {id(p): n for n, p in self.weights.named_parameters()}
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps,
                                           weight_decay=c.weight_decay, foreach=False)
        self.step = 0
        self.out_dir = Path(c.out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.history: list[dict] = []
        self._resume_or_start()

    # ------------------------------------------------------------------ run
    def run(self) -> list[dict]:
        """Train from the current step to config.steps; returns every metrics record of the run."""
        c = self.config
        bar = None
        if c.progress and self.world.is_main:
            from tqdm import tqdm

            bar = tqdm(total=c.steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True)
        try:
            if self.step == 0 and c.eval_episodes and not any(r.get("kind") == "eval" for r in self.history):
                self._log(self.evaluate())
            while self.step < c.steps:
                record = self.train_step()
                self._log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(ret=f"{record['return']:.1f}", gold=f"{record['gold']:.2f}",
                                    mold=f"{record['mold']:.2f}", refresh=False)
                last = self.step == c.steps
                if c.eval_episodes and (last or (c.eval_every and self.step % c.eval_every == 0)):
                    self._log(self.evaluate())
                if last or (c.checkpoint_every and self.step % c.checkpoint_every == 0):
                    self.save_checkpoint()
            if c.export_policy and self.world.is_main:
                self.export_policy(self.out_dir / "policy")
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def close(self) -> None:
        from welfare_server.train.distributed import close_world

        close_world(self.world)

    # ------------------------------------------------------------------ one step
    def rollout_config(self, temperature: float, seed: int):
        from welfare_server.train.rollout import RolloutConfig

        return RolloutConfig(temperature=temperature, seed=seed)

    def _serve_current_policy(self) -> None:
        self.weights.merge()
        self.engine.refresh_weights()

    def step_mazes(self, step: int):
        """The whole B x G maze batch of step `step` (fresh, every rank the same)."""
        c = self.config
        return group_batch(c.maze, c.groups_per_step, c.group_size, derive_seed(c.seed, "mazes", step),
                           self.prepare_maze)

    def collect(self, step: int) -> Episodes:
        """This rank's episodes of step `step` (played by the current policy, or the oracle's for sft)."""
        c = self.config
        maze = self.step_mazes(step)
        if c.algorithm == "sft":
            generator = torch.Generator().manual_seed(derive_seed(c.seed, "oracle", step, self.world.rank))
            return oracle_episodes(self.table, maze, self.local_envs, generator)
        self._serve_current_policy()
        try:
            return play(self.engine, self.table, maze, self.local_envs,
                        self.rollout_config(c.temperature, derive_seed(c.seed, "moves", step)),
                        steering=self.steering, chunk=self.engine.cfg.max_batch_slots)
        finally:
            self.weights.unmerge()

    def advantages(self, episodes: Episodes) -> torch.Tensor | None:
        """float [n, T] per-move advantages of this rank's episodes (None for sft)."""
        c = self.config
        if c.algorithm == "sft":
            return None
        G, T = c.group_size, c.maze.episode_steps
        order = sorted(range(len(episodes)), key=lambda i: episodes.env_ids[i])
        if order != list(range(len(episodes))):
            raise RuntimeError("episodes are not in batch order")
        if c.algorithm == "reinforce":
            return L.reinforce_advantages(episodes.rewards.view(-1, G, T), c.gamma).reshape(-1, T)
        adv = L.group_advantages(episodes.returns.view(-1, G), normalise_std=c.algorithm == "grpo")
        return adv.reshape(-1, 1).expand(-1, T).contiguous()

    def train_step(self) -> dict:
        """Collect the step's episodes and update the policy once (or mini_batches x ppo_epochs
        times); returns the step's metrics record."""
        from welfare_server.train.distributed import all_reduce_gradients, gather_objects

        c = self.config
        step = self.step
        t0 = time.perf_counter()
        episodes = self.collect(step)
        t1 = time.perf_counter()
        adv = self.advantages(episodes)
        n_global = c.episodes_per_step
        ent_coef = 0.0 if c.algorithm == "sft" else L.cosine_coefficient(
            c.entropy_coef, c.entropy_coef_final, step, max(c.steps - 1, 1))
        lr = c.lr * min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else c.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        want_kl = c.kl_coef > 0 or (c.kl_metric_every > 0 and step % c.kl_metric_every == 0)
        ref_logp = self._reference_logp(episodes) if want_kl else None
        single_pass = c.mini_batches == 1 and c.ppo_epochs == 1 and c.lora_dropout == 0
        stats = {"checked": 0.0, "loss": 0.0, "clipped": 0.0, "entropy": 0.0, "entropy_eq": 0.0, "kl": 0.0,
                 "grad_norm": [], "max_logprob_diff": 0.0}
        old_logp = None
        if not single_pass:  # the ratio's denominator, and the token check, before any update
            old_logp = self._old_logp(episodes, stats, step)
        train_mode = c.gradient_checkpointing or c.lora_dropout > 0
        for epoch in range(c.ppo_epochs):
            for part in range(c.mini_batches):
                index = [i for i, e in enumerate(episodes.env_ids) if e % c.mini_batches == part]
                n_part = len(range(part, n_global, c.mini_batches))  # this part's episodes over all ranks
                self.optimizer.zero_grad(set_to_none=True)
                self.model.train(train_mode)
                try:
                    for start in range(0, len(index), c.micro_batch_size):
                        micro = index[start:start + c.micro_batch_size]
                        self._micro_step(episodes, micro, adv, old_logp, ref_logp, ent_coef, n_part, stats,
                                         step, first_pass=single_pass, record=epoch == 0)
                finally:
                    self.model.eval()
                all_reduce_gradients(self.params, self.world)
                if c.max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm)
                else:
                    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
                stats["grad_norm"].append(float(norm))
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        self.step += 1
        return self._step_record(episodes, stats, gather_objects, ent_coef, lr, want_kl, t0, t1, t2)

    def _micro_step(self, episodes: Episodes, micro: list[int], adv, old_logp, ref_logp, ent_coef: float,
                    n_part: int, stats: dict, step: int, *, first_pass: bool, record: bool) -> None:
        c = self.config
        sub = episodes.select(micro)
        logits = self._forward(sub)
        valid = sub.valid.to(logits.device)
        actions = sub.actions.to(logits.device)
        logp_all = L.masked_log_softmax(logits, valid, c.temperature if c.tempered_policy else 1.0)
        taken = logp_all.gather(-1, actions[..., None]).squeeze(-1)
        if first_pass and c.algorithm != "sft":
            plain = taken if not c.tempered_policy else L.masked_log_softmax(logits, valid).gather(
                -1, actions[..., None]).squeeze(-1)
            self._check(sub, plain, stats, step)
        if c.algorithm == "sft":
            per_move = -taken
            clipped = torch.zeros_like(taken)
        elif c.algorithm == "reinforce":
            per_move = -adv[micro].to(taken.device) * taken
            clipped = torch.zeros_like(taken)
        else:
            old = taken.detach() if old_logp is None else old_logp[micro].to(taken.device)
            per_move, clipped = L.dual_clip_ppo(taken, old, adv[micro].to(taken.device), c.clip_eps, c.dual_clip)
        ent_plain = L.entropy(logp_all)
        ent_eq = L.equalised_entropy(logp_all, valid, sub.neighbours.to(logits.device))
        if ent_coef > 0:
            per_move = per_move - ent_coef * (ent_eq if c.entropy_mode == "equalised" else ent_plain)
        if ref_logp is not None:
            kl = L.kl_to_reference(logp_all, ref_logp[micro].to(logp_all.device))
            if c.kl_coef > 0:
                per_move = per_move + c.kl_coef * kl
            if record:
                stats["kl"] += float(kl.detach().sum())
        loss = per_move.sum() / (n_part * c.token_constant)
        loss.backward()
        if record:
            stats["loss"] += float(loss.detach())
            stats["clipped"] += float(clipped.sum())
            stats["entropy"] += float(ent_plain.detach().sum())
            stats["entropy_eq"] += float(ent_eq.detach().sum())

    def _forward(self, sub: Episodes) -> torch.Tensor:
        if self.steering is None:
            return move_logits(self.model, sub.token_ids, sub.answer_positions, self.table.action_token_ids,
                               self.table.pad_id)
        from welfare_server.model.hf_reference import hook_steering

        masks, width = self._steer_masks(sub)
        with hook_steering(self.model, [self.steering] * len(sub), masks, width):
            return move_logits(self.model, sub.token_ids, sub.answer_positions, self.table.action_token_ids,
                               self.table.pad_id)

    def _steer_masks(self, sub: Episodes) -> tuple[list[torch.Tensor], int]:
        """Per episode, which conversation tokens the rollout steered (the roles play_episodes gave
        them: generation headers, answers and end-of-turn ids are the assistant's), right-padded."""
        from welfare_server.model.steering import GENERATED_ROLE, prompt_steer_mask

        width = max(len(ids) for ids in sub.token_ids)
        end, header = self.table.assistant_end_ids, self._header
        masks = []
        for ids, answers in zip(sub.token_ids, sub.answer_positions):
            roles = ["system"] * len(self.table.conversation_prefix_ids) + ["user"] * (
                len(ids) - len(self.table.conversation_prefix_ids))
            for a in answers:
                roles[a] = GENERATED_ROLE
                for k in range(len(end)):
                    roles[a + 1 + k] = "assistant"
                for k in range(len(header)):
                    roles[a - 1 - k] = "assistant"
            mask = torch.zeros(width, dtype=torch.bool)
            mask[:len(ids)] = prompt_steer_mask(self.steering.scope, roles, len(ids))
            masks.append(mask)
        return masks, width

    def _check(self, sub: Episodes, plain_taken: torch.Tensor, stats: dict, step: int) -> None:
        try:
            worst = check_moves(sub.token_ids, sub.answer_positions, sub.actions, self.table.action_token_ids,
                                sub.logprobs, plain_taken.cpu(), self.tolerance, sub.env_ids)
        except TokenMismatch as error:
            raise TokenMismatch(f"step {step}, {error}") from None
        stats["max_logprob_diff"] = max(stats["max_logprob_diff"], worst)
        stats["checked"] += plain_taken.numel()

    @torch.no_grad()
    def _old_logp(self, episodes: Episodes, stats: dict, step: int) -> torch.Tensor:
        """The behaviour policy's log-probs of the taken moves, recomputed (and checked) before the
        first update of the step."""
        c = self.config
        out = []
        for start in range(0, len(episodes), c.micro_batch_size):
            sub = episodes.select(list(range(start, min(start + c.micro_batch_size, len(episodes)))))
            logits = self._forward(sub)
            valid, actions = sub.valid.to(logits.device), sub.actions.to(logits.device)[..., None]
            plain = L.masked_log_softmax(logits, valid).gather(-1, actions).squeeze(-1)
            if c.algorithm != "sft":
                self._check(sub, plain, stats, step)
            policy = plain if not c.tempered_policy else L.masked_log_softmax(
                logits, valid, c.temperature).gather(-1, actions).squeeze(-1)
            out.append(policy.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def _reference_logp(self, episodes: Episodes) -> torch.Tensor:
        """The initial policy's move log-probs [n, T, 4] (for the KL term and its metric)."""
        c = self.config
        out = []
        with self.weights.reference_model() as ref:
            for start in range(0, len(episodes), c.micro_batch_size):
                sub = episodes.select(list(range(start, min(start + c.micro_batch_size, len(episodes)))))
                logits = move_logits(ref, sub.token_ids, sub.answer_positions, self.table.action_token_ids,
                                     self.table.pad_id)
                out.append(L.masked_log_softmax(logits, sub.valid.to(logits.device),
                                                c.temperature if c.tempered_policy else 1.0).float().cpu())
        return torch.cat(out)

    def _step_record(self, episodes: Episodes, stats: dict, gather, ent_coef, lr, want_kl, t0, t1, t2) -> dict:
        c = self.config
        local = {"returns": episodes.returns, "gold": episodes.gold, "mold": episodes.mold,
                 "regret": episodes.regret, "oracle": episodes.oracle_returns,
                 "sums": {k: stats[k] for k in ("loss", "clipped", "entropy", "entropy_eq", "kl")},
                 "max_diff": stats["max_logprob_diff"], "checked": stats["checked"]}
        parts = gather(local, self.world)
        cat = {k: torch.cat([p[k] for p in parts]) for k in ("returns", "gold", "mold", "regret", "oracle")}
        sums = {k: sum(p["sums"][k] for p in parts) for k in local["sums"]}
        moves = c.episodes_per_step * c.maze.episode_steps
        record = {
            "kind": "train", "step": self.step, "algorithm": c.algorithm,
            "return": float(cat["returns"].mean()), "gold": float(cat["gold"].mean()),
            "mold": float(cat["mold"].mean()), "regret": float(cat["regret"].mean()),
            "oracle_return": float(cat["oracle"].mean()),
            "loss": sums["loss"] / c.mini_batches,
            "entropy": sums["entropy"] / moves, "entropy_eq": sums["entropy_eq"] / moves,
            "kl": sums["kl"] / moves if want_kl else None,
            "clip_frac": sums["clipped"] / moves,
            "grad_norm": stats["grad_norm"][-1] if stats["grad_norm"] else None,
            "lr": lr, "entropy_coef": ent_coef,
            "max_logprob_diff": max(p["max_diff"] for p in parts), "moves_checked": int(sum(p["checked"] for p in parts)),
            "moves_per_s": moves / (t1 - t0), "train_moves_per_s": moves / (t2 - t0),
            "rollout_s": t1 - t0, "update_s": t2 - t1, "step_s": t2 - t0,
        }
        return record

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Play the held-out mazes (eval_seed: the same mazes and move seeds at every evaluation,
        so evaluations differ only by the policy) with the current policy; means with 95% CIs."""
        from welfare_server.maze import MazeBatch
        from welfare_server.train.distributed import gather_objects

        c = self.config
        t0 = time.perf_counter()
        maze = MazeBatch(c.maze, c.eval_episodes, seed=c.eval_seed)
        if self.prepare_maze is not None:
            self.prepare_maze(maze)
        self._serve_current_policy()
        try:
            episodes = play(self.engine, self.table, maze, self.eval_envs,
                            self.rollout_config(c.eval_sampling_temperature, derive_seed(c.eval_seed, "moves")),
                            steering=self.steering, chunk=self.engine.cfg.max_batch_slots)
        finally:
            self.weights.unmerge()
        parts = gather_objects({"returns": episodes.returns, "gold": episodes.gold, "mold": episodes.mold,
                                "regret": episodes.regret, "env_ids": episodes.env_ids}, self.world)
        order = torch.tensor(sum((p["env_ids"] for p in parts), [])).argsort()
        record = {"kind": "eval", "step": self.step, "episodes": c.eval_episodes,
                  "temperature": c.eval_sampling_temperature}
        for key in ("returns", "gold", "mold", "regret"):
            values = torch.cat([p[key] for p in parts])[order]
            mean, half = mean_ci(values)
            name = "return" if key == "returns" else key
            record[name], record[name + "_ci95"] = mean, half
        record["eval_s"] = time.perf_counter() - t0
        return record

    # ------------------------------------------------------------------ metrics, checkpoints
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.world.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _config_dict(self) -> dict:
        import dataclasses

        d = dataclasses.asdict(self.config)
        return d

    def save_checkpoint(self) -> Path | None:
        from welfare_server.train.checkpoint import optimizer_tensors, write_checkpoint
        from welfare_server.train.distributed import barrier

        path = None
        if self.world.is_main:
            weights = {n: p.detach() for n, p in self.weights.named_parameters()}
            meta = {"step": self.step, "config": self._config_dict(), "metrics_lines": len(self.history),
                    "finetune": self.weights.kind, "world_size": self.world.size}
            path = write_checkpoint(self.out_dir, self.step, weights,
                                    optimizer_tensors(self.optimizer, self.param_names), meta)
        barrier(self.world)
        return path

    def export_policy(self, path: Path) -> Path:
        """Write the current policy as a plain Hugging Face directory (weights.export_policy)."""
        from welfare_server.train.weights import export_policy

        return export_policy(self.weights, self.model.config, self.tokenizer, path)

    def _resume_or_start(self) -> None:
        from welfare_server.train.checkpoint import (latest_checkpoint, load_optimizer_tensors, read_checkpoint,
                                                     restore_rng)
        from welfare_server.train.distributed import barrier

        path = latest_checkpoint(self.out_dir) if self.config.resume else None
        if path is None:
            if self.world.is_main and self.metrics_path.exists():
                self.metrics_path.unlink()  # a fresh run: its own metrics only
            barrier(self.world)
            return
        weights, optimizer, rng, meta = read_checkpoint(path)
        saved = meta["config"]
        current = self._config_dict()
        changed = sorted(k for k in current if k not in RESUME_FREE_FIELDS and saved.get(k) != current[k])
        if changed:
            raise ValueError(f"resume: the checkpoint {path} was written by a run with other settings "
                             f"({', '.join(changed)}); use another out_dir, or --no-resume to start over")
        with torch.no_grad():
            for name, p in self.weights.named_parameters():
                if name not in weights:
                    raise ValueError(f"resume: {path} has no tensor {name!r}")
                p.copy_(weights[name].to(p.device, p.dtype))
        load_optimizer_tensors(self.optimizer, self.param_names, optimizer)
        restore_rng(rng)
        self.step = int(meta["step"])
        if self.metrics_path.exists():
            with open(self.metrics_path) as f:
                lines = f.readlines()[:int(meta["metrics_lines"])]
            self.history = [json.loads(line) for line in lines]
            barrier(self.world)
            if self.world.is_main:
                with open(self.metrics_path, "w") as f:
                    f.writelines(lines)
        barrier(self.world)
