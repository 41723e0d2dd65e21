"""The training loop, read top to bottom: data, policy, optimiser, steps, checkpoints, bundle.

Runs on accelerate, so one process, ``torchrun --nproc_per_node N`` or
``accelerate launch`` run the same code. Only the trainable parameters (PEFT modules,
action queries, head, proprio projector) are optimised, checkpointed and saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from vla_peft.data import DataConfig, build_datasets
from vla_peft.policy.bundle import save_bundle, start_from_bundle
from vla_peft.policy.policy import VLAPolicy
from vla_peft.train.checkpoint import list_checkpoints, restore_optimizer, restore_rng, save_checkpoint
from vla_peft.train.config import RunConfig
from vla_peft.typed_config import build_config
from vla_peft.train.metrics import MetricsLog, plot_loss_curve
from vla_peft.train.resume import check_resumable, newest_readable_checkpoint
from vla_peft.train.sampler import StepBatchSampler


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


def adamw(params: list[torch.nn.Parameter], **settings) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (float parameters on the CPU or CUDA): one pass over all
    parameters instead of a dozen small ops per parameter, which for LoRA's many small matrices cost
    about as much as their matmuls (4.4 ms against 0.6 ms per step for the 44 of the tiny base; same
    update up to float rounding). Contiguous parameters only: the fused kernel walks a parameter, its
    gradient and its moments as flat memory, so a transposed one beside a moment restored from a
    checkpoint (always contiguous) would be updated wrongly, without an error."""
    fused = all(p.is_floating_point() and p.is_contiguous() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **settings)


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to the peak, then a cosine down to ``min_ratio`` of it."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def data_config_for(run: RunConfig) -> DataConfig:
    """The data config, with cameras / state keys / chunk size taken from the policy (one source of truth)."""
    fields = {"cameras": run.policy.cameras, "state_keys": run.policy.state_keys, "aux_keys": run.policy.aux_keys,
              "chunk_size": run.policy.chunk_size}
    for key, value in fields.items():
        given = run.data.get(key)
        if given is not None and (list(given) if isinstance(value, list) else given) != value:
            raise ValueError(f"data.{key}={run.data[key]!r} disagrees with policy.{key}={value!r}: set it under policy only")
    return build_config(DataConfig, {**run.data, **fields}, "data")


def fit_policy_to_data(run: RunConfig, train_set) -> None:
    """Fill the policy's state, image and aux sizes and evaluation crop from the data; refuse an action
    size that differs."""
    if train_set.action_dim != run.policy.action_dim:
        raise ValueError(
            f"the dataset's actions have {train_set.action_dim} dimensions but policy.action_dim is "
            f"{run.policy.action_dim}: set policy.action_dim={train_set.action_dim} or use data recorded for this policy"
        )
    data = train_set.config
    run.policy.center_crop = data.crop_scale if data.augment else 1.0  # inference crops as evaluation does
    sample = train_set[0]
    sizes = {"state_dim": sample["state"].shape[-1], "image_size": sample["images"].shape[-1], "aux_dim": sample["aux"].shape[-1]}
    for name, value in sizes.items():
        given = getattr(run.policy, name)
        if given is None:
            setattr(run.policy, name, int(value))
        elif given != value:
            raise ValueError(f"policy.{name}={given} but the dataset gives {value}: remove it from the config or fix the data")


def mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@dataclass
class TrainResult:
    policy: VLAPolicy     # the trained policy, in memory
    summary: dict         # also written to summary.json (empty on processes other than the main one)


