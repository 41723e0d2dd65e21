"""A minimal third-party env importable by name in a spawned worker (``plain_env:Plain-v0``):
our observation names, ``info["is_success"]``, and none of our extra attributes (no
``control_hz``), as most gymnasium envs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

ID = "Plain-v0"


class PlainEnv(gym.Env):
    metadata = {"render_modes": [], "render_fps": 7}

    def __init__(self):
        self.observation_space = spaces.Dict({
            "agentview_rgb": spaces.Box(0, 255, (32, 32, 3), np.uint8),
            "ee_pos": spaces.Box(-1, 1, (3,), np.float32),
            "gripper_states": spaces.Box(-1, 1, (2,), np.float32),
        })
        self.action_space = spaces.Box(-1, 1, (4,), np.float32)

    def _obs(self):
        return {"agentview_rgb": self.np_random.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                "ee_pos": self.np_random.uniform(-1, 1, 3).astype(np.float32),
                "gripper_states": np.zeros(2, np.float32)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.seed_, self.t = seed, 0
        return self._obs(), {"instruction": "do nothing"}

    def step(self, action):
        self.t += 1
        success = self.seed_ % 2 == 0 and self.t >= 2
        return self._obs(), float(action[0]), success, False, {"is_success": success, "instruction": "do nothing"}


if ID not in gym.registry:
    gym.register(ID, entry_point=PlainEnv, max_episode_steps=4)
