"""Environment presets for the benchmarks the field reports: ``metaworld/<task>-v3`` and
``libero/<suite>/<task index>``.

A preset names one of our wrappers (metaworld.py, libero.py beside this file), which bring the
benchmark's cameras at the policy's image size, our state names, the instruction, the action
convention, the success flag and one distinct scene per episode seed, so a policy trained on
its demonstrations is evaluated with no hand-written key map. Each needs its extra
(``pip install -e '.[metaworld]'`` or ``'.[libero]'``); a user's own gymnasium env still goes
through ``--env-id`` and the key map.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
EXAMPLES = "metaworld/reach-v3, metaworld/push-v3, libero/libero_spatial/0"


class MissingExtraError(ImportError):
    """A preset's benchmark is not installed: the message names the extra to install."""


@dataclass(frozen=True)
class Preset:
    name: str                                      # what the user typed: metaworld/reach-v3
    env_id: str                                    # our registered wrapper
    kwargs: dict = field(default_factory=dict)     # its keyword arguments (the task)
    cameras: tuple[str, ...] = ()                  # what `vla-peft collect --env` records by default
    image_size: int = 64                           # likewise (the tiny base's input size)


def is_preset(name: str | None) -> bool:
    return bool(name) and name.split("/", 1)[0] in ("metaworld", "libero")


def resolve_preset(name: str) -> Preset:
    """The preset ``name`` stands for, or one ValueError saying how presets are spelled."""
    family, _, rest = name.partition("/")
    if family == "metaworld" and rest.endswith("-v3") and "/" not in rest:
        return Preset(name, "vla_peft/MetaWorld-v0", {"task": rest}, cameras=("corner",))
    if family == "libero":
        suite, _, index = rest.partition("/")
        if suite in LIBERO_SUITES and index.isdigit():
            return Preset(name, "vla_peft/LIBERO-v0", {"suite": suite, "task_index": int(index)},
                          cameras=("agentview", "wrist"), image_size=128)
    raise ValueError(f"unknown environment preset {name!r}: use metaworld/<task>-v3 or "
                     f"libero/<suite>/<task index> with a suite of {list(LIBERO_SUITES)} (e.g. {EXAMPLES})")
