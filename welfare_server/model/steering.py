"""Steering specifications, the device-side vector bank, and per-row term tables.

A request carries a SteeringSpec: an ordered list of SteeringTerms (vector, layers, coefficient,
mode, point) and a token Scope. The engine turns it into rows of fixed device tables

    term_vector int32 [L, 2, S, NT]   bank index per (layer, point, slot, term); -1 = none
    term_coef   fp32  [L, 2, S, NT]
    term_mode   int32 [L, 2, S, NT]

(L layers, 2 points, S batch slots, NT = max_terms_per_row) that the fused kernels read. The
tables and the bank never change shape or address, so a CUDA graph captured once keeps working
whatever mix of vectors the batch holds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from welfare_server.kernels import SteerMode
from welfare_server.model.fields import (InvalidRequest, check_int_list, check_number, check_sequence,
                                         check_str, check_tensor, is_int)

BLOCK_INPUT = 0
BLOCK_OUTPUT = 1
POINTS = {"block_input": BLOCK_INPUT, "block_output": BLOCK_OUTPUT}
"""Steering points: the residual entering decoder block l (what a forward pre-hook on block l
sees; the paper's hook point) and the block's output (what a forward hook on block l returns)."""


class Scope(str, enum.Enum):
    """Which tokens a request's steering touches. Generated tokens are steered in every scope."""

    GENERATED = "generated"
    """Only tokens the model generates; the whole prompt is left untouched."""
    ASSISTANT_AND_GENERATED = "assistant_and_generated"
    """Assistant-turn prompt tokens (incl. the generation-prompt header) and generated tokens;
    user/system turns are never steered. The paper's protocol."""
    ALL = "all"
    """Every prompt token and every generated token."""


class SteeringError(InvalidRequest):
    """A steering specification or a monitor is invalid or exceeds a configured limit; the message
    names the field and the limit."""


Vector = Union[torch.Tensor, int]


@dataclass(frozen=True)
class SteeringTerm:
    """One steering operation: at each of `layers`, at `point`, apply `mode` with `vector`."""

    vector: Vector
    """A floating-point tensor of shape [D] (the hidden size) with finite values, placed in the
    bank for the request's lifetime; or the int id of a live bank vector (VectorBank.add /
    Engine.register_vector)."""
    layers: Sequence[int]
    """A non-empty list (or tuple) of int decoder layer indices in [-L, L); negative ones count
    from the end; a layer named twice is one term there. Not a bare int, no bools or floats."""
    coefficient: float = 1.0
    """A finite number (int or float, not bool): alpha for ADD / ADD_RENORM, the target component
    for CLAMP. ABLATE ignores it, but it must still be finite (one rule for every mode)."""
    mode: SteerMode = SteerMode.ADD
    """A SteerMode (ADD, ADD_RENORM, ABLATE, CLAMP: see welfare_server.kernels.modes) or its int
    value; floats and bools are refused."""
    point: str = "block_input"
    """"block_input" (residual entering the block) or "block_output" (the block's output)."""


@dataclass
class SteeringSpec:
    """All steering of one request. Terms apply in list order at each (layer, point)."""

    terms: list[SteeringTerm] = field(default_factory=list)
    """A list (or tuple) of SteeringTerm; at most max_terms_per_row of them at any one (layer,
    point), and at most max_bank_vectors new tensors."""
    scope: Scope = Scope.ASSISTANT_AND_GENERATED
    """A Scope or its string value ("generated", "assistant_and_generated", "all")."""


@dataclass
class MonitorSpec:
    """Per-token projections of the residual at `layers`/`point` onto `vectors`."""

    vectors: torch.Tensor
    """A floating-point tensor [M, D] with finite values, 1 <= M <= max_monitor_vectors."""
    layers: Sequence[int]
    """A non-empty list of int layer indices in [-L, L) (as SteeringTerm.layers)."""
    point: str = "block_input"
    """Post-steering residual entering the block ("block_input"), or the block's (steered)
    output ("block_output")."""


class VectorBank:
    """Fixed-capacity [K_max, D] vector store on the device with free-slot management.

    Slots are reference counted: a persistent vector (add) holds one reference until removed;
    each running request that uses it holds another, so removing a vector in use keeps it alive
    until the last request finishes. The tensor never reallocates (CUDA graphs read its address).
    """

    def __init__(self, capacity: int, dim: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 limit_name: str = "max_bank_vectors"):
        if not is_int(capacity) or capacity < 0:
            raise SteeringError(f"{limit_name}: {capacity!r} must be an int >= 0")
        self.limit_name = limit_name
        """The config field that sets the capacity, named in errors."""
        self.capacity = capacity
        self.dim = dim
        self.tensor = torch.zeros(capacity, dim, device=device, dtype=dtype)
        self._refs = [0] * capacity
        self._free = list(range(capacity - 1, -1, -1))  # pop() gives the lowest slot first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def check_vector(self, vector: torch.Tensor, what: str = "vector") -> torch.Tensor:
        return check_tensor(vector, what, SteeringError, shape=(self.dim,), what=f"[{self.dim}] (the hidden size)")

    def add(self, vector: torch.Tensor) -> int:
        """Store a vector (checked); returns its id. Raises SteeringError when the bank is full."""
        self.check_vector(vector)
        return self.place(vector)

    def place(self, vector: torch.Tensor) -> int:
        """Store a vector already checked (validate_spec / validate_monitor did it at the request's
        boundary: no second pass over its values, which is a host sync on CUDA)."""
        if not self._free:
            raise SteeringError(f"{self.limit_name}: all {self.capacity} bank slots are in use")
        idx = self._free.pop()
        self.tensor[idx].copy_(vector.detach().to(self.tensor.dtype))
        self._refs[idx] = 1
        return idx

    def acquire(self, idx: int) -> None:
        self._check_id(idx)
        self._refs[idx] += 1

    def release(self, idx: int) -> None:
        """Drop one reference; the slot is freed (and zeroed) when none is left."""
        self._check_id(idx)
        self._refs[idx] -= 1
        if self._refs[idx] == 0:
            self.tensor[idx].zero_()
            self._free.append(idx)
            self._free.sort(reverse=True)

    remove = release

    def is_live(self, idx: int) -> bool:
        return 0 <= idx < self.capacity and self._refs[idx] > 0

    def _check_id(self, idx: int) -> None:
        if not self.is_live(idx):
            raise SteeringError(f"vector id {idx}: not a live bank vector (bank capacity {self.capacity})")


@dataclass
class ResolvedSteering:
    """A request's terms as bank ids, laid out per (layer, point): the row it owns in the tables."""

    vector: torch.Tensor  # int32 [L, 2, NT]
    coef: torch.Tensor  # fp32 [L, 2, NT]
    mode: torch.Tensor  # int32 [L, 2, NT]
    width: torch.Tensor  # int [L, 2]: number of terms at (layer, point)
    scope: Scope
    owned_ids: list[int]  # bank references to release when the request leaves


def validate_spec(spec: SteeringSpec | None, num_layers: int, max_terms: int,
                  bank: VectorBank, field: str = "steering") -> int:
    """Check every field of a spec strictly (types exact, values in range, vectors finite, the
    per-(layer, point) and bank limits) without touching the bank or the spec; returns how many
    new bank slots it needs. Raises SteeringError naming the field."""
    if spec is None:
        return 0
    if not isinstance(spec, SteeringSpec):
        raise SteeringError(f"{field}: a {type(spec).__name__}, expected a SteeringSpec(terms, scope)")
    if not isinstance(spec.scope, Scope) and (not isinstance(spec.scope, str)
                                              or spec.scope not in [s.value for s in Scope]):
        raise SteeringError(f"{field}.scope: {spec.scope!r} is not one of {[s.value for s in Scope]}")
    terms = check_sequence(spec.terms, f"{field}.terms", SteeringError, what="SteeringTerms")
    counts: dict[tuple[int, int], int] = {}
    new_vectors = 0
    for i, term in enumerate(terms):
        where = f"{field}.terms[{i}]"
        if not isinstance(term, SteeringTerm):
            raise SteeringError(f"{where}: a {type(term).__name__}, expected a SteeringTerm")
        if isinstance(term.vector, torch.Tensor):
            bank.check_vector(term.vector, f"{where}.vector")
            new_vectors += 1
        elif is_int(term.vector):
            if not bank.is_live(int(term.vector)):
                raise SteeringError(f"{where}.vector: id {term.vector} is not a live bank vector")
        else:
            raise SteeringError(f"{where}.vector: a {type(term.vector).__name__}, expected a [D] tensor "
                                "or a bank id (int)")
        mode_value = term.mode
        if not is_int(mode_value) or not 0 <= int(mode_value) < len(SteerMode):
            raise SteeringError(f"{where}.mode: {mode_value!r} is not a SteerMode "
                                f"({', '.join(f'{m.name}={int(m)}' for m in SteerMode)})")
        check_str(term.point, f"{where}.point", SteeringError, choices=list(POINTS))
        check_number(term.coefficient, f"{where}.coefficient", SteeringError,
                     rule="a finite number, in every mode")
        layers = check_int_list(term.layers, f"{where}.layers", SteeringError, lo=-num_layers,
                                hi=num_layers - 1, what="layer indices", nonempty=True,
                                rule=f"layer indices are in [-{num_layers}, {num_layers})")
        # A layer named twice in one term (3 and -L+3 too) is one term there, as resolve_spec lays it out.
        for layer in dict.fromkeys(l % num_layers for l in layers):
            key = (layer, POINTS[term.point])
            counts[key] = counts.get(key, 0) + 1
            if counts[key] > max_terms:
                raise SteeringError(
                    f"{where}: more than max_terms_per_row={max_terms} terms at layer "
                    f"{key[0]} point {term.point}")
    if new_vectors > bank.capacity:
        raise SteeringError(f"{field}.terms: {new_vectors} new vectors, more than "
                            f"{bank.limit_name}={bank.capacity}")
    return new_vectors


def validate_monitor(monitor: MonitorSpec | None, num_layers: int, bank: VectorBank,
                     field: str = "monitor") -> int:
    """Check a monitor strictly (as validate_spec); returns how many monitor-bank slots it needs."""
    if monitor is None:
        return 0
    if not isinstance(monitor, MonitorSpec):
        raise SteeringError(f"{field}: a {type(monitor).__name__}, expected a MonitorSpec(vectors, layers, point)")
    vectors = check_tensor(monitor.vectors, f"{field}.vectors", SteeringError, shape=(None, bank.dim),
                           what=f"[M, {bank.dim}] (M vectors of the hidden size)")
    if vectors.shape[0] < 1:
        raise SteeringError(f"{field}.vectors: no vectors (M = 0)")
    if vectors.shape[0] > bank.capacity:
        raise SteeringError(f"{field}.vectors: {vectors.shape[0]} vectors, more than "
                            f"{bank.limit_name}={bank.capacity}")
    check_int_list(monitor.layers, f"{field}.layers", SteeringError, lo=-num_layers, hi=num_layers - 1,
                   what="layer indices", nonempty=True,
                   rule=f"layer indices are in [-{num_layers}, {num_layers})")
    check_str(monitor.point, f"{field}.point", SteeringError, choices=list(POINTS))
    return vectors.shape[0]


def resolve_spec(spec: SteeringSpec | None, num_layers: int, max_terms: int,
                 bank: VectorBank) -> ResolvedSteering:
    """Place the spec's tensors in the bank (call validate_spec first and make sure the bank has
    room) and lay its terms out per (layer, point)."""
    vec = torch.full((num_layers, 2, max_terms), -1, dtype=torch.int32)
    coef = torch.zeros((num_layers, 2, max_terms), dtype=torch.float32)
    mode = torch.zeros((num_layers, 2, max_terms), dtype=torch.int32)
    width = torch.zeros((num_layers, 2), dtype=torch.int64)
    owned: list[int] = []
    scope = Scope.ASSISTANT_AND_GENERATED if spec is None else Scope(spec.scope)
    for term in (spec.terms if spec is not None else []):
        if isinstance(term.vector, torch.Tensor):
            idx = bank.place(term.vector)
        else:
            idx = int(term.vector)
            bank.acquire(idx)
        owned.append(idx)
        p = POINTS[term.point]
        for layer in dict.fromkeys(l % num_layers for l in term.layers):
            j = int(width[layer, p])
            vec[layer, p, j] = idx
            coef[layer, p, j] = float(term.coefficient)
            mode[layer, p, j] = int(term.mode)
            width[layer, p] = j + 1
    return ResolvedSteering(vector=vec, coef=coef, mode=mode, width=width,
                            scope=scope, owned_ids=owned)


def token_term_tables(vector: torch.Tensor, coef: torch.Tensor, mode: torch.Tensor,
                      token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token tables of a padded batch from per-row ones: vector/coef/mode [N, w] (row r's
    terms at one (layer, point)), token_mask bool [N, T] (the tokens row r steers) -> contiguous
    [N*T, w] tables, row-major over (row, token), with no term (-1) outside the mask."""
    N, T = token_mask.shape
    w = vector.shape[1]

    def per_token(t):
        return t[:, None, :].expand(N, T, w).reshape(N * T, w)

    none = torch.full((), -1, dtype=vector.dtype, device=vector.device)
    tv = torch.where(token_mask.reshape(N * T, 1), per_token(vector), none)
    return tv.contiguous(), per_token(coef).contiguous(), per_token(mode).contiguous()


GENERATED_ROLE = "generated"
"""Role of a token the model generated that is fed back as input: a session's last answer token
when its next turn continues it. Generated tokens are steered in every scope."""


def prompt_steer_mask(scope: Scope, roles: Sequence[str] | None, n: int) -> torch.Tensor:
    """bool [n]: which prompt tokens a request's steering touches under `scope`.

    roles[i] is the chat role of prompt token i ("user", "system", "assistant") or GENERATED_ROLE;
    a prompt given as raw ids has no roles, and under ASSISTANT_AND_GENERATED it counts as user text.
    """
    if scope == Scope.ALL:
        return torch.ones(n, dtype=torch.bool)
    if roles is None:
        return torch.zeros(n, dtype=torch.bool)
    steered = (GENERATED_ROLE,) if scope == Scope.GENERATED else (GENERATED_ROLE, "assistant")
    return torch.tensor([r in steered for r in roles], dtype=torch.bool)
