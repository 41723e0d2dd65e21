"""Turn an environment that raises into a failed episode instead of a failed evaluation."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import create_empty_array


def _first(batch):
    """Row 0 of a batched empty array (nested dicts and tuples included)."""
    if isinstance(batch, dict):
        return {k: _first(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_first(v) for v in batch)
    return np.asarray(batch)[0]


class ErrorAsFailure(gym.Wrapper):
    """Catches exceptions from ``reset`` and ``step``: the episode ends there (terminated), with
    ``info["error"]`` holding the exception's type and message. A long evaluation of a
    simulator that occasionally crashes then reports that episode as failed and goes on."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._last_obs = None

    @property
    def control_hz(self) -> float | None:
        """The env's control rate when it declares one (ours do), else None. Answered here because
        asking an AsyncVectorEnv member for an attribute it lacks kills its worker process."""
        return getattr(self.env.unwrapped, "control_hz", None)

    def _fallback_obs(self):
        if self._last_obs is not None:
            return self._last_obs
        return _first(create_empty_array(self.observation_space, n=1))

    def reset(self, **kwargs):
        try:
            obs, info = self.env.reset(**kwargs)
        except Exception as err:  # noqa: BLE001 - any simulator failure is recorded, not raised
            return self._fallback_obs(), {"error": f"reset: {type(err).__name__}: {err}"}
        self._last_obs = obs
        return obs, info

    def step(self, action):
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as err:  # noqa: BLE001
            return self._fallback_obs(), 0.0, True, False, {"error": f"step: {type(err).__name__}: {err}"}
        self._last_obs = obs
        return obs, reward, terminated, truncated, info
