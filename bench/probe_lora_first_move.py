"""How fast LoRA adapters on a model's upper layers learn the maze's first move from exact rewards:
the best case of what a short RL run can teach (no sampling noise, every move's reward known).

For N first-turn prompts of the paper's maze, the residual entering block k is computed once for
every token (the layers below k are frozen, so it never changes); each run then injects LoRA
adapters (train.weights.LoraWeights, the trainer's own) into blocks k.. and trains them for a number
of updates, each on a batch of prompts, to maximise the first move's exact expected reward
(probe_policy_ceiling.move_rewards) plus an optional equalised entropy bonus (the trainer's
losses.equalised_entropy). Every few updates the held-out rates of moving onto Mold and onto Gold
and the move entropy are recorded.

The upper blocks run alone on the cached residual: the model's forward is given it as
inputs_embeds with its layer list cut to blocks k.. (positions and the causal mask are the model's
own). A model whose forward rescales inputs_embeds would not reproduce its logits that way, so the
first evaluation is checked against the full forward's and a mismatch stops the probe.

Rows go to bench/results/lora_first_move.csv (one per run and evaluation).

    python bench/probe_lora_first_move.py --runs 26:1e-3:0,26:1e-3:0.5,16:3e-4:0.5
"""

from __future__ import annotations

import time

import torch

from _common import append_rows, git_commit, machine_name, utc_now  # bench/ is sys.path[0]
from probe_policy_ceiling import move_rewards, onto_rates, valid_shares
from probe_tile_readout import first_turn_arguments, first_turn_prompts
from welfare_server.maze import MazeConfig
from welfare_server.model.loading import load_model
from welfare_server.train.losses import entropy, equalised_entropy
from welfare_server.train.policy import check_model_tokens, pad_batch
from welfare_server.train.weights import LoraWeights

FIELDS = ["date", "machine", "commit", "model", "prompts", "train_prompts", "first_layer", "lr", "entropy_coef",
          "rank", "batch", "update", "heldout_mold_rate", "heldout_gold_rate", "heldout_entropy",
          "mold_share_of_valid", "gold_share_of_valid", "note"]

LOGIT_CHECK_TOLERANCE = 1e-3
"""Largest |move logit| difference accepted between the cut forward on the cached residual and the
model's full forward (fp32; measured ~1e-5 on the bundled model)."""


def parse_runs(text: str) -> list[tuple[int, float, float]]:
    runs = []
    for part in text.split(","):
        try:
            layer, lr, coef = part.split(":")
            runs.append((int(layer), float(lr), float(coef)))
        except ValueError:
            raise SystemExit(f"--runs: {part!r} is not first_layer:lr:entropy_coef") from None
    return runs


@torch.no_grad()
def cached_residuals(model, prompts, pad_id: int, layers: set[int], batch: int, move_ids: list[int]):
    """One full forward over the prompts: per batch of prompts ({layer: residual entering that
    block [b, L, D]}, mask [b, L]), and the move logits [n, 4] at every answer position."""
    blocks, logits = [], []
    for start in range(0, len(prompts), batch):
        ids, mask = pad_batch(prompts[start:start + batch], pad_id, "cpu")
        out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        blocks.append(({k: out.hidden_states[k] for k in layers}, mask))
        last = out.last_hidden_state[torch.arange(len(ids)), mask.sum(dim=1) - 1]
        logits.append(model.lm_head(last)[:, move_ids])
    return blocks, torch.cat(logits)


