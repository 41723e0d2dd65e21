"""Questions and answers about one image, generated from its scene description (scenes.py).

All positions are in the image as shown (left/right, top/bottom), so a question is answerable
from the pixels alone, from either camera. The answers are short and closed-form, so held-out
accuracy is exact match and each type has a known chance level. Colour *binding* is what the
robot tasks need ("reach the red cube"), so most types name a colour and ask where, or name
a place and ask the colour.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BINS = 8  # coordinate bins per image axis
FINE_BINS = 32  # for `locate` and `instruction_fine`: 2 pixels of a 64-pixel image, about 1.2 cm on the table
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLUMNS = ["left", "center", "right"]
ROWS = ["top", "middle", "bottom"]
MARGIN = 0.06  # positions closer than this (image fraction) are not compared


def coordinate_bin(x: float, n: int = BINS) -> int:
    return int(np.clip(np.floor(x * n), 0, n - 1))


def fine(x: float) -> str:
    """A coordinate in FINE_BINS bins, as two digit words ("zero seven"): no new vocabulary."""
    b = coordinate_bin(x, FINE_BINS)
    return f"{NUMBERS[b // 10]} {NUMBERS[b % 10]}"


def _name(o: dict) -> str:
    return f"{o['colour']} {o['kind']}"


def _visible(scene: dict, kind: str | None = None) -> list[dict]:
    return [o for o in scene["objects"] if o["visible"] and (kind is None or o["kind"] == kind)]


def where(scene: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    """Colour -> position bins: the binding the policy needs."""
    objs = _visible(scene)
    if not objs:
        return None
    o = objs[rng.integers(len(objs))]
    return f"where is the {_name(o)}?", f"x {NUMBERS[coordinate_bin(o['u'])]} y {NUMBERS[coordinate_bin(o['v'])]}"


def locate(scene: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    """Name -> fine position (FINE_BINS per axis): the resolution grasping needs."""
    things = _visible(scene) + ([{"kind": "gripper", "colour": None, **scene["gripper"]}] if scene["gripper"]["visible"] else [])
    if not things:
        return None
    o = things[rng.integers(len(things))]
    name = "gripper" if o["kind"] == "gripper" else _name(o)
    return f"where exactly is the {name}?", f"x {fine(o['u'])} y {fine(o['v'])}"


def region(scene: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    """Colour -> one of nine coarse regions (the easy form of `where`)."""
    objs = _visible(scene)
    if not objs:
        return None
    o = objs[rng.integers(len(objs))]
    return f"which part of the image is the {_name(o)} in?", f"{ROWS[coordinate_bin(o['v'], 3)]} {COLUMNS[coordinate_bin(o['u'], 3)]}"


def exists(scene: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    """Is a <colour> <kind> in view? Balanced yes/no."""
    from envs.scene import COLOURS  # the colours the simulator paints with

    kind = "cube" if rng.random() < 0.6 else "pad"
    seen = {o["colour"] for o in _visible(scene, kind)}
    want_yes = rng.random() < 0.5
    pool = sorted(seen) if want_yes else sorted(set(COLOURS) - seen)
    if not pool:
        return None
    colour = pool[rng.integers(len(pool))]
    return f"is there a {colour} {kind}?", "yes" if colour in seen else "no"


def colour_of(scene: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    """Place -> colour: the leftmost / rightmost / top / bottom cube or pad."""
    kind = "cube" if rng.random() < 0.7 else "pad"
    objs = _visible(scene, kind)
    if len(objs) < 2:
        return None
    word, key, sign = [("left", "u", 1), ("right", "u", -1), ("top", "v", 1), ("bottom", "v", -1)][rng.integers(4)]
    ranked = sorted(objs, key=lambda o: sign * o[key])
    if abs(ranked[0][key] - ranked[1][key]) < MARGIN:
        return None
    return f"what colour is the {word} {kind}?", ranked[0]["colour"]


def relation(scene: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    """Is the <colour> cube left of / right of / above / below the <colour> <kind>? (two bindings)"""
    objs = _visible(scene)
    if len(objs) < 2:
        return None
    i, j = rng.choice(len(objs), size=2, replace=False)
    a, b = objs[i], objs[j]
    word, key, sign = [("left of", "u", 1), ("right of", "u", -1), ("above", "v", 1), ("below", "v", -1)][rng.integers(4)]
    gap = sign * (b[key] - a[key])
    if abs(gap) < MARGIN:
        return None
    return f"is the {_name(a)} {word} the {_name(b)}?", "yes" if gap > 0 else "no"


def count(scene: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    kind = "cube" if rng.random() < 0.6 else "pad"
    return f"how many {kind}s are there?", NUMBERS[len(_visible(scene, kind))]


def gripper_where(scene: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    g = scene["gripper"]
    if not g["visible"]:
        return None
    return "where is the gripper?", f"x {NUMBERS[coordinate_bin(g['u'])]} y {NUMBERS[coordinate_bin(g['v'])]}"


def gripper_open(scene: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    return "is the gripper open?", "yes" if scene["gripper"]["open"] else "no"


def instruction(scene: dict, rng: np.random.Generator, fine_bins: bool = False) -> tuple[str, str] | None:
    """A task instruction in the policy's own prompt -> column and row bins of its object (then of its goal).

    Grounding, not acting: the answer is where the named things are, never an action. It is
    the question the policy's prompt asks, so the base learns to find the instruction's objects
    at exactly the place in the sequence where the policy's action queries start.
    """
    from envs.tasks import INSTRUCTIONS
    from vla_peft.models.tiny import ACTION_PROMPT

    cubes, pads = _visible(scene, "cube"), _visible(scene, "pad")
    goals_of = {"Reach": [], "Push": pads, "PickPlace": pads, "Stack": cubes}
    tasks = [t for t in INSTRUCTIONS if cubes and len(goals_of[t]) >= {"Reach": 0, "Stack": 2}.get(t, 1)]
    if not tasks:
        return None
    task = tasks[rng.integers(len(tasks))]
    goals = goals_of[task]
    cube = cubes[rng.integers(len(cubes))]
    goals = [g for g in goals if g is not cube]
    goal = goals[rng.integers(len(goals))] if goals else None
    text = INSTRUCTIONS[task].format(cube=cube["colour"], pad=goal and goal["colour"], other=goal and goal["colour"])
    # No "x"/"y" words: the first answer word is already the column, so the base must find the
    # object at the prompt's last token, the one the policy's action queries follow.
    where_of = (lambda o: f"{fine(o['u'])} {fine(o['v'])}") if fine_bins else (
        lambda o: f"{NUMBERS[coordinate_bin(o['u'])]} {NUMBERS[coordinate_bin(o['v'])]}")
    answer = where_of(cube)
    if goal is not None:
        answer += f" then {where_of(goal)}"
    return ACTION_PROMPT.format(instruction=text), answer


def caption(scene: dict, rng: np.random.Generator) -> tuple[str, str] | None:
    """Every visible object, named left to right: a caption that needs colour *and* order."""
    objs = sorted(_visible(scene), key=lambda o: o["u"])
    if not objs or any(b["u"] - a["u"] < MARGIN for a, b in zip(objs, objs[1:])):
        return None
    return "describe the scene from left to right.", " ".join(_name(o) for o in objs)


QUESTION_TYPES: dict[str, Callable[[dict, np.random.Generator], tuple[str, str] | None]] = {
    "where": where,
    "region": region,
    "exists": exists,
    "colour_of": colour_of,
    "relation": relation,
    "count": count,
    "gripper_where": gripper_where,
    "gripper_open": gripper_open,
    "caption": caption,
    "instruction": instruction,
    "locate": locate,
    # the same, answered in FINE_BINS: the policy needs its objects to within a few pixels
    "instruction_fine": lambda scene, rng: instruction(scene, rng, fine_bins=True),
}

# Sampling weights: first the questions that need one binding and little reading, then all.
EASY_MIX = {"where": 3, "region": 3, "exists": 2, "count": 1, "gripper_where": 1, "gripper_open": 1, "instruction": 2}
FULL_MIX = {
    "where": 4, "region": 1, "exists": 1, "colour_of": 2, "relation": 2,
    "count": 0.5, "gripper_where": 1, "gripper_open": 0.5, "caption": 1, "instruction": 3,
}
# The locator recipe's mixes: answers in FINE_BINS, and `locate` takes half of `where`'s share.
FINE_EASY_MIX = {**{k: v for k, v in EASY_MIX.items() if k != "instruction"}, "instruction_fine": EASY_MIX["instruction"]}
FINE_FULL_MIX = {
    "where": 2, "locate": 3, "region": 1, "exists": 1, "colour_of": 2, "relation": 2,
    "count": 0.5, "gripper_where": 1, "gripper_open": 0.5, "caption": 1, "instruction_fine": 3,
}


def ask(scene: dict, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) of ``qtype`` about ``scene``, or None when it does not apply.

    The answer starts with a space, as it follows "ASSISTANT:" in the prompt.
    """
    qa = QUESTION_TYPES[qtype](scene, rng)
    return None if qa is None else (qa[0], " " + qa[1])
