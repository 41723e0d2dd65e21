"""Build the MuJoCo model of one task: the shared tabletop (assets/tabletop.xml) plus the
cubes and flat target pads that task needs. Colours and positions are set per episode."""

from __future__ import annotations

from pathlib import Path

import mujoco

ASSET_DIR = Path(__file__).parent / "assets"
CUBE_HALF = 0.025  # 5 cm cubes: about 6 pixels wide at 64x64 from the agentview camera
PAD_HALF = 0.045  # 9 cm square pads
TABLE_TOP = 0.0

# Well separated hues, so a 64x64 image still tells them apart.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.75, 0.15),
    "blue": (0.1, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
}


def _cube_xml(i: int) -> str:
    return (
        f'<body name="cube{i}" pos="0 0 {CUBE_HALF}"><freejoint name="cube{i}"/>'
        f'<geom name="cube{i}" type="box" size="{CUBE_HALF} {CUBE_HALF} {CUBE_HALF}" '
        f'mass="0.08" friction="0.6 0.005 0.0001" rgba="1 1 1 1"/></body>'
    )


def _pad_xml(i: int) -> str:
    # Visual only (no collisions): cubes rest on the table at the same height on or off a pad.
    return (
        f'<body name="pad{i}" pos="0 0 0"><geom name="pad{i}" type="box" '
        f'size="{PAD_HALF} {PAD_HALF} 0.001" pos="0 0 0.001" contype="0" conaffinity="0" '
        f'rgba="1 1 1 1"/></body>'
    )


def build_model(n_cubes: int, n_pads: int) -> mujoco.MjModel:
    """The tabletop with `n_cubes` free cubes (cube0..) and `n_pads` target pads (pad0..)."""
    xml = (ASSET_DIR / "tabletop.xml").read_text()
    objects = "".join(_cube_xml(i) for i in range(n_cubes)) + "".join(
        _pad_xml(i) for i in range(n_pads)
    )
    xml = xml.replace("</worldbody>", objects + "</worldbody>", 1)
    return mujoco.MjModel.from_xml_string(xml)
