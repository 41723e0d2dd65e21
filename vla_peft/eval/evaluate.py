"""Evaluate policies in closed loop: one or many tasks, a summary table, ``eval_info.json``, videos.

``results`` in ``eval_info.json`` depends only on the policies, the environments and the seeds
(two runs give the same bytes); wall-clock figures live apart, under ``timing``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

import gymnasium as gym
import numpy as np

from envs.presets import is_preset, resolve_preset
from vla_peft.eval.keymap import KeyMap, KeyMapError
from vla_peft.eval.metrics import percentiles_ms, wilson_interval
from vla_peft.eval.rollout import Timing, make_vector_env, run_episodes
from vla_peft.eval.video import save_video

FORMAT_VERSION = 1
OUR_PREFIX = "vla_peft/"


@dataclass
class EvalConfig:
    """How to evaluate (the same for every task of a run)."""

    episodes: int = 50
    seed: int = 1000                 # episode j of every task starts from seed + j
    num_envs: int = 1                # vector-env slots stepped together (policy batch up to this)
    videos: int = 0                  # the first N episodes of each task are filmed
    video_format: str = "mp4"        # mp4 or gif
    max_steps: int | None = None     # cap on episode length (default: the env's time limit)
    asynchronous: bool = False       # AsyncVectorEnv (one spawned process per slot; the env id must be
                                     # importable there: our tasks or 'module:Id-v0') instead of SyncVectorEnv
    env: str | None = None           # a benchmark preset (metaworld/reach-v3, libero/libero_spatial/0) for every task
    env_id: str | None = None        # any registered gymnasium id; None: our task of that name
    env_kwargs: dict = field(default_factory=dict)
    key_map: dict = field(default_factory=dict)
    out: str = "runs/eval"
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.episodes > 0, "episodes", "use a positive number such as 50"),
            (self.num_envs > 0, "num_envs", "use 1 or more"),
            (self.videos >= 0, "videos", "use 0 (none) or a positive number"),
            (self.video_format in ("mp4", "gif"), "video_format", "use mp4 or gif"),
            (self.max_steps is None or self.max_steps > 0, "max_steps", "use a positive number or leave it unset"),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise ValueError(f"eval config: {name}={getattr(self, name)!r} is invalid: {fix}")

    @classmethod
    def from_dict(cls, d: dict) -> EvalConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"eval config: unknown key(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


def task_env_id(task: str, env_id: str | None = None) -> str:
    """``Reach`` -> ``vla_peft/Reach-v0`` (our tasks), unless an explicit gymnasium id is given."""
    if env_id:
        return env_id
    if "/" in task or "-v" in task:
        return task
    return f"{OUR_PREFIX}{task}-v0"


def env_kwargs_for(env_id: str, policy_config, given: dict, key_map: KeyMap) -> dict:
    """Our tasks render what the policy reads at its resolution and end at success; other envs
    get exactly ``given`` (plus ``render_mode='rgb_array'`` when the key map uses render)."""
    kwargs = {}
    if env_id.startswith(OUR_PREFIX):
        import envs  # noqa: F401  (registers the tasks)

        kwargs = {"image_size": policy_config.image_size, "cameras": tuple(policy_config.cameras),
                  "terminate_on_success": True}
    kwargs.update(given)
    if key_map.uses_render:
        kwargs.setdefault("render_mode", "rgb_array")
    return kwargs


def evaluate_task(policy, task: str, config: EvalConfig, out: Path) -> tuple[dict, list[dict], dict]:
    """Roll ``policy`` out on ``task``: (summary, per-episode rows, timing)."""
    preset_name = config.env or (task if is_preset(task) else None)
    preset = resolve_preset(preset_name) if preset_name else None
    env_id = preset.env_id if preset else task_env_id(task, config.env_id)
    key_map = KeyMap(config.key_map, list(policy.config.cameras), list(policy.config.state_keys))
    kwargs = env_kwargs_for(env_id, policy.config, {**(preset.kwargs if preset else {}), **config.env_kwargs}, key_map)
    if env_id not in gym.registry and ":" not in env_id:
        raise ValueError(f"no gymnasium environment registered as {env_id!r}; pass a registered id with --env-id "
                         "(or 'module:Id-v0' to import the module that registers it)")
    vec = make_vector_env(env_id, kwargs, min(config.num_envs, config.episodes), asynchronous=config.asynchronous)
    videos: dict[int, str] = {}
    try:
        if config.max_steps is None and _time_limit(vec) is None:
            raise ValueError(f"{env_id} has no time limit (max_episode_steps); pass --max-steps")
        target_hz = _control_hz(vec)

        def write_video(episode) -> None:  # as each filmed episode ends, so frames never pile up
            name = f"videos/{_safe(task)}_ep{episode.index:03d}.{config.video_format}"
            save_video(episode.frames, out / name, fps=int(target_hz or 10))
            videos[episode.index] = name

        seeds = [config.seed + j for j in range(config.episodes)]
        episodes, timing = run_episodes(policy, vec, seeds, key_map, videos=config.videos, on_video=write_video,
                                        max_steps=config.max_steps, progress=config.progress, desc=task)
    finally:
        vec.close()
    rows = [{"task": task, **episode.row(), "video": videos.get(episode.index)} for episode in episodes]
    summary = {"env_id": env_id, **({"preset": preset.name} if preset else {}), **summarise(rows)}
    return summary, rows, _timing_dict(timing, target_hz, config)


def summarise(rows: list[dict]) -> dict:
    """Success rate with its 95% Wilson interval, mean length and return, error count."""
    n = len(rows)
    successes = sum(bool(r["success"]) for r in rows)
    low, high = wilson_interval(successes, n)
    return {
        "episodes": n,
        "successes": successes,
        "success_rate": round(successes / n, 6) if n else 0.0,
        "ci95": [round(low, 6), round(high, 6)],
        "mean_length": round(float(np.mean([r["length"] for r in rows])), 6) if n else 0.0,
        "mean_return": round(float(np.mean([r["return"] for r in rows])), 6) if n else 0.0,
        "errors": sum(r["error"] is not None for r in rows),
    }


def evaluate(tasks: Iterable[str], policy_for: Callable[[str], object], config: EvalConfig,
             described: dict | None = None) -> dict:
    """Evaluate each task with the policy ``policy_for(task)`` gives (a loaded bundle, or the
    bank with that task's bundle activated); write ``eval_info.json`` and videos under
    ``config.out`` and return its content."""
    out = Path(config.out)
    per_task, rows, timing = {}, [], {}
    for task in tasks:
        summary, task_rows, task_timing = evaluate_task(policy_for(task), task, config, out)
        per_task[task], timing[task] = summary, task_timing
        rows.extend(task_rows)
    info = {
        "format_version": FORMAT_VERSION,
        "results": {"per_task": per_task, "overall": summarise(rows), "per_episode": rows},
        "timing": timing,
        "seeds": {"first": config.seed, "episodes": config.episodes,
                  "rule": "episode j of every task is reset with seed first + j"},
        "config": {**dataclasses.asdict(config), **(described or {})},
        "versions": package_versions(),
    }
    write_json_atomic(out / "eval_info.json", info)
    return info


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("vla_peft", "torch", "transformers", "gymnasium", "mujoco", "numpy", "safetensors", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write JSON to a temporary sibling and rename it over ``path``: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=_json_default)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def format_table(info: dict) -> str:
    """One line per task, then the overall line, and each task's latency and control rate."""
    results = info["results"]
    head = f"{'task':<12} {'success':>8} {'95% CI':>15} {'length':>7} {'return':>8} {'errors':>6} " \
           f"{'chunk p50/p95 ms':>17} {'action p50/p95 ms':>18} {'ctrl Hz':>8}"
    lines = [head, "-" * len(head)]

    def line(name: str, s: dict, t: dict | None) -> str:
        ci = f"[{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]"
        text = f"{name:<12} {100 * s['success_rate']:>7.1f}% {ci:>15} {s['mean_length']:>7.1f} " \
               f"{s['mean_return']:>8.2f} {s['errors']:>6}"
        if t:
            chunk, action = t["latency_ms"]["chunk"], t["latency_ms"]["action"]
            text += f" {_pair(chunk):>17} {_pair(action):>18} {t['control_hz']:>8.1f}"
        return text

    for task, summary in results["per_task"].items():
        lines.append(line(task, summary, info["timing"].get(task)))
    if len(results["per_task"]) > 1:
        lines.append(line("all", results["overall"], None))
    return "\n".join(lines)


def _pair(p: dict) -> str:
    return "-" if p["p50"] is None else f"{p['p50']:.1f}/{p['p95']:.1f}"


def _timing_dict(timing: Timing, target_hz: float | None, config: EvalConfig) -> dict:
    return {
        "latency_ms": {"chunk": percentiles_ms(timing.chunk_s), "action": percentiles_ms(timing.action_s)},
        "control_hz": round(timing.steps / timing.slot_step_s, 3) if timing.slot_step_s else 0.0,
        "control_hz_target": target_hz,
        "env_steps": timing.steps,
        "policy_calls": len(timing.chunk_s),
        "wall_s": round(timing.wall_s, 3),
        "num_envs": config.num_envs,
    }


def _time_limit(vec) -> int | None:
    try:
        specs = vec.get_attr("spec")
    except AttributeError:
        return None
    limits = [s.max_episode_steps for s in specs if s is not None]
    return limits[0] if limits else None


def _control_hz(vec) -> float | None:
    """The env's control rate (every member is wrapped in ErrorAsFailure, which answers None
    for an env without ``control_hz``), else its ``render_fps``, else None."""
    hz = vec.get_attr("control_hz")[0]
    if hz is None:
        hz = (vec.metadata or {}).get("render_fps")
    return float(hz) if hz else None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to eval_info.json")


__all__ = ["EvalConfig", "KeyMapError", "evaluate", "evaluate_task", "format_table", "summarise"]