def train(run: RunConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train, checkpoint and write the bundle."""
    cfg = run.train
    if not torch.cuda.is_available():
        torch.set_flush_denormal(True)  # denormals slowed CPU training 4-5x after ~100 steps (NOTES.md)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(cfg.mixed_precision))
    out = Path(cfg.output_dir)
    if list_checkpoints(out) and not resume:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue, or choose another train.output_dir")
    if resume:
        checkpoint, (weights, opt_tensors, rng_tensors, state) = newest_readable_checkpoint(out)
    set_seed(cfg.seed)

    # --- data and policy
    data_config = data_config_for(run)
    train_set, val_set = build_datasets(data_config)
    fit_policy_to_data(run, train_set)
    requested = run.to_dict()  # what a resume must match, checked before the model loads
    if resume:
        check_resumable(state.get("config"), requested, state["step"], checkpoint)
    policy = VLAPolicy.from_config(run.policy, run.method, normalizers=train_set.normalizers)
    if cfg.init_from:
        start_from_bundle(policy, cfg.init_from)
    if cfg.gradient_checkpointing:  # the method's name changed within transformers 5.x
        enable = getattr(policy.vlm, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            policy.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    named = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    optimizer = adamw(list(named.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))

    start, elapsed_before = 0, 0.0
    if resume:
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(weights[name])
        restore_optimizer(optimizer, opt_tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
    model, optimizer = accelerator.prepare(policy, optimizer)

    sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, start, cfg.steps,
                               accelerator.process_index, accelerator.num_processes, cfg.grad_accum,
                               train_set.grounding_samples, round(cfg.batch_size * train_set.config.grounding_fraction))
    batches = iter(DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers))
    if resume:  # after everything above that draws from the global RNGs (the iterator does), as when it was saved
        restore_rng(rng_tensors, state["rng"])
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", run.to_dict())
        log = MetricsLog(out / "metrics.jsonl", resume_step=start if resume else None,
                         tensorboard_dir=out / "tensorboard" if cfg.tensorboard else None)
    trainable = sum(p.numel() for p in named.values())
    if main and progress and policy.peft_report is not None:
        print(policy.peft_report)
    bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and main), desc="train", dynamic_ncols=True)

    # --- steps
    model.train()
    t0, window_start, window_samples, last = time.perf_counter(), time.perf_counter(), 0, {}
    for step in range(start, cfg.steps):
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            sync = micro == cfg.grad_accum - 1
            with accelerator.no_sync(model) if not sync else contextlib.nullcontext(), accelerator.autocast():
                result = model(batch)
                accelerator.backward(result["loss"] / cfg.grad_accum)
            for key, value in result.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) / cfg.grad_accum
        metrics = {k: float(v) for k, v in zip(sums, accelerator.reduce(torch.tensor(list(sums.values())), "mean"))}
        if not math.isfinite(metrics["loss"]):
            good = list_checkpoints(out)
            where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written before it"
            if main:
                log.log({"step": step + 1, "diverged": True})
            bar.close()
            raise TrainingDiverged(
                f"loss is {metrics['loss']} at step {step + 1}; training stopped and {where} "
                "(lower train.lr or check the data for NaN, then resume with --resume)"
            )
        grad_norm = float(accelerator.clip_grad_norm_(list(named.values()), cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_samples += cfg.batch_size
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")

        if main and (done % cfg.log_every == 0 or done == cfg.steps):
            now = time.perf_counter()
            last = {"step": done, **metrics, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "samples_per_s": window_samples / (now - window_start), "elapsed_s": elapsed_before + now - t0}
            log.log(last)
            window_start, window_samples = now, 0
        if val_set is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            val = evaluate(accelerator.unwrap_model(model), val_set, cfg)
            if main:
                log.log({"step": done, **val})
            model.train()
        if done % cfg.save_every == 0 or done == cfg.steps:
            if main:
                state = {"scheduler": scheduler.state_dict(), "elapsed_s": elapsed_before + time.perf_counter() - t0,
                         "config": requested}
                save_checkpoint(out, done, named, optimizer, state, cfg.keep_last)
            accelerator.wait_for_everyone()
    bar.close()

    # --- the bundle and the summary
    summary = {}
    if main:
        elapsed = elapsed_before + time.perf_counter() - t0
        save_bundle(policy, out / "bundle", data_config=dataclasses.asdict(data_config),
                    extra={"training": {"steps": cfg.steps, "elapsed_s": round(elapsed, 1)}})
        plot_loss_curve(log.rows, out / "loss_curve.png")
        log.close()
        vals = [r for r in log.rows if "val_loss" in r]
        summary = {
            "steps": cfg.steps, "resumed_from": start if resume else None, "elapsed_s": round(elapsed, 1),
            "processes": accelerator.num_processes, "trainable_parameters": trainable,
            "final": {k: v for k, v in last.items() if k != "step"}, "validation": vals[-1] if vals else None,
            "bundle": str(out / "bundle"),
        }
        write_json_atomic(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return TrainResult(policy, summary)


def write_json_atomic(path: Path, data: dict) -> None:
    """A kill mid-write leaves the old file (or none), never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(policy: VLAPolicy, val_set, cfg) -> dict[str, float]:
    """Mean validation loss and metrics (action L1; token accuracy for the discrete head), and the
    action L1 again with each sample given another sample's images (``val_l1_images_shuffled``).
    A policy whose error barely rises without its own images acts from the state alone: training's
    loss falls, but it cannot find the target in closed loop (docs/results.md, "Seeds")."""
    policy.eval()
    # one fixed draw of frames from every validation episode (the file's order would fill the first
    # batches with one episode's neighbouring frames, whose images are near copies of each other)
    loader = DataLoader(val_set, batch_size=max(1, cfg.batch_size // cfg.grad_accum), shuffle=True,
                        generator=torch.Generator().manual_seed(0), num_workers=cfg.num_workers)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # per metric: a batch of one sample has no other sample's images
    for i, batch in enumerate(loader):
        if i >= cfg.val_batches:
            break
        results = policy(batch)
        if len(batch["images"]) > 1:
            results["l1_images_shuffled"] = policy({**batch, "images": batch["images"].roll(1, 0)})["l1"]
        for key, value in results.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1
    return {f"val_{k}": v / counts[k] for k, v in sums.items()}
