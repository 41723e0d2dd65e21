"""Collecting from the MuJoCo tasks: round trip against a fresh rollout, replay, interruption, the CLI."""

import h5py
import numpy as np
import pytest

from vla_peft.cli import main
from vla_peft.data import DemoFile, DemoFileError
from vla_peft.data import collect as collect_module
from vla_peft.data.collect import CollectConfig, collect, executed_noise, make_env, replay, run_episode


@pytest.fixture(scope="module")
def reach_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("collect") / "reach.hdf5"
    summary = collect(CollectConfig(task="Reach", episodes=2, out=str(out), image_size=32, seed=7), progress=False)
    return out, summary


def test_collected_demos_match_a_fresh_rollout(reach_file):
    out, summary = reach_file
    assert summary["episodes_kept"] == 2 and summary["success_rate"] == 1.0
    env = make_env("Reach", 32, ("agentview", "wrist"))
    try:
        with DemoFile(out) as f:
            assert f.env_args["env_name"] == "vla_peft/Reach-v0" and f.env_args["image_size"] == 32
            assert f.env_args["camera_names"] == ["agentview", "wrist"] and f.env_args["action_dim"] == 4
            for demo, seed in zip(f.demos, (7, 8)):
                stored = f.episode(demo)
                fresh, success = run_episode(env, seed)
                assert success and stored.attrs == {"seed": seed, "success": True}
                assert stored.instruction == fresh.instruction and stored.instruction
                np.testing.assert_array_equal(stored.actions, fresh.actions)
                np.testing.assert_array_equal(stored.rewards, fresh.rewards)
                np.testing.assert_array_equal(stored.dones, fresh.dones)
                assert set(stored.obs) == {"agentview_rgb", "wrist_rgb", "ee_pos", "ee_vel", "gripper_states", "target_pos"}
                env.reset(seed=seed)  # the privileged target_pos is where the named cube is
                np.testing.assert_allclose(stored.obs["target_pos"][0], env.unwrapped.cube_pos(0), atol=1e-6)
                for key, value in fresh.obs.items():
                    np.testing.assert_array_equal(stored.obs[key], value)
                assert stored.dones[-1] == 1 and stored.dones[:-1].sum() == 0
    finally:
        env.close()
    with h5py.File(out, "r") as f:  # the summary's frames are the file's frames
        assert f["data"].attrs["total"] == summary["frames"]


def test_replaying_stored_actions_reproduces_success(reach_file):
    out, _ = reach_file
    for demo in ("demo_0", "demo_1"):
        result = replay(out, demo)
        assert result["success"] and result["ee_pos_gap"] == 0.0


def test_replay_catches_actions_shifted_against_observations(reach_file, tmp_path):
    """The check is sharp: a one-step shift between actions and observations is seen."""
    out, _ = reach_file
    shifted = tmp_path / "shifted.hdf5"
    shifted.write_bytes(out.read_bytes())
    with h5py.File(shifted, "r+") as f:
        actions = f["data/demo_0/actions"]
        actions[...] = np.concatenate([actions[1:], actions[-1:]])
    assert replay(shifted, "demo_0")["ee_pos_gap"] > 1e-3


