"""Collect scripted-expert demonstrations from the MuJoCo tasks into one HDF5 file.

Episode i is reset with seed `seed + i`; episodes are written in seed order whatever the
number of workers, so the same command always writes the same file. The seed is stored with
each demo, so replaying its actions from that seed reproduces it.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vla_peft.data.hdf5 import DemoWriter, Episode

_worker_env = _worker_config = None  # one environment per worker process, built once


@dataclass
class CollectConfig:
    task: str
    episodes: int
    out: str
    image_size: int = 96
    cameras: tuple[str, ...] = ("agentview", "wrist")
    seed: int = 0
    workers: int = 1
    keep_failed: bool = False
    max_attempts: int | None = None  # default: 3 x episodes (+ 10)
    play: bool = False  # undirected play instead of the expert: frames for grounding targets only
    max_steps: int | None = None  # cut each episode after this many steps (default: the task's limit)
    # DART-style noise injection: the executed move is the expert's plus Gaussian noise of this std (in
    # action units, the gripper left alone); the recorded action stays the expert's clean one, so the
    # demonstrations show the expert correcting drifts a policy's own errors cause. 0: no noise.
    action_noise: float = 0.0
    # Steps recorded after the first success, the expert still acting (PickPlace: its open fingers,
    # still over the pad), kept only if the episode is still a success at its last step. A
    # demonstration cut at its success holds the move that ended it once: PickPlace's opening over the
    # pad was one frame in ~45, and its policies learned to hold the cube over the pad. 0: cut at success.
    after_success: int = 0


def make_env(task: str, image_size: int, cameras: tuple[str, ...], terminate_on_success: bool = True):
    """Our task ``Reach`` (or its full id), or a benchmark preset such as ``metaworld/reach-v3``."""
    import gymnasium as gym

    import envs  # noqa: F401  (registers the tasks)
    from envs.presets import is_preset, resolve_preset

    kwargs = {}
    if is_preset(task):
        preset = resolve_preset(task)
        env_id, kwargs = preset.env_id, preset.kwargs
    else:
        env_id = task if "/" in task else f"vla_peft/{task}-v0"
    if env_id not in gym.registry:
        known = sorted(name for name in gym.registry if name.startswith("vla_peft/"))
        raise ValueError(f"unknown task {task!r}; available: {known}, or a preset such as metaworld/reach-v3")
    return gym.make(env_id, **kwargs, image_size=image_size, cameras=tuple(cameras),
                    terminate_on_success=terminate_on_success)


def executed_noise(seed: int, action_noise: float, action_dim: int):
    """The noise added to the executed moves of the episode from ``seed``: a generator of its own,
    so that ``replay`` draws the same noise again."""
    rng = np.random.default_rng([seed, 0xDA27])
    while True:
        noise = np.zeros(action_dim, np.float32)
        noise[:3] = rng.normal(0.0, action_noise, 3)
        yield noise


def executed_moves(seed: int, action_noise: float, action_dim: int):
    """action -> the move executed for it in the episode from ``seed`` (the action itself without noise)."""
    if not action_noise:
        return lambda action: action
    noise = executed_noise(seed, action_noise, action_dim)
    return lambda action: np.clip(action + next(noise), -1.0, 1.0)


def run_episode(env, seed: int, play: bool = False, max_steps: int | None = None,
                action_noise: float = 0.0, after_success: int = 0) -> tuple[Episode, bool]:
    """Roll the scripted expert (or play) out from `seed` until success (and ``after_success`` steps
    more, on an env that does not end at success) or the step limit, the executed moves perturbed by
    ``action_noise`` (see CollectConfig)."""
    import envs

    expert = envs.make_expert(env, play=play)
    executed = executed_moves(seed, action_noise, env.action_space.shape[0])
    obs, info = env.reset(seed=seed)
    observations: dict[str, list] = {}
    actions, rewards, dones = [], [], []
    success_at = None  # steps recorded when the first success came
    while max_steps is None or len(actions) < max_steps:
        action = np.asarray(expert(obs), dtype=np.float32)
        # the privileged task positions ride along as observations, for training-only targets
        for key, value in {**obs, **env.unwrapped.task_positions()}.items():
            observations.setdefault(key, []).append(value)
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(executed(action))
        success = bool(info["is_success"])
        rewards.append(reward)
        dones.append(terminated or truncated or success)
        if success and success_at is None:
            success_at = len(actions)
        if terminated or truncated or (success_at is not None and len(actions) - success_at >= after_success):
            break
    else:
        dones[-1] = 1
    episode = Episode(
        actions=np.stack(actions),
        obs={key: np.stack(values) for key, values in observations.items()},
        instruction=info["instruction"],
        rewards=np.asarray(rewards, np.float32),
        dones=np.asarray(dones, np.uint8),
        attrs={"seed": seed, "success": success, **({"action_noise": action_noise} if action_noise else {})},
    )
    return episode, success


def _init_worker(config: CollectConfig) -> None:
    """Workers leave Ctrl-C and `kill` to the parent, which tears the pool down."""
    global _worker_env, _worker_config
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_env, _worker_config = make_env(config.task, config.image_size, config.cameras, not config.after_success), config


def _worker_episode(seed: int) -> tuple[Episode, bool]:
    config = _worker_config
    return run_episode(_worker_env, seed, config.play, config.max_steps, config.action_noise, config.after_success)


def env_args_for(env, config: CollectConfig) -> dict:
    """The `env_args` attribute: enough to rebuild the environment the demos came from."""
    import envs
    import vla_peft

    base = env.unwrapped
    return {
        "env_name": config.task if "/" in config.task else env.spec.id,  # a preset's name rebuilds its task
        "expert": "play" if config.play else "scripted",
        "type": "vla_peft",
        "env_kwargs": {"image_size": config.image_size, "cameras": list(config.cameras)},
        "task_name": base.task_name,
        "image_size": config.image_size,
        "control_hz": base.control_hz,
        "camera_names": list(base.camera_names),
        "action_dim": int(env.action_space.shape[0]),
        "max_episode_steps": env.spec.max_episode_steps,
        "gl_renderer": envs.gl_renderer_name(),
        "toolkit_version": vla_peft.__version__,
    }


def collect(config: CollectConfig, progress: bool = True) -> dict:
    """Write `config.episodes` kept episodes to `config.out`; return a summary dict.

    Tries seeds seed, seed+1, ... until enough episodes are kept or `max_attempts` runs out.
    """
    if config.episodes < 1:
        raise ValueError(f"--episodes must be at least 1, got {config.episodes}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"--max-steps must be at least 1, got {config.max_steps}")
    if not 0.0 <= config.action_noise <= 1.0:
        raise ValueError(f"--action-noise must be a std in [0, 1] action units (e.g. 0.2), got {config.action_noise}")
    if config.after_success < 0:
        raise ValueError(f"--after-success must be a number of steps >= 0, got {config.after_success}")
    attempts_allowed = config.max_attempts or 3 * config.episodes + 10
    seeds = range(config.seed, config.seed + attempts_allowed)
    start = time.perf_counter()
    env = make_env(config.task, config.image_size, config.cameras, not config.after_success)
    attempts = successes = 0
    bar = tqdm(total=config.episodes, desc=f"collect {config.task}", unit="episode", disable=not progress)
    pool = None
    try:
        with DemoWriter(config.out, env_args_for(env, config)) as writer:
            if config.workers > 1:
                env.close()
                # spawn, not fork: a forked child can inherit a lock held by a GL or BLAS thread and hang
                pool = multiprocessing.get_context("spawn").Pool(config.workers, _init_worker, (config,))
                results = pool.imap(_worker_episode, seeds)
            else:
                results = (run_episode(env, seed, config.play, config.max_steps, config.action_noise, config.after_success)
                           for seed in seeds)
            for episode, success in results:
                attempts += 1
                successes += success
                if success or config.keep_failed or config.play:
                    writer.add(episode)
                    bar.update(1)
                bar.set_postfix(success=f"{successes / attempts:.0%}")
                if writer.num_episodes == config.episodes:
                    break
            kept, frames = writer.num_episodes, writer.num_frames
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        env.close()
    seconds = time.perf_counter() - start
    size = Path(config.out).stat().st_size
    return {
        "out": str(config.out),
        "play": config.play,
        "episodes_kept": kept,
        "episodes_tried": attempts,
        "success_rate": successes / attempts,
        "frames": frames,
        "bytes": size,
        "bytes_per_frame": size / frames,
        "seconds": seconds,
    }


def format_summary(summary: dict) -> str:
    return (
        f"kept {summary['episodes_kept']} of {summary['episodes_tried']} episodes "
        f"({'play' if summary.get('play') else 'expert'} success {summary['success_rate']:.1%}), {summary['frames']} frames, "
        f"{summary['bytes'] / 1e6:.1f} MB ({summary['bytes_per_frame'] / 1e3:.1f} kB/frame), "
        f"{summary['seconds']:.1f} s -> {summary['out']}"
    )


def replay(path: str | Path, demo: str) -> dict:
    """Re-run a stored demo's actions from its seed in a fresh environment.

    Returns the final success and the largest gap between replayed and stored `ee_pos`:
    zero when observations and actions were recorded in step.
    """
    from vla_peft.data.hdf5 import DemoFile

    with DemoFile(path) as demo_file:
        env_args = demo_file.env_args
        episode = demo_file.episode(demo)
    kwargs = env_args["env_kwargs"]
    # the stored actions run to their end, past a success (demos recorded with after_success)
    env = make_env(env_args["env_name"], kwargs["image_size"], tuple(kwargs["cameras"]), terminate_on_success=False)
    seed, action_noise = int(episode.attrs["seed"]), float(episode.attrs.get("action_noise", 0.0))
    executed = executed_moves(seed, action_noise, episode.actions.shape[1])
    try:
        obs, info = env.reset(seed=seed)
        gap = 0.0
        for t, action in enumerate(episode.actions):
            gap = max(gap, float(np.abs(obs["ee_pos"] - episode.obs["ee_pos"][t]).max()))
            obs, _, terminated, truncated, info = env.step(executed(action))
    finally:
        env.close()
    return {"success": bool(info["is_success"]), "steps": len(episode), "ee_pos_gap": gap}
