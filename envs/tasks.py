"""The four tasks: what is on the table, the instruction, and the success test.

Cube 0 is always the object the instruction names and pad 0 (or cube 1 for Stack) the goal;
colours and positions are drawn from the episode's seed, so the index says nothing visible."""

from __future__ import annotations

import numpy as np

from envs.base import TabletopEnv
from envs.scene import COLOURS, CUBE_HALF, PAD_HALF

WORKSPACE = 0.15  # objects are placed in [-0.15, 0.15]^2
RESTING = CUBE_HALF + 0.01  # a cube centre below this height is resting on the table


# The instruction of each task; the pretraining of the tiny base asks about them too.
INSTRUCTIONS = {
    "Reach": "reach the {cube} cube",
    "Push": "push the {cube} cube onto the {pad} pad",
    "PickPlace": "pick up the {cube} cube and put it on the {pad} pad",
    "Stack": "stack the {cube} cube on the {other} cube",
}


def sample_positions(
    rng: np.random.Generator, n: int, min_dist: float, fixed: list[np.ndarray] | None = None
) -> list[np.ndarray]:
    """n points in the workspace, each at least min_dist from the others and from `fixed`."""
    points = list(fixed or [])
    start = len(points)
    while len(points) < start + n:
        p = rng.uniform(-WORKSPACE, WORKSPACE, size=2)
        if all(np.linalg.norm(p - q) >= min_dist for q in points):
            points.append(p)
    return points[start:]


def _colours(rng: np.random.Generator, n: int) -> list[str]:
    names = list(COLOURS)
    return [names[i] for i in rng.permutation(len(names))[:n]]


def _yaw(rng: np.random.Generator) -> float:
    return float(rng.uniform(-0.4, 0.4))


class ReachEnv(TabletopEnv):
    """Move the grasp point to the named cube among two distractors."""

    task_name = "Reach"
    n_cubes = 3

    def _sample_episode(self, rng):
        for i, xy in enumerate(sample_positions(rng, 3, 0.11)):
            self.set_cube(i, xy, yaw=_yaw(rng))
        self.colour_objects(_colours(rng, 3), [])
        self.instruction = INSTRUCTIONS["Reach"].format(cube=self.cube_colours[0])

    def _targets(self):
        return {"target_cube": np.array(0)}

    def _is_success(self):
        return bool(np.linalg.norm(self.ee_pos - self.cube_pos(0)) < 0.04)


class ReachSideEnv(ReachEnv):
    """Reach with two goals, a multimodal variant for comparing action heads: hover beside the named
    cube, ``SIDE`` to its left or its right (along the table's x axis) at the experts' travel height.
    Its expert picks the side at random in each episode, so the demonstrations have two modes and
    their average, a hover over the cube itself, is ``SIDE`` from both goals and fails.
    Same scenes and instruction as Reach."""

    task_name = "ReachSide"
    SIDE = 0.07
    HEIGHT = 0.1  # the experts' travel height (SAFE_Z): above every cube
    TOLERANCE = 0.03

    def side_goals(self) -> np.ndarray:
        """(2, 3): the spots left and right of the named cube."""
        cube = self.cube_pos(0)
        return np.array([[cube[0] + side * self.SIDE, cube[1], self.HEIGHT] for side in (-1, 1)])

    def _is_success(self):
        return bool(np.min(np.linalg.norm(self.side_goals() - self.ee_pos, axis=1)) < self.TOLERANCE)


def _on_pad(cube: np.ndarray, pad: np.ndarray) -> bool:
    return bool(np.max(np.abs(cube[:2] - pad[:2])) < PAD_HALF and cube[2] < RESTING)


class PushEnv(TabletopEnv):
    """Push the named cube onto the named pad (a distractor cube and pad are on the table)."""

    task_name = "Push"
    n_cubes = 2
    n_pads = 2

    def _sample_episode(self, rng):
        while True:
            cube, pad, other_cube, other_pad = sample_positions(rng, 4, 0.11)
            d = np.linalg.norm(pad - cube)
            if not 0.12 <= d <= 0.2:
                continue
            # keep the distractor cube well clear of the pushing corridor (incl. the pre-push
            # spot): the pushed cube drifts sideways a little and the pusher comes back behind it
            u = (pad - cube) / d
            start = cube - 0.09 * u
            t = np.clip(np.dot(other_cube - start, u), 0.0, d + 0.09)
            if np.linalg.norm(other_cube - (start + t * u)) > 0.12:
                break
        self.set_cube(0, cube, yaw=_yaw(rng))
        self.set_cube(1, other_cube, yaw=_yaw(rng))
        self.set_pad(0, pad)
        self.set_pad(1, other_pad)
        self.colour_objects(_colours(rng, 2), _colours(rng, 2))
        self.instruction = INSTRUCTIONS["Push"].format(cube=self.cube_colours[0], pad=self.pad_colours[0])

    def _targets(self):
        return {"target_cube": np.array(0), "target_pad": np.array(0)}

    def _is_success(self):
        return _on_pad(self.cube_pos(0), self.pad_pos(0))


class PickPlaceEnv(TabletopEnv):
    """Pick up the named cube and put it on the named pad, released (not held) there."""

    task_name = "PickPlace"
    n_cubes = 2
    n_pads = 2

    def _sample_episode(self, rng):
        cube, other_cube, pad, other_pad = sample_positions(rng, 4, 0.11)
        self.set_cube(0, cube, yaw=_yaw(rng))
        self.set_cube(1, other_cube, yaw=_yaw(rng))
        self.set_pad(0, pad)
        self.set_pad(1, other_pad)
        self.colour_objects(_colours(rng, 2), _colours(rng, 2))
        self.instruction = INSTRUCTIONS["PickPlace"].format(cube=self.cube_colours[0], pad=self.pad_colours[0])

    def _targets(self):
        return {"target_cube": np.array(0), "target_pad": np.array(0)}

    def _is_success(self):
        return _on_pad(self.cube_pos(0), self.pad_pos(0)) and not self.fingers_touch(0)


class StackEnv(TabletopEnv):
    """Put the named cube on top of another named cube (a third cube is a distractor)."""

    task_name = "Stack"
    n_cubes = 3

    def _sample_episode(self, rng):
        for i, xy in enumerate(sample_positions(rng, 3, 0.11)):
            self.set_cube(i, xy, yaw=_yaw(rng))
        self.colour_objects(_colours(rng, 3), [])
        self.instruction = INSTRUCTIONS["Stack"].format(cube=self.cube_colours[0], other=self.cube_colours[1])

    def _targets(self):
        return {"target_cube": np.array(0), "base_cube": np.array(1)}

    def _is_success(self):
        top, base = self.cube_pos(0), self.cube_pos(1)
        return bool(
            np.linalg.norm(top[:2] - base[:2]) < 0.02
            and abs(top[2] - base[2] - 2 * CUBE_HALF) < 0.01
            and base[2] < RESTING
            and not self.fingers_touch(0)
        )
