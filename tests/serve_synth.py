"""Helpers for the policy-server tests: a folder of tiny bundles, a server on a free loopback
port (in a thread, or as a real `vla-peft serve` subprocess), and observations."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from eval_synth import make_policy
from vla_peft.policy.bundle import save_bundle

LOOPBACK = "127.0.0.1"
TASKS = {"reach": 1, "push": 2, "head": 3}  # task -> seed; "head" has no LoRA
ROOT = Path(__file__).resolve().parents[1]


def write_bank(base_dir, folder: Path) -> Path:
    """Three tiny bundles whose actions differ, laid out as `vla-peft train` writes them."""
    for task, seed in TASKS.items():
        save_bundle(make_policy(base_dir, seed, lora=task != "head"), folder / task / "bundle")
    return folder


class ThresholdEnv(gym.Env):
    """A gymnasium env with the policy's inputs whose success depends on the actions taken: the
    episode succeeds when the first action dimension exceeds a threshold drawn from its seed, so
    success differs between episodes and changes if the actions change."""

    def __init__(self, image_size: int = 32) -> None:
        self.observation_space = spaces.Dict({
            "agentview_rgb": spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "ee_pos": spaces.Box(-1, 1, (3,), np.float32),
            "gripper_states": spaces.Box(-1, 1, (2,), np.float32)})
        self.action_space = spaces.Box(-1, 1, (4,), np.float32)

    def _obs(self):
        return {k: self._rng.integers(0, 256, s.shape, dtype=np.uint8) if k.endswith("_rgb")
                else self._rng.uniform(-0.2, 0.2, s.shape).astype(np.float32)
                for k, s in self.observation_space.spaces.items()}

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self._rng = np.random.default_rng(seed)
        self._threshold = self._rng.uniform(-0.15, 0.15)
        return self._obs(), {"instruction": "reach the red cube", "is_success": False}

    def step(self, action):
        success = bool(action[0] > self._threshold)
        return self._obs(), float(action[0]), success, False, {"instruction": "reach the red cube",
                                                                "is_success": success}


THRESHOLD_ENV = "serve_tests/Threshold-v0"
if THRESHOLD_ENV not in gym.registry:
    gym.register(THRESHOLD_ENV, entry_point=ThresholdEnv, max_episode_steps=4)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def observation(seed: int, image_size: int = 32) -> dict:
    rng = np.random.default_rng(seed)
    return {"agentview_rgb": rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8),
            "ee_pos": rng.uniform(-0.2, 0.2, 3).astype(np.float32),
            "gripper_states": rng.uniform(0, 0.05, 2).astype(np.float32)}


@contextlib.contextmanager
def threaded_server(bank, port: int | None = None, **app_kwargs):
    """The app on uvicorn in a background thread; yields its URL, stops it on exit."""
    from vla_peft.serve.server import create_app

    with serving(create_app(bank, **app_kwargs), port) as url:
        yield url


@contextlib.contextmanager
def serving(app, port: int | None = None):
    """``app`` on uvicorn in a background thread (on ``port``, or a free one); yields its URL."""
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host=LOOPBACK, port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def start_subprocess(bank_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    """`vla-peft serve` as a real process on loopback; returns once /health answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "vla_peft.cli", "serve", "--bank", str(bank_dir),
                             "--host", LOOPBACK, "--port", str(port), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited early: {proc.stdout.read()}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.5):
            return proc
        if time.monotonic() > deadline:
            stop_subprocess(proc)
            raise RuntimeError("the server did not start within 90 s")
        time.sleep(0.1)


def stop_subprocess(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, str]:
    """Send ``sig`` and wait; returns (exit code, output)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out
