"""The flow-matching head: it samples the modes of a bimodal target where L1 lands between them,
sampling is seeded, a row of a batch equals that observation alone, the VLM runs once per chunk,
and it trains, saves, reloads bit-exactly, evaluates, mixes and serves like the other heads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval_synth import make_policy, one_torch_thread
from serve_synth import observation, threaded_server
from vla_peft.policy.bundle import load_bundle, save_bundle
from vla_peft.policy.config import PolicyConfig
from vla_peft.policy.flow import FlowHead
from vla_peft.policy.heads import ContinuousHead

one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)

HIDDEN, CHUNK, DIM = 32, 4, 2
MODE = torch.linspace(0.3, 0.8, CHUNK)[:, None].expand(CHUNK, DIM)  # the two modes are +MODE and -MODE


def fit_bimodal(head, steps: int = 300) -> list[float]:
    """Train ``head`` alone on one fixed context whose target chunk is +MODE or -MODE at random."""
    context = torch.randn(1, CHUNK, HIDDEN, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(64, CHUNK, dtype=torch.bool)
    optimiser = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        sign = torch.where(torch.rand(64) < 0.5, -1.0, 1.0)
        loss = head.loss(head(context.expand(64, -1, -1)), sign[:, None, None] * MODE, mask)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    head.eval()
    return losses, context


def distance_to_modes(chunks: torch.Tensor) -> torch.Tensor:
    """(N, K, A) -> (N, 2): mean absolute distance of each chunk to +MODE and to -MODE."""
    return torch.stack([(chunks - MODE).abs().mean((1, 2)), (chunks + MODE).abs().mean((1, 2))], dim=1)


def test_flow_samples_the_modes_of_a_bimodal_target_where_l1_lands_between_them():
    torch.manual_seed(0)
    flow = FlowHead(HIDDEN, DIM, CHUNK, width=64, layers=2, steps=10)
    losses, context = fit_bimodal(flow)
    assert np.mean(losses[-30:]) < 0.5 * np.mean(losses[:30])  # the flow-matching loss falls
    with torch.no_grad():
        cond = flow(context.expand(200, -1, -1))
        samples = flow.sample(cond, torch.randn(200, CHUNK, DIM, generator=torch.Generator().manual_seed(1)))
    to_modes = distance_to_modes(samples)
    assert to_modes.min(1).values.mean() < 0.12  # each sample is one of the modes (they are 1.1 apart)
    assert 0.2 < (to_modes[:, 0] < to_modes[:, 1]).float().mean() < 0.8  # and both modes are sampled

    torch.manual_seed(0)
    l1 = ContinuousHead(HIDDEN, DIM, CHUNK, width=64)
    fit_bimodal(l1)
    with torch.no_grad():
        regressed = l1(context)
    assert distance_to_modes(regressed).min() > 0.25  # L1 lands between the modes, near neither
    assert regressed.abs().mean() < 0.5 * MODE.abs().mean()  # closer to their mean (zero) than to either


def test_sampling_is_seeded_a_row_equals_its_batch_and_the_vlm_runs_once(tiny_llava_dir):
    policy = make_policy(tiny_llava_dir, 1, head="flow", flow_steps=6)
    obs = {k: np.stack([observation(s)[k] for s in range(3)]) for k in observation(0)}
    obs["instruction"] = ["reach the red cube", "push the blue cube onto the green pad", "reach the red cube"]
    calls = {"vlm": 0, "expert": 0}
    counters = [policy.vlm.model.language_model.register_forward_hook(lambda *_: calls.__setitem__("vlm", calls["vlm"] + 1)),
                policy.head.expert.register_forward_hook(lambda *_: calls.__setitem__("expert", calls["expert"] + 1))]
    batch = policy.predict_chunk(obs, binarize_gripper=False)
    assert calls == {"vlm": 1, "expert": 6}  # one VLM forward per chunk, one expert pass per Euler step
    for handle in counters:
        handle.remove()
    assert np.array_equal(policy.predict_chunk(obs, binarize_gripper=False), batch)  # same seed, same chunks
    for row in range(3):
        alone = policy.predict_chunk({k: v[row] for k, v in obs.items()}, binarize_gripper=False)
        np.testing.assert_allclose(alone, batch[row], atol=1e-5)
    other = make_policy(tiny_llava_dir, 1, head="flow", flow_steps=6, flow_seed=1)
    assert not np.allclose(other.predict_chunk(obs, binarize_gripper=False), batch, atol=1e-3)  # another draw


def test_flow_config_errors_name_the_field():
    for bad, field in (({"flow_steps": 0}, "flow_steps"), ({"flow_layers": 0}, "flow_layers")):
        with pytest.raises(ValueError, match=field):
            PolicyConfig(head="flow", **bad)
    with pytest.raises(ValueError, match="head_width=30 .*multiple of 4"):
        FlowHead(8, 2, 4, width=30)


def test_mixed_batch_with_a_flow_bundle_equals_each_bundle_alone(tiny_llava_dir, tmp_path):
    from vla_peft.serve import AdapterBank

    bank = AdapterBank.from_base(tiny_llava_dir)
    bank.register("flow", save_bundle(make_policy(tiny_llava_dir, 1, head="flow"), tmp_path / "flow"))
    bank.register("l1", save_bundle(make_policy(tiny_llava_dir, 2), tmp_path / "l1"))
    names = ["flow", "l1", "flow"]
    obs = {k: np.stack([observation(s)[k] for s in range(3)]) for k in observation(0)} | {"instruction": ["reach it"] * 3}
    mixed = bank.predict_mixed(obs, names, binarize_gripper=False)
    for row, name in enumerate(names):
        alone = bank.activate(name).predict_chunk({k: v[row] for k, v in obs.items()}, binarize_gripper=False)
        np.testing.assert_allclose(mixed[row], alone, atol=1e-5)


@pytest.mark.slow
def test_train_save_reload_eval_serve_round_trip(tiny_llava_dir, tmp_path, capsys):
    """`vla-peft train ... policy.head=flow`, then the bundle reloads bit-exactly, evaluates on Reach and
    serves the chunks it computes in process."""
    import yaml

    from policy_synth import write_demos
    from vla_peft.cli import main
    from vla_peft.serve.client import PolicyClient
    from vla_peft.serve.server import load_bank

    demos = write_demos(tmp_path / "synth.hdf5")
    run = {"policy": {"base": str(tiny_llava_dir), "chunk_size": 4, "execute_steps": 2, "head_width": 64},
           "method": {"method": "lora", "r": 4, "targets": {"language": [r"layers\.\d+\.self_attn\.(q|v)_proj"]}},
           "data": {"paths": [str(demos)], "val_fraction": 0.2},
           "train": {"output_dir": str(tmp_path / "run"), "steps": 4, "batch_size": 4, "warmup_steps": 1,
                     "lr": 1e-3, "eval_every": 4, "save_every": 100, "log_every": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "policy.head=flow", "policy.flow_steps=4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("flow_mse" in r for r in rows) and any("val_l1" in r for r in rows)

    bundle = tmp_path / "run" / "bundle"
    first, second = load_bundle(bundle), load_bundle(bundle)
    assert first.config.head == "flow" and first.config.flow_steps == 4
    obs = observation(3) | {"instruction": "reach the red cube"}
    assert np.array_equal(first.predict_chunk(obs), second.predict_chunk(obs))  # bit-exact reload

    out = tmp_path / "eval"
    argv = ["eval", "--bundle", str(bundle), "--task", "Reach", "--episodes", "1", "--max-steps", "4",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert json.loads((out / "eval_info.json").read_text())["results"]["per_task"]["Reach"]["episodes"] == 1

    (tmp_path / "bank").mkdir()
    (tmp_path / "bank" / "reach").symlink_to(bundle)
    with threaded_server(load_bank(tmp_path / "bank")) as url:
        served = PolicyClient(url).act(observation(3), "reach the red cube", task="reach").chunk
    np.testing.assert_allclose(served, first.predict_chunk(obs), atol=1e-6)
