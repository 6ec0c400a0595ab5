"""CUDA backend: bitwise equal to the CPU backend (runs only where a GPU and the CUDA build exist)."""

import pytest
import torch

from welfare_server.maze import MazeBatch, MazeConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_device_is_refused_clearly_without_a_gpu():
    with pytest.raises(ValueError, match="device='cuda'"):
        MazeBatch(MazeConfig(size=10), 4, device="cuda")


@needs_cuda
@pytest.mark.parametrize("config", [MazeConfig(size=100, wind_prob=0.3, autoreset=True),
                                    MazeConfig(size=13, wind_prob=0.9, episode_steps=7, autoreset=True,
                                               glyphs="letters")])
def test_cuda_matches_cpu_bitwise(config, smollm2_tokenizer):
    from welfare_server.maze import MazeTokenTable

    table = MazeTokenTable.from_tokenizer(smollm2_tokenizer, config)
    num_envs = 2048
    cpu, gpu = MazeBatch(config, num_envs, seed=5), MazeBatch(config, num_envs, seed=5, device="cuda")
    generator = torch.Generator().manual_seed(1)
    names = ("grids", "row", "col", "step_index", "wind_from", "episode", "step_key", "done")
    for t in range(2 * config.episode_steps + 3):
        for name in names:
            assert torch.equal(getattr(cpu, name), getattr(gpu, name).cpu()), f"{name} at step {t}"
        ids_cpu, len_cpu = cpu.render_tokens(table)
        ids_gpu, len_gpu = gpu.render_tokens(table)
        assert torch.equal(ids_cpu, ids_gpu.cpu()) and torch.equal(len_cpu, len_gpu.cpu())
        a, b = cpu.oracle(), gpu.oracle()
        assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
        seen, seen_gpu = cpu.observe(), gpu.observe()
        for field in ("neighbours", "valid", "order", "position", "step_index", "wind_from"):
            assert torch.equal(getattr(seen, field), getattr(seen_gpu, field).cpu()), f"{field} at step {t}"
        valid = seen.valid
        actions = (torch.rand(num_envs, 4, generator=generator) + valid).argmax(dim=1).to(torch.int32)
        x, y = cpu.step(actions), gpu.step(actions.cuda())
        assert torch.equal(x.reward.view(torch.int32), y.reward.cpu().view(torch.int32))
        for field in ("tile_entered", "tile_pushed", "wind_from", "done"):
            assert torch.equal(getattr(x, field), getattr(y, field).cpu()), f"{field} at step {t}"
    cpu.clone(0, 1, 9)
    gpu.clone(0, 1, 9)
    for name in names:
        assert torch.equal(getattr(cpu, name), getattr(gpu, name).cpu()), f"{name} after clone"


@needs_cuda
def test_cuda_rejects_invalid_actions_without_changing_state():
    batch = MazeBatch(MazeConfig(size=20), 64, seed=1, device="cuda")
    before = batch.grids.clone()
    actions = torch.zeros(64, dtype=torch.int32, device="cuda")
    actions[17] = 9
    with pytest.raises(ValueError, match=r"actions\[17\]=9"):
        batch.step(actions)
    assert torch.equal(batch.grids, before)
