"""Meta-World (v3) tasks speaking our conventions: ``<camera>_rgb`` images at the policy's size,
``ee_pos`` / ``gripper_states``, ``info["instruction"]`` and ``info["is_success"]``, and one
distinct scene per ``reset(seed)``.

Needs the ``metaworld`` extra (it pins mujoco == 3.3.0). Why a wrapper and not
``gym.make("Meta-World/MT1", seed=...)``: MT1 draws scenes from a fixed list chosen by its
construction seed, so episodes seeded 1000, 1001, ... repeated scenes (measured: 20 episodes
were 10 scenes). Here the seed of each reset draws the task's random goal / object positions.
Its scene asks for 4096-pixel shadow maps and 4x multisampling: 0.26-0.33 s per 64x64 frame on
this machine's software renderer (llvmpipe). Here multisampling is off and ``shadow_size``
defaults to 0 (no shadow maps): measured on the same frame, 512-pixel shadows took 0.04 s and
none 0.017 s, and at 64x64 the pictures look alike. Pass ``shadow_size=4096`` for Meta-World's look.
"""

from __future__ import annotations

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from envs.presets import MissingExtraError
from gymnasium.utils import seeding

CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
UPSIDE_DOWN = ("corner", "corner2", "corner3", "corner4")  # rendered rotated by 180 degrees; turned upright
MAX_EPISODE_STEPS = 500  # Meta-World's own horizon (max_path_length)

# What each task asks for, in words (Meta-World itself carries no language).
INSTRUCTIONS = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
}


def _metaworld():
    try:
        import metaworld
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError:
        raise MissingExtraError("Meta-World tasks need the metaworld extra: pip install -e '.[metaworld]' "
                          "(it pins mujoco==3.3.0; install it in its own virtualenv)") from None
    return metaworld, ALL_V3_ENVIRONMENTS, ENV_POLICY_MAP


def task_names() -> list[str]:
    return list(_metaworld()[1])


class MetaWorldEnv(gym.Env):
    """One Meta-World v3 task. Actions are Meta-World's: (dx, dy, dz, gripper effort), gripper
    -1 open / +1 close, which is our convention. ``gripper_states`` is Meta-World's normalised
    finger opening (1 open, 0 closed)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(self, task: str = "reach-v3", image_size: int = 64, cameras: tuple[str, ...] = ("corner",),
                 terminate_on_success: bool = False, shadow_size: int = 0, render_mode: str | None = None):
        _, envs, _ = _metaworld()
        if task not in envs:
            raise ValueError(f"unknown Meta-World task {task!r}; available: {sorted(envs)}")
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"Meta-World has no camera(s) {unknown}; use some of {list(CAMERAS)} (policy.cameras)")
        self.task = self.task_name = task
        self.instruction = INSTRUCTIONS.get(task, task.removesuffix("-v3").replace("-", " "))
        self.camera_names = tuple(cameras)
        self.image_size = int(image_size)
        self.terminate_on_success = terminate_on_success
        self.render_mode = render_mode
        self._env = envs[task]()
        self._env._partially_observable = False  # the scripted experts read the goal from the observation
        del self._env.sawyer_observation_space  # recomputed for the new observability (as Meta-World's set_task does)
        self._env._set_task_called = True
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True  # the goal / object positions come from the env's np_random
        model = self._env.model
        model.vis.quality.shadowsize = shadow_size
        model.vis.quality.offsamples = 0
        self._renderer = mujoco.Renderer(model, self.image_size, self.image_size)
        self.control_hz = 1.0 / (self._env.frame_skip * model.opt.timestep)
        self.raw_obs = np.zeros(39)
        size = self.image_size
        self.observation_space = spaces.Dict({
            **{f"{c}_rgb": spaces.Box(0, 255, (size, size, 3), np.uint8) for c in self.camera_names},
            "ee_pos": spaces.Box(-np.inf, np.inf, (3,), np.float32),
            "gripper_states": spaces.Box(-np.inf, np.inf, (1,), np.float32),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)

    def render_camera(self, camera: str) -> np.ndarray:
        self._renderer.update_scene(self._env.data, camera=camera)
        image = self._renderer.render()
        return np.ascontiguousarray(image[::-1, ::-1]) if camera in UPSIDE_DOWN else image.copy()

    def render(self) -> np.ndarray:
        return self.render_camera(self.camera_names[0])

    def _obs(self) -> dict[str, np.ndarray]:
        raw = self.raw_obs
        return {**{f"{c}_rgb": self.render_camera(c) for c in self.camera_names},
                "ee_pos": raw[0:3].astype(np.float32), "gripper_states": raw[3:4].astype(np.float32)}

    def task_positions(self) -> dict[str, np.ndarray]:
        """Privileged positions, recorded by ``vla-peft collect`` as training-only targets."""
        return {"object_pos": self.raw_obs[4:7].astype(np.float32),
                "goal_pos": np.asarray(self._env._target_pos, np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:  # each seed its own scene; without one the env's generator goes on
            self._env.np_random, _ = seeding.np_random(seed)
        self.raw_obs, _ = self._env.reset()
        return self._obs(), {"instruction": self.instruction, "is_success": False}

    def step(self, action):
        self.raw_obs, reward, _, truncated, info = self._env.step(np.asarray(action, dtype=np.float32))
        success = bool(info["success"])
        terminated = success and self.terminate_on_success
        return self._obs(), float(reward), terminated, bool(truncated), {**info, "is_success": success,
                                                                         "instruction": self.instruction}

    def make_expert(self, play: bool = False):
        """Meta-World's scripted policy for the task (``metaworld.policies``), on its full observation."""
        if play:
            raise ValueError("Meta-World tasks have no play mode; collect expert demonstrations")
        policy = _metaworld()[2][self.task]()
        return lambda _obs: np.clip(policy.get_action(self.raw_obs), -1.0, 1.0).astype(np.float32)

    def close(self) -> None:
        if getattr(self, "_renderer", None) is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()
