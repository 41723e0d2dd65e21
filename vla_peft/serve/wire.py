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

import numpy as np

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


def decode_array(value, name: str) -> np.ndarray:
    """The array a request field carries (encoded dict, image file, or list of numbers)."""
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
        return _decode_image_file(raw, value["format"], name)
    dtype, shape = value.get("dtype"), value.get("shape")
    if dtype not in DTYPES:
        raise RequestError(f"observation {name!r}: dtype {dtype!r} is not accepted; use one of {DTYPES}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape) or len(shape) > 4:
        raise RequestError(f"observation {name!r}: 'shape' must be a list of at most 4 non-negative integers")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise RequestError(f"observation {name!r}: {len(raw)} bytes of data do not fill shape {shape} of {dtype} "
                           f"({expected} bytes)")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _decode_image_file(raw: bytes, fmt, name: str) -> np.ndarray:
    if fmt not in IMAGE_FORMATS:
        raise RequestError(f"observation {name!r}: image format {fmt!r} is not accepted; use one of {IMAGE_FORMATS}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format.lower() not in ("png", "jpeg"):
                raise RequestError(f"observation {name!r}: the data is a {image.format} file, not {fmt}")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError):
        raise RequestError(f"observation {name!r}: the data is not a readable {fmt} image") from None


def parse_act(body, config) -> tuple[dict, bool | None]:
    """A decoded ``act`` body -> (one observation as ``predict_chunk`` takes it, binarize_gripper),
    checked against the task's policy config (cameras, image size and dtype, state sizes)."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    missing = [k for k in ("observation", "instruction") if k not in body]
    if missing:
        raise RequestError(f"missing field(s) {missing}: an act request needs 'task', 'observation' and 'instruction'")
    observation, instruction = body["observation"], body["instruction"]
    if not isinstance(observation, dict):
        raise RequestError("'observation' must be an object of named arrays")
    if not isinstance(instruction, str) or not instruction:
        raise RequestError("'instruction' must be a non-empty string")
    binarize = body.get("binarize_gripper")
    if binarize is not None and not isinstance(binarize, bool):
        raise RequestError("'binarize_gripper' must be true, false or null")
    obs = {"instruction": instruction}
    size = config.image_size
    for camera in config.cameras:
        key = f"{camera}_rgb"
        if key not in observation:
            raise RequestError(f"missing field observation.{key}: this task's policy reads cameras {config.cameras}")
        image = decode_array(observation[key], key)
        if image.dtype != np.uint8:
            raise RequestError(f"observation {key!r}: images must be uint8, got {image.dtype}; send the camera frame "
                               "unchanged (0..255)")
        if image.shape != (size, size, 3):
            raise RequestError(f"observation {key!r}: image shape {tuple(image.shape)} is wrong; this task's policy "
                               f"expects ({size}, {size}, 3)")
        obs[key] = image
    for key in config.state_keys:
        if key not in observation:
            raise RequestError(f"missing field observation.{key}: this task's policy reads state {config.state_keys}")
        value = decode_array(observation[key], key)
        if value.dtype == np.uint8 or value.ndim > 1:
            raise RequestError(f"observation {key!r}: state must be a 1-D vector of numbers, got {value.dtype} "
                               f"{tuple(value.shape)}")
        if not np.all(np.isfinite(value)):
            raise RequestError(f"observation {key!r}: holds NaN or infinity")
        obs[key] = value.astype(np.float32)
    total = sum(obs[k].size for k in config.state_keys)
    if total != config.state_dim:
        raise RequestError(f"the state {config.state_keys} has {total} values in all, but this task's policy "
                           f"expects state_dim={config.state_dim}")
    return obs, binarize


def encode_observation(obs: dict, cameras: list[str], state_keys: list[str], image_format: str = "raw") -> dict:
    """An environment observation (one step, unbatched) -> the ``observation`` field of ``act``."""
    out = {}
    for camera in cameras:
        out[f"{camera}_rgb"] = encode_image(np.asarray(obs[f"{camera}_rgb"]), image_format)
    for key in state_keys:
        out[key] = encode_array(np.asarray(obs[key], dtype=np.float32).reshape(-1))
    return out
