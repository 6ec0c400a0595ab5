"""TrainConfig: every setting of one training run, checked when made; the presets.

`paper` is the paper's primary run (Han, Chalmers, Izmailov 2026, Appendix Q, Table 28: "4B
Instruct Dr. GRPO (main)") as far as the paper states it:

  stated: Dr. GRPO; LoRA rank 32, alpha 64 on all linear modules; learning rate 3e-6; equalised
  entropy bonus coefficient 0.01; 95 steps (the checkpoint used); group size 64; 8 prompts
  (mazes) per batch; sampling temperature 0.7; 15-move mazes with rewards +20 / -10 / -0.1 and
  10% wind (MazeConfig's defaults); 1024-token rollouts.
  assumed here: the base model is Qwen3-4B-Instruct-2507, a local Hugging Face directory given
  with --model (nothing is downloaded); "1024-token rollouts" is the generation budget Dr. GRPO
  divides the token sum by (loss_token_constant = 1024); PPO clip 0.2 and dual clip c = 3.0; one
  optimizer step per batch (mini_batches = ppo_epochs = 1), so the ratio is 1 and clipping only
  guards later passes; AdamW betas (0.9, 0.999), no weight decay, no warm-up, gradient norm
  clipped at 1.0; the entropy coefficient cosine-annealed to 0 over the run; no KL term; the
  paper's "10 rollouts per prompt" is read as its evaluation (eval_episodes = 8 mazes x 10 is
  not what it says either, so evaluation here plays 80 held-out mazes once each).

`cpu-demo` is sized for two CPU cores and the bundled SmolLM2-135M-Instruct on the paper's maze.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from welfare_server.maze import MazeConfig
from welfare_server.model.fields import check_bool, check_int, check_number, check_str

ALGORITHMS = ("dr_grpo", "grpo", "reinforce", "sft")
FINETUNE = ("lora", "full")
ENTROPY_MODES = ("equalised", "plain")
MAX_STEPS = 10_000_000
MAX_SEED = (1 << 62) - 1


@dataclass(frozen=True)
class TrainConfig:
    """One training run (see the module docstring for the presets). Every field is checked when
    the config is made; a bad value is refused naming the field before anything is loaded."""

    # ------------------------------------------------------------------ model and precision
    model: str = "smollm2-135m-instruct"
    """The bundled model's name, a tiny preset (tiny-llama, ...) or a local Hugging Face directory."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU) or a torch device string."""
    dtype: str = "auto"
    """"auto" (bf16 on CUDA, fp32 on CPUs without native bf16), float32, bfloat16 or float16."""

    # ------------------------------------------------------------------ algorithm
    algorithm: str = "dr_grpo"
    """dr_grpo (group-relative advantage without std normalisation, dual-clip PPO, token sum over a
    constant), grpo (std-normalised advantages, optional KL), reinforce (token-level: per-turn
    returns-to-go minus a per-position group baseline) or sft (oracle trajectories, the non-RL
    control)."""
    steps: int = 95
    """Optimizer updates (training steps) in the run."""
    groups_per_step: int = 8
    """Mazes per step ("prompts per batch"): each is one GRPO group (sft: batch = groups x size)."""
    group_size: int = 64
    """Episodes per maze per step: env b of the batch is cloned into group_size envs (independent
    wind and prompt shuffles), which share the group's baseline."""
    temperature: float = 0.7
    """Sampling temperature of the rollouts (over the valid moves' tokens)."""
    tempered_policy: bool = False
    """The loss's policy: False, the untempered masked move distribution (the rollout's recorded
    log-probs); True, the distribution the moves were sampled from, softmax(logits / temperature)."""
    gamma: float = 1.0
    """Discount of the returns-to-go (reinforce)."""

    # ------------------------------------------------------------------ objective
    clip_eps: float = 0.2
    """PPO clip range epsilon (ratio clipped to [1 - eps, 1 + eps])."""
    dual_clip: float = 3.0
    """Dual-clip constant c (> 1): under a negative advantage the surrogate is bounded below by c * A."""
    kl_coef: float = 0.0
    """Weight of KL(policy || initial policy) in the loss (exact over the valid moves); 0 = none."""
    entropy_coef: float = 0.01
    """Entropy bonus coefficient at step 0 (cosine-annealed to entropy_coef_final at the last step)."""
    entropy_coef_final: float = 0.0
    """Entropy bonus coefficient at the last step."""
    entropy_mode: str = "equalised"
    """equalised: entropy within groups of valid moves that lead to the same tile type, weighted by
    the group's detached probability (never pushes toward a tile type; losses.equalised_entropy);
    plain: the entropy of the whole move distribution."""
    loss_token_constant: int = 0
    """Dr. GRPO's constant: each episode's token sum is divided by it (and the batch averaged over
    episodes); 0 = episode_steps (one trained token per move)."""

    # ------------------------------------------------------------------ fine-tuning
    finetune: str = "lora"
    """lora (PEFT adapters, merged into the shared base weights for rollouts) or full (the engine's
    own parameters are trained)."""
    lora_rank: int = 32
    """LoRA rank r."""
    lora_alpha: float = 64.0
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path's input (0 keeps the training forward deterministic)."""
    lora_target_modules: str = "all-linear"
    """Comma-separated module names to adapt (q_proj,v_proj,...) or all-linear (every linear but
    the output head)."""
    lora_layers: str = ""
    """Decoder layers that get adapters: empty = all; "a-b" (inclusive) or a comma list. Adapting
    only upper layers stops the backward pass there (cheaper on a CPU)."""

    # ------------------------------------------------------------------ optimizer
    lr: float = 3e-6
    """AdamW learning rate (after warm-up; constant)."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this before each optimizer step; 0 = no clipping."""
    micro_batch_size: int = 4
    """Episodes per forward/backward pass; their gradients accumulate into one optimizer step."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch per epoch (the batch is split into this many parts)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""

    # ------------------------------------------------------------------ rollouts and checks
    max_rollout_envs: int = 256
    """Envs played at once by one engine (its KV-cache slots); a rank's share of the batch is
    played in chunks of at most this many."""
    logprob_tolerance: float = 0.0
    """Largest |training log-prob - rollout log-prob| of a move accepted by the token-in/token-out
    check; 0 = by dtype (fp32 2e-3, bf16/fp16 0.15)."""

    # ------------------------------------------------------------------ evaluation, logging
    seed: int = 0
    """Seed of the run: the mazes, moves and adapter initialisation of every step derive from it."""
    eval_every: int = 10
    """Evaluate every this many steps (and after the last); 0 = only before the first and after
    the last step."""
    eval_episodes: int = 80
    """Held-out mazes played (one episode each) per evaluation."""
    eval_seed: int = 987_654_321
    """Seed of the held-out mazes (a seed stream the training mazes never use)."""
    eval_temperature: float = -1.0
    """Sampling temperature of evaluation episodes; -1 = the training temperature, 0 = greedy."""
    kl_metric_every: int = 1
    """Report the KL to the initial policy every this many steps (one extra forward); 0 = only when
    kl_coef needs it."""
    checkpoint_every: int = 10
    """Write a checkpoint every this many steps (and after the last); 0 = only after the last."""
    out_dir: str = "runs/train"
    """Directory of metrics.jsonl and checkpoints/."""
    export_policy: bool = True
    """After the last step, write the trained policy (adapters merged) as a plain Hugging Face model
    directory, out_dir/policy, that every other command loads with --model (vectors extract, serve)."""
    resume: bool = True
    """Continue from the latest checkpoint in out_dir when there is one."""
    progress: bool = True
    """Show a progress bar on stderr."""

    maze: MazeConfig = field(default_factory=MazeConfig)
    """The maze's rules (MazeConfig; its own options on the command line)."""

    def __post_init__(self) -> None:
        E = ValueError
        check_str(self.model, "TrainConfig.model", E)
        check_str(self.device, "TrainConfig.device", E)
        check_str(self.dtype, "TrainConfig.dtype", E)
        check_str(self.algorithm, "TrainConfig.algorithm", E, choices=ALGORITHMS)
        check_int(self.steps, "TrainConfig.steps", E, 1, MAX_STEPS)
        check_int(self.groups_per_step, "TrainConfig.groups_per_step", E, 1, 1 << 20)
        check_int(self.group_size, "TrainConfig.group_size", E, 1, 1 << 20)
        if self.algorithm in ("dr_grpo", "grpo", "reinforce") and self.group_size < 2:
            raise E(f"TrainConfig.group_size: {self.group_size} is out of range (the group baseline of "
                    f"{self.algorithm} needs at least 2 episodes per maze)")
        check_number(self.temperature, "TrainConfig.temperature", E, 0.0, 100.0, lo_open=True,
                     rule="must be in (0, 100]: training samples its moves")
        check_bool(self.tempered_policy, "TrainConfig.tempered_policy", E)
        check_number(self.gamma, "TrainConfig.gamma", E, 0.0, 1.0)
        check_number(self.clip_eps, "TrainConfig.clip_eps", E, 0.0, 1.0, lo_open=True)
        check_number(self.dual_clip, "TrainConfig.dual_clip", E, 1.0, 1e6, lo_open=True)
        check_number(self.kl_coef, "TrainConfig.kl_coef", E, 0.0, 1e6)
        check_number(self.entropy_coef, "TrainConfig.entropy_coef", E, 0.0, 1e6)
        check_number(self.entropy_coef_final, "TrainConfig.entropy_coef_final", E, 0.0, 1e6)
        check_str(self.entropy_mode, "TrainConfig.entropy_mode", E, choices=ENTROPY_MODES)
        check_int(self.loss_token_constant, "TrainConfig.loss_token_constant", E, 0, 1 << 30)
        check_str(self.finetune, "TrainConfig.finetune", E, choices=FINETUNE)
        check_int(self.lora_rank, "TrainConfig.lora_rank", E, 1, 1 << 16)
        check_number(self.lora_alpha, "TrainConfig.lora_alpha", E, 0.0, 1e6, lo_open=True)
        check_number(self.lora_dropout, "TrainConfig.lora_dropout", E, 0.0, 1.0)
        if self.lora_dropout >= 1.0:
            raise E(f"TrainConfig.lora_dropout: {self.lora_dropout} is out of range (must be in [0, 1))")
        check_str(self.lora_target_modules, "TrainConfig.lora_target_modules", E)
        check_str(self.lora_layers, "TrainConfig.lora_layers", E, nonempty=False)
        self.lora_layer_list()  # refuses a malformed list now
        check_number(self.lr, "TrainConfig.lr", E, 0.0, 10.0, lo_open=True)
        check_int(self.warmup_steps, "TrainConfig.warmup_steps", E, 0, MAX_STEPS)
        check_number(self.weight_decay, "TrainConfig.weight_decay", E, 0.0, 10.0)
        check_number(self.adam_beta1, "TrainConfig.adam_beta1", E, 0.0, 1.0)
        check_number(self.adam_beta2, "TrainConfig.adam_beta2", E, 0.0, 1.0)
        if self.adam_beta1 >= 1.0 or self.adam_beta2 >= 1.0:
            raise E("TrainConfig.adam_beta1/adam_beta2: must be < 1")
        check_number(self.adam_eps, "TrainConfig.adam_eps", E, 0.0, 1.0, lo_open=True)
        check_number(self.max_grad_norm, "TrainConfig.max_grad_norm", E, 0.0, 1e12)
        check_int(self.micro_batch_size, "TrainConfig.micro_batch_size", E, 1, 1 << 20)
        check_int(self.mini_batches, "TrainConfig.mini_batches", E, 1, 1 << 20)
        check_int(self.ppo_epochs, "TrainConfig.ppo_epochs", E, 1, 1000)
        check_bool(self.gradient_checkpointing, "TrainConfig.gradient_checkpointing", E)
        if self.mini_batches > self.episodes_per_step:
            raise E(f"TrainConfig.mini_batches: {self.mini_batches} is more than the {self.episodes_per_step} "
                    f"episodes of a step (groups_per_step x group_size)")
        check_int(self.max_rollout_envs, "TrainConfig.max_rollout_envs", E, 1, 1 << 20)
        check_number(self.logprob_tolerance, "TrainConfig.logprob_tolerance", E, 0.0, 1e6)
        check_int(self.seed, "TrainConfig.seed", E, 0, MAX_SEED)
        check_int(self.eval_every, "TrainConfig.eval_every", E, 0, MAX_STEPS)
        check_int(self.eval_episodes, "TrainConfig.eval_episodes", E, 0, 1 << 20)
        check_int(self.eval_seed, "TrainConfig.eval_seed", E, 0, MAX_SEED)
        if self.eval_temperature != -1.0:
            check_number(self.eval_temperature, "TrainConfig.eval_temperature", E, 0.0, 100.0,
                         rule="must be -1 (the training temperature) or in [0, 100]")
        check_int(self.kl_metric_every, "TrainConfig.kl_metric_every", E, 0, MAX_STEPS)
        check_int(self.checkpoint_every, "TrainConfig.checkpoint_every", E, 0, MAX_STEPS)
        check_str(self.out_dir, "TrainConfig.out_dir", E)
        check_bool(self.export_policy, "TrainConfig.export_policy", E)
        check_bool(self.resume, "TrainConfig.resume", E)
        check_bool(self.progress, "TrainConfig.progress", E)
        if not isinstance(self.maze, MazeConfig):
            raise E(f"TrainConfig.maze: a {type(self.maze).__name__}, expected a MazeConfig")
        if self.maze.autoreset:
            raise E("TrainConfig.maze: autoreset must be False (each step plays fresh mazes)")

    # ------------------------------------------------------------------ derived
    @property
    def episodes_per_step(self) -> int:
        return self.groups_per_step * self.group_size

    @property
    def token_constant(self) -> int:
        """The divisor of each episode's token sum (Dr. GRPO's constant)."""
        return self.loss_token_constant or self.maze.episode_steps

    @property
    def eval_sampling_temperature(self) -> float:
        return self.temperature if self.eval_temperature == -1.0 else float(self.eval_temperature)

    def lora_layer_list(self) -> list[int] | None:
        """The decoder layers that get adapters (None = all), from lora_layers."""
        text = self.lora_layers.strip()
        if not text:
            return None
        try:
            if "-" in text and "," not in text:
                lo, hi = (int(x) for x in text.split("-"))
                layers = list(range(lo, hi + 1))
            else:
                layers = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"TrainConfig.lora_layers: {text!r} is not a layer range \"a-b\" or a comma "
                             f"list of layer indices") from None
        if not layers or min(layers) < 0:
            raise ValueError(f"TrainConfig.lora_layers: {text!r} names no layer, or a negative one")
        return layers

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict] = {
    "paper": dict(
        model="Qwen/Qwen3-4B-Instruct-2507", algorithm="dr_grpo", steps=95, groups_per_step=8, group_size=64,
        temperature=0.7, finetune="lora", lora_rank=32, lora_alpha=64.0, lora_target_modules="all-linear",
        lr=3e-6, entropy_coef=0.01, entropy_coef_final=0.0, entropy_mode="equalised", clip_eps=0.2,
        dual_clip=3.0, kl_coef=0.0, loss_token_constant=1024, micro_batch_size=8, max_grad_norm=1.0,
        eval_every=5, eval_episodes=80, checkpoint_every=5, maze=MazeConfig()),
    # Two CPU cores and SmolLM2-135M on the paper's maze (100x100, 15 moves, wind, melting), sized
    # for about 30 minutes: an episode is ~1,300 tokens; a step of 8 episodes takes ~27 s of
    # rollout and ~70 s of training forward/backward on the Zen 2 VM, so the run sees 128
    # episodes. Token-level REINFORCE with gamma 0 (each move credited with the tile it enters,
    # which its prompt shows: 15 credit assignments per episode, no noise from later tiles), a
    # plain entropy bonus (without it the policy collapses onto one direction within ~10 steps at
    # this learning rate), adapters on the upper two thirds of the layers. Measured (bench/results/
    # train_runs.csv): at this budget the held-out Gold and Mold do not change beyond their 95%
    # CIs; the untrained policy's moves do not depend on the tiles at all, and reading the
    # direction-to-glyph binding from the prompt takes more experience than 128 episodes. What a
    # new readout of the model's own features could reach bounds what a short run can learn
    # (bench/probe_policy_ceiling.py, policy_ceiling.csv): fit noise-free on 1,024 first moves,
    # the best linear readout of the answer-position residual moves onto Gold 0.09-0.12 of the
    # time (the model 0.088), a 256-unit MLP 0.12-0.15; doubling needs ~0.18. Adapters on the
    # upper blocks trained on those exact first-move rewards (bench/probe_lora_first_move.py)
    # either collapse onto the best direction bias or barely move in 60 updates.
    "cpu-demo": dict(
        model="smollm2-135m-instruct", device="cpu", dtype="float32", algorithm="reinforce", steps=16,
        groups_per_step=2, group_size=4, temperature=1.0, gamma=0.0, finetune="lora", lora_rank=16,
        lora_alpha=32.0, lora_layers="10-29", lr=3e-4, entropy_coef=0.02, entropy_coef_final=0.0,
        entropy_mode="plain", micro_batch_size=2, eval_every=0, eval_episodes=24, checkpoint_every=4,
        kl_metric_every=0, maze=MazeConfig()),
}


def preset_config(name: str | None, **overrides) -> TrainConfig:
    """The named preset (None: the dataclass defaults) with overrides applied, validated."""
    if name is not None and name not in PRESETS:
        raise ValueError(f"preset: {name!r} is not one of {sorted(PRESETS)}")
    values = dict(PRESETS[name]) if name is not None else {}
    values.update(overrides)
    return TrainConfig(**values)
