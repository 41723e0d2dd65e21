"""The one check of a raw observation against a policy's inputs, shared by ``predict_chunk``, mixed
batches and the policy server: a bad observation is refused before it reaches the model (or joins
a batch of other robots' requests), with one error naming the key and the fix.

An observation is unbatched (``instruction`` a string, images (H, W, 3), state vectors (n,)) or
batched (``instruction`` a list of B strings, images (B, H, W, 3), state (B, n)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from vla_peft.policy.config import PolicyConfig

# Longest instruction accepted (characters). Task instructions are a sentence (LIBERO's longest is
# under 200); a 76k-character one took 8.3 s to tokenise and run, holding every other robot's turn.
MAX_INSTRUCTION_CHARS = 1000


class ObservationError(ValueError):
    """An observation the policy cannot act on; the message names the key and the fix."""


class NonFiniteActionError(RuntimeError):
    """The policy computed NaN or infinite actions; they are never handed to a robot."""


def check_observation(obs: Mapping, config: PolicyConfig, reserved: Sequence[str] = (),
                      max_instruction_chars: int = MAX_INSTRUCTION_CHARS) -> tuple[dict, bool]:
    """-> (the observation batched: ``instruction`` a list, ``<camera>_rgb`` uint8 (B, H, W, 3), each
    state key float32 (B, n); whether it came unbatched). ``reserved`` are the tokenizer's special
    token strings, which an instruction must not contain (``<image>`` would add a camera slot)."""
    if not isinstance(obs, Mapping):
        raise ObservationError(f"the observation must be a dict of named arrays, got {type(obs).__name__}")
    if "instruction" not in obs:
        raise ObservationError(f"observation has no 'instruction' (it has {sorted(obs)}): add the task's "
                               "language instruction, e.g. 'reach the red cube'")
    instruction = obs["instruction"]
    if isinstance(instruction, np.ndarray):  # a vector env's batch of strings
        instruction = instruction.tolist()
    single = isinstance(instruction, str)
    instructions = [instruction] if single else instruction
    if not isinstance(instructions, Sequence) or isinstance(instructions, (bytes, str)) or not instructions:
        raise ObservationError(f"observation 'instruction' must be a string (or a non-empty list of strings for a "
                               f"batch), got {type(instruction).__name__}")
    for text in instructions:
        _check_instruction(text, reserved, max_instruction_chars)
    batch = len(instructions)
    out = {"instruction": list(instructions)}
    for camera in config.cameras:
        out[f"{camera}_rgb"] = _check_image(obs, f"{camera}_rgb", config, batch, single)
    sizes = {}
    for key in config.state_keys:
        out[key] = _check_state(obs, key, config, batch, single)
        sizes[key] = out[key].shape[1]
    if config.state_dim is not None and sum(sizes.values()) != config.state_dim:
        got = " + ".join(f"{k} ({n})" for k, n in sizes.items())
        raise ObservationError(
            f"observation state: got {got} = {sum(sizes.values())} values, but this policy reads state_keys "
            f"{config.state_keys} with state_dim={config.state_dim} values in all: send each key's full vector "
            "as the environment gives it (or retrain on this state layout)")
    return out, single


def _check_instruction(text, reserved: Sequence[str], max_chars: int) -> None:
    if not isinstance(text, str):
        raise ObservationError(f"observation 'instruction' must be a string, got {type(text).__name__} {text!r:.60}: "
                               "pass the task's instruction text")
    if len(text) > max_chars:
        raise ObservationError(f"observation 'instruction' is {len(text)} characters, over the limit of {max_chars}: "
                               "send the task's instruction (a sentence), not a document")
    for token in reserved:
        if token and token in text:
            raise ObservationError(f"observation 'instruction' contains the reserved token {token!r}: remove it (the "
                                   "policy places its camera images and special tokens itself)")


def _check_image(obs: Mapping, key: str, config: PolicyConfig, batch: int, single: bool) -> np.ndarray:
    if key not in obs:
        raise ObservationError(f"observation has no image {key!r} (it has {sorted(obs)}): this policy reads cameras "
                               f"{config.cameras}; send each as '<camera>_rgb' (or fix policy.cameras)")
    image = np.asarray(obs[key])
    if single:
        image = image[None]
    if image.dtype != np.uint8 or image.ndim != 4 or image.shape[-1] != 3:
        raise ObservationError(
            f"observation {key!r}: expected uint8 images shaped (H, W, 3) (or batched), got {image.dtype} "
            f"{tuple(image.shape[1:] if single else image.shape)}; pass the environment's {key!r} observation unchanged")
    if len(image) != batch:
        raise ObservationError(f"observation {key!r}: {len(image)} images for {batch} instructions; give one per row")
    height, width, size = image.shape[1], image.shape[2], config.image_size
    if size is not None and (height, width) != (size, size):  # refused, not resized: see image.check_size
        raise ObservationError(f"observation {key!r}: image is {height}x{width} but the policy expects {size}x{size}; "
                               f"render the environment with image_size={size} or set policy.image_size={height} "
                               "and retrain")
    return image


def _check_state(obs: Mapping, key: str, config: PolicyConfig, batch: int, single: bool) -> np.ndarray:
    if key not in obs:
        raise ObservationError(f"observation has no state key {key!r} (it has {sorted(obs)}): this policy reads "
                               f"state {config.state_keys}; send each (or fix policy.state_keys)")
    value = np.asarray(obs[key])
    if value.dtype.kind not in "fiu":
        raise ObservationError(f"observation {key!r}: state must be numbers (float or int), got {value.dtype}; "
                               "send the robot's state vector")
    if single:
        if value.ndim > 1:
            raise ObservationError(f"observation {key!r}: state must be a 1-D vector, got shape {value.shape}; "
                                   "send one observation's vector (or batch the instruction too)")
        value = value.reshape(1, -1)
    elif value.ndim < 1 or len(value) != batch:
        raise ObservationError(f"observation {key!r}: shape {value.shape} does not hold one vector per row of a "
                               f"batch of {batch}; give (B, n)")
    with np.errstate(over="ignore", invalid="ignore"):  # 1e300 becomes inf here, and is refused below
        value = value.reshape(batch, -1).astype(np.float32)  # what the model reads
    if not np.isfinite(value).all():
        raise ObservationError(f"observation {key!r}: holds NaN or infinity (as float32, whose range ends near "
                               "3.4e38); send the finite state the robot measured")
    return value


def check_actions(actions: np.ndarray) -> np.ndarray:
    """``actions`` if every value is finite; a robot must never be sent NaN or infinity."""
    if not np.isfinite(actions).all():
        rows = sorted({int(i) for i in np.argwhere(~np.isfinite(actions.reshape(len(actions), -1)))[:, 0]})
        raise NonFiniteActionError(
            f"the policy computed NaN or infinite actions (batch rows {rows}); refusing to return them. The "
            "observation passed the checks, so look at the bundle: its weights or normalisation statistics are "
            "not finite, or the state is far outside the range it was trained on")
    return actions