def upper_move_logits(model, blocks, batch: int, index: list[int], layer: int, move_ids: list[int]):
    """Move logits [n, 4] at the answer position of prompts `index`, from the cached residual
    entering block `layer` through the cut model."""
    hidden, masks = [], []
    for i in index:
        cached, mask = blocks[i // batch]
        hidden.append(cached[layer][i % batch])
        masks.append(mask[i % batch])
    h, mask = torch.stack(hidden), torch.stack(masks)
    out = model.model(inputs_embeds=h, attention_mask=mask).last_hidden_state
    last = out[torch.arange(len(index)), mask.sum(dim=1) - 1]
    return model.lm_head(last)[:, move_ids]


def main() -> None:
    ap = first_turn_arguments(__doc__, prompts=1280, seed=1234, l2=0.0, out="lora_first_move.csv")
    ap.add_argument("--train-share", type=float, default=0.8)
    ap.add_argument("--runs", default="26:1e-3:0,26:1e-3:0.5,16:3e-4:0.5",
                    help="comma list of first_layer:lr:equalised_entropy_coef, one LoRA run each")
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=10)
    args = ap.parse_args()
    runs = parse_runs(args.runs)

    started = time.perf_counter()
    lm = load_model(args.model, dtype="float32", device="cpu")
    config = MazeConfig()
    table = check_model_tokens(lm.tokenizer, config)
    move_ids = list(table.action_token_ids)
    n_layers = lm.config.num_hidden_layers
    if not all(0 < k < n_layers for k, _, _ in runs):
        raise SystemExit(f"--runs: first layers must be in 1..{n_layers - 1}")
    prompts, neighbours, valid = first_turn_prompts(table, config, args.prompts, args.seed)
    n_train = int(args.train_share * len(prompts))
    held = list(range(n_train, len(prompts)))
    reward = move_rewards(neighbours, valid, config)
    blocks, full_logits = cached_residuals(lm.model, prompts, table.pad_id, {k for k, _, _ in runs}, args.batch,
                                           move_ids)
    print(f"{len(prompts)} prompts, residual cached at blocks {sorted({k for k, _, _ in runs})}, "
          f"{time.perf_counter() - started:.0f}s")
    shares = valid_shares(neighbours, valid)
    common = dict(date=utc_now(), machine=machine_name("cpu"), commit=git_commit(), model=args.model,
                  prompts=len(prompts), train_prompts=n_train, rank=args.rank, batch=args.train_batch,
                  note=args.note, **shares)
    rows = []
    for layer, lr, coef in runs:
        model = load_model(args.model, dtype="float32", device="cpu").model  # fresh weights per run
        weights = LoraWeights(model, rank=args.rank, alpha=2.0 * args.rank, dropout=0.0,
                              target_modules="all-linear", layers=list(range(layer, n_layers)), seed=args.seed)
        model.model.layers = torch.nn.ModuleList(list(model.model.layers)[layer:])
        opt = torch.optim.AdamW(weights.parameters(), lr=lr, weight_decay=0.0)

        def evaluate(update: int) -> None:
            with torch.no_grad():
                logits = upper_move_logits(model, blocks, args.batch, held, layer, move_ids)
            if update == 0:
                worst = float((logits - full_logits[held]).abs().max())
                if not worst <= LOGIT_CHECK_TOLERANCE:
                    raise SystemExit(f"the cut forward from block {layer} differs from the full forward by {worst:.3g} "
                                     f"in a move logit: this model's forward does not take its residual as inputs_embeds")
            mold, gold = onto_rates(logits, valid[held], neighbours[held])
            ent = float(entropy(torch.log_softmax(logits.masked_fill(~valid[held], float("-inf")), -1)).mean())
            rows.append(dict(common, first_layer=layer, lr=lr, entropy_coef=coef, update=update,
                             heldout_mold_rate=round(mold, 4), heldout_gold_rate=round(gold, 4),
                             heldout_entropy=round(ent, 4)))
            print(f"blocks {layer}.., lr {lr:g}, entropy {coef:g}, update {update:3d}: held-out onto Mold {mold:.3f}, "
                  f"onto Gold {gold:.3f}, entropy {ent:.3f} ({time.perf_counter() - started:.0f}s)", flush=True)

        evaluate(0)
        for update in range(1, args.updates + 1):
            index = [((update - 1) * args.train_batch + j) % n_train for j in range(args.train_batch)]
            logp = torch.log_softmax(upper_move_logits(model, blocks, args.batch, index, layer, move_ids)
                                     .masked_fill(~valid[index], float("-inf")), dim=-1)
            loss = -(logp.exp() * reward[index]).sum(dim=-1).mean()
            if coef:
                loss = loss - coef * equalised_entropy(logp, valid[index], neighbours[index]).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights.parameters(), 1.0)
            opt.step()
            if update % args.eval_every == 0 or update == args.updates:
                evaluate(update)
    append_rows(args.out, FIELDS, rows)
    print(f"appended {len(rows)} rows to {args.out} ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
