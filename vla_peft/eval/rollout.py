"""Closed-loop rollouts of a chunking policy in a gymnasium vector environment.

Episode ``j`` always starts from ``seeds[j]``: a slot that finishes is reset with the next
episode's seed (autoreset disabled), so the result of every episode depends only on its seed
and the policy, and two runs with the same seeds give the same rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable
import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, AsyncVectorEnv, SyncVectorEnv
from tqdm import tqdm

from vla_peft.eval.guard import ErrorAsFailure
from vla_peft.eval.keymap import KeyMap, KeyMapError, SlotView, split_infos
from vla_peft.policy.action_queue import ActionQueues
from vla_peft.eval.video import captioned


@dataclass
class Episode:
    index: int
    seed: int
    instruction: str = ""
    success: bool = False
    length: int = 0
    ret: float = 0.0
    error: str | None = None
    frames: list[np.ndarray] | None = None   # captioned video frames (filmed episodes only)
    last_frame: np.ndarray | None = None      # the newest raw frame, re-captioned with the outcome at the end

    def row(self) -> dict:
        return {"episode": self.index, "seed": self.seed, "success": self.success, "length": self.length,
                "return": round(self.ret, 6), "instruction": self.instruction, "error": self.error}


@dataclass
class Timing:
    """Wall-clock measurements (never part of the reproducible results)."""

    chunk_s: list[float] = field(default_factory=list)   # one predict_chunk call each
    action_s: list[float] = field(default_factory=list)  # that call / actions it made that get executed
    slot_step_s: float = 0.0                               # sum over loop iterations of (duration x active slots)
    steps: int = 0                                         # env steps of running episodes
    wall_s: float = 0.0


class EnvMaker:
    """Builds one member env: picklable, so AsyncVectorEnv can start it in a fresh process
    (which imports ``envs`` itself when our tasks are wanted)."""

    def __init__(self, env_id: str, kwargs: dict) -> None:
        self.env_id, self.kwargs = env_id, kwargs

    def __call__(self) -> gym.Env:
        if self.env_id.startswith("vla_peft/"):
            import envs  # noqa: F401  (registers our tasks)
        return ErrorAsFailure(gym.make(self.env_id, **self.kwargs))


def make_vector_env(env_id: str, kwargs: dict, num: int, asynchronous: bool = False):
    """``num`` copies of the env in a vector env; each member reports exceptions as failed episodes.
    Asynchronous members start by spawning (a forked child would inherit the parent's GL state)."""
    makers = [EnvMaker(env_id, kwargs) for _ in range(num)]
    if asynchronous:
        return AsyncVectorEnv(makers, context="spawn", autoreset_mode=AutoresetMode.DISABLED)
    return SyncVectorEnv(makers, autoreset_mode=AutoresetMode.DISABLED)


def run_episodes(
    policy,
    vec,
    seeds: list[int],
    key_map: KeyMap,
    videos: int = 0,
    on_video: Callable[[Episode], None] | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> tuple[list[Episode], Timing]:
    """Run ``len(seeds)`` episodes of ``policy`` (anything with ``predict_chunk`` on a batched
    observation and a ``config`` with the chunking fields) in vector env ``vec``. The first
    ``videos`` episodes are filmed: ``on_video(episode)`` receives each as it ends, with its
    captioned ``frames``, which are dropped afterwards."""
    num = vec.num_envs
    queues = ActionQueues(num, policy.config)
    view = SlotView(vec)
    episodes = [Episode(j, int(s)) for j, s in enumerate(seeds)]
    slot_episode: list[Episode | None] = [None] * num
    next_index = 0
    timing = Timing()
    bar = tqdm(total=len(seeds), desc=desc, disable=not progress, leave=False)
    flag_seen = False

    def finish(slot: int) -> None:
        episode = slot_episode[slot]
        if episode.frames:
            mark = "success" if episode.success else ("error" if episode.error else "failed")
            episode.frames[-1] = captioned(episode.last_frame, episode.instruction, f"step {episode.length}  {mark}")
            if on_video is not None:
                on_video(episode)
            episode.frames, episode.last_frame = None, None
        slot_episode[slot] = None
        bar.update(1)

    def start(slots: list[int]) -> list[int]:
        """Reset ``slots`` into the next episodes (idle slots get reset too: the vector API steps
        every member). Returns the slots whose new episode already failed at reset."""
        nonlocal next_index
        slot_seeds: list[int | None] = [None] * num
        mask = np.zeros(num, dtype=bool)
        for s in slots:
            if next_index < len(episodes):
                slot_episode[s] = episodes[next_index]
                next_index += 1
            slot_seeds[s] = slot_episode[s].seed if slot_episode[s] is not None else int(seeds[-1])
            mask[s] = True
            queues.reset(s)
        obs, info = vec.reset(seed=slot_seeds, options={"reset_mask": mask})
        view.update(obs, split_infos(info, num), slots)
        failed = []
        for s in slots:
            episode = slot_episode[s]
            if episode is None:
                continue
            if "error" in view.infos[s]:
                episode.error = str(view.infos[s]["error"])
                failed.append(s)
                continue
            episode.instruction = key_map.instruction_of(view, s)
            if episode.index < videos:
                episode.frames = []
                record(s)
        return failed

    def record(slot: int) -> None:
        episode = slot_episode[slot]
        episode.last_frame = key_map.frame(view, slot)
        episode.frames.append(captioned(episode.last_frame, episode.instruction, f"step {episode.length}"))

    t_start = time.perf_counter()
    try:
        pending = start(list(range(num)))
        while True:
            for s in pending:
                finish(s)
            if pending:
                pending = start(pending)
                continue
            active = [s for s in range(num) if slot_episode[s] is not None]
            if not active:
                break
            t_iter = time.perf_counter()
            need = [s for s in active if queues.needs_chunk(s)]
            if need:
                batch = key_map.policy_obs(view, need)
                t0 = time.perf_counter()
                chunks = policy.predict_chunk(batch, binarize_gripper=queues.binarize_chunks)
                dt = time.perf_counter() - t0
                timing.chunk_s.append(dt)
                timing.action_s.append(dt / (len(need) * queues.actions_per_chunk))
                for s, chunk in zip(need, chunks):
                    queues.push(s, chunk)
            actions = np.zeros((num, *vec.single_action_space.shape), dtype=vec.single_action_space.dtype)
            for s in active:
                actions[s] = queues.pop(s)
            obs, reward, terminated, truncated, info = vec.step(actions)
            infos = split_infos(info, num)
            view.update(obs, infos, list(range(num)))
            done = []
            for s in range(num):
                episode = slot_episode[s]
                if episode is None:
                    if terminated[s] or truncated[s]:
                        done.append(s)  # an idle slot must be reset before the next step
                    continue
                episode.length += 1
                episode.ret += float(reward[s])
                if "error" in infos[s]:
                    episode.error = str(infos[s]["error"])
                else:
                    flag = key_map.success_of(infos[s], view, s)
                    if flag is None:
                        if not flag_seen:
                            wanted = key_map.success or "info:is_success or info:success"
                            raise KeyMapError(
                                f"the environment reports no success flag {wanted} (its info has {sorted(infos[s])}); "
                                "map the right one with --key-map '{\"success\": \"info:<key>\"}'"
                            )
                    else:
                        flag_seen = True
                        episode.success = episode.success or flag
                if episode.frames is not None:
                    record(s)
                if terminated[s] or truncated[s] or (max_steps is not None and episode.length >= max_steps):
                    finish(s)
                    done.append(s)
            timing.steps += len(active)
            timing.slot_step_s += (time.perf_counter() - t_iter) * len(active)
            if done:
                pending = start(done)
    finally:
        bar.close()
    timing.wall_s = time.perf_counter() - t_start
    return episodes, timing
