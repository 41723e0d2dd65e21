"""`vla-peft demo`: the whole toolkit in one run, on the tiny pretrained base.

For each task: collect scripted-expert demonstrations, train one PEFT task bundle on the
one frozen base; then evaluate every bundle in closed loop, swapping bundles on one loaded
base (AdapterBank), and print one table. Nothing here is new machinery: it calls
``collect``, ``train``, ``AdapterBank`` and ``evaluate`` with per-task settings from
``configs/tasks/<task>.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TASK_CONFIGS = ROOT / "configs" / "tasks"
DEFAULT_METHOD = ROOT / "configs" / "peft" / "lora.yaml"
DEFAULT_TASKS = ("Reach", "Push", "PickPlace")
TASK_SECTIONS = ("task", "collect", "policy", "data", "train")
COLLECT_KEYS = ("episodes", "image_size", "seed", "workers", "max_attempts", "action_noise", "after_success")
# play_episodes > 0: also record that many scenes of undirected play (max play_max_steps steps each) for
# the grounding targets (data.grounding_paths); their seeds start at PLAY_SEED + seed, clear of evaluation's
PLAY_KEYS = ("play_episodes", "play_max_steps")
PLAY_SEED = 1_000_000
# Demo-wide evaluation (one eval_info.json for all tasks); `eval.key=value` overrides any EvalConfig field.
EVAL_DEFAULTS = {"episodes": 20, "seed": 1000, "videos": 2}
# --quick: a smoke run of every stage (minutes, not a measurement).
QUICK = ["collect.episodes=4", "collect.play_episodes=4", "train.steps=4", "train.batch_size=8", "train.warmup_steps=1",
         "train.eval_every=4", "train.save_every=4", "train.log_every=1", "eval.episodes=2", "eval.videos=1",
         "eval.max_steps=12"]


@dataclass
class DemoConfig:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    method: str = str(DEFAULT_METHOD)
    base: str | None = None          # None: the tiny pretrained base (shipped, cached, else built)
    out: str | None = None           # None: runs/demo-<timestamp>
    seed: int = 0
    quick: bool = False
    jobs: int = 2                    # tasks collected and trained at once, one process (one thread) each
    overrides: list[str] = field(default_factory=list)   # section.key=value, applied to every task


def split_overrides(pairs: list[str]) -> tuple[dict[str, dict], list[str]]:
    """``collect.*`` and ``eval.*`` are the demo's own; ``policy/method/data/train.*`` go to the run config."""
    own, run = {"collect": {}, "eval": {}}, []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if sep and key == "method":
            raise ValueError(f"override {pair!r}: choose the method with --method {value} (overrides are section.key=value)")
        if not sep or not dot:
            raise ValueError(f"override {pair!r} must look like section.key=value (e.g. train.steps=300)")
        if section in own:
            own[section][name] = yaml.safe_load(value)
        elif section in ("policy", "method", "data", "train"):
            run.append(pair)
        else:
            near = difflib.get_close_matches(section, ["collect", "policy", "method", "data", "train", "eval"], n=2)
            raise ValueError(f"override {pair!r}: unknown section {section!r}; nearest: {near}; "
                             "use collect, policy, method, data, train or eval")
    return own, run


def check_keys(given: dict, valid, where: str) -> None:
    """Refuse unknown keys, naming the nearest valid ones (as the run config loader does)."""
    valid = list(valid)
    for key in given:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3, cutoff=0.4)
            raise ValueError(f"{where}: unknown key {key!r}; nearest valid keys: {near or valid}")


