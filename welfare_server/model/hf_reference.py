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

from welfare_server.kernels import MAX_TERMS, steer
from welfare_server.model.steering import (POINTS, Scope, SteeringSpec, VectorBank,
                                           prompt_steer_mask, resolve_spec, token_term_tables,
                                           validate_spec)


def _decoder_layers(model):
    return model.model.layers


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
    device = next(model.parameters()).device
    # The engine's own layout (steering.resolve_spec) in a scratch bank holding every row's vectors.
    for s in specs:
        if s is not None and not all(isinstance(t.vector, torch.Tensor) for t in s.terms):
            raise ValueError("the hook reference takes tensor vectors only")
    n_vec = sum(len(s.terms) for s in specs if s is not None)
    bank = VectorBank(max(1, n_vec), model.config.hidden_size, device)
    resolved = []
    for s in specs:
        validate_spec(s, L, MAX_TERMS, bank)
        resolved.append(resolve_spec(s, L, MAX_TERMS, bank))
    row_tv, row_tc, row_tm = (torch.stack([getattr(r, f) for r in resolved]).to(device)  # [B, L, 2, NT]
                              for f in ("vector", "coef", "mode"))
    width = torch.stack([r.width for r in resolved]).amax(0)  # [L, 2]
    pmask = torch.stack([m.bool() for m in prompt_masks]).to(device)
    handles = []

    def tables(layer: int, point: int, token_mask: torch.Tensor):
        """token_mask bool [B, T] -> flat [B*T, w] tables (None when nothing to do)."""
        w = int(width[layer, point])
        if w == 0:
            return None
        return token_term_tables(row_tv[:, layer, point, :w], row_tc[:, layer, point, :w],
                                 row_tm[:, layer, point, :w], token_mask)

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
        out, _ = steer(hidden.reshape(Bh * T, D).contiguous(), bank.tensor, *tab)
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
