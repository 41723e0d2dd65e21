"""Closed-loop evaluation: reproducible results, any gymnasium env through a key map, crashing
envs recorded as failures, multi-task runs on an AdapterBank, the Wilson interval."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from eval_synth import make_policy, one_torch_thread
from vla_peft.cli import main
from vla_peft.eval import EvalConfig, KeyMap, KeyMapError, evaluate, wilson_interval
from vla_peft.policy.bundle import load_bundle, save_bundle

THIRD_PARTY = "thirdparty/Lift-v0"
KEY_MAP = {
    "agentview_rgb": "obs:pixels",
    "ee_pos": "obs:proprio/state[0:3]",
    "gripper_states": "obs:proprio/state[4:6]",
    "instruction": "attr:goal_text",
    "video": "render",
}


class LiftEnv(gym.Env):
    """A third-party-style env: other observation names, state nested one level down, the
    instruction as an attribute, ``info["success"]`` (not ``is_success``). Its reward is the
    first action component, so the return shows which policy acted. ``crash_seeds`` maps a
    seed to the step at which ``step`` raises (0: ``reset`` raises)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 5}

    def __init__(self, render_mode=None, crash_seeds=None):
        self.render_mode = render_mode
        self.crash_seeds = {int(k): v for k, v in (crash_seeds or {}).items()}
        self.observation_space = spaces.Dict({
            "pixels": spaces.Box(0, 255, (32, 32, 3), np.uint8),
            "proprio": spaces.Dict({"state": spaces.Box(-1, 1, (6,), np.float32)}),
        })
        self.action_space = spaces.Box(-1, 1, (4,), np.float32)
        self.goal_text = ""

    def _obs(self):
        return {"pixels": self.np_random.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                "proprio": {"state": self.np_random.uniform(-1, 1, 6).astype(np.float32)}}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.seed_, self.t = seed, 0
        if self.crash_seeds.get(seed) == 0:
            raise RuntimeError(f"simulator failed to load scene {seed}")
        self.goal_text = f"lift block {seed}"
        return self._obs(), {}

    def step(self, action):
        assert np.asarray(action).shape == (4,)
        self.t += 1
        if self.crash_seeds.get(self.seed_) == self.t:
            raise FloatingPointError("simulated physics blow-up")
        success = self.seed_ % 2 == 0 and self.t >= 3
        return self._obs(), float(action[0]), bool(success), False, {"success": success}

    def render(self):
        return np.full((32, 32, 3), 128, np.uint8)


if THIRD_PARTY not in gym.registry:
    gym.register(THIRD_PARTY, entry_point=LiftEnv, max_episode_steps=6)


one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def bundles(tiny_llava_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_bundles")
    return {name: save_bundle(make_policy(tiny_llava_dir, seed), root / name) for name, seed in (("A", 1), ("B", 2))}


def config(out, **kw) -> EvalConfig:
    return EvalConfig(**{"episodes": 4, "seed": 1000, "num_envs": 2, "out": str(out), "progress": False, **kw})


def test_wilson_interval_matches_published_values():
    # reference values: scipy.stats.binomtest(k, n).proportion_ci(method="wilson")
    known = {(0, 10): (0.0, 0.27753279986288926), (5, 10): (0.236593090512564, 0.7634069094874361),
             (8, 10): (0.4901624715366418, 0.9433178485456248), (10, 10): (0.7224672001371109, 1.0),
             (1, 50): (0.0035392592716462223, 0.10495443589637814), (81, 263): (0.2552885198782742, 0.36620957698280004)}
    for (k, n), (low, high) in known.items():
        assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-12)


