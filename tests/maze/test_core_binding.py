"""Direct tests of the raw pybind layer welfare_server._maze_core with torch CPU tensors.

The Python face (welfare_server/maze/batch.py) is tested elsewhere; these only pin the binding's
calling convention: data pointers as ints, ValueError on bad input with state untouched, and the
CUDA entry points' behaviour on a build or machine without CUDA.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from welfare_server import _maze_core as core
from welfare_server.maze.config import PYTHON_ONLY_FIELDS, MazeConfig


def config(seed: int = 0, **rules):
    """The core's Config of MazeConfig(**rules): every field by name, as MazeBatch builds it."""
    return core.Config(**MazeConfig(**rules).core_fields(seed))


def make_state(num_envs: int, size: int):
    b = num_envs
    bufs = {
        "grid": torch.full((b, size, size), 0xEE, dtype=torch.uint8),
        "row": torch.full((b,), -7, dtype=torch.int32),
        "col": torch.full((b,), -7, dtype=torch.int32),
        "t": torch.full((b,), -7, dtype=torch.int32),
        "wind_from": torch.full((b,), -7, dtype=torch.int32),
        "episode": torch.zeros(b, dtype=torch.int64),
        "step_key": torch.zeros(b, dtype=torch.int64),
        "done": torch.full((b,), 9, dtype=torch.uint8),
        "origin_env": torch.full((b,), -7, dtype=torch.int64),
        "origin_episode": torch.full((b,), -7, dtype=torch.int64),
    }
    view = core.StateView(b, *(bufs[k].data_ptr() for k in (
        "grid", "row", "col", "t", "wind_from", "episode", "step_key", "done", "origin_env",
        "origin_episode")))
    return bufs, view


def make_out(b: int):
    out = {
        "reward": torch.full((b,), float("nan"), dtype=torch.float32),
        "tile_entered": torch.full((b,), -9, dtype=torch.int32),
        "tile_pushed": torch.full((b,), -9, dtype=torch.int32),
        "wind_from": torch.full((b,), -9, dtype=torch.int32),
        "done": torch.full((b,), 9, dtype=torch.uint8),
    }
    return out, core.StepOut(*(out[k].data_ptr() for k in out))


def valid_actions(bufs, size: int, salt: int = 0) -> torch.Tensor:
    row, col = bufs["row"].long(), bufs["col"].long()
    b = row.numel()
    acts = torch.empty(b, dtype=torch.int32)
    for i in range(b):
        for k in range(4):
            d = (i + salt + k) % 4
            r = row[i] + (-1 if d == 0 else 1 if d == 2 else 0)
            c = col[i] + (1 if d == 1 else -1 if d == 3 else 0)
            if 0 <= r < size and 0 <= c < size:
                acts[i] = d
                break
    return acts


def test_config_fields_and_validation():
    cfg = config(seed=2**64 - 1, size=12, wind_prob=0.25, autoreset=True)
    assert (cfg.size, cfg.seed, cfg.wind_prob, cfg.autoreset) == (12, 2**64 - 1, 0.25, True)
    assert cfg.interior_cells == 100 and cfg.mold_count_lo == 11 and cfg.mold_count_hi == 49
    assert cfg.wind_threshold == 2**30
    with pytest.raises(AttributeError):  # read-only: derived values cannot go stale
        cfg.size = 3
    fields = MazeConfig(size=12).core_fields(0)
    with pytest.raises(ValueError, match=r"Config.size=3 is out of bounds \[4, 1000\]"):
        core.Config(**{**fields, "size": 3})
    with pytest.raises(ValueError, match=r"Config.gold_ratio is missing: every field is required"):
        core.Config(**{k: v for k, v in fields.items() if k != "gold_ratio"})
    with pytest.raises(ValueError, match="Config has no field 'glyphs'"):
        core.Config(**fields, glyphs="office")
    with pytest.raises(ValueError, match="Config.episode_steps=2.5 is not an integer in range"):
        core.Config(**{**fields, "episode_steps": 2.5})
    with pytest.raises(ValueError, match="Config.seed=-1 is not an integer in range"):
        core.Config(**{**fields, "seed": -1})


