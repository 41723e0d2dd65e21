"""Perception probe: how precisely a base's frozen features say where each named object is.

Judges a base before any policy is trained. Frames come from the scripted experts' own
episodes of every task (what a policy sees: arm in view, cubes pushed, lifted, held), both
cameras, on seeds no pretraining uses; the probe trains on other episodes plus posed scenes
(many layouts, cheap to render: a probe that sees few layouts measures itself, not the base)
and is scored on held-out episodes. Two readers of the frozen base, each with a small probe trained here:
  image  - the projected image tokens (what the language model reads): the object's name
           attends over them, an MLP regresses its table (x, y);
  prompt - the language model's last-layer states while it answers "USER: <image> where is the
           <name>? ASSISTANT:" with its own greedy "x <column> y <row>" (at "x" and at "y", the
           tokens that predict the two numbers), through an MLP.
Both probes also get the grasp point (x, y, z), which the policy has as state (the wrist
camera rides on the gripper). The figure is the RMS distance in cm on the table between the
probe's (x, y) and the truth; "mean" is predicting each name's mean position. Besides the
columns per task, the cubes are split into lifted, at the fingers and free (``_where``).
Camera ``both``: the objects in view of agentview, read from the tokens of agentview and wrist
images of the same moment side by side (what a policy with both cameras reads; image reader only).

    vla-peft bench perception [--bases shipped random PATH ...] [--episodes 240] [--threads 2]

Rows: the shipped base, a randomly initialised base of the same shape (given the shipped
base's input normalisation) and any checkpoint directory. A few minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from envs.scene import CUBE_HALF
from vla_peft.models import load_vlm
from vla_peft.models.image_norm import load_image_norm
from vla_peft.pretrain.base import SHIPPED
from vla_peft.pretrain.locator import GRIPPER, NAMES, name_index
from vla_peft.pretrain.scenes import CAMERAS, SceneSet, render_scenes
from vla_peft.pretrain.train import QATokenizer, make_pixels

TASKS = ("Reach", "Push", "PickPlace", "Stack")
LIFTED = 0.01  # a cube whose centre is this far above its resting height counts as lifted (m)
FINGERS = 0.04  # a resting cube this close to the grasp point in (x, y) counts as under the fingers (m)


def frames(episodes: int, seed: int, size: int, posed: int = 0) -> SceneSet:
    """Frames of the experts' own episodes (no noise, no dashes): 6 snapshots of each, both cameras;
    then ``posed`` posed scenes (scenes.py)."""
    sets = [render_scenes(episodes * 6 * len(CAMERAS), seed=seed, image_size=size, snapshots_per_episode=6,
                          action_noise=0.0, dash_fraction=0.0, progress=False)]
    if posed:
        sets.append(render_scenes(posed, seed=seed + 1, image_size=size, posed_fraction=1.0, progress=False))
    return SceneSet(images=torch.cat([s.images for s in sets]), annotations=[a for s in sets for a in s.annotations])


def samples(scenes: SceneSet, camera: str) -> list[tuple[int, int, str, np.ndarray, float]]:
    """(image index, name index, name, table (x, y), height) for every cube and pad in view of ``camera``."""
    out = []
    for i, a in enumerate(scenes.annotations):
        if a["camera"] == camera:
            for o in a["objects"]:
                if o["visible"]:
                    out.append((i, name_index(o["kind"], o["colour"]), f"{o['colour']} {o['kind']}",
                                np.array([o["x"], o["y"]]), o["z"]))
    return out


@torch.no_grad()
def image_tokens(model, scenes: SceneSet, norm) -> torch.Tensor:
    """(N, T, D) projected image tokens of every frame."""
    out = []
    for start in range(0, len(scenes), 256):
        idx = list(range(start, min(start + 256, len(scenes))))
        feats = model.model.get_image_features(pixel_values=make_pixels(scenes, norm, idx)).pooler_output
        out.append(torch.stack(list(feats)))
    return torch.cat(out)


@torch.no_grad()
def prompt_states(model, qat: QATokenizer, scenes: SceneSet, norm, rows) -> torch.Tensor:
    """(len(rows), 2 D): the LM's last-layer states where it answers "where is the <name>?" with its
    own greedy "x <column> y <row>": at "x" (which predicts the column) and at "y" (the row). The
    state at the prompt's end only predicts the fixed "x"."""
    out = []
    for start in range(0, len(rows), 256):
        chunk = rows[start : start + 256]
        ids = [qat.conversation([(f"where is the {name}?", "")])[0][:-1] for _, _, name, _, _ in chunk]  # no answer, no </s>
        length = max(map(len, ids))
        batch = torch.full((len(ids), length), qat.tok.pad_token_id)
        mask = torch.zeros_like(batch)
        for b, seq in enumerate(ids):  # left-padded, so the last position is every row's prompt end
            batch[b, length - len(seq) :] = torch.tensor(seq)
            mask[b, length - len(seq) :] = 1
        answer = model.generate(input_ids=batch, attention_mask=mask, pixel_values=make_pixels(scenes, norm, [r[0] for r in chunk]),
                                max_new_tokens=4, min_new_tokens=4, do_sample=False, output_hidden_states=True,
                                return_dict_in_generate=True, pad_token_id=qat.tok.pad_token_id)
        out.append(torch.cat([answer.hidden_states[1][-1][:, -1], answer.hidden_states[3][-1][:, -1]], -1))
    return torch.cat(out)