def test_same_bundle_and_seeds_give_identical_results_on_our_task(bundles, tmp_path):
    infos = []
    for run in ("first", "second"):
        out = tmp_path / run
        argv = ["eval", "--bundle", str(bundles["A"]), "--task", "Reach", "--episodes", "3", "--seed", "1000",
                "--num-envs", "2", "--max-steps", "6", "--videos", "1", "--out", str(out), "--no-progress"]
        assert main(argv) == 0
        infos.append(json.loads((out / "eval_info.json").read_text()))
    first, second = infos
    assert first["results"] == second["results"]
    rows = first["results"]["per_episode"]
    assert [r["seed"] for r in rows] == [1000, 1001, 1002]
    assert all(r["length"] == 6 and r["error"] is None for r in rows)
    assert (tmp_path / "first" / rows[0]["video"]).stat().st_size > 0 and rows[1]["video"] is None
    summary = first["results"]["per_task"]["Reach"]
    assert summary["env_id"] == "vla_peft/Reach-v0" and summary["episodes"] == 3
    timing = first["timing"]["Reach"]
    assert timing["latency_ms"]["chunk"]["p50"] > 0 and timing["control_hz"] > 0
    assert {"torch", "gymnasium", "mujoco"} <= set(first["versions"])


def test_third_party_env_through_the_key_map(bundles, tmp_path):
    argv = ["eval", "--bundle", str(bundles["A"]), "--env-id", THIRD_PARTY, "--key-map", json.dumps(KEY_MAP),
            "--episodes", "4", "--seed", "1000", "--num-envs", "2", "--videos", "1", "--video-format", "gif",
            "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    info = json.loads((tmp_path / "eval_info.json").read_text())
    rows = info["results"]["per_episode"]
    assert [r["instruction"] for r in rows] == [f"lift block {s}" for s in range(1000, 1004)]
    assert [r["success"] for r in rows] == [True, False, True, False]  # even seeds succeed at step 3
    assert [r["length"] for r in rows] == [3, 6, 3, 6]
    summary = info["results"]["per_task"][THIRD_PARTY]
    assert summary["successes"] == 2 and summary["ci95"] == pytest.approx(wilson_interval(2, 4), abs=1e-6)
    assert (tmp_path / rows[0]["video"]).suffix == ".gif"

    # the same episode rolled out by hand: the key map fed the policy the env's pixels, state and instruction
    policy, env = load_bundle(bundles["A"]), gym.make(THIRD_PARTY)
    obs, _ = env.reset(seed=1001)
    total = 0.0
    for t in range(6):
        if t % 2 == 0:  # execute_steps = 2
            state = obs["proprio"]["state"]
            chunk = policy.predict_chunk({"agentview_rgb": obs["pixels"], "ee_pos": state[0:3],
                                          "gripper_states": state[4:6], "instruction": env.unwrapped.goal_text})
        obs, reward, *_ = env.step(chunk[t % 2])
        total += reward
    assert rows[1]["return"] == pytest.approx(total, abs=1e-4)


def test_env_that_raises_is_a_failed_episode_and_evaluation_goes_on(bundles, tmp_path):
    policy = load_bundle(bundles["A"])
    crash = {"1001": 2, "1002": 0}  # 1001 raises in its 2nd step, 1002 already in reset
    info = evaluate([THIRD_PARTY], lambda _: policy,
                    config(tmp_path, env_id=THIRD_PARTY, key_map=KEY_MAP, env_kwargs={"crash_seeds": crash}))
    rows = info["results"]["per_episode"]
    assert len(rows) == 4
    assert rows[1]["success"] is False and rows[1]["length"] == 2
    assert rows[1]["error"] == "step: FloatingPointError: simulated physics blow-up"
    assert rows[2]["success"] is False and rows[2]["length"] == 0
    assert rows[2]["error"] == "reset: RuntimeError: simulator failed to load scene 1002"
    assert rows[0]["error"] is None and rows[0]["success"] and rows[3]["error"] is None
    summary = info["results"]["per_task"][THIRD_PARTY]
    assert summary["errors"] == 2 and summary["successes"] == 1 and summary["episodes"] == 4


def test_bank_evaluates_each_task_with_its_own_bundle(bundles, tmp_path):
    bank_dir = tmp_path / "bank"
    bank_dir.mkdir()
    (bank_dir / "TaskA").symlink_to(bundles["A"])
    (bank_dir / "taskb").mkdir()
    (bank_dir / "taskb" / "bundle").symlink_to(bundles["B"])
    argv = ["eval", "--bank", str(bank_dir), "--tasks", "TaskA,TaskB", "--env-id", THIRD_PARTY,
            "--key-map", json.dumps(KEY_MAP), "--episodes", "2", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    bank_rows = json.loads((tmp_path / "out" / "eval_info.json").read_text())["results"]["per_episode"]
    for task, bundle in (("TaskA", "A"), ("TaskB", "B")):
        alone = evaluate([THIRD_PARTY], lambda _, b=bundle: load_bundle(bundles[b]),
                         config(tmp_path / bundle, episodes=2, num_envs=1, env_id=THIRD_PARTY, key_map=KEY_MAP))
        expected = [{**r, "task": task} for r in alone["results"]["per_episode"]]
        assert [r for r in bank_rows if r["task"] == task] == expected
    returns = {r["task"]: r["return"] for r in bank_rows if r["episode"] == 1}
    assert returns["TaskA"] != returns["TaskB"]


def test_key_map_errors_name_the_problem(bundles, tmp_path):
    policy = load_bundle(bundles["A"])
    wrong = {**KEY_MAP, "agentview_rgb": "obs:image"}
    with pytest.raises(KeyMapError, match="'agentview_rgb' comes from observation 'image'.*pixels"):
        evaluate([THIRD_PARTY], lambda _: policy, config(tmp_path, env_id=THIRD_PARTY, key_map=wrong, episodes=1))
    with pytest.raises(KeyMapError, match="does not read"):
        evaluate([THIRD_PARTY], lambda _: policy, config(tmp_path, env_id=THIRD_PARTY, key_map={**KEY_MAP, "depth": "x"}))
    no_flag = {**KEY_MAP, "success": "info:done"}
    with pytest.raises(KeyMapError, match="info:done"):
        evaluate([THIRD_PARTY], lambda _: policy, config(tmp_path, env_id=THIRD_PARTY, key_map=no_flag, episodes=1))


def test_key_map_reads_array_observations_renders_and_fixed_text():
    class View:  # what the rollout hands the key map: a vector env's batched obs and per-slot infos
        obs = np.arange(12, dtype=np.float32).reshape(2, 6)
        infos = [{}, {}]

        def render(self, slot):
            return np.full((8, 8, 3), slot, np.uint8)

    key_map = KeyMap({"agentview_rgb": "render", "ee_pos": "obs[0:3]", "gripper_states": "obs[4:]",
                      "instruction": "text:balance the pole"}, ["agentview"], ["ee_pos", "gripper_states"])
    obs = key_map.policy_obs(View(), [1])
    np.testing.assert_array_equal(obs["ee_pos"], [[6, 7, 8]])
    np.testing.assert_array_equal(obs["gripper_states"], [[10, 11]])
    assert obs["agentview_rgb"].shape == (1, 8, 8, 3) and obs["agentview_rgb"].max() == 1
    assert obs["instruction"] == ["balance the pole"]
    assert key_map.to_dict()["ee_pos"] == "obs[:3]" and key_map.uses_render


def test_config_file_with_flags_overriding_it(bundles, tmp_path, capsys):
    import yaml

    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(
        {"env_id": THIRD_PARTY, "key_map": KEY_MAP, "episodes": 5, "seed": 7, "out": str(tmp_path / "from_yaml")}))
    argv = ["eval", "--bundle", str(bundles["A"]), "--config", str(tmp_path / "eval.yaml"), "--episodes", "2",
            "--no-progress"]
    assert main(argv) == 0
    info = json.loads((tmp_path / "from_yaml" / "eval_info.json").read_text())
    assert [r["seed"] for r in info["results"]["per_episode"]] == [7, 8]
    assert THIRD_PARTY in capsys.readouterr().out  # the summary table
    assert main(["eval", "--bank", str(tmp_path), "--tasks", "Nope", "--no-progress"]) == 2
    assert "no bundle for task 'Nope'" in capsys.readouterr().err


def test_crop_grid_flag_changes_the_test_time_crops(tiny_llava_dir, bundles, tmp_path, capsys):
    """``--crop-grid`` re-evaluates a bundle with another number of test-time crops (the third-party
    env's return is the sum of the first action component, so it shows what the policy computed)."""
    tta = save_bundle(make_policy(tiny_llava_dir, 3, center_crop=0.8, eval_crop_grid=2), tmp_path / "tta")
    returns = {}
    for grid in (None, 1):
        out = tmp_path / f"grid{grid}"
        argv = ["eval", "--bundle", str(tta), "--env-id", THIRD_PARTY, "--key-map", json.dumps(KEY_MAP),
                "--episodes", "2", "--out", str(out), "--no-progress"] + (["--crop-grid", str(grid)] if grid else [])
        assert main(argv) == 0
        info = json.loads((out / "eval_info.json").read_text())
        returns[grid] = info["results"]["per_task"][THIRD_PARTY]["mean_return"]
        assert info["config"]["eval_crop_grid"] == (grid or 2)  # recorded beside the results
    assert returns[None] != pytest.approx(returns[1], abs=1e-6)
    argv = ["eval", "--bundle", str(bundles["A"]), "--env-id", THIRD_PARTY, "--key-map", json.dumps(KEY_MAP),
            "--episodes", "1", "--out", str(tmp_path / "bad"), "--no-progress", "--crop-grid", "2"]
    assert main(argv) == 2
    assert "needs an evaluation crop" in capsys.readouterr().err


@pytest.mark.parametrize("ensemble", [0.0, 0.5])
def test_per_slot_action_queues_follow_select_action(ensemble):
    """The evaluator's per-env chunking gives, step for step, what VLAPolicy.select_action gives."""
    from types import SimpleNamespace

    from vla_peft.eval.rollout import ActionQueues
    from vla_peft.policy import PolicyConfig, VLAPolicy

    config = PolicyConfig(image_size=32, state_dim=5, chunk_size=4, execute_steps=3, temporal_ensemble=ensemble)
    chunks = np.random.default_rng(0).uniform(-1, 1, (12, 4, 4)).astype(np.float32)
    calls = iter(range(12))
    stub = SimpleNamespace(config=config, _actions=ActionQueues(1, config),
                           predict_chunk=lambda obs, binarize_gripper=None: chunks[next(calls)])
    queues, used = ActionQueues(1, config), 0
    for _ in range(10):
        expected = VLAPolicy.select_action(stub, {})
        if queues.needs_chunk(0):
            queues.push(0, chunks[used])
            used += 1
        np.testing.assert_allclose(queues.pop(0), expected, atol=1e-6)


@pytest.mark.slow
def test_async_envs_run_an_env_without_control_hz(bundles, tmp_path):
    """``--async-envs`` on an env that lacks our ``control_hz`` attribute: the same rows as the
    synchronous run (it crashed: the worker died on the missing attribute), at its render_fps."""
    infos = {}
    for mode in ("sync", "async"):
        out = tmp_path / mode
        argv = ["eval", "--bundle", str(bundles["A"]), "--env-id", "plain_env:Plain-v0", "--episodes", "4",
                "--num-envs", "2", "--out", str(out), "--no-progress"] + (["--async-envs"] if mode == "async" else [])
        assert main(argv) == 0
        infos[mode] = json.loads((out / "eval_info.json").read_text())
    assert infos["async"]["results"] == infos["sync"]["results"]
    assert [r["success"] for r in infos["async"]["results"]["per_episode"]] == [True, False, True, False]
    assert infos["async"]["timing"]["plain_env:Plain-v0"]["control_hz_target"] == 7.0


def test_preset_names_and_missing_extras_are_one_line_errors(bundles, tmp_path, capsys):
    import importlib.util

    argv = ["eval", "--bundle", str(bundles["A"]), "--episodes", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(argv + ["--env", "metaworld/reach"]) == 2
    assert "unknown environment preset 'metaworld/reach'" in capsys.readouterr().err
    assert main(argv + ["--env", "libero/libero_spatial/x"]) == 2
    assert "libero/<suite>/<task index>" in capsys.readouterr().err
    if importlib.util.find_spec("metaworld") is None:  # the core install: the preset names its extra
        assert main(argv + ["--env", "metaworld/reach-v3"]) == 2
        assert "pip install -e '.[metaworld]'" in capsys.readouterr().err