def test_core_config_fields_are_mazeconfigs_rules():
    # One statement of the rules: every MazeConfig constructor field but the Python-only ones is a
    # core field, and the core has no other (MazeBatch passes them by name; a new rule added to
    # the dataclass but not to WS_CONFIG_FIELDS is refused by name at the first MazeBatch).
    rules = [f.name for f in dataclasses.fields(MazeConfig) if f.init and f.name not in PYTHON_ONLY_FIELDS]
    assert list(core.CONFIG_FIELDS) == rules + ["seed"]
    assert set(MazeConfig().core_fields(5)) == set(core.CONFIG_FIELDS)
    # the values reach the core unchanged (floats through float32 for the rewards)
    custom = MazeConfig(size=33, episode_steps=7, wind_prob=0.3, melting=False, step_reward=-0.5,
                        mold_reward=-3.0, gold_reward=4.0, walk_min_mult=2, walk_max_mult=9,
                        mold_fraction_min=0.2, mold_fraction_max=0.6, gold_ratio=0.1,
                        shuffle_directions=False, autoreset=True)
    cfg = core.Config(**custom.core_fields(11))
    for name in rules:
        assert getattr(cfg, name) == pytest.approx(getattr(custom, name)), name
    assert (cfg.interior_cells, cfg.mold_count_lo, cfg.mold_count_hi, cfg.wind_threshold) == (
        custom.interior_cells, custom.mold_count_lo, custom.mold_count_hi, custom.wind_threshold)


def test_rng_helpers_known_values():
    assert core.mix64(1) == 0x5692161D100B05E5
    assert core.draw(0, 0) == 0xE220A8397B1DCDAF  # SplitMix64's first output for seed 0
    k = core.episode_key(42, 7, 3)
    assert k == 0xE806150371775FFD
    assert core.gen_key(k) == 0x006AC2B5B853DECF
    assert core.step_key(k) == 0x470A7EBD5A19B00F
    assert core.uniform(core.step_key(k), 2, 24) == 3
    order = core.bfs_order(5)
    assert order[:5] == [12, 7, 17, 13, 11] and sorted(order) == list(range(25))


def test_reset_step_and_validation_leaves_state_unchanged():
    size, b = 16, 6
    cfg = config(seed=9, size=size, episode_steps=4)
    bufs, view = make_state(b, size)
    bufs["episode"][:] = torch.arange(b) * 10
    core.cpu_reset(cfg, view, 0, 2)
    assert bufs["t"].eq(0).all() and bufs["done"].eq(0).all() and bufs["wind_from"].eq(-1).all()
    assert bufs["origin_env"].tolist() == list(range(b))
    assert bufs["origin_episode"].tolist() == bufs["episode"].tolist()
    for i in range(b):  # step_key per spec, stored as int64 with the same bits
        key = core.episode_key(9, i, int(bufs["episode"][i]))
        assert bufs["step_key"][i].item() & (2**64 - 1) == core.step_key(key)
        assert bufs["grid"][i, bufs["row"][i], bufs["col"][i]].item() == 0  # starts on Path
    border = torch.cat([bufs["grid"][:, 0], bufs["grid"][:, -1], bufs["grid"][:, :, 0],
                        bufs["grid"][:, :, -1]], dim=1)
    assert border.eq(1).all()

    out, out_view = make_out(b)
    acts = valid_actions(bufs, size)
    bufs["row"][2] = 0
    acts[2] = 0
    snapshot = {k: v.clone() for k, v in bufs.items()}
    with pytest.raises(ValueError, match=r"actions\[2\]=0 \(N\) would leave the grid from row 0"):
        core.cpu_step(cfg, view, acts.data_ptr(), out_view, 2)
    for k, v in bufs.items():
        assert torch.equal(v, snapshot[k]), k
    assert out["reward"].isnan().all()  # outputs untouched too

    core.cpu_reset(cfg, view, 0, 1)
    for step in range(4):
        acts = valid_actions(bufs, size, salt=step)
        core.cpu_step(cfg, view, acts.data_ptr(), out_view, 1)
        assert not out["reward"].isnan().any()
        assert out["done"].eq(int(step == 3)).all()
    with pytest.raises(ValueError, match="is done"):
        core.cpu_step(cfg, view, valid_actions(bufs, size).data_ptr(), out_view, 1)


