"""MazeBatch: the Python face of the batched C++/CUDA maze simulator.

State lives in torch tensors that this class allocates on the chosen device (CPU or CUDA); the C++
core (welfare_server._maze_core) reads and writes them through their data pointers, so on a GPU
nothing is copied to the host, and the tensors are shared with PyTorch as they are. Every batch call
into the core releases the GIL. Shapes, dtypes and devices of caller-provided buffers are checked
here, before any pointer crosses into C++.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from welfare_server.maze import text as T
from welfare_server.maze.config import MazeConfig
from welfare_server.maze.tokens import MazeTokenTable

# Bytes of per-env state besides the grid (row, col, t, wind, episode, key, done, provenance) and
# the step outputs: used for the memory limit check.
_PER_ENV_BYTES = 4 * 4 + 8 * 4 + 1 + 4 * 4 + 1

ORACLE_CUDA_CHUNK_ENVS = 4096
"""Envs per CUDA oracle pass: bounds its scratch to 9 bytes x cells x 4096 (0.37 GB at size 100)."""


def _core():
    from welfare_server import _maze_core  # the compiled extension; imported lazily for a clear error

    return _maze_core


def _core_config(config: MazeConfig, seed: int):
    """The core's Config, validated and derived once (it is read-only): built from MazeConfig's
    fields by name, so the dataclass is the one place the rules and their defaults are stated."""
    return _core().Config(**config.core_fields(seed))


@dataclass
class StepResult:
    """What one step returns, per env (tensors on the batch's device). Views of the batch's step
    buffers: the next step() overwrites them, nothing else does (MazeBatch's output rule)."""

    reward: torch.Tensor
    """float32 [B]: step reward plus the entered (and pushed-into) tiles' rewards."""
    tile_entered: torch.Tensor
    """int32 [B]: tile code the move entered."""
    tile_pushed: torch.Tensor
    """int32 [B]: tile code the wind push entered, -1 when no push happened."""
    wind_from: torch.Tensor
    """int32 [B]: direction the wind came from, -1 when no push happened."""
    done: torch.Tensor
    """bool [B]: the step ended the episode (with autoreset the env has already started the next)."""


@dataclass
class Observation:
    """The state an agent sees before its next move (tensors on the batch's device), as of the
    observe() call that returned it. Views of the batch's observation buffers: the next observe()
    overwrites them, nothing else does (MazeBatch's output rule)."""

    neighbours: torch.Tensor
    """int32 [B, 4]: tile code to the N, E, S, W; -1 outside the grid."""
    valid: torch.Tensor
    """bool [B, 4]: the direction stays inside the grid (the action mask)."""
    order: torch.Tensor
    """int32 [B, 4]: the listed directions in prompt order, padded with -1."""
    position: torch.Tensor
    """int32 [B, 2]: (x, y) = (column, row), as the prompt shows it."""
    step_index: torch.Tensor
    """int32 [B]: moves made so far in the episode."""
    wind_from: torch.Tensor
    """int32 [B]: the wind message the prompt starts with (-1 none)."""


class MazeBatch:
    """B independent mazes stepped together; see docs/maze_spec.md for every rule.

    Construction resets env i to episode 0, so env i's first maze is a pure function of
    (seed, i, 0). Thereafter reset() moves the selected envs to their next episode index.

    Output rule (every method): a tensor a method returns is a view of a buffer the batch keeps
    for that method (or the caller's own out= buffer). It stays valid and unchanged until the next
    call of the same method, which overwrites it in place; no other method writes it. Clone what
    you keep longer. (step() -> StepResult, observe() -> Observation, render_tokens() -> (ids,
    lengths), oracle() -> (dist, optimal).) Fixed buffers, not fresh tensors: allocating per call
    costs more than the whole core call at small B. The state tensors (grids, row, col,
    step_index, wind_from, episode, done, ...) are the live state: reset(), step() and clone()
    change them.
    """

    def __init__(self, config: MazeConfig, num_envs: int, seed: int = 0, device: str | torch.device = "cpu",
                 num_threads: int = 0):
        if not isinstance(config, MazeConfig):
            raise ValueError(f"config must be a MazeConfig, got {type(config).__name__}")
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
        state_bytes = num_envs * (config.size * config.size + _PER_ENV_BYTES)
        if state_bytes > config.max_state_bytes:
            raise ValueError(
                f"num_envs={num_envs} needs {state_bytes} bytes of state for size {config.size}, "
                f"beyond MazeConfig.max_state_bytes={config.max_state_bytes}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or not 0 <= num_threads <= 1024:
            raise ValueError(f"num_threads must be an int in [0, 1024] (0 = all cores), got {num_threads!r}")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        core = _core()
        if self.device.type == "cuda" and not core.cuda_compiled():
            raise ValueError("device='cuda' but welfare_server was built without the CUDA backend")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device on this machine")
        self.config = config
        self.num_envs = num_envs
        self.seed = seed
        self.num_threads = num_threads
        self._core = core
        self._cuda = self.device.type == "cuda"
        self._cfg = _core_config(config, seed)

        def alloc(*shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        B, S = num_envs, config.size
        self.grids = alloc(B, S, S, dtype=torch.uint8)
        """uint8 [B, S, S] tile codes (Path 0, Mold 1, Gold 2), row-major."""
        self.row = alloc(B, dtype=torch.int32)
        self.col = alloc(B, dtype=torch.int32)
        self.step_index = alloc(B, dtype=torch.int32)
        self.wind_from = alloc(B, dtype=torch.int32)
        self.episode = alloc(B, dtype=torch.int64)
        self.step_key = alloc(B, dtype=torch.int64)  # uint64 bits; torch's uint64 support is thin
        self.done = alloc(B, dtype=torch.uint8)
        self.origin_env = alloc(B, dtype=torch.int64)
        self.origin_episode = alloc(B, dtype=torch.int64)
        self._state = core.StateView(
            B, self.grids.data_ptr(), self.row.data_ptr(), self.col.data_ptr(),
            self.step_index.data_ptr(), self.wind_from.data_ptr(), self.episode.data_ptr(),
            self.step_key.data_ptr(), self.done.data_ptr(), self.origin_env.data_ptr(),
            self.origin_episode.data_ptr())
        # Step outputs (done is a bool tensor: the core writes 0/1 bytes into its storage).
        self._step_result = StepResult(
            reward=alloc(B, dtype=torch.float32), tile_entered=alloc(B, dtype=torch.int32),
            tile_pushed=alloc(B, dtype=torch.int32), wind_from=alloc(B, dtype=torch.int32),
            done=alloc(B, dtype=torch.bool))
        r = self._step_result
        self._step_out = core.StepOut(r.reward.data_ptr(), r.tile_entered.data_ptr(), r.tile_pushed.data_ptr(),
                                      r.wind_from.data_ptr(), r.done.data_ptr())
        # Observation buffers, all written by one core call.
        self._observation = Observation(
            neighbours=alloc(B, 4, dtype=torch.int32), valid=alloc(B, 4, dtype=torch.bool),
            order=alloc(B, 4, dtype=torch.int32), position=alloc(B, 2, dtype=torch.int32),
            step_index=alloc(B, dtype=torch.int32), wind_from=alloc(B, dtype=torch.int32))
        o = self._observation
        self._observe_out = core.ObserveOut(o.neighbours.data_ptr(), o.order.data_ptr(), o.valid.data_ptr(),
                                            o.position.data_ptr(), o.step_index.data_ptr(),
                                            o.wind_from.data_ptr())
        self._text_neighbours = alloc(B, 4, dtype=torch.int32)  # render_text's own, see there
        self._text_order = alloc(B, 4, dtype=torch.int32)
        self._text_out = core.ObserveOut(self._text_neighbours.data_ptr(), self._text_order.data_ptr())
        self._tokens = None  # (width, ids, lengths) buffers of render_tokens
        self._token_tables = {}  # id(table) -> (table, core TokenTable) on this device
        self._oracle_out = None  # (dist, optimal, scratch)
        self._call("reset", self._state, 0)

    # -- plumbing -------------------------------------------------------------------------------
    def _call(self, name: str, *args, batch_call: bool = True, **keywords):
        """Call the CPU or CUDA entry point of the core: the one place the backend is chosen.
        CUDA calls end with the current stream; CPU batch calls with the thread count (clone, a
        plain copy, takes none)."""
        core = self._core
        if self._cuda:
            stream = torch.cuda.current_stream(self.device).cuda_stream
            with torch.cuda.device(self.device):
                return getattr(core, "cuda_" + name)(self._cfg, *args, stream, **keywords)
        tail = (self.num_threads,) if batch_call else ()
        return getattr(core, "cpu_" + name)(self._cfg, *args, *tail, **keywords)

    def _env_tensor(self, value, name: str, dtype: torch.dtype, width: int | None = None) -> torch.Tensor:
        """Check a per-env argument's shape and convert it to a contiguous tensor on our device."""
        if isinstance(value, torch.Tensor):
            # fast path: already what the core reads (a step at B=1 is ~1 us of C++; the general
            # conversion below costs ~5)
            if (value.dtype == dtype and value.is_contiguous() and value.dim() == (1 if width is None else 2)
                    and value.shape[0] == self.num_envs and (width is None or value.shape[1] == width)
                    and (value.device == self.device if self._cuda else value.is_cpu)):
                return value
            if value.device != self.device:
                # No silent host<->device copy on the hot path: the caller keeps buffers where the batch is.
                raise ValueError(f"{name} is on {value.device}, the batch is on {self.device}")
        tensor = torch.as_tensor(value, device=self.device)
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
            raise ValueError(f"{name} must hold integers, got dtype {tensor.dtype}")
        shape = (self.num_envs,) if width is None else (self.num_envs, width)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
        return tensor.to(dtype).contiguous()

    # -- episode control ------------------------------------------------------------------------
    def reset(self, mask=None) -> None:
        """Start the next episode (episode index + 1) of every env, or of those where mask is true
        (the core advances the index: one call, no tensor op)."""
        if mask is None:
            self._call("reset", self._state, 0, advance=True)
            return
        mask_tensor = self._env_tensor(mask, "mask", torch.uint8)
        self._call("reset", self._state, mask_tensor.data_ptr(), advance=True)

    def step(self, actions) -> StepResult:
        """Move every env by its action (0=N, 1=E, 2=S, 3=W; int32 [B] is taken as it is, anything
        else integer-valued is converted). Invalid actions raise ValueError and change nothing.
        Returns the batch's StepResult buffers, overwritten by the next step() (the output rule)."""
        action_tensor = self._env_tensor(actions, "actions", torch.int32)
        if self._cuda:
            self._call("step", self._state, action_tensor.data_ptr(), self._step_out)
        else:
            self._core.cpu_step(self._cfg, self._state, action_tensor.data_ptr(), self._step_out, self.num_threads)
        return self._step_result

    def clone(self, src: int, dst_start: int, dst_stop: int, independent: bool = True) -> None:
        """Copy env src's whole state into envs dst_start..dst_stop-1 (a GRPO group starts from one
        maze). independent=True gives the copies their own future wind and shuffles."""
        for name, value in (("src", src), ("dst_start", dst_start), ("dst_stop", dst_stop)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"clone {name} must be an int, got {value!r}")
        self._call("clone", self._state, src, dst_start, dst_stop, bool(independent), batch_call=False)

    # -- observations ---------------------------------------------------------------------------
    def observe(self) -> Observation:
        """What each env shows before its next move, as of this call (one core call writes every
        field). Returns the batch's Observation buffers, overwritten by the next observe() and by
        nothing else (the output rule): a kept observation is not changed by step() or reset()."""
        if self._cuda:
            self._call("observe", self._state, self._observe_out)
        else:
            self._core.cpu_observe(self._cfg, self._state, self._observe_out, self.num_threads)
        return self._observation

    def render_text(self, indices=None) -> list[str]:
        """The user-turn prompt text of each env (or of the given env indices). Reads the state
        through buffers of its own, so an Observation the caller holds is left as it was."""
        self._call("observe", self._state, self._text_out)
        picked = range(self.num_envs) if indices is None else indices
        neighbours = self._text_neighbours.cpu().tolist()
        order = self._text_order.cpu().tolist()
        rows, cols, winds = self.row.tolist(), self.col.tolist(), self.wind_from.tolist()
        texts = T.fragment_texts(self.config)
        out = []
        for i in picked:
            listed = [(d, neighbours[i][d]) for d in order[i] if d >= 0]
            out.append(T.prompt_text(self.config, rows[i], cols[i], winds[i], listed, texts))
        return out

    def render_tokens(self, table: MazeTokenTable, out: torch.Tensor | None = None,
                      lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write every env's user-turn token ids into out int32 [B, table.max_len] (padded with
        table.pad_id) and lengths int32 [B], in C++/CUDA with no Python per env. Without out /
        lengths, the batch's own buffers are used and returned: the next render_tokens() overwrites
        them (the output rule)."""
        if not isinstance(table, MazeTokenTable):
            raise ValueError(f"table must be a MazeTokenTable, got {type(table).__name__}")
        if (table.config.size, table.config.glyphs) != (self.config.size, self.config.glyphs):
            raise ValueError(f"table was built for another MazeConfig: size {table.config.size} and glyphs "
                             f"{table.config.glyphs!r}, the batch has {self.config.size} and {self.config.glyphs!r}")
        width = table.max_len
        if out is None or lengths is None:
            if self._tokens is None or self._tokens[0] != width:
                self._tokens = (width, torch.empty(self.num_envs, width, dtype=torch.int32, device=self.device),
                                torch.empty(self.num_envs, dtype=torch.int32, device=self.device))
            out = self._tokens[1] if out is None else out
            lengths = self._tokens[2] if lengths is None else lengths
        self._check_buffer(out, "out", (self.num_envs, width), torch.int32)
        self._check_buffer(lengths, "lengths", (self.num_envs,), torch.int32)
        cached = self._token_tables.get(id(table))
        if cached is None or cached[0] is not table:
            ids, offsets = table.flat_tensors(self.device)
            cached = (table, self._core.TokenTable(ids.data_ptr(), offsets.data_ptr(), len(table.fragment_ids),
                                                  width, table.pad_id), ids, offsets)
            self._token_tables[id(table)] = cached
        self._call("render_tokens", self._state, cached[1], out.data_ptr(), lengths.data_ptr())
        return out, lengths

    def oracle(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dist int32 [B], optimal bool [B, 4]): BFS moves to the nearest Gold through non-Mold
        tiles (-1 if none) and the first moves of shortest paths (see docs/maze_spec.md). The
        batch's buffers, overwritten by the next oracle() (the output rule)."""
        if self._oracle_out is None:
            scratch = None
            if self._cuda:
                # The CUDA oracle BFSes every env of a chunk at once in caller-provided scratch (9
                # bytes per cell per env), working through the batch chunk by chunk.
                chunk = min(self.num_envs, ORACLE_CUDA_CHUNK_ENVS)
                scratch = torch.empty(self._core.cuda_oracle_scratch_bytes(self._cfg, chunk), dtype=torch.uint8,
                                      device=self.device)
            self._oracle_out = (torch.empty(self.num_envs, dtype=torch.int32, device=self.device),
                                torch.empty(self.num_envs, 4, dtype=torch.bool, device=self.device), scratch)
        dist, optimal, scratch = self._oracle_out
        extra = () if scratch is None else (scratch.data_ptr(), scratch.numel())
        self._call("oracle", self._state, dist.data_ptr(), optimal.data_ptr(), *extra)
        return dist, optimal

    def _check_buffer(self, tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != self.device:
            raise ValueError(f"{name} is on {tensor.device}, the batch is on {self.device}")
        if tensor.dtype != dtype:
            raise ValueError(f"{name} must have dtype {dtype}, got {tensor.dtype}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
