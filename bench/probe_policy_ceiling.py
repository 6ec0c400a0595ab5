"""How well any readout of a model's answer-position residual could play the maze's first move:
the ceiling of a policy that learns to read what the model already computes.

Training in the maze improves a policy only by making its move depend on the tiles its prompt
shows. The cheapest change, and the one a small budget of updates can make, is a new readout of
the residual at the answer position (adapters on the last layers mostly act as one). This measures what the best such readout achieves, with noise-free supervision: for N
first-turn prompts of the paper's maze, readouts of the residual at the last prompt token are fit
on a share of them to maximise the expected reward of the first move exactly (the softmax over the
valid moves, each move scored by the tile it enters, MazeConfig's rewards: Mold -10, Gold +20,
Path 0; the step cost is the same for every move), and scored on the rest:

  model       the model's own move distribution (temperature 1), nothing fit
  bias        the best context-free policy: one logit per direction (N, E, S, W)
  linear      a linear map of the standardised residual (L2-regularised, full-batch L-BFGS)
  mlp         one hidden layer of 256 GELU units (AdamW, full batch)
  visible     the best move the prompt's tiles allow (Gold if one is valid, else Path, else Mold)

Rows (one per readout and layer) go to bench/results/policy_ceiling.csv with the held-out rates
of moving onto Mold and onto Gold, beside those tiles' shares of the valid directions.

    python bench/probe_policy_ceiling.py --prompts 1280 --layers 16,24,30
"""

from __future__ import annotations

import time

import torch

from _common import append_rows, git_commit, machine_name, utc_now  # bench/ is sys.path[0]
from probe_tile_readout import first_turn_arguments, first_turn_readings
from welfare_server.maze import GOLD, MOLD, MazeConfig

FIELDS = ["date", "machine", "commit", "model", "prompts", "train_prompts", "readout", "layer",
          "heldout_mold_rate", "heldout_gold_rate", "train_mold_rate", "train_gold_rate",
          "mold_share_of_valid", "gold_share_of_valid", "note"]

def move_rewards(neighbours: torch.Tensor, valid: torch.Tensor, config: MazeConfig) -> torch.Tensor:
    """Reward [n, 4] of entering each move's tile (0 where the move is not valid; the step cost is
    the same for every move), scaled to a unit Mold penalty so the objective's gradients are of
    order one."""
    scale = abs(config.mold_reward) or 1.0
    reward = torch.zeros(neighbours.shape)
    reward[neighbours == MOLD] = config.mold_reward / scale
    reward[neighbours == GOLD] = config.gold_reward / scale
    return torch.where(valid, reward, torch.zeros_like(reward))


def valid_shares(neighbours: torch.Tensor, valid: torch.Tensor) -> dict[str, float]:
    """Mold's and Gold's shares of the valid directions (what a policy blind to the tiles enters),
    as the CSV columns mold_share_of_valid / gold_share_of_valid."""
    return {f"{name}_share_of_valid": round(float(((neighbours == tile) & valid).sum() / valid.sum()), 4)
            for tile, name in ((MOLD, "mold"), (GOLD, "gold"))}


def expected_reward(logits: torch.Tensor, valid: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """Mean over prompts of the expected reward of the softmax policy over the valid moves."""
    probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    return (probs * reward).sum(dim=-1).mean()


def onto_rates(logits: torch.Tensor, valid: torch.Tensor, neighbours: torch.Tensor) -> tuple[float, float]:
    """Probability that the policy's move enters Mold and Gold, averaged over prompts."""
    probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    return tuple(float((probs * (neighbours == tile)).sum(dim=-1).mean()) for tile in (MOLD, GOLD))


def fit_bias(valid, reward, train) -> torch.Tensor:
    bias = torch.zeros(4, requires_grad=True)
    opt = torch.optim.LBFGS([bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -expected_reward(bias.expand(int(train.sum()), 4), valid[train], reward[train])
        loss.backward()
        return loss

    opt.step(closure)
    return bias.detach().expand(len(valid), 4)


def fit_linear(z, valid, reward, train, l2: float) -> torch.Tensor:
    w = torch.zeros(z.shape[1], 4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -expected_reward(z[train] @ w + b, valid[train], reward[train]) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (z @ w + b).detach()


def fit_mlp(z, valid, reward, train, iterations: int, seed: int) -> torch.Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(z.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 4))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(iterations):
        loss = -expected_reward(net(z[train]), valid[train], reward[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net(z)


def visible_best(neighbours, valid) -> torch.Tensor:
    """Logits of the best move the visible tiles allow (ties split evenly)."""
    value = torch.full(neighbours.shape, -1.0)
    value[neighbours == GOLD] = 2.0
    value[(neighbours != GOLD) & (neighbours != MOLD)] = 1.0
    value = value.masked_fill(~valid, -9.0)
    best = value == value.max(dim=1, keepdim=True).values
    return torch.where(best, 0.0, -1e4)


def main() -> None:
    ap = first_turn_arguments(__doc__, prompts=1280, seed=1234, l2=1e-2, out="policy_ceiling.csv")
    ap.add_argument("--train-share", type=float, default=0.8)
    ap.add_argument("--layers", default="16,24,30",
                    help="residual points: l < L is the residual entering block l, L the final norm's output")
    ap.add_argument("--mlp-iterations", type=int, default=600)
    args = ap.parse_args()

    started = time.perf_counter()
    prompts, neighbours, valid, states, model_logits = first_turn_readings(args.model, args.prompts, args.seed,
                                                                           args.batch)
    layers = [int(x) for x in args.layers.split(",")]
    if min(layers) < 0 or max(layers) >= states.shape[0]:
        raise SystemExit(f"--layers: points are 0..{states.shape[0] - 1}")

    train = torch.arange(len(prompts)) < int(args.train_share * len(prompts))
    test = ~train
    reward = move_rewards(neighbours, valid, MazeConfig())
    shares = valid_shares(neighbours, valid)
    common = dict(date=utc_now(), machine=machine_name("cpu"), commit=git_commit(), model=args.model,
                  prompts=len(prompts), train_prompts=int(train.sum()), note=args.note, **shares)
    rows = []

    def record(readout: str, layer, logits: torch.Tensor) -> None:
        held, fit = onto_rates(logits[test], valid[test], neighbours[test]), onto_rates(
            logits[train], valid[train], neighbours[train])
        rows.append(dict(common, readout=readout, layer=layer, heldout_mold_rate=round(held[0], 4),
                         heldout_gold_rate=round(held[1], 4), train_mold_rate=round(fit[0], 4),
                         train_gold_rate=round(fit[1], 4)))
        print(f"{readout:>8} {str(layer):>4}: held-out onto Mold {held[0]:.3f}, onto Gold {held[1]:.3f} "
              f"(fit set {fit[0]:.3f} / {fit[1]:.3f})")

    print(f"shares of the valid directions: Mold {shares['mold_share_of_valid']:.3f}, "
          f"Gold {shares['gold_share_of_valid']:.3f}")
    record("model", "", model_logits)
    record("bias", "", fit_bias(valid, reward, train))
    record("visible", "", visible_best(neighbours, valid))
    for layer in layers:
        x = states[layer]
        z = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
        record("linear", layer, fit_linear(z, valid, reward, train, args.l2))
        record("mlp", layer, fit_mlp(z, valid, reward, train, args.mlp_iterations, args.seed))
    append_rows(args.out, FIELDS, rows)
    print(f"appended {len(rows)} rows to {args.out} ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
