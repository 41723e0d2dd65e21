"""Why a pretrained VLM? Behaviour-cloning baselines beside LoRA on each base: same demonstrations, same minutes.

On one demonstration file and one wall-clock training budget per row (one thread each), side by side:
  mlp   - the state plus the true target_pos / goal_pos (privileged, recorded beside each demo) through an
          MLP: a control bound, as no camera policy is told where the objects are;
  cnn   - a CNN trained from scratch on the frames (what a user would otherwise train): FiLM on the
          instruction's colour words, spatial-softmax keypoints, the toolkit's crop + colour jitter, state;
  lora  - LoRA on a frozen base through the toolkit's own training (vla_peft.train, the task's demo settings
          in configs/tasks/<task>.yaml, or --config), one row per --base; ``--base random`` is a randomly
          initialised copy of the shipped base's shape, with its processor and input normalisation.
Every row predicts chunks of 8 actions and executes 4, and is rolled out by the toolkit's evaluator on
--episodes fresh seeds from 1000 (95 % Wilson intervals; ms per chunk is the p50 of predict_chunk).
A LoRA row's step count is sized to the budget from a 10-step timing run (not counted in its minutes).

    PYTHONPATH=. python bench/policy_baselines.py [--task Push] [--demos PATH] [--minutes 5]
        [--rows mlp cnn lora] [--base PATH | random ...] [--episodes 50] [--threads 1] [section.key=value ...]

Trailing section.key=value overrides go to the LoRA rows' run config (e.g. method.r=16). Missing
demonstrations are collected first (the command is printed): 100 expert demos at 64x64 agentview.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from vla_peft.data import DataConfig, DemoDataset
from vla_peft.data.hdf5 import DemoFile
from vla_peft.eval.evaluate import EvalConfig, evaluate_task
from vla_peft.policy.baselines import BaselinePolicy, PixelCNN, StateMLP
from vla_peft.policy.config import PolicyConfig
from vla_peft.pretrain.base import SHIPPED

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("mlp", "cnn", "lora")
STATE_KEYS = ["ee_pos", "gripper_states"]
PRIVILEGED_KEYS = ("target_pos", "goal_pos")
CHUNK, EXECUTE, IMAGE_SIZE, CROP_SCALE = 8, 4, 64, 0.9
FIRST_EVAL_SEED = 1000
LORA_TIMING_STEPS = 10


# ---------------------------------------------------------------------------------------------- inputs
def ensure_demos(path: Path, task: str, count: int) -> Path:
    """The demonstration file, collected first (command printed) when it is missing."""
    if path.is_file():
        return path
    from vla_peft.data.collect import CollectConfig, collect, format_summary

    print(f"collecting: vla-peft collect --task {task} --episodes {count} --out {path} --image-size {IMAGE_SIZE} "
          "--cameras agentview --seed 0", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(format_summary(collect(CollectConfig(task=task, episodes=count, out=str(path), image_size=IMAGE_SIZE,
                                               cameras=("agentview",), seed=0), progress=False)), flush=True)
    return path


def demo_facts(path: Path) -> tuple[str, int, list[str]]:
    """(task name, number of demos, privileged keys the file holds)."""
    with DemoFile(path) as demo_file:
        keys = set(demo_file.obs_keys())
        task = demo_file.env_args.get("task_name") or ""
        count = len(demo_file.demos)
    privileged = [k for k in PRIVILEGED_KEYS if k in keys]
    if "agentview_rgb" not in keys or not privileged:
        raise ValueError(f"{path} lacks agentview_rgb or target_pos (it has {sorted(keys)}): collect it with "
                         f"`vla-peft collect --task {task or '<task>'} --cameras agentview --image-size {IMAGE_SIZE}`")
    return task, count, privileged


def save_random_base(like: Path, out: Path, seed: int = 0) -> Path:
    """A randomly initialised LLaVA of ``like``'s shape, beside ``like``'s processor, tokenizer and
    image_norm.safetensors (its pretraining records are left out: nothing was pretrained)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(like))
    out.mkdir(parents=True, exist_ok=True)
    for item in like.iterdir():
        if item.is_file() and not item.name.startswith(("model", "pretrain_")) and item.name != "config.json":
            shutil.copy2(item, out / item.name)
    model.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- privileged observations