def load_task_settings(task: str) -> dict:
    """``configs/tasks/<task>.yaml`` (file names are lower case)."""
    path = TASK_CONFIGS / f"{task.lower()}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in TASK_CONFIGS.glob("*.yaml"))
        raise FileNotFoundError(f"no demo settings for task {task!r} at {path}; known tasks: {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    check_keys(raw, TASK_SECTIONS, str(path))
    check_keys(raw.get("collect") or {}, COLLECT_KEYS + PLAY_KEYS, f"{path} collect")
    return raw


def eval_config(values: dict, out: Path, seed: int):
    from vla_peft.eval.evaluate import EvalConfig

    check_keys(values, [f.name for f in dataclasses.fields(EvalConfig)], "eval")
    merged = {**EVAL_DEFAULTS, "seed": EVAL_DEFAULTS["seed"] + seed, **values, "out": str(out)}
    return EvalConfig.from_dict(merged)


def resolve_method(method: str) -> str:
    """A method config path as given, else relative to the checkout (``configs/peft/...`` from any directory)."""
    if method in ("none", "") or Path(method).exists() or not (ROOT / method).exists():
        return method
    return str(ROOT / method)


def method_label(run) -> str:
    """The method's name; LoRA over a 4-bit base is QLoRA, whichever setting asked for the 4 bits."""
    if run.method is None:
        return "head-only"
    four_bit = getattr(run.method, "load_in_4bit", False) or run.policy.load_in_4bit
    return "qlora" if four_bit and run.method.method == "lora" else run.method.method


def prepare_task(task: str, config: DemoConfig, base: str, out: Path, own: dict, run_overrides: list[str]):
    """The collect settings and the run config of one task, every override applied and checked."""
    from vla_peft.data.collect import CollectConfig
    from vla_peft.data.dataset import DataConfig
    from vla_peft.train.config import load_run_config

    settings = load_task_settings(task)
    check_keys(own["collect"], COLLECT_KEYS + PLAY_KEYS, "collect override")
    collect = {"seed": config.seed, **(settings.get("collect") or {}), **own["collect"]}
    play = {key: collect.pop(key) for key in PLAY_KEYS if key in collect}
    policy = {**(settings.get("policy") or {}), "base": base}
    data_path, play_path = out / "data" / f"{task}.hdf5", out / "data" / f"{task}_play.hdf5"
    data = {**(settings.get("data") or {}), "paths": [str(data_path)]}
    if play.get("play_episodes"):
        data["grounding_paths"] = [str(play_path)]
    raw = {
        "policy": policy,
        "method": resolve_method(config.method),
        "data": data,
        "train": {"seed": config.seed, **(settings.get("train") or {}), "output_dir": str(out / "train" / task)},
    }
    run = load_run_config(raw, run_overrides)
    check_keys(run.data, [f.name for f in dataclasses.fields(DataConfig)], "data")
    collect_config = CollectConfig(task=settings.get("task", task), out=str(data_path),
                                   cameras=tuple(run.policy.cameras), **collect)
    play_config = None
    if play.get("play_episodes"):
        play_config = dataclasses.replace(collect_config, out=str(play_path), episodes=play["play_episodes"],
                                          seed=PLAY_SEED + config.seed, play=True, max_steps=play.get("play_max_steps"),
                                          action_noise=0.0, after_success=0)
    return collect_config, play_config, run


def run_demo(config: DemoConfig) -> dict:
    """Collect, train and evaluate every task; write ``demo_summary.json`` and return it."""
    from vla_peft.eval.evaluate import evaluate, write_json_atomic
    from vla_peft.pretrain.base import default_base_path

    started = time.perf_counter()
    out = Path(config.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose another --out (each demo writes a fresh folder)")
    overrides = (QUICK if config.quick else []) + list(config.overrides)
    own, run_overrides = split_overrides(overrides)
    if not config.tasks:
        raise ValueError("--tasks is empty: name at least one task, e.g. --tasks Reach")
    # Check every task's settings before any long work (building the base included) starts.
    prepared = {task: prepare_task(task, config, config.base or "", out, own, run_overrides) for task in config.tasks}
    evaluation = eval_config(own["eval"], out, config.seed)
    if config.base is None:
        print("base: the tiny pretrained base (building it once if neither shipped nor cached) ...", flush=True)
    base = str(config.base or default_base_path())
    for *_, run in prepared.values():
        run.policy.base = base
    out.mkdir(parents=True, exist_ok=True)
    print(f"base: {base}\noutput: {out}", flush=True)

    jobs = max(1, min(config.jobs, len(prepared)))
    if jobs == 1:
        rows = {task: collect_and_train(task, *prepared[task]) for task in prepared}
    else:  # each task in its own process (one torch thread each): the cores work side by side
        print(f"\n== collect and train {len(prepared)} tasks, {jobs} at a time (progress in "
              f"{out / 'train'}/<task>/metrics.jsonl)", flush=True)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {task: pool.submit(collect_and_train, task, *prepared[task], False) for task in prepared}
            rows = {task: future.result() for task, future in futures.items()}
    bundles = {task: Path(row["bundle"]) for task, row in rows.items()}

    print(f"\n== evaluate {len(bundles)} task(s), {evaluation.episodes} episodes each", flush=True)
    t0 = time.perf_counter()
    policy_for, swap = bank_or_reload(bundles, base)
    info = evaluate(list(bundles), policy_for, evaluation,
                    described={"demo": True, "base": base, "swap": swap, "bundles": {t: str(p) for t, p in bundles.items()}})
    eval_s = time.perf_counter() - t0
    for task, row in rows.items():
        summary, timing = info["results"]["per_task"][task], info["timing"][task]
        row.update({"episodes": summary["episodes"], "successes": summary["successes"],
                    "success_rate": summary["success_rate"], "ci95": summary["ci95"],
                    "action_latency_ms_p50": timing["latency_ms"]["action"]["p50"],
                    "chunk_latency_ms_p50": timing["latency_ms"]["chunk"]["p50"]})
    summary = {
        "out": str(out), "base": base, "base_recipe": base_recipe(base), "quick": config.quick,
        "method_config": config.method, "seed": config.seed, "overrides": overrides, "swap": swap,
        "eval": {"episodes": evaluation.episodes, "seed": evaluation.seed, "videos": evaluation.videos},
        "rows": list(rows.values()), "eval_s": round(eval_s, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "eval_info": str(out / "eval_info.json"), "videos": str(out / "videos"),
    }
    write_json_atomic(out / "demo_summary.json", summary)
    return summary


def collect_and_train(task: str, collect_config, play_config, run, progress: bool = True) -> dict:
    """Collect one task's demonstrations (and play scenes), train its bundle, return its table row."""
    from vla_peft.data.collect import collect
    from vla_peft.peft.report import numel
    from vla_peft.train import train

    if progress:
        print(f"\n== {task}: collect {collect_config.episodes} expert demonstrations", flush=True)
    collected = collect(collect_config, progress=progress)
    played = {"episodes_kept": 0, "seconds": 0.0}
    if play_config is not None:
        if progress:
            print(f"== {task}: record {play_config.episodes} play scenes for the grounding targets", flush=True)
        played = collect(play_config, progress=progress)
    if progress:
        print(f"== {task}: train {method_label(run)} for {run.train.steps} steps", flush=True)
    result = train(run, progress=progress)
    total = sum(numel(p) for p in result.policy.parameters())  # 4-bit weights counted unpacked
    trainable = result.summary["trainable_parameters"]
    row = {
        "task": task, "method": method_label(run), "trainable_parameters": trainable,
        "total_parameters": total, "trainable_percent": round(100 * trainable / total, 3),
        "demos": collected["episodes_kept"], "demo_frames": collected["frames"],
        "play_scenes": played["episodes_kept"],
        "collect_s": round(collected["seconds"] + played["seconds"], 1), "train_steps": run.train.steps,
        "test_crops": run.policy.eval_crop_grid ** 2,
        "train_s": result.summary["elapsed_s"], "final_loss": result.summary["final"].get("loss"),
        "bundle": result.summary["bundle"], "loss_curve": str(Path(run.train.output_dir) / "loss_curve.png"),
    }
    print(f"== {task}: {row['demos']} demos, {row['train_steps']} steps in {row['train_s'] / 60:.1f} min, "
          f"final loss {row['final_loss']:.4f}", flush=True)
    return row


def bank_or_reload(bundles: dict[str, Path], base: str):
    """LoRA (and head-only) bundles hot-swap on one loaded base; other methods load one at a time."""
    from vla_peft.policy.bundle import load_bundle, read_manifest
    from vla_peft.serve import AdapterBank

    methods = {(read_manifest(p)[0].get("method") or {}).get("method") for p in bundles.values()}
    if methods <= {"lora", None}:
        first = next(iter(bundles.values()))
        bank = AdapterBank.for_bundle(first, base=base)
        for task, path in bundles.items():
            bank.register(task, path)
        return bank.activate, "AdapterBank (one base, bundles swapped per task)"
    loaded: dict[str, object] = {}

    def policy_for(task: str):
        loaded.clear()  # one policy in memory at a time
        loaded[task] = load_bundle(bundles[task], base=base)
        return loaded[task]

    return policy_for, f"reloaded per task ({sorted(m for m in methods if m)} bundles do not hot-swap)"


def base_recipe(base: str) -> dict | None:
    """How a pretrained tiny base was built (its ``pretrain_recipe.json``), so figures name their base."""
    path = Path(base) / "pretrain_recipe.json"
    if not path.is_file():
        return None
    recipe = json.loads(path.read_text())
    return {k: recipe[k] for k in ("steps", "seed", "batch_size", "lr") if k in recipe}


def format_table(summary: dict) -> str:
    """The demo's one table: how much was trained, on what, how fast, and how well it worked."""
    head = (f"{'task':<10} {'method':<9} {'trainable':>9} {'demos':>5} {'play':>5} {'steps':>5} {'train':>7} "
            f"{'crops':>5} {'success':>8} {'95% CI':>14} {'ms/action':>9}")
    lines = [head, "-" * len(head)]
    for r in summary["rows"]:
        ci = f"[{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"
        latency = "-" if r["action_latency_ms_p50"] is None else f"{r['action_latency_ms_p50']:.1f}"
        lines.append(f"{r['task']:<10} {r['method']:<9} {r['trainable_percent']:>8.2f}% {r['demos']:>5} {r['play_scenes']:>5} "
                     f"{r['train_steps']:>5} {r['train_s']:>6.0f}s {r['test_crops']:>5} {100 * r['success_rate']:>7.1f}% {ci:>14} "
                     f"{latency:>9}")
    return "\n".join(lines)


def format_report(summary: dict) -> str:
    out = summary["out"]
    tasks = ",".join(r["task"] for r in summary["rows"])
    return "\n".join([
        format_table(summary),
        f"({summary['eval']['episodes']} closed-loop episodes per task from seed {summary['eval']['seed']}, "
        f"{summary['swap']}; crops: test-time crops averaged per chunk; 95% Wilson intervals; "
        "p50 latency per executed action)",
        f"total {summary['total_s'] / 60:.1f} min; base {summary['base']}",
        f"everything is in {out}: demo_summary.json, eval_info.json, videos/, train/<task>/loss_curve.png, "
        "train/<task>/bundle/",
        f"re-evaluate: vla-peft eval --bank {out}/train --tasks {tasks} --episodes 50",
        f"serve:       vla-peft serve --bank {out}/train",
    ])
