"""What a trained policy's action queries carry: fresh L1 heads fitted on its frozen query states,
on those states plus the robot state, and on the state alone, scored on its validation episodes.

A policy whose validation L1 stalls may have queries that miss the image (`val_l1_images_shuffled`
in its metrics says so) or miss the state: if a head on the queries does no better than one on the
state alone, and one on both does much better, the state token never reached the queries. The
frames are the run's own demonstrations with evaluation's centre crop; the heads train for ``--steps`` Adam
steps at batch 16 with the policy's head shape.

    vla-peft bench query_probe --run runs/reach/train/Reach [--frames 3000] [--steps 2000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from vla_peft.data import build_datasets
from vla_peft.policy.bundle import load_bundle
from vla_peft.policy.heads import ContinuousHead
from vla_peft.train.config import load_run_config
from vla_peft.train.loop import data_config_for


@torch.no_grad()
def query_states(policy, dataset, frames: int) -> dict[str, torch.Tensor]:
    """The policy's query states, state, action chunks and masks on up to ``frames`` frames."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:frames].tolist()
    parts = {"queries": [], "state": [], "actions": [], "mask": []}
    for batch in DataLoader(Subset(dataset, order), batch_size=64):
        state = batch["state"][:, -1]
        parts["queries"].append(policy.query_hidden(batch["images"][:, :, -1], state, list(batch["instruction"])).float())
        parts["state"].append(state.float())
        parts["actions"].append(batch["actions"].float())
        parts["mask"].append(batch["action_mask"].bool())
    return {key: torch.cat(value) for key, value in parts.items()}


def inputs(data: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """(N, K, D) head inputs: the queries, the queries with the state beside each, or the state alone."""
    if kind == "queries":
        return data["queries"]
    state = data["state"][:, None].expand(-1, data["queries"].shape[1], -1)
    return state if kind == "state" else torch.cat([data["queries"], state], -1)


def fit_head(train: dict, val: dict, kind: str, width: int, steps: int) -> float:
    """Validation L1 of a fresh head of the policy's shape trained on ``kind``."""
    torch.manual_seed(0)
    x_train, x_val = inputs(train, kind), inputs(val, kind)
    head = ContinuousHead(x_train.shape[-1], train["actions"].shape[-1], train["actions"].shape[1], width)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(len(x_train), (16,), generator=generator)
        loss = head.loss(head(x_train[rows]), train["actions"][rows], train["mask"][rows])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return head.loss(head(x_val), val["actions"], val["mask"])["l1"].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a `vla-peft train` output folder (config.json and bundle/)")
    parser.add_argument("--frames", type=int, default=3000, help="training frames to read (the validation set is read whole)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run)
    run = load_run_config(run_dir / "config.json")
    if run.policy.head != "continuous":
        raise SystemExit(f"{run_dir} has a {run.policy.head!r} head: the probe fits L1 heads, so it reads continuous-head runs")
    run.data["grounding_paths"] = []  # the demonstrations only: play scenes have no actions
    train_set, val_set = build_datasets(data_config_for(run))
    train_set.train = False  # evaluation's centre crop, no random augmentation
    if val_set is None:
        raise SystemExit(f"{run_dir} has no validation episodes (data.val_fraction is 0): the probe scores on them")
    policy = load_bundle(run_dir / "bundle").eval()
    train, val = query_states(policy, train_set, args.frames), query_states(policy, val_set, len(val_set))
    with torch.no_grad():
        own = policy.head.loss(policy.head(val["queries"]), val["actions"], val["mask"])["l1"].item()
    median = train["actions"].median(0).values
    rows = {"the bundle's own head": own,
            "the training chunks' median": (val["actions"] - median).abs()[val["mask"]].mean().item()}
    for kind in ("queries", "queries + state", "state"):
        rows[f"fresh head on {kind}"] = fit_head(train, val, kind, run.policy.head_width, args.steps)
    print(f"{run_dir}: {len(train['queries'])} training frames, {len(val['queries'])} validation frames, {args.steps} steps")
    print(f"{'head':<34} {'val L1':>7}")
    for name, value in rows.items():
        print(f"{name:<34} {value:>7.4f}")


if __name__ == "__main__":
    main()
