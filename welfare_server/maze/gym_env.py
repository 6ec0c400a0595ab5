"""A gymnasium VectorEnv over MazeBatch, for RL code written against the gymnasium API.

Observations are NumPy dicts (neighbour tiles, position, step index, wind message, and the rendered
user-turn token ids when a MazeTokenTable is given); actions are MultiDiscrete([4] * B); info
carries the action mask and the tiles entered. The episode's fixed horizon ends it: terminated is
true on the last move, truncated is never set.

Autoreset: with MazeConfig.autoreset the adapter runs in gymnasium's SAME_STEP mode, and
info["final_obs"] holds the finished episodes' last observation (the adapter resets the finished
envs itself after reading it, which is the core's same-step autoreset done in two calls). Without it
the mode is DISABLED: reset(options={"reset_mask": mask}) starts the next episode of chosen envs.
"""

from __future__ import annotations

import numpy as np

try:
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode, VectorEnv
except ImportError as error:  # gymnasium is an optional extra: pip install welfare_server[gym]
    raise ImportError("welfare_server.maze.gym_env needs gymnasium (pip install 'welfare_server[gym]')") from error

from welfare_server.maze.batch import MazeBatch
from welfare_server.maze.config import MazeConfig
from welfare_server.maze.tokens import MazeTokenTable


class MazeVectorEnv(VectorEnv):
    def __init__(self, config: MazeConfig, num_envs: int, seed: int = 0, device: str = "cpu",
                 token_table: MazeTokenTable | None = None, num_threads: int = 0):
        self.autoreset = config.autoreset
        self.metadata = {"autoreset_mode": AutoresetMode.SAME_STEP if config.autoreset else AutoresetMode.DISABLED}
        self.maze = MazeBatch(config.replace(autoreset=False), num_envs, seed, device, num_threads)
        self.token_table = token_table
        self.num_envs = num_envs
        size = config.size
        spaces = {
            "neighbours": gym.spaces.Box(-1, 2, (4,), np.int32),
            "position": gym.spaces.Box(0, size - 1, (2,), np.int32),
            "step_index": gym.spaces.Box(0, config.episode_steps, (), np.int32),
            "wind_from": gym.spaces.Box(-1, 3, (), np.int32),
        }
        if token_table is not None:
            high = np.iinfo(np.int32).max
            spaces["tokens"] = gym.spaces.Box(0, high, (token_table.max_len,), np.int32)
            spaces["token_length"] = gym.spaces.Box(0, token_table.max_len, (), np.int32)
        self.single_observation_space = gym.spaces.Dict(spaces)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.single_action_space = gym.spaces.Discrete(4)
        self.action_space = gym.spaces.MultiDiscrete(np.full(num_envs, 4))

    def _observation(self) -> tuple[dict, np.ndarray]:
        observed = self.maze.observe()
        obs = {
            "neighbours": _array(observed.neighbours),
            "position": _array(observed.position),
            "step_index": _array(observed.step_index),
            "wind_from": _array(observed.wind_from),
        }
        if self.token_table is not None:
            ids, lengths = self.maze.render_tokens(self.token_table)
            obs["tokens"], obs["token_length"] = _array(ids), _array(lengths)
        return obs, _array(observed.valid)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.maze = MazeBatch(self.maze.config, self.num_envs, seed, self.maze.device, self.maze.num_threads)
        elif options and "reset_mask" in options:
            self.maze.reset(np.asarray(options["reset_mask"], dtype=bool))
        else:
            self.maze.reset()
        obs, mask = self._observation()
        return obs, {"action_mask": mask}

    def step(self, actions):
        result = self.maze.step(np.asarray(actions, dtype=np.int64))
        reward = _array(result.reward)
        done = _array(result.done)
        info = {"tile_entered": _array(result.tile_entered), "tile_pushed": _array(result.tile_pushed),
                "wind_from": _array(result.wind_from)}
        obs, mask = self._observation()
        if self.autoreset and done.any():
            info["final_obs"] = obs
            info["_final_obs"] = done
            self.maze.reset(done)
            obs, mask = self._observation()
        info["action_mask"] = mask
        return obs, reward, done.copy(), np.zeros_like(done), info


def _array(tensor) -> np.ndarray:
    """A NumPy copy: MazeBatch returns views of buffers that its next call overwrites."""
    return tensor.cpu().numpy().copy()
