"""Scripted experts: waypoint / proportional controllers on privileged state, with a real
grasp (approach, close, lift, move, lower, release). They produce the demonstrations."""

from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np

from envs.base import TabletopEnv
from envs.scene import CUBE_HALF
from envs.tasks import WORKSPACE

OPEN, CLOSED = -1.0, 1.0
SAFE_Z = 0.1  # grasp-point height at which the open fingers clear every cube
CARRY_Z = 0.12
# Put-down: the fingers open on the way down, once the grasp point is less than RELEASE_ABOVE above
# the cube's goal height (on the table: 4.5 cm) with the cube within PLACE_XY of its goal in the table
# plane (a drop of 1-3 cm). The decision rests on the grasp point's height, which a policy observes
# (the goal heights are fixed: the table, a cube's top), not on the cube's, which it must guess; waiting
# instead until the proportional step had crept the cube to 6 mm of its rest point gave a policy
# dozens of "closed, barely moving" frames per demonstration and one "open", and it learned to hold
# the cube on the pad (docs/results.md).
RELEASE_ABOVE = 0.017
PLACE_XY = 0.025
# The open fingers stay still over the goal this many steps before the retreat, so that a recording
# past the success (`vla-peft collect --after-success`) shows the opening, not the retreat: an open
# gripper going up looks like the approach, an open gripper going down, and a policy trained on both
# hovered above the cube (docs/results.md).
RELEASE_STEPS = 8
# Grasp: the fingers close once the grasp point is within CLOSE_ABOVE of the cube's centre height and
# CLOSE_XY of it in the table plane. The open fingers hold a cube 2.5 cm off centre between them, so the
# plane tolerance can be wide; the height, which a policy reads from its own state, decides. Closing
# only within 8 mm in all three taught a policy whose estimate of the cube was 1-2 cm off to stop
# beside it, low, open (docs/results.md).
CLOSE_ABOVE = 0.008
CLOSE_XY = 0.015


