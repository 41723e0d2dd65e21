"""The policy server's wire format: JSON bodies, arrays as base64 of their raw bytes.

An array travels as ``{"dtype": "uint8", "shape": [H, W, 3], "data": "<base64 of the C-order
bytes>"}`` (binary-safe, exact, no pickle), a camera image may instead be
``{"format": "png" | "jpeg", "data": "<base64 of the file>"}``, and a state vector may be a
plain JSON list of numbers. Both sides use these functions, so what the client sends is what
the server checks.

An ``act`` request::

    {"task": "reach", "id": "any tag echoed back",
     "observation": {"agentview_rgb": <image>, "ee_pos": <array>, "gripper_states": <array>},
     "instruction": "reach the red cube", "binarize_gripper": null}
"""

from __future__ import annotations

import base64
import binascii
import io
import math

import numpy as np

from vla_peft.policy.observation import MAX_INSTRUCTION_CHARS

DTYPES = ("uint8", "float32", "float64", "int32", "int64")  # what a request may carry
IMAGE_FORMATS = ("png", "jpeg")


class RequestError(ValueError):
    """A request the server cannot act on; the message names the problem and the fix (a 4xx)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def encode_array(array: np.ndarray) -> dict:
    """``array`` as a JSON-safe dict (raw bytes, base64)."""
    array = np.ascontiguousarray(array)
    if array.dtype.name not in DTYPES:
        raise ValueError(f"cannot send dtype {array.dtype}; use one of {DTYPES}")
    return {"dtype": array.dtype.name, "shape": list(array.shape),
            "data": base64.b64encode(array.tobytes()).decode("ascii")}


def encode_image(image: np.ndarray, fmt: str = "raw") -> dict:
    """A uint8 (H, W, 3) frame as raw bytes (exact, the default) or as a PNG/JPEG file."""
    if fmt == "raw":
        return encode_array(image)
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"image format {fmt!r} is unknown: use 'raw' or one of {IMAGE_FORMATS}")
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format=fmt.upper())
    return {"format": fmt, "data": base64.b64encode(buffer.getvalue()).decode("ascii")}


def decode_array(value, name: str, image_size: int | None = None) -> np.ndarray:
    """The array a request field carries (encoded dict, image file, or list of numbers). An image
    file whose header is not ``image_size`` square is refused before it is decoded."""
    if isinstance(value, list):
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise RequestError(f"observation {name!r}: a list must hold numbers only") from None
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise RequestError(f"observation {name!r}: expected {{'dtype', 'shape', 'data'}} (base64 raw bytes), "
                           "{'format': 'png'|'jpeg', 'data'}, or a list of numbers")
    try:
        raw = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"observation {name!r}: 'data' is not valid base64") from None
    if "format" in value:
        return _decode_image_file(raw, value["format"], name, image_size)
    dtype, shape = value.get("dtype"), value.get("shape")
    if dtype not in DTYPES:
        raise RequestError(f"observation {name!r}: dtype {dtype!r} is not accepted; use one of {DTYPES}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 4:
        raise RequestError(f"observation {name!r}: 'shape' must be a list of at most 4 non-negative integers")
    expected = math.prod(shape) * np.dtype(dtype).itemsize  # Python integers: no overflow at any shape
    if len(raw) != expected:
        raise RequestError(f"observation {name!r}: {len(raw)} bytes of data do not fill shape {shape} of {dtype} "
                           f"({expected} bytes)")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _decode_image_file(raw: bytes, fmt, name: str, image_size: int | None) -> np.ndarray:
    if fmt not in IMAGE_FORMATS:
        raise RequestError(f"observation {name!r}: image format {fmt!r} is not accepted; use one of {IMAGE_FORMATS}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:  # reads the header only
            if image.format.lower() not in ("png", "jpeg"):
                raise RequestError(f"observation {name!r}: the data is a {image.format} file, not {fmt}")
            width, height = image.size
            if image_size is not None and (width, height) != (image_size, image_size):
                raise RequestError(
                    f"observation {name!r}: the {fmt} image is {height}x{width} but this task's policy expects "
                    f"{image_size}x{image_size} (read from the file's header; it was not decoded): send frames at "
                    "the policy's resolution")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise RequestError(f"observation {name!r}: the data is not a readable {fmt} image") from None


def parse_act(body, policy, max_instruction_chars: int = MAX_INSTRUCTION_CHARS) -> tuple[dict, bool | None]:
    """A decoded ``act`` body -> (one observation as ``predict_chunk`` takes it, binarize_gripper),
    decoded here and checked by the policy's own observation check (``vla_peft.policy.observation``:
    cameras, image size and dtype, state keys and sizes, finite values, the instruction)."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    missing = [k for k in ("observation", "instruction") if k not in body]
    if missing:
        raise RequestError(f"missing field(s) {missing}: an act request needs 'task', 'observation' and 'instruction'")
    observation = body["observation"]
    if not isinstance(observation, dict):
        raise RequestError("'observation' must be an object of named arrays")
    binarize = body.get("binarize_gripper")
    if binarize is not None and not isinstance(binarize, bool):
        raise RequestError("'binarize_gripper' must be true, false or null")
    config = policy.config
    obs = {"instruction": body["instruction"]}
    images = [f"{camera}_rgb" for camera in config.cameras]
    for key in [*images, *config.state_keys]:  # only what the policy reads; a missing one is named below
        if key in observation:
            obs[key] = decode_array(observation[key], key, config.image_size if key in images else None)
    checked, _ = policy.check_observation(obs, max_instruction_chars)
    return {key: value[0] for key, value in checked.items()}, binarize


def encode_observation(obs: dict, cameras: list[str], state_keys: list[str], image_format: str = "raw") -> dict:
    """An environment observation (one step, unbatched) -> the ``observation`` field of ``act``."""
    out = {}
    for camera in cameras:
        out[f"{camera}_rgb"] = encode_image(np.asarray(obs[f"{camera}_rgb"]), image_format)
    for key in state_keys:
        out[key] = encode_array(np.asarray(obs[key], dtype=np.float32).reshape(-1))
    return out
