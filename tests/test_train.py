"""Training on accelerate: every method end to end, bundles, exact resume, atomic checkpoints,
data parallelism, the train/inference consistency check, and the errors a user can cause."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from policy_synth import write_demos
from vla_peft.data import DataConfig, DemoDataset
from vla_peft.models import save_tiny_llava
from vla_peft.policy.heads import masked_mean
from vla_peft.policy.bundle import BundleMismatchError, load_bundle
from vla_peft.train import TrainingDiverged, load_run_config, train
from vla_peft.train.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
SMALL_LORA = {"method": "lora", "r": 4, "targets": {"vision": [r"encoder\.layers\.\d+\.self_attn\.(q|v)_proj"],
                                                     "language": [r"layers\.\d+\.self_attn\.(q|v)_proj"]}}
METHODS = {
    "lora": SMALL_LORA,
    "qlora": {**SMALL_LORA, "load_in_4bit": True},
    "adapter": "configs/peft/adapter.yaml",
    "prefix": "configs/peft/prefix.yaml",
    "prompt": "configs/peft/prompt.yaml",
}


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    return write_demos(tmp_path_factory.mktemp("train_demos") / "synth.hdf5")


def run_config(base, demos, out, method=SMALL_LORA, policy=None, **train_overrides):
    return load_run_config({
        "policy": {"base": str(base), "chunk_size": 4, "head_width": 64, **(policy or {})},
        "method": method if not isinstance(method, str) else str(REPO / method),
        "data": {"paths": [str(demos)], "val_fraction": 0.2},
        "train": {"output_dir": str(out), "steps": 3, "batch_size": 4, "warmup_steps": 1, "lr": 1e-3,
                  "eval_every": 100, "save_every": 100, "log_every": 1, **train_overrides},
    })


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def frames(demos, pairs):
    """Raw observations of (demo, t) pairs as one batch, read with plain h5py."""
    with h5py.File(demos) as f:
        obs = {k: np.stack([f[f"data/demo_{d}/obs/{k}"][t] for d, t in pairs])
               for k in ("agentview_rgb", "ee_pos", "gripper_states")}
        obs["instruction"] = [f[f"data/demo_{d}"].attrs["language_instruction"] for d, _ in pairs]
    return obs


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_and_its_bundle_reloads_to_the_same_output(name, tiny_llava_dir, demos, tmp_path):
    result = train(run_config(tiny_llava_dir, demos, tmp_path / name, METHODS[name]), progress=False)
    assert np.isfinite(result.summary["final"]["loss"])
    bundle = tmp_path / name / "bundle"
    assert not any(p.name.endswith(".bin") for p in bundle.rglob("*"))
    assert sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) < 5e6  # never the frozen base
    obs = frames(demos, [(0, 1), (3, 7)])
    reloaded = load_bundle(bundle)
    np.testing.assert_allclose(reloaded.predict_chunk(obs), result.policy.predict_chunk(obs), atol=1e-5)
    if name in ("lora", "qlora"):
        assert (bundle / "adapter" / "adapter_config.json").is_file()  # HF peft's format
    if name == "qlora":
        assert type(reloaded.vlm.model.language_model.layers[0].mlp.up_proj).__name__ == "Linear4bit"


@pytest.mark.parametrize("name", list(METHODS))
def test_flow_head_trains_with_every_method_and_its_bundle_reloads_bit_exactly(name, tiny_llava_dir, demos, tmp_path):
    run = run_config(tiny_llava_dir, demos, tmp_path, METHODS[name], policy={"head": "flow", "flow_steps": 3}, steps=2)
    result = train(run, progress=False)
    assert np.isfinite(result.summary["final"]["flow_mse"])
    obs = frames(demos, [(0, 1), (3, 7)])
    np.testing.assert_array_equal(load_bundle(tmp_path / "bundle").predict_chunk(obs), result.policy.predict_chunk(obs))


def test_discrete_head_trains_and_reports_token_accuracy(tiny_llava_dir, demos, tmp_path):
    result = train(run_config(tiny_llava_dir, demos, tmp_path, policy={"head": "discrete"}, eval_every=3),
                   progress=False)
    assert "token_accuracy" in result.summary["final"] and "val_token_accuracy" in result.summary["validation"]


def test_aux_targets_add_a_grounding_loss_and_travel_in_the_bundle(tiny_llava_dir, demos, tmp_path):
    run = run_config(tiny_llava_dir, demos, tmp_path, policy={"aux_keys": ["target_pos"], "aux_weight": 2.0})
    result = train(run, progress=False)
    policy = result.policy
    assert policy.config.aux_dim == 3 and "aux_mse" in result.summary["final"]
    data = DemoDataset(DataConfig(**{**run.data, "chunk_size": 4, "aux_keys": ["target_pos"]}), train=False,
                       normalizers=policy.normalizers)
    with h5py.File(demos) as f:  # the sample's aux is the frame's normalised target_pos
        raw = f[f"data/{data.episodes[0].demo}/obs/target_pos"][2]
    np.testing.assert_allclose(data[2]["aux"], policy.normalizers["aux"].normalize(raw), rtol=1e-6)
    batch = torch.utils.data.default_collate([data[i] for i in range(6)])
    batch["aux"][0, 2] = 125.0  # a knocked cube's height in floor-scale units counts as 3 (clamped)
    policy.eval()
    with torch.no_grad():
        out = policy(batch)
        hidden = policy.query_hidden(batch["images"][:, :, -1], batch["state"][:, -1], list(batch["instruction"]))
        target = batch["aux"].clamp(-3, 3).unsqueeze(1)
        by_hand = (policy.aux_head(hidden) - target).pow(2).mean()  # every query predicts it
    torch.testing.assert_close(out["aux_mse"], by_hand)
    torch.testing.assert_close(out["loss"], out["l1"] + 2.0 * by_hand)
    obs = frames(demos, [(0, 1), (3, 7)])  # inference needs no aux key
    np.testing.assert_allclose(load_bundle(tmp_path / "bundle").predict_chunk(obs), policy.predict_chunk(obs), atol=1e-5)
    with pytest.raises(Exception, match="cube_pose"):
        train(run_config(tiny_llava_dir, demos, tmp_path / "bad", policy={"aux_keys": ["cube_pose"]}), progress=False)
    # grounding-only frames (play) join the training batches at data.grounding_fraction, through the same entry
    play = write_demos(tmp_path / "play.hdf5", episodes=3, seed=5)
    run = run_config(tiny_llava_dir, demos, tmp_path / "play_run", policy={"aux_keys": ["target_pos"]})
    run.data.update(grounding_paths=[str(play)], grounding_fraction=0.25)
    assert "aux_mse" in train(run, progress=False).summary["final"]


@pytest.mark.parametrize("head", ["continuous", "discrete", "flow"])
def test_training_frames_through_predict_chunk_reproduce_training_metrics(head, tiny_llava_dir, demos, tmp_path):
    """OpenVLA's sanity check: raw frames through predict_chunk score what the training path scores."""
    run = run_config(tiny_llava_dir, demos, tmp_path, policy={"head": head}, steps=4)
    run.data["augment"] = True  # exercises the evaluation centre crop too
    policy = train(run, progress=False).policy
    data = DemoDataset(DataConfig(**{**run.data, "chunk_size": 4}), train=False, normalizers=policy.normalizers)
    indices = list(range(0, len(data), 5))
    batch = torch.utils.data.default_collate([data[i] for i in indices])
    policy.eval()
    with torch.no_grad():
        training = policy(batch)
    pairs = [data.locate(i) for i in indices]
    predicted = policy.predict_chunk(frames(demos, [(data.episodes[e].demo.split("_")[1], t) for e, t in pairs]),
                                     binarize_gripper=False)
    norm = policy.normalizers["actions"]  # invert the (affine) un-normalisation without normalize()'s clipping
    zero, one = norm.unnormalize(torch.zeros(4)), norm.unnormalize(torch.ones(4))
    normalised = (torch.from_numpy(predicted) - zero) / (one - zero)
    mask = batch["action_mask"]
    l1 = masked_mean((normalised - batch["actions"]).abs(), mask)  # the training metric's reduction
    torch.testing.assert_close(l1, training["l1"], atol=1e-4, rtol=1e-4)
    if head == "discrete":
        accuracy = masked_mean((policy.head.to_bins(normalised) == policy.head.to_bins(batch["actions"])).float(), mask)
        torch.testing.assert_close(accuracy, training["token_accuracy"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_resume_after_a_crash_mid_checkpoint_matches_an_uninterrupted_run(tiny_llava_dir, demos, tmp_path, monkeypatch):
    """A crash while writing the step-6 checkpoint leaves it unloadable; --resume continues from step 3
    (optimiser, scheduler, RNG, data position) and reaches the uninterrupted run's loss at step 8."""
    kwargs = {"steps": 8, "save_every": 3, "keep_last": 3}
    train(run_config(tiny_llava_dir, demos, tmp_path / "straight", **kwargs), progress=False)

    import vla_peft.train.checkpoint as checkpoint

    real_save = checkpoint.save_file
    def crash_on_second_checkpoint(tensors, filename, *args, **kw):
        if "step_0000006" in str(filename) and "optimizer" in str(filename):
            raise KeyboardInterrupt("killed while writing")
        return real_save(tensors, filename, *args, **kw)

    monkeypatch.setattr(checkpoint, "save_file", crash_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(tiny_llava_dir, demos, tmp_path / "crashed", **kwargs), progress=False)
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert [p.name for p in list_checkpoints(tmp_path / "crashed")] == ["step_0000003"]
    assert (tmp_path / "crashed" / "checkpoints" / "step_0000006.partial").is_dir()

    with pytest.raises(FileExistsError, match="--resume"):
        train(run_config(tiny_llava_dir, demos, tmp_path / "crashed", **kwargs), progress=False)
    result = train(run_config(tiny_llava_dir, demos, tmp_path / "crashed", **kwargs), resume=True, progress=False)
    assert result.summary["resumed_from"] == 3
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "crashed")
    assert sorted(resumed) == list(range(1, 9))
    np.testing.assert_allclose([resumed[s] for s in (4, 8)], [straight[s] for s in (4, 8)], rtol=1e-5)
    assert not list((tmp_path / "crashed" / "checkpoints").glob("*.partial"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_llava_dir, demos, tmp_path,
                                                                            monkeypatch):
    from vla_peft.policy.policy import VLAPolicy

    real_forward, calls = VLAPolicy.forward, []
    def nan_at_third_step(self, batch):
        out = real_forward(self, batch)
        calls.append(1)
        return {**out, "loss": out["loss"] * float("nan")} if len(calls) == 3 else out

    monkeypatch.setattr(VLAPolicy, "forward", nan_at_third_step)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3.*last good checkpoint is .*step_0000002"):
        train(run_config(tiny_llava_dir, demos, tmp_path, steps=5, save_every=2), progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002"]
    assert not (tmp_path / "bundle").exists()


def test_dataset_with_another_action_dimension_is_refused(tiny_llava_dir, tmp_path):
    demos5 = write_demos(tmp_path / "five.hdf5", episodes=3, action_dim=5)
    with pytest.raises(ValueError, match="actions have 5 dimensions but policy.action_dim is 4"):
        train(run_config(tiny_llava_dir, demos5, tmp_path / "out"), progress=False)


def test_bundle_onto_another_base_is_refused(tiny_llava_dir, demos, tmp_path):
    train(run_config(tiny_llava_dir, demos, tmp_path / "run", steps=1), progress=False)
    other = save_tiny_llava(tmp_path / "other_base", seed=1)  # same shapes, other weights
    with pytest.raises(BundleMismatchError, match="trained on another base model.*weights_sha256"):
        load_bundle(tmp_path / "run" / "bundle", base=other)


def test_init_from_starts_from_the_bundle_and_refuses_another_method(tiny_llava_dir, demos, tmp_path):
    """train.init_from: the run starts from the bundle's weights, not a fresh draw: with a learning rate
    too small to move them, its policy acts as the bundle does (a fresh run with that rate does not), aux
    head included; a run without aux targets leaves the bundle's aux head out; another method's bundle
    is refused before training, naming what differs."""
    aux = {"aux_keys": ["target_pos"]}
    first = train(run_config(tiny_llava_dir, demos, tmp_path / "first", policy=aux, steps=3), progress=False)
    bundle = str(tmp_path / "first" / "bundle")
    still = {"steps": 1, "lr": 1e-12}
    started = train(run_config(tiny_llava_dir, demos, tmp_path / "started", policy=aux, init_from=bundle, **still), progress=False)
    fresh = train(run_config(tiny_llava_dir, demos, tmp_path / "fresh", policy=aux, **still), progress=False)
    obs = frames(demos, [(0, 1), (3, 7)])
    reference = first.policy.predict_chunk(obs)
    np.testing.assert_allclose(started.policy.predict_chunk(obs), reference, atol=1e-6)
    assert np.abs(fresh.policy.predict_chunk(obs) - reference).max() > 1e-3
    assert started.summary["trainable_parameters"] == fresh.summary["trainable_parameters"]  # all still train
    for a, b in zip(started.policy.aux_head.parameters(), first.policy.aux_head.parameters()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    plain = train(run_config(tiny_llava_dir, demos, tmp_path / "plain", init_from=bundle, **still), progress=False)
    np.testing.assert_allclose(plain.policy.predict_chunk(obs), reference, atol=1e-6)
    assert plain.policy.aux_head is None
    with pytest.raises(BundleMismatchError, match="init_from.*r=4.*r=8"):
        train(run_config(tiny_llava_dir, demos, tmp_path / "wider", method={**SMALL_LORA, "r": 8}, init_from=bundle),
              progress=False)


def test_run_config_overrides_and_errors(tiny_llava_dir, demos, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"policy: {{base: {tiny_llava_dir}}}\nmethod: none\ndata: {{paths: [{demos}]}}\n")
    run = load_run_config(path, ["train.steps=7", "policy.head=discrete", "train.lr=1e-4"])
    assert (run.train.steps, run.policy.head, run.train.lr, run.method) == (7, "discrete", 1e-4, None)
    swapped = load_run_config(path, [f"method={REPO / 'configs/peft/adapter.yaml'}", "method.bottleneck=8"])
    assert (swapped.method.method, swapped.method.bottleneck) == ("adapter", 8)
    with pytest.raises(ValueError, match="unknown key 'stepz'.*steps"):
        load_run_config(path, ["train.stepz=7"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_run_config(path, ["steps=7"])
    for config in sorted((REPO / "configs" / "train").glob("*.yaml")):
        load_run_config(config)  # every shipped config parses


@pytest.mark.slow
def test_two_process_data_parallel_matches_single_process(tiny_llava_dir, demos, tmp_path):
    """torchrun with 2 gloo processes, same global batch and seed: same loss as one process."""
    script = tmp_path / "ddp.py"
    script.write_text(
        "import json, sys\n"
        "from vla_peft.train import load_run_config, train\n"
        "run = load_run_config(json.loads(sys.argv[1]))\n"
        "train(run, progress=False)\n"
    )
    def config(out):
        return json.dumps(run_config(tiny_llava_dir, demos, out, steps=4).to_dict())

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                    config(tmp_path / "ddp")], check=True, env=env, cwd=tmp_path, capture_output=True)
    subprocess.run([sys.executable, str(script), config(tmp_path / "single")], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2  # the count it actually got
    ddp, single = losses(tmp_path / "ddp"), losses(tmp_path / "single")
    np.testing.assert_allclose([ddp[s] for s in range(1, 5)], [single[s] for s in range(1, 5)], rtol=1e-3)


def test_gradient_checkpointing_gives_the_same_losses(tiny_llava_dir, demos, tmp_path):
    train(run_config(tiny_llava_dir, demos, tmp_path / "plain", steps=2), progress=False)
    result = train(run_config(tiny_llava_dir, demos, tmp_path / "ckpt", steps=2, gradient_checkpointing=True),
                   progress=False)
    assert result.policy.vlm.model.language_model.gradient_checkpointing
    plain, ckpt = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    np.testing.assert_allclose([ckpt[1], ckpt[2]], [plain[1], plain[2]], rtol=1e-5)


@pytest.mark.slow
def test_libero_file_trains_unchanged_at_the_downsampled_size(tiny_llava_dir, tmp_path):
    """A file in LIBERO's own layout (agentview_rgb / eye_in_hand_rgb, ee_pos, gripper_states, 7-dim
    actions, the instruction in problem_info) trains as it is; data.image_size sets the policy's
    image size, and the bundle acts on frames of that size."""
    from data_synth import make_libero_file

    path = tmp_path / "libero_spatial_pick.hdf5"
    make_libero_file(path, lengths=(6, 6, 6), size=32)
    run = run_config(tiny_llava_dir, path, tmp_path / "run", policy={"cameras": ["agentview", "wrist"], "action_dim": 7})
    run.data["image_size"] = 16
    result = train(run, progress=False)
    policy = load_bundle(result.summary["bundle"])
    assert (policy.config.image_size, policy.config.state_dim, policy.config.action_dim) == (16, 5, 7)
    obs = {"agentview_rgb": np.zeros((16, 16, 3), np.uint8), "wrist_rgb": np.zeros((16, 16, 3), np.uint8),
           "ee_pos": np.zeros(3, np.float32), "gripper_states": np.zeros(2, np.float32),
           "instruction": "pick up the black bowl"}
    assert policy.predict_chunk(obs).shape == (4, 7)
