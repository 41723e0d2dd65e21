"""Where the policy's inputs come from in an environment that did not choose our names.

A key map is ``{policy name: source}``. Policy names are the observation keys a policy
reads (``agentview_rgb``, ``ee_pos``, ...) plus ``instruction``, ``success`` and ``video``
(the frame recorded in videos). A source is one of

    obs:<key>          an observation entry (``obs:`` may be left out); ``a/b`` reaches into
                       nested dict observations; ``[i:j]`` slices the last axis (``obs:state[0:3]``);
                       ``obs`` alone is the whole observation (envs whose observation is one array)
    info:<key>         an entry of the ``info`` dict of the last reset/step
    attr:<name>        an attribute of the environment (``env.unwrapped.<name>`` via gymnasium)
    render             ``env.render()`` (the env is made with ``render_mode="rgb_array"``)
    text:<words>       a fixed string, for environments that carry no instruction

Names the map leaves out are read unchanged from the observation; ``instruction`` defaults
to ``info:instruction``, ``success`` to ``info:is_success`` (else ``info:success``), and
``video`` to the first camera's source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

KINDS = ("obs", "info", "attr", "render", "text")
_SLICE = re.compile(r"^(.*)\[(-?\d*):(-?\d*)\]$")


class KeyMapError(ValueError):
    """A key map that does not fit the environment or the policy."""


@dataclass(frozen=True)
class Source:
    kind: str
    key: str = ""
    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, text: str, name: str) -> Source:
        if not isinstance(text, str) or not text:
            raise KeyMapError(f"key map entry {name!r}: the source must be a non-empty string (got {text!r})")
        if text in ("render", "obs"):
            return cls(text)
        kind, sep, rest = text.partition(":")
        if text.startswith("obs["):  # the whole (array) observation, sliced
            kind, rest = "obs", text[3:]
        elif not sep or kind not in KINDS:
            kind, rest = "obs", text
        if kind == "text":
            return cls("text", rest)
        start = stop = None
        match = _SLICE.match(rest)
        if match:
            rest = match.group(1)
            start = int(match.group(2)) if match.group(2) else None
            stop = int(match.group(3)) if match.group(3) else None
        if not rest and not (kind == "obs" and match):
            raise KeyMapError(f"key map entry {name!r}: source {text!r} names no key; write e.g. 'obs:pixels'")
        return cls(kind, rest, start, stop)

    def __str__(self) -> str:
        cut = "" if self.start is None and self.stop is None else f"[{self.start or ''}:{self.stop or ''}]"
        if self.kind == "render":
            return "render"
        if self.kind == "obs" and not self.key:
            return f"obs{cut}"
        return f"{self.kind}:{self.key}{cut}"


class KeyMap:
    """Reads a policy observation (batched over vector-env slots) from env outputs."""

    def __init__(self, mapping: dict[str, str] | None, cameras: list[str], state_keys: list[str]) -> None:
        mapping = dict(mapping or {})
        self.images = {f"{c}_rgb": Source.parse(mapping.pop(f"{c}_rgb", f"obs:{c}_rgb"), f"{c}_rgb") for c in cameras}
        self.state = {k: Source.parse(mapping.pop(k, f"obs:{k}"), k) for k in state_keys}
        self.instruction = Source.parse(mapping.pop("instruction", "info:instruction"), "instruction")
        success = mapping.pop("success", None)
        self.success = Source.parse(success, "success") if success is not None else None
        first_camera = next(iter(self.images.values()))
        self.video = Source.parse(mapping.pop("video"), "video") if "video" in mapping else first_camera
        if mapping:
            known = [*self.images, *self.state, "instruction", "success", "video"]
            raise KeyMapError(f"key map names {sorted(mapping)}, which the policy does not read; it reads {known}")
        if self.success is not None and self.success.kind not in ("info", "attr"):
            raise KeyMapError(f"key map entry 'success' must come from info: or attr: (got {self.success})")

    @property
    def uses_render(self) -> bool:
        return any(s.kind == "render" for s in (*self.images.values(), *self.state.values(), self.video))

    def to_dict(self) -> dict[str, str]:
        out = {**{k: str(s) for k, s in self.images.items()}, **{k: str(s) for k, s in self.state.items()}}
        out["instruction"] = str(self.instruction)
        out["success"] = str(self.success) if self.success is not None else "info:is_success|info:success"
        out["video"] = str(self.video)
        return out

    # ------------------------------------------------------------------ reading
    def read(self, source: Source, name: str, slot: int, view: SlotView):
        """The value of ``source`` for vector-env slot ``slot``."""
        if source.kind == "text":
            return source.key
        if source.kind == "render":
            value = view.render(slot)
        elif source.kind == "attr":
            value = view.attr(source.key, slot)
        elif source.kind == "info":
            info = view.infos[slot]
            if source.key not in info:
                raise KeyMapError(
                    f"key map: {name!r} comes from info[{source.key!r}], but the env's info has {sorted(info)}; "
                    f"fix the key map entry for {name!r}"
                )
            value = info[source.key]
        else:
            value = view.obs
            path = source.key.split("/") if source.key else []
            for depth, part in enumerate(path):
                if not isinstance(value, dict) or part not in value:
                    have = sorted(value) if isinstance(value, dict) else type(value).__name__
                    raise KeyMapError(
                        f"key map: {name!r} comes from observation {'/'.join(path[:depth + 1])!r}, which the env "
                        f"does not have (it has {have}); pass --key-map '{{\"{name}\": \"obs:<its key>\"}}'"
                    )
                value = value[part]
            value = value[slot]
        if source.start is not None or source.stop is not None:
            value = np.asarray(value)[..., source.start:source.stop]
        return value

    def policy_obs(self, view: SlotView, slots: list[int]) -> dict:
        """The batched observation a policy's ``predict_chunk`` takes, for ``slots``."""
        obs = {}
        for name, source in {**self.images, **self.state}.items():
            obs[name] = np.stack([np.asarray(self.read(source, name, s, view)) for s in slots])
        for name in self.images:
            if obs[name].ndim != 4 or obs[name].shape[-1] != 3:
                raise KeyMapError(
                    f"key map: {name!r} must be an RGB image (H, W, 3) but its source gives shape "
                    f"{obs[name].shape[1:]}; map {name!r} to the image observation or to 'render'"
                )
        obs["instruction"] = [self.instruction_of(view, s) for s in slots]
        return obs

    def instruction_of(self, view: SlotView, slot: int) -> str:
        return str(self.read(self.instruction, "instruction", slot, view))

    def frame(self, view: SlotView, slot: int) -> np.ndarray:
        return np.asarray(self.read(self.video, "video", slot, view))

    def success_of(self, info: dict, view: SlotView, slot: int) -> bool | None:
        """The step's success flag, or None when the env reports none."""
        if self.success is None:
            for key in ("is_success", "success"):
                if key in info:
                    return bool(info[key])
            return None
        if self.success.kind == "attr":
            return bool(view.attr(self.success.key, slot))
        return bool(info[self.success.key]) if self.success.key in info else None