class Expert:
    """Base: follows the env's episodes (resets its phase when the env is reset)."""

    def __init__(self, env: TabletopEnv) -> None:
        self.env = env
        self._episode = -1
        self.reset()

    def reset(self) -> None:
        self.phase = "start"
        self.counter = 0

    def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        if self.env.episode_id != self._episode:
            self._episode = self.env.episode_id
            self.reset()
        return self.act(self.env.privileged_state()).astype(np.float32)

    def act(self, s: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def move(self, ee: np.ndarray, target: np.ndarray, grip: float, speed: float = 1.0) -> np.ndarray:
        """Proportional step towards target, at most `speed` of the env's largest step."""
        delta = np.clip((target - ee) / self.env.max_delta, -speed, speed)
        return np.append(delta, grip)


class ReachExpert(Expert):
    def act(self, s):
        ee, cube = s["ee_pos"], s["cube_pos"][int(s["target_cube"])]
        if self.phase == "start":
            above = np.array([cube[0], cube[1], SAFE_Z])
            if np.linalg.norm((ee - above)[:2]) < 0.01:
                self.phase = "descend"
            return self.move(ee, np.array([cube[0], cube[1], max(ee[2], SAFE_Z)]), OPEN)
        return self.move(ee, cube, OPEN)


class ReachSideExpert(Expert):
    """Straight to the spot on one side of the cube, the side drawn at random from the env's
    generator at the episode's first step (so a seed repeats its demonstration)."""

    def reset(self) -> None:
        super().reset()
        self.side = None

    def act(self, s):
        if self.side is None:
            self.side = int(self.env.np_random.integers(2))
        return self.move(s["ee_pos"], self.env.side_goals()[self.side], OPEN)


class PickPlaceExpert(Expert):
    """Grasp the target cube and put it down at `goal()`; Stack subclasses the goal."""

    def goal(self, s) -> np.ndarray:
        """Where the cube's centre should end up."""
        pad = s["pad_pos"][int(s["target_pad"])]
        return np.array([pad[0], pad[1], CUBE_HALF + 0.003])

    def act(self, s):
        ee, cube = s["ee_pos"], s["cube_pos"][int(s["target_cube"])]
        if self.phase == "start":  # open, go above the cube
            above = np.array([cube[0], cube[1], SAFE_Z])
            if np.linalg.norm((ee - above)[:2]) < 0.008 and ee[2] > SAFE_Z - 0.02:
                self.phase = "descend"
            return self.move(ee, np.array([cube[0], cube[1], max(ee[2], SAFE_Z)]), OPEN)
        if self.phase == "descend":
            if ee[2] < cube[2] + CLOSE_ABOVE and np.linalg.norm((ee - cube)[:2]) < CLOSE_XY:
                self.phase, self.counter = "close", 0
            return self.move(ee, cube, OPEN)
        if self.phase == "close":
            self.counter += 1
            if self.counter >= 4:
                self.phase = "lift"
            return self.move(ee, cube, CLOSED)
        if self.phase in ("lift", "carry", "lower") and np.linalg.norm(ee - cube) > 0.03:
            self.phase = "start"  # the cube slipped: grasp again
            return self.move(ee, np.array([ee[0], ee[1], SAFE_Z]), OPEN)
        goal = self.goal(s)
        offset = ee - cube  # keep the grasp offset when aiming the cube at the goal
        if self.phase == "lift":
            if ee[2] > CARRY_Z - 0.02:
                self.phase = "carry"
            return self.move(ee, np.array([ee[0], ee[1], CARRY_Z]), CLOSED)
        if self.phase == "carry":
            above = np.array([goal[0] + offset[0], goal[1] + offset[1], CARRY_Z])
            if np.linalg.norm((ee - above)[:2]) < 0.006:
                self.phase = "lower"
            return self.move(ee, above, CLOSED)
        if self.phase == "lower":
            target = goal + offset
            if np.linalg.norm((ee - target)[:2]) < PLACE_XY and ee[2] < goal[2] + RELEASE_ABOVE:
                self.phase, self.counter = "release", 0
            return self.move(ee, target, CLOSED, speed=0.6)
        if self.phase == "release":
            self.counter += 1
            if self.counter >= RELEASE_STEPS:
                self.phase = "retreat"
            return self.move(ee, ee, OPEN)
        return self.move(ee, np.array([ee[0], ee[1], CARRY_Z]), OPEN)  # retreat


class StackExpert(PickPlaceExpert):
    def goal(self, s):
        base = s["cube_pos"][int(s["base_cube"])]
        return np.array([base[0], base[1], base[2] + 2 * CUBE_HALF + 0.004])


class PushExpert(Expert):
    """Closed fingers as a pusher: get behind the cube on the pad's line, push, re-align."""

    PUSH_Z = 0.03
    STANDOFF = 0.07  # grasp point to cube centre before pushing
    CONTACT = 0.042  # grasp point to cube centre when the closed fingers touch its face

    def direction(self, cube: np.ndarray, u: np.ndarray, others: list[np.ndarray]) -> np.ndarray:
        """The pad's direction, or the nearest turn of it (still towards the pad) whose
        pre-push spot is clear of the other cubes, so the pusher never lands on one."""
        for angle in (0.0, 0.5, -0.5, 0.9, -0.9):
            c, s_ = np.cos(angle), np.sin(angle)
            v = np.array([c * u[0] - s_ * u[1], s_ * u[0] + c * u[1]])
            pre = cube - v * self.STANDOFF
            if all(np.linalg.norm(pre - o) > 0.08 for o in others):
                return v
        return u

    def act(self, s):
        ee, cube = s["ee_pos"], s["cube_pos"][int(s["target_cube"])]
        pad = s["pad_pos"][int(s["target_pad"])]
        d = pad[:2] - cube[:2]
        dist = np.linalg.norm(d)
        if self.phase == "done" or dist < 0.01:
            self.phase = "done"
            return self.move(ee, np.array([ee[0], ee[1], SAFE_Z]), CLOSED)
        others = [c[:2] for i, c in enumerate(s["cube_pos"]) if i != int(s["target_cube"])]
        u = self.direction(cube[:2], d / dist, others)
        e = ee[:2] - cube[:2]
        along = float(e @ u)
        lateral = e - along * u
        if self.phase == "push":
            if np.linalg.norm(lateral) > 0.03 or along > -0.02 or ee[2] > self.PUSH_Z + 0.02:
                self.phase = "start"
            else:  # aim just inside the cube's far side of the line: push and re-centre at once
                xy = cube[:2] - u * (self.CONTACT - min(0.015, dist + 0.005))
                return self.move(ee, np.array([xy[0], xy[1], self.PUSH_Z]), CLOSED)
        pre = cube[:2] - u * self.STANDOFF
        if np.linalg.norm(ee[:2] - pre) > 0.012:  # lift, then travel above the cube height
            if ee[2] < SAFE_Z - 0.02:
                return self.move(ee, np.array([ee[0], ee[1], SAFE_Z]), CLOSED)
            return self.move(ee, np.array([pre[0], pre[1], SAFE_Z]), CLOSED)
        if ee[2] > self.PUSH_Z + 0.008:
            return self.move(ee, np.array([pre[0], pre[1], self.PUSH_Z]), CLOSED)
        self.phase = "push"
        return self.move(ee, np.array([ee[0], ee[1], self.PUSH_Z]), CLOSED)


class PlayExpert(Expert):
    """Undirected play, not the task: the open gripper moves from one random waypoint to the next,
    most often above a random object (any cube or pad, named by the instruction or not), else anywhere
    over the table. Its frames show many scene layouts with the arm in task-like poses: data for
    grounding targets (``DataConfig.grounding_paths``), never for actions."""

    def reset(self) -> None:
        super().reset()
        self.waypoint = None

    def act(self, s):
        ee, rng = s["ee_pos"], self.env.np_random
        if self.waypoint is None or np.linalg.norm(ee - self.waypoint) < 0.01:
            objects = np.concatenate([s["cube_pos"], s["pad_pos"]])
            if rng.random() < 0.7:
                xy = objects[rng.integers(len(objects)), :2] + rng.normal(0.0, 0.02, size=2)
            else:
                xy = rng.uniform(-WORKSPACE, WORKSPACE, size=2)
            self.waypoint = np.array([*xy, rng.uniform(2 * CUBE_HALF + 0.01, CARRY_Z)])
        return self.move(ee, self.waypoint, OPEN)


EXPERTS = {"Reach": ReachExpert, "Push": PushExpert, "PickPlace": PickPlaceExpert, "Stack": StackExpert,
           "ReachSide": ReachSideExpert}


def make_expert(env: gym.Env, play: bool = False) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The scripted expert for env's task (or, with `play`, undirected play in its scenes): a callable
    obs -> action (float32, shape (4,)).

    It reads privileged state from the env, and restarts its plan whenever the env is reset."""
    base = env.unwrapped
    if hasattr(base, "make_expert"):  # a foreign benchmark's own scripted policies (envs/metaworld.py)
        return base.make_expert(play)
    if not isinstance(base, TabletopEnv):
        raise TypeError(f"make_expert needs a vla_peft tabletop env, got {type(base).__name__}")
    return (PlayExpert if play else EXPERTS[base.task_name])(base)
