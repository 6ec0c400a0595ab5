"""Reference steering with Hugging Face generate and forward hooks (how repeng and
steering-vectors steer). It is the oracle of the engine's correctness tests and the
"HF + hooks" provider of bench/bench_generate.py; it is never on the engine's hot path.

Each row of the batch may carry its own terms: a forward pre-hook on block l applies the
"block_input" terms to the residual entering the block, a forward hook the "block_output" terms
to its output, through the same public kernel API the engine uses (on CPU: the torch reference).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from welfare_server.kernels import steer
from welfare_server.model.steering import POINTS, Scope, SteeringSpec, prompt_steer_mask


def _decoder_layers(model):
    return model.model.layers


def _row_tables(spec: SteeringSpec | None, num_layers: int, bank_rows: list[torch.Tensor]):
    """Per (layer, point): list of (bank index, coef, mode) for one row; vectors appended to bank_rows."""
    out: dict[tuple[int, int], list[tuple[int, float, int]]] = {}
    if spec is None:
        return out
    for term in spec.terms:
        if not isinstance(term.vector, torch.Tensor):
            raise ValueError("the hook reference takes tensor vectors only")
        bank_rows.append(term.vector.detach().float().cpu())
        idx = len(bank_rows) - 1
        for layer in dict.fromkeys(l % num_layers for l in term.layers):
            out.setdefault((layer, POINTS[term.point]), []).append((idx, float(term.coefficient), int(term.mode)))
    return out


@contextmanager
def hook_steering(model, specs: Sequence[SteeringSpec | None], prompt_masks: Sequence[torch.Tensor],
                  prompt_len: int):
    """Register steering hooks on `model` for a left-padded batch (row b = specs[b]).

    prompt_masks[b]: bool [prompt_len], aligned with the left-padded prompt (pad positions False):
    which prompt tokens row b steers. The first call of each hook (the prefill, sequence length
    prompt_len) uses them; every later call (one decode token) steers all rows with terms.
    """
    layers = _decoder_layers(model)
    L = len(layers)
    bank_rows: list[torch.Tensor] = []
    rows = [_row_tables(s, L, bank_rows) for s in specs]
    device = next(model.parameters()).device
    bank = torch.stack(bank_rows).to(device) if bank_rows else torch.zeros(1, 1, device=device)
    B = len(specs)
    pmask = torch.stack([m.bool() for m in prompt_masks]).to(device) if B else None
    handles = []

    def tables(layer: int, point: int, token_mask: torch.Tensor):
        """token_mask bool [B, T] -> flat [B*T, NT] tables (None when nothing to do)."""
        per_row = [r.get((layer, point), []) for r in rows]
        nt = max((len(t) for t in per_row), default=0)
        if nt == 0:
            return None
        T = token_mask.shape[1]
        tv = torch.full((B, nt), -1, dtype=torch.int32)
        tc = torch.zeros((B, nt), dtype=torch.float32)
        tm = torch.zeros((B, nt), dtype=torch.int32)
        for b, terms in enumerate(per_row):
            for j, (idx, c, m) in enumerate(terms):
                tv[b, j], tc[b, j], tm[b, j] = idx, c, m
        tv, tc, tm = (t.to(device)[:, None, :].expand(B, T, nt) for t in (tv, tc, tm))
        tv = torch.where(token_mask[:, :, None], tv, torch.full_like(tv, -1))
        return tv.reshape(B * T, nt), tc.reshape(B * T, nt), tm.reshape(B * T, nt)

    def apply(layer: int, point: int, hidden: torch.Tensor) -> torch.Tensor:
        Bh, T, D = hidden.shape
        if T == prompt_len and not seen[(layer, point)]:
            mask = pmask
        else:
            mask = torch.ones(Bh, T, dtype=torch.bool, device=hidden.device)
        seen[(layer, point)] = True
        tab = tables(layer, point, mask)
        if tab is None:
            return hidden
        out, _ = steer(hidden.reshape(Bh * T, D).contiguous(), bank, *tab)
        return out.reshape(Bh, T, D)

    seen = {(l, p): False for l in range(L) for p in (0, 1)}
    for l, block in enumerate(layers):
        def pre_hook(module, args, kwargs, l=l):
            hidden = args[0] if args else kwargs["hidden_states"]
            new = apply(l, POINTS["block_input"], hidden)
            if args:
                return (new,) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs, hidden_states=new)
            return args, kwargs

        def post_hook(module, args, output, l=l):
            hidden = output[0] if isinstance(output, tuple) else output
            new = apply(l, POINTS["block_output"], hidden)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hf_generate_steered(model, prompts: Sequence[Sequence[int]], specs: Sequence[SteeringSpec | None],
                        max_new_tokens: int, *, roles: Sequence[Sequence[str] | None] | None = None,
                        pad_token_id: int = 0, eos_token_id=None) -> list[list[int]]:
    """Greedy HF generate of a left-padded batch, each row steered by its own spec.

    Returns the generated ids per row (exactly max_new_tokens each unless eos_token_id is given,
    in which case each row is cut after its first eos)."""
    B = len(prompts)
    T = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    masks = []
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(list(p))
        attn[b, T - len(p):] = 1
        spec = specs[b]
        scope = spec.scope if spec is not None else Scope.GENERATED
        m = torch.zeros(T, dtype=torch.bool)
        m[T - len(p):] = prompt_steer_mask(Scope(scope), roles[b] if roles else None, len(p))
        masks.append(m)
    # eos_token_id None: run exactly max_new_tokens without suppressing eos (min_new_tokens
    # would mask eos logits and change the argmax), by clearing the model's default eos.
    gen_cfg = model.generation_config
    saved_eos = gen_cfg.eos_token_id
    gen_cfg.eos_token_id = eos_token_id
    try:
        with torch.inference_mode(), hook_steering(model, specs, masks, T):
            out = model.generate(ids.to(device), attention_mask=attn.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_token_id, top_p=None, top_k=None, temperature=None)
    finally:
        gen_cfg.eos_token_id = saved_eos
    res = []
    for b in range(B):
        gen = out[b, T:].tolist()
        if eos_token_id is not None and eos_token_id in gen:
            gen = gen[:gen.index(eos_token_id) + 1]
        res.append(gen)
    return res