class SlotView:
    """The latest observation and per-slot info of a vector env, plus lazy render/attr access."""

    def __init__(self, vec) -> None:
        self.vec = vec
        self.obs = None
        self.infos: list[dict] = [{} for _ in range(vec.num_envs)]
        self._cache: dict[str, tuple] = {}

    def update(self, obs, infos: list[dict], slots: list[int]) -> None:
        self.obs = obs
        for s in slots:
            self.infos[s] = infos[s]
        self._cache.clear()

    def render(self, slot: int) -> np.ndarray:
        if "render" not in self._cache:
            frames = self.vec.render()
            if frames is None or any(f is None for f in frames):
                raise KeyMapError("key map uses 'render' but env.render() returned None; the env must support render_mode='rgb_array'")
            self._cache["render"] = tuple(frames)
        return self._cache["render"][slot]

    def attr(self, name: str, slot: int):
        key = f"attr:{name}"
        if key not in self._cache:
            try:
                self._cache[key] = tuple(self.vec.get_attr(name))
            except AttributeError:
                raise KeyMapError(f"key map reads attribute {name!r}, which the environment does not have") from None
        return self._cache[key][slot]


def split_infos(infos: dict, num: int) -> list[dict]:
    """Gymnasium vector infos (dict of arrays with ``_key`` masks) -> one plain dict per slot."""
    out: list[dict] = [{} for _ in range(num)]
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        mask = infos.get(f"_{key}", np.ones(num, dtype=bool))
        parts = split_infos(value, num) if isinstance(value, dict) else None
        for s in range(num):
            if mask[s]:
                out[s][key] = parts[s] if parts is not None else value[s]
    return out