def test_render_observe_oracle_clone():
    size, b = 10, 5
    cfg = config(seed=1, size=size)
    bufs, view = make_state(b, size)
    core.cpu_reset(cfg, view, 0, 0)
    nf = 58 + 2 * size
    lens = torch.tensor([(f % 3) + 1 for f in range(nf)], dtype=torch.int32)
    offsets = torch.zeros(nf + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(lens, 0)
    ids = torch.repeat_interleave(torch.arange(nf, dtype=torch.int32), lens)
    max_len = 40
    table = core.TokenTable(ids.data_ptr(), offsets.data_ptr(), nf, max_len, -1)
    out_ids = torch.full((b, max_len), -99, dtype=torch.int32)
    lengths = torch.zeros(b, dtype=torch.int32)
    core.cpu_render_tokens(cfg, view, table, out_ids.data_ptr(), lengths.data_ptr(), 2)
    for i in range(b):
        n = int(lengths[i])
        assert 0 < n <= max_len
        # TURN_PREFIX (fragment 8, 3 ids) then HEAD_PLAIN (fragment 4, 2 ids); TURN_SUFFIX last
        assert out_ids[i, :5].tolist() == [8, 8, 8, 4, 4]
        assert out_ids[i, n - 1] == 9 and out_ids[i, n:].eq(-1).all()
    small = core.TokenTable(ids.data_ptr(), offsets.data_ptr(), nf, 3, -1)
    with pytest.raises(ValueError, match="max_len=3"):
        core.cpu_render_tokens(cfg, view, small, out_ids.data_ptr(), lengths.data_ptr(), 1)
    bad = core.TokenTable(ids.data_ptr(), offsets.data_ptr(), nf - 2, max_len, -1)
    with pytest.raises(ValueError, match="num_fragments"):
        core.cpu_render_tokens(cfg, view, bad, out_ids.data_ptr(), lengths.data_ptr(), 1)

    neighbours = torch.empty((b, 4), dtype=torch.int32)
    order = torch.empty((b, 4), dtype=torch.int32)
    core.cpu_observe(cfg, view, core.ObserveOut(neighbours.data_ptr(), order.data_ptr()), 1)
    for i in range(b):
        listed = sorted(d for d in order[i].tolist() if d >= 0)
        assert listed == [d for d in range(4) if neighbours[i, d] >= 0]
    # the optional outputs: the mask, (x, y) and a snapshot of t and the wind message
    valid = torch.full((b, 4), 7, dtype=torch.uint8)
    position = torch.full((b, 2), -9, dtype=torch.int32)
    t, wind = torch.full((b,), -9, dtype=torch.int32), torch.full((b,), -9, dtype=torch.int32)
    core.cpu_observe(cfg, view, core.ObserveOut(neighbours.data_ptr(), order.data_ptr(), valid.data_ptr(),
                                                position.data_ptr(), t.data_ptr(), wind.data_ptr()), 1)
    assert torch.equal(valid, neighbours.ge(0).to(torch.uint8))
    assert torch.equal(position, torch.stack([bufs["col"], bufs["row"]], dim=1))
    assert torch.equal(t, bufs["t"]) and torch.equal(wind, bufs["wind_from"])

    dist = torch.empty(b, dtype=torch.int32)
    optimal = torch.empty((b, 4), dtype=torch.uint8)
    core.cpu_oracle(cfg, view, dist.data_ptr(), optimal.data_ptr(), 1)
    assert dist.ne(0).all() and optimal.sum(1).ge(1).all()

    core.cpu_clone(cfg, view, 0, 2, 5, True)
    assert torch.equal(bufs["grid"][2:], bufs["grid"][0:1].expand(3, -1, -1))
    assert bufs["origin_env"][2:].eq(0).all()
    keys = {bufs["step_key"][i].item() for i in (0, 2, 3, 4)}
    assert len(keys) == 4  # independent clones get fresh keys
    core.cpu_clone(cfg, view, 0, 1, 2, independent=False)
    assert bufs["step_key"][1] == bufs["step_key"][0]
    with pytest.raises(ValueError, match="inside"):
        core.cpu_clone(cfg, view, 3, 2, 5, True)


def test_cuda_entry_points_without_gpu():
    cfg = config(size=8)
    bufs, view = make_state(1, 8)
    if not core.cuda_compiled():
        with pytest.raises(RuntimeError, match="built without the CUDA backend"):
            core.cuda_reset(cfg, view, 0, 0)
        return
    if torch.cuda.is_available():
        pytest.skip("GPU parity is tested by the lead's parity tests")
    # Built with CUDA but no usable device: state checks still raise ValueError first.
    with pytest.raises(ValueError, match="num_envs"):
        core.cuda_reset(cfg, core.StateView(-1, *([0] * 10)), 0, 0)
