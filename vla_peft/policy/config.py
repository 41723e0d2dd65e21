"""The policy's configuration: which base, which inputs, which head."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vla_peft.models.tiny import ACTION_PROMPT
from vla_peft.typed_config import build_config, check_values

HEADS = ("continuous", "discrete", "flow")


@dataclass
class PolicyConfig:
    """Everything that fixes the policy's shape and its input/output conventions.

    Actions are ``(dx, dy, dz, ..., gripper)`` in the environment's units; the
    gripper (``gripper_dim``) is -1 open / +1 close. It is normalised with the other
    dimensions while training (the inverse restores it exactly) and snapped to
    exactly -1 or +1 at inference when ``binarize_gripper`` is on.
    """

    base: str = ""                      # checkpoint directory or hub name of the frozen VLM
    load_in_4bit: bool = False          # NF4 base (QLoRA)
    dtype: str = "float32"
    cameras: list[str] = field(default_factory=lambda: ["agentview"])
    image_size: int | None = None       # camera resolution the policy receives (resized to the VLM's); None: the data's
    state_keys: list[str] = field(default_factory=lambda: ["ee_pos", "gripper_states"])
    state_dim: int | None = None        # total size of the state keys; None: the data's
    # Training-only grounding targets: dataset observations (the simulator's target_pos / goal_pos)
    # that every action query must also predict (MSE, weight aux_weight). Never read at inference.
    aux_keys: list[str] = field(default_factory=list)
    aux_dim: int | None = None          # total size of the aux keys; None: the data's
    aux_weight: float = 2.0             # measured on Reach: 2 lets the actions learn from the image on seeds 5 did not (docs/results.md, "Seeds")
    action_dim: int = 4
    chunk_size: int = 8                 # K actions predicted per forward pass
    execute_steps: int = 4              # n of the K actions executed before re-planning
    temporal_ensemble: float = 0.0      # > 0: re-plan every step and average overlapping chunks (ACT's m)
    head: str = "continuous"
    head_width: int = 256               # the MLP's width (continuous, aux), the action expert's width (flow)
    n_bins: int = 256
    flow_steps: int = 10                # flow head: Euler steps per chunk (expert passes; the VLM runs once)
    flow_layers: int = 2                # flow head: transformer blocks in the action expert
    flow_seed: int = 0                  # flow head: seed of the starting noise (one draw, shared by every call)
    center_crop: float = 1.0            # kept area fraction of the evaluation centre crop (the data's crop_scale when augmenting)
    # Test-time augmentation: average each predicted chunk over the evaluation crop at n x n places
    # (n*n forward rows per observation; needs center_crop < 1). Measured on Reach: 74 % -> 88 % with 4.
    eval_crop_grid: int = 1
    gripper_dim: int | None = -1
    binarize_gripper: bool = True
    prompt: str = ACTION_PROMPT

    def __post_init__(self) -> None:
        vars(self).update(check_values(PolicyConfig, dict(vars(self)), "policy"))
        checks = [
            (self.head in HEADS, "head", f"use one of {HEADS}"),
            (0 < self.center_crop <= 1, "center_crop", "use a fraction in (0, 1]; 1 means no crop"),
            (self.eval_crop_grid >= 1, "eval_crop_grid", "use 1 (the centre crop only) or n > 1 for n x n crops"),
            (self.flow_steps > 0, "flow_steps", "use a positive number of Euler steps such as 10"),
            (self.flow_layers > 0, "flow_layers", "use a positive number of expert blocks such as 2"),
            (self.chunk_size > 0, "chunk_size", "use a positive integer such as 8"),
            (0 < self.execute_steps <= self.chunk_size, "execute_steps", f"use 1..chunk_size ({self.chunk_size})"),
            (self.action_dim > 0, "action_dim", "use the dataset's action dimension"),
            (self.state_dim is None or self.state_dim >= 0, "state_dim", "use the total size of the state keys"),
            (self.image_size is None or self.image_size > 0, "image_size", "use the cameras' resolution, e.g. 96"),
            (len(self.cameras) > 0, "cameras", "name at least one camera, e.g. ['agentview']"),
            (self.temporal_ensemble >= 0, "temporal_ensemble", "use 0 (off) or a positive decay such as 0.1"),
            ("{instruction}" in self.prompt, "prompt", "include '{instruction}' in the prompt"),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise ValueError(f"policy.{name}={getattr(self, name)!r} is invalid: {fix}")
        if self.gripper_dim is not None and not -self.action_dim <= self.gripper_dim < self.action_dim:
            raise ValueError(f"policy.gripper_dim={self.gripper_dim} is outside policy.action_dim={self.action_dim}")

    @property
    def gripper_index(self) -> int | None:
        return None if self.gripper_dim is None else self.gripper_dim % self.action_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PolicyConfig:
        return build_config(cls, d, "policy")
