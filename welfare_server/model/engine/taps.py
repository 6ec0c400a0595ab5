"""Taps: what one forward pass does to, or reads from, the residual stream at each (layer, point).

Points (model.steering.POINTS): BLOCK_INPUT, the residual entering decoder block l (what a forward
pre-hook on block l sees), and BLOCK_OUTPUT, the block's output. At each point a forward first
applies the steering terms of its rows (per-row term tables read by the steer kernels), then calls
the point's observers with the steered residual [T, D]: monitors (projections onto vectors) and
captures (class sums for vector extraction) are observers, so a client adds a reading without
touching the loop. The loop builds one Taps per forward; the adapter's forward consults it.
"""

from __future__ import annotations

from typing import Callable

import torch

from welfare_server.kernels import steer

Observer = Callable[[torch.Tensor], None]
"""Called with the (steered) residual [T, D] at a point, in the forward's row order."""


class Taps:
    """Steer tables and observers per (layer, point) for one forward pass."""

    __slots__ = ("bank", "steer_tables", "observers")

    def __init__(self, bank: torch.Tensor | None = None):
        self.bank = bank
        """The vector bank [K, D] the steer tables index."""
        self.steer_tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        """(layer, point) -> (term_vector, term_coef, term_mode) [T, NT] for the forward's rows."""
        self.observers: dict[tuple[int, int], list[Observer]] = {}

    def add_observer(self, layer: int, point: int, fn: Observer) -> None:
        self.observers.setdefault((layer, point), []).append(fn)

    def terms(self, layer: int, point: int):
        return self.steer_tables.get((layer, point))

    def touches(self, layer: int, point: int) -> bool:
        """Something steers or reads the residual here (so it must exist as a tensor here)."""
        return (layer, point) in self.steer_tables or (layer, point) in self.observers

    def observe(self, layer: int, point: int, h: torch.Tensor) -> None:
        for fn in self.observers.get((layer, point), ()):
            fn(h)

    def apply(self, layer: int, point: int, h: torch.Tensor) -> torch.Tensor:
        """Steer h at (layer, point) (tables validated when written: no value checks here), then
        let the observers read it. Returns h."""
        t = self.steer_tables.get((layer, point))
        if t is not None:
            h, _ = steer(h, self.bank, *t, check_values=False)
        self.observe(layer, point, h)
        return h


def projection_observer(vectors: torch.Tensor, into: dict, key) -> Observer:
    """An observer storing fp32 projections h @ vectors.T [T, M] under into[key]."""
    def observe(h: torch.Tensor) -> None:
        into[key] = h.float() @ vectors.t()
    return observe
