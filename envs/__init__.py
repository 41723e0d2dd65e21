"""MuJoCo tabletop manipulation tasks with scripted experts, registered with gymnasium.

Importing this package picks a headless GL backend (EGL, else OSMesa) unless MUJOCO_GL is
set, so import it before mujoco. It knows nothing of models or policies."""

from envs.gl import choose_backend

choose_backend()

import gymnasium as gym  # noqa: E402

from envs.base import PhysicsInstabilityWarning, TabletopEnv  # noqa: E402
from envs.experts import make_expert  # noqa: E402
from envs.gl import RenderingUnavailableError, gl_renderer_name  # noqa: E402
from envs.video import record_episode, write_video  # noqa: E402

MAX_EPISODE_STEPS = {"Reach": 50, "Push": 120, "PickPlace": 120, "Stack": 150}
TASKS = tuple(MAX_EPISODE_STEPS)
# Variants for experiments, registered beside the tasks but not in TASKS (which the base's
# pretraining scenes and the benches walk): ReachSide's demonstrations are bimodal (action heads).
VARIANT_STEPS = {"ReachSide": 50}

for _task, _steps in {**MAX_EPISODE_STEPS, **VARIANT_STEPS}.items():
    _id = f"vla_peft/{_task}-v0"
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=f"envs.tasks:{_task}Env", max_episode_steps=_steps)

# Foreign benchmarks in our conventions; each needs its extra (imported only when made).
FOREIGN = {"vla_peft/MetaWorld-v0": ("envs.metaworld:MetaWorldEnv", 500),
           "vla_peft/LIBERO-v0": ("envs.libero:LiberoEnv", 520)}  # each suite ends its episodes sooner
for _id, (_entry, _steps) in FOREIGN.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry, max_episode_steps=_steps)

__all__ = [
    "TASKS",
    "MAX_EPISODE_STEPS",
    "VARIANT_STEPS",
    "TabletopEnv",
    "PhysicsInstabilityWarning",
    "RenderingUnavailableError",
    "make_expert",
    "gl_renderer_name",
    "record_episode",
    "write_video",
]
