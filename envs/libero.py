"""LIBERO tasks speaking our conventions, with the names LIBERO's own HDF5 files use:
``agentview_rgb`` / ``wrist_rgb`` (LIBERO's ``eye_in_hand_rgb``; either name works) at the
policy's size, ``ee_pos`` / ``gripper_states`` / ``joint_states``, ``info["instruction"]`` (the
task's language) and ``info["is_success"]``.

Needs the ``libero`` extra (hf-libero, robosuite 1.4, mujoco < 3.9). Seeding follows LIBERO's
evaluation protocol: each task ships 50 fixed initial states, and the episode seeded ``s``
starts from state ``s % 50`` (``--seed 1000 --episodes 50`` is the 50 official scenes, once
each). Frames are returned as robosuite renders them, as LIBERO's demonstration files store
them (upside down), so a policy trained on those files sees the same pictures here.
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.presets import MissingExtraError

CAMERAS = {"agentview": "agentview", "wrist": "robot0_eye_in_hand", "eye_in_hand": "robot0_eye_in_hand"}
STATE = {"ee_pos": ("robot0_eef_pos", 3), "gripper_states": ("robot0_gripper_qpos", 2),
         "joint_states": ("robot0_joint_pos", 7)}
# Episode lengths of the published LIBERO evaluations (OpenVLA's), per suite.
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
SETTLE_STEPS = 10  # no-op steps after reset while the objects drop into place, as those evaluations do
NO_OP = np.array([0, 0, 0, 0, 0, 0, -1], np.float32)


def _default_config() -> None:
    """LIBERO asks on stdin for a dataset folder the first time it is imported (no config.yaml);
    write the answer "no" gives (its default paths, inside the installed package) instead."""
    import importlib.util

    folder = os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero"))
    spec = importlib.util.find_spec("libero")
    if os.path.exists(os.path.join(folder, "config.yaml")) or spec is None or not spec.submodule_search_locations:
        return
    import yaml

    root = os.path.join(list(spec.submodule_search_locations)[0], "libero")
    paths = {"benchmark_root": root, "bddl_files": os.path.join(root, "bddl_files"),
             "init_states": os.path.join(root, "init_files"), "datasets": os.path.join(root, "..", "datasets"),
             "assets": os.path.join(root, "assets")}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as fh:
        yaml.safe_dump(paths, fh)


def _libero():
    _default_config()
    try:
        from libero.libero import benchmark, get_assets_path, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as err:
        raise MissingExtraError(f"LIBERO tasks need the libero extra: pip install -e '.[libero]' (hf-libero, mujoco<3.9; "
                          f"its egl probe builds with cmake and a C compiler) ({err})") from None
    return benchmark, get_libero_path, get_assets_path, OffScreenRenderEnv


class LiberoEnv(gym.Env):
    """Task ``task_index`` of a LIBERO suite. Actions are LIBERO's 7-dim delta end-effector pose
    (dx, dy, dz, droll, dpitch, dyaw, gripper), gripper -1 open / +1 close: our convention."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}
    control_hz = 20.0

    def __init__(self, suite: str = "libero_spatial", task_index: int = 0, image_size: int = 128,
                 cameras: tuple[str, ...] = ("agentview", "wrist"), terminate_on_success: bool = True,
                 render_mode: str | None = None):
        benchmark, get_libero_path, get_assets_path, OffScreenRenderEnv = _libero()
        suites = benchmark.get_benchmark_dict()
        if suite not in suites:
            raise ValueError(f"unknown LIBERO suite {suite!r}; available: {sorted(suites)}")
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"LIBERO has no camera(s) {unknown}; use some of {list(CAMERAS)} (policy.cameras)")
        self.suite = suites[suite]()
        count = self.suite.get_num_tasks()
        if not 0 <= task_index < count:
            raise ValueError(f"{suite} has tasks 0..{count - 1}, not {task_index}")
        task = self.suite.get_task(task_index)
        self.task_name, self.instruction = task.name, task.language
        self.init_states = self.suite.get_task_init_states(task_index)
        self.camera_names, self.image_size = tuple(cameras), int(image_size)
        self.terminate_on_success, self.render_mode = terminate_on_success, render_mode
        self.max_steps = MAX_STEPS.get(suite, 520)
        assets = get_assets_path()  # hf-libero fetches the scene assets from the Hugging Face hub on first use
        if not os.path.isdir(assets):
            raise MissingExtraError(f"LIBERO's scene assets are not at {assets}: hf-libero downloads them from the "
                                    "Hugging Face hub (lerobot/libero-assets) on first use, and that failed here; "
                                    "fetch them once where the hub is reachable and copy them to that folder")
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        self._env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=self.image_size,
                                       camera_widths=self.image_size,
                                       camera_names=sorted({CAMERAS[c] for c in self.camera_names}))
        size = self.image_size
        self.observation_space = spaces.Dict({
            **{f"{c}_rgb": spaces.Box(0, 255, (size, size, 3), np.uint8) for c in self.camera_names},
            **{k: spaces.Box(-np.inf, np.inf, (n,), np.float32) for k, (_, n) in STATE.items()},
        })
        self.action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)
        self._raw: dict = {}

    def _obs(self, raw: dict) -> dict[str, np.ndarray]:
        self._raw = raw
        images = {f"{c}_rgb": np.ascontiguousarray(raw[f"{CAMERAS[c]}_image"]) for c in self.camera_names}
        return {**images, **{k: np.asarray(raw[name], np.float32) for k, (name, _) in STATE.items()}}

    def render(self) -> np.ndarray:
        return self._obs(self._raw)[f"{self.camera_names[0]}_rgb"]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        index = (seed or 0) % len(self.init_states)
        self._env.seed(int(seed or 0))
        self._env.reset()
        raw = self._env.set_init_state(self.init_states[index])
        for _ in range(SETTLE_STEPS):
            raw, *_ = self._env.step(NO_OP)
        self.t = 0
        return self._obs(raw), {"instruction": self.instruction, "is_success": False, "init_state": index}

    def step(self, action):
        raw, reward, done, info = self._env.step(np.asarray(action, np.float64))
        self.t += 1
        success = bool(done) or bool(self._env.check_success())
        terminated = success and self.terminate_on_success
        return self._obs(raw), float(reward), terminated, self.t >= self.max_steps, \
            {"instruction": self.instruction, "is_success": success}

    def close(self) -> None:
        self._env.close()
