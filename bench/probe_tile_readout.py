"""Where the maze prompt's tile-to-direction binding is readable in a model, and whether the model
uses it: linear probes on the residual stream at the answer position of first-turn prompts.

A policy improves in the maze only by moving toward the tile it wants, so the representation at
the answer position must carry "which tile lies in which direction" and the move logits must
read it. For N first-turn prompts of the paper's maze (MazeConfig defaults), the residual at the
last prompt token is taken after every layer (HF forward, output_hidden_states) and a multinomial
logistic regression (L2, full-batch L-BFGS) is fit on 75% of them for each of:
  tile_N, tile_E, tile_S, tile_W   the tile code in that direction (Path / Mold / Gold)
Held-out accuracy per layer is reported beside the majority-class rate of the same split, and
beside the model's own move: how often its most likely move (over the four move tokens, valid
moves only) leads onto Mold and onto Gold, against those tiles' shares of the valid directions
(a model that ignores the tiles moves onto each at about its share).

Rows are appended to bench/results/tile_readout.csv (one per target and layer).

    python bench/probe_tile_readout.py --model smollm2-135m-instruct --prompts 400
    python bench/probe_tile_readout.py --model runs/train/policy --note "after training"
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import RESULTS_DIR, append_rows, git_commit, machine_name, utc_now  # bench/ is sys.path[0]
from welfare_server.maze import GOLD, MOLD, MazeBatch, MazeConfig
from welfare_server.model.loading import load_model
from welfare_server.train.policy import check_model_tokens

FIELDS = ["date", "machine", "commit", "model", "prompts", "target", "layer", "heldout_accuracy",
          "majority_rate", "model_move_mold_rate", "mold_share_of_valid", "model_move_gold_rate",
          "gold_share_of_valid", "note"]


def first_turn_prompts(table, config: MazeConfig, n: int, seed: int):
    """Token ids of n first-turn conversations (chat prefix + the user turn, as a rollout's first
    prefill), their neighbours int [n, 4] and valid moves bool [n, 4]."""
    maze = MazeBatch(config, n, seed=seed)
    obs = maze.observe()
    neighbours, valid = obs.neighbours.cpu().clone(), obs.valid.cpu().clone()
    ids, lengths = maze.render_tokens(table)
    ids, lengths = ids.cpu(), lengths.cpu()
    prefix = list(table.conversation_prefix_ids)
    prompts = [prefix + ids[i, :int(lengths[i])].tolist() for i in range(n)]
    return prompts, neighbours, valid


@torch.inference_mode()
def answer_position_states(model, prompts: list[list[int]], move_ids: list[int], batch: int, pad_id: int):
    """Residual [layers + 1, n, D] at each prompt's last token (after the embedding and after each
    layer) and the four move tokens' logits [n, 4] there."""
    states, logits = [], []
    for start in range(0, len(prompts), batch):
        part = prompts[start:start + batch]
        width = max(len(p) for p in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for i, p in enumerate(part):
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        last = torch.tensor([len(p) - 1 for p in part])
        rows = torch.arange(len(part))
        states.append(torch.stack([h[rows, last].float() for h in out.hidden_states]))
        logits.append(out.logits[rows, last][:, move_ids].float())
    return torch.cat(states, dim=1), torch.cat(logits)


def first_turn_arguments(description: str, *, prompts: int, seed: int, l2: float, out: str):
    """The options both first-turn probes take (model, prompt set, batch, L2, output CSV, note)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=prompts)
    ap.add_argument("--seed", type=int, default=seed)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--l2", type=float, default=l2)
    ap.add_argument("--out", default=str(RESULTS_DIR / out))
    ap.add_argument("--note", default="")
    return ap


def first_turn_readings(model_name: str, n: int, seed: int, batch: int):
    """Load model_name (fp32, CPU), render n first-turn prompts of the paper's maze and read the
    model at their answer position: (prompts, neighbours [n, 4], valid [n, 4], residual
    [layers + 1, n, D], move logits [n, 4]); prints how long it took."""
    started = time.perf_counter()
    lm = load_model(model_name, dtype="float32", device="cpu")
    config = MazeConfig()
    table = check_model_tokens(lm.tokenizer, config)
    prompts, neighbours, valid = first_turn_prompts(table, config, n, seed)
    states, move_logits = answer_position_states(lm.model, prompts, table.action_token_ids, batch, table.pad_id)
    print(f"{len(prompts)} prompts, {states.shape[0]} residual points, {time.perf_counter() - started:.0f}s")
    return prompts, neighbours, valid, states, move_logits


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, classes: int, l2: float) -> float:
    """Held-out accuracy of an L2-regularised multinomial logistic regression on standardised x."""
    test = ~train
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z[train] @ w + b, y[train]) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((z[test] @ w + b).argmax(1) == y[test]).float().mean())


def main() -> None:
    ap = first_turn_arguments(__doc__, prompts=400, seed=7, l2=1e-3, out="tile_readout.csv")
    args = ap.parse_args()

    started = time.perf_counter()
    prompts, neighbours, valid, states, move_logits = first_turn_readings(args.model, args.prompts, args.seed,
                                                                          args.batch)

    chosen = move_logits.masked_fill(~valid, float("-inf")).argmax(1)
    rates = {}
    for tile, name in ((MOLD, "mold"), (GOLD, "gold")):
        onto = (neighbours == tile) & valid
        rates[f"model_move_{name}_rate"] = round(float(onto[torch.arange(len(prompts)), chosen].float().mean()), 4)
        rates[f"{name}_share_of_valid"] = round(float(onto.sum() / valid.sum()), 4)
    split = torch.Generator().manual_seed(args.seed)
    train = torch.rand(len(prompts), generator=split) < 0.75
    rows = []
    common = dict(date=utc_now(), machine=machine_name("cpu"), commit=git_commit(), model=args.model,
                  prompts=len(prompts), note=args.note, **rates)
    for d, letter in enumerate("NESW"):
        y = neighbours[:, d].long()
        majority = float((y[~train] == torch.mode(y[train]).values).float().mean())
        for layer in range(states.shape[0]):
            acc = probe_accuracy(states[layer], y, train, 3, args.l2)
            rows.append(dict(common, target=f"tile_{letter}", layer=layer, heldout_accuracy=round(acc, 4),
                             majority_rate=round(majority, 4)))
        best = max(rows[-states.shape[0]:], key=lambda r: r["heldout_accuracy"])
        print(f"tile_{letter}: best held-out accuracy {best['heldout_accuracy']:.3f} at layer {best['layer']}, "
              f"last layer {rows[-1]['heldout_accuracy']:.3f} (majority {majority:.3f})")
    print(f"the model's most likely move leads onto Mold in {rates['model_move_mold_rate']:.3f} of prompts "
          f"(Mold is {rates['mold_share_of_valid']:.3f} of the valid directions), onto Gold in "
          f"{rates['model_move_gold_rate']:.3f} (Gold {rates['gold_share_of_valid']:.3f})")
    append_rows(args.out, FIELDS, rows)
    print(f"appended {len(rows)} rows to {args.out} ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