def test_interrupted_collection_leaves_no_file(tmp_path, monkeypatch):
    calls = []

    def interrupted(env, seed, *options):
        calls.append(seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_episode(env, seed, *options)

    monkeypatch.setattr(collect_module, "run_episode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect(CollectConfig(task="Reach", episodes=3, out=str(tmp_path / "x.hdf5"), image_size=16), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_keep_failed_keeps_everything_tried(tmp_path, monkeypatch):
    """With one step allowed no Reach episode succeeds: by default nothing is kept, with --keep-failed all are."""
    import gymnasium as gym

    out = tmp_path / "all.hdf5"
    real = collect_module.make_env

    def one_step_env(task, image_size, cameras, terminate_on_success=True):
        return gym.wrappers.TimeLimit(real(task, image_size, cameras, terminate_on_success).unwrapped, max_episode_steps=1)

    monkeypatch.setattr(collect_module, "make_env", one_step_env)
    with pytest.raises(DemoFileError, match="no episodes to write"):
        collect(CollectConfig(task="Reach", episodes=2, out=str(out), image_size=16, max_attempts=2), progress=False)
    assert not out.exists()
    summary = collect(CollectConfig(task="Reach", episodes=2, out=str(out), image_size=16, keep_failed=True), progress=False)
    assert summary["episodes_kept"] == 2 and summary["success_rate"] == 0.0
    with DemoFile(out) as f:
        assert [f.episode(d).attrs["success"] for d in f.demos] == [False, False]


def test_cli_collect_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "demos" / "reach.hdf5"
    assert main(["collect", "--task", "Reach", "--episodes", "1", "--out", str(out), "--image-size", "16", "--cameras", "agentview"]) == 0
    printed = capsys.readouterr().out
    assert "kept 1 of 1 episodes (expert success 100.0%)" in printed and "kB/frame" in printed
    with DemoFile(out) as f:
        assert f.obs_keys() == ["agentview_rgb", "ee_pos", "ee_vel", "gripper_states", "target_pos"]


def test_action_noise_records_the_experts_clean_actions_and_replays(tmp_path):
    """DART-style collection: the stored action is what the expert asked for in the state it saw;
    the move executed is that plus the episode's own noise, which replay draws again."""
    import envs

    out = tmp_path / "noisy.hdf5"
    collect(CollectConfig(task="Reach", episodes=1, out=str(out), image_size=32, cameras=("agentview",), seed=7,
                          action_noise=0.3), progress=False)
    clean, _ = run_episode(make_env("Reach", 32, ("agentview",)), 7)
    with DemoFile(out) as f:
        stored = f.episode("demo_0")
    assert stored.attrs == {"seed": 7, "success": True, "action_noise": 0.3}
    assert not np.allclose(stored.obs["ee_pos"][5], clean.obs["ee_pos"][5])  # the noise moved the arm
    env = make_env("Reach", 32, ("agentview",))
    try:  # the reference: the expert beside the same noise, step by step
        expert, noise = envs.make_expert(env), executed_noise(7, 0.3, 4)
        obs, _ = env.reset(seed=7)
        for action in stored.actions:
            np.testing.assert_array_equal(action, expert(obs))
            obs, *_ = env.step(np.clip(action + next(noise), -1, 1))
    finally:
        env.close()
    assert replay(out, "demo_0") == {"success": True, "steps": len(stored), "ee_pos_gap": 0.0}
    with pytest.raises(ValueError, match="--action-noise"):
        collect(CollectConfig(task="Reach", episodes=1, out=str(tmp_path / "x.hdf5"), action_noise=-0.1))


def test_play_keeps_every_episode_cut_at_max_steps_and_marks_the_file(tmp_path):
    out = tmp_path / "play.hdf5"
    summary = collect(CollectConfig(task="Reach", episodes=3, out=str(out), image_size=32, cameras=("agentview",),
                                    seed=7, play=True, max_steps=6), progress=False)
    assert summary["episodes_kept"] == summary["episodes_tried"] == 3
    env = make_env("Reach", 32, ("agentview",))
    try:
        with DemoFile(out) as f:
            assert f.env_args["expert"] == "play"  # the dataset refuses it as demonstrations
            for demo, seed in zip(f.demos, (7, 8, 9)):
                episode = f.episode(demo)
                assert len(episode) <= 6 and episode.dones[-1] == 1
                expert, _ = run_episode(env, seed)
                assert not np.allclose(episode.actions[:2], expert.actions[:2])  # not the task's expert
                assert np.linalg.norm(episode.obs["ee_pos"][-1] - episode.obs["ee_pos"][0]) > 0.05  # the arm moves
                env.reset(seed=seed)
                np.testing.assert_allclose(episode.obs["target_pos"][0], env.unwrapped.cube_pos(0), atol=1e-6)
    finally:
        env.close()
    with pytest.raises(ValueError, match="--max-steps"):
        collect(CollectConfig(task="Reach", episodes=1, out=str(tmp_path / "x.hdf5"), play=True, max_steps=0))


def test_after_success_records_the_experts_next_steps_and_replays(tmp_path):
    """PickPlace's demonstrations end in the expert's opening over the pad: cut at the success that
    opening causes, it is one frame. ``after_success`` keeps the episode going that many steps, the
    expert still acting, and the same seed gives the same episode up to the success."""
    cut, _ = run_episode(make_env("PickPlace", 32, ("agentview",)), 3)
    out = tmp_path / "after.hdf5"
    collect(CollectConfig(task="PickPlace", episodes=1, out=str(out), image_size=32, cameras=("agentview",), seed=3,
                          after_success=5), progress=False)
    with DemoFile(out) as f:
        longer = f.episode("demo_0")
    n = len(cut.actions)
    assert len(longer.actions) == n + 5 and longer.attrs["success"]
    np.testing.assert_array_equal(longer.actions[:n], cut.actions)
    gripper = longer.actions[:, 3]
    assert (gripper[n - 1:] < 0).all() and (gripper[n - 1:] < 0).sum() == 6  # open over the pad: 6 frames, not 1
    assert (gripper[:n - 1][-5:] > 0).all()  # closed on the way down
    np.testing.assert_array_equal(longer.actions[n - 1:, :3], 0)  # still over the pad: no retreat upwards
    assert replay(out, "demo_0") == {"success": True, "steps": n + 5, "ee_pos_gap": 0.0}
    with pytest.raises(ValueError, match="--after-success"):
        collect(CollectConfig(task="Reach", episodes=1, out=str(tmp_path / "x.hdf5"), after_success=-1))
