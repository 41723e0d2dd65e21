"""Observation key maps: our names on the left, the names other datasets use on the right.

The toolkit's own files and tasks use LIBERO's names except for the wrist camera
(`wrist_rgb`), so a key map only has to rename what differs. With ``"auto"`` a file
is read through the first preset under which every requested key exists.
"""

from __future__ import annotations

from vla_peft.data.errors import DemoFileError

KEY_MAPS: dict[str, dict[str, str]] = {
    "vla_peft": {},
    "libero": {"wrist_rgb": "eye_in_hand_rgb"},
    "robomimic": {
        "agentview_rgb": "agentview_image",
        "wrist_rgb": "robot0_eye_in_hand_image",
        "ee_pos": "robot0_eef_pos",
        "gripper_states": "robot0_gripper_qpos",
        "joint_states": "robot0_joint_pos",
    },
}


def resolve_key_map(key_map: str | dict[str, str], wanted: list[str], available: set[str], where: str) -> dict[str, str]:
    """Return {our name: name in the file} for every wanted observation key.

    ``key_map`` is a preset name from KEY_MAPS, ``"auto"``, or an explicit dict (names
    it leaves out are read unchanged). Raises DemoFileError naming the missing keys.
    """
    if isinstance(key_map, dict):
        candidates = {"given": key_map}
    elif key_map == "auto":
        candidates = KEY_MAPS
    elif key_map in KEY_MAPS:
        candidates = {key_map: KEY_MAPS[key_map]}
    else:
        raise DemoFileError(f"unknown key map {key_map!r}: use 'auto', one of {sorted(KEY_MAPS)}, or a dict")
    misses = []
    for name, mapping in candidates.items():
        resolved = {key: mapping.get(key, key) for key in wanted}
        missing = [f"{key} (as {resolved[key]!r})" if resolved[key] != key else key for key in wanted if resolved[key] not in available]
        if not missing:
            return resolved
        misses.append(f"{name}: missing {', '.join(missing)}")
    raise DemoFileError(
        f"{where}: observation keys {wanted} not found under any key map ({'; '.join(misses)}); "
        f"the file has {sorted(available)}. Pass key_map={{our name: name in the file}}."
    )