class PrivilegedObservations(gym.ObservationWrapper):
    """Adds the true ``target_pos`` / ``goal_pos`` to the observation, as collection records them."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        extra = {k: gym.spaces.Box(-1.0, 1.0, v.shape, np.float32) for k, v in env.unwrapped.task_positions().items()}
        self.observation_space = gym.spaces.Dict({**env.observation_space.spaces, **extra})

    def observation(self, observation: dict) -> dict:
        return {**observation, **self.env.unwrapped.task_positions()}


def make_privileged(task: str, **kwargs) -> gym.Env:
    from envs import tasks

    return PrivilegedObservations(getattr(tasks, f"{task}Env")(**kwargs))


def privileged_env_id(task: str) -> str:
    """A gymnasium id for ``task`` whose observations carry the privileged positions (registered once)."""
    import envs

    env_id = f"vla_peft_privileged/{task}-v0"
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=make_privileged, kwargs={"task": task},
                     max_episode_steps=envs.MAX_EPISODE_STEPS[task])
    return env_id


# ------------------------------------------------------------------------------ the small policies
def train_baseline(kind: str, demos: Path, privileged: list[str], minutes: float, batch_size: int, lr: float,
                   seed: int) -> tuple[BaselinePolicy, int, float]:
    """Train the MLP or the CNN for ``minutes`` of wall clock: (policy, steps, seconds). The learning
    rate warms up over 50 steps, then follows a cosine over the budget's elapsed fraction."""
    torch.manual_seed(seed)
    state_keys = STATE_KEYS + (privileged if kind == "mlp" else [])
    data = DataConfig(paths=[str(demos)], cameras=["agentview"], state_keys=state_keys, chunk_size=CHUNK,
                      val_fraction=0.0, cache=True, augment=kind == "cnn", crop_scale=CROP_SCALE)
    dataset = DemoDataset(data)
    state_dim = dataset.episodes[0].state.shape[-1]
    net_class = StateMLP if kind == "mlp" else PixelCNN
    net = net_class(state_dim, dataset.action_dim, CHUNK)
    config = PolicyConfig(cameras=["agentview"], image_size=dataset.image_shape[0], state_keys=state_keys,
                          state_dim=state_dim, action_dim=dataset.action_dim, chunk_size=CHUNK, execute_steps=EXECUTE,
                          center_crop=CROP_SCALE if data.augment else 1.0)
    policy = BaselinePolicy(net, config, dataset.normalizers)
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**9, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    budget, steps = minutes * 60, 0
    start = time.perf_counter()
    for batch in DataLoader(dataset, batch_size=batch_size, sampler=sampler):
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            break
        factor = min(1.0, (steps + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        images = batch["images"][:, 0, -1] if net.needs_images else None
        loss = policy.loss(images, batch["state"][:, -1], list(batch["instruction"]), batch["actions"],
                           batch["action_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        steps += 1
    seconds = time.perf_counter() - start
    dataset.close()
    return policy, steps, seconds


# --------------------------------------------------------------------------------------- LoRA rows
def lora_run_config(args, base: Path, demos: Path, out: Path, steps: int, log_every: int = 10):
    """The LoRA row's run config: --config, else the task's demo settings with configs/peft/lora.yaml."""
    from vla_peft.demo import DEFAULT_METHOD, load_task_settings
    from vla_peft.train.config import load_run_config

    quoted = json.dumps  # YAML reads JSON: paths with any characters stay strings
    fixed = [f"policy.base={quoted(str(base))}", f"data.paths={quoted([str(demos)])}",
             f"train.output_dir={quoted(str(out))}", f"train.steps={steps}",
             f"train.seed={args.seed}", f"train.threads={args.threads}", f"train.save_every={steps}",
             f"train.eval_every={steps}", f"train.log_every={log_every}", "train.keep_last=1"]
    if args.config:
        return load_run_config(args.config, [*args.overrides, *fixed])
    settings = load_task_settings(args.task)
    raw = {"policy": settings.get("policy") or {}, "method": str(DEFAULT_METHOD), "data": settings.get("data") or {},
           "train": settings.get("train") or {}}
    return load_run_config(raw, [*args.overrides, *fixed])


def train_lora(args, base: Path, demos: Path, out: Path):
    """Time a short run, size the real one to the budget, train it: (policy, steps, seconds, trainable)."""
    from vla_peft.train import train

    train(lora_run_config(args, base, demos, out / "timing", LORA_TIMING_STEPS, log_every=1),
          progress=False)
    rows = [json.loads(line) for line in (out / "timing" / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows if "elapsed_s" in r}
    per_step = (elapsed[LORA_TIMING_STEPS] - elapsed[1]) / (LORA_TIMING_STEPS - 1)  # the first step warms caches
    steps = max(1, int(args.minutes * 60 / per_step))
    run = lora_run_config(args, base, demos, out / "run", steps)
    result = train(run, progress=False)
    result.policy.eval()
    return result.policy, steps, result.summary["elapsed_s"], result.summary["trainable_parameters"]


# ------------------------------------------------------------------------------------------- table
def evaluate_row(policy, task: str, episodes: int, out: Path, env_id: str | None = None) -> dict:
    env_kwargs = {}
    if env_id is not None:  # not one of our ids: the evaluator passes exactly these
        env_kwargs = {"image_size": policy.config.image_size, "cameras": tuple(policy.config.cameras),
                      "terminate_on_success": True}
    config = EvalConfig(episodes=episodes, seed=FIRST_EVAL_SEED, env_id=env_id, env_kwargs=env_kwargs,
                        out=str(out), progress=False)
    summary, _, timing = evaluate_task(policy, task, config, out)
    return {**summary, "chunk_ms": timing["latency_ms"]["chunk"]["p50"]}


def base_label(base: str) -> str:
    return "shipped" if Path(base).resolve() == SHIPPED.resolve() else ("random" if base == "random" else Path(base).name)


def format_table(rows: list[dict]) -> str:
    width = max([22, *(len(r["row"]) for r in rows)])
    head = f"{'row':<{width}} {'trainable':>9} {'steps':>6} {'train min':>9} {'success':>8} {'95% CI':>14} {'ms/chunk':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ci = f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"
        ms = "-" if r["chunk_ms"] is None else f"{r['chunk_ms']:.1f}"
        lines.append(f"{r['row']:<{width}} {r['trainable']:>9,} {r['steps']:>6} {r['seconds'] / 60:>9.1f} "
                     f"{100 * r['success_rate']:>7.1f}% {ci:>14} {ms:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="Push", help="Reach, Push or PickPlace (default: Push)")
    parser.add_argument("--demos", type=Path, default=None,
                        help="demonstration file (default: <out>/<task>_<num-demos>.hdf5, collected if missing)")
    parser.add_argument("--num-demos", type=int, default=100, help="demos to collect when the file is missing (default: 100)")
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget per row (default: 5)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="which rows (default: all)")
    parser.add_argument("--base", action="append", default=None,
                        help="a base for a LoRA row, repeatable: a checkpoint directory or 'random' (default: the shipped base)")
    parser.add_argument("--episodes", type=int, default=50, help="closed-loop episodes per row, seeds from 1000 (default: 50)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every row (default: 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="the MLP's and CNN's batch (default: 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="the MLP's and CNN's peak learning rate (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every row (default: 0)")
    parser.add_argument("--config", default=None, help="a configs/train/*.yaml for the LoRA rows (default: the task's demo settings)")
    parser.add_argument("--out", type=Path, default=Path("runs/policy_baselines"),
                        help="demos, LoRA runs and eval files go here (default: runs/policy_baselines)")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value for the LoRA rows' run config (before --rows, which takes a list)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.episodes < 1:
        parser.error("--minutes must be > 0 and --episodes >= 1")
    bases = args.base or [str(SHIPPED)]
    for base in bases if "lora" in args.rows else []:  # checked before any row trains
        if base != "random" and not (Path(base) / "config.json").is_file():
            parser.error(f"--base {base}: no checkpoint there (no config.json); give a base directory or 'random'")
    if args.config and not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file; the built-in run configs are in configs/train/")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    run_dir = args.out / time.strftime("%Y%m%d-%H%M%S")
    demos = ensure_demos(args.demos or args.out / f"{args.task.lower()}_{args.num_demos}.hdf5", args.task, args.num_demos)
    task, count, privileged = demo_facts(demos)
    if task and task != args.task:
        raise ValueError(f"{demos} holds {task} demonstrations, not {args.task}: pass --task {task} or other --demos")

    rows = []
    for kind in args.rows:
        if kind == "lora":
            continue
        print(f"== {kind}: training {args.minutes:g} min", flush=True)
        policy, steps, seconds = train_baseline(kind, demos, privileged, args.minutes, args.batch_size, args.lr, args.seed)
        env_id = privileged_env_id(args.task) if kind == "mlp" else None
        label = "MLP, privileged state" if kind == "mlp" else "CNN, from scratch"
        result = evaluate_row(policy, args.task, args.episodes, run_dir / kind, env_id)
        rows.append({"row": label, "trainable": sum(p.numel() for p in policy.parameters()), "steps": steps,
                     "seconds": seconds, **result})
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    if "lora" in args.rows:
        for i, base in enumerate(bases):
            label = base_label(base)
            out = run_dir / f"lora_{i}_{label}"
            path = save_random_base(SHIPPED, out / "random_base", args.seed) if base == "random" else Path(base)
            print(f"== LoRA on {label} base ({path}): training {args.minutes:g} min", flush=True)
            policy, steps, seconds, trainable = train_lora(args, path, demos, out)
            result = evaluate_row(policy, args.task, args.episodes, out / "eval")
            rows.append({"row": f"LoRA, {label} base", "trainable": trainable, "steps": steps, "seconds": seconds,
                         **result})
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
            del policy

    print(f"\n{args.task}: {count} demos ({demos}), {args.minutes:g} min of training per row on {args.threads} "
          f"thread(s), seed {args.seed}")
    print(format_table(rows))
    print(f"({args.episodes} closed-loop episodes per row from seed {FIRST_EVAL_SEED}; 95% Wilson intervals; "
          f"privileged state: {'+'.join(STATE_KEYS + privileged)}; chunks of 8, 4 executed; ms/chunk: p50 of "
          "predict_chunk)")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
