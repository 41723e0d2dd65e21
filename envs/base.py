"""The tabletop gymnasium environment shared by every task: action handling, physics
substeps, observations, rendering and the instability guard. Tasks (tasks.py) only say what
is on the table, what the instruction is, and when the episode succeeded."""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from envs.gl import make_renderer
from envs.scene import COLOURS, CUBE_HALF, build_model

CAMERAS = ("agentview", "wrist")
_INSTABILITY_WARNINGS = (
    mujoco.mjtWarning.mjWARN_BADQPOS,
    mujoco.mjtWarning.mjWARN_BADQVEL,
    mujoco.mjtWarning.mjWARN_BADQACC,
)


class PhysicsInstabilityWarning(RuntimeWarning):
    """The simulation diverged; the episode was ended as failed."""


class TabletopEnv(gym.Env):
    """A floating two-finger gripper over a table with coloured cubes and pads.

    Action: Box(-1, 1, (4,)) = (dx, dy, dz, gripper). The first three move the grasp point by
    up to `max_delta` metres per step (values outside [-1, 1] are clipped, not rejected); the
    gripper value is -1 = open ... +1 = closed (robosuite / LIBERO convention), continuous in
    between. NaN/inf or a wrong shape raise ValueError.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    task_name = ""
    n_cubes = 0
    n_pads = 0
    control_hz = 10
    max_delta = 0.03  # metres per control step at action 1.0

    def __init__(
        self,
        image_size: int = 96,
        cameras: tuple[str, ...] = CAMERAS,
        render_images: bool = True,
        terminate_on_success: bool = False,
        render_mode: str | None = None,
    ) -> None:
        if not isinstance(image_size, (int, np.integer)) or not 16 <= image_size <= 640:
            raise ValueError(f"image_size must be an int in [16, 640], got {image_size!r}")
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; available: {list(CAMERAS)}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.image_size = int(image_size)
        self.camera_names = tuple(cameras) if render_images else ()
        self.render_images = render_images
        self.terminate_on_success = terminate_on_success
        self.render_mode = render_mode

        self.model = build_model(self.n_cubes, self.n_pads)
        self.data = mujoco.MjData(self.model)
        self.substeps = round(1.0 / (self.control_hz * self.model.opt.timestep))
        self._ee_qpos = [self._qpos_adr(f"ee_{a}") for a in "xyz"]
        self._ee_dof = [self._dof_adr(f"ee_{a}") for a in "xyz"]
        self._finger_qpos = [self._qpos_adr(f"finger_{s}") for s in ("left", "right")]
        self._ee_lo = self.model.actuator_ctrlrange[:3, 0].copy()
        self._ee_hi = self.model.actuator_ctrlrange[:3, 1].copy()
        self._finger_open, self._finger_closed = 0.05, -0.01
        self._cube_qpos = [self._qpos_adr(f"cube{i}") for i in range(self.n_cubes)]
        self._cube_geom = [self._id(mujoco.mjtObj.mjOBJ_GEOM, f"cube{i}") for i in range(self.n_cubes)]
        self._pad_body = [self._id(mujoco.mjtObj.mjOBJ_BODY, f"pad{i}") for i in range(self.n_pads)]
        self._pad_geom = [self._id(mujoco.mjtObj.mjOBJ_GEOM, f"pad{i}") for i in range(self.n_pads)]
        self._finger_geoms = {
            self._id(mujoco.mjtObj.mjOBJ_GEOM, f"finger_{s}") for s in ("left", "right")
        }

        obs_spaces: dict[str, spaces.Space] = {
            f"{cam}_rgb": spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
            for cam in self.camera_names
        }
        # generous finite bounds: the workspace is +-0.25 m, speeds stay well under 1 m/s
        obs_spaces["ee_pos"] = spaces.Box(-1.0, 1.0, (3,), np.float32)
        obs_spaces["ee_vel"] = spaces.Box(-10.0, 10.0, (3,), np.float32)
        obs_spaces["gripper_states"] = spaces.Box(-0.1, 0.1, (2,), np.float32)
        self.observation_space = spaces.Dict(obs_spaces)
        self.action_space = spaces.Box(-1.0, 1.0, (4,), np.float32)

        self._renderers: dict[tuple[int, int], mujoco.Renderer] = {}
        self.instruction = ""
        self.cube_colours: list[str] = []
        self.pad_colours: list[str] = []
        self._failed = False
        self.episode_id = 0  # counts resets, so stateful experts notice a new episode

    # ----------------------------------------------------------------- model lookups
    def _id(self, kind: mujoco.mjtObj, name: str) -> int:
        return mujoco.mj_name2id(self.model, kind, name)

    def _qpos_adr(self, joint: str) -> int:
        return int(self.model.jnt_qposadr[self._id(mujoco.mjtObj.mjOBJ_JOINT, joint)])

    def _dof_adr(self, joint: str) -> int:
        return int(self.model.jnt_dofadr[self._id(mujoco.mjtObj.mjOBJ_JOINT, joint)])

    # ----------------------------------------------------------------- task hooks
    def _sample_episode(self, rng: np.random.Generator) -> None:
        """Place cubes and pads, choose colours and set `self.instruction`."""
        raise NotImplementedError

    def _is_success(self) -> bool:
        raise NotImplementedError

    def _targets(self) -> dict[str, np.ndarray]:
        """Task-specific privileged entries (target indices)."""
        return {}

    # ----------------------------------------------------------------- state accessors
    @property
    def ee_pos(self) -> np.ndarray:
        return self.data.qpos[self._ee_qpos].copy()

    def cube_pos(self, i: int) -> np.ndarray:
        a = self._cube_qpos[i]
        return self.data.qpos[a : a + 3].copy()

    def pad_pos(self, i: int) -> np.ndarray:
        return self.model.body_pos[self._pad_body[i]].copy()

    def set_cube(self, i: int, xy: np.ndarray, z: float = CUBE_HALF, yaw: float = 0.0) -> None:
        a = self._cube_qpos[i]
        self.data.qpos[a : a + 3] = (xy[0], xy[1], z)
        self.data.qpos[a + 3 : a + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))

    def set_pad(self, i: int, xy: np.ndarray) -> None:
        self.model.body_pos[self._pad_body[i]] = (xy[0], xy[1], 0.0)

    def colour_objects(self, cube_colours: list[str], pad_colours: list[str]) -> None:
        self.cube_colours, self.pad_colours = list(cube_colours), list(pad_colours)
        for g, c in zip(self._cube_geom, cube_colours):
            self.model.geom_rgba[g, :3] = COLOURS[c]
        for g, c in zip(self._pad_geom, pad_colours):
            self.model.geom_rgba[g, :3] = COLOURS[c]

    def fingers_touch(self, i: int) -> bool:
        """Whether a finger is in contact with cube i (used so 'placed' means released)."""
        cube = self._cube_geom[i]
        for c in self.data.contact[: self.data.ncon]:
            pair = {int(c.geom1), int(c.geom2)}
            if cube in pair and pair & self._finger_geoms:
                return True
        return False

    def privileged_state(self) -> dict[str, np.ndarray]:
        """Object state for scripted experts only; never part of the policy's observation."""
        state = {
            "ee_pos": self.ee_pos,
            "gripper_states": self.data.qpos[self._finger_qpos].copy(),
            "cube_pos": np.array([self.cube_pos(i) for i in range(self.n_cubes)]).reshape(-1, 3),
            "pad_pos": np.array([self.pad_pos(i) for i in range(self.n_pads)]).reshape(-1, 3),
        }
        state.update(self._targets())
        return state

    def task_positions(self) -> dict[str, np.ndarray]:
        """Where the instruction's object (``target_pos``) and its goal (``goal_pos``, when the task
        has one) are: recorded beside each demo as privileged observations, for training-only
        grounding targets (``policy.aux_keys``); never part of the policy's observation."""
        targets = self._targets()
        positions = {"target_pos": self.cube_pos(int(targets["target_cube"]))}
        if "target_pad" in targets:
            positions["goal_pos"] = self.pad_pos(int(targets["target_pad"]))
        elif "base_cube" in targets:
            positions["goal_pos"] = self.cube_pos(int(targets["base_cube"]))
        return {key: value.astype(np.float32) for key, value in positions.items()}

    # ----------------------------------------------------------------- gym API
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        rng = self.np_random
        start = np.array([0.0, 0.0, 0.2]) + rng.uniform(-0.02, 0.02, size=3)
        self.data.qpos[self._ee_qpos] = start
        self.data.qpos[self._finger_qpos] = self._finger_open
        self._sample_episode(rng)
        self.data.ctrl[:3] = start
        self.data.ctrl[3:5] = self._finger_open
        mujoco.mj_forward(self.model, self.data)
        self._failed = False
        self.episode_id += 1
        return self._observation(), self._info()

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = self._check_action(action)
        target = np.clip(self.ee_pos + action[:3] * self.max_delta, self._ee_lo, self._ee_hi)
        grip = (action[3] + 1.0) / 2.0  # 0 = open, 1 = closed
        finger = self._finger_open + grip * (self._finger_closed - self._finger_open)
        self.data.ctrl[:3] = target
        self.data.ctrl[3:5] = finger

        if not self._failed:
            self._simulate()
        success = (not self._failed) and self._is_success()
        terminated = self._failed or (success and self.terminate_on_success)
        info = self._info(success)
        return self._observation(), float(success), terminated, False, info

    def _check_action(self, action: Any) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64)
        if a.shape != self.action_space.shape:
            raise ValueError(
                f"action must have shape {self.action_space.shape} = (dx, dy, dz, gripper), "
                f"got {a.shape}"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action contains NaN or inf: {a.tolist()}; check the policy output")
        return np.clip(a, -1.0, 1.0)

    def _simulate(self) -> None:
        """Run the physics substeps; on divergence restore the last good state and fail."""
        warn_before = sum(int(self.data.warning[w].number) for w in _INSTABILITY_WARNINGS)
        snapshot = (self.data.time, self.data.qpos.copy(), self.data.qvel.copy())
        for _ in range(self.substeps):
            mujoco.mj_step(self.model, self.data)
        warn_after = sum(int(self.data.warning[w].number) for w in _INSTABILITY_WARNINGS)
        finite = np.all(np.isfinite(self.data.qpos)) and np.all(np.isfinite(self.data.qvel))
        if warn_after > warn_before or not finite:
            self._failed = True
            self.data.time, self.data.qpos[:], self.data.qvel[:] = snapshot
            self.data.qvel[:] = 0.0
            mujoco.mj_forward(self.model, self.data)
            warnings.warn(
                f"{self.task_name}: the physics became unstable (MuJoCo warning or NaN state); "
                "the episode ends as failed",
                PhysicsInstabilityWarning,
                stacklevel=3,
            )

    def _info(self, success: bool | None = None) -> dict[str, Any]:
        if success is None:
            success = self._is_success()
        return {
            "instruction": self.instruction,
            "is_success": bool(success),
            "physics_unstable": self._failed,
        }

    def _observation(self) -> dict[str, np.ndarray]:
        obs = {f"{cam}_rgb": self.render_camera(cam) for cam in self.camera_names}
        obs["ee_pos"] = self.ee_pos.astype(np.float32)
        obs["ee_vel"] = self.data.qvel[self._ee_dof].astype(np.float32)
        obs["gripper_states"] = self.data.qpos[self._finger_qpos].astype(np.float32)
        return obs

    # ----------------------------------------------------------------- rendering
    def render_camera(self, camera: str, size: int | None = None) -> np.ndarray:
        """An RGB uint8 image (size x size x 3) from any camera in the scene."""
        size = self.image_size if size is None else int(size)
        renderer = self._renderers.get((size, size))
        if renderer is None:
            renderer = self._renderers[(size, size)] = make_renderer(self.model, size, size)
        renderer.update_scene(self.data, camera=camera)
        return renderer.render()

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array":
            return self.render_camera("agentview")
        return None

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()