class Probe(nn.Module):
    """Image reader: name attends over the tokens; prompt reader: an MLP on the state. Both see the grasp point."""

    def __init__(self, dim: int, attend: bool, width: int = 256) -> None:
        super().__init__()
        self.names = nn.Embedding(NAMES, dim) if attend else None
        self.attend = nn.MultiheadAttention(dim, 4, batch_first=True) if attend else None
        self.norm = nn.LayerNorm(dim)
        inputs = (2 * dim if attend else dim) + 3
        self.mlp = nn.Sequential(nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 2))

    def forward(self, feats: torch.Tensor, names: torch.Tensor, ee: torch.Tensor) -> torch.Tensor:
        feats = self.norm(feats)
        if self.attend is not None:
            query = self.names(names)[:, None]
            pooled, _ = self.attend(query, feats, feats, need_weights=False)
            feats = torch.cat([pooled[:, 0], query[:, 0]], -1)
        return self.mlp(torch.cat([feats, ee * 10], -1))


def fit_probe(train, test, attend: bool, steps: int, seed: int) -> np.ndarray:
    """Train on ``train`` = (feats, names, ee, xy), return the test errors (cm) per row."""
    torch.manual_seed(seed)
    feats, names, ee, xy = train
    probe = Probe(feats.shape[-1], attend)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = torch.randint(len(xy), (256,), generator=g)
        loss = nn.functional.smooth_l1_loss(probe(feats[b], names[b], ee[b]) * 10, xy[b] * 10, beta=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        pred = probe(*test[:3])
    return (pred - test[3]).norm(dim=-1).numpy() * 100


def rms(errors: np.ndarray) -> float:
    return float(np.sqrt(np.mean(errors**2))) if len(errors) else math.nan


def build_random(like):
    """A randomly initialised base of ``like``'s shape (its processor and input normalisation reused)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(like.config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", nargs="+", default=["shipped", "random"],
                        help="rows: 'shipped', 'random' (the shipped shape, random weights) or checkpoint directories")
    parser.add_argument("--episodes", type=int, default=240, help="probe-training episodes (test: a quarter as many)")
    parser.add_argument("--posed", type=int, default=8000, help="posed scenes added to the probe's training set")
    parser.add_argument("--steps", type=int, default=1500, help="probe training steps")
    parser.add_argument("--cameras", nargs="+", default=list(CAMERAS), choices=[*CAMERAS, "both"],
                        help="agentview, wrist, or both (agentview's objects, both images' tokens; image reader only)")
    parser.add_argument("--readers", nargs="+", default=["image", "prompt"], choices=["image", "prompt"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if "both" in args.cameras and "prompt" in args.readers:
        parser.error("--cameras both reads the image tokens only: add --readers image")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    rows = []
    for name in args.bases:
        path = SHIPPED if name in ("shipped", "random") else name
        model, proc = load_vlm(path)
        norm = load_image_norm(path)
        if norm is None:
            raise SystemExit(f"{name} has no image_norm.safetensors: probe a `vla-peft pretrain-base` checkpoint")
        rows.append((name, build_random(model) if name == "random" else model, proc, norm))

    began = time.perf_counter()
    sets = {}
    for size in sorted({m.config.vision_config.image_size for _, m, _, _ in rows}):
        sets[size] = (frames(args.episodes, 900_001, size, args.posed), frames(max(8, args.episodes // 4), 900_003, size))
    print(f"rendered probe frames in {time.perf_counter() - began:.0f} s (train: {args.episodes} expert episodes "
          f"+ {args.posed} posed images; test: {max(8, args.episodes // 4)} other expert episodes; 6 snapshots each, both cameras)")

    header = (f"{'base':<28} {'reader':<7} {'camera':<10} " + " ".join(f"{t:>9}" for t in TASKS) + f" {'all cubes':>9} {'pads':>6} "
              + " ".join(f"{w:>10}" for w in ("lifted", "at fingers", "free")))
    print("\nnamed object's table (x, y) from frozen features: RMS error in cm on held-out expert episodes")
    print(header)
    print("-" * len(header))
    mean_printed = False
    for label, model, proc, norm in rows:
        train_set, test_set = sets[model.config.vision_config.image_size]
        qat = QATokenizer(proc.tokenizer, model.config.image_seq_length)
        tokens = {which: image_tokens(model, s, norm) for which, s in (("train", train_set), ("test", test_set))}
        for camera in args.cameras:
            data = {}
            for which, s in (("train", train_set), ("test", test_set)):
                rs = samples(s, "agentview" if camera == "both" else camera)
                names = torch.tensor([r[1] for r in rs])
                ee = torch.tensor(np.array([[s.annotations[r[0]]["gripper"][k] for k in "xyz"] for r in rs]), dtype=torch.float32)
                xy = torch.tensor(np.array([r[3] for r in rs]), dtype=torch.float32)
                states = prompt_states(model, qat, s, norm, rs) if "prompt" in args.readers else None
                data[which] = (rs, names, ee, xy, _features(tokens[which], s, [r[0] for r in rs], camera), states)
            tasks = np.array([test_set.annotations[r[0]]["task"] for r in data["test"][0]])
            is_cube = (data["test"][1] < GRIPPER // 2).numpy()
            where = _where(test_set, data["test"][0], is_cube)
            if not mean_printed:  # the baseline depends on the frames only
                means = {int(n): data["train"][3][data["train"][1] == n].mean(0) for n in data["train"][1].unique()}
                err = torch.stack([data["test"][3][k] - means.get(int(n), data["train"][3].mean(0)) for k, n in enumerate(data["test"][1])])
                _print_row("(predict the mean)", "-", camera, err.norm(dim=-1).numpy() * 100, tasks, is_cube, where)
            for reader, feats_at, attend in [r for r in (("image", 4, True), ("prompt", 5, False)) if r[0] in args.readers]:
                train = (data["train"][feats_at], data["train"][1], data["train"][2], data["train"][3])
                test = (data["test"][feats_at], data["test"][1], data["test"][2], data["test"][3])
                errors = fit_probe(train, test, attend, args.steps, seed=0)
                _print_row(label, reader, camera, errors, tasks, is_cube, where)
        mean_printed = True
    print(f"\n{time.perf_counter() - began:.0f} s in all; probe: {args.steps} steps at batch 256 per row")


def _features(tokens: torch.Tensor, scenes: SceneSet, indices: list[int], camera: str) -> torch.Tensor:
    """The image tokens of each row's frame; for ``both``, followed by the wrist frame of the same
    moment (rendered right after its agentview frame)."""
    if camera != "both":
        return tokens[indices]
    wrist = [i + 1 for i in indices]
    assert all(scenes.annotations[i]["camera"] == "wrist" for i in wrist), "frames come in (agentview, wrist) pairs"
    return torch.cat([tokens[indices], tokens[wrist]], dim=1)


def _where(scenes: SceneSet, rows, is_cube: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of the cubes that tell where a base fails: lifted (held, or stacked on another cube),
    resting within FINGERS of the grasp point in (x, y) (being grasped or pushed: the arm covers
    them), and the rest."""
    lifted, fingers = np.zeros(len(rows), bool), np.zeros(len(rows), bool)
    for k, (i, _, _, xy, z) in enumerate(rows):
        if not is_cube[k]:
            continue
        grip = scenes.annotations[i]["gripper"]
        lifted[k] = z > CUBE_HALF + LIFTED
        fingers[k] = not lifted[k] and np.hypot(grip["x"] - xy[0], grip["y"] - xy[1]) < FINGERS
    return {"lifted": lifted, "at fingers": fingers, "free": is_cube & ~lifted & ~fingers}


def _print_row(label: str, reader: str, camera: str, errors: np.ndarray, tasks: np.ndarray, is_cube: np.ndarray,
               where: dict[str, np.ndarray]) -> None:
    cells = [rms(errors[(tasks == t) & is_cube]) for t in TASKS]
    print(f"{label[-28:]:<28} {reader:<7} {camera:<10} " + " ".join(f"{c:>9.2f}" for c in cells)
          + f" {rms(errors[is_cube]):>9.2f} {rms(errors[~is_cube]):>6.2f} "
          + " ".join(f"{rms(errors[m]):>10.2f}" for m in where.values()), flush=True)


if __name__ == "__main__":
    main()
