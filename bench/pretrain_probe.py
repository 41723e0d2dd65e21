"""Where does pretraining get stuck: the vision tower, or the language model?

Trains a fresh tiny LLaVA on ONE question type, agentview images only, and prints held-out
exact match beside the majority-answer chance every ``--eval-every`` steps. Two switches
separate the suspects:

- ``--dense-aux W``: adds W x a per-patch loss (a throwaway linear head on the projector's
  output predicts which cube / pad / gripper sits in each 2x2 sub-cell of each patch). Its
  loss falling well below the all-empty baseline shows the vision tower *can* learn the scene.
- ``--oracle``: replaces the projector's output by perfect features (that same per-patch
  target through a fixed random matrix), so only the language model is left to learn.

Usage (reuse the scenes a `vla-peft pretrain-base` run cached):
    PYTHONPATH=$PWD python bench/pretrain_probe.py --scenes runs/tiny_base/train_state --type exists --oracle
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from envs.scene import COLOURS
from vla_peft.models.tiny import TinyLlavaSpec, build_tiny_llava
from vla_peft.pretrain.scenes import SceneSet
from vla_peft.pretrain.train import QATokenizer, draw_conversations, fit_image_norm, make_batch

CELLS = 2  # sub-cells per patch side: with 4x4 patches this is the 8x8 grid of `where`


def agentview(scenes: SceneSet) -> SceneSet:
    keep = [i for i, a in enumerate(scenes.annotations) if a["camera"] == "agentview"]
    return SceneSet(images=scenes.images[keep], annotations=[scenes.annotations[i] for i in keep])


def patch_targets(annotations: list[dict], grid: int) -> torch.Tensor:
    """(B, grid*grid, CELLS*CELLS*K) multi-hot: which object (kind x colour, or gripper) is in which sub-cell."""
    colours = sorted(COLOURS)
    k_all = 2 * len(colours) + 1
    out = torch.zeros(len(annotations), grid * grid, CELLS * CELLS * k_all)
    fine = grid * CELLS
    for b, scene in enumerate(annotations):
        items = [
            (o["u"], o["v"], (o["kind"] == "pad") * len(colours) + colours.index(o["colour"]))
            for o in scene["objects"]
            if o["visible"]
        ]
        if scene["gripper"]["visible"]:
            items.append((scene["gripper"]["u"], scene["gripper"]["v"], k_all - 1))
        for u, v, k in items:
            cu, cv = min(int(u * fine), fine - 1), min(int(v * fine), fine - 1)
            out[b, (cv // CELLS) * grid + cu // CELLS, ((cv % CELLS) * CELLS + cu % CELLS) * k_all + k] = 1
    return out


@torch.no_grad()
def accuracy(model, scenes, norm, qat, qtype: str, current: dict, n: int = 256) -> tuple[float, float]:
    """Teacher-forced exact match of the answer and the majority-answer rate, on ``scenes``."""
    model.eval()
    convs = draw_conversations(scenes, {qtype: 1.0}, n, 1, np.random.default_rng(7))
    correct = 0
    for s in range(0, n, 64):
        chunk = convs[s : s + 64]
        current["annotations"] = [scenes.annotations[i] for i, _ in chunk]
        batch = make_batch(scenes, norm, qat, chunk)
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1]
        target = labels[:, 1:]
        correct += int(((logits.argmax(-1) == target) | (target == -100)).all(1).sum())
    model.train()
    answers = [c[0][2] for _, c in convs]
    return correct / n, max(answers.count(a) for a in set(answers)) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=Path, required=True, help="train_state dir of a pretrain-base run")
    ap.add_argument("--type", default="exists")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dense-aux", type=float, default=0.0)
    ap.add_argument("--oracle", action="store_true")
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)

    all_train = SceneSet.load(args.scenes / "scenes_train.safetensors")
    norm = fit_image_norm(all_train)
    train = agentview(all_train)
    held = agentview(SceneSet.load(args.scenes / "scenes_eval.safetensors"))
    spec = TinyLlavaSpec()
    grid = spec.image_size // spec.patch_size
    model, tokenizer = build_tiny_llava(0, spec)
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.mul_(10.0)
    qat = QATokenizer(tokenizer, grid * grid)
    n_targets = patch_targets(train.annotations[:1], grid).shape[-1]

    current: dict = {}  # the annotations of the batch in flight, for the hooks
    projector = model.model.multi_modal_projector
    projector.register_forward_hook(lambda m, i, o: current.__setitem__("features", o))
    if args.oracle:
        mixing = torch.randn(n_targets, spec.text_hidden, generator=torch.Generator().manual_seed(0)) * 0.05
        projector.register_forward_hook(lambda m, i, o: patch_targets(current["annotations"], grid) @ mixing + 0 * o)
    head = torch.nn.Linear(spec.text_hidden, n_targets)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    print(f"{'step':>5} {'s':>5} {'lm loss':>8} {'dense':>7} {args.type + ' acc':>12} {'chance':>7}")
    model.train()
    t0, lm_losses, dense_losses = time.monotonic(), [], []
    for step in range(args.steps):
        convs = draw_conversations(train, {args.type: 1.0}, args.batch, 1, np.random.default_rng([0, step]))
        current["annotations"] = [train.annotations[i] for i, _ in convs]
        batch = make_batch(train, norm, qat, convs)
        for g in optimizer.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 30)
        loss = model(**batch).loss
        total = loss
        if args.dense_aux > 0:
            target = patch_targets(current["annotations"], grid)
            dense = torch.nn.functional.binary_cross_entropy_with_logits(head(current["features"]), target)
            total = loss + args.dense_aux * dense
            dense_losses.append(dense.item())
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lm_losses.append(loss.item())
        if (step + 1) % args.eval_every == 0:
            acc, chance = accuracy(model, held, norm, qat, args.type, current)
            dense_txt = f"{np.mean(dense_losses[-50:]):.4f}" if dense_losses else "-"
            print(
                f"{step + 1:>5} {time.monotonic() - t0:>5.0f} {np.mean(lm_losses[-50:]):>8.3f} {dense_txt:>7} {acc:>12.1%} {chance:>7.1%}",
                flush=True,
            )
    if args.dense_aux > 0:
        p = float(patch_targets(train.annotations, grid).mean())
        baseline = -(p * np.log(p) + (1 - p) * np.log(1 - p))
        print(f"dense loss of predicting 'empty' everywhere (best without seeing): {baseline:.4f}")


if __name__ == "__main__":
    main()
